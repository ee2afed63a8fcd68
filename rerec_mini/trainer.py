"""The ReRec training loop: sample -> score -> advantages -> update -> log -> checkpoint.

One RL step (`Trainer.step`):
  1. the curriculum picks B training queries; each gets its candidate set and chat prompt
  2. the sampler draws G completions per prompt (static KV cache, no grad)
  3. the scorer gives every completion its dual-graph reward (format, NDCG, QAS, PAS)
  4. RAAE lowers the reward of tokens in reasoning that argued for a wrong item, and
     token advantages are normalised within each group of G   (--no-raae: plain GRPO)
  5. mu passes of the clipped GRPO loss (+ k3 KL to a frozen reference) over
     length-sorted micro-batches; one AdamW step per pass
  6. one JSON line in metrics.jsonl; an atomic checkpoint every --save-every steps
An optional SFT warm start on the queries' gold reasoning runs first (`Trainer.sft`).
`python train.py --help` lists every option; `Config` below holds their defaults.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import raae
from .curriculum import difficulty, make_curriculum
from .data import Dataset, Query, load_dataset
from .evaluate import evaluate_policy, stratified_head
from .grpo import StepNorm, policy_loss
from .model import build_tiny, load_model, load_tokenizer, save_model, token_logprobs
from .prompts import CandidateSampler, build_messages, render_sft_target
from .rewards import RewardConfig, Scorer
from .sampling import generate

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DATA = REPO_ROOT / "data" / "synth-movies"


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    """Every training option; `train.py` turns each field into a `--flag` with this help."""

    # what to train, on what, where
    model: str = _opt("tiny", "local dir, hub id, alias (Qwen2.5-0.5B|1.5B|3B|7B, Llama-3.2-1B|3B) or 'tiny'")
    data: str = _opt(str(BUNDLED_DATA), "dataset directory (format: data/README.md)")
    output_dir: str = _opt("", "where checkpoints, metrics.jsonl and evals go (default runs/<timestamp>)")
    seed: int = _opt(0, "seed for init, candidates, sampling and the curriculum")
    device: str = _opt("auto", "cuda, cpu or auto")
    # the RL loop (names follow TRL's GRPO where one exists)
    max_steps: int = _opt(200, "RL steps")
    batch_size: int = _opt(16, "queries per RL step")
    num_generations: int = _opt(5, "rollouts per query (the group size G)")
    max_completion_length: int = _opt(512, "most tokens sampled per rollout")
    temperature: float = _opt(1.0, "sampling temperature (the trainer's log-probs use the same one)")
    top_p: float = _opt(1.0, "nucleus sampling threshold")
    learning_rate: float = _opt(5e-6, "AdamW learning rate of the RL phase")
    warmup_steps: int = _opt(10, "linear learning-rate warmup, in optimiser steps")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping")
    beta: float = _opt(0.01, "KL coefficient (k3 to the frozen start); 0 loads no reference model")
    epsilon: float = _opt(0.2, "lower clip range of the ratio")
    epsilon_high: float = _opt(0.2, "upper clip range of the ratio")
    loss_type: str = _opt("token-mean", "loss aggregation", choices=("token-mean", "seq-mean", "dr-grpo"))
    num_iterations: int = _opt(1, "optimiser passes over each batch of rollouts (mu)")
    micro_batch_size: int = _opt(8, "rollouts per forward/backward (memory)")
    gradient_checkpointing: bool = _opt(False, "recompute layer activations in backward (memory)")
    keep_truncated: bool = _opt(False, "also train on rollouts cut off at --max-completion-length")
    ref_offload: bool = _opt(False, "keep the reference model on the CPU between uses (GPU memory)")
    logprob_chunk: int = _opt(1024, "tokens per chunk of the log-prob head (memory)")
    # ReRec's components and their ablation switches
    curriculum: str = _opt("buckets", "query sampler", choices=("none", "paper", "buckets"))
    tau: float = _opt(0.1, "difficulty below which a query counts as mastered (retired)")
    difficulty_metric: str = _opt("rec", "curriculum difficulty: 1-rec or 1-reward", choices=("rec", "reward"))
    no_raae: bool = _opt(False, "ablation: plain GRPO advantages (no reasoning-aware token rewards)")
    raae_penalty: float = _opt(0.3, "RAAE: wrong-segment tokens get r - penalty*|r|")
    raae_claims: bool = _opt(False, "RAAE: also mark segments that attribute a condition to an item lacking it")
    no_qas: bool = _opt(False, "ablation: drop the query-alignment (item-attribute graph) reward")
    no_pas: bool = _opt(False, "ablation: drop the preference-alignment (interaction graph) reward")
    reward_weights: str = _opt("0.1,1.0,0.1,0.1", "weights of format,rec,qas,pas (the release used 0.01 for qas,pas)")
    # the task
    num_candidates: int = _opt(20, "candidates per prompt (1 correct + negatives); 0 = open generation")
    hard_negatives: int = _opt(0, "negatives that share some but not all conditions")
    answer_size: int = _opt(1, "titles in the answer box (NDCG@k with k = this)")
    history_len: int = _opt(0, "recent history titles shown in the prompt")
    show_attributes: str = _opt("", "candidate attributes shown in the prompt, e.g. genre,director; 'auto': those the request names")
    # SFT warm start
    sft_steps: int = _opt(0, "SFT steps on gold reasoning before RL (needed by from-scratch models)")
    sft_learning_rate: float = _opt(1e-5, "AdamW learning rate of the SFT warm start")
    sft_batch_size: int = _opt(16, "queries per SFT step")
    sft_prompt_weight: float = _opt(0.0, "SFT: weight of a language-model loss on the prompt tokens (from-scratch models)")
    # evaluation and checkpoints
    eval_every: int = _opt(0, "evaluate on held-out queries every N RL steps (0: only after SFT and at the end)")
    eval_limit: int = _opt(0, "held-out queries per evaluation, the types in turn (0: all)")
    eval_split: str = _opt("test", "split used for evaluation")
    save_every: int = _opt(50, "checkpoint every N RL steps")
    save_total_limit: int = _opt(2, "checkpoints kept (older ones are deleted)")
    resume: bool = _opt(False, "continue from the newest checkpoint in --output-dir")
    # the tiny model (only with --model tiny)
    tiny_layers: int = _opt(4, "tiny: transformer layers")
    tiny_hidden: int = _opt(256, "tiny: hidden size")
    tiny_vocab: int = _opt(2048, "tiny: BPE vocabulary size")


# `python train.py --model tiny` is the offline demo: these replace the defaults above for any
# flag the user did not set. Sized so SFT + RL + two evaluations fit in ~10 minutes on 2 CPU cores.
TINY_PRESET = dict(
    tiny_hidden=128, tiny_layers=2, tiny_vocab=1024, num_candidates=8, show_attributes="auto",
    sft_steps=1000, sft_learning_rate=5e-3, sft_batch_size=16, sft_prompt_weight=0.5,
    max_steps=150, batch_size=8, num_generations=6, max_completion_length=80, learning_rate=3e-4,
    warmup_steps=5, beta=0.0, micro_batch_size=48, save_every=50,
)


def resolve_config(user: dict) -> Config:
    """The user's flags, over the tiny preset (for --model tiny), over the defaults."""
    base = dict(TINY_PRESET) if user.get("model", "tiny") == "tiny" else {}
    return Config(**{**base, **user})


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (signal, repeated NaN); a checkpoint was written."""


@dataclass
class Batch:
    """One step's rollouts, flattened: row r continues prompt r // G."""

    queries: list[Query]  # [B]
    candidates: list[list[str] | None]  # [B]
    prompt_ids: list[list[int]]  # [B]
    completions: list[list[int]]  # [B*G]
    truncated: list[bool]  # [B*G]
    texts: list[str] = field(default_factory=list)  # [B*G] decoded responses
    spans: list[np.ndarray] = field(default_factory=list)  # [B*G] char span per token [T_r, 2]


