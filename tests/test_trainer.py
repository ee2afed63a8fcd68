"""Short CPU runs of the trainer: every switch, exact resume, SIGTERM, the NaN guard, train.py."""

import json
import math
import signal
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

from rerec_mini import trainer as T
from rerec_mini.data import load_dataset
from rerec_mini.model import build_tiny, load_model
from rerec_mini.trainer import Config, Trainer, TrainingStopped, dataset_texts

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ["step", "reward_mean", "rec_mean", "qas_mean", "pas_mean", "format_ok", "hit_rate", "hallucination_rate",
            "kl", "clip_frac", "entropy", "grad_norm", "lr", "response_len", "zero_var_groups", "penalized_token_frac",
            "time_sample", "time_score", "time_update", "tokens_per_s"]


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory):
    """A ~60k-parameter model + tokenizer trained on the bundled data: seconds per run."""
    ds = load_dataset(T.BUNDLED_DATA)
    return str(build_tiny(tmp_path_factory.mktemp("micro") / "m", dataset_texts(ds), vocab_size=400, hidden_size=32,
                          num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64))


def micro_config(model: str, out: Path, **kw) -> Config:
    # keep_truncated: an untrained model never ends within 12 tokens, and masking every
    # truncated rollout would leave no update to test.
    base = dict(model=model, output_dir=str(out), max_steps=2, batch_size=2, num_generations=2,
                max_completion_length=12, num_candidates=3, show_attributes="auto", learning_rate=1e-3,
                warmup_steps=1, micro_batch_size=3, eval_limit=5, save_every=2, sft_steps=0, beta=0.0,
                keep_truncated=True)
    return Config(**{**base, **kw})


@pytest.fixture
def varied_rewards(monkeypatch):
    """An untrained model fails every answer alike: all rewards equal, every advantage 0.
    Spread the rewards within each group so the update has something to learn."""
    real = T.Scorer.score

    def score(self, queries, responses, candidates=None):
        r = real(self, queries, responses, candidates)
        r.total = r.total + 0.1 * (torch.arange(len(r.total)).numpy() % 2)
        return r

    monkeypatch.setattr(T.Scorer, "score", score)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


SWITCHES = [
    {},
    {"loss_type": "seq-mean", "curriculum": "paper", "difficulty_metric": "reward"},
    {"loss_type": "dr-grpo", "curriculum": "none", "no_raae": True},
    {"beta": 0.05, "num_iterations": 2, "epsilon_high": 0.28},
    {"beta": 0.01, "ref_offload": True, "gradient_checkpointing": True},
    {"raae_claims": True, "raae_penalty": 0.5, "no_qas": True, "no_pas": True, "reward_weights": "0.1,1,0.01,0.01"},
    {"hard_negatives": 1, "history_len": 2, "answer_size": 2, "show_attributes": "genre,director"},
    {"num_candidates": 0, "keep_truncated": False, "top_p": 0.9, "temperature": 0.7},
    {"sft_steps": 2, "sft_prompt_weight": 0.5, "eval_every": 1, "save_total_limit": 1},
]


