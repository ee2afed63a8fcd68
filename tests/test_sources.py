"""Builders from real data: MovieLens-1M (+ metadata) and RecBench+ files.

A small MovieLens-format world written in tmp tests every path without the real files;
the real pack (../shared/realdata) is used when present and skipped cleanly when not.
"""

import gzip
import json
import math
from pathlib import Path

import pytest

from rerec_mini.data import DataError, load_dataset, write_dataset
from rerec_mini.datasets import main
from rerec_mini.sources import (
    SHARED_RELATIONS,
    Report,
    build_movielens,
    build_recbench,
    convert_recbench,
    find_inputs,
    load_movielens,
    read_users,
)
from rerec_mini.splits import overlaps

REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata"
HAS_REAL = (REAL / "ml-1m" / "movies.dat").exists() and (REAL / "kg" / "movies_extrainfos.dat").exists()

MOVIES = """1::Toy Story (1995)::Animation|Children's|Comedy
2::Misérables, Les (1995)::Drama|Musical
3::City of Lost Children, The (Cité des enfants perdus, La) (1995)::Adventure|Sci-Fi
4::Saving Private Ryan (1998)::Action|Drama|War
5::Forrest Gump (1994)::Comedy|Romance|War
this line is broken
6::Cast Away (2000)::Drama
7::Big (1988)::Comedy|Fantasy
8::Philadelphia (1993)::Drama
9::Jaws (1975)::Action|Horror
10::Jurassic Park (1993)::Action|Adventure|Sci-Fi
"""
USERS = """1::F::1::10::48067
2::M::56::16::70072
3::M::25::15::55117
4::F::45::7::02460
5::M::25::20::55455
6::F::35::99::55117
"""
# (user, movie, rating, timestamp); user 1's lines are out of time order on purpose.
RATINGS = [(1, 4, 5, 300), (1, 5, 4, 100), (1, 7, 3, 200), (2, 9, 5, 10), (2, 10, 4, 20), (2, 4, 5, 30),
           (3, 1, 5, 7), (3, 7, 4, 8), (3, 5, 3, 9)]
# Pairs for everyone: users 1-3 repeat their ratings (user 3 has one pair more), 4-6 have pairs only.
PAIRS = [(1, 4), (1, 5), (1, 7), (2, 9), (2, 10), (2, 4), (3, 1), (3, 7), (3, 5), (3, 8),
         (4, 6), (4, 5), (4, 8), (5, 10), (5, 9), (5, 4), (6, 1), (6, 7), (6, 999), (6, 3)]
META = [
    "1::Toy Story::1995::G::22 Nov 1995::Animation, Adventure, Comedy::John Lasseter::John Lasseter (original story by), "
    "Joss Whedon (screenplay by), John Lasseter (screenplay)::Tom Hanks, Tim Allen::A toy.::N/A",
    "2::Les Misérables::1995::R::N/A::Drama::Claude Lelouch::Claude Lelouch, Victor Hugo (novel)::Jean-Paul Belmondo::A man.::N/A",
    "4::Saving Private Ryan::1998::R::N/A::Drama, War::Steven Spielberg::Robert Rodat::Tom Hanks, Matt Damon::War.::N/A",
    "5::Forrest Gump::1994::PG-13::N/A::Drama, Romance::Robert Zemeckis::Eric Roth (screenplay), Winston Groom (novel)"
    "::Tom Hanks, Robin Wright::Life.::N/A",
    "6::Cast Away::2000::PG-13::N/A::Adventure, Drama::Robert Zemeckis::William Broyles Jr.::Tom Hanks, Helen Hunt::Island.::N/A",
    "7::Big::1988::PG::N/A::Comedy, Drama, Fantasy::Penny Marshall::Gary Ross, Anne Spielberg::Tom Hanks, Elizabeth Perkins::Big.::N/A",
    "9::Jaws::1975::PG::N/A::Adventure, Thriller::Steven Spielberg::Peter Benchley (screenplay), Carl Gottlieb (screenplay), "
    "Peter Benchley (novel)::Roy Scheider, Robert Shaw::Shark.::N/A",
    "10::Jurassic Park::1993::PG-13::N/A::Action, Adventure, Sci-Fi::Steven Spielberg::Michael Crichton (novel), David Koepp"
    "::Sam Neill, Laura Dern::Dinosaurs.::N/A",
    "999::Not In MovieLens::1999::N/A::N/A::Drama::N/A::N/A::N/A::N/A::N/A",
    "11::too::few::fields",
]


