"""The dataset format: items, interactions, users and queries — loaded and validated.

A dataset is a directory (spec: data/README.md):
    items.jsonl  interactions.tsv  [users.jsonl]  queries/train.jsonl  queries/test.jsonl
`load_dataset(path)` reads it into small dataclasses and checks every rule the later
stages rely on (ground truth exists and satisfies the conditions, hops and false facts
agree with the catalogue, ...). Any violation raises `DataError("file:line: field: why")`.
Builders (synth.py, sources.py) and their command line (datasets.py) come later in the data flow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

QUERY_TYPES = ("explicit", "implicit", "misinformed", "interest", "demographic")
SPLITS = ("train", "test")


class DataError(ValueError):
    """A dataset file breaks the format. The message starts with `file:line:`."""


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Item:
    item_id: str
    title: str  # "Name (Year)"
    attributes: dict[str, list[str]]  # relation -> values, e.g. {"genre": ["War", "Drama"]}

    def has(self, relation: str, value: str) -> bool:
        return value in self.attributes.get(relation, ())


@dataclass(frozen=True)
class Hop:
    """Implicit query: the condition (relation, value) is named through `item_id`."""

    item_id: str
    relation: str
    value: str


@dataclass(frozen=True)
class Misinformation:
    """Misinformed query: the request claims `item_id` has (relation, wrong_value)."""

    item_id: str
    relation: str
    wrong_value: str
    true_value: str


@dataclass(frozen=True)
class Group:
    """Demographic query: the user group, e.g. Group("age", "25-34")."""

    type: str
    value: str


@dataclass
class Query:
    query_id: str
    type: str  # one of QUERY_TYPES
    text: str
    user_id: str | None
    ground_truth: list[str]  # >= 1 item ids; ground_truth[0] is the primary item
    conditions: list[tuple[str, str]]  # (relation, value) pairs every ground-truth item has
    hop: Hop | None = None
    misinformation: Misinformation | None = None
    group: Group | None = None
    history: list[str] = field(default_factory=list)
    gold_reasoning: str | None = None
    meta: dict = field(default_factory=dict)  # provenance (builder, source record); never read by training

    def to_json(self) -> dict:
        out = {
            "query_id": self.query_id,
            "type": self.type,
            "text": self.text,
            "user_id": self.user_id,
            "ground_truth": list(self.ground_truth),
            "conditions": [list(c) for c in self.conditions],
        }
        if self.hop:
            out["hop"] = {"item_id": self.hop.item_id, "relation": self.hop.relation, "value": self.hop.value}
        if self.misinformation:
            m = self.misinformation
            out["misinformation"] = {
                "item_id": m.item_id, "relation": m.relation,
                "wrong_value": m.wrong_value, "true_value": m.true_value,
            }
        if self.group:
            out["group"] = {"type": self.group.type, "value": self.group.value}
        if self.history:
            out["history"] = list(self.history)
        if self.gold_reasoning is not None:
            out["gold_reasoning"] = self.gold_reasoning
        if self.meta:
            out["meta"] = self.meta
        return out


@dataclass(frozen=True)
class User:
    user_id: str
    gender: str | None = None
    age: str | None = None
    occupation: str | None = None


@dataclass
class Interactions:
    """All (user, item) events as index arrays, in file order.

    users: [N] int32 rows into `user_ids`;  items: [N] int32 rows into Dataset.item_ids
    timestamps: [N] int64 or None;  ratings: [N] float32 or None
    """

    user_ids: list[str]
    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray | None = None
    ratings: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.users)

    def matrix(self, num_items: int) -> sp.csr_matrix:
        """Binary users x items CSR matrix [U, I] (repeated events count once)."""
        m = sp.csr_matrix(
            (np.ones(len(self.users), np.float32), (self.users, self.items)),
            shape=(len(self.user_ids), num_items),
        )
        m.data[:] = 1.0  # duplicates were summed by the constructor
        return m


@dataclass
class Dataset:
    path: Path
    items: dict[str, Item]  # in items.jsonl order
    queries: dict[str, list[Query]]  # split -> queries
    users: dict[str, User]
    interactions: Interactions

    def __post_init__(self):
        self.item_ids: list[str] = list(self.items)
        self.item_index: dict[str, int] = {iid: i for i, iid in enumerate(self.item_ids)}
        self._matrix: sp.csr_matrix | None = None
        self._popularity: np.ndarray | None = None
        self._histories: dict[str, list[str]] | None = None

    @property
    def matrix(self) -> sp.csr_matrix:
        """The interaction graph, users x items [U, I], binary CSR (built once)."""
        if self._matrix is None:
            self._matrix = self.interactions.matrix(len(self.item_ids))
        return self._matrix

    @property
    def popularity(self) -> np.ndarray:
        """[I] number of users who interacted with each item (computed once: baselines read it per query)."""
        if self._popularity is None:
            self._popularity = np.asarray(self.matrix.sum(axis=0)).ravel()
        return self._popularity

    def history(self, user_id: str) -> list[str]:
        """A user's items in time order (file order where there are no timestamps)."""
        if self._histories is None:
            ix = self.interactions
            order = np.argsort(ix.timestamps, kind="stable") if ix.timestamps is not None else np.arange(len(ix))
            hist: dict[str, list[str]] = {}
            for u, i in zip(ix.users[order].tolist(), ix.items[order].tolist()):
                hist.setdefault(ix.user_ids[u], []).append(self.item_ids[i])
            self._histories = hist
        return self._histories.get(user_id, [])

    def all_queries(self) -> list[Query]:
        return [q for split in self.queries.values() for q in split]

    def summary(self) -> str:
        lines = [
            f"{self.path}: {len(self.items)} items, {len(self.interactions.user_ids)} users with interactions, "
            f"{len(self.interactions)} interactions, {len(self.users)} user profiles"
        ]
        for split, qs in self.queries.items():
            counts = {t: 0 for t in QUERY_TYPES}
            for q in qs:
                counts[q.type] += 1
            lines.append(f"  {split:5s} {len(qs):6d} queries  " + "  ".join(f"{t}={n}" for t, n in counts.items()))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- validation helpers


