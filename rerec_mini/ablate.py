"""Ablations: train each ReRec variant for several seeds, evaluate, tabulate mean ± std.

    python -m rerec_mini.ablate --model tiny --seeds 3 --max-steps 60 \\
        --variants full,grpo,no-raae,no-qas,no-pas,no-curriculum --out runs/ablate

Every variant of one seed starts RL from the same SFT checkpoint (trained once per seed),
so the comparison isolates the RL components. Writes `results.md` (the table), `results.json`,
`curves.csv` (reward and hit rate per step) and `curves.png` when matplotlib is installed.
Finished runs are reused, so an interrupted ablation continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from .cli import ArgumentParser
from .config import BUNDLED_DATA, UsageError, resolve_config
from .data import QUERY_TYPES
from .prompts import DEFAULT_NEGATIVES, NEGATIVE_MODES
from .run import checkpoints, train
from .trainer import TrainingStopped

VARIANTS = {
    "full": {},
    "grpo": {"no_raae": True, "curriculum": "none", "reward_weights": "0,1,0,0"},  # NDCG-only plain GRPO
    "no-raae": {"no_raae": True},
    "no-qas": {"no_qas": True},
    "no-pas": {"no_pas": True},
    "no-curriculum": {"curriculum": "none"},
}
METRICS = ("hit@1", "ndcg@5", "format_ok", "qas", "pas")


def run_once(cfg) -> dict:
    """Train (unless already finished; continuing a stopped run) and return the final evaluation."""
    out = Path(cfg.output_dir)
    if (out / "eval_final.json").exists():
        return json.loads((out / "eval_final.json").read_text())
    if out.is_dir() and checkpoints(out):
        return train(replace(cfg, resume="latest"))["final"]
    return train(replace(cfg, overwrite=True))["final"]  # nothing resumable there: start it over


def mean_std(xs) -> str:
    return f"{np.mean(xs):.3f} ± {np.std(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def table(results: dict[str, list[dict]]) -> str:
    """Markdown: overall metrics, then hit@1 per query type, mean ± std over seeds."""
    lines = ["| variant | seeds | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for name, runs in results.items():
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(mean_std([r["overall"][m] for r in runs]) for m in METRICS) + " |")
    lines += ["", "hit@1 by query type:", "", "| variant | " + " | ".join(QUERY_TYPES) + " |", "|---|" + "---|" * len(QUERY_TYPES)]
    for name, runs in results.items():
        cells = [mean_std([r["by_type"].get(t, {}).get("hit@1", 0.0) for r in runs]) for t in QUERY_TYPES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "full" in results:
        lines += ["", "Against `full` (hit@1): a difference counts as real only if it exceeds the sum of the two seed std's.", ""]
        f = [r["overall"]["hit@1"] for r in results["full"]]
        for name, runs in results.items():
            if name == "full":
                continue
            v = [r["overall"]["hit@1"] for r in runs]
            d, spread = np.mean(v) - np.mean(f), np.std(v) + np.std(f)
            lines.append(f"- {name}: {d:+.3f} ({'exceeds' if abs(d) > spread else 'within'} the seed spread {spread:.3f})")
    return "\n".join(lines)


def curves(out: Path, runs: dict[tuple[str, int], Path]) -> None:
    rows = []
    for (name, seed), run_dir in runs.items():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("phase") == "rl":
                rows.append({"variant": name, "seed": seed, "step": r["step"], "reward": r["reward"],
                             "hit_rate": r["hit_rate"]})
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["variant", "seed", "step", "reward", "hit_rate"])
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the CSV is the record; `pip install -e ".[plot]"` adds the PNG
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("reward", "hit_rate")):
        for name in dict.fromkeys(r["variant"] for r in rows):
            steps = sorted({r["step"] for r in rows if r["variant"] == name})
            ys = [np.mean([r[key] for r in rows if r["variant"] == name and r["step"] == s]) for s in steps]
            k = max(1, len(ys) // 15)  # a moving average: single steps are noisy
            ax.plot(steps[k - 1:], np.convolve(ys, np.ones(k) / k, mode="valid"), label=name)
        ax.set_xlabel("RL step")
        ax.set_title(key + " (mean over seeds, smoothed)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m rerec_mini.ablate", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(BUNDLED_DATA), help="dataset directory")
    p.add_argument("--model", default="tiny", help="model to fine-tune ('tiny': the offline preset)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant")
    p.add_argument("--sft-steps", type=int, help="SFT steps of each seed's shared start [the preset's]")
    p.add_argument("--max-steps", type=int, help="RL steps per run [the preset's]")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {','.join(VARIANTS)}")
    p.add_argument("--eval-limit", type=int, default=0, help="held-out queries per evaluation (0: all)")
    p.add_argument("--negatives", choices=NEGATIVE_MODES, help=f"how candidate negatives are drawn [{DEFAULT_NEGATIVES}]")
    p.add_argument("--out", default="runs/ablate", help="output directory")
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    user = {"model": args.model, "data": args.data, "eval_limit": args.eval_limit}
    if args.negatives:
        user["negatives"] = args.negatives
    if args.sft_steps is not None:
        user["sft_steps"] = args.sft_steps
    if args.max_steps is not None:
        user["max_steps"] = args.max_steps
    base = resolve_config(user)

    results: dict[str, list[dict]] = {n: [] for n in ["sft"] * (base.sft_steps > 0) + names}
    run_dirs: dict[tuple[str, int], Path] = {}
    try:
        for seed in range(args.seeds):
            start = base.model
            if base.sft_steps > 0:  # one SFT start per seed, shared by every variant
                sft = replace(base, seed=seed, max_steps=0, output_dir=str(out / f"sft-seed{seed}"))
                results["sft"].append(run_once(sft))
                start = str(out / f"sft-seed{seed}" / "final")
            for name in names:
                cfg = replace(base, **VARIANTS[name], model=start, sft_steps=0, seed=seed,
                              output_dir=str(out / f"{name}-seed{seed}"))
                results[name].append(run_once(cfg))
                run_dirs[(name, seed)] = Path(cfg.output_dir)
                print(f"[{name} seed {seed}] hit@1 {results[name][-1]['overall']['hit@1']:.3f}", flush=True)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # SIGINT/SIGTERM, or repeated NaN: the checkpoint is on disk
        print(f"stopped: {e}\nrun the same ablation command again to continue where it stopped", file=sys.stderr)
        return 128 + e.signum if e.signum else 1
    md = table(results)
    (out / "results.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    curves(out, run_dirs)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
