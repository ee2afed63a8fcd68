"""The ReRec training step: sample -> score -> advantages -> update.

One RL step (`Trainer.step`):
  1. the curriculum picks B training queries; each gets its candidate set and chat prompt
  2. the sampler draws G completions per prompt (static KV cache, no grad), with its log-probs
  3. the scorer gives every completion its dual-graph reward (format, NDCG, QAS, PAS)
  4. RAAE marks the tokens of reasoning that argued for a wrong item; group-normalised
     advantages, lowered on those tokens (raae.py)                 (--no-raae: plain GRPO)
  5. mu passes of the clipped GRPO loss (+ k3 KL to a frozen reference) over length-sorted
     micro-batches; one AdamW step per pass
An optional SFT warm start on the queries' gold reasoning runs first (`Trainer.sft_step`).
Everything around the steps — checks, output directory, checkpoints, resume, signals, logging —
is the run's lifecycle, in run.py.

Precision (--precision): on CUDA the policy keeps float32 master weights and runs under bf16
autocast (a 5e-6 update is below bf16's resolution); rollouts come from a copy with bf16 matmul
weights sampling under the same autocast (model.frozen_copy: the policy's arithmetic at half the
bytes per decode step). The sampler's per-token log-probs travel with the batch, so the gap between
the policy that sampled and the one differentiated is logged and, by truncated importance sampling
(--tis-cap, on by default under bf16), corrected.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist
from . import raae, user_rewards
from .config import Config, reward_weights
from .curriculum import difficulty, make_curriculum
from .data import Dataset, Query
from .evaluate import evaluate_policy, stratified_head
from .grpo import StepNorm, loss_type_name, policy_loss
from .model import (CausalLM, copy_weights, frozen_copy, load_model, load_tokenizer, shared_token_logprobs,
                    token_logprobs)
from .querygen import fresh_queries
from .prompts import CandidateSampler, eos_ids, item_facts, render_prompt, render_sft_target, turn_end_id
from .rewards import RewardBreakdown, RewardConfig, Scorer
from .sampling import DecoderPool, generate


PAD_MULTIPLE = 64  # on CUDA, update and SFT batches are padded to a multiple of this many positions


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (signal, repeated NaN). `signum` is the signal, if one."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


@dataclass
class Batch:
    """One step's rollouts, flattened: row r continues prompt r // G."""

    queries: list[Query]  # [B]
    indices: list[int] | None  # [B] rows of the train split (for the curriculum); None for given queries
    candidates: list[list[str] | None]  # [B]
    prompt_ids: list[list[int]]  # [B]
    completions: list[list[int]]  # [B*G] sampled ids
    sampler_logprobs: list[list[float]]  # [B*G] the sampler's log-prob of each sampled id
    truncated: list[bool]  # [B*G]
    texts: list[str] = field(default_factory=list)  # [B*G] decoded responses
    spans: list[np.ndarray] = field(default_factory=list)  # [B*G] char span per token [T_r, 2]


def uses_bf16(cfg: Config, device: torch.device) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def wants_checkpointing(cfg: Config, device: torch.device) -> bool:
    """--gradient-checkpointing auto: on for CUDA, where a 1.5B step's activations would not fit
    beside the weights, optimiser and reference (~31 GiB for 8 x 1.1k tokens); off on CPU."""
    return cfg.gradient_checkpointing == "on" or (cfg.gradient_checkpointing == "auto" and device.type == "cuda")


