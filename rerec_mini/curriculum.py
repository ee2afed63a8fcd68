"""Online curriculum (ReRec §4.3): which training queries the next GRPO step rolls out.

Difficulty comes for free from the rollouts the trainer already made: after a query's G
rollouts, d = mean(1 - clip(rec, 0, 1)) (or mean(1 - reward)). Three samplers share one
interface — `next_batch(B)`, `update(indices, difficulties)`, `state_dict()` — selected by
`--curriculum`:

    none     shuffled epochs
    paper    per epoch: retire queries with d < tau, order the rest easy -> hard
    buckets  online EMA difficulty; the batch mix moves from easy- to hard-heavy;
             retired queries are re-checked now and then so forgetting is caught
"""

from __future__ import annotations

import math

import numpy as np


def difficulty(rec: np.ndarray, reward: np.ndarray, metric: str = "rec") -> float:
    """Difficulty of one query from its G rollouts: rec [G], reward [G] -> scalar."""
    if metric == "rec":
        return float(np.mean(1.0 - np.clip(rec, 0.0, 1.0)))
    if metric == "reward":
        return float(np.mean(1.0 - reward))
    raise ValueError(f"unknown difficulty metric {metric!r} (rec | reward)")


class _Sampler:
    """Shared state: query count, RNG, last difficulty per query (NaN = never rolled out)."""

    def __init__(self, num_queries: int, seed: int = 0):
        if num_queries <= 0:
            raise ValueError("the curriculum needs at least one training query")
        self.n = num_queries
        self.rng = np.random.default_rng(seed)
        self.difficulty = np.full(num_queries, np.nan)
        self.step = 0

    def update(self, indices, difficulties) -> None:
        for i, d in zip(indices, difficulties):
            self.difficulty[i] = d

    def stats(self) -> dict:
        d = self.difficulty
        return {"unseen": int(np.isnan(d).sum())}

    def state_dict(self) -> dict:
        return {"step": self.step, "difficulty": [None if math.isnan(x) else float(x) for x in self.difficulty],
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.difficulty = np.array([np.nan if x is None else x for x in state["difficulty"]], dtype=float)
        self.rng.bit_generator.state = state["rng"]


class Shuffled(_Sampler):
    """`--curriculum none`: shuffled epochs; a batch may straddle two epochs (without repeats)."""

    def __init__(self, num_queries: int, seed: int = 0, **_):
        super().__init__(num_queries, seed)
        self.order: list[int] = []
        self.epoch = 0

    def _refill(self) -> None:
        self.order += self.rng.permutation(self.n).tolist()
        self.epoch += 1

    def next_batch(self, batch_size: int) -> list[int]:
        """The next `batch_size` queries of the epoch order, never one query twice in a batch: when
        a batch straddles two epochs, a query the old epoch's tail already gave is taken later in
        the new epoch instead (unless the batch is larger than the whole dataset)."""
        unique = min(batch_size, self.n)
        batch: list[int] = []
        k = 0  # position in self.order; skipped queries stay there for a later batch
        while len(batch) < batch_size:
            if k == len(self.order):
                self._refill()
            q = self.order[k]
            if q not in batch or len(set(batch)) >= unique:
                batch.append(self.order.pop(k))
            else:
                k += 1
        self.step += 1
        return batch

    def stats(self) -> dict:
        return {**super().stats(), "epoch": self.epoch}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "order": self.order, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.order, self.epoch = list(state["order"]), state["epoch"]


class PaperCurriculum(Shuffled):
    """`--curriculum paper`: the first epoch is shuffled; every later epoch retires the
    queries whose last difficulty is below tau and orders the rest easy -> hard. When fewer
    than one batch would remain, the epoch uses every query again."""

    def __init__(self, num_queries: int, seed: int = 0, tau: float = 0.1, batch_size: int = 1, **_):
        super().__init__(num_queries, seed)
        self.tau, self.batch_size = tau, batch_size
        self.retired = 0

    def _refill(self) -> None:
        d = self.difficulty
        if self.epoch == 0 or np.isnan(d).all():
            self.order += self.rng.permutation(self.n).tolist()
        else:
            # Never-seen queries sort as hardest; ties broken at random (a stable sort of a shuffle).
            d = np.where(np.isnan(d), np.inf, d)
            keep = np.flatnonzero(d >= self.tau)
            self.retired = self.n - len(keep)
            if len(keep) < self.batch_size:
                keep, self.retired = np.arange(self.n), 0
            keep = self.rng.permutation(keep)
            self.order += keep[np.argsort(d[keep], kind="stable")].tolist()
        self.epoch += 1

    def stats(self) -> dict:
        return {**super().stats(), "retired": self.retired}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "retired": self.retired}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.retired = state["retired"]


