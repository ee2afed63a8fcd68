"""Evaluation: metric functions by hand, sane baselines, eval.py end to end, retention, ablation table."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rerec_mini import ablate
from rerec_mini.config import Config
from rerec_mini.data import QUERY_TYPES
from rerec_mini.evaluate import (evaluate_baseline, evaluate_policy, markdown_table, ndcg_at_k, recall_at_k,
                                 relevant_items, retention, sampled_summary, sampled_table, stratified_head,
                                 summarise)
from rerec_mini.model import build_tiny, load_model, load_tokenizer
from rerec_mini.prompts import DEFAULT_NEGATIVES, CandidateSampler
from rerec_mini.rewards import RewardConfig, Scorer
from rerec_mini.run import dataset_texts, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scorer(ds):
    return Scorer(ds, RewardConfig())


def test_ndcg_and_recall_by_hand():
    assert ndcg_at_k(["a", "x"], {"a"}, 5) == 1.0
    assert ndcg_at_k(["x", "a"], {"a"}, 5) == pytest.approx(1 / math.log2(3))
    assert ndcg_at_k(["x", "y", "z", "w", "v", "a"], {"a"}, 5) == 0.0  # outside the cut
    # two relevant, one found at rank 2: (1/log2 3) / (1 + 1/log2 3)
    assert ndcg_at_k(["x", "a"], {"a", "b"}, 10) == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert ndcg_at_k([], {"a"}, 5) == 0.0 and ndcg_at_k(["a"], set(), 5) == 0.0
    assert recall_at_k(["a", "x", "b"], {"a", "b", "c"}, 10) == pytest.approx(2 / 3)
    assert recall_at_k(["a", "x", "b"], {"a", "b"}, 2) == 0.5


def test_relevant_items_are_the_reachable_ground_truth(ds):
    q = next(q for q in ds.queries["test"] if len(q.ground_truth) > 2)
    assert relevant_items(q, None) == set(q.ground_truth)
    other = next(i for i in ds.items if i not in q.ground_truth)
    assert relevant_items(q, [q.ground_truth[0], other]) == {q.ground_truth[0]}


def test_summarise_hand_computed(ds, scorer):
    qs = [q for q in ds.queries["test"] if q.type == "explicit"][:2] + [q for q in ds.queries["test"] if q.type == "implicit"][:1]
    cands = [[q.ground_truth[0]] for q in qs]
    t = [ds.items[q.ground_truth[0]].title for q in qs]
    responses = [f"\\boxed{{{t[0]}}}", f"\\boxed{{Not A Film (1990); {t[1]}}}", "no box at all"]
    res = summarise(qs, cands, scorer.score(qs, responses, cands), [10, 20, 30])
    o = res["overall"]
    # entry 2's unmatched title is dropped (a hallucination): its ground-truth title ranks first
    assert o["count"] == 3 and o["hit@1"] == pytest.approx(2 / 3)
    assert o["ndcg@5"] == pytest.approx(2 / 3) and o["recall@10"] == pytest.approx(2 / 3)
    assert o["format_ok"] == pytest.approx(2 / 3) and o["hallucination"] == pytest.approx(1 / 3)  # 1 of 3 entries
    assert o["response_len"] == 20.0
    assert res["by_type"]["explicit"]["hit@1"] == 1.0 and res["by_type"]["implicit"]["format_ok"] == 0.0
    assert set(res["by_type"]) == {"explicit", "implicit"}


def test_stratified_head_takes_types_in_turn(ds):
    head = stratified_head(ds.queries["test"], 10)
    assert [q.type for q in head] == list(QUERY_TYPES) * 2
    assert stratified_head(ds.queries["test"], 0) == ds.queries["test"]


def test_baselines_are_sane(ds, scorer):
    qs = ds.queries["test"]
    sampler = CandidateSampler(ds)
    res = {name: evaluate_baseline(name, ds, qs, scorer=scorer, candidate_sampler=sampler, num_candidates=10)
           for name in ("random", "popularity", "attribute")}
    # 1 / M with M = 10: one seed's 200 queries spread by ±0.02 (sd), so five seeds' mean
    rnd = sum(evaluate_baseline("random", ds, qs, scorer=scorer, candidate_sampler=sampler, num_candidates=10,
                                seed=s)["overall"]["hit@1"] for s in range(5)) / 5
    assert abs(rnd - 0.1) < 0.03, rnd
    # reading the conditions in the knowledge graph is far above chance on explicit queries
    assert res["attribute"]["by_type"]["explicit"]["hit@1"] > 0.9 > 3 * res["random"]["by_type"]["explicit"]["hit@1"]
    for r in res.values():
        assert r["overall"]["format_ok"] == 1.0 and r["overall"]["hallucination"] == 0.0
    # popularity ranks by interaction count
    q, c = qs[0], sampler.sample(qs[0], 10, 0, 0)
    counts = ds.popularity
    from rerec_mini.evaluate import rank_popularity
    ranked = rank_popularity(q, c, ds, 0)
    assert [counts[ds.item_index[i]] for i in ranked] == sorted((counts[ds.item_index[i]] for i in c), reverse=True)
    with pytest.raises(ValueError, match="unknown baseline"):
        evaluate_baseline("oracle", ds, qs, scorer=scorer)
    table = markdown_table(res)
    assert table.count("\n") == 1 + 3 * (1 + 5) and "| attribute | explicit | 40 |" in table


@pytest.fixture(scope="module")
def micro(tmp_path_factory, ds):
    """An untrained micro model: evaluation needs only something that answers."""
    texts = [it.title for it in ds.items.values()] + [q.text for q in ds.queries["train"][:200]]
    path = build_tiny(tmp_path_factory.mktemp("micro"), texts, vocab_size=300, hidden_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, intermediate_size=64)
    return load_model(str(path)).eval(), load_tokenizer(str(path))


@pytest.mark.parametrize("negatives", ["uniform", "popularity"])
def test_policy_result_carries_the_popularity_reference(ds, scorer, micro, negatives):
    """Beside a model's hit@1, the popularity shortcut on the same candidate sets: in the result
    ("reference") and as the `pop. hit@1` column of every row of the table."""
    model, tok = micro
    qs, sampler = stratified_head(ds.queries["test"], 15), CandidateSampler(ds)
    common = dict(scorer=scorer, candidate_sampler=sampler, num_candidates=6, negatives=negatives, seed=3)
    res = evaluate_policy(model, tok, ds, qs, max_new_tokens=3, progress=False, **common)
    pop = evaluate_baseline("popularity", ds, qs, **common)
    assert set(res) >= {"overall", "by_type", "reference", "samples"}
    ref = res["reference"]
    assert ref["popularity"]["overall"] == pop["overall"] and ref["popularity"]["by_type"] == pop["by_type"]
    assert pop["reference"]["popularity"]["overall"] == pop["overall"]  # baselines carry it too
    # chance, exactly: one reachable answer among 6 candidates (negatives are never correct)
    assert ref["random"]["overall"] == {"hit@1": pytest.approx(1 / 6), "count": 15}
    assert set(ref["random"]["by_type"]) == set(res["by_type"])
    table = markdown_table({"model": res, "popularity": pop}).splitlines()
    assert table[0].startswith("| method | type | n | hit@1 | pop. hit@1 | ndcg@5 |")
    for typ, row in [("all", res["overall"]), *res["by_type"].items()]:
        ref_row = ref["popularity"]["overall"] if typ == "all" else ref["popularity"]["by_type"][typ]
        cells = f"| model | {typ} | {row['count']} | {row['hit@1']:.3f} | {ref_row['hit@1']:.3f} |"
        assert any(line.startswith(cells) for line in table), cells
    assert all(line.count("|") == table[0].count("|") for line in table)


def test_reference_absent_in_open_generation(ds, scorer, micro):
    model, tok = micro
    qs = stratified_head(ds.queries["test"], 5)
    res = evaluate_policy(model, tok, ds, qs, scorer=scorer, num_candidates=0, max_new_tokens=2, progress=False)
    assert res["reference"] is None
    # no reference (open generation, or a result saved before references existed): a dash
    old = {k: v for k, v in res.items() if k != "reference"}
    assert "| open | all | 5 | 0.000 | – | 0.000 |" in markdown_table({"open": res})
    table = markdown_table({"old": old}, metrics=("ndcg@5",))  # no hit@1 column: it comes last
    assert table.splitlines()[0] == "| method | type | n | ndcg@5 | pop. hit@1 |"
    assert all(line.endswith(" | – |") for line in table.splitlines()[2:])


def test_eval_py_negatives_flag():
    spec = importlib.util.spec_from_file_location("eval_script", REPO / "eval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    p = script.parser()
    assert p.parse_args(["--model", "m"]).negatives is None  # then: the checkpoint's config, else the default
    assert script.DEFAULTS["negatives"] == DEFAULT_NEGATIVES
    assert p.parse_args(["--model", "m", "--negatives", "hard"]).negatives == "hard"
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "m", "--negatives", "popular"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, ds):
    """A micro model trained for two RL steps: a real checkpoint with its training config."""
    root = tmp_path_factory.mktemp("ckpt")
    model = build_tiny(root / "m", dataset_texts(ds), vocab_size=400, hidden_size=32, num_layers=1, num_heads=2,
                       num_kv_heads=1, intermediate_size=64)
    cfg = Config(model=str(model), output_dir=str(root / "run"), max_steps=2, batch_size=2, num_generations=2,
                 max_completion_length=10, num_candidates=4, negatives="uniform", show_attributes="auto", eval_limit=5,
                 beta=0.0, keep_truncated=True)
    train(cfg)
    return root / "run" / "final", model


def test_eval_py_end_to_end(checkpoint, tmp_path):
    final, base = checkpoint
    out = tmp_path / "e.json"
    run = subprocess.run([sys.executable, str(REPO / "eval.py"), "--model", str(final), "--limit", "10",
                          "--baselines", "random,attribute", "--compare-base", "--base", str(base),
                          "--output", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res) >= {"overall", "by_type", "baselines", "base", "settings"}
    assert set(res["baselines"]) == {"random", "attribute"}
    assert res["settings"]["num_candidates"] == 4  # read from the checkpoint's training config
    assert res["settings"]["negatives"] == "uniform"  # likewise
    assert res["reference"]["popularity"]["overall"]["count"] == 10 and "| pop. hit@1 |" in run.stdout
    for block in (res, res["base"], *res["baselines"].values()):
        assert block["overall"]["count"] == 10 and set(block["by_type"]) == set(QUERY_TYPES)
        assert {"hit@1", "ndcg@5", "ndcg@10", "recall@10", "format_ok", "hallucination", "qas", "pas",
                "response_len", "count"} <= set(block["overall"])
    assert "| model | all | 10 |" in run.stdout and "| attribute |" in run.stdout


def eval_script():
    spec = importlib.util.spec_from_file_location("eval_cli", REPO / "eval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_eval_py_samples_and_help_defaults(checkpoint, tmp_path, capsys):
    """Every sample is kept (query, candidates, ground truth, parsed answer, hit, reward terms), and
    `--help` with a checkpoint shows the values it will use (its 4 candidates, not the default 20)."""
    final, _ = checkpoint
    script = eval_script()
    out = tmp_path / "e.json"
    assert script.main(["--model", str(final), "--limit", "7", "--output", str(out)]) == 0
    samples = json.loads(out.read_text())["samples"]
    assert len(samples) == 7
    for rec in samples:
        assert set(rec) >= {"query_id", "type", "query", "candidates", "ground_truth", "response", "parsed", "hit",
                            "reward"}
        assert len(rec["candidates"]) == 4 and rec["ground_truth"] and set(rec["reward"]) >= {"total", "rec", "qas"}
        assert rec["hit"] == (bool(rec["parsed"]) and rec["parsed"][0] in rec["ground_truth"])
    with pytest.raises(SystemExit):
        script.main(["--model", str(final), "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "[the checkpoint's: 4]" in help_text and "[the checkpoint's: 'uniform']" in help_text
    assert "[]" not in help_text


@pytest.mark.parametrize("argv, message", [
    (["--baselines", "popular"], "--baselines popular: unknown popular"),
    (["--split", "valid"], "--split 'valid'"),
    (["--data", "/nonexistent"], "--data /nonexistent: no such directory"),
    (["--device", "gpu"], "--device 'gpu'"),
    (["--num-samples", "-1"], "--num-samples -1: must be >= 0"),
    (["--num-samples", "4", "--temperature", "0"], "--temperature 0.0: --num-samples needs a temperature > 0"),
    (["--num-samples", "4", "--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (["--temperature", "0.7"], "--temperature / --top-p set how --num-samples samples"),
    (["--num-samples", "4", "--retention"], "--num-samples evaluates answers"),
])
def test_eval_py_bad_input_exits_2_before_any_work(checkpoint, capsys, monkeypatch, argv, message):
    final, _ = checkpoint
    script = eval_script()
    monkeypatch.setattr(script, "evaluate_policy", lambda *a, **k: pytest.fail("evaluated before checking"))
    assert script.main(["--model", str(final)] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_retention(checkpoint):
    final, base = checkpoint
    tok = load_tokenizer(str(final))
    m, b = load_model(str(final)), load_model(str(base))
    texts = ["The quick brown fox jumps over the lazy dog.", "Water boils at 100 degrees."]
    same = retention(m, m, tok, texts)
    assert same["kl_per_token"] == pytest.approx(0.0, abs=1e-6) and same["ppl_change"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():  # a base that differs: the same model with perturbed weights
        for p in b.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = retention(m, b, tok, texts)
    assert moved["kl_per_token"] > 0 and moved["tokens"] == same["tokens"] > 10
    assert moved["ppl_change"] == pytest.approx(moved["ppl_trained"] / moved["ppl_base"] - 1)
    # perplexity is exp(mean NLL) of the text's own next tokens
    ids = torch.tensor([tok.encode(texts[0], add_special_tokens=False)])
    lp = torch.log_softmax(m(ids)[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])
    one = retention(m, m, tok, texts[:1])
    assert one["ppl_trained"] == pytest.approx(math.exp(-lp.mean().item()), rel=1e-5)


def test_ablation_table_and_spread():
    def run(h):
        by = {t: {"hit@1": h} for t in QUERY_TYPES}
        return {"overall": {"hit@1": h, "ndcg@5": h, "format_ok": 1.0, "qas": 0.5, "pas": 0.5}, "by_type": by}
    md = ablate.table({"full": [run(0.5), run(0.52)], "no-raae": [run(0.3), run(0.31)], "no-pas": [run(0.51), run(0.5)]})
    assert "| full | 2 | 0.510 ± 0.010 |" in md
    assert "- no-raae: -0.205 (exceeds the seed spread 0.015)" in md
    assert "- no-pas: -0.005 (within the seed spread 0.015)" in md
    assert set(ablate.VARIANTS) == {"full", "grpo", "no-raae", "no-qas", "no-pas", "no-curriculum"}
    assert ablate.VARIANTS["grpo"] == {"no_raae": True, "curriculum": "none", "reward_weights": "0,1,0,0"}


def test_hit_at_1_counts_only_the_ground_truth_the_prompt_showed(ds, scorer):
    """hit@1 equals ndcg@1 (answer size 1) and the reward's hit: naming a ground-truth item that was not
    among the candidates is not a hit (training gives it rec 0 too)."""
    from rerec_mini.evaluate import summarise
    q = next(q for q in ds.queries["test"] if len(q.ground_truth) >= 2)
    cands = CandidateSampler(ds).sample(q, 6, seed=1)
    shown = [i for i in q.ground_truth if i in cands]
    unseen = next(i for i in q.ground_truth if i not in cands)
    texts = [f"\\\\boxed{{{ds.items[shown[0]].title}}}", f"\\\\boxed{{{ds.items[unseen].title}}}"]
    scored = scorer.score([q, q], texts, [cands, cands])
    res = summarise([q, q], [cands, cands], scored, [0, 0])
    assert scored.hit.tolist() == [True, False]
    assert res["overall"]["hit@1"] == 0.5
    one = summarise([q], [cands], scorer.score([q], texts[1:], [cands]), [0])["overall"]
    assert one["hit@1"] == 0.0 and one["ndcg@5"] == 0.0


def test_sampled_summary_by_hand():
    """Three queries, four samples each; answers are item ids, a hit is answering "g"."""
    answers = [["g", "x", "g", None],   # greedy hit; 2 of 4 sampled hits; majority g (2 votes)
               ["x", "g", "x", "y"],   # greedy miss; 1 of 4; majority x
               ["y", "x", "g", "g"]]   # greedy miss; 2 of 4; x and y and g: g has 2 votes
    hits = np.array([[a == "g" for a in row] for row in answers])
    res = sampled_summary(["explicit", "explicit", "implicit"], [True, False, False], hits, answers)
    o = res["overall"]
    assert o["greedy_hit@1"] == pytest.approx(1 / 3) and o["sampled_hit@1"] == pytest.approx((2 + 1 + 2) / 12)
    assert o["pass@G"] == 1.0 and o["majority@G"] == pytest.approx(2 / 3)
    assert o["sampled_hit_where_greedy_misses"] == pytest.approx((1 / 4 + 2 / 4) / 2) and o["greedy_misses"] == 2
    assert res["by_type"]["explicit"]["majority@G"] == 0.5 and res["by_type"]["implicit"]["count"] == 1
    # a tie goes to the answer drawn first: y, x, g once each -> y, a miss
    tie = sampled_summary(["explicit"], [False], np.array([[False, False, True]]), [["y", "x", "g"]])
    assert tie["overall"]["majority@G"] == 0.0 and tie["overall"]["pass@G"] == 1.0
    table = sampled_table({"num_samples": 4, "temperature": 1.0, **res}).splitlines()
    assert table[0] == ("| type | n | greedy hit@1 | sampled hit@1 (T=1) | pass@4 | majority@4 | "
                        "sampled hit where greedy misses |")
    assert table[2] == "| all | 3 | 0.333 | 0.417 | 1.000 | 0.667 | 0.375 (of 2) |"
    # greedy right everywhere: no mean over zero queries, a dash in the table
    assert res["by_type"]["implicit"]["sampled_hit_where_greedy_misses"] == pytest.approx(0.5)
    none = sampled_summary(["explicit"], [True], np.array([[True]]), [["g"]])
    assert none["overall"]["sampled_hit_where_greedy_misses"] is None and none["overall"]["greedy_misses"] == 0
    assert "| – (of 0) |" in sampled_table({"num_samples": 1, "temperature": 1.0, **none})
    with pytest.raises(ValueError, match="one of each per query"):
        sampled_summary(["explicit", "implicit"], [True], hits[:1], answers[:1])


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(st.booleans(), st.lists(st.sampled_from(["g", "h", "x", "y", None]), min_size=1,
                                                       max_size=6)), min_size=1, max_size=12),
       g1=st.booleans())
def test_sampled_summary_properties(rows, g1):
    """With any answers (a hit: "g" or "h"): a sampled hit or a majority hit needs some sample to hit
    (pass@G bounds both), one sample makes the three one figure, and the greedy-miss figure averages
    exactly the queries greedy missed."""
    G = min(len(a) for _, a in rows)
    answers = [a[:G] for _, a in rows]
    if g1:
        answers = [a[:1] for a in answers]
    hits = np.array([[x in ("g", "h") for x in a] for a in answers])
    greedy = [g for g, _ in rows]
    o = sampled_summary(["explicit"] * len(rows), greedy, hits, answers)["overall"]
    assert 0 <= o["sampled_hit@1"] <= o["pass@G"] <= 1 and o["majority@G"] <= o["pass@G"]
    assert o["count"] == len(rows) and o["greedy_misses"] == greedy.count(False)
    misses = [h.mean() for g, h in zip(greedy, hits) if not g]
    if misses:
        assert o["sampled_hit_where_greedy_misses"] == pytest.approx(np.mean(misses))
    else:
        assert o["sampled_hit_where_greedy_misses"] is None
    if hits.shape[1] == 1:
        assert o["sampled_hit@1"] == pytest.approx(o["pass@G"]) and o["majority@G"] == pytest.approx(o["pass@G"])


def test_eval_py_num_samples(checkpoint, tmp_path, capsys):
    """`--num-samples G`: G answers per query on the greedy run's candidate sets, the greedy figure
    carried over exactly, a table printed, and the same figures on a second run (fixed seed)."""
    final, _ = checkpoint
    script = eval_script()
    runs = []
    for k in range(2):
        out = tmp_path / f"s{k}.json"
        assert script.main(["--model", str(final), "--limit", "6", "--num-samples", "3", "--temperature", "1.5",
                            "--output", str(out)]) == 0
        runs.append(json.loads(out.read_text()))
    res = runs[0]
    sampled = res["sampled"]
    assert sampled["num_samples"] == 3 and sampled["temperature"] == 1.5 and sampled["overall"]["count"] == 6
    assert sampled["overall"]["greedy_hit@1"] == pytest.approx(res["overall"]["hit@1"])
    assert sampled["overall"]["greedy_misses"] == sum(not r["hit"] for r in res["samples"])
    assert runs[1]["sampled"] == sampled
    assert "| all | 6 |" in capsys.readouterr().out.split("pass@3")[-1]


def test_evaluate_samples_scores_each_query_on_its_own_candidates(ds, scorer, micro, monkeypatch):
    """The sampled answers of query n are scored against query n's candidate set, the one the greedy
    run drew: query n's first k_n samples name a ground-truth candidate, the rest one negative,
    and the figures follow k_n exactly (a misaligned candidate set or row order breaks them)."""
    from rerec_mini import evaluate
    model, tok = micro
    qs, G = stratified_head(ds.queries["test"], 10), 4
    common = dict(scorer=scorer, candidate_sampler=CandidateSampler(ds), num_candidates=6, seed=5)
    cands = evaluate.draw_candidates(ds, qs, common["candidate_sampler"], 6, 0, 5, DEFAULT_NEGATIVES)
    ks = [n % (G + 1) for n in range(len(qs))]
    texts = []
    for q, c, k in zip(qs, cands, ks):
        right = next(i for i in c if i in q.ground_truth)
        wrong = next(i for i in c if i not in q.ground_truth)
        texts += [f"\\boxed{{{ds.items[right if j < k else wrong].title}}}" for j in range(G)]
    seen = []

    def fake_decode(model, tok, prompts, num_samples=1, **kw):
        seen.append(prompts)
        rows = texts if num_samples == G else texts[::G]  # the greedy run: each query's first text
        return rows, [1] * len(rows)

    monkeypatch.setattr(evaluate, "decode", fake_decode)
    greedy_res = evaluate.evaluate_policy(model, tok, ds, qs, max_new_tokens=2, progress=False, **common)
    greedy = [n % 2 == 0 for n in range(len(qs))]
    res = evaluate.evaluate_samples(model, tok, ds, qs, greedy, num_samples=G, max_new_tokens=2, progress=False,
                                    **common)
    assert seen[0] == seen[1]  # the same prompts, so the same candidate sets, as the greedy run
    assert [r["hit"] for r in greedy_res["samples"]] == [k > 0 for k in ks]
    o = res["overall"]
    assert o["sampled_hit@1"] == pytest.approx(np.mean([k / G for k in ks]))
    assert o["pass@G"] == pytest.approx(np.mean([k > 0 for k in ks]))
    assert o["majority@G"] == pytest.approx(np.mean([k > 0 and 2 * k >= G for k in ks]))  # a tie: the first drawn
    assert o["sampled_hit_where_greedy_misses"] == pytest.approx(np.mean([k / G for k, g in zip(ks, greedy) if not g]))


def test_decode_keeps_each_prompts_samples_together(micro):
    """Prompts of mixed lengths, decoded sorted by length in batches of 2 with 3 samples each: at a
    temperature near 0 every sample is the prompt's greedy answer, in the prompt's own place."""
    from rerec_mini.evaluate import decode
    model, tok = micro
    prompts = [tok.encode(t) for t in ("a", "the film with the longest prompt of all", "two words", "x y z w",
                                        "Gentle Road")]
    greedy, glens = decode(model, tok, prompts, max_new_tokens=5, batch_size=2, progress=False)
    sampled, slens = decode(model, tok, prompts, num_samples=3, temperature=1e-6, max_new_tokens=5, batch_size=2,
                            progress=False)
    assert len(set(greedy)) > 1  # the prompts' answers differ, so a misplaced row would show
    assert sampled == [t for t in greedy for _ in range(3)] and slens == [n for n in glens for _ in range(3)]