class Trainer:
    """The policy, its sampling copy and reference, the scorer, the curriculum and the optimiser,
    with one method per stage of a step. `model_dir` holds the weights to start from (a base model
    or a checkpoint); `reference_dir`, when given, the frozen reference's."""

    def __init__(self, cfg: Config, ds: Dataset, model_dir: str | Path, device: torch.device,
                 reference_dir: str | Path | None = None):
        self.cfg, self.ds, self.device = cfg, ds, device
        self.bf16 = uses_bf16(cfg, device)
        torch.manual_seed(cfg.seed)
        self._sft_queries: list[Query] | None = None  # built on first use (sft_queries)
        # RL's query pool: the train split, or (--rl-fresh N) N new queries per type that no other
        # split and no SFT query asks, so RL cannot profit from answers SFT or earlier epochs memorised.
        self.train_queries = list(ds.queries["train"])
        if cfg.rl_fresh:
            seen = ds.all_queries() + (self.sft_queries() if cfg.sft_fresh else [])
            self.train_queries = self._fresh(cfg.rl_fresh, cfg.seed + 104729, seen)
        self.candidates = CandidateSampler(ds)
        self.show = tuple(a for a in cfg.show_attributes.split(",") if a)

        self.tokenizer = load_tokenizer(str(model_dir))
        self.model = load_model(str(model_dir), device=device, dtype=torch.float32)
        self.model.gradient_checkpointing = wants_checkpointing(cfg, device)
        self.eos = eos_ids(self.tokenizer, self.model.cfg.hf, model_dir)
        self.turn_end = turn_end_id(self.tokenizer)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos[0]
        # Sampling runs from a bf16-matmul copy in bf16 mode (frozen_copy: the policy's own arithmetic
        # under autocast, at half the bytes per decode step), refreshed after every change of the weights.
        # Under --fsdp always from a whole copy: the sharded policy would gather its weights every token.
        self.rollout_model = frozen_copy(self.model, True, device) if self.bf16 else self.model
        if cfg.fsdp:
            if self.rollout_model is self.model:
                self.rollout_model = frozen_copy(self.model, False, device)
            dist.shard(self.model)  # from here on each rank holds 1/N of the weights, gradients and moments
        self.decoders = DecoderPool()  # CUDA graphs captured once, replayed by every step
        # The frozen reference (beta > 0 only) is the model RL starts from; start_rl() sets it.
        self.ref = None
        if cfg.beta != 0 and reference_dir is not None:
            self.ref = self._frozen(load_model(str(reference_dir), device=torch.device("cpu"), dtype=torch.float32))

        w_fmt, w_rec, w_qas, w_pas = (0.0,) * 4 if cfg.no_builtin_rewards else reward_weights(cfg)
        self.scorer = Scorer(ds, RewardConfig(w_format=w_fmt, w_rec=w_rec, w_qas=0.0 if cfg.no_qas else w_qas,
                                              w_pas=0.0 if cfg.no_pas else w_pas, k=cfg.answer_size,
                                              format_needs_candidate=cfg.format_needs_candidate))
        # --reward-fn: the user's terms, added to the scorer's total (user_rewards.py)
        self.reward_fns = user_rewards.load_all(cfg.reward_fn, cfg.reward_fn_weights)
        self.curriculum = make_curriculum(cfg.curriculum, len(self.train_queries), seed=cfg.seed, tau=cfg.tau,
                                          batch_size=cfg.batch_size, total_steps=cfg.max_steps)
        self.phase, self.step_no, self.sft_step_no, self.nan_streak = "sft", 0, 0, 0
        self.optimizer = self._optimizer(cfg.sft_learning_rate if cfg.sft_steps else cfg.learning_rate)

    # ------------------------------------------------------------------------- setup

    def _frozen(self, model: CausalLM) -> CausalLM:
        where = torch.device("cpu") if self.cfg.ref_offload else self.device
        return frozen_copy(model, self.bf16, where)

    def _optimizer(self, lr: float) -> torch.optim.Optimizer:
        # fused on CUDA: one kernel for all parameters, and none of foreach's temporaries (GBs at 1.5B)
        return torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.99),
                                 weight_decay=self.cfg.weight_decay, eps=1e-8, fused=self.device.type == "cuda")

    @property
    def tis_cap(self) -> float:
        """--tis-cap, with -1 resolved: on (2) when sampling in bf16. The bf16 sampler runs other kernels
        than training (one row per token vs whole sequences), so its log-probs differ from the policy's
        by bf16 rounding (SmolLM2-135M on CPU: 0.019 on average, 0.29 at most); TIS corrects that."""
        return (2.0 if self.bf16 else 0.0) if self.cfg.tis_cap < 0 else self.cfg.tis_cap

    def autocast(self, cache: bool = True):
        """bf16 autocast under --precision bf16. cache=False: cast each float32 weight where it is used
        instead of keeping every bf16 cast until the context exits (the whole trunk's, 2.6 GB at 1.5B)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=cache)

    def lr_at(self, step: int, base: float) -> float:
        """RL: linear warmup, then constant."""
        return base * min(1.0, (step + 1) / max(1, self.cfg.warmup_steps))

    def sft_lr_at(self, step: int) -> float:
        """SFT: linear warmup, then constant, or with --sft-lr-decay a cosine decay to 0 at --sft-steps.
        Ending at a small learning rate sharpens a model trained from scratch: on the demo, answers
        restating the request's values exactly went from 4 to 11 of 40 explicit queries (BENCHMARKS.md)."""
        lr = self.lr_at(step, self.cfg.sft_learning_rate)
        if self.cfg.sft_lr_decay:
            lr *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, self.cfg.sft_steps))))
        return lr

    def sft_candidates(self, step: int) -> int:
        """Candidates per SFT prompt at `step`: --num-candidates, or with --sft-candidate-ramp F, 2 at
        the start growing evenly to --num-candidates at step F * --sft-steps. Finding the line that
        has the requested values among 2 lines is learnt quickly and carries over to 8; among 8 from
        the start it was not learnt at all in the demo's budget (BENCHMARKS.md). Short prompts
        early also make the first steps cheaper."""
        n, ramp = self.cfg.num_candidates, self.cfg.sft_candidate_ramp
        if ramp <= 0 or n <= 2:
            return n
        return 2 + round((n - 2) * min(1.0, step / (ramp * max(1, self.cfg.sft_steps))))

    def sync_rollout_model(self) -> None:
        """Copy the trained weights into the bf16 sampling copy (a no-op when they are one model).
        Called after every change of the weights: an update, the end of SFT, a resume."""
        if self.rollout_model is not self.model:
            copy_weights(self.rollout_model, self.model)

    def start_rl(self) -> None:
        """SFT is over (or there was none): the current weights become the frozen reference and the
        optimiser starts afresh with the RL learning rate."""
        self.phase = "rl"
        self.optimizer = self._optimizer(self.cfg.learning_rate)
        if self.cfg.beta != 0:
            self.ref = self._frozen(self.model)
        self.sync_rollout_model()

    def prompt_ids(self, q: Query, candidates) -> list[int]:
        text = render_prompt(q, self.ds, candidates, self.tokenizer, history_len=self.cfg.history_len,
                             show_attributes=self.show, answer_size=self.cfg.answer_size,
                             request_last=self.cfg.request_last, examples=self.cfg.prompt_examples,
                             examples_from=self.cfg.prompt_example_pool)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _padded(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids [n, T] and the mask of real tokens [n, T], on the CPU."""
        T = max(map(len, seqs))
        if self.device.type == "cuda":  # few distinct shapes: cuDNN attention (torch's default on H100/H200)
            T = -(-T // PAD_MULTIPLE) * PAD_MULTIPLE  # builds a plan per new shape, ~100 ms each
        ids = torch.full((len(seqs), T), self.pad, dtype=torch.long)
        real = torch.zeros((len(seqs), T), dtype=torch.bool)
        for i, x in enumerate(seqs):
            ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
            real[i, :len(x)] = True
        return ids, real

    def _pack(self, prompts: list[list[int]], completions: list[list[int]], move: bool = True):
        """Right-padded [N, T] ids and the [N, T] mask of completion tokens (the targets), on the device
        (move=False: on the CPU, for more assembly first)."""
        ids, real = self._padded([p + c for p, c in zip(prompts, completions)])
        mask = real & (torch.arange(ids.shape[1]) >= torch.tensor([len(p) for p in prompts])[:, None])
        return (ids.to(self.device), mask.to(self.device)) if move else (ids, mask)

    # ------------------------------------------------------------------------- SFT warm start

    def sft_queries(self) -> list[Query]:
        """The warm start's queries: the train split, or (--sft-fresh N) N new queries per type that
        are none of the train or test queries. Deterministic for a seed (a resume rebuilds the same)."""
        if self._sft_queries is None:
            self._sft_queries = (self._fresh(self.cfg.sft_fresh, self.cfg.seed + 7919, self.ds.all_queries())
                                 if self.cfg.sft_fresh else list(self.ds.queries["train"]))
        return self._sft_queries

    def _fresh(self, per_type: int, seed: int, exclude: list[Query]) -> list[Query]:
        """`per_type` new queries of each type from the dataset's catalogue and histories, none the same
        question as any of `exclude` (deterministic for a seed: a resume rebuilds the same ones)."""
        ds = self.ds
        histories = {u: ds.history(u) for u in ds.interactions.user_ids}
        return fresh_queries(list(ds.items.values()), histories, ds.users, per_type=per_type, seed=seed,
                             exclude=exclude)

    def sft_target(self, q: Query, candidates: list[str] | None, step: int) -> str:
        """What SFT teaches for q: its gold reasoning and answer, or with --sft-source format only
        \\boxed{} around one of its candidates drawn at random: the answer format, and nothing about
        which item to name (the ground truth is drawn at chance rate)."""
        if self.cfg.sft_source != "format":
            return render_sft_target(q, self.ds)
        rng = random.Random(f"{self.cfg.seed}:format:{step}:{q.query_id}")
        return f"\\boxed{{{self.ds.items[rng.choice(candidates or self.ds.item_ids)].title}}}"

    def sft_step(self) -> dict:
        """One teacher-forced step on gold reasoning, or with --sft-source self on the model's own
        correct answers (+ optionally an LM loss on the prompt, and on --sft-facts passages of
        catalogue facts)."""
        cfg, s = self.cfg, self.sft_step_no
        # Epoch e visits the queries in a seeded order, each with freshly drawn candidates (a new
        # candidate seed per epoch: the model must read the list, not memorise it).
        pool = self.sft_queries()
        per_epoch = max(1, len(pool) // cfg.sft_batch_size)
        epoch, k = divmod(s, per_epoch)
        order = random.Random(f"{cfg.seed}:sft:{epoch}").sample(range(len(pool)), len(pool))
        batch = [(pool[i], self.candidates.sample(pool[i], self.sft_candidates(s), cfg.hard_negatives,
                                                  seed=cfg.seed + 1000 * (epoch + 1), negatives=cfg.negatives))
                 for i in order[k * cfg.sft_batch_size:(k + 1) * cfg.sft_batch_size]]
        batch = dist.share(batch)  # under torchrun, this rank's share of the step's queries
        extra = {}
        if cfg.sft_source == "self":
            rows, extra = self.own_correct_answers(batch)
        else:
            # The target ends with the token the chat template closes an assistant turn with
            # (<|im_end|>, Llama-3's <|eot_id|>): what the model must emit to stop.
            rows = [(self.prompt_ids(q, c), self.tokenizer.encode(self.sft_target(q, c, s), add_special_tokens=False)
                     + [self.turn_end]) for q, c in batch]
        # Fact passages (a model from scratch knows no film): the whole passage is the target.
        rng = random.Random(f"{cfg.seed}:facts:{s}")
        items = list(self.ds.items.values())
        facts = []
        for _ in range(cfg.sft_facts):
            ids = self.tokenizer.encode(item_facts(rng.choice(items), rng), add_special_tokens=False)
            facts.append((ids[:1], ids[1:]))
        facts = dist.share(facts)
        rows += facts
        # --fsdp: a forward is a collective, so a rank with nothing to learn (RFT found no right answer)
        # still runs one, on a one-token row that teaches nothing
        empty = not rows and self.cfg.fsdp
        if empty:
            rows = [([self.pad], [self.pad])]
        for group in self.optimizer.param_groups:
            group["lr"] = self.sft_lr_at(s)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        counts = {"gold": 0.0, "fact": 0.0, "prompt": 0.0}
        if rows:  # --sft-source self may have found no right answer
            ids, mask = self._pack([p for p, _ in rows], [c for _, c in rows])
            fact = mask & (torch.arange(len(rows), device=ids.device) >= len(rows) - len(facts))[:, None]
            gold = mask & ~fact
            # The prompt's own tokens (after the first) are scored too when they carry weight: a model
            # trained from scratch has no pretraining, and predicting the candidate lines teaches it the
            # catalogue and how to copy from the context.
            lengths = torch.tensor([len(p) + len(c) for p, c in rows], device=ids.device)
            prompt = (torch.arange(ids.shape[1], device=ids.device) < lengths[:, None]) & ~mask
            prompt[:, 0] = False
            if empty:
                gold, fact, prompt = gold & False, fact & False, prompt & False
            with self.autocast():
                lp = token_logprobs(self.model, ids, mask | prompt if cfg.sft_prompt_weight else mask,
                                    chunk_size=cfg.logprob_chunk)
            counts = {"gold": float(gold.sum()), "fact": float(fact.sum()), "prompt": float(prompt.sum())}
        # Each term is a mean over the whole step's tokens (every rank's, under torchrun), so the ranks'
        # losses, and their gradients, add up to one process's.
        n = dist.totals(counts)
        loss = torch.zeros(())
        if rows:
            loss = -(lp * gold).sum() / max(n["gold"], 1.0)
            if cfg.sft_facts:
                loss = loss - (lp * fact).sum() / max(n["fact"], 1.0)
            if cfg.sft_prompt_weight:
                loss = loss - cfg.sft_prompt_weight * (lp * prompt).sum() / max(n["prompt"], 1.0)
            loss.backward()
        if n["gold"] + n["fact"] == 0:  # not one target on any rank: nothing to learn from this step
            self.sft_step_no += 1
            return {"phase": "sft", "sft_step": self.sft_step_no, "loss": float("nan"), "grad_norm": 0.0,
                    "learning_rate": self.sft_lr_at(s), **extra}
        dist.sum_gradients(self.model.parameters())
        loss_value = dist.total(loss.item())
        gn = dist.clip_grad_norm(self.model.parameters(), cfg.max_grad_norm)
        if math.isfinite(loss_value) and torch.isfinite(gn):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)  # gradients live from backward to step, no longer
            self.nan_streak = 0
        else:  # as in RL: skip the update, stop after three in a row
            self.nan_streak += 1
            if self.nan_streak >= 3:
                raise TrainingStopped("the SFT loss was NaN/inf in 3 steps in a row; stopping "
                                      "(try a lower --sft-learning-rate)")
        self.sft_step_no += 1
        if cfg.sft_source == "self":
            self.sync_rollout_model()  # the next step samples from these weights
        return {"phase": "sft", "sft_step": self.sft_step_no, "loss": loss_value, "grad_norm": gn.item(),
                "learning_rate": self.optimizer.param_groups[0]["lr"], **extra}

    def own_correct_answers(self, batch: list[tuple[Query, list[str] | None]]) -> tuple[list, dict]:
        """Rejection sampling (RFT, --sft-source self): --num-generations samples per query from the
        current model at --temperature; the distinct ones that name a ground-truth item and end by
        themselves become SFT targets. -> ([(prompt ids, completion ids)], stats to log)."""
        cfg, G = self.cfg, self.cfg.num_generations
        prompts = [self.prompt_ids(q, c) for q, c in batch]
        self.rollout_model.eval()
        with self.autocast():
            ro = generate(self.rollout_model, prompts, max_new_tokens=cfg.max_completion_length, num_samples=G,
                          temperature=cfg.temperature, top_p=cfg.top_p, eos_token_id=self.eos,
                          seed=cfg.seed * 7919 + self.sft_step_no, pool=self.decoders)
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in ro.completions]
        r = self.scorer.score([q for q, _ in batch for _ in range(G)], texts, [c for _, c in batch for _ in range(G)])
        rows, seen = [], set()
        for k, comp in enumerate(ro.completions):
            if r.hit[k] and not ro.truncated[k] and (k // G, tuple(comp)) not in seen:
                seen.add((k // G, tuple(comp)))
                rows.append((prompts[k // G], comp))
        return rows, {"sft/self_hit_rate": float(np.mean(r.hit)), "sft/self_targets": len(rows),
                      "sft/self_queries_with_target": len({q for q, _ in seen})}

    # ------------------------------------------------------------------------- one RL step

    def rollout(self, queries: list[Query] | None = None) -> Batch:
        """G samples for each of B queries: the curriculum's next batch, or the given queries (explain.py)."""
        cfg = self.cfg
        idx = None
        if queries is None:  # rank 0's choice; under torchrun each rank takes its share of the groups
            idx = dist.share(dist.broadcast(self.curriculum.next_batch(cfg.batch_size)))
            queries = [self.train_queries[i] for i in idx]
        cands = [self.candidates.sample(q, cfg.num_candidates, cfg.hard_negatives, seed=cfg.seed,
                                        negatives=cfg.negatives) for q in queries]
        prompts = [self.prompt_ids(q, c) for q, c in zip(queries, cands)]
        self.rollout_model.eval()
        with self.autocast():  # the sampling copy computes what the policy computes under autocast
            rows = len(prompts) * cfg.num_generations  # this rank's rows among the step's (the same draws)
            ro = generate(self.rollout_model, prompts, max_new_tokens=cfg.max_completion_length,
                          num_samples=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
                          eos_token_id=self.eos, seed=cfg.seed * 1_000_003 + self.step_no, pool=self.decoders,
                          row_offset=dist.rank() * rows, total_rows=dist.world() * rows if dist.world() > 1 else None)
        return Batch(queries, idx, cands, prompts, ro.completions, ro.logprobs, ro.truncated)

    def score(self, b: Batch) -> RewardBreakdown:
        G = self.cfg.num_generations
        for ids in b.completions:
            text, spans = raae.token_char_spans(self.tokenizer, ids)
            b.texts.append(text)
            b.spans.append(spans)
        rep_q = [q for q in b.queries for _ in range(G)]
        rep_c = [c for c in b.candidates for _ in range(G)]
        r = self.scorer.score(rep_q, b.texts, rep_c)
        if self.reward_fns:  # the user's terms join the total (with --no-builtin-rewards they are all of it)
            prompts = [self.tokenizer.decode(p) for p in b.prompt_ids]
            cols = user_rewards.columns(self.ds, rep_q, rep_c, [prompts[k // G] for k in range(len(b.texts))],
                                        b.texts, b.completions, r.parsed)
            r.user = user_rewards.evaluate(self.reward_fns, cols)
            r.total = r.total + user_rewards.weighted_sum(self.reward_fns, r.user, len(r.total))
        return r

    def wrong_segments(self, b: Batch, r: RewardBreakdown) -> list[list[tuple[int, int]]]:
        """Per rollout, the char spans of RAAE's wrong segments: the reasoning that mentions a wrong
        top item (the paper's rule), and with --raae-claims false claims about an item."""
        cfg, G = self.cfg, self.cfg.num_generations
        out = []
        for k, text in enumerate(b.texts):
            wrong = []
            # RAAE reads the ground truth: off when the built-in terms are, and in the shuffled control
            if not (cfg.no_raae or cfg.no_builtin_rewards or cfg.shuffle_rewards) and r.parsed[k]:
                top = self.ds.items[r.parsed[k][0]]
                claims = self.claims(b.queries[k // G], b.candidates[k // G], r.parsed[k]) if cfg.raae_claims else ()
                wrong = raae.wrong_segments(text, top.title, bool(r.hit[k]), claims=claims)
            out.append(wrong)
        return out

    def advantage_rewards(self, r: RewardBreakdown) -> np.ndarray:
        """[N] the rewards the advantages are computed from: r.total (under torchrun every rank's,
        gathered: N is the whole step's B*G), or with --shuffle-rewards (the control) those permuted
        across the step's rollouts, so that no reward belongs to the rollout that earned it. Seeded
        by (seed, step): a resumed run, and every rank, draws the same permutation."""
        total = dist.concat(dist.gather(r.total))
        if not self.cfg.shuffle_rewards:
            return total
        return total[np.random.default_rng([self.cfg.seed, self.step_no, 24]).permutation(len(total))]

    def advantages(self, b: Batch, r: RewardBreakdown) -> raae.Advantages:
        """Token advantages per rollout: group-normalised, lowered on RAAE's wrong segments. Under
        torchrun: of the whole step's rollouts (every rank's masks and rewards gathered), so that
        --scale-rewards batch sees the batch one process would; `step` takes this rank's rows."""
        cfg = self.cfg
        penalised = [raae.in_spans(spans, wrong) for spans, wrong in zip(b.spans, self.wrong_segments(b, r))]
        penalised = dist.concat(dist.gather(penalised))
        rewards = self.advantage_rewards(r)  # the whole step's; --shuffle-rewards: permuted
        return raae.group_advantages(penalised, rewards, cfg.num_generations, penalty=cfg.raae_penalty,
                                     scale=cfg.scale_rewards, floor=cfg.raae_floor, mode=cfg.raae_advantage)

    def difficulties(self, r: RewardBreakdown) -> list[float]:
        """Each query's difficulty from its G rollouts (what the curriculum learns from)."""
        G = self.cfg.num_generations
        return [difficulty(r.rec[i:i + G], r.total[i:i + G], self.cfg.difficulty_metric) for i in range(0, len(r.rec), G)]

    def claims(self, q: Query, cands, parsed):
        """(title, conditions it lacks) for the items a rollout could talk about."""
        out = []
        for iid in dict.fromkeys(list(cands or []) + list(parsed)):
            it = self.ds.items[iid]
            lacking = [c for c in q.conditions if not it.has(*c)]
            if lacking:
                out.append((it.title, lacking))
        return out

    def shares_prompt(self, b: Batch) -> bool:
        """--share-prompt for this step: on, off, or auto (on when the prompt tokens sharing saves, (G - 1)
        per group, are at least as many as one completion's: (G - 1) x mean prompt >= mean completion).
        BENCHMARKS.md, "Shared-prompt update", has the measured ratios behind the rule."""
        mode, G = self.cfg.share_prompt, self.cfg.num_generations
        if mode != "auto":
            return mode == "on"
        if self.device.type == "cuda":
            # On an H200 the shared update was slower (0.62x at the paper's shape on the 1.5B architecture):
            # its attention over gathered prompt keys takes a masked kernel, where the unshared one runs
            # flash attention on plain causal sequences and the GPU has the FLOPs to spare.
            return False
        prompt = float(np.mean([len(p) for p in b.prompt_ids]))
        completion = float(np.mean([len(c) for c in b.completions]))
        return (G - 1) * prompt >= completion

    def trained_rows(self, b: Batch, share: bool = False) -> list[int]:
        """The rollouts the update trains on (truncated ones masked unless --keep-truncated), longest
        first so that each micro-batch pads little; with `share`, a group's rollouts stay together (a
        micro-batch computes each of its prompts once), longest groups first."""
        G = self.cfg.num_generations
        rows = [r for r in range(len(b.completions)) if b.completions[r]]
        if not self.cfg.keep_truncated:
            rows = [r for r in rows if not b.truncated[r]]
        if share:
            longest: dict[int, int] = {}
            for r in rows:
                longest[r // G] = max(longest.get(r // G, 0), len(b.completions[r]))
            return sorted(rows, key=lambda r: (-len(b.prompt_ids[r // G]) - longest[r // G], r // G,
                                               -len(b.completions[r])))
        return sorted(rows, key=lambda r: len(b.prompt_ids[r // G]) + len(b.completions[r]), reverse=True)

    def micro_batch(self, b: Batch, adv: list[np.ndarray], rows: list[int], share: bool = False) -> dict:
        """Tensors of the given rollouts, on the device.

        Unshared: ids and mask [n, T] (prompt + completion, mask on the completion), advantages and
        sampler log-probs [n, T]. Shared: prompts [p, Tp] (each of these rows' prompts once) with
        prompt_len [p], group [n] (each row's prompt), and ids, mask, advantages, sampler log-probs
        [n, Tc] over the completions alone. Either way adv/sampler/mask align with what `logprobs`
        returns. Also the trunk's work for the FLOP count: tokens, and sum of squared attention spans."""
        G = self.cfg.num_generations
        if share:
            groups = list(dict.fromkeys(r // G for r in rows))
            prompts, _ = self._padded([b.prompt_ids[g] for g in groups])
            plen = [len(b.prompt_ids[g]) for g in groups]
            ids, mask = self._padded([b.completions[r] for r in rows])
            out = {"prompts": prompts, "prompt_len": torch.tensor(plen),
                   "group": torch.tensor([groups.index(r // G) for r in rows])}
            clen = [len(b.completions[r]) for r in rows]
            P = [len(b.prompt_ids[r // G]) for r in rows]
            work = (sum(plen) + sum(clen), sum(n * n for n in plen) + sum(c * c + 2 * c * p for c, p in zip(clen, P)))
        else:
            ids, mask = self._pack([b.prompt_ids[r // G] for r in rows], [b.completions[r] for r in rows], move=False)
            out = {}
            lengths = [len(b.prompt_ids[r // G]) + len(b.completions[r]) for r in rows]
            work = (sum(lengths), sum(n * n for n in lengths))
        a = torch.zeros(mask.shape, dtype=torch.float32)
        slp = torch.zeros(mask.shape, dtype=torch.float32)
        for j, r in enumerate(rows):
            a[j, mask[j]] = torch.from_numpy(adv[r])
            slp[j, mask[j]] = torch.tensor(b.sampler_logprobs[r], dtype=torch.float32)
        out.update(ids=ids, mask=mask, adv=a, sampler=slp)
        return {**{k: v.to(self.device) for k, v in out.items()}, "trunk_tokens": work[0], "seq_sq": work[1]}

    def logprobs(self, model: CausalLM, m: dict, with_entropy: bool = False):
        """Log-probs (and entropies) of a micro-batch's completion tokens under `model`, aligned with
        m["mask"], in either layout of `micro_batch`."""
        kw = dict(temperature=self.cfg.temperature, chunk_size=self.cfg.logprob_chunk, with_entropy=with_entropy)
        if "prompts" in m:
            return shared_token_logprobs(model, m["prompts"], m["prompt_len"], m["ids"], m["mask"], m["group"], **kw)
        return token_logprobs(model, m["ids"], m["mask"], **kw)

    def micro_batches(self, b: Batch, adv: list[np.ndarray]) -> tuple[list[int], list[dict], StepNorm]:
        """(trained rows, their micro-batches of --micro-batch-size rollouts, the step's normaliser)."""
        cfg = self.cfg
        share = self.shares_prompt(b)
        rows = self.trained_rows(b, share)
        micro = [self.micro_batch(b, adv, rows[i:i + cfg.micro_batch_size], share)
                 for i in range(0, len(rows), cfg.micro_batch_size)]
        # the whole step's counts (every rank's, under torchrun): each rank's loss is its share of one loss
        norm = StepNorm(tokens=int(dist.total(sum(int(m["mask"].sum()) for m in micro))), seqs=int(dist.total(len(rows))),
                        max_len=cfg.max_completion_length, micro_batches=int(dist.total(len(micro))))
        if cfg.fsdp:  # every forward is a collective: each rank runs as many as the busiest, the extra ones empty
            most = int(dist.totals({"n": len(micro)}, maxima=("n",))["n"])
            micro += [self.empty_micro_batch() for _ in range(most - len(micro))]
        return rows, micro, norm

    def empty_micro_batch(self) -> dict:
        """--fsdp padding: one two-token row that goes through the whole model (so that every unit
        gathers and reduces as on the other ranks) and that `update` trains with a loss of 0 x its
        log-prob: a zero gradient, and nothing in the step's statistics."""
        z = torch.zeros((1, 2), dtype=torch.float32, device=self.device)
        return {"ids": torch.full((1, 2), self.pad, dtype=torch.long, device=self.device),
                "mask": torch.tensor([[False, True]], device=self.device), "adv": z, "sampler": z.clone(),
                "trunk_tokens": 0, "seq_sq": 0, "empty": True}

    def update(self, b: Batch, adv: list[np.ndarray]) -> dict:
        """mu optimiser steps of the GRPO loss over length-sorted micro-batches."""
        cfg, G = self.cfg, self.cfg.num_generations
        rows, micro, norm = self.micro_batches(b, adv)
        lengths = [len(b.prompt_ids[r // G]) + len(b.completions[r]) for r in rows]
        stats = {"kl": 0.0, "entropy": 0.0, "grad_norm": 0.0, "loss": 0.0, "skipped_updates": 0,
                 "clip_ratio/region_mean": 0.0, "clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": 0.0,
                 "sampling/logp_diff_mean": 0.0, "sampling/logp_diff_max": 0.0, "sampling/ratio_off_frac": 0.0,
                 "update_shared_prompt": int(bool(micro) and "prompts" in micro[0]),
                 "update_seq_len": sum(lengths) / max(len(lengths), 1),
                 # the work the trunk does per pass (prompts once per micro-batch when shared), for the MFU count
                 "update_tokens": sum(m["trunk_tokens"] for m in micro), "update_seq_sq": sum(m["seq_sq"] for m in micro),
                 "update_completion_tokens": sum(len(b.completions[r]) for r in rows)}
        if norm.seqs == 0:  # nothing to train on, on any rank
            return stats
        with torch.no_grad(), self.autocast():
            if self.ref is not None:
                if cfg.ref_offload:
                    self.ref.to(self.device)
                for m in micro:
                    m["ref"] = self.logprobs(self.ref, m)
                if cfg.ref_offload:
                    self.ref.to("cpu")
            if cfg.num_iterations > 1:  # the ratio's denominator: the policy before this step's updates
                self.model.eval()
                for m in micro:
                    m["old"] = self.logprobs(self.model, m)
        self.model.train()
        loss_type = loss_type_name(cfg.loss_type)
        for it in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            sums = dict.fromkeys(("kl_sum", "clipped_sum", "clipped_low_sum", "clipped_high_sum", "tokens",
                                  "entropy_sum", "loss", "diff_sum", "diff_max", "off"), 0.0)
            for m in micro:
                with self.autocast(cache=False):  # each weight is used once per forward: a cache only holds memory
                    lp, ent = self.logprobs(self.model, m, with_entropy=True)
                if m.get("empty"):
                    (lp.sum() * 0.0).backward()
                    continue
                old = m.get("old", lp.detach())
                # How far the sampler's log-probs are from the policy's (bf16 copy vs fp32 weights).
                gap = (old - m["sampler"]) * m["mask"]
                is_weight = torch.exp(gap).clamp(max=self.tis_cap) if self.tis_cap > 0 else None
                loss, s = policy_loss(lp, old, m["adv"], m["mask"], norm, ref_logp=m.get("ref"), beta=cfg.beta,
                                      eps_low=cfg.epsilon, eps_high=cfg.epsilon_high, loss_type=loss_type,
                                      is_weight=is_weight)
                loss.backward()
                for k in ("kl_sum", "clipped_sum", "clipped_low_sum", "clipped_high_sum", "tokens"):
                    sums[k] += s[k]
                sums["entropy_sum"] += float((ent.detach() * m["mask"]).sum())
                sums["loss"] += loss.item()
                if it == 0:
                    sums["diff_sum"] += float(gap.abs().sum())
                    sums["diff_max"] = max(sums["diff_max"], float(gap.abs().max()))
                    sums["off"] += float(((torch.exp(gap) - 1).abs() > 0.1).logical_and(m["mask"]).sum())
            dist.sum_gradients(self.model.parameters())  # torchrun: the whole step's gradient on every rank
            sums = dist.totals(sums, maxima=("diff_max",))
            gn = dist.clip_grad_norm(self.model.parameters(), cfg.max_grad_norm)
            if it == 0:
                n = max(sums["tokens"], 1.0)
                stats.update({"sampling/logp_diff_mean": sums["diff_sum"] / n, "sampling/logp_diff_max": sums["diff_max"],
                              "sampling/ratio_off_frac": sums["off"] / n})
            if not (math.isfinite(sums["loss"]) and torch.isfinite(gn)):
                # A NaN/inf loss must not reach the weights: skip this update, count the streak.
                self.optimizer.zero_grad(set_to_none=True)
                stats["skipped_updates"] += 1
                self.nan_streak += 1
                if self.nan_streak >= 3:
                    raise TrainingStopped("the loss was NaN/inf in 3 updates in a row; stopping "
                                          "(try a lower --learning-rate, or --max-grad-norm)")
                continue
            self.nan_streak = 0
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)  # not held through sampling and the reference pass
        n = max(sums["tokens"], 1.0)
        stats.update({"kl": sums["kl_sum"] / n, "entropy": sums["entropy_sum"] / n, "grad_norm": float(gn),
                      "loss": sums["loss"], "clip_ratio/region_mean": sums["clipped_sum"] / n,
                      "clip_ratio/low_mean": sums["clipped_low_sum"] / n,
                      "clip_ratio/high_mean": sums["clipped_high_sum"] / n})
        self.sync_rollout_model()
        return stats

    def step(self) -> dict:
        """One RL step; returns its metrics row (TRL's names where TRL has one)."""
        cfg, G = self.cfg, self.cfg.num_generations
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step_no, cfg.learning_rate)
        t0 = time.perf_counter()
        b = self.rollout()
        t1 = time.perf_counter()
        mine = self.score(b)
        t2 = time.perf_counter()
        adv = self.advantages(b, mine)  # of the whole step (every rank's rollouts, under torchrun)
        # The whole step's rewards, indices and lengths on every rank: the curriculum takes the same
        # update everywhere, and the metrics are the step's (with one process: this rank's own).
        r, indices = dist.concat(dist.gather(mine)), dist.concat(dist.gather(b.indices))
        lengths, truncated = dist.concat(dist.gather([len(c) for c in b.completions])), dist.concat(dist.gather(b.truncated))
        self.curriculum.update(indices, self.difficulties(r))
        t3 = time.perf_counter()
        first = dist.rank() * len(b.completions)
        up = self.update(b, adv.tokens[first:first + len(b.completions)])
        t4 = time.perf_counter()
        self.step_no += 1
        n_tok = sum(lengths)
        n_entries = max(int(np.sum(r.n_entries)), 1)
        groups = r.total.reshape(-1, G)
        return {
            "phase": "rl", "step": self.step_no,
            "reward": float(np.mean(r.total)), "reward_std": float(groups.std(1).mean()),
            "rewards/format/mean": float(np.mean(r.format)), "rewards/rec/mean": float(np.mean(r.rec)),
            "rewards/qas/mean": float(np.mean(r.qas)), "rewards/pas/mean": float(np.mean(r.pas)),
            **user_rewards.summary(r.user),
            "hit_rate": float(np.mean(r.hit)), "format_ok": float(np.mean(r.format > 0)),
            "hallucination_rate": float(np.sum(r.n_hallucinated)) / n_entries,
            "frac_reward_zero_std": adv.flat_groups / len(groups),
            "completions/mean_length": n_tok / len(lengths),
            "completions/clipped_ratio": float(np.mean(truncated)),
            "raae/penalised_token_frac": adv.penalised_tokens / max(n_tok, 1),
            "raae/penalty_mean": float(adv.penalty.mean()) if len(adv.penalty) else 0.0,
            "raae/penalty_max": float(adv.penalty.max()) if len(adv.penalty) else 0.0,
            **up, "learning_rate": self.optimizer.param_groups[0]["lr"],
            **{f"curriculum/{k}": v for k, v in self.curriculum.stats().items()},
            "time/sample": t1 - t0, "time/score": t2 - t1, "time/advantage": t3 - t2, "time/update": t4 - t3,
            "tokens_per_s": n_tok / max(t1 - t0, 1e-9),
        }

    # ------------------------------------------------------------------------- evaluation

    def evaluate(self) -> dict:
        """Greedy answers to the held-out split, from the sampling copy (what RL samples from)."""
        cfg = self.cfg
        queries = stratified_head(self.ds.queries[cfg.eval_split], cfg.eval_limit)
        self.rollout_model.eval()
        settings = dict(data=cfg.data, split=cfg.eval_split, count=len(queries), num_candidates=cfg.num_candidates,
                        negatives=cfg.negatives, hard_negatives=cfg.hard_negatives, seed=cfg.seed,
                        history_len=cfg.history_len, show_attributes=cfg.show_attributes, answer_size=cfg.answer_size,
                        request_last=cfg.request_last, prompt_examples=cfg.prompt_examples,
                        prompt_example_pool=cfg.prompt_example_pool, max_completion_length=cfg.max_completion_length,
                        step=self.step_no, phase=self.phase)
        with self.autocast():
            result = evaluate_policy(
                self.rollout_model, self.tokenizer, self.ds, queries, scorer=self.scorer, candidate_sampler=self.candidates,
                num_candidates=cfg.num_candidates, hard_negatives=cfg.hard_negatives, negatives=cfg.negatives,
                seed=cfg.seed, history_len=cfg.history_len, show_attributes=self.show, answer_size=cfg.answer_size,
                request_last=cfg.request_last, prompt_examples=cfg.prompt_examples,
                prompt_example_pool=cfg.prompt_example_pool,
                max_new_tokens=cfg.max_completion_length, eos_token_id=self.eos, reward_fns=self.reward_fns,
                pool=DecoderPool(max_entries=1))  # its own graphs and cache, freed after: training's stay as they are
        return {**result, "settings": settings}

    # ------------------------------------------------------------------------- state

    def weights(self) -> dict[str, torch.Tensor]:
        """The policy's weights by name, whole: under --fsdp gathered one tensor at a time (every rank
        takes part) and kept, on the CPU, by rank 0 alone (the others get {})."""
        return dist.whole(self.model.state_dict())

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything besides the weights that an exact resume needs: (tensors, JSON-able state).
        Optimiser moments, every RNG (torch CPU and CUDA, numpy, python), curriculum, counters.
        Under --fsdp the moments are gathered whole (every rank takes part; rank 0 keeps them), so the
        files are the same whatever the number of processes."""
        opt = self.optimizer.state_dict()
        tensors = dist.whole({f"state.{i}.{k}": v.contiguous()
                              for i, st in opt["state"].items() for k, v in st.items()})
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for d, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{d}"] = s
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {
            "phase": self.phase, "step": self.step_no, "sft_step": self.sft_step_no, "nan_streak": self.nan_streak,
            "param_groups": opt["param_groups"], "curriculum": self.curriculum.state_dict(),
            "python_rng": random.getstate(),
            "numpy_rng": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        }
        return tensors, state

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        self.phase, self.step_no, self.sft_step_no = state["phase"], state["step"], state["sft_step"]
        self.nan_streak = 0  # a resume after a NaN stop is a fresh attempt (with other settings, usually)
        self.curriculum.load_state_dict(state["curriculum"])
        opt_state: dict = {}
        params = list(self.model.parameters())  # the optimiser's one group, in this order
        for key, v in tensors.items():
            if key.startswith("state."):
                _, i, k = key.split(".", 2)
                # load_state_dict places each on its parameter's device; --fsdp: this rank's shard of it
                opt_state.setdefault(int(i), {})[k] = dist.like(v, params[int(i)])
        self.optimizer = self._optimizer(self.cfg.sft_learning_rate if self.phase == "sft" else self.cfg.learning_rate)
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([tensors[k] for k in cuda][:torch.cuda.device_count()])
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python_rng"]))
        kind, keys, pos, has_gauss, gauss = state["numpy_rng"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
        self.sync_rollout_model()