@pytest.mark.parametrize("switches", SWITCHES, ids=[",".join(s) or "defaults" for s in SWITCHES])
def test_every_switch_runs(micro_model, tmp_path, switches, varied_rewards):
    cfg = micro_config(micro_model, tmp_path / "run", **switches)
    start = load_model(micro_model).state_dict()
    results = Trainer(cfg).run()
    rows = [r for r in read_metrics(tmp_path / "run") if "reward_mean" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        assert all(math.isfinite(r[k]) for k in REQUIRED), r
        assert any(k.startswith("curriculum_") for k in r)
        assert -1.0 <= r["reward_mean"] <= 1.5 and 0.0 <= r["format_ok"] <= 1.0
    final = results["final"]
    assert set(final) >= {"overall", "by_type"} and final["overall"]["count"] == 5
    assert json.loads((tmp_path / "run" / "eval_final.json").read_text())["overall"] == final["overall"]
    # the final directory is a plain HF model directory our loader (and transformers) reads,
    # and the updates changed the weights (unless every rollout was truncated and masked)
    end = load_model(str(tmp_path / "run" / "final")).state_dict()
    if cfg.keep_truncated:
        assert all(r["grad_norm"] > 0 for r in rows)
        assert any(not torch.equal(start[k], end[k]) for k in start)
    if switches.get("beta"):
        assert rows[-1]["kl"] >= 0.0
    if switches.get("sft_steps"):
        assert (tmp_path / "run" / "eval_sft.json").exists() and (tmp_path / "run" / "eval_step1.json").exists()
        assert any(r.get("phase") == "sft" for r in read_metrics(tmp_path / "run"))
    if switches.get("no_raae"):
        assert all(r["penalized_token_frac"] == 0.0 for r in rows)
    kept = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert len(kept) <= cfg.save_total_limit and not any(p.endswith(".tmp") for p in kept)


def _weights(path) -> dict:
    return load_model(str(path)).state_dict()


def test_resume_continues_exactly(micro_model, tmp_path, varied_rewards):
    cfg = micro_config(micro_model, tmp_path / "a", max_steps=4, save_every=10, sft_steps=2, beta=0.02)
    Trainer(cfg).run()
    b = replace(cfg, output_dir=str(tmp_path / "b"))
    with pytest.raises(TrainingStopped, match="stopped at step 2"):
        Trainer(b).run(until_step=2)
    assert (tmp_path / "b" / "checkpoint-2").exists()
    Trainer(replace(b, resume=True)).run()
    wa, wb = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the logged run is the same too (timings aside), with no duplicated steps
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("time_", "tokens_per"))} for r in rows]
    assert strip(read_metrics(tmp_path / "a")) == strip(read_metrics(tmp_path / "b"))


def test_resume_without_checkpoint_is_a_clear_error(micro_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(micro_config(micro_model, tmp_path / "empty", resume=True))


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(micro_model, tmp_path):
    out = tmp_path / "sig"
    cmd = [sys.executable, str(REPO / "train.py"), "--model", micro_model, "--output-dir", str(out),
           "--max-steps", "500", "--batch-size", "2", "--num-generations", "2", "--max-completion-length", "12",
           "--num-candidates", "3", "--save-every", "1000", "--beta", "0", "--eval-limit", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and "reward_mean" in (out / "metrics.jsonl").read_text():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "resume with --resume" in err
    ckpts = [p for p in out.glob("checkpoint-*") if not p.name.endswith(".tmp")]
    assert len(ckpts) == 1
    step = int(ckpts[0].name.split("-")[-1])
    assert step >= 1 and json.loads((ckpts[0] / "trainer_state" / "state.json").read_text())["step"] == step
    assert not (out / "final").exists()


def test_nan_loss_skips_the_update_then_stops_after_three(micro_model, tmp_path, monkeypatch, varied_rewards):
    real = T.policy_loss
    calls = {"n": 0}

    def nan_first(*args, **kw):
        loss, sums = real(*args, **kw)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 1 else loss), sums

    monkeypatch.setattr(T, "policy_loss", nan_first)
    tr = Trainer(micro_config(micro_model, tmp_path / "nan", max_steps=1, micro_batch_size=100))
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    row = tr.step()
    assert row["skipped"] == 1 and tr.nan_streak == 1
    assert all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items())  # nothing reached the weights

    monkeypatch.setattr(T, "policy_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    tr = Trainer(micro_config(micro_model, tmp_path / "nan2", max_steps=10, micro_batch_size=100))
    with pytest.raises(TrainingStopped, match="NaN/inf in 3 updates in a row.*checkpoint-2 written"):
        tr.run()
    assert tr.step_no == 2 and (tmp_path / "nan2" / "checkpoint-2").exists()


def test_train_py_help_lists_every_option():
    out = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True, check=True).stdout
    for f in fields(Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "(tiny: " in out


def test_tiny_preset_applies_only_to_unset_flags():
    cfg = T.resolve_config({"model": "tiny", "max_steps": 3})
    assert cfg.max_steps == 3 and cfg.sft_steps == T.TINY_PRESET["sft_steps"]
    assert T.resolve_config({"model": "Qwen2.5-1.5B"}).learning_rate == 5e-6
