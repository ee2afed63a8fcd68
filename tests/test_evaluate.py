"""Evaluation: metric functions by hand, sane baselines, eval.py end to end, retention, ablation table."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rerec_mini import ablate
from rerec_mini.data import QUERY_TYPES, load_dataset
from rerec_mini.evaluate import (evaluate_baseline, markdown_table, ndcg_at_k, recall_at_k, relevant_items, retention,
                                 stratified_head, summarise)
from rerec_mini.model import build_tiny, load_model, load_tokenizer
from rerec_mini.prompts import CandidateSampler
from rerec_mini.rewards import RewardConfig, Scorer
from rerec_mini.trainer import BUNDLED_DATA, Config, Trainer, dataset_texts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ds():
    return load_dataset(BUNDLED_DATA)


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
    rnd = res["random"]["overall"]["hit@1"]
    assert abs(rnd - 0.1) < 0.05, rnd  # 1 / M with M = 10, over 200 queries
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
def checkpoint(tmp_path_factory, ds):
    """A micro model trained for two RL steps: a real checkpoint with its training config."""
    root = tmp_path_factory.mktemp("ckpt")
    model = build_tiny(root / "m", dataset_texts(ds), vocab_size=400, hidden_size=32, num_layers=1, num_heads=2,
                       num_kv_heads=1, intermediate_size=64)
    cfg = Config(model=str(model), output_dir=str(root / "run"), max_steps=2, batch_size=2, num_generations=2,
                 max_completion_length=10, num_candidates=4, show_attributes="auto", eval_limit=5, beta=0.0,
                 keep_truncated=True)
    Trainer(cfg).run()
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
    for block in (res, res["base"], *res["baselines"].values()):
        assert block["overall"]["count"] == 10 and set(block["by_type"]) == set(QUERY_TYPES)
        assert {"hit@1", "ndcg@5", "ndcg@10", "recall@10", "format_ok", "hallucination", "qas", "pas",
                "response_len", "count"} <= set(block["overall"])
    assert "| model | all | 10 |" in run.stdout and "| attribute |" in run.stdout


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
