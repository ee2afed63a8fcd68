"""Dispatch `python -m rerec_mini.bench NAME ...` to rerec_mini.bench.NAME.main(argv)."""

import importlib
import sys

BENCHMARKS = {
    "sampler": "our KV-cache sampler vs transformers generate (tokens/s)",
    "scorer": "batched dual-graph scorer vs a per-rollout graph walk (rollouts/s)",
    "train": "per-phase time of one GRPO step, tokens/s, MFU",
    "gpu": "the GPU check: every GPU figure in one command (--smoke: the same paths on CPU)",
    "sanity": "does the RL step learn? a reward no label encodes, real vs shuffled rewards (curve + PNG)",
    "memory": "what one RL update holds at its peak, traced on CPU at a scaled-down shape (by phase)",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        print("usage: python -m rerec_mini.bench {%s} [options]\n" % ",".join(BENCHMARKS))
        for name, what in BENCHMARKS.items():
            print(f"  {name:8s} {what}")
        print("\n`python -m rerec_mini.bench NAME --help` lists a benchmark's options.")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"rerec_mini.bench.{argv[0]}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
