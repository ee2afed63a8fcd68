"""Does the RL step learn? (python -m rerec_mini.bench sanity, README "Does the RL learn?").

A format-only SFT, then RL on a reward no label encodes (box the candidate with the shortest title),
real vs shuffled rewards. A working RL step takes the held-out rate from below chance to well above
it; the control must not. Checked to fail when the advantage sign is flipped, the loss ignores the
advantages, the log-probs are shifted by one position, or the optimiser step is skipped (the note of
the commit that added this test). About a minute on 2 CPU cores.
"""

import pytest

from rerec_mini.bench import sanity

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def result():
    return sanity.run(sanity.Sanity())


def test_the_start_knows_the_format_but_not_the_target(result):
    assert result["start"] <= result["chance"] + 0.15


def test_rl_learns_what_only_the_reward_says(result):
    curve = result["curves"]["real"]
    assert curve[-1][1] >= 0.5 and curve[-1][1] >= result["start"] + 0.3, curve


def test_the_update_scores_the_tokens_the_sampler_drew(result):
    """In fp32 the trainer's log-prob of each sampled token equals the sampler's: a log-prob taken one
    position off shows here even where the sequence-level advantage hides it from the curve."""
    assert result["logp_gap"]["real"] < 1e-3


def test_the_shuffled_control_does_not(result):
    curve = result["curves"]["shuffled"]
    assert max(rate for _, rate in curve[1:]) <= result["chance"] + 0.15, curve


def test_the_curve_prints_as_a_table_and_plots_without_matplotlib_too(tmp_path, monkeypatch, capsys):
    res = {"chance": 0.25, "curves": {"real": [[0, 0.2], [25, 0.6]], "shuffled": [[0, 0.2], [25, 0.1]]}}
    assert sanity.table(res).splitlines()[2:] == ["| 0 | 0.200 | 0.200 |", "| 25 | 0.600 | 0.100 |"]
    pytest.importorskip("matplotlib")
    assert sanity.plot(res, tmp_path / "a.png") == tmp_path / "a.png" and (tmp_path / "a.png").stat().st_size > 0
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kw):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert sanity.plot(res, tmp_path / "b.png") is None and not (tmp_path / "b.png").exists()
    assert "matplotlib is not installed: no PNG written" in capsys.readouterr().out
