"""The efficacy study's pieces: worked examples in the prompt, rejection-sampling SFT, the study runner
with its paired bootstrap."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from rerec_mini import ablate
from rerec_mini import trainer as T
from rerec_mini.config import Config, UsageError, validate
from rerec_mini.prompts import build_messages, example_pool
from rerec_mini.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prompt_examples_are_earlier_turns_with_gold_answers_never_the_query_itself(ds):
    q = ds.queries["test"][0]
    msgs = build_messages(q, ds, None, examples=2)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    pool = example_pool(ds, 0, 3)
    assert [e[0].type for e in pool] == ["explicit", "implicit", "misinformed"]  # one type at a time
    assert all(e[0] in ds.queries["train"] for e in pool)
    assert "\\boxed{" + ds.items[pool[0][0].ground_truth[0]].title + "}" in msgs[2]["content"]
    # the first example asked as the query: the next example takes its place
    first = pool[0][0]
    own = build_messages(first, ds, None, examples=2)
    assert first.text not in own[1]["content"] and pool[2][0].text in own[3]["content"]
    assert build_messages(q, ds, None) == [msgs[0], msgs[-1]]  # examples=0: the prompt as it always was


def test_prompt_examples_reach_the_trainers_prompts_and_need_answer_size_1(micro_model, tmp_path, ds):
    base = dict(model=micro_model, output_dir=str(tmp_path), num_candidates=3, show_attributes="auto", sft_steps=0)
    plain = Trainer(Config(**base), ds, micro_model, torch.device("cpu"))
    shown = Trainer(Config(**base, prompt_examples=1), ds, micro_model, torch.device("cpu"))
    q = ds.queries["train"][40]
    c = plain.candidates.sample(q, 3, 0, seed=0)
    assert len(shown.prompt_ids(q, c)) > len(plain.prompt_ids(q, c)) + 20
    with pytest.raises(UsageError, match="prompt-examples"):
        validate(Config(**base, prompt_examples=1, answer_size=2))


def test_rejection_sampling_sft_trains_on_the_models_own_hits_only(micro_model, tmp_path, ds, monkeypatch):
    """--sft-source self: G samples per query, the distinct ones that hit and end become the targets."""
    real = T.Scorer.score

    def every_other_hits(self, queries, responses, candidates=None):
        r = real(self, queries, responses, candidates)
        r.hit = (np.arange(len(r.hit)) % 2 == 0)
        return r
    monkeypatch.setattr(T.Scorer, "score", every_other_hits)
    cfg = Config(model=micro_model, output_dir=str(tmp_path), num_candidates=3, sft_steps=3, sft_batch_size=2,
                 num_generations=4, max_completion_length=6, sft_source="self", sft_learning_rate=1e-2)
    tr = Trainer(cfg, ds, micro_model, torch.device("cpu"))
    q = ds.queries["train"][:2]
    batch = [(x, tr.candidates.sample(x, 3, 0, seed=0)) for x in q]
    seen = {}
    real_generate = T.generate

    def spy(*a, **kw):
        seen["ro"] = real_generate(*a, **kw)
        seen["ro"].truncated = [False] * len(seen["ro"].completions)  # as if every sample ended
        return seen["ro"]
    monkeypatch.setattr(T, "generate", spy)
    rows, stats = tr.own_correct_answers(batch)
    comps = seen["ro"].completions
    expected = list(dict.fromkeys((k // 4, tuple(comps[k])) for k in range(8) if k % 2 == 0))
    assert [(tr.prompt_ids(*batch[i]), list(c)) for i, c in expected] == [(p, list(c)) for p, c in rows]
    assert stats["sft/self_hit_rate"] == 0.5 and stats["sft/self_targets"] == len(rows)
    before = [p.detach().clone() for p in tr.model.parameters()]
    row = tr.sft_step()
    assert row["sft/self_targets"] > 0 and np.isfinite(row["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))


def test_paired_bootstrap_interval():
    a = {f"q{i}": 0.0 for i in range(200)}
    b = {f"q{i}": float(i % 4 == 0) for i in range(200)}  # +0.25 on every fourth query
    ci = ablate.paired_ci(a, b)
    assert ci["diff"] == pytest.approx(0.25) and ci["lo"] > 0.15 and ci["hi"] < 0.35 and ci["n"] == 200
    same = ablate.paired_ci(a, dict(a))
    assert same["diff"] == 0 and same["lo"] == same["hi"] == 0
    assert ablate.parse_sets(["batch_size=8", "keep-truncated=true", "learning_rate=1e-3"]) == \
        {"batch_size": 8, "keep_truncated": True, "learning_rate": 1e-3}
    with pytest.raises(UsageError, match="no_such_option"):
        ablate.parse_sets(["no_such_option=1"])


def test_study_runs_every_arm_from_one_start_with_the_same_step_budget(micro_model, tmp_path):
    out = tmp_path / "study"
    argv = ["--model", micro_model, "--arms", "start,sft,rft,grpo,rerec", "--seeds", "1", "--steps", "2",
            "--eval-limit", "6", "--out", str(out)]
    for kv in ("batch_size=2", "num_generations=2", "max_completion_length=6", "num_candidates=3", "beta=0",
               "keep_truncated=true"):
        argv += ["--set", kv]
    assert ablate.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["arms"]) == ["start", "sft", "rft", "grpo", "rerec"]
    assert "vs_sft" in res["arms"]["rerec"] and "vs_start" in res["arms"]["sft"] and "vs_sft" not in res["arms"]["sft"]
    for arm, steps in (("sft", ("sft", 2)), ("rerec", ("rl", 2)), ("grpo", ("rl", 2))):
        rows = [json.loads(x) for x in (out / f"{arm}-seed0" / "metrics.jsonl").read_text().splitlines()]
        assert sum(r.get("phase") == steps[0] for r in rows) == steps[1], arm
    for arm in ("sft", "rft", "grpo", "rerec"):  # strict JSON: an RFT step with no right answer has a null loss
        for line in (out / f"{arm}-seed0" / "metrics.jsonl").read_text().splitlines():
            json.loads(line, parse_constant=lambda c: pytest.fail(f"{arm}: {c} in metrics.jsonl"))
    grpo = json.loads((out / "grpo-seed0" / "train_config.json").read_text())
    assert grpo["no_raae"] and grpo["curriculum"] == "none" and grpo["reward_weights"] == "0.1,1,0,0"
    assert "| rerec |" in (out / "results.md").read_text()
    # the same command again (e.g. after gathering other machines' runs): every finished run is reused
    (out / "sft-seed0" / "metrics.jsonl").rename(out / "sft-seed0" / "metrics.moved")
    assert ablate.main(argv) == 0
    assert json.loads((out / "results.json").read_text())["arms"] == res["arms"]
    assert not (out / "sft-seed0" / "metrics.jsonl").exists()  # not trained again
    # --start one of our checkpoints: every arm takes the prompt format it was trained with, unless --set
    again = tmp_path / "again"
    assert ablate.main(["--model", micro_model, "--start", str(out / "sft-seed0" / "final"), "--arms", "start",
                        "--seeds", "1", "--eval-limit", "2", "--out", str(again), "--set", "beta=0"]) == 0
    cfg = json.loads((again / "start-seed0" / "train_config.json").read_text())
    assert (cfg["num_candidates"], cfg["max_completion_length"]) == (3, 6)
