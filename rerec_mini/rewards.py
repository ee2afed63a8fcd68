"""The dual-graph reward (ReRec §4.1): format + NDCG@k + QAS + PAS, for a batch of rollouts.

QAS asks "do the recommended items have what the request asked for" (item–attribute graph);
PAS asks "would people who like the right answer like these" (interaction-graph embeddings).
Text parsing and title matching are per rollout; every term after that is array arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from .data import Dataset, Query
from .graphs import item_attribute_matrix, item_embeddings
from .prompts import match_answer, parse_answer
from .titles import TitleIndex


@dataclass
class RewardConfig:
    w_format: float = 0.1  # weight of the format term (+-0.5)
    w_rec: float = 1.0  # weight of NDCG@k
    w_qas: float = 0.1  # query alignment; the authors' release used 0.01
    w_pas: float = 0.1  # preference alignment; the authors' release used 0.01
    k: int = 1  # answer size: every term looks at the first k parsed items
    embedding_dim: int = 64  # SVD rank of the interaction-graph embeddings
    propagation_layers: int = 0  # LightGCN-style smoothing layers on top of the SVD
    cache_dir: str | None = None  # where item embeddings are cached (None: not cached)
    # Format credit only for a listed candidate: with a candidate list, a box whose top item is not
    # one of the candidates scores as no box. The release credits any catalogue title, which lets a
    # policy earn the format reward by boxing one fixed title (a worked example's) whatever is asked.
    format_needs_candidate: bool = False


@dataclass
class RewardBreakdown:
    """Per-rollout reward terms; every array has shape [N] (N rollouts)."""

    total: np.ndarray  # w_format*format + w_rec*rec + w_qas*qas + w_pas*pas
    format: np.ndarray  # +0.5 when the box named >= 1 catalogue item (a listed candidate first, with
    #                     format_needs_candidate), else -0.5
    rec: np.ndarray  # NDCG@k in [0, 1]; -0.5 on a format failure
    qas: np.ndarray  # query alignment in [0, 1]; 0 on a format failure
    pas: np.ndarray  # preference alignment in [0, 1]; 0 on a format failure
    hit: np.ndarray  # bool: the top-1 item is a ground-truth item
    n_entries: np.ndarray  # int: entries in the box (0 without a box)
    n_hallucinated: np.ndarray  # int: entries that matched no catalogue item
    parsed: list[list[str]] = field(default_factory=list)  # matched item ids, repeats dropped (all, not only k)
    user: dict[str, np.ndarray] = field(default_factory=dict)  # --reward-fn name -> [N] values (NaN: skipped)

    def as_dict(self) -> dict[str, float]:
        """Batch means for logging."""
        n = max(1, len(self.total))
        out = {name: float(getattr(self, name).sum() / n) for name in ("total", "format", "rec", "qas", "pas", "hit")}
        out["format_valid"] = float((self.format > 0).sum() / n)
        out["hallucination_rate"] = float(self.n_hallucinated.sum() / max(1, self.n_entries.sum()))  # per entry
        return out


@dataclass
class Target:
    """What one query's answers are scored against (cached per query_id)."""

    gt: np.ndarray  # [g] sorted item rows of the ground truth
    astar: np.ndarray  # [a] attribute columns of A*: the conditions, else what all GT items share


class Answer(NamedTuple):
    """One parsed response: what `score_answers` needs from the text."""

    items: list[str]  # matched item ids in answer order, repeats dropped
    n_entries: int  # entries in the last box (0 without a box)
    n_unmatched: int  # entries that matched no catalogue item (hallucinations)


def discounts(k: int) -> np.ndarray:
    """[k] rank weights 1/log2(rank + 2), rank = 0..k-1 (the NDCG discount)."""
    return 1.0 / np.log2(np.arange(k) + 2.0)


