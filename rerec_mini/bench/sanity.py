"""Does the RL step learn? A reward only RL can teach, and the control that must not learn.

    python -m rerec_mini.bench sanity                   # ~1 min on 2 cores: the curve, real vs shuffled (+ PNG)
    python -m rerec_mini.bench sanity --reward last     # the candidate listed last instead (learnt slowly)
    python -m rerec_mini.bench sanity --out DIR         # sanity.json and sanity.png there

A one-layer model is trained from scratch on the bundled dataset. A short SFT teaches only the
answer format: its target is \\boxed{} around a candidate drawn at random (--sft-source format), so
it says nothing about which candidate to name. RL then rewards one that no label encodes
(example_rewards.py): by default the candidate with the SHORTEST title (every title is one token to
this model, so it cannot see lengths: it must learn them from the reward), or with --reward last the
candidate LISTED LAST (candidate order is shuffled per prompt). The reward is that function plus
the built-in format term at 0.1 (NDCG, QAS, PAS weigh 0, RAAE off). Every few steps the held-out rate
of boxing the target candidate is measured (greedy, the whole test split). Two arms, one SFT start:

    real       the rewards as scored: a working RL step climbs well above chance
    shuffled   --shuffle-rewards: the rewards permuted across each batch's rollouts before the
               advantages; it must stay at or below chance (nothing holds even the format in place
               there: at this learning rate it loses the box within ~25 steps, so it ends at 0)

Chance is what a candidate drawn at random scores on the same held-out candidate sets (1/4 for
`last`; ~0.28 for `shortest`, where equally short titles tie). tests/test_sanity.py runs the
defaults and fails when the real arm does not learn, when the update's log-probs are not the
sampler's (fp32: they agree to ~1e-7), or when the control learns; it failed on each of: the
advantage sign flipped, the loss ignoring the advantages, the log-probs shifted by one position,
the optimiser step skipped. A user who changes the loss, the advantages, the sampler or the
log-probs runs this first. Figures, and why `last` is slow for this model: BENCHMARKS.md,
"Does the RL learn?".
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..cli import ArgumentParser
from ..config import BUNDLED_DATA, Config, validate
from ..data import load_dataset
from ..run import build_tiny_start
from ..trainer import Trainer

REWARDS = {  # --reward: the example reward function each arm is trained on
    "shortest": "rerec_mini.example_rewards:shortest_title",
    "last": "rerec_mini.example_rewards:last_candidate",
}


@dataclass
class Sanity:
    """The check's settings: the reward, the model, the format-only SFT, the RL, how often the curve is
    measured. The defaults are what tests/test_sanity.py runs (CI: 2 CPU cores, about a minute)."""

    reward: str = "shortest"  # shortest | last (example_rewards.py)
    seed: int = 0
    num_candidates: int = 4
    # Candidate sets from popularity bins, not the training default (`matched`): a per-title preference
    # learnt on the train queries' sets must reach the held-out queries' titles. `matched` sets sit in
    # a narrow popularity band around each answer, so held-out sets hold titles RL rarely sampled
    # (measured on the split by component, seeds 0/1: 0.26/0.24 after 100 steps, from 0.16/0.12);
    # `uniform` sets lost the format instead (0.00/0.03). BENCHMARKS.md, "Does the RL learn?".
    negatives: str = "popularity"
    # the model: one layer, every title one token (the demo's tokenizer, smaller)
    tiny_hidden: int = 64
    tiny_layers: int = 1
    tiny_heads: int = 2
    tiny_kv_heads: int = 1
    tiny_vocab: int = 1024
    # format-only SFT
    sft_steps: int = 800
    sft_batch_size: int = 32
    sft_learning_rate: float = 5e-3
    # RL
    max_steps: int = 100
    batch_size: int = 16
    num_generations: int = 8
    learning_rate: float = 2e-3
    max_completion_length: int = 4  # \boxed { title } : the answer and nothing else
    # the curve
    eval_every: int = 25  # RL steps between held-out measurements
    eval_limit: int = 0  # held-out queries per measurement (0: the whole test split)
    threads: int = 1  # torch threads (1: deterministic, and as fast as 2 at this size)

    def config(self, shuffle: bool = False) -> Config:
        """The training Config of one arm."""
        if self.reward not in REWARDS:
            raise ValueError(f"unknown reward {self.reward!r} (choose from {', '.join(REWARDS)})")
        return Config(
            model="tiny", seed=self.seed, device="cpu", precision="fp32",
            tiny_hidden=self.tiny_hidden, tiny_layers=self.tiny_layers, tiny_heads=self.tiny_heads,
            tiny_kv_heads=self.tiny_kv_heads, tiny_vocab=self.tiny_vocab, tiny_kind_init=True,
            num_candidates=self.num_candidates, negatives=self.negatives, show_attributes="",
            sft_source="format", sft_steps=self.sft_steps, sft_batch_size=self.sft_batch_size,
            sft_learning_rate=self.sft_learning_rate, sft_lr_decay=True,
            max_steps=self.max_steps, batch_size=self.batch_size, num_generations=self.num_generations,
            learning_rate=self.learning_rate, warmup_steps=2, beta=0.0, max_completion_length=self.max_completion_length,
            keep_truncated=True,  # every rollout stops at the cap, right after the box: all of them train
            micro_batch_size=self.batch_size * self.num_generations,
            # the reward: the example function, plus the built-in format term (a box that names no catalogue
            # item scores below a wrong title: without it the policy can slide into answers no group tells
            # apart, and stay there); NDCG, QAS, PAS weigh 0 and RAAE is off (they read the ground truth)
            reward_fn=[REWARDS[self.reward]], reward_weights="0.1,0,0,0", no_raae=True, curriculum="none",
            shuffle_rewards=shuffle, eval_limit=self.eval_limit,
        )


def held_out_rate(tr: Trainer) -> tuple[float, list[dict]]:
    """(the share of held-out queries whose greedy answer boxes the target candidate, i.e. earns the
    example reward's 1.0; the evaluation's per-query records)."""
    name = tr.reward_fns[0].name
    samples = tr.evaluate()["samples"]
    return sum(rec["reward"][name] == 1.0 for rec in samples) / len(samples), samples


def chance(tr: Trainer, samples: list[dict]) -> float:
    """What a candidate drawn at random scores on these held-out candidate sets: the mean over queries
    of the reward each of its candidates would get as the answer (1/4 for `last` with 4 candidates; a
    little more for `shortest`, where titles of equal length tie)."""
    fn = tr.reward_fns[0].func
    per_query = []
    for rec in samples:
        cands = rec["candidates"]
        values = fn(completions=[""] * len(cands), candidates=[cands] * len(cands), answer=[[c] for c in cands])
        per_query.append(sum(values) / len(cands))
    return sum(per_query) / len(per_query)


def run(s: Sanity, arms: tuple[str, ...] = ("real", "shuffled"), log=print) -> dict:
    """SFT once, then each arm's RL from that start. Returns {"chance", "start", "curves": {arm:
    [[step, rate], ...]}, "logp_gap": {arm: the largest per-step mean |trainer - sampler| log-prob of the
    sampled tokens (fp32: ~1e-7 when the update scores the tokens the sampler drew)}, "seconds",
    "settings"}."""
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        ds = load_dataset(BUNDLED_DATA)
        out: dict = {"settings": asdict(s), "curves": {}, "seconds": {}}
        with tempfile.TemporaryDirectory(prefix="rerec-sanity-") as tmp:
            cfg = s.config()
            validate(cfg)
            t0 = time.perf_counter()
            start = build_tiny_start(cfg, ds, Path(tmp) / "tiny-init")
            tr = Trainer(cfg, ds, start, torch.device("cpu"))
            for _ in range(s.sft_steps):
                tr.sft_step()
            sft_weights = {k: v.clone() for k, v in tr.model.state_dict().items()}
            out["start"], samples = held_out_rate(tr)
            out["chance"] = chance(tr, samples)
            out["seconds"]["sft"] = time.perf_counter() - t0
            log(f"format-only SFT: {s.sft_steps} steps, {out['seconds']['sft']:.1f}s; held-out rate of the {s.reward} "
                f"candidate {out['start']:.3f} (chance {out['chance']:.3f})")
            for arm in arms:
                t0 = time.perf_counter()
                tr = Trainer(s.config(shuffle=arm == "shuffled"), ds, start, torch.device("cpu"))
                tr.model.load_state_dict(sft_weights)
                tr.start_rl()
                curve = [[0, out["start"]]]
                gap = 0.0
                while tr.step_no < s.max_steps:
                    row = tr.step()
                    gap = max(gap, row["sampling/logp_diff_mean"])
                    if tr.step_no % s.eval_every == 0 or tr.step_no == s.max_steps:
                        curve.append([tr.step_no, held_out_rate(tr)[0]])
                out["curves"][arm] = curve
                out.setdefault("logp_gap", {})[arm] = gap
                out["seconds"][arm] = time.perf_counter() - t0
                log(f"{arm:>8}: " + "  ".join(f"{st}:{r:.2f}" for st, r in curve) + f"  ({out['seconds'][arm]:.1f}s)")
        return out
    finally:
        torch.set_num_threads(threads)


def table(res: dict) -> str:
    """The curve as a markdown table: step | real | shuffled."""
    arms = list(res["curves"])
    steps = sorted({st for c in res["curves"].values() for st, _ in c})
    rows = ["| RL step | " + " | ".join(arms) + " |", "|---:|" + "---:|" * len(arms)]
    for st in steps:
        cells = [next((f"{r:.3f}" for x, r in res["curves"][a] if x == st), "") for a in arms]
        rows.append(f"| {st} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(res: dict, path: Path) -> Path | None:
    """The curve as a PNG; None (and a line saying why) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install 'rerec-mini[plot]'); the table above "
              "and sanity.json hold the same curve")
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for arm, curve in res["curves"].items():
        ax.plot([st for st, _ in curve], [r for _, r in curve], marker="o", label=arm)
    ax.axhline(res["chance"], color="grey", linestyle=":", label="chance")
    ax.set_xlabel("RL step")
    reward = res.get("settings", {}).get("reward", "target")
    ax.set_ylabel(f"held-out rate: boxes the {reward} candidate", fontsize=9)
    ax.set_ylim(0, 1)
    ax.set_title(f"Does the RL learn? reward: {reward}; real vs shuffled")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m rerec_mini.bench sanity", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".", help="directory for sanity.json and sanity.png [.]")
    p.add_argument("--no-control", action="store_true", help="run the real arm only")
    for f in fields(Sanity):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default, help=f"[{f.default}]",
                       choices=tuple(REWARDS) if f.name == "reward" else None)
    args = p.parse_args(argv)
    s = Sanity(**{f.name: getattr(args, f.name) for f in fields(Sanity)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = run(s, arms=("real",) if args.no_control else ("real", "shuffled"))
    print("\n" + table(res))
    print(f"\nchance {res['chance']:.3f}; seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items()))
    (out / "sanity.json").write_text(json.dumps(res, indent=2) + "\n")
    png = plot(res, out / "sanity.png")
    print(f"wrote {out / 'sanity.json'}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
