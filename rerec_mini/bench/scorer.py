"""Scorer benchmark: the batched dual-graph scorer vs a per-rollout graph walk, at MovieLens-1M scale.

    python -m rerec_mini.bench scorer [--rollouts 4096 --repeats 5 --data DIR --json FILE]

The world: --data DIR; else MovieLens-1M built from ../shared/realdata into a temp dir; else a
synthetic world of the same size. Rollouts are GRPO-like (8 per query, 20 candidates each): gold
reasoning with the right title, the same with a wrong candidate, ranked lists with repeats,
hallucinated titles, and no box at all. The per-rollout side does what the release's reward
service does minus its HTTP hop: for each rollout it builds the query's neighbourhood in a
dict-of-sets graph, walks item->attribute edges for QAS, looks up embeddings item by item for
PAS and computes NDCG in Python. Both sides use the same parser and title matcher, and their
outputs are asserted equal. Each timed call starts with an empty title memo (the conservative
case; in training, queries recur and the memo is warm: reported too). Median of --repeats,
the two sides alternating.
"""

from __future__ import annotations

import json
import math
import platform
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from ..cli import ArgumentParser
from ..data import Dataset, Query, load_dataset
from ..graphs import item_attribute_matrix, item_embeddings
from ..prompts import CandidateSampler
from ..rewards import Answer, RewardBreakdown, RewardConfig, Scorer

REALDATA = Path(__file__).resolve().parents[3] / "shared" / "realdata"


# ----------------------------------------------------------------------------- the world and the rollouts


def load_world(data: str | None, tmp: Path) -> tuple[Dataset, str]:
    """(dataset, what it is)."""
    if data:
        return load_dataset(data), f"dataset {data}"
    if (REALDATA / "ml-1m" / "movies.dat").exists() and (REALDATA / "kg" / "movies_extrainfos.dat").exists():
        from ..sources import build_movielens

        # 200 queries per type: enough distinct requests that the title memo is not trivially hot.
        build_movielens(tmp / "ml1m", REALDATA / "ml-1m", metadata=REALDATA / "kg" / "movies_extrainfos.dat",
                        per_type=200)
        return load_dataset(tmp / "ml1m"), "MovieLens-1M + movies_extrainfos metadata (real, from ../shared/realdata)"
    from ..synth import build

    # ~165 events per user, as in MovieLens-1M: 6,000 users, ~1M interactions. 3,300 items is
    # the most the generator has people names for (MovieLens-1M has 3,706 rated films).
    build(str(tmp / "synth"), n_items=3300, n_users=6000, per_type=200, history_min=100, history_max=230)
    return load_dataset(tmp / "synth"), "synthetic world of MovieLens-1M size (no real data pack found)"


def make_rollouts(ds: Dataset, n: int, seed: int = 0, group: int = 8):
    """n GRPO-like rollouts: `group` per query, a mix of answer kinds. -> (queries, responses, candidates)."""
    rng = random.Random(seed)
    sampler = CandidateSampler(ds)
    queries = [q for q in ds.all_queries() if q.gold_reasoning]
    title = {iid: it.title for iid, it in ds.items.items()}
    Q, R, C = [], [], []
    while len(R) < n:
        q = rng.choice(queries)
        cands = sampler.sample(q, num_candidates=20, seed=0)
        gold = q.gold_reasoning
        steps = gold[:gold.rindex("\\boxed{")]
        for _ in range(group):
            u = rng.random()
            if u < 0.3:
                text = gold  # correct
            elif u < 0.6:
                text = steps + "\\boxed{%s}" % title[rng.choice(cands)]  # right steps, any candidate
            elif u < 0.75:
                picks = [title[i] for i in rng.sample(cands, rng.randint(2, 5))]
                text = steps + "\\boxed{%s}" % "; ".join(picks + picks[:1])  # a ranked list with a repeat
            elif u < 0.85:
                made_up = f"The {rng.choice(['Quiet', 'Last', 'Red'])} Affair (19{rng.randrange(100):02d})"
                text = steps + "\\boxed{%s}" % made_up  # a hallucinated title
            else:
                text = steps + "So the answer is " + title[rng.choice(cands)]  # no box: format failure
            Q.append(q), R.append(text), C.append(cands)
    return Q[:n], R[:n], C[:n]


# ----------------------------------------------------------------------------- the per-rollout reference


