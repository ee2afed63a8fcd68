"""The efficacy study's pieces: worked examples in the prompt, rejection-sampling SFT, the study runner
with its paired bootstrap."""

import hashlib
import importlib.util
import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rerec_mini import ablate
from rerec_mini import evaluate as E
from rerec_mini import trainer as T
from rerec_mini.config import HARMLESS, PROMPT_FORMAT, Config, UsageError, validate
from rerec_mini.evaluate import summarise
from rerec_mini.prompts import CandidateSampler, build_messages, example_pool, render_prompt
from rerec_mini.rewards import RewardConfig, Scorer
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


# sha256 of the messages of `_old_prompts` as the code wrote them before --prompt-example-pool (commit
# be792a9): the default (0) must keep every prompt byte for byte. A deliberate change of the prompt's
# wording changes it too; then recompute it, knowing that old checkpoints meet new prompts.
OLD_PROMPTS_SHA256 = "b72033fb27d3e46bf8eccaf8a4a0249300035de973a831a2617d0d7ad2aa1275"


def _old_prompts(ds, **kw) -> str:
    sampler = CandidateSampler(ds)
    pool = example_pool(ds, 4, 3)
    qs = ds.queries["test"][::40] + [pool[0][0], pool[1][0]]  # the pool's own queries: the next example stands in
    msgs = [build_messages(q, ds, sampler.sample(q, 4, 0, 0), show_attributes=("auto",), examples=k, **kw)
            for q in qs for k in (1, 2)]
    return hashlib.sha256(json.dumps(msgs).encode()).hexdigest()


def test_prompt_example_pool_varies_the_examples_per_query_never_the_query_itself(ds):
    """P > K: each prompt's K examples are drawn from the first P of the pool by its query id (the
    same every time), never the query itself, and differ across queries; P = 0: the prompts as before."""
    assert _old_prompts(ds) == _old_prompts(ds, examples_from=0) == OLD_PROMPTS_SHA256
    K, P = 1, 8
    first_p = {q.query_id for q, _ in example_pool(ds, 0, P)}

    by_text = {x.text: x.query_id for x, _ in example_pool(ds, 0, P)}

    def shown(q):  # the query ids of the examples a prompt shows
        msgs = build_messages(q, ds, None, examples=K, examples_from=P)
        assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * K + ["user"]
        return [next(i for t, i in by_text.items() if f"Request: {t}\n" in m["content"]) for m in msgs[1:-1:2]]

    queries = ds.queries["test"][:60] + [q for q, _ in example_pool(ds, 0, P)]
    picks = {q.query_id: shown(q) for q in queries}
    for q in queries:
        assert len(picks[q.query_id]) == K and set(picks[q.query_id]) <= first_p
        assert q.query_id not in picks[q.query_id]  # never its own example
    random.seed(123)  # the global stream plays no part: the draw is seeded by the query id
    assert {q.query_id: shown(q) for q in queries} == picks
    assert len({tuple(v) for v in picks.values()}) >= P - 2  # varied: nearly all of the pool is used
    # with the default every prompt shows the same first example (the pool's second for its first query)
    same = {tuple(m["content"] for m in build_messages(q, ds, None, examples=K)[1:3]) for q in ds.queries["test"][:60]}
    assert len(same) == 1


def test_prompt_example_pool_is_checked_and_reaches_the_trainers_prompts(micro_model, tmp_path, ds, monkeypatch):
    base = dict(model=micro_model, output_dir=str(tmp_path), num_candidates=3, sft_steps=0)
    for bad in (dict(prompt_examples=1, prompt_example_pool=1), dict(prompt_examples=0, prompt_example_pool=4),
                dict(prompt_examples=2, prompt_example_pool=-1)):
        with pytest.raises(UsageError, match="^--prompt-example-pool"):
            validate(Config(**base, **bad))
    validate(Config(**base, prompt_examples=1, prompt_example_pool=2))
    varied = Trainer(Config(**base, prompt_examples=1, prompt_example_pool=6), ds, micro_model, torch.device("cpu"))
    fixed = Trainer(Config(**base, prompt_examples=1), ds, micro_model, torch.device("cpu"))
    qs = ds.queries["train"][100:130]
    cands = [fixed.candidates.sample(q, 3, 0, seed=0) for q in qs]
    expect = [varied.tokenizer.encode(render_prompt(q, ds, c, varied.tokenizer, examples=1, examples_from=6),
                                      add_special_tokens=False) for q, c in zip(qs, cands)]
    assert [varied.prompt_ids(q, c) for q, c in zip(qs, cands)] == expect
    assert sum(varied.prompt_ids(q, c) != fixed.prompt_ids(q, c) for q, c in zip(qs, cands)) >= len(qs) // 2
    drawn = []  # the held-out prompts draw their examples too, and the setting is recorded with the figures
    real = E.render_prompt
    monkeypatch.setattr(E, "render_prompt", lambda *a, **kw: drawn.append(kw["examples_from"]) or real(*a, **kw))
    res = varied.evaluate()
    assert res["settings"]["prompt_example_pool"] == 6 and drawn and set(drawn) == {6}


