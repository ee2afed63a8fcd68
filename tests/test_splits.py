"""The split by component: held-out queries share no condition set, group or answer set with training."""

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rerec_mini import synth
from rerec_mini.data import QUERY_TYPES, Group, Query, load_dataset
from rerec_mini.datasets import main
from rerec_mini.splits import components, group_fields, link_keys, overlaps, split_by_component, total_overlap


def q(qtype="explicit", conds=(), gt=("a",), group=None, qid="") -> Query:
    return Query(qid, qtype, f"text {qid}", None, list(gt), [tuple(c) for c in conds],
                 group=Group(*group) if group else None)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """A small synthetic world built twice from one seed: split by component (default) and by query."""
    out = {}
    for mode in ("component", "query"):
        path = tmp_path_factory.mktemp(mode) / "w"
        synth.build(str(path), seed=5, n_items=300, n_users=150, per_type=60, split_by=mode)
        out[mode] = load_dataset(path)
    return out


def test_a_small_world_split_by_component_shares_nothing_with_training(worlds):
    ds = worlds["component"]
    counts = overlaps(ds.queries["train"], ds.queries["test"])
    assert set(counts) == set(QUERY_TYPES)
    assert total_overlap(counts) == {"conditions": 0, "group": 0, "answers": 0}
    for t in QUERY_TYPES:  # stratified: each type keeps about a fifth of its queries for test
        n = sum(x.type == t for x in ds.all_queries())
        assert round(0.2 * n) - 3 <= counts[t]["test"] <= round(0.2 * n), (t, counts[t])


def test_the_old_split_by_query_leaks_and_the_counts_see_it(worlds):
    """The same world split query by query: the counter finds what the issue found (most
    demographic test queries name a training group), so the zero above is not a blind counter."""
    new, old = worlds["component"], worlds["query"]
    assert [x.text for x in sorted(old.all_queries(), key=lambda x: x.text)] == \
        [x.text for x in sorted(new.all_queries(), key=lambda x: x.text)]  # the same queries, split apart
    counts = overlaps(old.queries["train"], old.queries["test"])
    tot = total_overlap(counts)
    assert counts["demographic"]["group"] >= counts["demographic"]["test"] / 2 > 0
    assert tot["conditions"] > 0 and tot["answers"] > 0


def test_split_by_query_is_the_old_split(worlds, tmp_path):
    """--split-by query: per type, a Random(seed + 1) shuffle and the first round(0.2 n) to test, as
    before the split by component (the same seed gives the files of older versions)."""
    ds = worlds["query"]
    by_type = {t: sorted((x for x in ds.all_queries() if x.type == t), key=lambda x: x.query_id) for t in QUERY_TYPES}
    for t, qs in by_type.items():
        n_test = round(0.2 * len(qs))
        assert [x.query_id for x in qs] == [f"{'test' if k < n_test else 'train'}-{t}-{k:05d}" for k in range(len(qs))]


def test_components_link_through_chains_and_only_by_the_three_keys():
    qs = [
        q("explicit", [("genre", "War"), ("decade", "1990s")], gt=["a", "b"], qid="0"),
        q("explicit", [("decade", "1990s"), ("genre", "War")], gt=["a", "b"], qid="1"),  # same set, other order
        q("explicit", [("genre", "War")], gt=["b", "a"], qid="2"),  # other conditions, same answer set
        q("implicit", [("genre", "War"), ("decade", "1990s")], gt=["z"], qid="3"),  # other type: not linked
        q("demographic", gt=["c"], group=("gender+age", "female, 25-34"), qid="4"),
        q("demographic", gt=["d"], group=("age+gender", "25-34, female"), qid="5"),  # the same group
        q("demographic", gt=["c"], group=("gender", "female"), qid="6"),  # the same answers as 4
        q("demographic", gt=["e"], group=("gender", "male"), qid="7"),
        q("interest", [("genre", "War")], gt=["f"], qid="8"),
        q("interest", [("genre", "War")], gt=["g"], qid="9"),  # interest: conditions do not link
        q("explicit", [], gt=["h"], qid="10"),
        q("explicit", [], gt=["i"], qid="11"),  # no known condition: nothing to share
    ]
    lab = components(qs)
    assert lab[0] == lab[1] == lab[2] != lab[3]
    assert lab[4] == lab[5] == lab[6] != lab[7]
    assert len({lab[8], lab[9], lab[10], lab[11]}) == 4
    assert all(lab[i] <= i for i in range(len(qs)))


