"""Train a recommendation assistant with ReRec: `python train.py --model tiny` (offline demo).

Every option is a field of rerec_mini.config.Config; `python train.py --help` lists them.
`--model tiny` fills unset options from TINY_PRESET (a ~0.6M-parameter model trained from
scratch: SFT warm start, then ReRec GRPO, on two CPU cores); `--model runs/X/final` fills unset
prompt options from that checkpoint's training (config.PROMPT_FORMAT). The run's lifecycle (checks,
output directory, resume, checkpoints, exit codes) is described in rerec_mini/run.py.
"""

import argparse
import shutil
import sys
from dataclasses import fields

from rerec_mini.cli import ArgumentParser
from rerec_mini.config import TINY_PRESET, Config, UsageError, negatable
from rerec_mini import distributed
from rerec_mini.run import train
from rerec_mini.trainer import TrainingStopped

EPILOG = """exit codes: 0 finished; 1 stopped after repeated NaN/inf losses (checkpoint written);
2 usage error (nothing done); 128+N stopped by signal N after writing a checkpoint
(130 Ctrl-C, 143 SIGTERM). Resume a stopped or finished run with --resume (and --max-steps N
to extend it)."""

DESCRIPTION = """ReRec reinforcement fine-tuning of an LLM recommendation assistant: SFT warm start (if
--sft-steps), then --max-steps steps of GRPO with ReRec's reward, advantages and curriculum.

How to read a line:  --batch-size N   queries per RL step (tiny: 8) [16]
  [16]       the default;
  (tiny: 8)  what --model tiny uses instead when the flag is not given (the offline demo's preset);
  with --model a checkpoint of ours (runs/X/final), unset prompt options (candidates, attributes,
  request position, history, answer size, completion length) come from its training instead."""

# Flags this project used before it took TRL's names; still accepted.
OLD_NAMES = {"save_steps": "--save-every", "eval_steps": "--eval-every"}

# --help groups, in the order shown. A Config field is shown in the group of its section: the
# group of the last SECTIONS field at or before it in Config's order, so a field added to a
# section lands in that section's group by itself; FILED shows a few fields elsewhere.
GROUPS = ("model and run", "data and prompt", "RL (GRPO; TRL's names)", "ReRec components and ablations",
          "SFT warm start", "evaluation, logging and checkpoints", "memory and speed",
          "the tiny model (only with --model tiny)")
SECTIONS = {"model": "model and run", "max_steps": "RL (GRPO; TRL's names)",
            "curriculum": "ReRec components and ablations", "num_candidates": "data and prompt",
            "sft_steps": "SFT warm start", "eval_steps": "evaluation, logging and checkpoints",
            "tiny_layers": "the tiny model (only with --model tiny)"}
FILED = {"data": "data and prompt", **dict.fromkeys(
    ("precision", "micro_batch_size", "gradient_checkpointing", "ref_offload", "logprob_chunk", "share_prompt"),
    "memory and speed")}


def help_group(name: str, order: list[str]) -> str:
    """The --help group of Config field `name`; order: every field name, in Config's order."""
    if name in FILED:
        return FILED[name]
    return SECTIONS[[n for n in order[:order.index(name) + 1] if n in SECTIONS][-1]]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """A flag and its help on one line where the terminal is wide enough: the help column starts
    after the longest flag on a wide terminal (column 42), at 32 on a narrow one (argparse: 24)."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=42 if shutil.get_terminal_size().columns >= 140 else 32)


def metavar(f) -> str:
    """A short placeholder: N (int), X (float), TEXT, or the choices when they are few."""
    choices = f.metadata.get("choices")
    if choices:
        shown = "{" + ",".join(choices) + "}"
        return shown if len(shown) <= 26 else "NAME"
    return {"int": "N", "float": "X"}.get(f.type if isinstance(f.type, str) else f.type.__name__, "TEXT")


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python train.py", usage="python train.py [--flag VALUE ...]  (every flag below)",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter,
                       argument_default=argparse.SUPPRESS)
    order = [f.name for f in fields(Config)]
    groups = {title: p.add_argument_group(title) for title in GROUPS}
    for f in fields(Config):
        g = groups[help_group(f.name, order)]
        flags = ["--" + f.name.replace("_", "-")] + ([OLD_NAMES[f.name]] if f.name in OLD_NAMES else [])
        tiny = {True: "on", False: "off"}.get(TINY_PRESET[f.name], TINY_PRESET[f.name]) if f.name in TINY_PRESET else None
        help_ = f.metadata["help"] + (f" (tiny: {tiny})" if tiny is not None else "")
        if f.type in (bool, "bool"):  # --flag, and --no-flag where it can be on without it
            action = argparse.BooleanOptionalAction if negatable(f.name) else "store_true"
            g.add_argument(*flags, dest=f.name, action=action, help=help_)
        elif f.metadata.get("append"):  # --reward-fn M:F, repeatable
            g.add_argument(*flags, dest=f.name, action="append", metavar=f.metadata["metavar"], help=help_)
        elif "nargs" in f.metadata:  # --resume [PATH]
            g.add_argument(*flags, dest=f.name, nargs=f.metadata["nargs"], const=f.metadata["const"], metavar="PATH",
                           help=help_)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type] if isinstance(f.type, str) else f.type
            shown = f" [{f.default}]" if f.default not in ("", None) else ""
            g.add_argument(*flags, dest=f.name, type=kind, choices=f.metadata.get("choices"), metavar=metavar(f),
                           help=help_ + shown)
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
    finally:
        distributed.shutdown()  # under torchrun: leave the process group (a no-op otherwise)
    return 0


if __name__ == "__main__":
    sys.exit(main())
