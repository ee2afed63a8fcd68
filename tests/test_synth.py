"""The synthetic world: deterministic, semantically correct queries, a graph with signal."""

import re
from pathlib import Path
from collections import Counter, defaultdict

import numpy as np
import pytest

from rerec_mini import synth
from rerec_mini.data import QUERY_TYPES, load_dataset
from rerec_mini.querygen import describe, group_phrase
from rerec_mini.data import Group


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "w"
    synth.build(str(out), seed=3, n_items=300, n_users=150, per_type=60)
    return out, load_dataset(out)


def test_byte_identical_for_same_arguments(world, tmp_path):
    out, _ = world
    again = tmp_path / "again"
    synth.build(str(again), seed=3, n_items=300, n_users=150, per_type=60)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    other = tmp_path / "other"
    synth.build(str(other), seed=4, n_items=300, n_users=150, per_type=60)
    assert (other / "items.jsonl").read_bytes() != (out / "items.jsonl").read_bytes()


def test_catalogue_shape(world):
    _, ds = world
    relations = {"genre", "director", "writer", "starring", "year", "decade", "country", "language"}
    assert all(relations <= set(it.attributes) for it in ds.items.values())
    assert len({it.title for it in ds.items.values()}) == len(ds.items)
    # people recur, at several sizes: shared relations exist between pairs, triples, ...
    for rel in ("director", "starring", "writer"):
        films = Counter(v for it in ds.items.values() for v in it.attributes[rel])
        sizes = Counter(films.values())
        assert max(films.values()) >= 5 and sum(n for s, n in sizes.items() if s >= 2) >= 10, (rel, sizes)


def test_every_type_split_stratified_and_texts_disjoint(world):
    _, ds = world
    for qtype in QUERY_TYPES:
        n_train = sum(q.type == qtype for q in ds.queries["train"])
        n_test = sum(q.type == qtype for q in ds.queries["test"])
        assert n_train + n_test == 60 and n_test == 12, (qtype, n_train, n_test)
    train_texts = {q.text for q in ds.queries["train"]}
    assert not train_texts & {q.text for q in ds.queries["test"]}


def test_at_least_four_phrasings_per_type(world):
    _, ds = world
    # strip everything query-specific (titles, names, numbers) to recover the template skeleton
    def skeleton(q):
        s = q.text
        for it in ds.items.values():
            if it.title in s:
                s = s.replace(it.title, "T")
        for _, v in q.conditions:
            s = s.replace(v, "V")
        return re.sub(r"[A-Z][a-z]+ [A-Z][a-z]+|\d+", "X", s)[:25]
    for qtype in QUERY_TYPES:
        shapes = {skeleton(q) for q in ds.all_queries() if q.type == qtype}
        assert len(shapes) >= 4, (qtype, shapes)


def test_query_semantics(world):
    _, ds = world
    items = ds.items
    for q in ds.all_queries():
        gt = q.ground_truth
        # gold reasoning: one step per line, the box names the primary ground-truth item
        assert q.gold_reasoning.splitlines()[-1] == f"\\boxed{{{items[gt[0]].title}}}"
        assert not set(q.history) & set(gt)
        hist = ds.history(q.user_id) if q.user_id else []
        if q.type == "explicit":
            assert 1 <= len(q.conditions) <= 4
            assert len(set(hist) & set(gt)) >= 2  # built from items a user shares
        elif q.type in ("implicit", "misinformed"):
            anchor = (q.hop or q.misinformation).item_id
            assert anchor not in gt and anchor in hist
        if q.type == "implicit":
            assert items[q.hop.item_id].has(q.hop.relation, q.hop.value)
            assert (q.hop.relation, q.hop.value) in q.conditions
            assert items[q.hop.item_id].title in q.text or "movie" in q.text
        if q.type == "misinformed":
            m = q.misinformation
            assert not items[m.item_id].has(m.relation, m.wrong_value) and m.wrong_value in q.text
            assert all(items[i].has(m.relation, m.true_value) for i in gt)  # truth decides
            assert m.true_value not in q.text
        if q.type == "interest":
            # ground truth: items the user watched after a themed run, all carrying the theme
            start = hist.index(q.history[0])
            end = start + len(q.history)
            assert hist[start:end] == q.history  # the user's items just before the request
            assert q.conditions and all(hist.index(i) >= end for i in gt)
            assert all(items[i].has(*c) for i in q.history[-3:] for c in q.conditions)  # the themed run
        if q.type == "demographic":
            assert q.user_id is None and q.group is not None
            assert group_phrase(q.group) in q.text


