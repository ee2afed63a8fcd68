"""Seeds reproduce across versions: a fingerprint of the draws the seed-0 demo makes.

`python train.py --model tiny` (seed 0) must read the same SFT queries in the same order with the
same candidates, roll out the same queries with the same candidates in its first RL step, and be
evaluated on the same held-out candidate sets in every version; otherwise two versions' figures
are not measured on the same thing (issue 23: one seed gave 23 and then 17 hits on the same 100
queries). The draws are taken from the Trainer itself, stopped before any model forward, so the
test is cheap and follows the trainer's own code (not a copy of it).

A change that moves one of these draws on purpose must update FINGERPRINT here and say so in its
commit message (the figures measured before it were measured on other draws).
"""

import hashlib
import json

import pytest
import torch

from rerec_mini import evaluate, trainer as trainer_module
from rerec_mini.config import resolve_config
from rerec_mini.trainer import Trainer

# sha256 (first 16 hex digits) of the draws below, for the bundled data/synth-movies and seed 0.
FINGERPRINT = {
    "sft": "33ad0d18f173a8eb",
    "rl": "b184eb1ab9a366f1",
    "test": "8a9522e2fa09060f",
}
SFT_STEPS = (0, 1, 2, 1500)  # the first batches (2 candidates each: the ramp) and one at 8 candidates, epoch 4


class Stop(Exception):
    """Raised where a step would start computing with the model: its draws are all made by then."""


def stop(*args, **kwargs):
    raise Stop


def digest(draws) -> str:
    return hashlib.sha256(json.dumps(draws, ensure_ascii=False).encode()).hexdigest()[:16]


@pytest.fixture
def demo(micro_model, ds, tmp_path, monkeypatch):
    """A Trainer with the demo's settings (the tiny preset, seed 0) on the micro model (the draws
    do not depend on the model), and the list every candidate draw is recorded into."""
    cfg = resolve_config({"model": "tiny", "output_dir": str(tmp_path)})
    assert cfg.seed == 0 and cfg.sft_fresh and cfg.num_candidates == 8
    tr = Trainer(cfg, ds, micro_model, torch.device("cpu"))
    drawn = []
    real = tr.candidates.sample

    def sample(q, *args, **kwargs):
        c = real(q, *args, **kwargs)
        drawn.append([q.query_id, q.text, q.ground_truth, c])
        return c

    monkeypatch.setattr(tr.candidates, "sample", sample)
    return tr, drawn


def sft_draws(tr, drawn, monkeypatch):
    monkeypatch.setattr(tr, "_pack", stop)  # the batch is assembled: stop before the forward
    out = []
    for s in SFT_STEPS:
        tr.sft_step_no = s
        with pytest.raises(Stop):
            tr.sft_step()
        out.append([s, drawn[:]])
        drawn.clear()
    return out


def rl_draws(tr, drawn, monkeypatch):
    tr.start_rl()
    monkeypatch.setattr(trainer_module, "generate", stop)
    with pytest.raises(Stop):
        tr.rollout()
    return drawn[:]


def held_out_draws(tr, drawn, monkeypatch):
    monkeypatch.setattr(evaluate, "decode", stop)  # the prompts are built: stop before generating
    with pytest.raises(Stop):
        tr.evaluate()
    return drawn[:]


def test_seed_0_draws_are_the_pinned_ones(demo, monkeypatch):
    tr, drawn = demo
    sft = sft_draws(tr, drawn, monkeypatch)
    assert [len(d) for _, d in sft] == [tr.cfg.sft_batch_size] * len(SFT_STEPS)
    assert {len(c) for _, d in sft[:3] for *_, c in d} == {2} and {len(c) for *_, c in sft[3][1]} == {8}
    rl = rl_draws(tr, drawn, monkeypatch)
    assert len(rl) == tr.cfg.batch_size and {q[0].split("-")[0] for q in rl} == {"train"}
    drawn.clear()
    test = held_out_draws(tr, drawn, monkeypatch)
    assert [q[0] for q in test] == [q.query_id for q in tr.ds.queries["test"]]
    got = {"sft": digest(sft), "rl": digest(rl), "test": digest(test)}
    assert got == FINGERPRINT, f"a seed-0 draw moved: {got} (update FINGERPRINT on purpose, and say so in the commit)"