class _Where:
    """Builds `file:line: field: message` errors for one record."""

    def __init__(self, file: str, line: int):
        self.file, self.line = file, line

    def error(self, fld: str | None, msg: str) -> DataError:
        return DataError(f"{self.file}:{self.line}: {fld + ': ' if fld else ''}{msg}")

    def str_field(self, rec: dict, key: str, *, optional: bool = False, nullable: bool = False) -> str | None:
        if key not in rec:
            if optional:
                return None
            raise self.error(key, "missing required field")
        v = rec[key]
        if v is None and nullable:
            return None
        if not isinstance(v, str) or not v.strip():
            raise self.error(key, f"expected a non-empty string, got {json.dumps(v)[:60]}")
        return v

    def str_list(self, v, fld: str, *, nonempty: bool = False) -> list[str]:
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise self.error(fld, f"expected a list of non-empty strings, got {json.dumps(v)[:60]}")
        if nonempty and not v:
            raise self.error(fld, "must not be empty")
        return v

    def obj(self, rec: dict, key: str, keys: tuple[str, ...]) -> dict | None:
        v = rec.get(key)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise self.error(key, f"expected an object with {', '.join(keys)}")
        for k in keys:
            if not isinstance(v.get(k), str) or not v[k]:
                raise self.error(f"{key}.{k}", "missing or not a non-empty string")
        extra = set(v) - set(keys)
        if extra:
            raise self.error(key, f"unknown field(s) {sorted(extra)}")
        return v


