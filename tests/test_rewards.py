"""The dual-graph reward (rerec_mini/rewards.py): hand-computed terms, and the batched scorer
checked against a slow, obviously-correct per-row implementation."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from rerec_mini.data import Group, Item, Query, User, load_dataset, write_dataset
from rerec_mini.prompts import CandidateSampler, parse_answer
from rerec_mini.rewards import RewardBreakdown, RewardConfig, Scorer
from rerec_mini.titles import TitleIndex, normalize_title

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "synth-movies"
REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
D0, D1, D2 = 1.0, 1 / math.log2(3), 0.5  # rank discounts 1/log2(rank + 2)


# ----------------------------------------------------------------------------- a hand-sized world

ITEMS = [
    Item("a", "Saving Private Ryan (1998)", {"genre": ["War", "Drama"], "starring": ["Tom Hanks", "Matt Damon"],
                                             "director": ["Steven Spielberg"]}),
    Item("b", "Forrest Gump (1994)", {"genre": ["War", "Comedy"], "starring": ["Tom Hanks"], "director": ["Robert Zemeckis"]}),
    Item("c", "Cast Away (2000)", {"genre": ["Drama"], "starring": ["Tom Hanks"], "director": ["Robert Zemeckis"]}),
    Item("d", "Jaws (1975)", {"genre": ["Thriller"], "starring": ["Roy Scheider"], "director": ["Steven Spielberg"]}),
    Item("e", "Heat (1995)", {"genre": ["Crime"], "starring": ["Al Pacino"], "director": ["Michael Mann"]}),
    Item("f", "Heat (1986)", {"genre": ["Action"], "starring": ["Burt Reynolds"], "director": ["Dick Richards"]}),
    Item("g", "Jurassic Park (1993)", {"genre": ["Adventure"], "starring": ["Sam Neill"], "director": ["Steven Spielberg"]}),
]
# Hand-set unit embeddings make every PAS value a number one can check on paper.
EMB = {"a": (1, 0), "b": (0, 1), "c": (-0.6, -0.8), "d": (0.6, 0.8), "e": (0.8, -0.6), "f": (0, 0), "g": (0.28, 0.96)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    queries = {"train": [
        Query("war", "explicit", "War movies starring Tom Hanks", "u1", ["a", "b"], [("genre", "War"), ("starring", "Tom Hanks")]),
        Query("demo", "demographic", "What do men watch?", None, ["a", "d"], [], group=Group("gender", "male")),
        Query("one", "explicit", "Thrillers", "u2", ["d"], [("genre", "Thriller")]),
    ], "test": []}
    rows = [("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3), ("u2", "d", 4), ("u2", "e", 5), ("u2", "g", 6), ("u3", "f", 7)]
    ds = load_dataset(write_dataset(tmp_path_factory.mktemp("w"), ITEMS, rows, queries, [User("u1"), User("u2"), User("u3")]))
    return ds, {q.query_id: q for q in ds.queries["train"]}


def scorer_for(ds, **cfg):
    sc = Scorer(ds, RewardConfig(**cfg))
    sc.E = np.array([EMB[i] for i in ds.item_ids], np.float32)
    return sc


def one(sc, q, text, cands=None):
    r = sc.score([q], [text], None if cands is None else [cands])
    return {name: v[0] for name, v in vars(r).items() if name != "user"}  # row 0 of every per-rollout field


def test_format_failures(world):
    ds, q = world
    sc = scorer_for(ds)
    for text, n_entries, n_hall in [("I think Forrest Gump.", 0, 0), ("\\boxed{Made Up Film (1990)}", 1, 1),
                                    ("\\boxed{}", 0, 0), ("\\boxed{Nope; Forrest Gump (2011)}", 2, 2)]:
        r = one(sc, q["war"], text)
        assert (r["format"], r["rec"], r["qas"], r["pas"]) == (-0.5, -0.5, 0.0, 0.0)
        assert r["total"] == pytest.approx(0.1 * -0.5 + 1.0 * -0.5)
        assert (r["n_entries"], r["n_hallucinated"], r["hit"], r["parsed"]) == (n_entries, n_hall, False, [])


def test_correct_answer_gets_everything(world):
    ds, q = world
    sc = scorer_for(ds)
    r = one(sc, q["war"], "Needed: genre: War; starring: Tom Hanks.\n\\boxed{Forrest Gump (1994)}")
    assert (r["format"], r["rec"], r["qas"], r["pas"], r["hit"]) == (0.5, 1.0, 1.0, 1.0, True)
    assert r["total"] == pytest.approx(0.05 + 1.0 + 0.1 + 0.1)
    assert r["parsed"] == ["b"]


def test_wrong_but_sensible_beats_senseless(world):
    ds, q = world
    sc = scorer_for(ds)
    sensible = one(sc, q["war"], "\\boxed{Cast Away (2000)}")  # Tom Hanks, not War: half of A*
    senseless = one(sc, q["war"], "\\boxed{Heat (1995)}")
    assert (sensible["rec"], sensible["qas"], sensible["hit"]) == (0.0, 0.5, False)
    assert (senseless["rec"], senseless["qas"]) == (0.0, 0.0)
    assert sensible["qas"] > senseless["qas"]
    # PAS: c is (-0.6, -0.8): cosines -0.6 (a) and -0.8 (b) -> max -0.6 -> clipped to 0
    assert sensible["pas"] == 0.0
    # e is (0.8, -0.6): cosines 0.8 (a) and -0.6 (b) -> 0.8
    assert senseless["pas"] == pytest.approx(0.8)
    assert senseless["total"] == pytest.approx(0.05 + 0.1 * 0.8)


def test_pas_is_one_for_ground_truth_whatever_its_embedding(world):
    ds, q = world
    sc = scorer_for(ds)
    sc.E[ds.item_index["b"]] = 0.0
    assert one(sc, q["war"], "\\boxed{Forrest Gump (1994)}")["pas"] == 1.0
    # and an item without interactions (zero vector) aligns with nothing
    assert one(sc, q["war"], "\\boxed{Heat (1986)}")["pas"] == 0.0


def test_list_answers_k3(world):
    ds, q = world
    sc = scorer_for(ds, k=3)
    r = one(sc, q["war"], "\\boxed{Cast Away (2000); Saving Private Ryan (1998); Jaws (1975)}")
    assert r["rec"] == pytest.approx(D1 / (D0 + D1))  # hit at rank 1; ideal: 2 relevant items
    assert r["qas"] == pytest.approx((0.5 * D0 + 1.0 * D1 + 0.0 * D2) / (D0 + D1 + D2))
    assert r["pas"] == pytest.approx((0.0 * D0 + 1.0 * D1 + 0.8 * D2) / (D0 + D1 + D2))  # d: max(0.6, 0.8)
    assert not r["hit"]  # top-1 is Cast Away
    # only the first k entries count
    r4 = one(sc, q["war"], "\\boxed{Heat (1995); Heat (1986); Jaws (1975); Forrest Gump (1994)}")
    assert r4["rec"] == 0.0 and r4["n_entries"] == 4 and len(r4["parsed"]) == 4


def test_ndcg_with_fewer_ground_truth_than_k(world):
    ds, q = world
    sc = scorer_for(ds, k=3)
    assert one(sc, q["one"], "\\boxed{Jaws (1975); Heat (1995)}")["rec"] == pytest.approx(1.0)
    assert one(sc, q["one"], "\\boxed{Heat (1995); Jaws (1975)}")["rec"] == pytest.approx(D1)
    assert one(sc, q["one"], "\\boxed{Heat (1995); Cast Away (2000); Jaws (1975)}")["rec"] == pytest.approx(D2)


def test_ndcg_ideal_counts_only_the_ground_truth_the_prompt_showed(world):
    """Training NDCG and evaluation NDCG share one definition: relevant = GT ∩ candidates.
    "war" has two ground-truth items; with only one of them among the candidates, naming it
    first is a perfect answer (the old ideal over both gave D0 / (D0 + D1))."""
    ds, q = world
    sc = scorer_for(ds, k=2)
    cands = ["a", "c", "e"]  # Saving Private Ryan is shown, Forrest Gump is not
    r = one(sc, q["war"], "\\boxed{Saving Private Ryan (1998); Cast Away (2000)}", cands)
    assert r["rec"] == pytest.approx(1.0) and r["hit"]
    from rerec_mini.evaluate import ndcg_at_k, relevant_items
    assert r["rec"] == pytest.approx(ndcg_at_k(["a", "c"], relevant_items(q["war"], cands), 2))
    # open generation (no candidates): both ground-truth items count
    assert one(sc, q["war"], "\\boxed{Saving Private Ryan (1998); Cast Away (2000)}")["rec"] == pytest.approx(D0 / (D0 + D1))


def test_repeats_dropped_and_hallucinations_counted(world):
    ds, q = world
    sc = scorer_for(ds, k=2)
    r = one(sc, q["war"], "\\boxed{Cast Away (2000); cast away; Forrest Gump (1994); Made Up (1990)}")
    assert r["parsed"] == ["c", "b"] and r["n_entries"] == 4 and r["n_hallucinated"] == 1
    assert r["rec"] == pytest.approx(D1 / (D0 + D1))
    # a hallucination before the first real title: the real one is top-1
    r = one(scorer_for(ds, k=3), q["war"], "\\boxed{Made Up (1990); Forrest Gump (1994)}")
    assert r["parsed"] == ["b"] and r["hit"] and r["format"] == 0.5
    assert r["rec"] == pytest.approx(1 / (D0 + D1))
    assert (r["qas"], r["pas"]) == (1.0, 1.0)  # a mean over the ranks that exist


def test_qas_target_without_conditions_is_what_the_ground_truth_shares(world):
    ds, q = world
    sc = scorer_for(ds)
    t = sc.target(q["demo"])  # Saving Private Ryan and Jaws share only their director
    assert t.astar.tolist() == [sc.vocab[("director", "Steven Spielberg")]]
    assert t.gt.tolist() == sorted([ds.item_index["a"], ds.item_index["d"]])
    assert one(sc, q["demo"], "\\boxed{Jurassic Park (1993)}")["qas"] == 1.0
    assert one(sc, q["demo"], "\\boxed{Cast Away (2000)}")["qas"] == 0.0


def test_weights(world):
    ds, q = world
    sc = scorer_for(ds, w_format=0.2, w_rec=0.5, w_qas=0.01, w_pas=0.01)
    r = one(sc, q["war"], "\\boxed{Heat (1995)}")
    assert r["total"] == pytest.approx(0.2 * 0.5 + 0.5 * 0.0 + 0.01 * 0.0 + 0.01 * 0.8)
    r = one(sc, q["war"], "no answer")
    assert r["total"] == pytest.approx(0.2 * -0.5 + 0.5 * -0.5)


def test_match_titles_and_candidates(world):
    ds, q = world
    sc = scorer_for(ds)
    assert sc.match_titles(["Forrest Gump", "jaws (1975)", "Heat", "Heat (1986)", "Nope (2001)", ""]) == \
        ["b", "d", None, "f", None, None]
    # "Heat" is ambiguous in the catalogue, decided by the candidates when one of them is a Heat
    assert one(sc, q["war"], "\\boxed{Heat}")["parsed"] == []
    assert one(sc, q["war"], "\\boxed{Heat}", ["a", "f", "c"])["parsed"] == ["f"]
    assert one(sc, q["war"], "\\boxed{Heat}", ["a", "e", "c"])["parsed"] == ["e"]
    # the memo keys on the candidates too
    assert one(sc, q["war"], "\\boxed{Heat}", ["f"])["parsed"] == ["f"]


def test_batch_shapes_and_logging(world):
    ds, q = world
    sc = scorer_for(ds)
    texts = ["\\boxed{Forrest Gump (1994)}", "nothing", "\\boxed{Heat (1995); Zzz}"]
    r = sc.score([q["war"]] * 3, texts)
    for name in ("total", "format", "rec", "qas", "pas", "hit", "n_entries", "n_hallucinated"):
        assert getattr(r, name).shape == (3,)
    d = r.as_dict()
    assert d["format_valid"] == pytest.approx(2 / 3) and d["hit"] == pytest.approx(1 / 3)
    assert d["hallucination_rate"] == pytest.approx(1 / 3)  # 1 of 3 entries
    empty = sc.score([], [])
    assert isinstance(empty, RewardBreakdown) and empty.total.shape == (0,)


# ----------------------------------------------------------------------------- self-check: fast == slow


def slow_score(ds, E, cfg, queries, responses, candidates):
    """One rollout at a time, straight from the definitions (DESIGN §4.1)."""
    index = TitleIndex(ds.items.values())
    pairs = {iid: {(r, v) for r, vals in it.attributes.items() for v in vals} for iid, it in ds.items.items()}
    k = cfg.k
    disc = [1 / math.log2(r + 2) for r in range(k)]
    out = []
    for q, text, cands in zip(queries, responses, candidates):
        entries = parse_answer(text)
        ids, unmatched = [], 0
        for e in entries or []:
            hit = index.match(e, cands)
            if hit is None:
                unmatched += 1
            elif hit not in ids:
                ids.append(hit)
        top, gt = ids[:k], set(q.ground_truth)
        rel = (gt & set(cands) if cands is not None else gt) or gt  # the ground truth the prompt showed
        row = {"n_entries": len(entries or []), "n_hallucinated": unmatched, "parsed": ids, "hit": bool(top) and top[0] in rel}
        if not top:
            row.update(format=-0.5, rec=-0.5, qas=0.0, pas=0.0)
        else:
            astar = set(q.conditions) if q.conditions else set.intersection(*(pairs[g] for g in q.ground_truth))
            dcg = sum(disc[r] for r, i in enumerate(top) if i in rel)
            idcg = sum(disc[:min(len(rel), k)])
            qs = [len(pairs[i] & astar) / len(astar) if astar else 0.0 for i in top]
            ps = [1.0 if i in gt else min(1.0, max(0.0, max(float(E[ds.item_index[i]] @ E[ds.item_index[g]]) for g in gt)))
                  for i in top]
            w = disc[:len(top)]
            row.update(format=0.5, rec=dcg / idcg, qas=sum(a * b for a, b in zip(w, qs)) / sum(w),
                       pas=sum(a * b for a, b in zip(w, ps)) / sum(w))
        row["total"] = cfg.w_format * row["format"] + cfg.w_rec * row["rec"] + cfg.w_qas * row["qas"] + cfg.w_pas * row["pas"]
        out.append(row)
    return out


def random_rollouts(ds, n, seed):
    """Responses of every kind: correct, wrong, lists (with repeats), hallucinated, unboxed, mangled."""
    rng = random.Random(seed)
    sampler = CandidateSampler(ds)
    queries = ds.all_queries()
    titles = [it.title for it in ds.items.values()]
    Q, R, C = [], [], []
    for _ in range(n):
        q = rng.choice(queries)
        cands = sampler.sample(q, num_candidates=rng.choice([0, 5, 20]), seed=rng.randrange(3))
        pool = cands or rng.sample(ds.item_ids, 20)
        picks = [ds.items[rng.choice(q.ground_truth)].title if rng.random() < 0.3 else ds.items[rng.choice(pool)].title
                 for _ in range(rng.randint(1, 5))]
        picks += [rng.choice(titles)] * (rng.random() < 0.2) + ["Made Up Film (1999)"] * (rng.random() < 0.2)
        picks += picks[:1] * (rng.random() < 0.2)  # a repeat
        rng.shuffle(picks)
        picks = [p if rng.random() < 0.8 else p.rsplit(" (", 1)[0].upper() for p in picks]  # no year, other case
        kind = rng.random()
        body = "Step 1: read the request.\nStep 2: pick.\n"
        text = (body + "\\boxed{" + "; ".join(picks) + "}" if kind < 0.8 else
                body + "no answer" if kind < 0.9 else body + "\\boxed{" + "; ".join(picks))
        Q.append(q), R.append(text), C.append(cands)
    return Q, R, C


@pytest.mark.parametrize("k, layers", [(1, 0), (3, 1)])
def test_batched_scorer_equals_slow_per_row(k, layers):
    ds = load_dataset(BUNDLED)
    cfg = RewardConfig(k=k, propagation_layers=layers, w_qas=0.3, w_pas=0.2)
    sc = Scorer(ds, cfg)
    Q, R, C = random_rollouts(ds, 400, seed=k)
    fast = sc.score(Q, R, C)
    slow = slow_score(ds, sc.E, cfg, Q, R, C)
    for name in ("total", "format", "rec", "qas", "pas"):
        assert np.allclose(getattr(fast, name), [s[name] for s in slow], atol=1e-6), name
    for name in ("hit", "n_entries", "n_hallucinated"):
        assert getattr(fast, name).tolist() == [s[name] for s in slow], name
    assert fast.parsed == [s["parsed"] for s in slow]
    # the sample exercises every branch
    assert 0 < fast.hit.mean() < 1 and (fast.format < 0).any() and (fast.n_hallucinated > 0).any()
    assert ((fast.qas > 0) & (fast.qas < 1)).any() and ((fast.pas > 0) & (fast.pas < 1)).any()
    # the memo changes nothing: a second pass gives the same numbers
    assert np.array_equal(sc.score(Q, R, C).total, fast.total)


# ----------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def movielens(tmp_path_factory):
    if not (REALDATA / "ml-1m" / "movies.dat").exists():
        pytest.skip("real data pack ../shared/realdata not present")
    from rerec_mini.sources import build_movielens

    out = tmp_path_factory.mktemp("ml1m")
    build_movielens(out, REALDATA / "ml-1m", metadata=REALDATA / "kg" / "movies_extrainfos.dat", per_type=5)
    ds = load_dataset(out)
    return ds, Scorer(ds)


def test_real_model_outputs_match_movielens_without_false_matches(movielens):
    path = REALDATA / "recbench" / "grpo_predictions_output.jsonl"
    if not path.exists():
        pytest.skip("grpo_predictions_output.jsonl not present")
    ds, sc = movielens
    with open(path, encoding="utf-8") as f:
        entries = [e for line in f for e in json.loads(line)["response"].split(";")]
    assert len(entries) == 29_295
    matched = sc.match_titles(entries)
    rate = sum(m is not None for m in matched) / len(entries)
    assert rate >= 0.86, rate
    false = []
    for e, m in zip(entries, matched):
        stated = normalize_title(e)[1]
        if m is None or stated is None:
            continue
        item_year = normalize_title(ds.items[m].title)[1]
        if stated > 2000 or item_year is None or abs(stated - item_year) > 1:
            false.append((e, ds.items[m].title))
    assert false == []


def test_real_scale_scoring(movielens):
    ds, sc = movielens
    qs = ds.queries["test"]
    gold = sc.score(qs, [q.gold_reasoning for q in qs])
    assert gold.hit.all() and np.all(gold.rec == 1.0) and np.all(gold.pas == 1.0)
    assert np.all(gold.qas[[bool(q.conditions) for q in qs]] == 1.0)
    sampler = CandidateSampler(ds)
    wrong = [next(i for i in sampler.sample(q, seed=1) if i != q.ground_truth[0]) for q in qs]
    other = sc.score(qs, ["\\boxed{%s}" % ds.items[i].title for i in wrong], [sampler.sample(q, seed=1) for q in qs])
    assert not other.hit.any() and other.qas.mean() < 0.5 and 0 < other.pas.mean() < 1
