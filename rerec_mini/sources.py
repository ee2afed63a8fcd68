"""Builders from real data: MovieLens-1M (+ movie metadata) and published RecBench+ query files.

    python -m rerec_mini.datasets movielens --ml1m DIR --metadata FILE --out DIR
    python -m rerec_mini.datasets recbench  --recbench DIR --ml1m DIR [--metadata FILE] --out DIR

Both read the files as their owners distribute them and write a dataset directory
(data/README.md). Nothing is dropped silently: every skipped line, title, condition or
query is counted in the printed report. The files themselves are never redistributed.

MovieLens inputs (found in --ml1m DIR by name, or given by flag):
    movies.dat    `MovieID::Title (Year)::Genre|Genre`, latin-1 (UTF-8 also accepted)
    users.dat     `UserID::Gender::Age::Occupation::Zip`; codes become readable labels
    ratings       `UserID::MovieID::Rating::Timestamp` (ratings.dat, or ratings*.dat[.gz])
    interactions  `user_id<TAB>item_id` pairs, header optional (interactions*.tsv[.gz])
Any file may be gzipped. Ratings and pairs may be combined, as in the dev pack (full
ratings for some users, time-less pairs for all): a user with ratings gets their rated
events with time and rating, and their pairs that repeat a rating are dropped (counted).

Time-less events. interactions.tsv has the columns user_id, item_id, timestamp, rating,
and data.py requires every column on every row. A pair with no known time gets
`timestamp` = its position among the time-less rows read (1, 2, 3, ...) and `rating` = nan.
The position keeps each user's file order (so `Dataset.history` is right), and it is far
below any real MovieLens time (>= 956,703,932, April 2000), so it cannot pass for a date.
A rated user's extra pairs (pairs not in their ratings) would thus sort before their rated
events; they are counted in the report (none in the official files).

Metadata (`--metadata`, e.g. movies_extrainfos.dat): UTF-8, `::`-separated, 11 fields
`movie_id::title::year::mpaa::released::genres::directors::writers::actors::plot::poster`,
comma lists, `N/A` for missing; roles in parentheses ("Jim Strain (screenplay)") are cut.
Items get relations genre (MovieLens genres, then the metadata's others), director,
writer, starring (top-billed first), year and decade (from the MovieLens title).
"""

from __future__ import annotations

import gzip
import json
import random
import re
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from .data import QUERY_TYPES, SPLITS, DataError, Group, Hop, Item, Misinformation, Query, User, write_dataset
from .splits import OVERLAPS, add_split_argument, overlaps
from .titles import TitleIndex, split_title

GENDERS = {"F": "female", "M": "male"}
# users.dat codes, from the MovieLens-1M README.
AGES = {"1": "under 18", "18": "18-24", "25": "25-34", "35": "35-44", "45": "45-49", "50": "50-55", "56": "56+"}
OCCUPATIONS = {
    "0": "other", "1": "academic/educator", "2": "artist", "3": "clerical/admin", "4": "college/grad student",
    "5": "customer service", "6": "doctor/health care", "7": "executive/managerial", "8": "farmer",
    "9": "homemaker", "10": "K-12 student", "11": "lawyer", "12": "programmer", "13": "retired",
    "14": "sales/marketing", "15": "scientist", "16": "self-employed", "17": "technician/engineer",
    "18": "tradesman/craftsman", "19": "unemployed", "20": "writer",
}
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp", "rating")
# Relations a RecBench+ ground-truth set is described by (conditions). "year" is left out:
# "decade" says the same, less narrowly (as in querygen.py).
SHARED_RELATIONS = ("genre", "director", "writer", "starring", "decade")
# How the report names each overlap of a kept (published) split (splits.py).
OVERLAP_WHAT = {"conditions": "(type, condition set)", "group": "group", "answers": "(type, ground-truth set)"}


