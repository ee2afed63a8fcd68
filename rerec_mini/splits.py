"""Held-out queries that are new to training: the split by component, and the counts that check it.

Two queries are *linked* when a model that learnt the answer to one could answer the other from
memory, whatever their wording:
    conditions  the same (type, condition set), for explicit, implicit and misinformed queries
    group       the same demographic group ("female, 25-34" and "25-34, female" are one group)
    answers     the same (type, ground-truth set), for any type
Linked queries form components (union-find). `split_by_component` sends whole components to one
side, stratified by type, so no test query shares any of the three with a training query; its
demographic test groups are chosen so that training still names every single field value
(each gender, age, occupation) where the data allows. `overlaps` counts what a given split
leaks, per type: `python -m rerec_mini.datasets check DIR` prints it and the run banner shows it.
"""

from __future__ import annotations

import random
from collections import Counter

from .data import QUERY_TYPES, Group, Query

SPLIT_MODES = ("component", "query")  # a builder's --split-by: this module's split, or the old one by query
CONDITION_TYPES = ("explicit", "implicit", "misinformed")  # queries a condition set defines
OVERLAPS = ("conditions", "group", "answers")  # the three links, in the order they are printed


def group_fields(group: Group) -> frozenset[tuple[str, str]]:
    """Group("gender+age", "female, 25-34") -> {("gender", "female"), ("age", "25-34")}: a group as
    its (field, value) pairs, so that the order the fields are named in does not matter."""
    fields, values = group.type.split("+"), group.value.split(", ")
    if len(fields) != len(values):  # a value with its own ", " inside: keep the group whole
        return frozenset({(group.type, group.value)})
    return frozenset(zip(fields, values))


def link_keys(q: Query) -> dict[str, tuple]:
    """The keys through which `q` links to other queries: {link name: key}. A condition-based query
    with no known condition (a converted record whose conditions the metadata did not confirm)
    has no condition key: "unknown" is not a condition set two queries can share."""
    keys = {"answers": (q.type, frozenset(q.ground_truth))}
    if q.type in CONDITION_TYPES and q.conditions:
        keys["conditions"] = (q.type, frozenset(map(tuple, q.conditions)))
    if q.type == "demographic" and q.group is not None:
        keys["group"] = group_fields(q.group)
    return keys


def components(queries: list[Query]) -> list[int]:
    """Component label per query ([N]): queries linked directly or through others share a label.
    Labels are the index of the component's first query, so they follow the input order."""
    parent = list(range(len(queries)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple, int] = {}  # (link, key) -> the first query that has it
    for i, q in enumerate(queries):
        for name, key in link_keys(q).items():
            j = first.setdefault((name, key), i)
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)  # the smaller index stays the root
    return [find(i) for i in range(len(queries))]


def split_by_component(queries: list[Query], test_frac: float,
                       rng: random.Random) -> tuple[list[Query], list[Query], dict]:
    """One query type's queries -> (test, train, report): whole components to one side.

    Components are taken for test in a seeded random order while they fit in the
    round(test_frac * N) test places (one too big to fit is left to training), so the test share is
    test_frac or a little under. Demographic components are taken only while every single field
    value (gender, age, occupation) some group names is still named by a training query; when that
    rule leaves test places empty, a second pass fills them without it (counted in the report).
    Test comes back in the order its components were taken, training in the shuffled order.
    """
    labels = components(queries)
    members: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        members.setdefault(lab, []).append(i)
    order = list(members)  # first-seen order: deterministic before the shuffle
    rng.shuffle(order)
    target = round(len(queries) * test_frac)

    def values(i: int) -> frozenset:
        q = queries[i]
        return group_fields(q.group) if q.type == "demographic" and q.group is not None else frozenset()

    named = Counter(v for i in range(len(queries)) for v in values(i))  # per field value: training queries naming it
    test: list[int] = []
    taken: set[int] = set()
    relaxed = 0
    for keep_coverage in (True, False):
        for lab in order:
            comp = members[lab]
            if lab in taken or len(test) + len(comp) > target:
                continue
            lost = Counter(v for i in comp for v in values(i))
            if keep_coverage and any(named[v] == n for v, n in lost.items()):
                continue
            named.subtract(lost)
            taken.add(lab)
            test += comp
            relaxed += 0 if keep_coverage else len(comp)
    train = [i for lab in order if lab not in taken for i in members[lab]]
    report = {"components": len(members), "largest component": max((len(m) for m in members.values()), default=0)}
    if relaxed:
        report["test queries placed without keeping every field value in training"] = relaxed
    uncovered = sum(1 for n in named.values() if n <= 0)
    if uncovered:
        report["demographic field values no training query names"] = uncovered
    return [queries[i] for i in test], [queries[i] for i in train], report


def overlaps(train: list[Query], test: list[Query]) -> dict[str, dict[str, int]]:
    """Per query type of `test`: how many test queries share each link with some training query.

        {"explicit": {"test": 40, "conditions": 0, "answers": 0}, ...,
         "demographic": {"test": 40, "group": 0, "answers": 0}}
    "conditions" is counted for explicit / implicit / misinformed queries, "group" for demographic
    ones, "answers" for every type (a link a type cannot have is absent, not 0).
    """
    seen = {(name, key) for q in train for name, key in link_keys(q).items()}
    out: dict[str, dict[str, int]] = {}
    for t in QUERY_TYPES:
        qs = [q for q in test if q.type == t]
        if not qs:
            continue
        row = {"test": len(qs)}
        for name in OVERLAPS:
            if (name == "conditions" and t not in CONDITION_TYPES) or (name == "group" and t != "demographic"):
                continue
            row[name] = sum((name, link_keys(q).get(name)) in seen for q in qs)
        out[t] = row
    return out


def total_overlap(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    """The three counts summed over types: {"conditions": n, "group": n, "answers": n}."""
    return {name: sum(row.get(name, 0) for row in counts.values()) for name in OVERLAPS}


def format_overlaps(counts: dict[str, dict[str, int]]) -> str:
    """The per-type table `datasets check` prints ('-' where a type cannot have the link)."""
    lines = ["held-out overlap with training (test queries sharing it with some training query):",
             f"  {'type':12s} {'test':>5s} {'conditions':>11s} {'group':>6s} {'answers':>8s}"]
    for t, row in counts.items():
        cells = [f"{row[n]:d}" if n in row else "-" for n in OVERLAPS]
        lines.append(f"  {t:12s} {row['test']:5d} {cells[0]:>11s} {cells[1]:>6s} {cells[2]:>8s}")
    tot = total_overlap(counts)
    lines.append(f"  {'all':12s} {sum(r['test'] for r in counts.values()):5d} "
                 f"{tot['conditions']:11d} {tot['group']:6d} {tot['answers']:8d}")
    return "\n".join(lines)


def add_split_argument(p) -> None:
    """--split-by, for the builders that generate their queries (synthetic, MovieLens)."""
    p.add_argument("--split-by", choices=SPLIT_MODES, default="component",
                   help="component: no test query shares its condition set, demographic group or answer set "
                        "with a training query (default); query: each query on its own, the split of older "
                        "versions (same seed, same split), to reproduce figures read on it")