class GraphWalkScorer:
    """One rollout at a time over a dict-of-sets graph: how a reward service scores a request."""

    def __init__(self, scorer: Scorer):
        self.scorer = scorer  # for its parser + title matcher only: the two sides must agree
        self.cfg = scorer.config
        ds = scorer.dataset
        # The item–attribute graph as adjacency sets, both directions, nodes named as in a KG.
        self.adj: dict[str, set[str]] = {}
        for iid, item in ds.items.items():
            for rel, values in item.attributes.items():
                for v in values:
                    self.adj.setdefault(iid, set()).add(f"{rel}::{v}")
                    self.adj.setdefault(f"{rel}::{v}", set()).add(iid)
        self.emb = {iid: scorer.E[k] for k, iid in enumerate(ds.item_ids)}

    def score_one(self, q: Query, answer: Answer, candidates=None) -> dict:
        ids, k, gt = answer.items, self.cfg.k, set(q.ground_truth)
        rel = (gt & set(candidates) if candidates is not None else gt) or gt  # the ground truth the prompt showed
        top = ids[:k]
        row = {"parsed": ids, "n_entries": answer.n_entries, "n_hallucinated": answer.n_unmatched,
               "hit": bool(top) and top[0] in rel}
        if not top:
            row.update(format=-0.5, rec=-0.5, qas=0.0, pas=0.0)
        else:
            # The query's neighbourhood: its ground-truth and answer items with their attribute edges.
            hood = {i: set(self.adj.get(i, ())) for i in gt | set(top)}
            if q.conditions:
                astar = {f"{r}::{v}" for r, v in q.conditions}
            else:
                astar = set.intersection(*(hood[g] for g in q.ground_truth))
            disc = [1.0 / math.log2(r + 2) for r in range(k)]
            dcg = sum(disc[r] for r, i in enumerate(top) if i in rel)
            idcg = sum(disc[:min(len(rel), k)])
            qas = [sum(1 for a in hood[i] if a in astar) / len(astar) if astar else 0.0 for i in top]
            pas = []
            for i in top:
                best = -1.0
                for g in q.ground_truth:
                    best = max(best, float(np.dot(self.emb[i], self.emb[g])))
                pas.append(1.0 if i in gt else min(1.0, max(0.0, best)))
            w = disc[:len(top)]
            row.update(format=0.5, rec=dcg / idcg, qas=sum(a * b for a, b in zip(w, qas)) / sum(w),
                       pas=sum(a * b for a, b in zip(w, pas)) / sum(w))
        c = self.cfg
        row["total"] = c.w_format * row["format"] + c.w_rec * row["rec"] + c.w_qas * row["qas"] + c.w_pas * row["pas"]
        return row

    def score_answers(self, queries, answers, candidates=None) -> list[dict]:
        cands = candidates if candidates is not None else [None] * len(answers)
        return [self.score_one(q, a, c) for q, a, c in zip(queries, answers, cands)]

    def score(self, queries, responses, candidates) -> list[dict]:
        return [self.score_one(q, self.scorer.parse(r, c), c) for q, r, c in zip(queries, responses, candidates)]


def assert_same(fast: RewardBreakdown, slow: list[dict]) -> None:
    for name in ("total", "format", "rec", "qas", "pas"):
        got, want = getattr(fast, name), np.array([s[name] for s in slow])
        assert np.allclose(got, want, atol=1e-6), f"{name}: max diff {np.abs(got - want).max()}"
    for name in ("hit", "n_entries", "n_hallucinated"):
        assert getattr(fast, name).tolist() == [s[name] for s in slow], name
    assert fast.parsed == [s["parsed"] for s in slow]


# ----------------------------------------------------------------------------- timing