def test_demographic_test_groups_leave_every_field_value_named_in_training():
    """Single groups (gender, age) and their combinations: test takes groups whose values
    training still names; a value only one group carries (an occupation) stays in training."""
    groups = [("gender", "female"), ("gender", "male"), ("age", "18-24"), ("age", "25-34"),
              ("occupation", "artist"), ("occupation", "doctor")]
    groups += [("gender+age", f"{g}, {a}") for g in ("female", "male") for a in ("18-24", "25-34")]
    qs = [q("demographic", gt=[f"{t}={v}"], group=(t, v), qid=f"{t}{v}{k}") for t, v in groups for k in range(3)]
    for seed in range(20):
        test, train, _ = split_by_component(qs, 0.3, random.Random(seed))  # 9 places: 3 groups
        assert len(test) == 9 and len(train) == len(qs) - 9
        named = {fv for x in train for fv in group_fields(x.group)}
        assert named == {fv for x in qs for fv in group_fields(x.group)}, seed
        assert not {x.group for x in test} & {x.group for x in train}
        assert not any(x.group.type == "occupation" for x in test)


def test_when_coverage_cannot_hold_test_is_filled_anyway_and_the_report_says_so():
    qs = [q("demographic", gt=[v], group=("occupation", v), qid=v + str(k)) for v in "abcde" for k in range(2)]
    test, train, rep = split_by_component(qs, 0.2, random.Random(0))
    assert len(test) == 2 and len({x.group for x in test}) == 1
    assert rep["test queries placed without keeping every field value in training"] == 2
    assert rep["demographic field values no training query names"] == 1


queries_strategy = st.lists(
    st.builds(
        q,
        qtype=st.sampled_from(QUERY_TYPES),
        conds=st.lists(st.tuples(st.sampled_from(["genre", "director"]), st.sampled_from("xyz")), max_size=2),
        gt=st.lists(st.sampled_from("abcdef"), min_size=1, max_size=2, unique=True),
        group=st.one_of(st.none(), st.tuples(st.sampled_from(["gender", "age", "gender+age"]),
                                             st.sampled_from(["f", "m", "1-2", "f, 1-2", "m, 3-4"]))),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(queries_strategy, st.floats(0.0, 1.0), st.integers(0, 3))
def test_any_split_by_component_keeps_components_whole_and_leaks_nothing(qs, frac, seed):
    for k, x in enumerate(qs):
        x.query_id = str(k)
    test, train, _ = split_by_component(qs, frac, random.Random(seed))
    assert sorted(x.query_id for x in test + train) == sorted(x.query_id for x in qs)
    assert len(test) <= round(frac * len(qs))
    assert total_overlap(overlaps(train, test)) == {"conditions": 0, "group": 0, "answers": 0}
    lab = dict(zip((x.query_id for x in qs), components(qs)))
    assert not {lab[x.query_id] for x in test} & {lab[x.query_id] for x in train}
    again, _, _ = split_by_component(qs, frac, random.Random(seed))
    assert [x.query_id for x in again] == [x.query_id for x in test]


@given(st.text(max_size=20), st.text(max_size=30))
def test_group_fields_reads_any_group_and_ignores_field_order(gtype, value):
    fields = group_fields(Group(gtype, value))  # never raises
    assert fields and all(isinstance(f, tuple) and len(f) == 2 for f in fields)
    parts, values = gtype.split("+"), value.split(", ")
    if len(parts) == len(values) == 2:
        swapped = Group(f"{parts[1]}+{parts[0]}", f"{values[1]}, {values[0]}")
        assert group_fields(swapped) == fields


def test_link_keys_name_what_each_type_can_share():
    assert set(link_keys(q("explicit", [("genre", "War")]))) == {"conditions", "answers"}
    assert set(link_keys(q("interest", [("genre", "War")]))) == {"answers"}
    assert set(link_keys(q("demographic", group=("age", "56+")))) == {"group", "answers"}


def test_check_prints_the_counts_and_warns_only_on_a_leaking_split(worlds, capsys):
    assert main(["check", str(worlds["component"].path)]) == 0
    out = capsys.readouterr()
    assert "held-out overlap with training" in out.out and "warning" not in out.err
    row = next(line.split() for line in out.out.splitlines() if line.strip().startswith("demographic"))
    assert row[1:] == [str(sum(x.type == "demographic" for x in worlds["component"].queries["test"])), "-", "0", "0"]
    assert main(["check", str(worlds["query"].path)]) == 0  # a warning, not an error
    out = capsys.readouterr()
    tot = total_overlap(overlaps(worlds["query"].queries["train"], worlds["query"].queries["test"]))
    assert "warning:" in out.err and f"conditions {tot['conditions']}, group {tot['group']}" in out.err
    totals = Counter(line.split()[0] for line in out.out.splitlines() if line.startswith("  "))
    assert totals["all"] == 1 and all(totals[t] == 1 for t in QUERY_TYPES)
