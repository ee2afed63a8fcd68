"""--reward-fn (user reward functions, TRL-style), --no-builtin-rewards, --shuffle-rewards, --sft-source format:
loading and checks before any work, the values a step adds and logs, explain and evaluation showing them."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from rerec_mini import example_rewards, user_rewards
from rerec_mini.config import Config, UsageError, validate
from rerec_mini.run import prepare, train
from rerec_mini.trainer import Trainer

from test_trainer import micro_config, read_metrics

LAST = "rerec_mini.example_rewards:last_candidate"
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the two examples


def test_example_rewards_score_what_they_say():
    cands = [["A (1990)", "Bb (1991)", "C (1992)"]] * 4 + [None]
    answer = [["C (1992)"], ["A (1990)"], [], ["Zz (2000)", "C (1992)"], ["A (1990)"]]
    assert example_rewards.last_candidate(completions=[""] * 5, candidates=cands, answer=answer) == \
        [1.0, 0.0, 0.0, 0.0, None]
    # shortest: "A (1990)" and "C (1992)" tie at 8 characters; a title that is not a candidate never counts
    assert example_rewards.shortest_title(completions=[""] * 5, candidates=cands, answer=answer) == \
        [1.0, 1.0, 0.0, 0.0, None]


# ----------------------------------------------------------------------------- loading


def test_load_finds_the_function_and_names_it():
    fns = user_rewards.load_all([LAST, "rerec_mini.example_rewards:shortest_title"], "2,0.5")
    assert [(f.name, f.weight) for f in fns] == [("last_candidate", 2.0), ("shortest_title", 0.5)]
    assert [f.weight for f in user_rewards.load_all([LAST])] == [1.0]


def test_a_reward_function_in_a_file(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text("def longer(completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    fn = user_rewards.load(f"{f}:longer")
    assert fn.name == "longer" and user_rewards.call(fn, {"completions": ["ab", "abc"]}).tolist() == [2.0, 3.0]


@pytest.mark.parametrize("spec, message", [
    ("rerec_mini.example_rewards", "give MODULE:FUNCTION"),
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
    ("rerec_mini.example_rewards:first_candidate", "has no function 'first_candidate' (it has last_candidate, "
                                                   "shortest_title)"),
    ("rerec_mini.user_rewards:COLUMNS", "is a tuple, not a function"),
    ("rerec_mini.config:resolve_config", "needs argument(s) user"),
    ("/no/such/file.py:f", "no such file"),
])
def test_load_errors_name_the_function_in_one_line(spec, message):
    with pytest.raises(user_rewards.RewardFnError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        user_rewards.load(spec)
    assert "\n" not in str(e.value) and spec in str(e.value)


def test_a_builtin_terms_name_and_a_repeated_name_are_refused(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def rec(completions, **kw):\n    return [0.0] * len(completions)\n")
    with pytest.raises(user_rewards.RewardFnError, match="built-in reward term"):
        user_rewards.load(f"{f}:rec")
    with pytest.raises(user_rewards.RewardFnError, match="two functions are named 'last_candidate'"):
        user_rewards.load_all([LAST, LAST])
    with pytest.raises(user_rewards.RewardFnError, match="give 2 number"):
        user_rewards.load_all([LAST, "rerec_mini.example_rewards:shortest_title"], "1")


@pytest.mark.parametrize("returned, message", [
    ("[1.0]", "returned 1 values for 2 completions"),
    ("1.0", "returned a float"),
    ("'ab'", "returned a str"),
    ("[1.0, 'x']", "value 1 is 'x'"),
    ("[1.0, float('nan')]", "value 1 is nan"),
    ("[True, 1.0]", "value 0 is True"),
    ("1 / 0", "raised ZeroDivisionError"),
])
def test_call_checks_what_comes_back(tmp_path, returned, message):
    f = tmp_path / "bad.py"
    f.write_text(f"def bad(completions, **kw):\n    return {returned}\n")
    fn = user_rewards.load(f"{f}:bad")
    with pytest.raises(user_rewards.RewardFnError, match="--reward-fn .*bad.py:bad: " + message.replace("(", r"\(")):
        user_rewards.call(fn, {"completions": ["a", "b"]})


def test_none_skips_a_completion_and_numpy_arrays_are_accepted(tmp_path):
    f = tmp_path / "ok.py"
    f.write_text("import numpy as np\n"
                 "def some(completions, **kw):\n    return [None, 2, np.float32(0.5)]\n"
                 "def arr(completions, **kw):\n    return np.array([1.0, 2.0, 3.0])\n")
    cols = {"completions": ["a", "b", "c"]}
    v = user_rewards.evaluate(user_rewards.load_all([f"{f}:some", f"{f}:arr"], "1,0.5"), cols)
    assert np.isnan(v["some"][0]) and v["some"][1:].tolist() == [2.0, 0.5] and v["arr"].tolist() == [1, 2, 3]
    fns = user_rewards.load_all([f"{f}:some", f"{f}:arr"], "1,0.5")
    assert user_rewards.weighted_sum(fns, v, 3).tolist() == [0.5, 3.0, 2.0]  # a None adds nothing
    s = user_rewards.summary(v)
    assert s["rewards/some/mean"] == pytest.approx(1.25) and s["rewards/arr/mean"] == 2.0
    assert user_rewards.summary({"x": np.full(2, np.nan)})["rewards/x/mean"] is None


# ----------------------------------------------------------------------------- before any work: one line, exit 2


def _bad_module(tmp_path, body: str) -> str:
    (tmp_path / "badmod.py").write_text(body)
    return f"{tmp_path / 'badmod.py'}:f"


@pytest.mark.parametrize("body, message", [
    ("def f(completions, **kw):\n    return [0.0]\n", "returned 1 values for 2 completions"),
    ("def f(completions, **kw):\n    return ['good'] * len(completions)\n", "value 0 is 'good'"),
])
def test_prepare_calls_each_function_once_before_any_work(micro_model, tmp_path, body, message):
    spec = _bad_module(tmp_path, body)
    cfg = micro_config(micro_model, tmp_path / "run", reward_fn=[spec])
    with pytest.raises(UsageError, match=message):
        prepare(cfg)
    assert not (tmp_path / "run").exists()


def test_train_py_exits_2_with_one_line_for_a_missing_function(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--output-dir", str(out), "--reward-fn",
                        "rerec_mini.example_rewards:nope", "--max-steps", "1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines == ["error: --reward-fn 'rerec_mini.example_rewards:nope': rerec_mini.example_rewards has no "
                     "function 'nope' (it has last_candidate, shortest_title)"]
    assert not out.exists()


def test_no_builtin_rewards_needs_a_reward_fn_and_shuffle_warns():
    with pytest.raises(UsageError, match="--no-builtin-rewards True: needs at least one --reward-fn"):
        validate(Config(no_builtin_rewards=True))
    warnings = validate(Config(shuffle_rewards=True, no_builtin_rewards=True, reward_fn=[LAST]))
    assert any("the control run" in w for w in warnings)
    assert any("difficulty is still measured by NDCG" in w for w in warnings)
    assert not any("NDCG weight 0" in w for w in validate(Config(no_builtin_rewards=True, reward_fn=[LAST],
                                                                  reward_weights="0,0,0,0")))


def test_train_help_documents_the_flags():
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    text = " ".join(p.stdout.split())
    for flag in ("--reward-fn MODULE:FUNCTION", "--reward-fn-weights", "--no-builtin-rewards", "--shuffle-rewards",
                 "--sft-source {gold,self,format}", "rerec_mini.example_rewards:last_candidate"):
        assert flag in text, flag


# ----------------------------------------------------------------------------- in a step


class Recorder:
    """A reward function that records what it was called with (the keyword arguments of a call)."""
    calls: list[dict] = []


def recording(**kwargs):
    Recorder.calls.append(kwargs)
    return [float(i % 3) for i in range(len(kwargs["completions"]))]


def test_a_step_calls_the_function_trl_style_and_logs_it(micro_model, tmp_path, ds):
    Recorder.calls.clear()
    spec = "test_user_rewards:recording"
    cfg = micro_config(micro_model, tmp_path / "a", reward_fn=[spec, LAST], reward_fn_weights="0.5,1",
                       batch_size=2, num_generations=3)
    tr = Trainer(cfg, ds, micro_model, torch.device("cpu"))
    tr.start_rl()
    b = tr.rollout()
    r = tr.score(b)
    kw = Recorder.calls[-1]
    assert set(kw) == set(user_rewards.COLUMNS)
    assert all(len(v) == 6 for v in kw.values())
    assert kw["completions"] == b.texts and kw["completion_ids"] == b.completions
    assert kw["prompts"][0] == kw["prompts"][2] != kw["prompts"][3] and "<|im_start|>assistant" in kw["prompts"][0]
    assert kw["query"][0] == b.queries[0].text and kw["query_id"][5] == b.queries[1].query_id
    assert kw["candidates"][4] == [ds.items[i].title for i in b.candidates[1]]
    assert kw["ground_truth"][0] == [ds.items[i].title for i in b.queries[0].ground_truth]
    assert kw["answer"] == [[ds.items[i].title for i in p] for p in r.parsed]
    # the total is the built-in terms plus each function's weighted value
    builtin = tr.scorer.score([q for q in b.queries for _ in range(3)], b.texts,
                              [c for c in b.candidates for _ in range(3)]).total
    last = example_rewards.last_candidate(**kw)
    want = builtin + 0.5 * (np.arange(6) % 3) + np.array(last)
    assert np.allclose(r.total, want)
    assert r.user["recording"].tolist() == [0, 1, 2, 0, 1, 2]

    rows = train(replace(cfg, output_dir=str(tmp_path / "run")))
    step = [m for m in read_metrics(tmp_path / "run") if m["phase"] == "rl"][0]
    assert step["rewards/recording/mean"] == pytest.approx(1.0) and "rewards/last_candidate/mean" in step
    assert "rewards/last_candidate/mean" in rows["final"]["overall"]  # the held-out rate, too
    assert "last_candidate" in rows["final"]["samples"][0]["reward"]


def test_no_builtin_rewards_makes_the_functions_the_whole_reward(micro_model, tmp_path, ds):
    cfg = micro_config(micro_model, tmp_path / "a", reward_fn=["test_user_rewards:recording"],
                       no_builtin_rewards=True, raae_claims=True, batch_size=2, num_generations=3)
    tr = Trainer(cfg, ds, micro_model, torch.device("cpu"))
    tr.start_rl()
    b = tr.rollout()
    r = tr.score(b)
    assert r.total.tolist() == [0, 1, 2, 0, 1, 2]
    assert np.isfinite(r.rec).all()  # still computed (and logged)
    assert tr.wrong_segments(b, r) == [[]] * 6  # RAAE reads the ground truth: off


def test_shuffle_rewards_permutes_the_rewards_the_advantages_see(micro_model, tmp_path, ds):
    cfg = micro_config(micro_model, tmp_path / "a", reward_fn=["test_user_rewards:recording"],
                       no_builtin_rewards=True, shuffle_rewards=True, batch_size=3, num_generations=4)
    tr = Trainer(cfg, ds, micro_model, torch.device("cpu"))
    tr.start_rl()
    b = tr.rollout()
    r = tr.score(b)
    used = tr.advantage_rewards(r)
    assert sorted(used) == sorted(r.total) and not np.array_equal(used, r.total)
    assert np.array_equal(used, tr.advantage_rewards(r))  # seeded by (seed, step): a resume draws the same
    adv = tr.advantages(b, r)
    plain = Trainer(replace(cfg, shuffle_rewards=False), ds, micro_model, torch.device("cpu"))
    assert not np.allclose(adv.sequence, plain.advantages(b, r).sequence)
    tr.step_no += 1
    assert not np.array_equal(tr.advantage_rewards(r), used)  # a new permutation every step


def test_format_sft_target_boxes_a_random_candidate(micro_model, tmp_path, ds):
    tr = Trainer(micro_config(micro_model, tmp_path / "a", sft_source="format", sft_steps=2), ds, micro_model,
                 torch.device("cpu"))
    q = ds.queries["train"][0]
    cands = tr.candidates.sample(q, 4, seed=0)
    picks = {tr.sft_target(q, cands, s) for s in range(40)}
    assert picks == {f"\\boxed{{{ds.items[i].title}}}" for i in cands}  # each candidate, nothing else
    gold = Trainer(micro_config(micro_model, tmp_path / "b"), ds, micro_model, torch.device("cpu"))
    assert gold.sft_target(q, cands, 0).startswith("Needed:")


def test_explain_shows_the_user_terms(micro_model, tmp_path, ds):
    from rerec_mini.explain import explain, render_html, render_text
    cfg = micro_config(micro_model, tmp_path / "a", reward_fn=[LAST], reward_fn_weights="2", shuffle_rewards=True)
    tr = Trainer(cfg, ds, micro_model, torch.device("cpu"))
    tr.start_rl()
    ex = explain(tr, ds.queries["train"][0])
    assert ex.user_weights == {"last_candidate": 2.0}
    assert all(set(ro.user) == {"last_candidate"} for ro in ex.rollouts)
    text = render_text(ex)
    assert "+ 2*last_candidate" in text and ("last_candidate +0.000" in text or "last_candidate +1.000" in text)
    assert "another rollout's reward" in text
    assert "2&middot;last_candidate" in render_html(ex)
