"""The dataset command line: build a dataset directory, or check one.

    python -m rerec_mini.datasets synth     --out DIR [--seed S --items N --users M ...]
    python -m rerec_mini.datasets movielens --ml1m DIR --metadata FILE --out DIR
    python -m rerec_mini.datasets recbench  --recbench DIR --ml1m DIR --out DIR
    python -m rerec_mini.datasets check     DIR

The format itself lives in data.py (which imports no builder); the builders in synth.py and
sources.py. Datasets built from MovieLens or RecBench+ may not be redistributed: .gitignore keeps
everything under data/ out of git except the bundled synthetic set.
"""

from __future__ import annotations

import sys

from . import sources, synth
from .cli import ArgumentParser
from .data import DataError, load_dataset


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
            print(load_dataset(args.path).summary())
        else:
            args.run(args)
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