def test_ground_truth_is_complete_for_condition_queries(world):
    """No catalogue item outside the ground truth satisfies an explicit query's conditions."""
    _, ds = world
    for q in ds.all_queries():
        if q.type != "explicit":
            continue
        fits = [i for i, it in ds.items.items() if all(it.has(*c) for c in q.conditions)]
        assert sorted(fits) == sorted(q.ground_truth)


def test_demographic_groups_differ(world):
    _, ds = world
    truths = {}
    for q in ds.all_queries():
        if q.type == "demographic":
            truths[(q.group.type, q.group.value)] = tuple(q.ground_truth)
    assert len(truths) >= 10 and len(set(truths.values())) >= 0.8 * len(truths)


def test_interaction_graph_carries_taste_signal(world):
    """SVD item embeddings put items that share a director or lead closer than random pairs."""
    _, ds = world
    m = ds.matrix.toarray()
    deg_u, deg_i = m.sum(1, keepdims=True), m.sum(0, keepdims=True)
    norm = m / np.sqrt(np.maximum(deg_u, 1)) / np.sqrt(np.maximum(deg_i, 1))
    _, s, vt = np.linalg.svd(norm, full_matrices=False)
    emb = (vt[:32].T * s[:32])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True) + 1e-9
    by_value = defaultdict(list)
    for k, it in enumerate(ds.items.values()):
        by_value[("director", it.attributes["director"][0])].append(k)
        for g in it.attributes["genre"]:
            by_value[("genre", g)].append(k)
    same = [emb[a] @ emb[b] for ks in by_value.values() for a in ks for b in ks if a < b]
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, len(emb), size=(5000, 2))
    rand = [emb[a] @ emb[b] for a, b in pairs if a != b]
    assert np.mean(same) > np.mean(rand) + 0.05, (np.mean(same), np.mean(rand))


def test_describe_reads_naturally():
    assert describe([("genre", "War"), ("starring", "Tom Hanks")]) == "War movies starring Tom Hanks"
    assert describe([("director", "Ada Bell"), ("decade", "1960s")]) == "movies directed by Ada Bell, from the 1960s"
    assert (describe([("genre", "War"), ("writer", "A"), ("writer", "B"), ("language", "French")])
            == "War movies written by A and B, in French")
    assert group_phrase(Group("gender+age", "female, 25-34")) == "women aged 25-34"
    assert group_phrase(Group("occupation", "artist")) == "artist viewers"


def test_fresh_queries_are_new_questions_and_deterministic():
    """--sft-fresh: warm-start queries generated from the dataset itself, none linked to a train or
    test query (the same condition set, group or answer set: what the split keeps apart), and no
    two of them the same question (type, conditions, anchor, interest target)."""
    from rerec_mini.querygen import fresh_queries, signature
    from rerec_mini.splits import link_keys
    ds = load_dataset(Path(__file__).resolve().parents[1] / "data" / "synth-movies")
    hist = {u: ds.history(u) for u in ds.interactions.user_ids}
    args = (list(ds.items.values()), hist, ds.users)
    a = fresh_queries(*args, per_type=60, seed=3, exclude=ds.all_queries())
    b = fresh_queries(*args, per_type=60, seed=3, exclude=ds.all_queries())
    assert [q.to_json() for q in a] == [q.to_json() for q in b]
    taken = {link for q in ds.all_queries() for link in link_keys(q).items()}
    assert a and not any(taken & set(link_keys(q).items()) for q in a)
    assert len({signature(q) for q in a}) == len(a)  # no two alike either
    assert {q.type for q in a} == {"explicit", "implicit", "misinformed", "interest"}  # every group is taken
    # a group no dataset query names is fair game
    some = [q for q in ds.all_queries() if not (q.type == "demographic" and q.group.value == "male")]
    assert any(q.type == "demographic" and q.group.value == "male"
               for q in fresh_queries(*args, per_type=60, seed=3, exclude=some))
    assert all(q.gold_reasoning and q.ground_truth for q in a)
    # the signature tells wording apart from the question: same conditions, other text -> same signature
    q = next(q for q in ds.queries["train"] if q.type == "explicit")
    from dataclasses import replace
    assert signature(replace(q, text="reworded " + q.text)) == signature(q)