def test_format_needs_candidate_reaches_the_trainers_scorer(micro_model, tmp_path, ds):
    base = dict(model=micro_model, output_dir=str(tmp_path), num_candidates=3, sft_steps=0)
    q = ds.queries["train"][0]
    cands = CandidateSampler(ds).sample(q, 3, 0, 0)
    off = next(i for i in ds.item_ids if i not in cands)
    answer = [f"\\boxed{{{ds.items[off].title}}}"]
    for flag, fmt in ((False, 0.5), (True, -0.5)):
        tr = Trainer(Config(**base, format_needs_candidate=flag), ds, micro_model, torch.device("cpu"))
        assert tr.scorer.score([q], answer, [cands]).format[0] == fmt
    assert "format_needs_candidate" not in HARMLESS  # it changes what a resumed run computes


@settings(max_examples=150, deadline=None)
@given(k=st.integers(0, 198), n=st.integers(2, 12), seed=st.integers(0, 10**6), pick=st.integers(0, 10**6),
       size=st.integers(1, 3), then=st.lists(st.integers(0, 11), max_size=3), reasoning=st.booleans())
def test_a_box_topped_by_a_non_candidate_fails_the_format_only_when_the_flag_is_on(ds, k, n, seed, pick, size,
                                                                                   then, reasoning):
    """Any query, candidate set and answer size: a box whose first entry is a catalogue title not among the
    candidates scores format -0.5 (NDCG -0.5, QAS and PAS 0, as no box) with --format-needs-candidate,
    +0.5 without it (the release's rule); topped by a candidate, +0.5 either way."""
    q = ds.queries["test"][k]
    cands = CandidateSampler(ds).sample(q, n, 0, seed)
    outside = [i for i in ds.item_ids if i not in cands]
    title = ds.items[outside[pick % len(outside)]].title
    rest = [ds.items[cands[j % len(cands)]].title for j in then]  # listed titles after the first entry
    text = ("Step 1: the request.\n" if reasoning else "") + "\\boxed{" + "; ".join([title, *rest]) + "}"
    listed_first = "\\boxed{" + "; ".join([*rest, title] if rest else [ds.items[cands[0]].title]) + "}"
    on, off = (_scorers(ds, size)[flag].score([q, q], [text, listed_first], [cands, cands]) for flag in (True, False))
    assert on.format[0] == -0.5 and on.rec[0] == -0.5 and on.qas[0] == 0 and on.pas[0] == 0 and not on.hit[0]
    assert on.total[0] == pytest.approx(0.1 * -0.5 - 0.5)
    assert off.format[0] == 0.5 and off.rec[0] >= 0
    assert on.format[1] == off.format[1] == 0.5 and on.total[1] == pytest.approx(off.total[1])
    # open generation has no list to check against: the flag changes nothing there
    assert _scorers(ds, size)[True].score([q], [text], [None]).format[0] == 0.5


_SCORERS: dict = {}


def _scorers(ds, k):
    """{flag: Scorer} at answer size k, built once (the graphs take a while)."""
    if k not in _SCORERS:
        base = Scorer(ds, RewardConfig(k=k))
        _SCORERS[k] = {False: base, True: Scorer(ds, RewardConfig(k=k, format_needs_candidate=True))}
    return _SCORERS[k]


def test_eval_metrics_keep_the_releases_format_rule_and_count_off_list_boxes(ds):
    """format_ok is the release's rule whatever the reward's, so runs with and without the flag compare;
    off_list counts boxes topped by a title the prompt did not list (a copied example's answer)."""
    qs = ds.queries["test"][:3]
    cands = [CandidateSampler(ds).sample(q, 4, 0, 0) for q in qs]
    off = next(i for i in ds.item_ids if all(i not in c for c in cands))
    texts = [f"\\boxed{{{ds.items[off].title}}}", f"\\boxed{{{ds.items[cands[1][0]].title}}}", "no box"]
    for flag in (False, True):
        scored = _scorers(ds, 1)[flag].score(qs, texts, cands)
        o = summarise(qs, cands, scored, [1, 1, 1])["overall"]
        assert o["format_ok"] == pytest.approx(2 / 3) and o["off_list"] == pytest.approx(1 / 3)
    assert summarise(qs, [None] * 3, _scorers(ds, 1)[True].score(qs, texts, None), [1] * 3)["overall"]["off_list"] == 0


