"""The five RecBench+ query types, built from a catalogue and user histories.

Shared by the synthetic world (synth.py) and the MovieLens builder (sources.py), so both
produce queries the same way RecBench+ did: conditions come from relations shared inside
one user's history. Every query gets several phrasings and a gold reasoning trace.

    explicit     1-4 (relation, value) pairs shared by >= 2 of a user's items
    implicit     one condition named through another item ("by the director of X")
    misinformed  the request states a false fact about an anchor item; truth decides
    interest     a run of consecutive history items with a shared theme -> later items
    demographic  what a user group (gender / age / occupation) watches most

For explicit / implicit / misinformed queries the ground truth is every catalogue item
that satisfies the conditions (at most `max_gt`), not only the user's items, so no
candidate negative can also be correct. Interest and demographic ground truth is what the
user watched next / what the group watches most.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

from .data import QUERY_TYPES, SPLITS, Group, Hop, Item, Misinformation, Query, User
from .splits import SPLIT_MODES, link_keys, split_by_component

# Relations a condition may use. "year" is left out: "decade" says the same, less narrowly.
CONDITION_RELATIONS = ("genre", "director", "writer", "starring", "decade", "country", "language")
# Relations an implicit / misinformed request may name through an anchor item. Only the
# first value counts (the director, the first-credited writer, the lead actor).
HOP_RELATIONS = ("director", "writer", "starring")

# How a condition reads after "movies": ("starring", "Ann Lee") -> "starring Ann Lee".
_MODIFIER = {
    "director": "directed by {}",
    "writer": "written by {}",
    "starring": "starring {}",
    "decade": "from the {}",
    "year": "from {}",
    "country": "made in {}",
    "language": "in {}",
}
# (verb phrase, noun) for a hop relation: "directed by", "director".
_HOP_WORDS = {"director": ("directed by", "director"), "writer": ("written by", "writer"), "starring": ("starring", "lead actor")}

EXPLICIT = [
    "Can you recommend {desc}?",
    "I'm looking for {desc}.",
    "What are some good {desc}?",
    "Recommend me {desc}, please.",
    "I'd like to watch {desc} tonight. Any ideas?",
    "My friends and I love {desc}. What should we watch?",
]
IMPLICIT = [
    "Recommend {genre}movies {link}.",
    "I'm after {genre}films {link}.",
    "Which {genre}movies are {link}?",
    "I loved {ref}. Show me more {genre}movies {same}.",
    "Name a {genre}movie {link}, please.",
]
MISINFORMED = [
    "I enjoyed {ref}, {verb} {wrong}. Recommend more {genre}movies from its {noun}.",
    "{ref} was {verb} {wrong}, right? Find other {genre}films from the same {noun}.",
    "Since {ref} is {verb} {wrong}, suggest more {genre}movies from that {noun}.",
    "I'm a fan of {ref} ({verb} {wrong}). What other {genre}movies are there from its {noun}?",
]
INTEREST_THEME = [
    "I've been watching a lot of {desc} lately. What should I see next?",
    "Lately I'm into {desc}. Recommend another one.",
    "More {desc}, please. I'm on a streak.",
]
INTEREST_TITLES = [
    "My last few movies were {t1}, {t2} and {t3}. Something in the same vein?",
    "After {t1} and {t2}, I want one more like them.",
]
DEMOGRAPHIC = [
    "What do {g} like to watch?",
    "Recommend a movie popular with {g}.",
    "I'm choosing a film for {g}. Any suggestion?",
    "Which movie would {g} enjoy most?",
    "Pick a crowd-pleaser for {g}.",
    "What's a favourite among {g}?",
    "Suggest something {g} usually love.",
    "What are {g} watching these days?",
]


# ----------------------------------------------------------------------------- phrasing


def describe(conditions: list[tuple[str, str]]) -> str:
    """[(genre, War), (starring, Tom Hanks), (starring, Meg Ryan), (decade, 1990s)]
    -> 'War movies starring Tom Hanks and Meg Ryan, from the 1990s'."""
    genres = [v for r, v in conditions if r == "genre"]
    by_rel: dict[str, list[str]] = {}
    for r, v in conditions:
        if r != "genre":
            by_rel.setdefault(r, []).append(v)
    mods = [_MODIFIER.get(r, r + " {}").format(" and ".join(vs)) for r, vs in by_rel.items()]
    return " ".join(genres + ["movies"]) + (" " + ", ".join(mods) if mods else "")


def fmt_conditions(conditions: list[tuple[str, str]]) -> str:
    """[(genre, War), (starring, Tom Hanks)] -> 'genre: War; starring: Tom Hanks' (the reasoning style)."""
    return "; ".join(f"{r}: {v}" for r, v in conditions)


def group_phrase(group: Group) -> str:
    parts = dict(zip(group.type.split("+"), group.value.split(", ")))
    who = {"female": "women", "male": "men"}.get(parts.get("gender", ""), "people")
    age = parts.get("age")
    if age:
        who += " under 18" if age.startswith("under") else f" aged {age}"
    occ = parts.get("occupation")
    if occ:
        who = f"{occ} viewers" if who == "people" else f"{who} working as {occ}"
    return who


def _gold(steps: list[str], answer: Item) -> str:
    return "\n".join(steps + [f"\\boxed{{{answer.title}}}"])


def _item_line(item: Item, conditions: list[tuple[str, str]]) -> str:
    return f"{item.title} has {fmt_conditions(conditions)}."


# ----------------------------------------------------------------------------- the generator


@dataclass
class _World:
    items: dict[str, Item]
    index: dict[tuple[str, str], list[str]]  # (relation, value) -> item ids, catalogue order
    position: dict[str, int]

    @classmethod
    def build(cls, items: list[Item]) -> "_World":
        index: dict[tuple[str, str], list[str]] = {}
        for it in items:
            for rel in CONDITION_RELATIONS:
                for v in it.attributes.get(rel, ()):
                    index.setdefault((rel, v), []).append(it.item_id)
        return cls({it.item_id: it for it in items}, index, {it.item_id: k for k, it in enumerate(items)})

    def matching(self, conditions: list[tuple[str, str]]) -> list[str]:
        """Item ids that have every condition, in catalogue order."""
        lists = sorted((self.index.get(c, []) for c in conditions), key=len)
        if not lists:
            return []
        out = set(lists[0])
        for other in lists[1:]:
            out.intersection_update(other)
        return sorted(out, key=self.position.__getitem__)

    def pairs(self, item_id: str) -> list[tuple[str, str]]:
        it = self.items[item_id]
        return [(r, v) for r in CONDITION_RELATIONS for v in it.attributes.get(r, ())]

    def first(self, item_id: str, rel: str) -> str | None:
        vals = self.items[item_id].attributes.get(rel)
        return vals[0] if vals else None


class QueryBuilder:
    """Draws queries of each type; each `try_*` returns a Query or the reason it skipped."""

    def __init__(self, items: list[Item], histories: dict[str, list[str]], users: dict[str, User], *,
                 seed: int, max_gt: int = 10, min_gt: int = 1):
        self.w = _World.build(items)
        self.histories = {u: h for u, h in histories.items() if h}
        self.users = users
        self.rng = random.Random(seed)
        self.max_gt, self.min_gt = max_gt, min_gt
        self.user_ids = sorted(self.histories)

    # --- helpers
    def _gt(self, conditions, *, exclude=(), prefer=()) -> list[str] | str:
        """Ground truth: all items with the conditions minus `exclude`, `prefer` items first."""
        gt = [i for i in self.w.matching(conditions) if i not in exclude]
        if len(gt) < self.min_gt:
            return "too few ground-truth items"
        if len(gt) > self.max_gt:
            return "too many ground-truth items"
        first = [i for i in prefer if i in gt]
        return first + [i for i in gt if i not in first]

    def _history_without(self, user: str, drop, upto: int | None = None, n: int = 20) -> list[str]:
        h = self.histories[user][:upto]
        drop = set(drop)
        return [i for i in h if i not in drop][-n:]

    def _genre_narrowing(self, conditions, anchor: str, exclude) -> list[tuple[str, str]] | None:
        """Add one of the anchor's genres when the hop alone matches too many items."""
        for g in self.w.items[anchor].attributes.get("genre", []):
            if 1 <= len([i for i in self.w.matching(conditions + [("genre", g)]) if i not in exclude]) <= self.max_gt:
                return conditions + [("genre", g)]
        return None

    def _describe_anchor(self, anchor: str, hop_rel: str) -> str:
        """Refer to an item by title, or (half the time) by a description that only it fits."""
        it = self.w.items[anchor]
        if self.rng.random() < 0.5:
            return it.title
        for rel in ("starring", "director", "writer"):
            if rel == hop_rel or not it.attributes.get(rel):
                continue
            for genre in it.attributes.get("genre", [])[:1]:
                for dec in it.attributes.get("decade", [])[:1]:
                    person = it.attributes[rel][0]
                    conds = [("genre", genre), ("decade", dec), (rel, person)]
                    if self.w.matching(conds) == [anchor]:
                        verb = _MODIFIER[rel].format(person)
                        return f"the {dec} {genre} movie {verb}"
        return it.title

    # --- the five types
    def try_explicit(self, user: str) -> Query | str:
        h = self.histories[user]
        if len(h) < 2:
            return "history too short"
        a, b = self.rng.sample(h, 2)
        in_b = set(self.w.pairs(b))
        shared = [p for p in self.w.pairs(a) if p in in_b]
        if not shared:
            return "no shared relation"
        k = self.rng.randint(1, min(4, len(shared)))
        conds = sorted(self.rng.sample(shared, k), key=lambda c: CONDITION_RELATIONS.index(c[0]))
        gt = self._gt(conds, prefer=[a, b])
        if isinstance(gt, str):
            return gt
        text = self.rng.choice(EXPLICIT).format(desc=describe(conds))
        gold = _gold([f"Needed: {fmt_conditions(conds)}.", _item_line(self.w.items[gt[0]], conds)], self.w.items[gt[0]])
        return Query("", "explicit", text, user, gt, conds, history=self._history_without(user, gt), gold_reasoning=gold)

    def _anchor_hop(self, user: str):
        """A history item and a hop relation whose value is shared with another history item."""
        h = self.histories[user]
        anchor = self.rng.choice(h)
        rels = [r for r in HOP_RELATIONS if self.w.first(anchor, r)]
        if not rels:
            return "anchor has no hop relation"
        rel = self.rng.choice(rels)
        value = self.w.first(anchor, rel)
        if not any(i != anchor and self.w.items[i].has(rel, value) for i in h):
            return "hop value not shared inside the history"
        conds = [(rel, value)]
        gt = self._gt(conds, exclude={anchor}, prefer=h)
        if gt == "too many ground-truth items":
            narrowed = self._genre_narrowing(conds, anchor, {anchor})
            if narrowed is None:
                return gt
            conds = narrowed
            gt = self._gt(conds, exclude={anchor}, prefer=h)
        if isinstance(gt, str):
            return gt
        return anchor, rel, value, conds, gt

    def try_implicit(self, user: str) -> Query | str:
        got = self._anchor_hop(user)
        if isinstance(got, str):
            return got
        anchor, rel, value, conds, gt = got
        verb, noun = _HOP_WORDS[rel]
        ref = self._describe_anchor(anchor, rel)
        genre = "".join(f"{v} " for r, v in conds if r == "genre")
        link = f"{verb} the {noun} of {ref}"
        text = self.rng.choice(IMPLICIT).format(genre=genre, link=link, ref=ref, same=f"from the same {noun}")
        A, G = self.w.items[anchor], self.w.items[gt[0]]
        gold = _gold([
            f"The film meant is {A.title}.",
            f"Its {noun} is {value}.",
            f"Needed: {fmt_conditions(conds)}.",
            _item_line(G, conds),
        ], G)
        return Query("", "implicit", text, user, gt, conds, hop=Hop(anchor, rel, value),
                     history=self._history_without(user, gt + [anchor]), gold_reasoning=gold)

    def try_misinformed(self, user: str) -> Query | str:
        got = self._anchor_hop(user)
        if isinstance(got, str):
            return got
        anchor, rel, value, conds, gt = got
        A = self.w.items[anchor]
        # The false value: another person of the same relation, famous enough to recur.
        pool = [v for (r, v), ids in self.w.index.items() if r == rel and len(ids) >= 2 and not A.has(rel, v)]
        if not pool:
            return "no false value available"
        wrong = self.rng.choice(pool)
        verb, noun = _HOP_WORDS[rel]
        genre = "".join(f"{v} " for r, v in conds if r == "genre")
        text = self.rng.choice(MISINFORMED).format(ref=A.title, verb=verb, wrong=wrong, genre=genre, noun=noun)
        G = self.w.items[gt[0]]
        gold = _gold([
            f"The request says {A.title} is {verb} {wrong}.",
            f"That is wrong: its {noun} is {value}.",
            f"Needed: {fmt_conditions(conds)}.",
            _item_line(G, conds),
        ], G)
        return Query("", "misinformed", text, user, gt, conds,
                     misinformation=Misinformation(anchor, rel, wrong, value),
                     history=self._history_without(user, gt + [anchor]), gold_reasoning=gold)

    def try_interest(self, user: str) -> Query | str:
        h = self.histories[user]
        if len(h) < 4:
            return "history too short"
        end = self.rng.randint(3, len(h) - 1)  # the window is h[end-3:end]; later items are h[end:]
        window = h[end - 3:end]
        theme = [p for p in self.w.pairs(window[0]) if all(self.w.items[i].has(*p) for i in window[1:])]
        if not theme:
            return "no shared theme in the window"
        # The most specific one or two theme pairs (fewest catalogue items) make the request.
        theme.sort(key=lambda p: (len(self.w.index[p]), CONDITION_RELATIONS.index(p[0]), p[1]))
        conds = sorted(theme[:2], key=lambda c: CONDITION_RELATIONS.index(c[0]))
        later = [i for i in dict.fromkeys(h[end:]) if i not in window and all(self.w.items[i].has(*c) for c in conds)]
        if not later:
            return "no later item with the theme"
        gt = later[: self.max_gt]
        titles = [self.w.items[i].title for i in window]
        if self.rng.random() < 0.4:
            text = self.rng.choice(INTEREST_TITLES).format(t1=titles[0], t2=titles[1], t3=titles[2])
        else:
            text = self.rng.choice(INTEREST_THEME).format(desc=describe(conds))
        G = self.w.items[gt[0]]
        gold = _gold([f"Recent theme: {fmt_conditions(conds)}.", _item_line(G, conds)], G)
        return Query("", "interest", text, user, gt, conds, history=h[:end][-20:], gold_reasoning=gold)

    def demographic_groups(self, min_users: int) -> list[tuple[Group, list[str]]]:
        """User groups (single attributes and gender x age) with >= min_users members."""
        members: dict[tuple[str, str], list[str]] = {}
        for uid in self.user_ids:
            u = self.users.get(uid)
            if u is None:
                continue
            singles = [(k, getattr(u, k)) for k in ("gender", "age", "occupation") if getattr(u, k)]
            for key in singles:
                members.setdefault(key, []).append(uid)
            if u.gender and u.age:
                members.setdefault(("gender+age", f"{u.gender}, {u.age}"), []).append(uid)
        return [(Group(*k), v) for k, v in members.items() if len(v) >= min_users]

    def demographic_truth(self, users: list[str], k: int = 3) -> list[str]:
        """The group's k most characteristic items: share of members x idf (RecBench+ used TF-IDF)."""
        n_users = len(self.user_ids)
        if not hasattr(self, "_df"):
            self._df = Counter(i for u in self.user_ids for i in set(self.histories[u]))
        tf = Counter(i for u in users for i in set(self.histories[u]))
        score = {i: c / len(users) * math.log(n_users / (1 + self._df[i])) for i, c in tf.items() if c >= 2}
        return sorted(score, key=lambda i: (-score[i], self.w.position[i]))[:k]

    def demographic(self, group: Group, gt: list[str]) -> Query:
        conds = [p for p in self.w.pairs(gt[0]) if all(self.w.items[i].has(*p) for i in gt[1:])]
        text = self.rng.choice(DEMOGRAPHIC).format(g=group_phrase(group))
        G = self.w.items[gt[0]]
        steps = [f"The group is {group_phrase(group)}.", f"This group watches {G.title} the most."]
        return Query("", "demographic", text, None, gt, conds, group=group, gold_reasoning=_gold(steps, G))


