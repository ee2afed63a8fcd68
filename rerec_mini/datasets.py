"""The dataset command line: build a dataset directory, or check one.

    python -m rerec_mini.datasets synth     --out DIR [--seed S --items N --users M ...]
    python -m rerec_mini.datasets movielens --ml1m DIR --metadata FILE --out DIR
    python -m rerec_mini.datasets recbench  --recbench DIR --ml1m DIR --out DIR
    python -m rerec_mini.datasets check     DIR

`check` validates a dataset, prints its counts and how much its test split shares with training
(splits.py: per type, test queries whose condition set, demographic group or answer set a training
query has), with a warning when any of those is not zero; every build ends with the same check.
The format itself lives in data.py (which imports no builder); the builders in synth.py and
sources.py. Datasets built from MovieLens or RecBench+ may not be redistributed: .gitignore keeps
everything under data/ out of git except the bundled synthetic set.
"""

from __future__ import annotations

import sys

from . import sources, synth
from .cli import ArgumentParser
from .data import DataError, load_dataset
from .splits import format_overlaps, overlaps, total_overlap


def check(path) -> None:
    """Validate the dataset at `path`; print its counts and its held-out overlap with training
    (a warning on stderr when the split leaks; load_dataset itself stays silent about it)."""
    ds = load_dataset(path)
    print(ds.summary())
    counts = overlaps(ds.queries["train"], ds.queries["test"])
    print(format_overlaps(counts))
    tot = total_overlap(counts)
    if any(tot.values()):
        print(f"warning: {path}: test queries share with training queries: conditions {tot['conditions']}, "
              f"group {tot['group']}, answers {tot['answers']}; held-out figures on this split partly "
              "measure remembered training answers (rebuild with the default --split-by component)",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m rerec_mini.datasets", description="Build or check rerec-mini datasets.")
    sub = p.add_subparsers(dest="cmd", required=True)
    synth.add_arguments(sub.add_parser("synth", help="generate the synthetic movie world"))
    sources.add_movielens_arguments(sub.add_parser("movielens", help="build from MovieLens-1M + movie metadata"))
    sources.add_recbench_arguments(sub.add_parser("recbench", help="convert published RecBench+ query files"))
    c = sub.add_parser("check", help="validate a dataset directory and print its counts")
    c.add_argument("path")
    args = p.parse_args(argv)
    try:
        if args.cmd == "check":
            check(args.path)
        else:
            args.run(args)
            check(args.out)
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