@pytest.fixture
def ml_dir(tmp_path) -> Path:
    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "movies.dat").write_bytes(MOVIES.encode("latin-1"))  # as distributed: latin-1
    (d / "users.dat").write_text(USERS)
    lines = "".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in RATINGS)
    (d / "ratings_some.dat.gz").write_bytes(gzip.compress(lines.encode()))
    pairs = "user_id\tmovie_id\n" + "".join(f"{u}\t{m}\n" for u, m in PAIRS) + "broken\n"
    (d / "interactions_all.tsv.gz").write_bytes(gzip.compress(pairs.encode()))
    return d


@pytest.fixture
def meta_file(tmp_path) -> Path:
    p = tmp_path / "movies_extrainfos.dat"
    p.write_text("\n".join(META) + "\n", encoding="utf-8")
    return p


# ----------------------------------------------------------------------------- MovieLens, small


def test_users_get_readable_labels(ml_dir):
    rep = Report()
    users = {u.user_id: u for u in read_users(ml_dir / "users.dat", rep)}
    assert (users["1"].gender, users["1"].age, users["1"].occupation) == ("female", "under 18", "K-12 student")
    assert (users["2"].gender, users["2"].age, users["2"].occupation) == ("male", "56+", "self-employed")
    assert users["6"].occupation == "99" and rep["users: unknown occupation code (kept as is)"] == 1


def test_load_small_movielens(ml_dir, meta_file):
    ml = load_movielens(ml_dir, metadata=meta_file)
    rep = ml.report
    items = {it.item_id: it for it in ml.items}
    assert len(items) == 10 and rep["skipped: malformed movies lines"] == 1
    assert items["2"].title == "Misérables, Les (1995)"  # latin-1 decoded
    assert items["3"].title.startswith("City of Lost Children, The (Cité")

    # Attributes: MovieLens genres first in their spelling, metadata extras after; roles cut.
    assert items["1"].attributes["genre"] == ["Animation", "Children's", "Comedy", "Adventure"]
    assert items["1"].attributes["writer"] == ["John Lasseter", "Joss Whedon"]
    assert items["9"].attributes["writer"] == ["Peter Benchley", "Carl Gottlieb"]
    assert items["4"].attributes["starring"] == ["Tom Hanks", "Matt Damon"]
    assert items["4"].attributes["director"] == ["Steven Spielberg"]
    assert items["5"].attributes["year"] == ["1994"] and items["5"].attributes["decade"] == ["1990s"]
    assert items["6"].attributes["decade"] == ["2000s"]
    # No metadata: MovieLens genres and the year only.
    assert items["8"].attributes == {"genre": ["Drama"], "year": ["1993"], "decade": ["1990s"]}
    assert rep["items with metadata"] == 8
    assert rep["items without metadata (kept, MovieLens genres and year only)"] == 2
    assert rep["metadata rows for unknown movie ids (ignored)"] == 1
    assert rep["skipped: malformed metadata lines"] == 1
    war_hanks = [i for i, it in items.items() if it.has("starring", "Tom Hanks") and it.has("genre", "War")]
    assert war_hanks == ["4", "5"]

    # Interactions: ratings with time, pairs without; duplicates of ratings dropped, counted.
    assert rep["interactions from ratings (with time and rating)"] == 9
    assert rep["interaction pairs already in the ratings (dropped as duplicates)"] == 9
    assert rep["interaction pairs of rated users missing from their ratings (kept; sort first)"] == 1
    assert rep["skipped: interaction pairs of movies not in movies.dat"] == 1
    assert rep["skipped: malformed interactions lines"] == 1
    assert len(ml.rows) == rep["interactions"] == 9 + 10
    timeless = [r for r in ml.rows if math.isnan(r[3])]
    assert [r[2] for r in timeless] == list(range(1, 11))  # positions, in file order
    # Histories: by time for rated users, file order for the others.
    assert ml.histories["1"] == ["5", "7", "4"]
    assert ml.histories["3"] == ["8", "1", "7", "5"]  # its extra pair sorts first (documented)
    assert ml.histories["6"] == ["1", "7", "3"]
    assert len(ml.users) == 6