class Report:
    """Ordered counts of what was read, built and skipped, with the first example of each."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.examples: dict[str, str] = {}

    def add(self, key: str, n: int = 1, example: str | None = None) -> None:
        self.counts[key] = self.counts.get(key, 0) + n
        if example is not None and key not in self.examples:
            self.examples[key] = example

    def __getitem__(self, key: str) -> int:
        return self.counts.get(key, 0)

    def print(self, title: str) -> None:
        print(title)
        for k, v in self.counts.items():
            ex = f"   e.g. {self.examples[k]}" if k in self.examples else ""
            print(f"  {k}: {v}{ex}")


# ----------------------------------------------------------------------------- reading files


def _read_lines(path: Path) -> list[str]:
    """All lines of a text file, gunzipped if it is gzip; UTF-8, else latin-1 (MovieLens' own)."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # every byte is a latin-1 character: never fails
    return text.splitlines()


def read_movies(path: Path, report: Report) -> list[tuple[str, str, list[str]]]:
    """movies.dat -> [(movie_id, title, genres)] in file order."""
    out, seen = [], set()
    for n, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        parts = line.split("::")
        if len(parts) != 3 or not parts[0].strip().isdigit() or not parts[1].strip():
            report.add("skipped: malformed movies lines", example=f"{path.name}:{n}: {line[:60]!r}")
            continue
        mid, title, genres = parts[0].strip(), parts[1].strip(), parts[2].strip()
        if mid in seen:
            report.add("skipped: duplicate movie ids", example=f"{path.name}:{n}: {mid}")
            continue
        seen.add(mid)
        out.append((mid, title, [g for g in genres.split("|") if g and g != "(no genres listed)"]))
    if not out:
        raise DataError(f"{path}: no movies in the MovieLens format MovieID::Title (Year)::Genre|Genre")
    return out


def read_users(path: Path, report: Report) -> list[User]:
    """users.dat -> [User] with readable labels ("female", "25-34", "programmer")."""
    users = []
    for n, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        parts = line.split("::")
        if len(parts) < 4 or not parts[0].strip():
            report.add("skipped: malformed users lines", example=f"{path.name}:{n}: {line[:60]!r}")
            continue
        uid, g, a, o = (p.strip() for p in parts[:4])
        for code, table, what in ((g, GENDERS, "gender"), (a, AGES, "age"), (o, OCCUPATIONS, "occupation")):
            if code and code not in table:
                report.add(f"users: unknown {what} code (kept as is)", example=f"{path.name}:{n}: {code!r}")
        users.append(User(uid, GENDERS.get(g, g or None), AGES.get(a, a or None), OCCUPATIONS.get(o, o or None)))
    return users


def read_ratings(path: Path, report: Report) -> list[tuple[str, str, int, float]]:
    """ratings.dat -> [(user, movie, timestamp, rating)] in file order."""
    out = []
    for n, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        parts = line.split("::")
        try:
            if len(parts) != 4:
                raise ValueError
            out.append((parts[0].strip(), parts[1].strip(), int(parts[3]), float(parts[2])))
        except ValueError:
            report.add("skipped: malformed ratings lines", example=f"{path.name}:{n}: {line[:60]!r}")
    return out


def read_pairs(path: Path, report: Report) -> list[tuple[str, str]]:
    """`user<TAB>item` lines (a header line is recognised by a non-numeric item column)."""
    out = []
    for n, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 2:
            report.add("skipped: malformed interactions lines", example=f"{path.name}:{n}: {line[:60]!r}")
            continue
        if n == 1 and not parts[1].strip().isdigit():
            continue  # header
        if len(parts) > 2:
            report.add("interactions: extra columns ignored (lines)")
        out.append((parts[0].strip(), parts[1].strip()))
    return out


def _people(field: str) -> list[str]:
    """'Jim Strain (screenplay), Greg Taylor (story), Jim Strain (book)' -> ['Jim Strain', 'Greg Taylor']."""
    names = (re.sub(r"\s*\([^)]*\)", "", x).strip() for x in field.split(","))
    return list(dict.fromkeys(n for n in names if n and n != "N/A"))


@dataclass
class Metadata:
    title: str
    genres: list[str]
    directors: list[str]
    writers: list[str]
    actors: list[str]


def read_metadata(path: Path, report: Report) -> dict[str, Metadata]:
    """movies_extrainfos.dat -> movie_id -> Metadata."""
    out: dict[str, Metadata] = {}
    for n, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        f = line.split("::")
        if len(f) != 11 or not f[0].strip().isdigit():
            report.add("skipped: malformed metadata lines", example=f"{path.name}:{n}: {len(f)} fields")
            continue
        genres = [g.strip() for g in f[5].split(",") if g.strip() and g.strip() != "N/A"]
        out[f[0].strip()] = Metadata(f[1].strip(), genres, _people(f[6]), _people(f[7]), _people(f[8]))
    return out


# ----------------------------------------------------------------------------- MovieLens


@dataclass
class MovieLens:
    """Everything read from MovieLens, ready for write_dataset and the query generator."""

    items: list[Item]
    rows: list[tuple[str, str, int, float]]  # interactions.tsv rows, INTERACTION_COLUMNS
    histories: dict[str, list[str]]  # user -> item ids in time order
    users: list[User]
    report: Report = field(default_factory=Report)


def find_inputs(ml1m: Path | None, ratings=None, interactions=None) -> dict:
    """Locate the MovieLens files: explicit lists win; else look in `ml1m` by name."""
    d = Path(ml1m) if ml1m else None
    if d is not None and not d.is_dir():
        raise DataError(f"{d}: not a directory (expected the MovieLens-1M folder)")

    def first(*names):
        for name in names:
            if d is not None and (d / name).exists():
                return d / name
        return None

    movies = first("movies.dat", "movies.dat.gz")
    if movies is None:
        raise DataError(f"{d}: no movies.dat (MovieLens-1M `MovieID::Title (Year)::Genre|Genre`)")
    if not ratings and not interactions and d is not None:
        one = first("ratings.dat", "ratings.dat.gz")
        ratings = [one] if one else sorted(set(d.glob("ratings*.dat")) | set(d.glob("ratings*.dat.gz")))
        interactions = sorted(set(d.glob("interactions*.tsv")) | set(d.glob("interactions*.tsv.gz")))
    ratings, interactions = [Path(p) for p in ratings or []], [Path(p) for p in interactions or []]
    if not ratings and not interactions:
        raise DataError(f"{d}: no ratings.dat, ratings*.dat.gz or interactions*.tsv[.gz] (or pass --ratings/--interactions)")
    return {"movies": movies, "users": first("users.dat", "users.dat.gz"), "ratings": ratings, "interactions": interactions}


def _items(movies, meta: dict[str, Metadata] | None, report: Report) -> list[Item]:
    items = []
    for mid, title, genres in movies:
        attrs: dict[str, list[str]] = {}
        m = meta.get(mid) if meta is not None else None
        # MovieLens genres first, in MovieLens spelling ("Children's"); then the metadata's
        # other genres (IMDb: "Family", "Biography", ...). Same names are the same genre.
        attrs["genre"] = list(dict.fromkeys(genres + (m.genres if m else [])))
        if m:
            for rel, vals in (("director", m.directors), ("writer", m.writers), ("starring", m.actors)):
                if vals:
                    attrs[rel] = vals
        _, _, year = split_title(title)
        if year is not None:
            attrs["year"] = [str(year)]
            attrs["decade"] = [f"{year // 10 * 10}s"]
        else:
            report.add("items: no year in the title", example=title)
        items.append(Item(mid, title, {r: v for r, v in attrs.items() if v}))
    if meta is not None:
        ids = {mid for mid, _, _ in movies}
        report.add("items with metadata", sum(mid in meta for mid in ids))
        missing = sorted(ids - set(meta), key=int)
        report.add("items without metadata (kept, MovieLens genres and year only)", len(missing),
                   example=", ".join(missing[:5]) if missing else None)
        report.add("metadata rows for unknown movie ids (ignored)", len(set(meta) - ids))
    return items


def load_movielens(ml1m=None, *, metadata=None, ratings=None, interactions=None) -> MovieLens:
    """Read MovieLens-1M (+ optional metadata) into items, interaction rows, histories and users."""
    report = Report()
    files = find_inputs(ml1m, ratings, interactions)
    movies = read_movies(files["movies"], report)
    if metadata and not Path(metadata).is_file():
        raise DataError(f"{metadata}: no such metadata file")
    meta = read_metadata(Path(metadata), report) if metadata else None
    items = _items(movies, meta, report)
    known = {it.item_id for it in items}
    users = read_users(files["users"], report) if files["users"] else []
    if not files["users"]:
        report.add("users.dat not found: no demographics, no demographic queries")

    rows: list[tuple[str, str, int, float]] = []
    rated: dict[str, list[tuple[int, int, str]]] = {}  # user -> (timestamp, file position, item)
    for path in files["ratings"]:
        for u, i, ts, r in read_ratings(path, report):
            if i not in known:
                report.add("skipped: ratings of movies not in movies.dat", example=f"{u}::{i}")
                continue
            rated.setdefault(u, []).append((ts, len(rows), i))
            rows.append((u, i, ts, r))
    report.add("interactions from ratings (with time and rating)", len(rows))

    rated_pairs = {(u, i) for u, evs in rated.items() for _, _, i in evs}
    timeless: dict[str, list[str]] = {}
    position = 0
    for path in files["interactions"]:
        for u, i in read_pairs(path, report):
            if i not in known:
                report.add("skipped: interaction pairs of movies not in movies.dat", example=f"{u}\t{i}")
                continue
            if (u, i) in rated_pairs:
                report.add("interaction pairs already in the ratings (dropped as duplicates)")
                continue
            if u in rated:
                report.add("interaction pairs of rated users missing from their ratings (kept; sort first)")
            position += 1
            timeless.setdefault(u, []).append(i)
            rows.append((u, i, position, float("nan")))
    report.add("interactions from pairs only (timestamp = position, rating = nan)", position)

    histories = {u: [i for _, _, i in sorted(evs)] for u, evs in rated.items()}
    for u, its in timeless.items():
        histories[u] = its + histories.get(u, [])  # time-less positions sort before real times
    report.add("interactions", len(rows))
    report.add("users with interactions", len(histories))
    report.add("user profiles (users.dat)", len(users))
    no_profile = len(set(histories) - {u.user_id for u in users}) if users else 0
    if no_profile:
        report.add("users with interactions but no profile", no_profile)
    return MovieLens(items, rows, histories, users, report)


def build_movielens(out, ml1m=None, *, metadata=None, ratings=None, interactions=None, per_type: int = 600,
                    seed: int = 0, test_frac: float = 0.2, max_gt: int = 10, split_by: str = "component") -> Report:
    """Read MovieLens, generate all five query types from real histories, write the dataset
    (split by component unless split_by="query": querygen.build_queries)."""
    from .querygen import build_queries  # the generator shared with the synthetic world

    t0 = time.perf_counter()
    ml = load_movielens(ml1m, metadata=metadata, ratings=ratings, interactions=interactions)
    rep = ml.report
    rep.add("items", len(ml.items))
    t1 = time.perf_counter()
    queries, qreport = build_queries(ml.items, ml.histories, {u.user_id: u for u in ml.users},
                                     per_type=per_type, seed=seed, test_frac=test_frac, max_gt=max_gt,
                                     split_by=split_by)
    for k, v in qreport.items():
        rep.add(f"queries: {k}", v)
    for split in SPLITS:
        for t in QUERY_TYPES:
            rep.add(f"queries {split} {t}", sum(q.type == t for q in queries[split]))
    write_dataset(out, ml.items, ml.rows, queries, ml.users, INTERACTION_COLUMNS)
    rep.add("seconds reading MovieLens", round(t1 - t0, 1))
    rep.add("seconds total", round(time.perf_counter() - t0, 1))
    return rep


# ----------------------------------------------------------------------------- RecBench+

# RecBench+ relation names (its Neo4j graph: "Directed_by", "Starring", "Genre", ...) ->
# ours, compared with case, spaces and underscores removed. Others ("Music_by",
# "Produced_by") have no counterpart in the catalogue: those conditions are dropped, counted.
RELATION_ALIASES = {
    "genre": "genre", "genres": "genre", "hasgenre": "genre", "ingenre": "genre", "belongsto": "genre",
    "director": "director", "directedby": "director", "directed": "director", "directors": "director",
    "writer": "writer", "writtenby": "writer", "wrote": "writer", "writers": "writer",
    "starring": "starring", "actor": "starring", "actors": "starring", "actedin": "starring",
    "star": "starring", "stars": "starring", "cast": "starring",
    "decade": "decade", "year": "year", "releaseyear": "year", "releasedin": "year",
}
# File kinds, recognised by the fields of a record (file names vary between releases).
_KIND_BY_FIELD = (
    ("group_type", "demographic"),
    ("Shared consecutive movies", "interest"),
    ("misinformed", "misinformed"),
    ("multihop_info", "implicit"),
    ("direct_description_query", "explicit"),
)
_BOOK_FIELDS = ("book", "bookSubset", "bookSubsetId", "Shared consecutive books", "book subset")


def _canon(s: str) -> str:
    """Case- and accent-free form for comparing attribute values ('Pedro Almodóvar')."""
    s = unicodedata.normalize("NFKD", str(s)).casefold()
    return " ".join("".join(c for c in s if not unicodedata.combining(c)).split())


def relation_name(name) -> str | None:
    return RELATION_ALIASES.get(re.sub(r"[\s_\-]+", "", str(name)).lower())


def _group(group_type, group) -> Group:
    """('age_gender', ['25-34', 'Male']) -> Group('age+gender', '25-34, male'), in users.jsonl labels."""
    labels = {v.casefold(): v for table in (GENDERS, AGES, OCCUPATIONS) for v in table.values()}
    values = group if isinstance(group, list) else [group]
    types = str(group_type).replace("_", "+")
    return Group(types, ", ".join(labels.get(str(v).strip().casefold(), str(v).strip()) for v in values))


class _Converter:
    """Maps RecBench+ records onto the MovieLens catalogue, checking every claim against it."""

    def __init__(self, items: list[Item], report: Report, histories: dict[str, list[str]] | None = None):
        self.items = {it.item_id: it for it in items}
        self.histories = histories or {}
        self.index = TitleIndex(items)
        self.report = report

    # --- titles and ids
    def titles(self, titles, kind: str) -> list[str]:
        """Map titles to ids (first occurrence kept), counting what does not map."""
        if isinstance(titles, str):
            titles = titles.split(";")
        ids: list[str] = []
        for t in titles or []:
            iid = self.index.match(t) if isinstance(t, str) else None
            self.report.add(f"{kind}: titles mapped" if iid else f"{kind}: titles not in MovieLens",
                            example=None if iid else repr(t))
            if iid and iid not in ids:
                ids.append(iid)
        return ids

    def ids_or_titles(self, rec: dict, kind: str) -> list[str]:
        """Ground truth of a condition-based record: movieSubsetId (MovieLens ids) if usable, else titles."""
        raw = rec.get("movieSubsetId")
        if isinstance(raw, list) and raw:
            ids = list(dict.fromkeys(str(x) for x in raw if str(x) in self.items))
            self.report.add(f"{kind}: ground-truth ids mapped", len(ids))
            if len(ids) < len(raw):
                self.report.add(f"{kind}: ground-truth ids not in MovieLens", len(raw) - len(ids))
            if ids:
                return ids
        return self.titles(rec.get("movieSubset", []), kind)

    # --- relations and values
    def value(self, item_id: str, relation: str, value) -> str | None:
        """The catalogue's spelling of `value` if the item has it (case/accent-insensitive)."""
        it = self.items.get(item_id)
        if it is None or value is None:
            return None
        for v in it.attributes.get(relation, ()):
            if _canon(v) == _canon(value):
                return v
        return None

    def verified(self, pairs, gt: list[str], kind: str) -> list[tuple[str, str]]:
        """Conditions, given as [relation, value] pairs (or {relation, value} objects), that
        every ground-truth item has; the others are dropped and counted."""
        out: list[tuple[str, str]] = []
        for p in pairs or []:
            if isinstance(p, dict):
                p = (p.get("relation", p.get("type")), p.get("value", p.get("name", p.get("person"))))
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                self.report.add(f"{kind}: conditions unreadable (dropped)", example=repr(p)[:60])
                continue
            rel = relation_name(p[0])
            if rel is None:
                self.report.add(f"{kind}: conditions on relations the catalogue lacks (dropped)", example=repr(p[0]))
                continue
            spelled = [self.value(i, rel, p[1]) for i in gt]
            if any(s is None for s in spelled) or len(set(spelled)) != 1:
                self.report.add(f"{kind}: conditions the metadata does not confirm (dropped)", example=repr(list(p)))
                continue
            if (rel, spelled[0]) not in out:
                out.append((rel, spelled[0]))
        return out

    def shared(self, gt: list[str]) -> list[tuple[str, str]]:
        """(relation, value) pairs every ground-truth item has, for the shared relations."""
        first = self.items[gt[0]].attributes
        return [(r, v) for r in SHARED_RELATIONS for v in first.get(r, ())
                if all(self.items[i].has(r, v) for i in gt[1:])]

    # --- the five record kinds: each returns its queries (ids are given at the split) or why it skipped
    def _texts(self, rec: dict, *keys: str) -> list[tuple[str, str]]:
        return [(k, rec[k].strip()) for k in keys if isinstance(rec.get(k), str) and rec[k].strip()]

    def _user(self, rec: dict) -> str | None:
        u = rec.get("source_user", rec.get("user_id"))
        return None if u is None else str(u)

    def _history(self, user: str | None, drop: list[str], n: int = 20) -> list[str]:
        """The user's last n MovieLens items, ground truth and anchor removed (as querygen does)."""
        return [i for i in self.histories.get(user, []) if i not in drop][-n:] if user else []

    def explicit(self, rec: dict) -> list[Query] | str:
        gt = self.ids_or_titles(rec, "explicit")
        if not gt:
            return "no ground-truth title in MovieLens"
        conds = self.verified(rec.get("sharedRelationships"), gt, "explicit")
        texts = self._texts(rec, "direct_description_query", "situational_description_query", "query")
        user = self._user(rec)
        return [Query("", "explicit", t, user, gt, conds, history=self._history(user, gt), meta={"phrasing": k})
                for k, t in texts] or "no query text"

    def _hop(self, h, gt: list[str]) -> tuple[str, str, str] | None:
        """A {movie, relation, person} claim the metadata confirms for the anchor and all of gt."""
        if not isinstance(h, dict):
            return None
        anchor = self.index.match(h.get("movie", "")) if isinstance(h.get("movie"), str) else None
        rel = relation_name(h.get("relation", ""))
        if anchor is None or rel is None:
            return None
        value = self.value(anchor, rel, h.get("person"))
        if value is None or not all(self.items[i].has(rel, value) for i in gt if i != anchor):
            return None
        return anchor, rel, value

    def implicit(self, rec: dict) -> list[Query] | str:
        gt = self.ids_or_titles(rec, "implicit")
        if not gt:
            return "no ground-truth title in MovieLens"
        hops = [self._hop(h, gt) for h in rec.get("multihop_info") or []]
        good = [h for h in hops if h]
        if not good:
            return "no hop the metadata confirms"
        if len(good) < len(hops):
            self.report.add("implicit: hops the metadata does not confirm (dropped)", len(hops) - len(good))
        hop = Hop(*good[0])
        if gt == [hop.item_id]:
            return "the only ground-truth item is the anchor"
        gt = [i for i in gt if i != hop.item_id]  # the anchor is named in the request, not recommended
        conds = self.verified(rec.get("sharedRelationships"), gt, "implicit")
        for _, rel, value in good:
            if (rel, value) not in conds and all(self.items[i].has(rel, value) for i in gt):
                conds.append((rel, value))
        texts = self._texts(rec, "direct_description_query", "situational_description_query", "query")
        user = self._user(rec)
        history = self._history(user, gt + [hop.item_id])
        return [Query("", "implicit", t, user, gt, conds, hop=hop, history=history, meta={"phrasing": k})
                for k, t in texts] or "no query text"

    def misinformed(self, rec: dict) -> list[Query] | str:
        gt = self.ids_or_titles(rec, "misinformed")
        if not gt:
            return "no ground-truth title in MovieLens"
        mis = None
        claims = rec.get("misinformed") or []
        for m in claims:
            if not isinstance(m, dict):
                continue
            true = self._hop({**m, "person": m.get("original person")}, [])
            if true is None:
                continue
            anchor, rel, value = true
            wrong = m.get("person")
            if isinstance(wrong, str) and wrong.strip() and self.value(anchor, rel, wrong) is None:
                mis = Misinformation(anchor, rel, wrong.strip(), value)
                break
        if mis is None:
            return "no false claim the metadata confirms (anchor known, true value right, false value wrong)"
        if len(claims) > 1:  # the format holds one false claim per query
            self.report.add("misinformed: further false claims in a record (only the first confirmed one kept)",
                            len(claims) - 1)
        conds = self.verified(rec.get("sharedRelationships"), gt, "misinformed")
        if (mis.relation, mis.true_value) not in conds and all(self.items[i].has(mis.relation, mis.true_value) for i in gt):
            conds.append((mis.relation, mis.true_value))
        texts = self._texts(rec, "query", "direct_description_query", "situational_description_query")
        user = self._user(rec)
        history = self._history(user, gt + [mis.item_id])
        return [Query("", "misinformed", t, user, gt, conds, misinformation=mis, history=history, meta={"phrasing": k})
                for k, t in texts] or "no query text"

    def _profile_queries(self, rec: dict, kind: str, group: Group | None = None) -> list[Query] | str:
        """Interest and demographic records: one query per {reason, query, movie subset}."""
        out = []
        for n, qg in enumerate(rec.get("query & ground true") or []):
            if not isinstance(qg, dict) or not isinstance(qg.get("query"), str) or not qg["query"].strip():
                self.report.add(f"{kind}: malformed 'query & ground true' entries (skipped)")
                continue
            gt = self.titles(qg.get("movie subset", []), kind)
            if not gt:
                self.report.add(f"{kind}: skipped queries: no ground-truth title in MovieLens", example=qg["query"][:60])
                continue
            meta = {"entry": n}
            if isinstance(qg.get("reason"), str):
                meta["reason"] = qg["reason"]
            out.append(Query("", kind, qg["query"].strip(), None, gt, self.shared(gt), group=group, meta=meta))
        return out or "no usable query"

    def interest(self, rec: dict) -> list[Query] | str:
        history = self.titles(rec.get("Shared consecutive movies") or [], "interest history")
        qs = self._profile_queries(rec, "interest")
        if isinstance(qs, list):
            for q in qs:
                q.user_id = self._user(rec)
                q.history = [i for i in history if i not in q.ground_truth]
        return qs

    def demographic(self, rec: dict) -> list[Query] | str:
        if "group" not in rec:
            return "no group"
        return self._profile_queries(rec, "demographic", group=_group(rec["group_type"], rec["group"]))


def read_records(path: Path) -> list[dict]:
    """A RecBench+ file: a JSON array of records (or an object of them, or JSON lines)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not JSON nor JSON lines ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict):
        data = data.get("data", list(data.values()))
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a list of JSON objects (RecBench+ records)")
    return data


def record_kind(rec: dict, path: Path) -> str | None:
    if any(k in rec for k in _BOOK_FIELDS):
        raise DataError(f"{path}: a book-domain RecBench+ file; only the movie domain (MovieLens-1M) is supported")
    for key, kind in _KIND_BY_FIELD:
        if key in rec:
            return kind
    return None


def convert_recbench(files: list[Path], items: list[Item], report: Report, *, seed: int = 0,
                     test_frac: float = 0.2, histories: dict[str, list[str]] | None = None) -> dict[str, list[Query]]:
    """RecBench+ records -> queries split into train/test.

    `histories` (user -> item ids in time order) gives condition-based queries the source
    user's recent items; interest queries take theirs from 'Shared consecutive movies'.

    The split is by source record for explicit/implicit/misinformed (their two phrasings
    ask the same thing, so they stay on one side) and by query for interest/demographic;
    stratified by type, deterministic in `seed`. It is kept as it is, not split by component
    (splits.py), because it is the split RecBench+ users compare against; what it shares between
    train and test (condition sets, groups, answer sets) is counted in the report instead.
    """
    conv = _Converter(items, report, histories)
    units: dict[str, list[list[Query]]] = {t: [] for t in QUERY_TYPES}
    for path in files:
        records = read_records(path)
        report.add(f"{path.name}: records", len(records))
        for n, rec in enumerate(records):
            kind = record_kind(rec, path)
            if kind is None:
                report.add(f"{path.name}: records of unknown shape (skipped)", example=str(sorted(rec))[:80])
                continue
            got = getattr(conv, kind)(rec)
            if isinstance(got, str):
                report.add(f"{kind}: skipped records: {got}", example=f"{path.name} record {n}")
                continue
            for q in got:
                q.meta = {"source": f"RecBench+ {path.name}", "record": n,
                          **({"data_idx": rec["data_idx"]} if "data_idx" in rec else {}), **q.meta}
            if kind in ("interest", "demographic"):
                units[kind].extend([q] for q in got)
            else:
                units[kind].append(got)

    rng = random.Random(seed)
    splits: dict[str, list[Query]] = {s: [] for s in SPLITS}
    for kind, us in units.items():
        order = list(range(len(us)))
        rng.shuffle(order)
        n_test = round(len(us) * test_frac)
        for rank, u in enumerate(order):
            split = "test" if rank < n_test else "train"
            for k, q in enumerate(us[u]):
                q.query_id = f"rb-{kind}-{u:05d}" + (f"-{k}" if len(us[u]) > 1 else "")
                splits[split].append(q)
        report.add(f"queries {kind}", sum(len(u) for u in us))
    for split in SPLITS:
        splits[split].sort(key=lambda q: q.query_id)
    for t, row in overlaps(splits["train"], splits["test"]).items():
        for name in OVERLAPS:
            if name in row:
                report.add(f"overlap: {t} test queries whose {OVERLAP_WHAT[name]} a training query has", row[name])
    return splits


def find_recbench_files(d: Path) -> list[Path]:
    d = Path(d)
    if not d.is_dir():
        raise DataError(f"{d}: not a directory (expected the RecBench+ files)")
    files = sorted(p for p in d.iterdir() if "Query" in p.name and p.suffix in (".json", ".jsonl"))
    if not files:
        raise DataError(f"{d}: no RecBench+ *Query*.json files (ExplicitQuery.json, DemographicsBasedQuery.json, ...)")
    return files


def build_recbench(out, recbench, ml1m=None, *, metadata=None, ratings=None, interactions=None,
                   seed: int = 0, test_frac: float = 0.2) -> Report:
    t0 = time.perf_counter()
    files = find_recbench_files(recbench)
    ml = load_movielens(ml1m, metadata=metadata, ratings=ratings, interactions=interactions)
    rep = ml.report
    rep.add("items", len(ml.items))
    if not metadata:
        rep.add("no --metadata: implicit/misinformed claims cannot be checked and are skipped; conditions are genre/decade only")
    queries = convert_recbench(files, ml.items, rep, seed=seed, test_frac=test_frac, histories=ml.histories)
    for split in SPLITS:
        rep.add(f"queries {split}", len(queries[split]))
    write_dataset(out, ml.items, ml.rows, queries, ml.users, INTERACTION_COLUMNS)
    rep.add("seconds total", round(time.perf_counter() - t0, 1))
    return rep


# ----------------------------------------------------------------------------- command line


def _add_ml_inputs(p) -> None:
    p.add_argument("--ml1m", required=True, help="MovieLens-1M folder (movies.dat, users.dat, ratings / interactions)")
    p.add_argument("--ratings", action="append", help="a ratings file UserID::MovieID::Rating::Timestamp (repeatable)")
    p.add_argument("--interactions", action="append", help="a user_id<TAB>item_id file (repeatable)")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-frac", type=float, default=0.2, help="share of each query type held out for test")


def add_movielens_arguments(p) -> None:
    _add_ml_inputs(p)
    p.add_argument("--metadata", required=True, help="movie metadata, e.g. movies_extrainfos.dat (11 '::' fields)")
    p.add_argument("--per-type", "--queries-per-type", dest="per_type", type=int, default=600,
                   help="queries of each type (train + test)")
    p.add_argument("--max-gt", type=int, default=10, help="most ground-truth items per query")
    add_split_argument(p)
    p.set_defaults(run=_run_movielens)


def add_recbench_arguments(p) -> None:
    p.add_argument("--recbench", required=True, help="folder with RecBench+ *Query.json files (movie domain)")
    _add_ml_inputs(p)
    p.add_argument("--metadata", help="movie metadata; needed to keep implicit and misinformed queries")
    p.set_defaults(run=_run_recbench)


def _run_movielens(args) -> None:
    rep = build_movielens(args.out, args.ml1m, metadata=args.metadata, ratings=args.ratings,
                          interactions=args.interactions, per_type=args.per_type, seed=args.seed,
                          test_frac=args.test_frac, max_gt=args.max_gt, split_by=args.split_by)
    rep.print(f"MovieLens-1M -> {args.out}")


def _run_recbench(args) -> None:
    rep = build_recbench(args.out, args.recbench, args.ml1m, metadata=args.metadata, ratings=args.ratings,
                         interactions=args.interactions, seed=args.seed, test_frac=args.test_frac)
    rep.print(f"RecBench+ -> {args.out}")
