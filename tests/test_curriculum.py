"""Curriculum samplers: difficulty, ordering, retirement, re-checking, state round-trip."""

import json

import numpy as np
import pytest

from rerec_mini.curriculum import BucketCurriculum, PaperCurriculum, Shuffled, difficulty, make_curriculum


def test_difficulty_metrics():
    rec = np.array([1.0, 0.0, -0.5, 0.5])
    assert difficulty(rec, rec, "rec") == pytest.approx(np.mean([0.0, 1.0, 1.0, 0.5]))
    assert difficulty(rec, np.array([1.2, 0.0, -0.5, 0.5]), "reward") == pytest.approx(np.mean([-0.2, 1.0, 1.5, 0.5]))
    with pytest.raises(ValueError):
        difficulty(rec, rec, "loss")


def test_shuffled_epochs_cover_everything():
    c = Shuffled(10, seed=0)
    seen = [i for _ in range(5) for i in c.next_batch(4)]  # 20 draws = two epochs, straddling
    assert sorted(seen) == sorted(list(range(10)) * 2)
    assert c.stats()["epoch"] == 2


@pytest.mark.parametrize("mode", ["none", "paper"])
@pytest.mark.parametrize("n, batch", [(10, 4), (7, 3), (5, 5), (9, 8), (3, 5)])
def test_no_query_twice_in_a_batch_across_epochs(mode, n, batch):
    """A batch that straddles two epochs used to repeat a query (the old epoch's tail + the new
    epoch's head); only a batch larger than the dataset may repeat, and then as little as possible."""
    c = make_curriculum(mode, n, seed=1, batch_size=min(batch, n))
    drawn = []
    for step in range(12):
        b = c.next_batch(batch)
        assert len(b) == batch
        assert len(set(b)) == min(batch, n), (step, b)
        drawn += b
        c.update(b, [0.5] * len(b))  # nothing retires
    if batch <= n:  # every epoch still visits every query: counts differ by at most one
        counts = np.bincount(drawn, minlength=n)
        assert counts.max() - counts.min() <= 1


def test_paper_retires_and_orders_easy_to_hard():
    c = PaperCurriculum(6, seed=0, tau=0.1, batch_size=2)
    first = c.next_batch(6)  # epoch 1: shuffled, everything
    assert sorted(first) == list(range(6))
    c.update(range(6), [0.05, 0.9, 0.5, 0.0, 0.3, 0.7])
    second = c.next_batch(4)
    assert second == [4, 2, 5, 1]  # queries 0 and 3 retired (d < 0.1); the rest easy -> hard
    assert c.stats()["retired"] == 2
    # when fewer than a batch would remain, the epoch uses all queries again
    c.update(range(6), [0.0] * 5 + [0.5])
    assert sorted(c.next_batch(6)) == list(range(6)) and c.stats()["retired"] == 0


def test_buckets_move_from_easy_to_hard_and_recheck_retired():
    n = 300
    c = BucketCurriculum(n, seed=1, tau=0.1, total_steps=100, recheck=0.1)
    c.update(range(n), [0.0] * 60 + [0.2] * 80 + [0.5] * 80 + [0.9] * 80)
    b = c.buckets()
    assert [len(b[k]) for k in c.BUCKETS] == [0, 60, 80, 80, 80]

    def share_of(lo, hi, steps):
        picks = []
        for _ in range(steps):
            picks += c.next_batch(16)
        picks = np.array(picks)
        return ((picks >= lo) & (picks < hi)).mean()

    early_easy = share_of(60, 140, 10)
    c.step = 90
    late_easy = share_of(60, 140, 10)
    c.step = 0
    early_hard = share_of(220, 300, 10)
    c.step = 90
    late_hard = share_of(220, 300, 10)
    assert early_easy > late_easy + 0.2 and late_hard > early_hard + 0.2
    # retired queries come back now and then (forgetting gets caught), but rarely
    c.step = 0
    retired_share = share_of(0, 60, 50)
    assert 0.02 < retired_share < 0.2


def test_buckets_try_unseen_first_and_ema():
    c = BucketCurriculum(20, seed=0, unseen_share=0.5)
    batch = c.next_batch(8)
    assert len(set(batch)) == 8
    c.update(batch, [1.0] * 8)
    c.update(batch[:1], [0.0])
    assert c.difficulty[batch[0]] == pytest.approx(0.5)  # EMA with weight 0.5
    assert c.stats()["unseen"] == 12


@pytest.mark.parametrize("mode", ["none", "paper", "buckets"])
def test_state_round_trip_continues_identically(mode):
    a = make_curriculum(mode, 50, seed=3, batch_size=8, total_steps=20)
    for _ in range(4):
        batch = a.next_batch(8)
        a.update(batch, np.linspace(0, 1, 8))
    state = json.loads(json.dumps(a.state_dict()))  # checkpoints store it as JSON
    b = make_curriculum(mode, 50, seed=99, batch_size=8, total_steps=20)
    b.load_state_dict(state)
    for _ in range(6):
        x, y = a.next_batch(8), b.next_batch(8)
        assert x == y
        a.update(x, np.linspace(1, 0, 8))
        b.update(y, np.linspace(1, 0, 8))


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown curriculum"):
        make_curriculum("random", 5)
