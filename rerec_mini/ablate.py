"""Ablations and the efficacy study: train variants for several seeds from one start, evaluate, tabulate.

Two uses, one runner:

    python -m rerec_mini.ablate --model tiny --seeds 3 --max-steps 60 \\
        --variants full,grpo,no-raae,no-qas,no-pas,no-curriculum --out runs/ablate

each ReRec component switched off in turn (mean ± std over seeds); every variant of one seed starts
RL from the same SFT checkpoint (trained once per seed), so the comparison isolates the RL parts.

    python -m rerec_mini.ablate --model SmolLM2-135M --start runs/sft/final --arms start,sft,rft,grpo,rerec-release,rerec,shuffled \\
        --seeds 3 --steps 40 --out runs/study --set num_candidates=20 --set show_attributes=auto

does ReRec beat what a user would do instead? Every arm starts from the same model (--start, or the
base model with --set prompt_examples=K) and takes the same number of optimiser steps on batches of
the same size (--steps, --set batch_size=B): `sft` more SFT on gold reasoning, `rft` SFT on the
model's own correct samples, `grpo` the release's NDCG@1 + format reward with no RAAE and no
curriculum, `rerec-release` ReRec at the release's weights and curriculum, `rerec` ReRec at ours,
`shuffled` the release's ReRec with rewards permuted across the batch (the control: it must not
learn), `start` the start itself. The table gives greedy hit@1 and NDCG@10 (overall and per type),
pass@G and majority@G with --num-samples G, wall time, and paired bootstrap 95% intervals of the
hit@1 difference against `sft` and against `start` (per query, averaged over seeds, queries resampled).
A start that is one of our checkpoints brings its prompt format, not its training settings: learning
rates, batch size, G and beta are train.py's defaults (sized for 0.5-7B models: lr 5e-6) unless --set
gives them. From a tiny-preset start give the preset's, e.g. --set learning_rate=1e-4 --set
sft_learning_rate=1e-4 --set batch_size=8 --set num_generations=6 --set beta=0.

From the base model with one fixed worked example and the release's reward, RL learnt the format by
boxing that example's answer for every request (docs/experiments/study.md). Two settings take that
shortcut away: --set prompt_example_pool=P (each prompt draws its K examples from the first P worked
examples, by its query id) and --set format_needs_candidate=true (format credit only when the box's
top item is one of the prompt's candidates).

Writes `results.md`, `results.json` (every figure), `curves.csv` and `curves.png` (with matplotlib).
Finished runs are reused, so an interrupted ablation or study continues where it stopped. --jobs N
runs the study's arm x seed runs N at a time, each in its own process (for a small model on one
large GPU); each run is the run it would be alone with the same CPU thread count.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .cli import ArgumentParser
from .config import BUNDLED_DATA, UsageError, resolve_config
from .data import QUERY_TYPES
from .prompts import DEFAULT_NEGATIVES, NEGATIVE_MODES
from .run import checkpoints, train, training_state
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

# The study's arms (see the module docstring): Config fields over the common settings; "sft" arms
# spend the step budget as SFT steps, the others as RL steps ("start" spends none).
RELEASE = {"reward_weights": "0.1,1,0.01,0.01", "curriculum": "paper"}  # 1.0 NDCG@1 + 0.1 format + 0.01 QAS + 0.01 IAS
ARMS = {
    "start": {},
    "sft": {"sft_source": "gold"},
    "rft": {"sft_source": "self"},
    "grpo": {"reward_weights": "0.1,1,0,0", "no_raae": True, "curriculum": "none"},
    "rerec-release": RELEASE,
    "rerec": {},
    "shuffled": {**RELEASE, "shuffle_rewards": True},
}
SFT_ARMS = ("sft", "rft")


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
    if not rows:  # no RL run (a study of SFT arms or the start alone): no curve to draw
        return
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


# ----------------------------------------------------------------------------- the study


def parse_sets(pairs: list[str]) -> dict:
    """--set key=value pairs -> Config fields, each value converted to the field's type."""
    from dataclasses import fields as dc_fields
    from .config import Config
    kinds = {f.name: f.type for f in dc_fields(Config)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or key not in kinds:
            raise UsageError(f"--set {pair!r}: give key=value with a train.py option as key (e.g. batch_size=8)")
        kind = kinds[key] if not isinstance(kinds[key], str) else {"int": int, "float": float, "str": str,
                                                                  "bool": bool}[kinds[key]]
        try:
            out[key] = value.lower() in ("1", "true", "yes", "on") if kind is bool else kind(value)
        except ValueError:
            raise UsageError(f"--set {pair!r}: {key} takes a {kind.__name__}") from None
    return out


def arm_config(arm: str, common: dict, start: str, seed: int, steps: int, out: Path):
    """The Config of one arm and seed: every arm from `start`, `steps` optimiser steps of its kind."""
    budget = ({"sft_steps": steps, "max_steps": 0} if arm in SFT_ARMS else
              {"sft_steps": 0, "max_steps": 0} if arm == "start" else {"sft_steps": 0, "max_steps": steps})
    batch = common.get("batch_size")
    same_batch = {"sft_batch_size": batch} if batch and arm in SFT_ARMS else {}
    # A start that is one of our checkpoints brings the prompt format it was trained with (candidates,
    # attributes shown, request position, completion length...), as `train.py --model CKPT` does.
    return resolve_config({**common, **ARMS[arm], **budget, **same_batch, "model": start, "seed": seed,
                           "output_dir": str(out / f"{arm}-seed{seed}")},
                          start=training_state(start).get("config", {}))


def paired_ci(a: dict[str, float], b: dict[str, float], n_boot: int = 4000, seed: int = 0) -> dict:
    """Mean of b - a over the queries both have, with a paired bootstrap 95% interval (queries resampled)."""
    keys = sorted(set(a) & set(b))
    d = np.array([b[k] - a[k] for k in keys])
    if not len(d):
        return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    boots = d[idx].mean(1)
    return {"diff": float(d.mean()), "lo": float(np.percentile(boots, 2.5)), "hi": float(np.percentile(boots, 97.5)),
            "n": len(d)}


def per_query_hits(runs: list[dict]) -> dict[str, float]:
    """query id -> hit@1 averaged over the seeds' evaluations (each a run's eval_final.json)."""
    hits: dict[str, list[float]] = {}
    for r in runs:
        for s in r["samples"]:
            hits.setdefault(s["query_id"], []).append(float(s["hit"]))
    return {k: float(np.mean(v)) for k, v in hits.items()}


def sampled_figures(cfg, run_dir: Path, num_samples: int) -> dict:
    """pass@G and majority@G of a run's final model on its held-out queries (eval.py --num-samples)."""
    import torch
    from .data import load_dataset
    from .evaluate import evaluate_samples, stratified_head
    from .model import load_model, load_tokenizer
    from .prompts import CandidateSampler, eos_ids
    from .rewards import RewardConfig, Scorer
    from .run import pick_device
    final = run_dir / "final"
    device = pick_device(cfg.device)
    model = load_model(final, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    tok = load_tokenizer(final)
    ds = load_dataset(cfg.data)
    queries = stratified_head(ds.queries[cfg.eval_split], cfg.eval_limit)
    greedy = json.loads((run_dir / "eval_final.json").read_text())["samples"]
    res = evaluate_samples(model, tok, ds, queries, [s["hit"] for s in greedy], scorer=Scorer(ds, RewardConfig(k=cfg.answer_size)),
                           num_samples=num_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                           candidate_sampler=CandidateSampler(ds), num_candidates=cfg.num_candidates,
                           hard_negatives=cfg.hard_negatives, seed=cfg.seed, negatives=cfg.negatives,
                           history_len=cfg.history_len, show_attributes=tuple(a for a in cfg.show_attributes.split(",") if a),
                           answer_size=cfg.answer_size, request_last=cfg.request_last,
                           prompt_examples=cfg.prompt_examples, prompt_example_pool=cfg.prompt_example_pool,
                           max_new_tokens=cfg.max_completion_length,
                           eos_token_id=eos_ids(tok, model.cfg.hf, final), progress=False)
    return res["overall"]


def study_table(summary: dict) -> str:
    """Markdown of `study`'s summary: one row per arm, then hit@1 per type."""
    cols = ["hit@1", "ndcg@10", "format_ok"]
    sampled = any(a.get("sampled") for a in summary["arms"].values())
    head = ["arm", "seeds", *cols] + (["pass@G", "majority@G"] if sampled else []) + \
           ["vs sft (95% CI)", "vs start (95% CI)", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def ci(c):
        return "—" if not c else f"{c['diff']:+.3f} ({c['lo']:+.3f}, {c['hi']:+.3f})"
    for name, a in summary["arms"].items():
        cells = [name, str(a["seeds"])] + [a[c] for c in cols]
        if sampled:
            cells += [a["sampled"].get("pass@G", "—") if a.get("sampled") else "—",
                      a["sampled"].get("majority@G", "—") if a.get("sampled") else "—"]
        cells += [ci(a.get("vs_sft")), ci(a.get("vs_start")), f"{a['minutes']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "hit@1 by query type (mean ± std over seeds):", "",
              "| arm | " + " | ".join(QUERY_TYPES) + " |", "|---|" + "---|" * len(QUERY_TYPES)]
    for name, a in summary["arms"].items():
        lines.append(f"| {name} | " + " | ".join(a["by_type"].get(t, "—") for t in QUERY_TYPES) + " |")
    return "\n".join(lines)


@dataclass
class ArmRun:
    """One arm and seed of the study, finished."""
    final: dict            # its eval_final.json: greedy figures, overall, by type and per query
    minutes: float         # its wall time (model load and evaluation included)
    sampled: dict | None   # pass@G and majority@G with --num-samples G, else None
    run_dir: Path


def finished(run_dir: Path, args) -> bool:
    """Has this run all arm_run needs on disk (what a study begun elsewhere brings back)?"""
    return (run_dir / "eval_final.json").exists() and (
        not args.num_samples or (run_dir / f"sampled_{args.num_samples}.json").exists())


def arm_run(arm: str, seed: int, args, common: dict, start: str, out: Path) -> ArmRun:
    """One arm and seed, trained and evaluated unless a finished run is on disk."""
    import time
    cfg = arm_config(arm, common, start, seed, args.steps, out)
    wall = Path(cfg.output_dir) / "wall_seconds.json"  # kept with the run: a reused run keeps its time
    t0 = time.perf_counter()
    result = run_once(cfg)
    if not wall.exists():
        wall.write_text(json.dumps(time.perf_counter() - t0))
    sampled = None
    if args.num_samples:
        cache = Path(cfg.output_dir) / f"sampled_{args.num_samples}.json"
        if not cache.exists():
            cache.write_text(json.dumps(sampled_figures(cfg, Path(cfg.output_dir), args.num_samples)))
        sampled = json.loads(cache.read_text())
    return ArmRun(result, json.loads(wall.read_text()) / 60, sampled, Path(cfg.output_dir))


def _worker_start(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def _worker_run(arm: str, seed: int, args, common: dict, start: str, out: Path) -> float:
    """arm_run in a worker process, its output to out/logs/ARM-seedS.log -> its hit@1."""
    import contextlib
    log = out / "logs" / f"{arm}-seed{seed}.log"
    log.parent.mkdir(exist_ok=True)
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return arm_run(arm, seed, args, common, start, out).final["overall"]["hit@1"]


def run_parallel(jobs: list[tuple[str, int]], args, common: dict, start: str, out: Path) -> None:
    """Every (arm, seed) run, args.jobs at a time in worker processes, each on its share of the CPU threads.

    Why: a 135M model's steps are short kernels with Python, reward scoring and text parsing between
    them, so one run leaves a large GPU idle much of the time and runs side by side should fill it (how
    much they gain on an H200 is not yet measured). Every run is seeded and reads nothing another
    writes, so it is the run it would have been alone, given the same CPU threads (tests/test_study.py
    compares). Spawned, not forked: a forked child cannot use CUDA."""
    import multiprocessing
    import torch
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from .model import resolve_model_dir
    resolve_model_dir(start)  # convert a GGUF / build `tiny` here, once, not in every worker
    threads = max(1, torch.get_num_threads() // args.jobs)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_start, initargs=(threads,)) as pool:
        futures = {pool.submit(_worker_run, arm, seed, args, common, start, out): (arm, seed) for arm, seed in jobs}
        print(f"{len(jobs)} runs, {args.jobs} at a time ({threads} CPU threads each); logs in {out / 'logs'}",
              flush=True)
        for done, fut in enumerate(as_completed(futures), 1):
            arm, seed = futures[fut]
            try:
                hit = fut.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                print(f"[{arm} seed {seed}] failed: see {out / 'logs' / f'{arm}-seed{seed}.log'}", file=sys.stderr)
                raise
            print(f"[{done}/{len(jobs)}] {arm} seed {seed}: hit@1 {hit:.3f}", flush=True)


def study(args, common: dict, out: Path) -> dict:
    """Every arm x seed from one start (see the module docstring) -> the summary (also results.json)."""
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise UsageError(f"--arms: unknown {','.join(unknown)} (choose from {','.join(ARMS)})")
    if args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: give 1 or more runs at a time")
    start = args.start or common["model"]
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    if args.jobs > 1:  # the runs side by side; the loop below then finds each one finished
        todo = [(arm, seed) for seed in seeds for arm in arms
                if not finished(Path(arm_config(arm, common, start, seed, args.steps, out).output_dir), args)]
        if todo:
            run_parallel(todo, args, common, start, out)
    results: dict[str, list[dict]] = {a: [] for a in arms}
    sampled: dict[str, list[dict]] = {a: [] for a in arms}
    minutes: dict[str, float] = {a: 0.0 for a in arms}
    run_dirs: dict[tuple[str, int], Path] = {}
    for seed in seeds:
        for arm in arms:
            run = arm_run(arm, seed, args, common, start, out)
            results[arm].append(run.final)
            minutes[arm] += run.minutes
            run_dirs[(arm, seed)] = run.run_dir
            if run.sampled is not None:
                sampled[arm].append(run.sampled)
            print(f"[{arm} seed {seed}] hit@1 {run.final['overall']['hit@1']:.3f}", flush=True)
    hits = {a: per_query_hits(rs) for a, rs in results.items()}
    summary = {"start": start, "steps": args.steps, "seeds": args.seeds, "settings": common, "arms": {}}
    for arm, runs in results.items():
        row = {"seeds": len(runs), "minutes": minutes[arm] / max(len(runs), 1),
               **{m: mean_std([r["overall"][m] for r in runs]) for m in ("hit@1", "ndcg@10", "format_ok")},
               "by_type": {t: mean_std([r["by_type"][t]["hit@1"] for r in runs]) for t in QUERY_TYPES
                           if all(t in r["by_type"] for r in runs)},
               "hit@1_per_seed": [r["overall"]["hit@1"] for r in runs]}
        if sampled[arm]:
            row["sampled"] = {k: mean_std([s[m] for s in sampled[arm]]) for k, m in
                              (("pass@G", "pass@G"), ("majority@G", "majority@G")) if m in sampled[arm][0]}
        for ref in ("sft", "start"):
            if ref in hits and ref != arm:
                row[f"vs_{ref}"] = paired_ci(hits[ref], hits[arm])
        summary["arms"][arm] = row
    curves(out, {k: v for k, v in run_dirs.items() if k[0] not in SFT_ARMS + ("start",)})
    return summary


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
    p.add_argument("--arms", help=f"the study instead: comma list of {','.join(ARMS)} (see above)")
    p.add_argument("--start", help="the study's common start (a checkpoint; default: --model itself)")
    p.add_argument("--steps", type=int, default=40, help="the study's optimiser steps per arm [40]")
    p.add_argument("--first-seed", type=int, default=0,
                   help="the study: seeds first-seed .. first-seed + seeds - 1 (one seed per machine, then all of "
                        "them again where the runs' eval JSONs are gathered: finished runs are reused) [0]")
    p.add_argument("--num-samples", type=int, default=0, help="the study: also pass@G and majority@G with G samples")
    p.add_argument("--jobs", type=int, default=1,
                   help="the study: this many runs at a time, each in its own process with its share of the CPU "
                        "threads; meant for a small model on one large GPU, which one run leaves mostly idle. "
                        "Each run's minutes are then its wall time on a shared machine [1]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a train.py option for every run, e.g. --set batch_size=8 or --set "
                        "format_needs_candidate=true (repeatable)")
    args = p.parse_args(argv)
    if args.arms:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        try:
            common = {"model": args.model, "data": args.data, "eval_limit": args.eval_limit, **parse_sets(args.set)}
            if args.negatives:
                common["negatives"] = args.negatives
            summary = study(args, common, out)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except TrainingStopped as e:
            print(f"stopped: {e}\nrun the same command again to continue where it stopped", file=sys.stderr)
            return 128 + e.signum if e.signum else 1
        except KeyboardInterrupt:  # --jobs: the workers' runs stop on the same signal, leaving checkpoints
            print("interrupted: run the same command again to continue where it stopped", file=sys.stderr)
            return 130
        md = study_table(summary)
        (out / "results.md").write_text(md + "\n")
        (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(md)
        return 0
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
