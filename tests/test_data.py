"""The dataset format: loading, and one clear file:line: field error for every broken rule."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rerec_mini.data import DataError, Group, Hop, Item, Query, User, load_dataset, write_dataset

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "synth-movies"


def tiny_dataset(root: Path) -> Path:
    items = [
        Item("a", "Saving Private Ryan (1998)", {"genre": ["War", "Drama"], "starring": ["Tom Hanks"], "director": ["Steven Spielberg"]}),
        Item("b", "Forrest Gump (1994)", {"genre": ["War", "Comedy"], "starring": ["Tom Hanks"], "director": ["Robert Zemeckis"]}),
        Item("c", "Cast Away (2000)", {"genre": ["Drama"], "starring": ["Tom Hanks"], "director": ["Robert Zemeckis"]}),
        Item("d", "Jaws (1975)", {"genre": ["Thriller"], "starring": ["Roy Scheider"], "director": ["Steven Spielberg"]}),
    ]
    rows = [("u1", "a", 3), ("u1", "b", 1), ("u2", "c", 2), ("u2", "d", 5)]
    queries = {
        "train": [
            Query("q1", "explicit", "War movies starring Tom Hanks", "u1", ["a", "b"], [("genre", "War"), ("starring", "Tom Hanks")]),
            Query("q2", "implicit", "Films by the director of Cast Away", "u2", ["b"], [("director", "Robert Zemeckis")],
                  hop=Hop("c", "director", "Robert Zemeckis")),
        ],
        "test": [
            Query("q3", "demographic", "What do women watch?", None, ["d"], [],
                  group=Group("gender", "female"),
                  gold_reasoning="Women like it.\n\\boxed{Jaws (1975)}"),
        ],
    }
    return write_dataset(root, items, rows, queries, [User("u1", "female", "25-34"), User("u2")])


@pytest.fixture
def ds_dir(tmp_path):
    return tiny_dataset(tmp_path / "ds")


def test_roundtrip(ds_dir):
    ds = load_dataset(ds_dir)
    assert list(ds.items) == ["a", "b", "c", "d"]
    assert ds.items["a"].attributes["starring"] == ["Tom Hanks"]
    q = ds.queries["train"][0]
    assert q.conditions == [("genre", "War"), ("starring", "Tom Hanks")]
    assert ds.queries["train"][1].hop.value == "Robert Zemeckis"
    assert ds.queries["test"][0].group.value == "female"
    assert ds.users["u1"].age == "25-34" and ds.users["u2"].gender is None
    # interactions as index arrays and a sparse users x items matrix; history in time order
    assert ds.interactions.users.dtype == np.int32 and len(ds.interactions) == 4
    assert ds.matrix.shape == (2, 4) and ds.matrix.nnz == 4
    assert ds.history("u1") == ["b", "a"]
    # write -> load -> write is byte-identical
    again = write_dataset(ds_dir.parent / "again", list(ds.items.values()),
                          [("u1", "a", 3), ("u1", "b", 1), ("u2", "c", 2), ("u2", "d", 5)],
                          ds.queries, list(ds.users.values()))
    for f in ("items.jsonl", "queries/train.jsonl", "queries/test.jsonl", "users.jsonl"):
        assert (again / f).read_bytes() == (ds_dir / f).read_bytes()


def text(fn):
    """An edit of the raw line: fn(str) -> str."""
    def apply(path: Path, line: int):
        lines = path.read_text().splitlines()
        lines[line - 1] = fn(lines[line - 1])
        path.write_text("\n".join(lines) + "\n")
    return apply


def cut_off(chars: int):
    """The file ends `chars` characters into the line (a copy or a download stopped midway)."""
    def apply(path: Path, line: int):
        lines = path.read_text().splitlines()
        path.write_text("\n".join(lines[:line - 1] + [lines[line - 1][:chars]]))
    return apply


def rec(fn):
    """An edit of the line's JSON record: fn(dict) mutates it."""
    def edit(line):
        r = json.loads(line)
        fn(r)
        return json.dumps(r)
    return text(edit)


