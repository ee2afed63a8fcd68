"""What every command line of rerec-mini shares: the argument parser (strict flags, numbers that may be
negative, a usage error in one line) and progress bars that stay readable in a log file.

argparse, as shipped, takes `--max-step 5` for `--max-steps 5` (prefix matching), reads `-1e-4` as
an unknown option (so `--learning-rate -1e-4` fails with "expected one argument" instead of
reaching the range check that says `must be > 0`), and answers any mistake with the whole usage
text (46 lines for train.py) before the one line that says what went wrong. `ArgumentParser`
here turns prefix matching off, reads every number (-1e-4, -inf too) as a value, and prints one line:

    error: argument --max-step: unknown flag; did you mean --max-steps? (python train.py --help lists the flags)

Every command line of the package builds its parser from this class (tests/test_cli.py checks).

`progress(...)` is tqdm on a terminal; in a log file (CI, nohup, a pipe), where each redraw is a
line of its own, it writes one line every LOG_INTERVAL seconds instead of thousands.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys

# What a value that starts with "-" may look like: -4, -.5, -1e-4, -2.5E+3, -inf (argparse's own
# pattern stops at -4 and -.5, so -1e-4 would be taken for a flag).
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf$")
LOG_INTERVAL = 30.0  # seconds between a progress bar's lines when stderr is not a terminal


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser without prefix matching, with negative numbers as values, and with
    one-line usage errors (exit 2). Subcommands (add_subparsers) get the same class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)  # for error(): the flags as typed
        return super().parse_known_args(args, namespace)

    def unknown_flag(self, tokens: list[str]) -> str | None:
        """The first --flag among `tokens` that this parser does not know, or None."""
        for a in tokens:
            flag = a.split("=")[0]
            if flag.startswith("--") and flag != "--" and flag not in self._option_string_actions:
                return flag
        return None

    def error(self, message: str):
        """One line: what is wrong (an unknown flag first, with the closest known one), and where the
        flags are listed. A mistyped flag is named even when argparse would first complain that a
        required flag is missing (`--mod x` for `--model x`)."""
        if message.startswith("unrecognized arguments: "):
            flag = self.unknown_flag(message.split(": ", 1)[1].split())
        elif message.startswith("the following arguments are required"):
            flag = self.unknown_flag(getattr(self, "_argv", []))
        else:
            flag = None
        if flag:
            known = [s for s in self._option_string_actions if s.startswith("--") and s != "--help"]
            near = [s for s in known if s.startswith(flag)] or difflib.get_close_matches(flag, known, n=1)
            message = f"argument {flag}: unknown flag" + (f"; did you mean {near[0]}?" if near else "")
        self.exit(2, f"error: {message} ({self.prog} --help lists the flags)\n")


def progress(**kwargs):
    """A tqdm bar: redrawn as usual on a terminal, one line per LOG_INTERVAL seconds elsewhere (a redraw
    is a line in a log file: a 2,000-step SFT wrote thousands). Set a postfix with refresh=False, or it
    redraws on every call whatever the interval."""
    from tqdm.auto import tqdm

    from .distributed import is_main
    tty = sys.stderr.isatty()
    kwargs.setdefault("disable", not is_main())  # under torchrun, rank 0's bar only
    return tqdm(mininterval=0.1 if tty else LOG_INTERVAL, dynamic_ncols=tty, **kwargs)