class Scorer:
    """Scores rollouts for one dataset; graphs and embeddings are built once, here."""

    def __init__(self, dataset: Dataset, config: RewardConfig | None = None):
        self.dataset = dataset
        self.config = config or RewardConfig()
        self.titles = TitleIndex(dataset.items.values())
        self.X, self.vocab = item_attribute_matrix(dataset)  # [I, A] binary
        self.E = item_embeddings(dataset, self.config.embedding_dim, self.config.propagation_layers,
                                 self.config.cache_dir)  # [I, d], unit rows
        self._targets: dict[str, Target] = {}
        self._matches: dict[tuple, str | None] = {}  # (entry, candidates) -> item id: rollouts repeat titles
        self._relevant: dict[tuple, np.ndarray] = {}  # (query id, candidates) -> relevant item rows

    # --- per query / per rollout work (the only Python loops)

    def target(self, query: Query) -> Target:
        t = self._targets.get(query.query_id)
        if t is None:
            rows = np.array(sorted(self.dataset.item_index[i] for i in query.ground_truth), np.int64)
            if query.conditions:
                cols = np.array(sorted({self.vocab[tuple(c)] for c in query.conditions}), np.int64)
            else:
                X = self.X
                shared = X.indices[X.indptr[rows[0]]:X.indptr[rows[0] + 1]]
                for r in rows[1:]:
                    shared = np.intersect1d(shared, X.indices[X.indptr[r]:X.indptr[r + 1]])
                cols = np.sort(shared).astype(np.int64)
            t = self._targets[query.query_id] = Target(rows, cols)
        return t

    def match(self, title: str, candidates: tuple[str, ...] | None = None) -> str | None:
        """TitleIndex.match, memoised: the G rollouts of a query repeat the same titles."""
        key = (title, candidates)
        if key not in self._matches:
            if len(self._matches) > 200_000:
                self._matches.clear()  # a bound, not an LRU: refilling is cheap
            self._matches[key] = self.titles.match(title, candidates)
        return self._matches[key]

    def parse(self, response: str, candidates: list[str] | None = None) -> Answer:
        """One response -> its Answer: the last box's entries matched, candidates first."""
        entries = parse_answer(response)
        if entries is None:
            return Answer([], 0, 0)
        ids, unmatched = match_answer(entries, self, tuple(candidates) if candidates else None)
        return Answer(ids, len(entries), unmatched)

    def match_titles(self, titles: list[str]) -> list[str | None]:
        """Item id (or None) for each title, against the whole catalogue."""
        return self.titles.match_many(titles)

    # --- the batch

    def score(self, queries: list[Query], responses: list[str],
              candidates: list[list[str] | None] | None = None) -> RewardBreakdown:
        """Reward terms for N rollouts: row n is `responses[n]` answering `queries[n]` (among
        `candidates[n]`, or the whole catalogue). Parsing is per row; the rest is batched."""
        assert len(queries) == len(responses) and (candidates is None or len(candidates) == len(responses))
        cands = candidates if candidates is not None else [None] * len(responses)
        return self.score_answers(queries, [self.parse(r, c) for r, c in zip(responses, cands)], cands)

    def relevant(self, query: Query, candidates: list[str] | None) -> np.ndarray:
        """Sorted rows of the ground truth the prompt offered: GT ∩ candidates (all of it in open
        generation). NDCG's hits and its ideal both count only these, as evaluation does: an
        ideal over items the prompt never showed would push towards titles the model cannot see."""
        gt = self.target(query).gt
        if candidates is None:
            return gt
        key = (query.query_id, tuple(candidates))  # the G rollouts of a query share their candidates
        shown = self._relevant.get(key)
        if shown is None:
            if len(self._relevant) > 200_000:
                self._relevant.clear()
            shown = gt[np.isin(gt, [self.dataset.item_index[i] for i in candidates])]
            shown = self._relevant[key] = shown if len(shown) else gt
        return shown

    def _top_listed(self, top: np.ndarray, candidates: list[list[str] | None]) -> np.ndarray:
        """[N] bool: row n's top item `top[n]` (an item row, -1 = none) is one of its candidates, or
        the row has no candidate list (open generation: every catalogue item is listed)."""
        index = self.dataset.item_index
        return np.array([c is None or (t >= 0 and t in {index[i] for i in c}) for t, c in zip(top, candidates)],
                        bool)

    def score_answers(self, queries: list[Query], answers: list[Answer],
                      candidates: list[list[str] | None] | None = None) -> RewardBreakdown:
        """The five terms for N parsed answers, as array arithmetic over the batch.

        P [N, k] holds the first k answer item rows (-1 = none). With d_r = 1/log2(r+2) and
        REL = GT ∩ candidates (`relevant`):
          rec = sum_r d_r [P_r in REL] / sum_{r < min(|REL|, k)} d_r
          qas = sum_r d_r |attrs(P_r) ∩ A*| / |A*| / sum_r d_r      (over the answer's ranks r)
          pas = sum_r d_r max_g clip(cos(P_r, g), 0, 1) / sum_r d_r  (g over GT; 1 when P_r in REL)
        With format_needs_candidate, a row whose P_0 is not among its candidates is emptied first: a
        format failure, scored exactly as a response without a box.
        """
        cfg, N, k = self.config, len(answers), self.config.k
        assert len(queries) == N, "one query per answer"
        if N == 0:
            z = np.zeros(0)
            return RewardBreakdown(z, z, z, z, z, z.astype(bool), z.astype(np.int64), z.astype(np.int64), [])
        n_items = len(self.dataset.item_ids)
        targets = [self.target(q) for q in queries]
        cands = candidates if candidates is not None else [None] * N
        rel_rows = [self.relevant(q, c) for q, c in zip(queries, cands)]

        # P: [N, k] item rows, -1 padded, filled from flat lists (one numpy call, not N).
        index = self.dataset.item_index
        lens = np.array([min(k, len(a.items)) for a in answers], np.int64)
        flat = [index[i] for a in answers for i in a.items[:k]]
        P = np.full((N, k), -1, np.int64)
        P[np.repeat(np.arange(N), lens), np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)] = flat
        if cfg.format_needs_candidate:
            P[~self._top_listed(P[:, 0], cands)] = -1  # an off-list top item: the whole answer counts as no box
        valid = P >= 0  # [N, k]
        ok = valid[:, 0]  # format: at least one catalogue item
        disc = discounts(k)

        # Relevance: keys row*I + item, sorted because rows ascend and each row's relevant
        # items are sorted; one searchsorted answers all N*k lookups.
        rel_len = np.array([len(r) for r in rel_rows], np.int64)
        rel_keys = np.repeat(np.arange(N), rel_len) * n_items + np.concatenate(rel_rows)
        keys = np.arange(N)[:, None] * n_items + P
        pos = np.minimum(np.searchsorted(rel_keys, keys), len(rel_keys) - 1)
        rel = valid & (rel_keys[pos] == keys)  # [N, k]
        gt_len = np.array([len(t.gt) for t in targets], np.int64)
        gt_items = np.concatenate([t.gt for t in targets])

        ideal = np.cumsum(disc)[np.minimum(rel_len, k) - 1]
        rec = np.where(ok, (rel * disc).sum(1) / ideal, -0.5)

        # The parsed entries, flattened: entry e is (row er[e], rank ec[e]), item pe[e].
        er, ec = np.nonzero(valid)
        pe = P[er, ec]

        # QAS: |attrs(item) ∩ A*(row)| by an elementwise product of two [E, A] sparse matrices.
        a_len = np.array([len(t.astar) for t in targets], np.int64)
        Astar = sp.csr_matrix((np.ones(a_len.sum(), np.float32),
                               np.concatenate([t.astar for t in targets]),
                               np.concatenate([[0], np.cumsum(a_len)])), shape=(N, self.X.shape[1]))
        overlap = np.asarray(self.X[pe].multiply(Astar[er]).sum(axis=1)).ravel()
        qas_e = np.divide(overlap, a_len[er], out=np.zeros(len(er)), where=a_len[er] > 0)

        # PAS: every (entry, ground-truth item) pair of the same row, cosine, max per entry.
        pairs = gt_len[er]  # pairs per entry (>= 1: every query has ground truth)
        first = np.cumsum(pairs) - pairs  # each entry's first pair
        gt_start = (np.cumsum(gt_len) - gt_len)[er]  # its row's first ground-truth item
        pair_entry = np.repeat(np.arange(len(er)), pairs)
        pair_gt = gt_items[np.repeat(gt_start - first, pairs) + np.arange(pairs.sum())]
        cos = np.einsum("pd,pd->p", self.E[pe[pair_entry]], self.E[pair_gt])
        pas_e = np.clip(np.maximum.reduceat(cos, first), 0.0, 1.0)
        pas_e[rel[er, ec]] = 1.0  # a ground-truth item aligns perfectly, whatever its embedding

        # Rank-discounted means over the parsed ranks (0 on a format failure: no weights).
        w = valid * disc
        wsum = np.maximum(w.sum(1), 1e-12)
        qas, pas = np.zeros((N, k)), np.zeros((N, k))
        qas[er, ec], pas[er, ec] = qas_e, pas_e
        qas, pas = (qas * w).sum(1) / wsum, (pas * w).sum(1) / wsum

        fmt = np.where(ok, 0.5, -0.5)
        total = cfg.w_format * fmt + cfg.w_rec * rec + cfg.w_qas * qas + cfg.w_pas * pas
        return RewardBreakdown(
            total=total, format=fmt, rec=rec, qas=qas, pas=pas, hit=rel[:, 0],
            n_entries=np.array([a.n_entries for a in answers], np.int64),
            n_hallucinated=np.array([a.n_unmatched for a in answers], np.int64),
            parsed=[a.items for a in answers],
        )