def test_build_small_movielens_loads(ml_dir, meta_file, tmp_path):
    out = tmp_path / "ds"
    rep = build_movielens(out, ml_dir, metadata=meta_file, per_type=5, seed=1)
    ds = load_dataset(out)
    assert len(ds.items) == 10 and len(ds.interactions) == 19 and len(ds.users) == 6
    assert ds.history("1") == ["5", "7", "4"] and ds.history("6") == ["1", "7", "3"]
    assert rep["items"] == 10
    # Same arguments, same files.
    out2 = tmp_path / "ds2"
    build_movielens(out2, ml_dir, metadata=meta_file, per_type=5, seed=1)
    for f in ("items.jsonl", "interactions.tsv", "users.jsonl", "queries/train.jsonl", "queries/test.jsonl"):
        assert (out / f).read_bytes() == (out2 / f).read_bytes()


def test_explicit_file_flags(ml_dir, meta_file, tmp_path):
    plain = tmp_path / "ratings.dat"
    plain.write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in RATINGS))
    files = find_inputs(ml_dir, ratings=[plain])
    assert files["ratings"] == [plain] and files["interactions"] == []
    ml = load_movielens(ml_dir, ratings=[plain])
    assert len(ml.rows) == 9 and ml.report["interactions from pairs only (timestamp = position, rating = nan)"] == 0
    ml = load_movielens(ml_dir, interactions=[ml_dir / "interactions_all.tsv.gz"])
    assert len(ml.rows) == 19 and all(math.isnan(r[3]) for r in ml.rows)


def test_a_plain_ratings_dat_is_preferred(ml_dir):
    (ml_dir / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in RATINGS))
    files = find_inputs(ml_dir)
    assert files["ratings"] == [ml_dir / "ratings.dat"]