MIS = {"item_id": "c", "relation": "director"}
CASES = [
    # (file, line, edit, expected message fragment)
    ("items.jsonl", 3, text(lambda s: s[:-3]), "items.jsonl:3: invalid JSON"),
    ("items.jsonl", 3, cut_off(20), "items.jsonl:3: invalid JSON (Unterminated string starting at column 18)"),
    ("items.jsonl", 2, text(lambda s: "[1, 2]"), "items.jsonl:2: expected a JSON object"),
    ("items.jsonl", 2, rec(lambda r: r.pop("title")), "items.jsonl:2: title: missing required field"),
    ("items.jsonl", 2, rec(lambda r: r.update(title=7)), "items.jsonl:2: title: expected a non-empty string"),
    ("items.jsonl", 2, rec(lambda r: r.update(item_id="a")), "items.jsonl:2: item_id: duplicate id 'a'"),
    ("items.jsonl", 1, rec(lambda r: r["attributes"].update(genre="War")), "items.jsonl:1: attributes.genre: expected a list"),
    ("items.jsonl", 1, rec(lambda r: r.update(rating=5)), "items.jsonl:1: unknown field(s) ['rating']"),
    ("queries/train.jsonl", 1, rec(lambda r: r.update(type="vague")), "queries/train.jsonl:1: type: unknown type 'vague'"),
    ("queries/train.jsonl", 1, rec(lambda r: r.pop("ground_truth")), "queries/train.jsonl:1: ground_truth: missing required field"),
    ("queries/train.jsonl", 1, rec(lambda r: r.update(ground_truth=[])), "queries/train.jsonl:1: ground_truth: must not be empty"),
    ("queries/train.jsonl", 1, rec(lambda r: r.update(ground_truth=["a", "zz"])), "queries/train.jsonl:1: ground_truth[1]: item 'zz' is not in items.jsonl"),
    ("queries/train.jsonl", 1, rec(lambda r: r.update(ground_truth=["a", "c"])),
     "queries/train.jsonl:1: conditions[0]: ground-truth item 'c' (Cast Away (2000)) lacks (genre, War)"),
    ("queries/train.jsonl", 1, rec(lambda r: r.update(conditions=[["genre"]])), "queries/train.jsonl:1: conditions: expected a list of [relation, value]"),
    ("queries/train.jsonl", 1, rec(lambda r: r.pop("user_id")), "queries/train.jsonl:1: user_id: missing required field"),
    ("queries/train.jsonl", 2, rec(lambda r: r.pop("hop")), "queries/train.jsonl:2: hop: an implicit query needs"),
    ("queries/train.jsonl", 2, rec(lambda r: r["hop"].update(item_id="d")), "queries/train.jsonl:2: hop: item 'd' does not have (director, Robert Zemeckis)"),
    ("queries/train.jsonl", 2, rec(lambda r: r["hop"].pop("value")), "queries/train.jsonl:2: hop.value: missing"),
    ("queries/train.jsonl", 2, rec(lambda r: r.update(type="misinformed")), "queries/train.jsonl:2: misinformation: a misinformed query needs"),
    ("queries/train.jsonl", 2, rec(lambda r: r.update(type="misinformed", misinformation={**MIS, "wrong_value": "Robert Zemeckis", "true_value": "Robert Zemeckis"})),
     "queries/train.jsonl:2: misinformation.wrong_value: the claim is true"),
    ("queries/train.jsonl", 2, rec(lambda r: r.update(type="misinformed", misinformation={**MIS, "wrong_value": "Steven Spielberg", "true_value": "Ron Howard"})),
     "queries/train.jsonl:2: misinformation.true_value: Cast Away (2000) does not have (director, Ron Howard)"),
    ("queries/test.jsonl", 1, rec(lambda r: r.update(query_id="q1")), "queries/test.jsonl:1: query_id: duplicate id 'q1' (first seen in queries/train.jsonl:1)"),
    ("queries/test.jsonl", 1, rec(lambda r: r.pop("group")), "queries/test.jsonl:1: group: a demographic query needs"),
    ("queries/test.jsonl", 1, rec(lambda r: r.update(history=["a", 3])), "queries/test.jsonl:1: history: expected a list of non-empty strings"),
    ("queries/test.jsonl", 1, rec(lambda r: r.update(gold_reasoning="no box")), "queries/test.jsonl:1: gold_reasoning: must end with"),
    ("users.jsonl", 2, rec(lambda r: r.update(user_id="u1")), "users.jsonl:2: user_id: duplicate id 'u1'"),
    ("interactions.tsv", 1, text(lambda s: "user\titem"), "interactions.tsv:1: header"),
    ("interactions.tsv", 3, text(lambda s: "u1\tzz\t4"), "interactions.tsv:3: item_id: 'zz' is not in items.jsonl"),
    ("interactions.tsv", 4, text(lambda s: "u1\ta"), "interactions.tsv:4: expected 3 tab-separated fields, got 2"),
    ("interactions.tsv", 2, text(lambda s: "u1\ta\tyesterday"), "interactions.tsv:2: timestamp: not a number: 'yesterday'"),
]


@pytest.mark.parametrize("file,line,edit,expected", CASES, ids=[c[3][:48] for c in CASES])
def test_validation_names_file_line_field(ds_dir, file, line, edit, expected):
    edit(ds_dir / file, line)
    with pytest.raises(DataError) as err:
        load_dataset(ds_dir)
    assert expected in str(err.value)


def test_missing_files(ds_dir):
    (ds_dir / "queries" / "test.jsonl").unlink()
    with pytest.raises(DataError, match="missing queries/test.jsonl"):
        load_dataset(ds_dir)
    shutil.rmtree(ds_dir)
    with pytest.raises(DataError, match="not a dataset directory"):
        load_dataset(ds_dir)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.text(max_size=80), file=st.sampled_from(["items.jsonl", "queries/train.jsonl", "users.jsonl", "interactions.tsv"]))
def test_any_garbage_line_is_a_data_error_or_loads(tmp_path_factory, garbage, file):
    root = tiny_dataset(tmp_path_factory.mktemp("g") / "ds")
    with open(root / file, "a", encoding="utf-8") as f:
        f.write(garbage.replace("\r", "") + "\n")
    try:
        load_dataset(root)
    except DataError as e:
        assert f"{file}:" in str(e)


def test_bundled_dataset_loads_and_has_every_type():
    if not BUNDLED.exists():
        pytest.skip("bundled data/synth-movies not built")
    ds = load_dataset(BUNDLED)
    for split, minimum in (("train", 100), ("test", 30)):
        counts = {}
        for q in ds.queries[split]:
            counts[q.type] = counts.get(q.type, 0) + 1
        assert len(counts) == 5 and min(counts.values()) >= minimum, counts
    size = sum(f.stat().st_size for f in BUNDLED.rglob("*") if f.is_file())
    assert size < 5e6
