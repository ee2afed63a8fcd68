"""Train a recommendation assistant with ReRec: `python train.py --model tiny` (offline demo).

Every option is a field of rerec_mini.trainer.Config; `python train.py --help` lists them.
`--model tiny` fills unset options from TINY_PRESET (a ~0.4M-parameter model trained from
scratch: SFT warm start, then ReRec GRPO; about seven minutes on two CPU cores).
"""

import argparse
import sys
from dataclasses import fields

from rerec_mini.trainer import TINY_PRESET, Config, Trainer, TrainingStopped, resolve_config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="ReRec reinforcement fine-tuning of an LLM recommendation assistant. "
                    "Defaults in brackets; with --model tiny, unset options come from the tiny preset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=argparse.SUPPRESS)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata["help"] + (f" (tiny: {TINY_PRESET[f.name]})" if f.name in TINY_PRESET else "")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action="store_true", help=help_)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            p.add_argument(flag, type=kind, choices=f.metadata.get("choices"), help=help_ + f" [{f.default}]")
    return p


def main(argv=None) -> int:
    cfg = resolve_config(vars(parser().parse_args(argv)))
    try:
        Trainer(cfg).run()
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 1 if "NaN" in str(e) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