class BucketCurriculum(_Sampler):
    """`--curriculum buckets` (default): online, difficulty-bucketed sampling.

    Each query keeps an EMA of its difficulty and sits in one bucket: unseen, retired
    (d < tau: mastered), easy (d < 1/3), medium, hard (d >= 2/3). A batch first takes
    unseen queries (up to `unseen_share` of it: everything must be tried once), re-checks
    each retired query slot with probability `recheck`, and fills the rest from
    easy / medium / hard with shares that move from easy-heavy at the start of the run
    to hard-heavy at the end (progress = step / total_steps). Empty buckets give their
    share to the others.
    """

    BUCKETS = ("unseen", "retired", "easy", "medium", "hard")

    def __init__(self, num_queries: int, seed: int = 0, tau: float = 0.1, total_steps: int = 100,
                 ema: float = 0.5, unseen_share: float = 0.5, recheck: float = 0.05, **_):
        super().__init__(num_queries, seed)
        self.tau, self.total_steps, self.ema = tau, max(1, total_steps), ema
        self.unseen_share, self.recheck = unseen_share, recheck

    def update(self, indices, difficulties) -> None:
        for i, d in zip(indices, difficulties):
            old = self.difficulty[i]
            self.difficulty[i] = d if np.isnan(old) else self.ema * d + (1 - self.ema) * old

    def buckets(self) -> dict[str, np.ndarray]:
        d = self.difficulty
        seen = ~np.isnan(d)
        dd = np.where(seen, d, -1.0)
        return {
            "unseen": np.flatnonzero(~seen),
            "retired": np.flatnonzero(seen & (dd < self.tau)),
            "easy": np.flatnonzero(seen & (dd >= self.tau) & (dd < 1 / 3)),
            "medium": np.flatnonzero(seen & (dd >= 1 / 3) & (dd < 2 / 3)),
            "hard": np.flatnonzero(seen & (dd >= 2 / 3)),
        }

    def mix(self) -> dict[str, float]:
        """Target shares of easy / medium / hard at the current progress."""
        p = min(1.0, self.step / self.total_steps)
        return {"easy": 0.5 * (1 - p) + 0.1, "medium": 0.3, "hard": 0.5 * p + 0.1}

    def next_batch(self, batch_size: int) -> list[int]:
        b = self.buckets()
        n_unseen = min(len(b["unseen"]), math.ceil(self.unseen_share * batch_size))
        n_recheck = min(len(b["retired"]), int(self.rng.binomial(batch_size, self.recheck)))
        batch = self.rng.choice(b["unseen"], n_unseen, replace=False).tolist()
        batch += self.rng.choice(b["retired"], n_recheck, replace=False).tolist()
        pools = {k: self.rng.permutation(b[k]).tolist() for k in ("easy", "medium", "hard")}
        shares = self.mix()
        while len(batch) < batch_size:
            live = {k: shares[k] for k in pools if pools[k]}
            if not live:  # everything is retired or already chosen: fall back to any query
                rest = np.setdiff1d(np.arange(self.n), batch)
                if len(rest) == 0:
                    rest = np.arange(self.n)
                batch.append(int(self.rng.choice(rest)))
                continue
            names = list(live)
            w = np.array([live[k] for k in names])
            pick = names[self.rng.choice(len(names), p=w / w.sum())]
            batch.append(pools[pick].pop())
        self.step += 1
        return [int(i) for i in batch]

    def stats(self) -> dict:
        return {k: len(v) for k, v in self.buckets().items()}


CURRICULA = {"none": Shuffled, "paper": PaperCurriculum, "buckets": BucketCurriculum}


def make_curriculum(mode: str, num_queries: int, *, seed: int = 0, tau: float = 0.1,
                    batch_size: int = 1, total_steps: int = 100) -> _Sampler:
    if mode not in CURRICULA:
        raise ValueError(f"unknown curriculum {mode!r} (choose from {', '.join(CURRICULA)})")
    return CURRICULA[mode](num_queries, seed=seed, tau=tau, batch_size=batch_size, total_steps=total_steps)