def timed(fn, *, cold: Scorer | None = None) -> float:
    if cold is not None:
        cold._matches.clear()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m rerec_mini.bench scorer", description=__doc__.split("\n")[0])
    ap.add_argument("--rollouts", type=int, default=4096, help="rollouts scored per timed call")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per side (median reported)")
    ap.add_argument("--data", help="a dataset directory (default: real MovieLens-1M if present, else synthetic)")
    ap.add_argument("--k", type=int, default=1, help="answer size (NDCG@k)")
    ap.add_argument("--step-rollouts", type=int, default=128, help="rollouts per GRPO step (16 queries x 8)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        ds, what = load_world(args.data, Path(tmp))
        t_world = time.perf_counter() - t
    R = ds.matrix
    print(f"world: {what}\n  {len(ds.items)} items, {R.shape[0]} users, {R.nnz} interactions "
          f"({t_world:.1f} s to build/load)")

    builds = {}
    for name, fn in [("item-attribute matrix", lambda: item_attribute_matrix(ds)),
                     ("item embeddings (SVD, dim 64)", lambda: item_embeddings(ds, 64)),
                     ("item embeddings (+2 LightGCN layers)", lambda: item_embeddings(ds, 64, 2)),
                     ("Scorer(dataset) total", lambda: Scorer(ds, RewardConfig(k=args.k)))]:
        builds[name] = statistics.median(timed(fn) for _ in range(3))
    scorer = Scorer(ds, RewardConfig(k=args.k))
    walker = GraphWalkScorer(scorer)

    Q, Rs, C = make_rollouts(ds, args.rollouts)
    assert_same(scorer.score(Q, Rs, C), walker.score(Q, Rs, C))  # same numbers, before any timing
    Qs, Rss, Cs = Q[:args.step_rollouts], Rs[:args.step_rollouts], C[:args.step_rollouts]

    answers = [scorer.parse(r, c) for r, c in zip(Rs, C)]

    def parse_all():
        return [scorer.parse(r, c) for r, c in zip(Rs, C)]

    runs = {  # name -> (function, clear the title memo first?)
        "batched": (lambda: scorer.score(Q, Rs, C), True),
        "per-rollout": (lambda: walker.score(Q, Rs, C), True),
        "batched warm": (lambda: scorer.score(Q, Rs, C), False),
        "per-rollout warm": (lambda: walker.score(Q, Rs, C), False),
        "batched terms": (lambda: scorer.score_answers(Q, answers, C), False),
        "per-rollout terms": (lambda: walker.score_answers(Q, answers, C), False),
        "parse+match": (parse_all, True),
        "parse+match warm": (parse_all, False),
        "step": (lambda: scorer.score(Qs, Rss, Cs), True),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits every side alike
        for name, (fn, cold) in runs.items():
            times[name].append(timed(fn, cold=scorer if cold else None))
    med = {name: statistics.median(v) for name, v in times.items()}
    n = args.rollouts
    kinds = scorer.score(Q, Rs, C)
    figures = {
        "world": what, "items": len(ds.items), "users": R.shape[0], "interactions": int(R.nnz),
        "rollouts": n, "repeats": args.repeats, "k": args.k, "cpu": cpu_name(),
        "format_valid": float((kinds.format > 0).mean()), "hit": float(kinds.hit.mean()),
        "build_s": builds,
        "rollouts_per_s": {name: n / t for name, t in med.items() if name != "step"},
        "speedup_cold_memo": med["per-rollout"] / med["batched"],
        "speedup_warm_memo": med["per-rollout warm"] / med["batched warm"],
        "speedup_terms_only": med["per-rollout terms"] / med["batched terms"],
        "step_ms": 1e3 * med["step"], "step_rollouts": args.step_rollouts,
    }

    print(f"  {n} rollouts (format valid {figures['format_valid']:.0%}, hit {figures['hit']:.0%}), k={args.k}, "
          f"median of {args.repeats}, {figures['cpu']}\n")
    print(f"{'build':40s} {'seconds':>10s}")
    for name, sec in builds.items():
        print(f"{name:40s} {sec:10.3f}")
    print(f"\n{'rollouts/s':32s} {'batched':>10s} {'per-rollout':>12s} {'speed-up':>9s}")
    for label, a, b in [("end to end, cold title memo", "batched", "per-rollout"),
                        ("end to end, warm title memo", "batched warm", "per-rollout warm"),
                        ("reward terms only (pre-parsed)", "batched terms", "per-rollout terms")]:
        print(f"{label:32s} {n / med[a]:10,.0f} {n / med[b]:12,.0f} {med[b] / med[a]:8.2f}x")
    print(f"{'parse + match only, cold / warm':32s} {n / med['parse+match']:10,.0f} {n / med['parse+match warm']:12,.0f}"
          "   (shared by both sides)")
    print(f"\none GRPO step ({args.step_rollouts} rollouts, cold memo): {figures['step_ms']:.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