def _eval_script():
    spec = importlib.util.spec_from_file_location("eval_cli", Path(__file__).resolve().parents[1] / "eval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_eval_and_ask_take_the_checkpoints_example_pool_unless_told(micro_model, tmp_path, capsys, monkeypatch):
    """A checkpoint trained with --prompt-example-pool: eval.py and ask draw the examples as its training
    did; the flag overrides; a bad value is one line, exit 2."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(micro_model, ckpt)
    (ckpt / "trainer_state").mkdir()
    (ckpt / "trainer_state" / "state.json").write_text(json.dumps({"config": {
        "num_candidates": 3, "prompt_examples": 1, "prompt_example_pool": 5, "max_completion_length": 4}}))
    script = _eval_script()
    seen = []
    real = script.evaluate_policy
    monkeypatch.setattr(script, "evaluate_policy", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    drawn = []
    real_render = E.render_prompt
    monkeypatch.setattr(E, "render_prompt", lambda *a, **kw: drawn.append(kw["examples_from"]) or real_render(*a, **kw))
    for flags, want in (([], 5), (["--prompt-example-pool", "0"], 0), (["--prompt-example-pool", "7"], 7)):
        out = tmp_path / "e.json"
        drawn.clear()
        assert script.main(["--model", str(ckpt), "--limit", "2", "--output", str(out), *flags]) == 0
        assert seen[-1]["prompt_example_pool"] == want and seen[-1]["prompt_examples"] == 1 and set(drawn) == {want}
        assert json.loads(out.read_text())["settings"]["prompt_example_pool"] == want
    with pytest.raises(SystemExit):
        script.main(["--model", str(ckpt), "--help"])
    assert "[the checkpoint's: 5]" in " ".join(capsys.readouterr().out.split())
    assert script.main(["--model", str(ckpt), "--prompt-example-pool", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: --prompt-example-pool 1: must be 0 (the same examples in every prompt) or more than")

    from rerec_mini import ask
    real_render = ask.render_prompt
    monkeypatch.setattr(ask, "render_prompt", lambda *a, **kw: drawn.append(kw) or real_render(*a, **kw))
    for flags, want in (([], 5), (["--prompt-example-pool", "0"], 0)):
        assert ask.main(["--model", str(ckpt), "--query", "test-explicit-00000", *flags]) == 0
        assert (drawn[-1]["examples"], drawn[-1]["examples_from"]) == (1, want)
    assert ask.main(["--model", str(ckpt), "--query", "test-explicit-00000", "--prompt-example-pool", "1"]) == 2
    assert "--prompt-example-pool 1" in capsys.readouterr().err


def test_the_shortcut_fixes_pass_through_ablate_set(micro_model, tmp_path):
    sets = ablate.parse_sets(["prompt_examples=1", "prompt_example_pool=8", "format_needs_candidate=true"])
    assert sets == {"prompt_examples": 1, "prompt_example_pool": 8, "format_needs_candidate": True}
    for arm in ("grpo", "rerec-release", "sft"):
        cfg = ablate.arm_config(arm, {"model": micro_model, **sets}, micro_model, 0, 2, tmp_path)
        validate(cfg)
        assert (cfg.prompt_examples, cfg.prompt_example_pool, cfg.format_needs_candidate) == (1, 8, True)
    assert "prompt_example_pool" in PROMPT_FORMAT  # a run from such a checkpoint keeps drawing its examples


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


def test_study_runs_side_by_side_are_the_runs_it_makes_one_at_a_time(micro_model, tmp_path):
    # one thread here (the module's fixture), so each worker's share is one thread too: the same arithmetic
    base = ["--model", micro_model, "--arms", "start,sft,grpo", "--seeds", "2", "--steps", "2", "--eval-limit", "6"]
    for kv in ("batch_size=2", "num_generations=2", "max_completion_length=6", "num_candidates=3", "beta=0",
               "keep_truncated=true"):
        base += ["--set", kv]
    assert ablate.main(base + ["--out", str(tmp_path / "one")]) == 0
    assert ablate.main(base + ["--out", str(tmp_path / "two"), "--jobs", "3"]) == 0
    for arm in ("start", "sft", "grpo"):
        for seed in (0, 1):
            one, two = (json.loads((tmp_path / d / f"{arm}-seed{seed}" / "eval_final.json").read_text())
                        for d in ("one", "two"))
            assert [s["response"] for s in two["samples"]] == [s["response"] for s in one["samples"]], (arm, seed)
            assert two["overall"] == one["overall"], (arm, seed)
            log = (tmp_path / "two" / "logs" / f"{arm}-seed{seed}.log").read_text()
            assert f"{arm}-seed{seed}  (new run)" in log  # a worker trained it, not the gathering loop
    one, two = (json.loads((tmp_path / d / "results.json").read_text())["arms"] for d in ("one", "two"))
    assert {a: r["hit@1_per_seed"] for a, r in two.items()} == {a: r["hit@1_per_seed"] for a, r in one.items()}
    # again with one more arm (a study continued in a later session): only the new runs are started
    (tmp_path / "two" / "logs" / "sft-seed0.log").write_text("the earlier session's log")
    argv = base + ["--out", str(tmp_path / "two"), "--jobs", "3"]
    assert ablate.main([a if a != "start,sft,grpo" else "start,sft,grpo,shuffled" for a in argv]) == 0
    assert (tmp_path / "two" / "logs" / "sft-seed0.log").read_text() == "the earlier session's log"
    assert "shuffled-seed1  (new run)" in (tmp_path / "two" / "logs" / "shuffled-seed1.log").read_text()
    assert ablate.main(base + ["--out", str(tmp_path / "x"), "--jobs", "0"]) == 2