def build_queries(
    items: list[Item],
    histories: dict[str, list[str]],
    users: dict[str, User],
    *,
    per_type: int,
    seed: int,
    test_frac: float = 0.2,
    max_gt: int = 10,
    min_group_users: int = 5,
    split_by: str = "component",
) -> tuple[dict[str, list[Query]], dict[str, int]]:
    """Up to `per_type` queries of each type, split into train/test, stratified by type.

    split_by "component" (the default): no test query shares its condition set, its demographic
    group or its ground-truth set with a training query (splits.py); "query": each query on its
    own, the split of the versions before it (same seed, same split), kept to reproduce old figures.
    histories: user_id -> item ids in time order. Returns ({"train": [...], "test": [...]}, report)
    where report counts what was built per type and every skipped attempt per reason.
    The same arguments give the same queries (no set-order or hash-seed dependence).
    """
    if split_by not in SPLIT_MODES:
        raise ValueError(f"split_by {split_by!r}: expected one of {', '.join(SPLIT_MODES)}")
    qb = QueryBuilder(items, histories, users, seed=seed, max_gt=max_gt)
    report: Counter = Counter()
    texts: set[str] = set()
    by_type: dict[str, list[Query]] = {t: [] for t in QUERY_TYPES}

    def keep(q: Query | str, qtype: str) -> None:
        if isinstance(q, str):
            report[f"skipped {qtype}: {q}"] += 1
        elif q.text in texts:  # identical texts would leak across the split
            report[f"skipped {qtype}: duplicate text"] += 1
        else:
            texts.add(q.text)
            by_type[qtype].append(q)

    makers = {"explicit": qb.try_explicit, "implicit": qb.try_implicit,
              "misinformed": qb.try_misinformed, "interest": qb.try_interest}
    if qb.user_ids:
        for qtype, make in makers.items():
            attempts = 0
            while len(by_type[qtype]) < per_type and attempts < 40 * per_type:
                attempts += 1
                keep(make(qb.rng.choice(qb.user_ids)), qtype)

    groups = qb.demographic_groups(min_group_users)
    truths = [(g, qb.demographic_truth(m)) for g, m in groups]
    truths = [(g, gt) for g, gt in truths if gt]
    report["skipped demographic: group without a characteristic item"] += len(groups) - len(truths)
    attempts = 0
    while truths and len(by_type["demographic"]) < per_type and attempts < 40 * per_type:
        attempts += 1
        keep(qb.demographic(*truths[attempts % len(truths)]), "demographic")

    # Split each type; number the queries once the split is fixed (test first, then train).
    rng = random.Random(seed + 1)
    splits: dict[str, list[Query]] = {s: [] for s in SPLITS}
    for qtype, qs in by_type.items():
        report[f"built {qtype}"] = len(qs)
        if split_by == "query":
            rng.shuffle(qs)
            n_test = round(len(qs) * test_frac)
            test, train = qs[:n_test], qs[n_test:]
        else:
            test, train, rep = split_by_component(qs, test_frac, rng)
            for k, v in rep.items():
                report[f"split {qtype}: {k}"] = v
        for k, q in enumerate(test + train):
            split = "test" if k < len(test) else "train"
            q.query_id = f"{split}-{qtype}-{k:05d}"
            splits[split].append(q)
    return splits, dict(sorted(report.items()))


