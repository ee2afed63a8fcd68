"""report.md (rerec_mini/report.py) from a run directory's files: the headline for an SFT-only run, the
offline demo's expected range beside its figures (the same range README states), curves without a
fake KL under --beta 0, whole-number steps, and what to install when matplotlib is missing."""

import builtins
import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from rerec_mini import report
from rerec_mini.config import resolve_config

README = Path(__file__).resolve().parents[1] / "README.md"


def demo_config(**kw) -> dict:
    """train_config.json of `python train.py --model tiny` (the preset), with `kw` changed."""
    return {**asdict(resolve_config({"model": "tiny"})), "output_dir": "/x/runs/demo", "data_hash": "0" * 16,
            "overrides": [], **kw}


def write_run(path: Path, cfg: dict, sft: float | None = 0.47, final: float | None = 0.475, steps: int = 12) -> Path:
    path.mkdir()
    (path / "train_config.json").write_text(json.dumps(cfg))
    rows = [{"phase": "sft", "sft_step": 1, "loss": 2.0}, {"phase": "sft", "sft_step": 2, "loss": 1.0}]
    rows += [{"phase": "rl", "step": i, "reward": 0.1 * i, "hit_rate": 0.5, "kl": 0.0, "entropy": 1.0 - 0.01 * i}
             for i in range(1, steps + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, hit in (("sft", sft), ("final", final)):
        if hit is not None:
            (path / f"eval_{name}.json").write_text(json.dumps({"overall": {"hit@1": hit, "count": 200}}))
    return path


def test_readme_states_the_demo_range_the_report_prints():
    text = README.read_text(encoding="utf-8")
    for evaluation in report.DEMO_EXPECTED.values():
        for lo, hi in evaluation.values():
            assert f"{lo:.3f}–{hi:.3f}" in text, (lo, hi)


def test_the_demo_is_recognised_up_to_its_seed_and_how_it_runs():
    assert report.is_demo(demo_config())
    assert report.is_demo(demo_config(seed=3, device="cpu", save_steps=10, eval_steps=50))
    assert not report.is_demo(demo_config(max_steps=10))  # another run: its own figures
    assert not report.is_demo(demo_config(eval_limit=50))
    assert not report.is_demo(demo_config(data="/elsewhere/synth-movies"))
    assert not report.is_demo(demo_config(model="SmolLM2-135M"))
    assert not report.is_demo({})


def test_a_demo_report_prints_the_expected_range_beside_its_figures(tmp_path):
    md = report.write_report(write_run(tmp_path / "a", demo_config())).read_text()
    lo, hi = report.DEMO_EXPECTED["sft"]["seed 0"]
    assert f"after SFT {lo:.3f}-{hi:.3f}" in md or f"(seed 0: {lo:.3f}-{hi:.3f})" in md
    assert "This run (seed 0): after SFT 0.470, within seed 0's range; after RL 0.475, within seed 0's range." in md
    md = report.write_report(write_run(tmp_path / "b", demo_config(seed=2), sft=0.05, final=0.3)).read_text()
    assert "after SFT 0.050, OUTSIDE the range over seeds; after RL 0.300, within the range over seeds" in md
    md = report.write_report(write_run(tmp_path / "c", demo_config(max_steps=10))).read_text()
    assert "Expected for the offline demo" not in md


def test_an_sft_only_run_reports_no_rl_gain(tmp_path):
    run = write_run(tmp_path / "sft", demo_config(max_steps=0), final=0.47, steps=0)
    md = report.write_report(run).read_text()
    assert "**Held-out hit@1 after SFT: 0.470** (an SFT-only run: --max-steps 0, no RL)." in md
    assert "after RL (" not in md and "+0.000" not in md
    assert "| final |" not in md  # the same model as the SFT row
    run = write_run(tmp_path / "rl", demo_config(), sft=0.47, final=0.5)
    assert "0.470 after SFT -> 0.500 after RL (+0.030)" in report.write_report(run).read_text()


def test_without_matplotlib_the_page_says_how_to_get_curves_and_drops_a_kl_that_is_not_measured(tmp_path,
                                                                                                     monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kw):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kw)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    md = report.write_report(write_run(tmp_path / "b0", demo_config(beta=0.0))).read_text()
    assert "pip install 'rerec-mini[plot]'" in md and "| entropy |" in md and "| kl |" not in md
    md = report.write_report(write_run(tmp_path / "b1", demo_config(beta=0.01))).read_text()
    assert "| kl |" in md


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed (the plot extra)")
def test_curves_have_whole_number_steps_and_no_flat_kl_under_beta_0(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    drawn = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: drawn.__setitem__(Path(path).name, fig))
    report.write_report(write_run(tmp_path / "b0", demo_config(beta=0.0), steps=5))
    ax = drawn["curve_kl_entropy.png"].axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["entropy"]
    assert "no KL term" in ax.get_title()
    for fig in drawn.values():
        fig.canvas.draw()
        ticks = fig.axes[0].get_xticks()
        assert len(ticks) and all(float(t).is_integer() for t in ticks), ticks
    drawn.clear()
    report.write_report(write_run(tmp_path / "b1", demo_config(beta=0.01), steps=5))
    labels = [line.get_label() for line in drawn["curve_kl_entropy.png"].axes[0].get_lines()]
    assert labels == ["kl", "entropy"]