def test_missing_files_are_clear(tmp_path):
    with pytest.raises(DataError, match="movies.dat"):
        find_inputs(tmp_path)
    (tmp_path / "movies.dat").write_text("1::Toy Story (1995)::Comedy\n")
    with pytest.raises(DataError, match="ratings"):
        find_inputs(tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        find_inputs(tmp_path / "nope")


def test_command_line(ml_dir, meta_file, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["movielens", "--ml1m", str(ml_dir), "--metadata", str(meta_file), "--out", str(out),
               "--queries-per-type", "3", "--seed", "2", "--test-frac", "0.5"])
    assert rc == 0 and (out / "items.jsonl").exists()
    printed = capsys.readouterr().out
    assert "items without metadata" in printed and "seconds total" in printed


# ----------------------------------------------------------------------------- RecBench+, hand-made records


def _write(tmp_path: Path, name: str, records) -> Path:
    d = tmp_path / "recbench"
    d.mkdir(exist_ok=True)
    (d / name).write_text(json.dumps(records), encoding="utf-8")
    return d / name


EXPLICIT = [
    {"source_user": 2, "condition_num": 2, "movieSubset": ["Saving Private Ryan (1998)", "Forrest Gump (1994)"],
     "movieSubsetId": [4, 5], "sharedRelationships": [["Starring", "Tom Hanks"], ["Genre", "War"], ["Music_by", "John Williams"]],
     "direct_description_query": "War movies starring Tom Hanks?",
     "situational_description_query": "Veterans' day: something with Tom Hanks at war.", "data_idx": 0},
    {"source_user": 3, "condition_num": 1, "movieSubset": ["The Big (1988)", "Cast Away (2000)"],
     "sharedRelationships": [["Starring", "tom hanks"]], "direct_description_query": "Tom Hanks films?", "data_idx": 1},
    {"source_user": 3, "movieSubset": ["Not A Film (1990)"], "sharedRelationships": [],
     "direct_description_query": "Nothing here maps.", "data_idx": 2},
]
IMPLICIT = [
    {"source_user": 5, "movieSubset": ["Jaws (1975)", "Jurassic Park (1993)"],
     "sharedRelationships": [["Directed_by", "Steven Spielberg"]],
     "multihop_info": [{"movie": "Saving Private Ryan (1998)", "relation": "Directed_by", "person": "Steven Spielberg"}],
     "direct_description_query": "Films by the director of Saving Private Ryan?", "data_idx": 0},
    {"source_user": 5, "movieSubset": ["Jaws (1975)"], "sharedRelationships": [],
     "multihop_info": [{"movie": "Saving Private Ryan (1998)", "relation": "Directed_by", "person": "James Cameron"}],
     "direct_description_query": "The metadata disagrees with this hop.", "data_idx": 1},
]
MISINFORMED = [
    {"source_user": 4, "movieSubset": ["Jaws (1975)", "Jurassic Park (1993)"],
     "sharedRelationships": [["Directed_by", "Steven Spielberg"]],
     "query": "I loved Saving Private Ryan, directed by James Cameron. More from its director?",
     "misinformed": [{"movie": "Saving Private Ryan (1998)", "relation": "Directed_by", "person": "James Cameron",
                      "original person": "Steven Spielberg"}], "data_idx": 0},
    {"source_user": 4, "movieSubset": ["Jaws (1975)"], "query": "The 'false' claim is true here.",
     "misinformed": [{"movie": "Saving Private Ryan (1998)", "relation": "Directed_by", "person": "Steven Spielberg",
                      "original person": "Steven Spielberg"}], "data_idx": 1},
]
INTEREST = [
    {"source_user": 6, "Shared consecutive movies": ["Toy Story (1995)", "Big (1988)", "Cast Away (2000)"],
     "query & ground true": [
         {"reason": "Hanks fan.", "query": "More Tom Hanks please!", "movie subset": ["Forrest Gump (1994)", "Big (1988)"]},
         {"reason": "x", "query": "Unmappable.", "movie subset": ["Nope (1999)"]},
     ]},
]
DEMOGRAPHIC = [
    {"data_idx": 0, "group_type": "age_gender", "group": ["Under 18", "Female"], "top_10_movies": [[1, 0.5]],
     "summary": "...", "query & ground true": [
         {"reason": "Kids.", "query": "Fun animated films?", "movie subset": ["Toy Story (1995)", "The Toy Story (1995)"]},
         {"reason": "War.", "query": "Hanks war films?", "movie subset": ["Saving Private Ryan (1998)", "Forrest Gump (1994)"]},
     ]},
]


@pytest.fixture
def small_ml(ml_dir, meta_file):
    return load_movielens(ml_dir, metadata=meta_file)


@pytest.fixture
def small_items(small_ml):
    return small_ml.items


def test_convert_hand_made_records(tmp_path, small_ml):
    small_items = small_ml.items
    files = [
        _write(tmp_path, "ExplicitQuery.json", EXPLICIT),
        _write(tmp_path, "ImplicitQuery.json", IMPLICIT),
        _write(tmp_path, "MisinformedQuery.json", MISINFORMED),
        _write(tmp_path, "InterestBasedQuery.json", INTEREST),
        _write(tmp_path, "DemographicsBasedQuery.json", DEMOGRAPHIC),
    ]
    rep = Report()
    splits = convert_recbench(files, small_items, rep, seed=0, test_frac=0.5, histories=small_ml.histories)
    qs = {q.query_id: q for s in splits.values() for q in s}
    by_type = {}
    for q in qs.values():
        by_type.setdefault(q.type, []).append(q)

    # explicit: two phrasings of record 0 (same split), one of record 1; record 2 maps to nothing.
    ex = sorted(by_type["explicit"], key=lambda q: (q.meta["record"], q.meta["phrasing"]))
    assert [q.meta["record"] for q in ex] == [0, 0, 1]
    assert ex[0].ground_truth == ["4", "5"] and ex[0].user_id == "2"
    assert ex[0].history == ["9", "10"]  # the source user's MovieLens items, ground truth removed
    assert ex[0].conditions == [("starring", "Tom Hanks"), ("genre", "War")]
    assert ex[2].ground_truth == ["7", "6"] and ex[2].conditions == [("starring", "Tom Hanks")]  # catalogue spelling
    assert rep["explicit: conditions on relations the catalogue lacks (dropped)"] == 1
    assert rep["explicit: skipped records: no ground-truth title in MovieLens"] == 1
    split_of = {q.query_id: s for s, lst in splits.items() for q in lst}
    assert split_of[ex[0].query_id] == split_of[ex[1].query_id]
    # the split is kept as converted (not by component); the report counts what it shares
    for t, row in overlaps(splits["train"], splits["test"]).items():
        assert rep[f"overlap: {t} test queries whose (type, ground-truth set) a training query has"] == row["answers"]
    assert any(k.startswith("overlap: explicit test queries whose (type, condition set)") for k in rep.counts)

    # implicit: the confirmed hop is kept; the unconfirmed record is skipped and counted.
    (im,) = by_type["implicit"]
    assert (im.hop.item_id, im.hop.relation, im.hop.value) == ("4", "director", "Steven Spielberg")
    assert im.ground_truth == ["9", "10"] and ("director", "Steven Spielberg") in im.conditions
    assert rep["implicit: skipped records: no hop the metadata confirms"] == 1

    # misinformed: the false claim; a "false" claim that is true is skipped and counted.
    (mi,) = by_type["misinformed"]
    m = mi.misinformation
    assert (m.item_id, m.relation, m.wrong_value, m.true_value) == ("4", "director", "James Cameron", "Steven Spielberg")
    assert rep["misinformed: skipped records: no false claim the metadata confirms "
               "(anchor known, true value right, false value wrong)"] == 1

    # interest: user and the shared consecutive movies as history (ground truth removed).
    (it,) = by_type["interest"]
    assert it.user_id == "6" and it.ground_truth == ["5", "7"] and it.history == ["1", "6"]
    assert ("starring", "Tom Hanks") in it.conditions
    assert rep["interest: skipped queries: no ground-truth title in MovieLens"] == 1

    # demographic: group in users.jsonl labels; conditions shared by all ground truth.
    de = sorted(by_type["demographic"], key=lambda q: q.meta["entry"])
    assert de[0].group.type == "age+gender" and de[0].group.value == "under 18, female"
    assert de[0].ground_truth == ["1"]  # two spellings of one film
    assert set(de[1].conditions) == {("genre", "Drama"), ("genre", "War"), ("starring", "Tom Hanks"), ("decade", "1990s")}
    assert all(r in SHARED_RELATIONS for q in de for r, _ in q.conditions)

    # Everything written loads (load_dataset re-checks conditions, hops and false claims).
    ml = load_movielens(tmp_path / "ml-1m", metadata=tmp_path / "movies_extrainfos.dat")
    write_dataset(tmp_path / "out", ml.items, ml.rows, splits, ml.users,
                  ("user_id", "item_id", "timestamp", "rating"))
    ds = load_dataset(tmp_path / "out")
    assert len(ds.all_queries()) == len(qs) == 3 + 1 + 1 + 1 + 2
    # Deterministic.
    again = convert_recbench(files, small_items, Report(), seed=0, test_frac=0.5, histories=small_ml.histories)
    assert [[q.to_json() for q in again[s]] for s in again] == [[q.to_json() for q in splits[s]] for s in splits]


def test_book_files_are_refused(tmp_path, small_items):
    f = _write(tmp_path, "ExplicitQuery.json", [{"bookSubset": ["Dune"], "direct_description_query": "x"}])
    with pytest.raises(DataError, match="book"):
        convert_recbench([f], small_items, Report())


def test_unknown_and_malformed_files(tmp_path, small_items):
    f = _write(tmp_path, "UserBasedQuery.json", [{"something": 1}, DEMOGRAPHIC[0]])
    rep = Report()
    splits = convert_recbench([f], small_items, rep)
    assert rep["UserBasedQuery.json: records of unknown shape (skipped)"] == 1
    assert sum(len(v) for v in splits.values()) == 2
    bad = tmp_path / "recbench" / "BadQuery.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="BadQuery.json"):
        convert_recbench([bad], small_items, Report())


def test_recbench_build_without_metadata(tmp_path, ml_dir):
    d = _write(tmp_path, "DemographicsBasedQuery.json", DEMOGRAPHIC).parent
    _write(tmp_path, "ImplicitQuery.json", IMPLICIT)
    out = tmp_path / "rb"
    rep = build_recbench(out, d, ml_dir)
    ds = load_dataset(out)
    assert {q.type for q in ds.all_queries()} == {"demographic"}  # implicit needs metadata to check hops
    assert rep["implicit: skipped records: no hop the metadata confirms"] == 2


# ----------------------------------------------------------------------------- the real pack


@pytest.fixture(scope="module")
def real_ml(tmp_path_factory):
    if not HAS_REAL:
        pytest.skip("real data pack (../shared/realdata) absent")
    out = tmp_path_factory.mktemp("ml1m")
    rep = build_movielens(out, REAL / "ml-1m", metadata=REAL / "kg" / "movies_extrainfos.dat", seed=0)
    rep.print("MovieLens-1M build")
    return out, rep


def test_real_movielens_counts(real_ml):
    out, rep = real_ml
    ds = load_dataset(out)  # validates every query: conditions, hops, false claims
    assert len(ds.items) == 3883
    assert len(ds.interactions) == 1_000_209
    assert len(ds.interactions.user_ids) == 6040 and len(ds.users) == 6040
    assert rep["interactions from ratings (with time and rating)"] == 487_650
    rated = set(ds.interactions.items.tolist())
    war_hanks = sorted(it.title for it in ds.items.values()
                       if it.has("starring", "Tom Hanks") and it.has("genre", "War") and ds.item_index[it.item_id] in rated)
    assert war_hanks == ["Forrest Gump (1994)", "Saving Private Ryan (1998)"]
    queries = ds.all_queries()
    assert len(queries) >= 2000
    assert {q.type for q in queries} == {"explicit", "implicit", "misinformed", "interest", "demographic"}
    assert all(q.text for q in queries)
    # Histories: rated users in time order, the others in file order.
    ts = ds.interactions.timestamps
    u1 = [k for k in range(len(ts)) if ds.interactions.user_ids[ds.interactions.users[k]] == "1"]
    assert sorted(ts[u1].tolist()) == [ts[k] for k in sorted(u1, key=lambda k: ts[k])]


@pytest.mark.skipif(not (HAS_REAL and (REAL / "recbench" / "DemographicsBasedQuery.json").exists()),
                    reason="real data pack absent")
def test_real_recbench_demographics(tmp_path):
    out = tmp_path / "rb"
    rep = build_recbench(out, REAL / "recbench", REAL / "ml-1m", metadata=REAL / "kg" / "movies_extrainfos.dat")
    mapped, unmapped = rep["demographic: titles mapped"], rep["demographic: titles not in MovieLens"]
    rate = mapped / (mapped + unmapped)
    print(f"\nRecBench+ demographics: {rate:.2%} of {mapped + unmapped} ground-truth titles mapped")
    assert rate >= 0.99
    ds = load_dataset(out)
    qs = ds.all_queries()
    assert len(qs) == 279 and all(q.type == "demographic" and q.group for q in qs)
    assert all(r in SHARED_RELATIONS for q in qs for r, _ in q.conditions)
    labels = {v for u in ds.users.values() for v in (u.gender, u.age, u.occupation)}
    assert all(v in labels for q in qs for v in q.group.value.split(", "))
    assert 0.15 < len(ds.queries["test"]) / len(qs) < 0.25
    # the converter keeps its split (by query for demographic records): test groups repeat training
    # ones, and the report says how many
    shared = overlaps(ds.queries["train"], ds.queries["test"])["demographic"]
    assert rep["overlap: demographic test queries whose group a training query has"] == shared["group"] > 0