def signature(q: Query) -> tuple:
    """What makes two queries the same question with the same answer, whatever their wording:
    the type and resolved conditions, the anchor of a hop or a false claim, and (interest) the user
    and what they watched next. Demographic queries are told apart by their text only: every group's
    favourites are the same answer, so a group appears in several splits by construction."""
    if q.type == "demographic":
        return (q.type, q.text)
    anchor = q.hop or q.misinformation
    return (q.type, tuple(sorted(map(tuple, q.conditions))), anchor.item_id if anchor else None,
            q.user_id if q.type == "interest" else None, tuple(sorted(q.ground_truth)) if q.type == "interest" else ())


def fresh_queries(items: list[Item], histories: dict[str, list[str]], users: dict[str, User], *,
                  per_type: int, seed: int, exclude: list[Query], max_gt: int = 10) -> list[Query]:
    """Up to `per_type` new queries of each type from a dataset's own catalogue and histories, none of
    them linked to any query in `exclude`: no fresh query shares its condition set, its demographic
    group or its ground-truth set with one of them (splits.link_keys, the links the train/test split
    keeps apart). Warm-start data that neither the RL training queries nor the held-out ones share,
    so SFT can neither memorise their answers nor learn a held-out one. Where every demographic group
    is named by `exclude` (the bundled set, MovieLens), no fresh query is demographic. Two fresh
    queries are never the same question (`signature`)."""
    banned = {link for q in exclude for link in link_keys(q).items()}
    built, _ = build_queries(items, histories, users, per_type=per_type, seed=seed, test_frac=0.0, max_gt=max_gt,
                             split_by="query")
    out, asked = [], set()
    for k, q in enumerate(built["train"]):
        if signature(q) not in asked and not banned.intersection(link_keys(q).items()):
            asked.add(signature(q))
            q.query_id = f"fresh-{seed}-{k:05d}"
            out.append(q)
    return out
