"""Train a recommendation assistant with ReRec: `python train.py --model tiny` (offline demo).

Every option is a field of rerec_mini.config.Config; `python train.py --help` lists them.
`--model tiny` fills unset options from TINY_PRESET (a ~0.6M-parameter model trained from
scratch: SFT warm start, then ReRec GRPO, on two CPU cores); `--model runs/X/final` fills unset
prompt options from that checkpoint's training (config.PROMPT_FORMAT). The run's lifecycle (checks,
output directory, resume, checkpoints, exit codes) is described in rerec_mini/run.py.
"""

import argparse
import sys
from dataclasses import fields

from rerec_mini.config import TINY_PRESET, Config, UsageError, negatable
from rerec_mini.run import train
from rerec_mini.trainer import TrainingStopped

EPILOG = """exit codes: 0 finished; 1 stopped after repeated NaN/inf losses (checkpoint written);
2 usage error (nothing done); 128+N stopped by signal N after writing a checkpoint
(130 Ctrl-C, 143 SIGTERM). Resume a stopped or finished run with --resume (and --max-steps N
to extend it)."""

# Flags this project used before it took TRL's names; still accepted.
OLD_NAMES = {"save_steps": "--save-every", "eval_steps": "--eval-every"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="ReRec reinforcement fine-tuning of an LLM recommendation assistant. "
                    "Defaults in brackets; with --model tiny, unset options come from the tiny preset; with "
                    "--model a checkpoint of ours (runs/X/final), unset prompt options (candidates, attributes, "
                    "request position, history, answer size, completion length) come from its training.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    for f in fields(Config):
        flags = ["--" + f.name.replace("_", "-")] + ([OLD_NAMES[f.name]] if f.name in OLD_NAMES else [])
        help_ = f.metadata["help"] + (f" (tiny: {TINY_PRESET[f.name]})" if f.name in TINY_PRESET else "")
        if f.type in (bool, "bool"):  # --flag, and --no-flag where it can be on without it
            action = argparse.BooleanOptionalAction if negatable(f.name) else "store_true"
            p.add_argument(*flags, dest=f.name, action=action, help=help_)
        elif "nargs" in f.metadata:  # --resume [PATH]
            p.add_argument(*flags, dest=f.name, nargs=f.metadata["nargs"], const=f.metadata["const"], metavar="PATH",
                           help=help_)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type] if isinstance(f.type, str) else f.type
            shown = f" [{f.default}]" if f.default not in ("", None) else ""
            p.add_argument(*flags, dest=f.name, type=kind, choices=f.metadata.get("choices"), help=help_ + shown)
    return p


def main(argv=None) -> int:
    flags = vars(parser().parse_args(argv))
    try:
        train(flags)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 128 + e.signum if e.signum else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