def _read_jsonl(path: Path):
    """Yield (where, record) for each non-blank line; bad JSON or a non-object is a DataError."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = _Where(path.name if path.parent.name != "queries" else f"queries/{path.name}", n)
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                at = "" if e.msg.endswith(" at") else " at"  # "Unterminated string starting at" + column
                raise where.error(None, f"invalid JSON ({e.msg}{at} column {e.colno})") from None
            if not isinstance(rec, dict):
                raise where.error(None, "expected a JSON object")
            yield where, rec


# ----------------------------------------------------------------------------- loaders


def _load_items(path: Path) -> dict[str, Item]:
    items: dict[str, Item] = {}
    for where, rec in _read_jsonl(path):
        iid = where.str_field(rec, "item_id")
        title = where.str_field(rec, "title")
        attrs = rec.get("attributes", {})
        if not isinstance(attrs, dict):
            raise where.error("attributes", "expected an object relation -> [values]")
        for rel, vals in attrs.items():
            where.str_list(vals, f"attributes.{rel}")
        extra = set(rec) - {"item_id", "title", "attributes"}
        if extra:
            raise where.error(None, f"unknown field(s) {sorted(extra)}")
        if iid in items:
            raise where.error("item_id", f"duplicate id {iid!r}")
        items[iid] = Item(iid, title, attrs)
    if not items:
        raise DataError(f"{path.name}: no items")
    return items


def _load_users(path: Path) -> dict[str, User]:
    users: dict[str, User] = {}
    if not path.exists():
        return users
    for where, rec in _read_jsonl(path):
        uid = where.str_field(rec, "user_id")
        extra = set(rec) - {"user_id", "gender", "age", "occupation"}
        if extra:
            raise where.error(None, f"unknown field(s) {sorted(extra)}")
        vals = {k: where.str_field(rec, k, optional=True, nullable=True) for k in ("gender", "age", "occupation")}
        if uid in users:
            raise where.error("user_id", f"duplicate id {uid!r}")
        users[uid] = User(uid, **vals)
    return users


def _load_interactions(path: Path, item_index: dict[str, int]) -> Interactions:
    name = path.name
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        known = ["user_id", "item_id", "timestamp", "rating"]
        if header[:2] != known[:2] or any(h not in known[2:] for h in header[2:]) or len(set(header)) != len(header):
            raise DataError(
                f"{name}:1: header: expected 'user_id<TAB>item_id[<TAB>timestamp][<TAB>rating]', got {header!r}"
            )
        col_ts = header.index("timestamp") if "timestamp" in header else None
        col_r = header.index("rating") if "rating" in header else None
        user_index: dict[str, int] = {}
        users, items, ts, ratings = [], [], [], []
        ncol = len(header)
        for n, line in enumerate(f, 2):
            parts = line.rstrip("\n").split("\t")
            if parts == [""]:
                continue
            if len(parts) != ncol:
                raise DataError(f"{name}:{n}: expected {ncol} tab-separated fields, got {len(parts)}")
            u, i = parts[0], parts[1]
            if not u:
                raise DataError(f"{name}:{n}: user_id: empty")
            ii = item_index.get(i)
            if ii is None:
                raise DataError(f"{name}:{n}: item_id: {i!r} is not in items.jsonl")
            users.append(user_index.setdefault(u, len(user_index)))
            items.append(ii)
            try:
                if col_ts is not None:
                    ts.append(int(parts[col_ts]))
                if col_r is not None:
                    ratings.append(float(parts[col_r]))
            except ValueError:
                fld = "timestamp" if col_ts is not None and not parts[col_ts].lstrip("-").isdigit() else "rating"
                raise DataError(f"{name}:{n}: {fld}: not a number: {parts[header.index(fld)]!r}") from None
    return Interactions(
        user_ids=list(user_index),
        users=np.asarray(users, np.int32),
        items=np.asarray(items, np.int32),
        timestamps=np.asarray(ts, np.int64) if col_ts is not None else None,
        ratings=np.asarray(ratings, np.float32) if col_r is not None else None,
    )


_QUERY_FIELDS = {
    "query_id", "type", "text", "user_id", "ground_truth", "conditions",
    "hop", "misinformation", "group", "history", "gold_reasoning", "meta",
}


def _parse_query(where: _Where, rec: dict, items: dict[str, Item]) -> Query:
    extra = set(rec) - _QUERY_FIELDS
    if extra:
        raise where.error(None, f"unknown field(s) {sorted(extra)}")
    qid = where.str_field(rec, "query_id")
    qtype = where.str_field(rec, "type")
    if qtype not in QUERY_TYPES:
        raise where.error("type", f"unknown type {qtype!r} (expected one of {', '.join(QUERY_TYPES)})")
    text = where.str_field(rec, "text")
    if "user_id" not in rec:
        raise where.error("user_id", "missing required field (use null when there is no user)")
    user_id = where.str_field(rec, "user_id", nullable=True)

    if "ground_truth" not in rec:
        raise where.error("ground_truth", "missing required field")
    gt = where.str_list(rec["ground_truth"], "ground_truth", nonempty=True)
    for k, iid in enumerate(gt):
        if iid not in items:
            raise where.error(f"ground_truth[{k}]", f"item {iid!r} is not in items.jsonl")
    if len(set(gt)) != len(gt):
        raise where.error("ground_truth", "repeated item id")

    if "conditions" not in rec:
        raise where.error("conditions", "missing required field (use [] when there are none)")
    raw = rec["conditions"]
    if not isinstance(raw, list) or not all(
        isinstance(c, list) and len(c) == 2 and all(isinstance(x, str) and x for x in c) for c in raw
    ):
        raise where.error("conditions", "expected a list of [relation, value] string pairs")
    conditions = [(r, v) for r, v in raw]
    for k, (r, v) in enumerate(conditions):
        for iid in gt:
            if not items[iid].has(r, v):
                raise where.error(
                    f"conditions[{k}]", f"ground-truth item {iid!r} ({items[iid].title}) lacks ({r}, {v})"
                )

    hop = where.obj(rec, "hop", ("item_id", "relation", "value"))
    if hop:
        hop = Hop(hop["item_id"], hop["relation"], hop["value"])
        if hop.item_id not in items:
            raise where.error("hop.item_id", f"item {hop.item_id!r} is not in items.jsonl")
        if not items[hop.item_id].has(hop.relation, hop.value):
            raise where.error("hop", f"item {hop.item_id!r} does not have ({hop.relation}, {hop.value})")
        for iid in gt:
            if not items[iid].has(hop.relation, hop.value):
                raise where.error("hop", f"ground-truth item {iid!r} lacks the hop's ({hop.relation}, {hop.value})")
    elif qtype == "implicit":
        raise where.error("hop", "an implicit query needs its hop {item_id, relation, value}")

    mis = where.obj(rec, "misinformation", ("item_id", "relation", "wrong_value", "true_value"))
    if mis:
        mis = Misinformation(mis["item_id"], mis["relation"], mis["wrong_value"], mis["true_value"])
        if mis.item_id not in items:
            raise where.error("misinformation.item_id", f"item {mis.item_id!r} is not in items.jsonl")
        anchor = items[mis.item_id]
        if not anchor.has(mis.relation, mis.true_value):
            raise where.error("misinformation.true_value", f"{anchor.title} does not have ({mis.relation}, {mis.true_value})")
        if anchor.has(mis.relation, mis.wrong_value):
            raise where.error("misinformation.wrong_value", f"the claim is true: {anchor.title} has ({mis.relation}, {mis.wrong_value})")
    elif qtype == "misinformed":
        raise where.error("misinformation", "a misinformed query needs {item_id, relation, wrong_value, true_value}")

    group = where.obj(rec, "group", ("type", "value"))
    if group:
        group = Group(group["type"], group["value"])
    elif qtype == "demographic":
        raise where.error("group", "a demographic query needs its group {type, value}")

    history = where.str_list(rec.get("history", []), "history")
    for k, iid in enumerate(history):
        if iid not in items:
            raise where.error(f"history[{k}]", f"item {iid!r} is not in items.jsonl")
    gold = where.str_field(rec, "gold_reasoning", optional=True, nullable=True)
    if gold is not None and "\\boxed{" not in gold:
        raise where.error("gold_reasoning", "must end with \\boxed{Title (Year)}")
    meta = rec.get("meta", {})
    if not isinstance(meta, dict):
        raise where.error("meta", "expected an object")
    return Query(qid, qtype, text, user_id, gt, conditions, hop, mis, group, history, gold, meta)


def load_dataset(path: str | Path) -> Dataset:
    """Read and validate a dataset directory. Raises DataError naming file:line: field."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: not a dataset directory")
    for required in ("items.jsonl", "interactions.tsv"):
        if not (root / required).exists():
            raise DataError(f"{root}: missing {required} (format: data/README.md)")
    items = _load_items(root / "items.jsonl")
    users = _load_users(root / "users.jsonl")
    interactions = _load_interactions(root / "interactions.tsv", {iid: i for i, iid in enumerate(items)})
    queries: dict[str, list[Query]] = {}
    seen: dict[str, str] = {}
    for split in SPLITS:
        qpath = root / "queries" / f"{split}.jsonl"
        if not qpath.exists():
            raise DataError(f"{root}: missing queries/{split}.jsonl")
        queries[split] = []
        for where, rec in _read_jsonl(qpath):
            q = _parse_query(where, rec, items)
            if q.query_id in seen:
                raise where.error("query_id", f"duplicate id {q.query_id!r} (first seen in {seen[q.query_id]})")
            seen[q.query_id] = f"queries/{split}.jsonl:{where.line}"
            queries[split].append(q)
    return Dataset(root, items, queries, users, interactions)


# ----------------------------------------------------------------------------- writer


def _jsonl(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, separators=(", ", ": ")) + "\n")


def write_dataset(
    out: str | Path,
    items: list[Item],
    interactions: list[tuple],  # (user_id, item_id[, timestamp][, rating]) rows
    queries: dict[str, list[Query]],
    users: list[User] | None = None,
    interaction_columns: tuple[str, ...] = ("user_id", "item_id", "timestamp"),
) -> Path:
    """Write a dataset directory deterministically (same inputs -> byte-identical files)."""
    root = Path(out)
    (root / "queries").mkdir(parents=True, exist_ok=True)
    _jsonl(root / "items.jsonl", ({"item_id": it.item_id, "title": it.title, "attributes": it.attributes} for it in items))
    with open(root / "interactions.tsv", "w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(interaction_columns) + "\n")
        f.writelines("\t".join(str(x) for x in row) + "\n" for row in interactions)
    if users:
        _jsonl(
            root / "users.jsonl",
            ({k: v for k, v in vars(u).items() if v is not None} for u in users),
        )
    for split in SPLITS:
        _jsonl(root / "queries" / f"{split}.jsonl", (q.to_json() for q in queries.get(split, [])))
    return root