# ----------------------------------------------------------------------------- setup helpers


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def eos_ids(tokenizer, model) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and the model config's eos_token_id(s)."""
    ids = {tokenizer.eos_token_id}
    cfg_eos = model.cfg.hf.get("eos_token_id")
    ids.update(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos])
    return sorted(i for i in ids if i is not None)


def dataset_texts(ds: Dataset) -> list[str]:
    """What the tiny tokenizer is trained on: titles, attributes, requests, reasoning, prompts."""
    texts = [it.title for it in ds.items.values()]
    texts += ["; ".join(f"{r}: {', '.join(v)}" for r, v in it.attributes.items()) for it in ds.items.values()]
    for q in ds.all_queries():
        texts.append(q.text)
        texts.append(render_sft_target(q, ds))
    probe = ds.queries["train"][0]
    texts += [m["content"] for m in build_messages(probe, ds, probe.ground_truth[:1], show_attributes=("genre",))]
    return texts


def atomic_dir(final: Path):
    """Write into final.tmp, then rename: a checkpoint directory exists only when complete."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (`checkpoint-<step>`; SFT ones are `checkpoint-sft-<step>`)."""
    def order(p: Path):
        parts = p.name.split("-")
        return (0 if parts[1] == "sft" else 1, int(parts[-1]))
    return sorted((p for p in out.glob("checkpoint-*") if not p.name.endswith(".tmp")), key=order)


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        # bf16 autocast on GPU with fp32 master weights: a 5e-6 update is below bf16's resolution.
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else None
        torch.manual_seed(cfg.seed)
        self.out = Path(cfg.output_dir or REPO_ROOT / "runs" / time.strftime("%Y%m%d-%H%M%S"))
        self.out.mkdir(parents=True, exist_ok=True)

        self.ds = load_dataset(cfg.data)
        self.train_queries = [q for q in self.ds.queries["train"]]
        self.candidates = CandidateSampler(self.ds)
        self.show = tuple(a for a in cfg.show_attributes.split(",") if a)

        resume_from = checkpoints(self.out)[-1] if cfg.resume and checkpoints(self.out) else None
        if cfg.resume and resume_from is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.out}")
        start_dir = self._model_dir()  # the weights training starts from
        model_dir = resume_from or start_dir
        self.tokenizer = load_tokenizer(str(model_dir))
        self.model = load_model(str(model_dir), device=self.device, dtype=torch.float32)
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        self.eos = eos_ids(self.tokenizer, self.model)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos[0]
        # The frozen reference is the model we start RL from; with beta = 0 it is never loaded.
        self.ref = None
        if cfg.beta != 0:
            # After an SFT warm start the reference is the SFT model (saved in _start_rl).
            ref_dir = (self.out / "reference") if (self.out / "reference").exists() else start_dir
            self.ref = self._frozen(ref_dir)
        # On GPU, sampling runs from a bf16 copy of the policy (half the bytes per decode step).
        self.rollout_model = self.model
        if self.device.type == "cuda":
            self.rollout_model = load_model(str(model_dir), device=self.device, dtype=torch.bfloat16).eval()

        w = [float(x) for x in cfg.reward_weights.split(",")]
        if len(w) != 4:
            raise ValueError(f"--reward-weights needs 4 numbers (format,rec,qas,pas), got {cfg.reward_weights!r}")
        self.scorer = Scorer(self.ds, RewardConfig(
            w_format=w[0], w_rec=w[1], w_qas=0.0 if cfg.no_qas else w[2], w_pas=0.0 if cfg.no_pas else w[3],
            k=cfg.answer_size))
        self.curriculum = make_curriculum(cfg.curriculum, len(self.train_queries), seed=cfg.seed, tau=cfg.tau,
                                          batch_size=cfg.batch_size, total_steps=cfg.max_steps)
        self.optimizer = self._optimizer(cfg.learning_rate)
        self.phase, self.step_no, self.sft_step_no, self.nan_streak = "sft", 0, 0, 0
        if resume_from is not None:
            self._load_state(resume_from)
        self.stop_requested = False
        (self.out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    # --- setup
    def _model_dir(self) -> Path:
        if self.cfg.model != "tiny":
            return Path(self.cfg.model)
        path = self.out / "tiny-init"
        if not (path / "config.json").exists():
            build_tiny(atomic := atomic_dir(path), dataset_texts(self.ds), vocab_size=self.cfg.tiny_vocab,
                       hidden_size=self.cfg.tiny_hidden, num_layers=self.cfg.tiny_layers,
                       intermediate_size=2 * self.cfg.tiny_hidden, seed=self.cfg.seed)
            atomic.rename(path)
        return path

    def _frozen(self, path) -> torch.nn.Module:
        where = torch.device("cpu") if self.cfg.ref_offload else self.device
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        ref = load_model(str(path), device=where, dtype=dtype).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def _optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.99),
                                 weight_decay=self.cfg.weight_decay, eps=1e-8)

    def lr_at(self, step: int, base: float) -> float:
        """Linear warmup, then constant."""
        return base * min(1.0, (step + 1) / max(1, self.cfg.warmup_steps))

    def prompt_ids(self, q: Query, candidates) -> list[int]:
        messages = build_messages(q, self.ds, candidates, history_len=self.cfg.history_len,
                                  show_attributes=self.show, answer_size=self.cfg.answer_size)
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    # --- SFT warm start
    def sft(self, pbar=None) -> None:
        """Teacher-forced cross-entropy on gold reasoning (+ optionally on the prompt)."""
        cfg = self.cfg
        data = [q for q in self.train_queries]
        opt = self.optimizer
        while self.sft_step_no < cfg.sft_steps and not self.stop_requested:
            s = self.sft_step_no
            # Epoch e visits the queries in a seeded order, each with freshly drawn candidates
            # (a new candidate seed per epoch: the model must read the list, not memorise it).
            per_epoch = max(1, len(data) // cfg.sft_batch_size)
            epoch, k = divmod(s, per_epoch)
            order = random.Random(f"{cfg.seed}:sft:{epoch}").sample(range(len(data)), len(data))
            batch = [data[i] for i in order[k * cfg.sft_batch_size:(k + 1) * cfg.sft_batch_size]]
            rows = []
            for q in batch:
                cands = self.candidates.sample(q, cfg.num_candidates, cfg.hard_negatives, seed=cfg.seed + 1000 * (epoch + 1))
                target = self.tokenizer.encode(render_sft_target(q, self.ds), add_special_tokens=False) + [self.eos[0]]
                rows.append((self.prompt_ids(q, cands), target))
            for group in opt.param_groups:
                group["lr"] = self.lr_at(s, cfg.sft_learning_rate)
            self.model.train()
            ids, mask = self._pack([p for p, _ in rows], [c for _, c in rows])
            # The prompt's own tokens (after the first) are scored too when they carry weight:
            # a model trained from scratch has no pretraining, and predicting the candidate
            # lines teaches it the catalogue and how to copy from the context.
            lengths = torch.tensor([len(p) + len(c) for p, c in rows], device=ids.device)
            prompt = (torch.arange(ids.shape[1], device=ids.device) < lengths[:, None]) & ~mask
            prompt[:, 0] = False
            with self._autocast():
                lp = token_logprobs(self.model, ids, mask | (prompt if cfg.sft_prompt_weight else mask),
                                    chunk_size=cfg.logprob_chunk)
            loss = -(lp * mask).sum() / mask.sum()
            if cfg.sft_prompt_weight:
                loss = loss - cfg.sft_prompt_weight * (lp * prompt).sum() / prompt.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            if torch.isfinite(loss) and torch.isfinite(gn):
                opt.step()
            self.sft_step_no += 1
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{loss.item():.3f}")
            self._log({"phase": "sft", "sft_step": self.sft_step_no, "loss": loss.item(), "grad_norm": gn.item(),
                       "lr": opt.param_groups[0]["lr"]})

    # --- one RL step
    def rollout(self) -> Batch:
        cfg = self.cfg
        idx = self.curriculum.next_batch(cfg.batch_size)
        queries = [self.train_queries[i] for i in idx]
        cands = [self.candidates.sample(q, cfg.num_candidates, cfg.hard_negatives, seed=cfg.seed) for q in queries]
        prompts = [self.prompt_ids(q, c) for q, c in zip(queries, cands)]
        self.rollout_model.eval()
        with torch.no_grad():
            ro = generate(self.rollout_model, prompts, max_new_tokens=cfg.max_completion_length,
                          num_samples=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
                          eos_token_id=self.eos, seed=cfg.seed * 1_000_003 + self.step_no)
        self._batch_idx = idx
        return Batch(queries, cands, prompts, ro.completions, ro.truncated)

    def score(self, b: Batch):
        G = self.cfg.num_generations
        for ids in b.completions:
            text, spans = raae.token_char_spans(self.tokenizer, ids)
            b.texts.append(text)
            b.spans.append(spans)
        rep_q = [q for q in b.queries for _ in range(G)]
        rep_c = [c for c in b.candidates for _ in range(G)]
        return self.scorer.score(rep_q, b.texts, rep_c)

    def advantages(self, b: Batch, r) -> tuple[list[np.ndarray], dict]:
        """Token advantages per rollout; RAAE lowers the reward of wrong reasoning first."""
        cfg, G = self.cfg, self.cfg.num_generations
        tok_rewards, penalised, total = [], 0, 0
        for k, (text, spans) in enumerate(zip(b.texts, b.spans)):
            wrong = []
            if not cfg.no_raae and r.parsed[k]:
                top = self.ds.items[r.parsed[k][0]]
                claims = self._claims(b.queries[k // G], b.candidates[k // G], r.parsed[k]) if cfg.raae_claims else ()
                wrong = raae.wrong_segments(text, top.title, bool(r.hit[k]), claims=claims)
            rt = raae.token_rewards(float(r.total[k]), spans, wrong, cfg.raae_penalty)
            penalised += int(raae.in_spans(spans, wrong).sum())
            total += len(rt)
            tok_rewards.append(rt)
        adv, zero = raae.group_advantages(tok_rewards, r.total, G)
        return adv, {"zero_var_groups": zero, "penalized_token_frac": penalised / max(total, 1)}

    def _claims(self, q: Query, cands, parsed):
        """(title, conditions it lacks) for the items a rollout could talk about."""
        out = []
        for iid in dict.fromkeys(list(cands or []) + list(parsed)):
            it = self.ds.items[iid]
            lacking = [c for c in q.conditions if not it.has(*c)]
            if lacking:
                out.append((it.title, lacking))
        return out

    def _pack(self, prompts: list[list[int]], completions: list[list[int]]):
        """Right-padded [N, T] ids and the [N, T] mask of completion tokens (the targets)."""
        T = max(len(p) + len(c) for p, c in zip(prompts, completions))
        ids = torch.full((len(prompts), T), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), T), dtype=torch.bool)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            mask[i, len(p):len(p) + len(c)] = True
        return ids.to(self.device), mask.to(self.device)

    def _autocast(self):
        return self.autocast if self.autocast is not None else torch.autocast("cpu", enabled=False)

    def update(self, b: Batch, adv: list[np.ndarray]) -> dict:
        """mu optimiser steps of the GRPO loss over length-sorted micro-batches."""
        cfg, G = self.cfg, self.cfg.num_generations
        rows = [r for r in range(len(b.completions)) if b.completions[r]]
        if not cfg.keep_truncated:
            rows = [r for r in rows if not b.truncated[r]]
        # Sort by length so each micro-batch pads little; then fixed tensors per micro-batch.
        rows.sort(key=lambda r: len(b.prompt_ids[r // G]) + len(b.completions[r]), reverse=True)
        micro = []
        for i in range(0, len(rows), cfg.micro_batch_size):
            rs = rows[i:i + cfg.micro_batch_size]
            ids, mask = self._pack([b.prompt_ids[r // G] for r in rs], [b.completions[r] for r in rs])
            a = torch.zeros(mask.shape, dtype=torch.float32)
            for j, r in enumerate(rs):
                a[j, mask[j].cpu()] = torch.from_numpy(adv[r])
            micro.append({"ids": ids, "mask": mask, "adv": a.to(self.device)})
        norm = StepNorm(tokens=int(sum(m["mask"].sum() for m in micro)), seqs=len(rows), max_len=cfg.max_completion_length)
        lengths = [len(b.prompt_ids[r // G]) + len(b.completions[r]) for r in rows]
        stats = {"kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "grad_norm": 0.0, "loss": 0.0, "skipped": 0,
                 "update_tokens": sum(lengths), "update_seq_len": sum(lengths) / max(len(lengths), 1)}
        if not micro:
            return stats
        with torch.no_grad(), self._autocast():
            if self.ref is not None:
                if cfg.ref_offload:
                    self.ref.to(self.device)
                for m in micro:
                    m["ref"] = token_logprobs(self.ref, m["ids"], m["mask"], temperature=cfg.temperature,
                                              chunk_size=cfg.logprob_chunk)
                if cfg.ref_offload:
                    self.ref.to("cpu")
            if cfg.num_iterations > 1:  # the ratio's denominator: the policy that sampled
                self.model.eval()
                for m in micro:
                    m["old"] = token_logprobs(self.model, m["ids"], m["mask"], temperature=cfg.temperature,
                                              chunk_size=cfg.logprob_chunk)
        self.model.train()
        for it in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            sums = {"kl_sum": 0.0, "clipped_sum": 0.0, "tokens": 0.0, "entropy_sum": 0.0, "loss": 0.0}
            for m in micro:
                with self._autocast():
                    lp, ent = token_logprobs(self.model, m["ids"], m["mask"], temperature=cfg.temperature,
                                             chunk_size=cfg.logprob_chunk, with_entropy=True)
                old = m.get("old", lp.detach())
                loss, s = policy_loss(lp, old, m["adv"], m["mask"], norm, ref_logp=m.get("ref"), beta=cfg.beta,
                                      eps_low=cfg.epsilon, eps_high=cfg.epsilon_high, loss_type=cfg.loss_type)
                loss.backward()
                for k in ("kl_sum", "clipped_sum", "tokens"):
                    sums[k] += s[k]
                sums["entropy_sum"] += float((ent.detach() * m["mask"]).sum())
                sums["loss"] += loss.item()
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            if not (math.isfinite(sums["loss"]) and torch.isfinite(gn)):
                # A NaN/inf loss must not reach the weights: skip this update, count the streak.
                self.optimizer.zero_grad(set_to_none=True)
                stats["skipped"] += 1
                self.nan_streak += 1
                if self.nan_streak >= 3:
                    raise TrainingStopped("the loss was NaN/inf in 3 updates in a row; stopping "
                                          "(try a lower --learning-rate, or --max-grad-norm)")
                continue
            self.nan_streak = 0
            self.optimizer.step()
        n = max(sums["tokens"], 1.0)
        stats.update(kl=sums["kl_sum"] / n, clip_frac=sums["clipped_sum"] / n, entropy=sums["entropy_sum"] / n,
                     grad_norm=float(gn), loss=sums["loss"])
        if self.rollout_model is not self.model:  # refresh the bf16 sampling copy
            with torch.no_grad():
                for dst, src in zip(self.rollout_model.parameters(), self.model.parameters()):
                    dst.copy_(src)
        return stats

    def step(self) -> dict:
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step_no, cfg.learning_rate)
        t0 = time.perf_counter()
        b = self.rollout()
        t1 = time.perf_counter()
        r = self.score(b)
        t2 = time.perf_counter()
        adv, adv_stats = self.advantages(b, r)
        G = cfg.num_generations
        diffs = [difficulty(r.rec[i * G:(i + 1) * G], r.total[i * G:(i + 1) * G], cfg.difficulty_metric)
                 for i in range(len(b.queries))]
        self.curriculum.update(self._batch_idx, diffs)
        t3 = time.perf_counter()
        up = self.update(b, adv)
        t4 = time.perf_counter()
        self.step_no += 1
        n_tok = sum(map(len, b.completions))
        n_entries = max(int(np.sum(r.n_entries)), 1)
        return {
            "step": self.step_no,
            "reward_mean": float(np.mean(r.total)), "rec_mean": float(np.mean(r.rec)),
            "qas_mean": float(np.mean(r.qas)), "pas_mean": float(np.mean(r.pas)),
            "format_ok": float(np.mean(r.format > 0)), "hit_rate": float(np.mean(r.hit)),
            "hallucination_rate": float(np.sum(r.n_hallucinated)) / n_entries,
            **up, "lr": self.optimizer.param_groups[0]["lr"],
            "response_len": n_tok / len(b.completions), "truncated_frac": float(np.mean(b.truncated)),
            **adv_stats, **{f"curriculum_{k}": v for k, v in self.curriculum.stats().items()},
            "time_sample": t1 - t0, "time_score": t2 - t1, "time_advantage": t3 - t2, "time_update": t4 - t3,
            "tokens_per_s": n_tok / max(t1 - t0, 1e-9),
        }

    # --- evaluation, logging, checkpoints
    def evaluate(self, name: str) -> dict:
        cfg = self.cfg
        queries = stratified_head(self.ds.queries[cfg.eval_split], cfg.eval_limit)
        self.rollout_model.eval()
        result = evaluate_policy(
            self.rollout_model, self.tokenizer, self.ds, queries, scorer=self.scorer, candidate_sampler=self.candidates,
            num_candidates=cfg.num_candidates, hard_negatives=cfg.hard_negatives, seed=cfg.seed,
            history_len=cfg.history_len, show_attributes=self.show, answer_size=cfg.answer_size,
            max_new_tokens=cfg.max_completion_length, eos_token_id=self.eos)
        (self.out / f"eval_{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        return result

    def _log(self, row: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def save(self, name: str | None = None) -> Path:
        """An atomic checkpoint: HF-format model + tokenizer, optimizer, RNG, curriculum, step."""
        name = name or (f"checkpoint-{self.step_no}" if self.phase == "rl" else f"checkpoint-sft-{self.sft_step_no}")
        final = self.out / name
        tmp = atomic_dir(final)
        save_model(self.model, tmp)
        self.tokenizer.save_pretrained(str(tmp))
        opt = self.optimizer.state_dict()
        tensors = {f"state.{i}.{k}": v.contiguous() for i, st in opt["state"].items() for k, v in st.items()}
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for d, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{d}"] = s
        # In a subdirectory: the checkpoint's top level is a plain HF model directory.
        (tmp / "trainer_state").mkdir()
        save_file(tensors, str(tmp / "trainer_state" / "tensors.safetensors"))
        state = {
            "phase": self.phase, "step": self.step_no, "sft_step": self.sft_step_no, "nan_streak": self.nan_streak,
            "param_groups": opt["param_groups"], "curriculum": self.curriculum.state_dict(),
            "python_rng": random.getstate(), "numpy_rng": np.random.get_state()[1].tolist(), "config": asdict(self.cfg),
        }
        (tmp / "trainer_state" / "state.json").write_text(json.dumps(state) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoints(self.out)[:-self.cfg.save_total_limit] if self.cfg.save_total_limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _load_state(self, path: Path) -> None:
        state = json.loads((path / "trainer_state" / "state.json").read_text())
        tensors = load_file(str(path / "trainer_state" / "tensors.safetensors"))
        self.phase, self.step_no, self.sft_step_no = state["phase"], state["step"], state["sft_step"]
        self.nan_streak = state["nan_streak"]
        self.curriculum.load_state_dict(state["curriculum"])
        opt_state: dict = {}
        for key, v in tensors.items():
            if key.startswith("state."):
                _, i, k = key.split(".", 2)
                opt_state.setdefault(int(i), {})[k] = v
        if self.phase == "sft":
            self.optimizer = self._optimizer(self.cfg.sft_learning_rate)
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python_rng"]))
        # Truncate metrics written after this checkpoint by the interrupted run.
        mpath = self.out / "metrics.jsonl"
        if mpath.exists():
            keep = [ln for ln in mpath.read_text().splitlines() if self._before(json.loads(ln))]
            mpath.write_text("".join(ln + "\n" for ln in keep))

    def _before(self, row: dict) -> bool:
        if row.get("phase") == "sft":
            return self.phase == "rl" or row["sft_step"] <= self.sft_step_no
        return row.get("step", 0) <= self.step_no

    # --- the whole run
    def run(self, until_step: int | None = None) -> dict:
        """SFT (if asked), then RL to --max-steps; returns the final evaluation (if any).

        until_step: stop as if interrupted after that RL step (tests of resume)."""
        cfg = self.cfg
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        results = {}
        try:
            if self.phase == "sft":
                if cfg.sft_steps > self.sft_step_no:
                    with tqdm(total=cfg.sft_steps, initial=self.sft_step_no, desc="sft", dynamic_ncols=True) as bar:
                        self.sft(bar)
                    if self.stop_requested:
                        raise TrainingStopped(f"stopped during SFT; checkpoint {self.save().name} written")
                    results["sft"] = self.evaluate("sft")
                    print(summary_line("after SFT", results["sft"]))
                self._start_rl()
            with tqdm(total=cfg.max_steps, initial=self.step_no, desc="rl", dynamic_ncols=True) as bar:
                while self.step_no < cfg.max_steps:
                    try:
                        row = self.step()
                    except TrainingStopped as e:  # repeated NaN: the skipped updates left the weights intact
                        raise TrainingStopped(f"{e}; checkpoint {self.save().name} written") from None
                    self._log(row)
                    bar.update(1)
                    bar.set_postfix(reward=f"{row['reward_mean']:.3f}", hit=f"{row['hit_rate']:.2f}", kl=f"{row['kl']:.4f}")
                    if cfg.eval_every and self.step_no % cfg.eval_every == 0 and self.step_no < cfg.max_steps:
                        res = self.evaluate(f"step{self.step_no}")
                        self._log({"step": self.step_no, "eval": res["overall"]})
                    if self.step_no % cfg.save_every == 0 and self.step_no < cfg.max_steps:
                        self.save()
                    if self.stop_requested or self.step_no == until_step:
                        if self.step_no % cfg.save_every:
                            self.save()
                        raise TrainingStopped(f"stopped at step {self.step_no}; resume with --resume")
            final = self.out / "final"
            shutil.rmtree(final, ignore_errors=True)
            self.save("final")
            if cfg.max_steps == 0 and "sft" in results:  # nothing changed since the SFT evaluation
                results["final"] = results["sft"]
                (self.out / "eval_final.json").write_text((self.out / "eval_sft.json").read_text())
            else:
                results["final"] = self.evaluate("final")
            print(summary_line("final", results["final"]))
            return results
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)

    def _start_rl(self) -> None:
        """SFT is over: the current weights become the reference, the optimizer starts fresh."""
        self.phase = "rl"
        self.optimizer = self._optimizer(self.cfg.learning_rate)
        if self.cfg.beta != 0 and self.cfg.sft_steps > 0:
            ref_dir = self.out / "reference"
            tmp = atomic_dir(ref_dir)
            save_model(self.model, tmp)
            shutil.rmtree(ref_dir, ignore_errors=True)
            tmp.rename(ref_dir)
            self.ref = self._frozen(ref_dir)
        if self.rollout_model is not self.model:
            with torch.no_grad():
                for dst, src in zip(self.rollout_model.parameters(), self.model.parameters()):
                    dst.copy_(src)

    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.stop_requested = True
        tqdm.write(f"signal {signal.Signals(signum).name}: finishing this step, then writing a checkpoint")


def summary_line(name: str, result: dict) -> str:
    o = result["overall"]
    return (f"[{name}] hit@1 {o['hit@1']:.3f}  ndcg@5 {o['ndcg@5']:.3f}  format_ok {o['format_ok']:.3f}  "
            f"hallucination {o['hallucination']:.3f}  n={o['count']}")
