"""Watch one ReRec step happen, for one query: prompt, G rollouts, rewards, RAAE, advantages, loss.

    python -m rerec_mini.explain --model runs/X/final                     # the first training query
    python -m rerec_mini.explain --model runs/X/final --query train-implicit-00040 --out step.html
    python -m rerec_mini.explain --model tiny --text "Horror movies made in Japan"

Nothing here re-implements the algorithm: a real `Trainer` is built and the query goes through
the calls `Trainer.step` makes — `rollout(queries=[q])`, `score`, `advantages`, `difficulties`,
and the loss of `update` (`micro_batch` + `grpo.policy_loss` under the step's `StepNorm`). Only
the weights never change: no optimiser step, and the curriculum is asked on a copy.

    ex = explain(trainer, query)      # an Explanation: numbers only (what the tests compare)
    print(render_text(ex, color))     # the terminal report
    render_html(ex)                   # the same report as one self-contained HTML page

The step explained is a step of batch size 1: its StepNorm counts this query's G rollouts, and
each rollout's *loss share* is its own loss term under that norm (the shares add up to the step's
loss, for every --loss-type). The policy that samples is the one differentiated (ratio = 1, as on
the first of the mu passes), so under dapo a share is -(sum of its tokens' A) / (tokens in the step),
plus beta * KL.

Settings: a flag, else the checkpoint's training config (trainer_state/state.json; a .gguf written by
rerec_mini.export carries it too), else train.py's defaults (the tiny preset for --model tiny). A
checkpoint taken during RL also brings its step number (the sampler's seed) and its curriculum state
(the query's difficulty history).

--text "request": a free request has no ground truth. It becomes an `explicit` query whose
conditions are the catalogue attribute values the request names (ask.py's `named_conditions`)
and whose ground truth is every item having all of them (most-interacted first: that one is in
the candidate list); when no item has all, the items having the most of them. A request naming
no catalogue value has nothing to score against and is refused. The output says what was assumed.

Exit codes: 0 done; 2 a usage error (unknown query, missing model or data), one line on stderr.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import html
import math
import os
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from . import raae
from .cli import ArgumentParser
from .config import PROMPT_FORMAT, TINY_PRESET, Config, UsageError, negatable, resolve_config, validate
from .curriculum import BucketCurriculum, make_curriculum
from .data import Dataset, Query
from .grpo import StepNorm, loss_type_name, policy_loss
from .model import resolve_model_dir, token_logprobs
from .prompts import parse_answer
from .run import assumed_settings, build_tiny_start, check_reward_fns, open_dataset, pick_device, training_state
from .trainer import Batch, Trainer

# ----------------------------------------------------------------------------- what is explained


@dataclass
class Segment:
    """One RAAE reasoning segment of a rollout (raae.segment): chars [start, end) of its text."""

    start: int
    end: int
    wrong: bool  # RAAE marked it: its tokens get the penalised advantage
    reason: str = ""  # why, when wrong


@dataclass
class RolloutView:
    """Rollout k of the group: its text, what the scorer read, its reward terms and advantages."""

    text: str
    truncated: bool
    segments: list[Segment]
    boxed: list[str] | None  # the entries of the last \\boxed{} (None: no box, a format failure)
    matched: list[tuple[str, str]]  # (item id, title) the entries matched, repeats dropped
    hit: bool  # the top item is a ground-truth item
    in_candidates: bool  # the top item is in the candidate list
    hallucinated: int  # box entries that matched no catalogue item
    format: float
    rec: float
    qas: float
    pas: float
    total: float
    advantage: float  # A_i, the sequence advantage before any RAAE penalty
    token_advantages: np.ndarray  # [T] float32: what the loss multiplies each token by (trainer's)
    penalised: np.ndarray  # [T] bool: the tokens inside wrong segments
    spans: np.ndarray  # [T, 2] each token's char span in `text`
    trained: bool  # in the update (not masked as truncated, not empty)
    loss_share: float = 0.0  # this rollout's term of the step's loss
    kl: float = 0.0  # mean k3 KL to the reference over its tokens (0 when beta = 0)
    user: dict[str, float | None] = field(default_factory=dict)  # --reward-fn name -> its value (None: skipped)
    reward_used: float | None = None  # the reward A_i was computed from (--shuffle-rewards: another rollout's)

    @property
    def normal_advantage(self) -> float | None:
        a = self.token_advantages[~self.penalised]
        return float(a[0]) if len(a) else None

    @property
    def penalised_advantage(self) -> float | None:
        a = self.token_advantages[self.penalised]
        return float(a[0]) if len(a) else None


@dataclass
class CurriculumView:
    """What the curriculum would do with this query's difficulty (asked on a copy)."""

    mode: str
    training_index: int | None  # the query's row in the training split (None: the curriculum never sees it)
    before: float | None  # the difficulty the curriculum held (EMA for buckets; None: never rolled out)
    after: float  # what it would hold after this step
    lines: list[str]  # what it would do, in words


@dataclass
class Explanation:
    """Everything one step computes for one query: the numbers the renderers print."""

    model: str
    settings: dict  # the config values that shape this step
    weights: tuple[float, float, float, float]  # reward weights format, rec, qas, pas (after --no-qas/--no-pas)
    query: Query
    split: str  # "train", "test" or "text" (a --text request)
    titles: dict[str, str]  # item id -> title, for every item shown
    candidates: list[str] | None  # candidate ids in prompt order (None: open generation)
    prompt: str  # the prompt tokens decoded, chat template included
    rollouts: list[RolloutView]
    group_mean: float  # mean of the G rewards
    group_scale: float  # what A_i divides by (the std of --scale-rewards, + eps; 1 for none)
    flat: bool  # all G rewards equal: no contrast between rollouts
    difficulty: float  # tr.difficulties: what the curriculum learns from this group
    curriculum: CurriculumView
    norm: StepNorm  # the step's loss normaliser
    loss_type: str
    step_loss: float  # the sum of the shares: the loss this step would backpropagate
    notes: list[str] = field(default_factory=list)
    user_weights: dict[str, float] = field(default_factory=dict)  # --reward-fn name -> its weight


# ----------------------------------------------------------------------------- computing it


def segment_reasons(tr: Trainer, b: Batch, r, k: int, wrong: list[tuple[int, int]]) -> list[Segment]:
    """Every RAAE segment of rollout k, the wrong ones (Trainer.wrong_segments) with the rule that marked them."""
    G, text = tr.cfg.num_generations, b.texts[k]
    wrong = set(wrong)
    top = tr.ds.items[r.parsed[k][0]] if r.parsed[k] else None
    claims = tr.claims(b.queries[k // G], b.candidates[k // G], r.parsed[k]) if tr.cfg.raae_claims and top else ()
    out = []
    for a, e in raae.segment(text):
        reason = ""
        if (a, e) in wrong:
            piece = text[a:e]
            if top is not None and not r.hit[k] and raae.title_patterns(top.title).search(piece):
                reason = f"mentions the wrong top item {top.title}"
            else:
                for title, lacking in claims:
                    values = [f"{rel}: {v}" for rel, v in lacking if v.lower() in piece.lower()]
                    if values and raae.title_patterns(title).search(piece):
                        reason = f"claims {title} has {', '.join(values)}, which it lacks"
                        break
        out.append(Segment(a, e, (a, e) in wrong, reason))
    return out


@torch.no_grad()
def loss_shares(tr: Trainer, b: Batch, adv: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, StepNorm, set[int]]:
    """Each rollout's term of the step's loss: (shares [N], mean KL [N], the StepNorm, trained rows).

    Each trained rollout is packed alone (`micro_batch`) and goes through `policy_loss` with the
    step's StepNorm, as `update` runs it on its first pass (old log-probs = the policy's own). The
    loss is a sum over tokens divided by a constant of the step for dapo, grpo and dr_grpo, so the
    shares add up to it. bnpo divides each micro-batch by its own token count: a rollout's share is
    its token sum / (its micro-batch's tokens * micro-batches), i.e. dapo with that normaliser.
    """
    cfg = tr.cfg
    rows, micro, norm = tr.micro_batches(b, adv)
    chunks, k = [], 0
    for m in micro:  # the rollouts of each micro-batch, in the order micro_batches packed them
        chunks.append(rows[k:k + len(m["ids"])])
        k += len(m["ids"])
    loss_type = loss_type_name(cfg.loss_type)
    shares, kls = np.zeros(len(b.completions)), np.zeros(len(b.completions))
    if tr.ref is not None and cfg.ref_offload:
        tr.ref.to(tr.device)
    for chunk in chunks:
        chunk_tokens = sum(len(b.completions[r]) for r in chunk)
        for row in chunk:
            m = tr.micro_batch(b, adv, [row])
            with tr.autocast():
                lp = token_logprobs(tr.model, m["ids"], m["mask"], temperature=cfg.temperature,
                                    chunk_size=cfg.logprob_chunk)
                ref = None if tr.ref is None else token_logprobs(tr.ref, m["ids"], m["mask"],
                                                                 temperature=cfg.temperature,
                                                                 chunk_size=cfg.logprob_chunk)
            gap = (lp - m["sampler"]) * m["mask"]
            is_weight = torch.exp(gap).clamp(max=tr.tis_cap) if tr.tis_cap > 0 else None
            kind, n = (loss_type, norm) if loss_type != "bnpo" else \
                ("dapo", replace(norm, tokens=chunk_tokens * norm.micro_batches))
            loss, s = policy_loss(lp, lp, m["adv"], m["mask"], n, ref_logp=ref, beta=cfg.beta, eps_low=cfg.epsilon,
                                  eps_high=cfg.epsilon_high, loss_type=kind, is_weight=is_weight)
            shares[row], kls[row] = float(loss), s["kl_sum"] / max(s["tokens"], 1.0)
    if tr.ref is not None and cfg.ref_offload:
        tr.ref.to("cpu")
    return shares, kls, norm, set(rows)


def _bucket_of(cur: BucketCurriculum, i: int) -> str:
    return next(name for name, rows in cur.buckets().items() if i in rows)


def curriculum_view(tr: Trainer, q: Query, d: float) -> CurriculumView:
    """What the curriculum would do with difficulty d for q, asked on a copy (the run is untouched)."""
    cfg = tr.cfg
    idx = next((i for i, t in enumerate(tr.train_queries) if t.query_id == q.query_id), None)
    if idx is None:  # not a training query: a one-query curriculum of the same kind, fresh
        cur, i = make_curriculum(cfg.curriculum, 1, seed=cfg.seed, tau=cfg.tau, batch_size=1,
                                 total_steps=cfg.max_steps), 0
        lines = ["not a training query: the curriculum never sees it; as one it would go as follows"]
    else:
        cur, i, lines = copy.deepcopy(tr.curriculum), idx, []
    old = cur.difficulty[i]
    before = None if math.isnan(old) else float(old)
    bucket_before = _bucket_of(cur, i) if isinstance(cur, BucketCurriculum) else None
    cur.update([i], [d])
    after = float(cur.difficulty[i])
    if isinstance(cur, BucketCurriculum):
        rule = (f"first rollout: EMA = d = {after:.3f}" if before is None else
                f"EMA {cur.ema:g}*d + {1 - cur.ema:g}*old = {cur.ema:g}*{d:.3f} + {1 - cur.ema:g}*{before:.3f} "
                f"= {after:.3f}")
        bucket = _bucket_of(cur, i)
        lines.append(f"buckets: {rule}; bucket {bucket_before} -> {bucket}")
        if bucket == "retired":
            lines.append(f"retired (mastered, < tau {cur.tau:g}): drawn again only as a re-check, probability "
                         f"{cur.recheck:g} per batch slot")
        else:
            mix = cur.mix()
            lines.append(f"at step {cur.step}/{cur.total_steps} the batch mix is easy {mix['easy']:.2f} / medium "
                         f"{mix['medium']:.2f} / hard {mix['hard']:.2f} (shares of the slots unseen queries leave)")
    elif cfg.curriculum == "paper":
        lines.append(f"paper: difficulty {after:.3f} replaces {'nothing' if before is None else f'{before:.3f}'}")
        if idx is None:
            lines.append("next epoch: " + ("retired" if after < cfg.tau else "kept") + f" (tau {cfg.tau:g})")
        else:
            cur.order, cur.epoch = [], max(cur.epoch, 1)
            cur._refill()  # the real refill on the copy: retire d < tau, order the rest easy -> hard
            if i in cur.order:
                lines.append(f"next epoch: kept at position {cur.order.index(i) + 1} of {len(cur.order)} "
                             "(easy -> hard)")
            else:
                lines.append(f"next epoch: retired (d < tau {cfg.tau:g}); {cur.retired} queries retired then")
    else:
        lines.append("none: shuffled epochs; the difficulty is recorded, never used")
    return CurriculumView(cfg.curriculum, idx, before, after, lines)


def explain(tr: Trainer, q: Query, notes: list[str] | None = None, batch: Batch | None = None) -> Explanation:
    """One query through the step's stages (see the module docstring). `batch`: an existing
    `tr.rollout(queries=[q])` to explain instead of sampling a new one (it must not be scored yet)."""
    cfg, ds, G = tr.cfg, tr.ds, tr.cfg.num_generations
    notes = list(notes or [])
    if cfg.shuffle_rewards:
        notes.append("--shuffle-rewards (the control): each advantage is computed from another rollout's reward")
    b = batch if batch is not None else tr.rollout(queries=[q])
    r = tr.score(b)
    adv = tr.advantages(b, r)
    used = tr.advantage_rewards(r)  # what the advantages saw (permuted under --shuffle-rewards)
    d = tr.difficulties(r)[0]
    shares, kls, norm, trained = loss_shares(tr, b, adv.tokens)
    _, mean, scale = raae.sequence_advantages(r.total, G, cfg.scale_rewards)
    cands = b.candidates[0]
    anchors = [a.item_id for a in (q.hop, q.misinformation) if a is not None]
    titles = {i: ds.items[i].title for i in list(q.ground_truth) + list(cands or []) + anchors}
    rollouts = []
    wrong = tr.wrong_segments(b, r)  # the very spans Trainer.advantages penalised
    for k in range(len(b.completions)):
        segs = segment_reasons(tr, b, r, k, wrong[k])
        pen = raae.in_spans(b.spans[k], wrong[k])
        toks = adv.tokens[k]
        titles.update({i: ds.items[i].title for i in r.parsed[k]})
        top = r.parsed[k][0] if r.parsed[k] else None
        rollouts.append(RolloutView(
            text=b.texts[k], truncated=bool(b.truncated[k]), segments=segs, boxed=parse_answer(b.texts[k]),
            matched=[(i, ds.items[i].title) for i in r.parsed[k]], hit=bool(r.hit[k]),
            in_candidates=top is not None and (cands is None or top in cands), hallucinated=int(r.n_hallucinated[k]),
            format=float(r.format[k]), rec=float(r.rec[k]), qas=float(r.qas[k]), pas=float(r.pas[k]),
            total=float(r.total[k]), advantage=float(adv.sequence[k]), token_advantages=toks, penalised=pen,
            spans=b.spans[k], trained=k in trained, loss_share=float(shares[k]), kl=float(kls[k]),
            user={name: None if np.isnan(v[k]) else float(v[k]) for name, v in r.user.items()},
            reward_used=float(used[k])))
    sc = tr.scorer.config
    settings = {k: getattr(cfg, k) for k in (
        "num_generations", "temperature", "top_p", "max_completion_length", "num_candidates", "negatives",
        "hard_negatives", "show_attributes", "history_len", "answer_size", "request_last", "prompt_examples",
        "prompt_example_pool", "seed", "no_raae", "format_needs_candidate",
        "raae_penalty", "raae_floor", "raae_advantage", "raae_claims", "scale_rewards", "loss_type", "beta", "epsilon",
        "epsilon_high", "tis_cap", "keep_truncated", "curriculum", "tau", "difficulty_metric", "no_builtin_rewards",
        "shuffle_rewards")}
    settings["step"] = tr.step_no
    return Explanation(
        model=cfg.model, settings=settings, weights=(sc.w_format, sc.w_rec, sc.w_qas, sc.w_pas), query=q,
        split=split_of(ds, q), titles=titles, candidates=cands,
        prompt=tr.tokenizer.decode(b.prompt_ids[0], skip_special_tokens=False), rollouts=rollouts,
        group_mean=float(mean[0]), group_scale=float(scale[0]), flat=bool(adv.flat_groups), difficulty=float(d),
        curriculum=curriculum_view(tr, q, d), norm=norm, loss_type=loss_type_name(cfg.loss_type),
        step_loss=float(shares.sum()), notes=notes, user_weights={f.name: f.weight for f in tr.reward_fns})


# ----------------------------------------------------------------------------- a typed request


def text_query(request: str, ds: Dataset) -> tuple[Query, str]:
    """A --text request as an explicit query (see the module docstring) and what was assumed."""
    from .ask import Vocabulary, best_matches, named_conditions  # the typed-request reader ask.py uses
    conditions = named_conditions(request, Vocabulary.of(ds))
    if not conditions:
        raise UsageError(f"--text {request!r} names no attribute value of the catalogue (a genre, person, country, "
                         "decade, ...): there is no ground truth to score against; name one, or use --query")
    truth, best = best_matches(ds, conditions)
    named = "; ".join(f"{rel}: {v}" for rel, v in conditions)
    if best == len(conditions):
        assumed = (f"--text: a free request has no ground truth; assumed an explicit query with the values it names "
                   f"({named}) as conditions, and as ground truth the {len(truth)} items having all of them")
    else:
        assumed = (f"--text: a free request has no ground truth; it names {named}, which no item has all of; "
                   f"assumed as ground truth the {len(truth)} items having {best} of the {len(conditions)}")
    qid = "text-" + hashlib.sha256(request.encode()).hexdigest()[:10]
    return Query(qid, "explicit", request, None, truth, conditions), assumed


# ----------------------------------------------------------------------------- rendering: text

_C = {"red": "31", "green": "32", "yellow": "33", "blue": "34", "dim": "2", "bold": "1"}


def _paint(color: bool):
    def p(s: str, *styles: str) -> str:
        if not color or not styles:
            return s
        return "\033[" + ";".join(_C[x] for x in styles) + "m" + s + "\033[0m"
    return p


def _fmt(x: float | None, sign: bool = True) -> str:
    return "-" if x is None else (f"{x:+.3f}" if sign else f"{x:.3f}")


def _query_lines(ex: Explanation) -> list[tuple[str, str]]:
    """(label, value) rows describing the query, shared by both renderers."""
    q = ex.query
    where = "built from --text" if ex.split == "text" else f"{ex.split} split"
    rows = [("request", q.text), ("id", f"{q.query_id} ({q.type}, {where})")]
    rows.append(("conditions", "; ".join(f"{rel}: {v}" for rel, v in q.conditions) or "none"))
    if q.hop:
        rows.append(("hop", f"{_title(ex, q.hop.item_id)} -> {q.hop.relation}: {q.hop.value}"))
    if q.misinformation:
        m = q.misinformation
        rows.append(("false fact", f"the request says {_title(ex, m.item_id)} has {m.relation}: {m.wrong_value}"
                                   f" (true: {m.true_value})"))
    if q.group:
        rows.append(("group", f"{q.group.type}: {q.group.value}"))
    if q.user_id:
        rows.append(("user", q.user_id))
    gt = [ex.titles[i] for i in q.ground_truth]
    shown = [ex.titles[i] for i in q.ground_truth if ex.candidates is None or i in ex.candidates]
    more = f"; ... (+{len(gt) - 6})" if len(gt) > 6 else ""
    rows.append(("truth", f"{len(gt)} item(s): " + "; ".join(gt[:6]) + more))
    if ex.candidates is not None:
        rows.append(("relevant", "; ".join(shown) + "  (ground truth among the candidates: what NDCG counts)"))
    return rows


def _title(ex: Explanation, iid: str) -> str:
    return ex.titles.get(iid, iid)


def _answer_line(ro: RolloutView) -> str:
    if ro.boxed is None:
        return "no \\boxed{} answer: a format failure" + (" (cut off)" if ro.truncated else "")
    box = "\\boxed{" + "; ".join(ro.boxed) + "}"
    if not ro.matched:
        return f"{box} -> no catalogue item (hallucinated)"
    title = ro.matched[0][1]
    where = "a candidate" if ro.in_candidates else "NOT a candidate"
    verdict = "ground truth: a hit" if ro.hit else "not ground truth"
    extra = f"; {ro.hallucinated} unmatched" if ro.hallucinated else ""
    return f"{box} -> {title} ({where}, {verdict}{extra})"


def _formula(ex: Explanation) -> str:
    """'0.1*format + 1*rec + 0.1*qas + 0.1*pas + 1*last_candidate': what a rollout's total adds up."""
    w = ex.weights
    terms = [] if ex.settings["no_builtin_rewards"] else \
        [f"{w[0]:g}*format", f"{w[1]:g}*rec", f"{w[2]:g}*qas", f"{w[3]:g}*pas"]
    terms += [f"{wt:g}*{name}" for name, wt in ex.user_weights.items()]
    return " + ".join(terms) + (" (built-in terms off)" if ex.settings["no_builtin_rewards"] else "")


def _user_terms(ro: RolloutView) -> str:
    """'  last_candidate +1.000' for each --reward-fn ('skipped' where it returned None)."""
    return "".join(f"  {name} " + ("skipped" if v is None else f"{v:+.3f}") for name, v in ro.user.items())


def _adv_line(ro: RolloutView, ex: Explanation) -> str:
    n_pen = int(ro.penalised.sum())
    r = ro.total if ro.reward_used is None else ro.reward_used
    shuffled = " (--shuffle-rewards: another rollout's reward)" if ex.settings["shuffle_rewards"] else ""
    parts = ["flat group: A_i = 0" if ex.flat else
             f"A_i = (r - mean) / s = ({r:+.4f}{shuffled} - ({ex.group_mean:+.4f})) / {ex.group_scale:.4f} "
             f"= {ro.advantage:+.3f}"]
    parts.append(f"tokens: {len(ro.penalised) - n_pen} at {_fmt(ro.normal_advantage)}"
                 + (f", {n_pen} penalised at {_fmt(ro.penalised_advantage)}" if n_pen else ""))
    return "; ".join(parts)


def render_text(ex: Explanation, color: bool = False) -> str:
    """The report for a terminal (ANSI colour when `color`)."""
    p = _paint(color)
    s = ex.settings
    out = [p(f"rerec-mini explain: one ReRec step for one query  (model {ex.model}, step {s['step']}, "
             f"G={s['num_generations']}, temperature {s['temperature']:g}, seed {s['seed']})", "bold")]
    out += [p("note: " + n, "yellow") for n in ex.notes]
    out += ["", p("QUERY", "bold")]
    out += [f"  {k:<11} {v}" for k, v in _query_lines(ex)]
    if ex.candidates is not None:
        out.append(f"  candidates  {len(ex.candidates)} (* = ground truth)")
        for j, iid in enumerate(ex.candidates, 1):
            star = "*" if iid in ex.query.ground_truth else " "
            out.append(f"   {star}{j:>2}. {ex.titles[iid]}")
    else:
        out.append("  candidates  none: open generation over the whole catalogue")
    out.append("  prompt      (as the model saw it: the chat template applied to prompts.build_messages)")
    out += [p("    | " + ln, "dim") for ln in ex.prompt.splitlines()]

    rule = "off" if s["no_raae"] else f"{s['raae_advantage']}, penalty {s['raae_penalty']:g}" + \
        (", + false claims" if s["raae_claims"] else "")
    out += ["", p(f"ROLLOUTS  reward = {_formula(ex)}; RAAE {rule}", "bold")]
    for k, ro in enumerate(ex.rollouts, 1):
        head = f" #{k}  total {ro.total:+.4f}   A_i {ro.advantage:+.3f}   " + ("HIT" if ro.hit else "miss")
        out.append(p(head, "green" if ro.hit else "red" if ro.format < 0 else "bold"))
        if not ro.segments:
            out.append("   (no reasoning before the box)")
        for j, seg in enumerate(ro.segments, 1):
            piece = ro.text[seg.start:seg.end]
            if seg.wrong:
                out.append(p(f"   [{j}] x {piece}", "red") + p(f"   <- {seg.reason}", "red", "dim"))
            else:
                out.append(f"   [{j}]   {piece}")
        out.append(f"   answer  {_answer_line(ro)}")
        out.append(f"   reward  format {ro.format:+.2f}  rec {ro.rec:+.3f}  qas {ro.qas:.3f}  pas {ro.pas:.3f}"
                   f"{_user_terms(ro)}  -> total {ro.total:+.4f}")
        out.append(f"   advant. {_adv_line(ro, ex)}")
        out.append(f"   loss    share {ro.loss_share:+.5f}" + (f", KL {ro.kl:.4f}" if s["beta"] else "")
                   if ro.trained else "   loss    masked: not trained on (" +
                   ("cut off at --max-completion-length; --keep-truncated trains on it)" if ro.truncated else "empty)"))

    out += ["", p("SUMMARY", "bold"),
            "    #  format    rec     qas     pas     total     A_i   A(normal) A(wrong)   share"]
    for k, ro in enumerate(ex.rollouts, 1):
        out.append(f"  {k:>3}  {ro.format:+.2f}  {ro.rec:+.3f}  {ro.qas:.3f}  {ro.pas:.3f}  {ro.total:+.4f}  "
                   f"{ro.advantage:+.3f}  {_fmt(ro.normal_advantage):>8}  {_fmt(ro.penalised_advantage):>8}  "
                   f"{ro.loss_share:+.5f}" + ("" if ro.trained else " (masked)"))
    out.append(f"  group  mean {ex.group_mean:+.4f}, s {ex.group_scale:.4f} ({s['scale_rewards']} scaling, + eps)"
               + ("; all G rewards equal: no contrast, A_i = 0 (only RAAE's tokens move)" if ex.flat else ""))

    out += ["", p("CURRICULUM", "bold"),
            f"  difficulty {ex.difficulty:.3f} = mean over the G rollouts of "
            + ("1 - clip(rec, 0, 1)" if s["difficulty_metric"] == "rec" else "1 - reward")]
    out += ["  " + ln for ln in ex.curriculum.lines]
    n = ex.norm
    denom = {"dapo": f"/ {n.tokens} tokens in the step", "grpo": f"per-rollout token mean / {n.seqs} rollouts",
             "dr_grpo": f"/ ({n.seqs} rollouts * {n.max_len})",
             "bnpo": f"/ each micro-batch's tokens / {n.micro_batches} micro-batches"}[ex.loss_type]
    out += ["", p("LOSS", "bold"),
            f"  {ex.loss_type}: sum of -min(rho*A, clip(rho)*A)" + (f" + {s['beta']:g}*KL" if s["beta"] else "")
            + f" {denom}; rho = 1 on the first pass",
            f"  step loss = sum of the shares = {ex.step_loss:+.5f}  ({n.seqs} of {len(ex.rollouts)} rollouts trained)"]
    return "\n".join(out)


# ----------------------------------------------------------------------------- rendering: HTML

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 70em; margin: 2em auto; color: #222; line-height: 1.4; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-family: monospace; }
.note { background: #fff6d6; padding: 4px 8px; margin: 4px 0; }
pre.prompt { background: #f6f6f6; padding: 8px; white-space: pre-wrap; font-size: 0.85em; }
.rollout { border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; margin: 12px 0; }
.rollout.hit { border-left: 6px solid #2a8; } .rollout.miss { border-left: 6px solid #c44; }
.tokens { font-family: monospace; white-space: pre-wrap; line-height: 1.7; }
.tokens span.wrong { outline: 1px solid #c00; } .tokens.masked { opacity: 0.45; }
ol.segs li.wrong { color: #b00; } .reason { font-style: italic; color: #b00; }
.gt { font-weight: bold; } .muted { color: #777; }
"""


def _token_color(a: float, scale: float) -> str:
    """Green for a positive advantage, red for a negative one; stronger the larger |a| / scale."""
    t = min(1.0, abs(a) / scale) if scale > 0 else 0.0
    fade = round(255 - 120 * t)
    rgb = (255, fade, fade) if a < 0 else (fade, 255, round(255 - 100 * t))
    return "#%02x%02x%02x" % rgb


def _tokens_html(ro: RolloutView, scale: float) -> str:
    """The rollout's text, one span per token coloured by its advantage; penalised tokens outlined."""
    parts, last = [], None
    for t, (a, e) in enumerate(ro.spans.tolist()):
        if e <= a or (a, e) == last:  # a special token, or a multi-byte character's continuation
            continue
        last = (a, e)
        adv = float(ro.token_advantages[t])
        cls = ' class="wrong"' if ro.penalised[t] else ""
        parts.append(f'<span{cls} style="background:{_token_color(adv, scale)}" title="A = {adv:+.3f}">'
                     f"{html.escape(ro.text[a:e])}</span>")
    return "".join(parts) or '<span class="muted">(empty)</span>'


def render_html(ex: Explanation) -> str:
    """The report as one self-contained page: inline CSS, no script, no network."""
    e, s = html.escape, ex.settings
    scale = max([abs(float(x)) for ro in ex.rollouts for x in ro.token_advantages] + [1e-9])
    h = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
         f"<title>rerec-mini explain: {e(ex.query.query_id)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
         "<h1>One ReRec step for one query</h1>",
         f"<p>model <code>{e(ex.model)}</code>, step {s['step']}, G = {s['num_generations']}, temperature "
         f"{s['temperature']:g}, seed {s['seed']}</p>"]
    h += [f'<p class="note">{e(n)}</p>' for n in ex.notes]
    h += ["<h2>Query</h2>", "<table>"]
    h += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _query_lines(ex)]
    h.append("</table>")
    if ex.candidates is not None:
        h.append(f"<p>{len(ex.candidates)} candidates (ground truth in bold):</p><ol>")
        h += [('<li class="gt">' if i in ex.query.ground_truth else "<li>") + f"{e(ex.titles[i])}</li>"
              for i in ex.candidates]
        h.append("</ol>")
    h += ["<p>The prompt as the model saw it:</p>", f'<pre class="prompt">{e(ex.prompt)}</pre>']

    h += ["<h2>Rollouts</h2>",
          f"<p>reward = {e(_formula(ex)).replace('*', '&middot;')}. "
          "Tokens are coloured by their advantage (green &gt; 0, red &lt; 0); tokens of wrong RAAE segments are "
          "outlined. Hover a token for its advantage.</p>"]
    for k, ro in enumerate(ex.rollouts, 1):
        h.append(f'<div class="rollout {"hit" if ro.hit else "miss"}" id="rollout-{k}">')
        h.append(f"<h3>Rollout {k}: total {ro.total:+.4f}, A<sub>i</sub> {ro.advantage:+.3f}"
                 f"{' (hit)' if ro.hit else ''}</h3>")
        h.append(f'<div class="tokens{"" if ro.trained else " masked"}">{_tokens_html(ro, scale)}</div>')
        h.append('<ol class="segs">')
        for seg in ro.segments:
            piece = e(ro.text[seg.start:seg.end])
            h.append(f'<li class="wrong">{piece} <span class="reason">&larr; {e(seg.reason)}</span></li>'
                     if seg.wrong else f"<li>{piece}</li>")
        h.append("</ol>")
        h.append(f"<p>answer: {e(_answer_line(ro))}</p>")
        h.append(f"<p>reward: format {ro.format:+.2f}, rec {ro.rec:+.3f}, qas {ro.qas:.3f}, pas {ro.pas:.3f}"
                 f"{e(_user_terms(ro))} &rarr; total {ro.total:+.4f}<br>advantage: {e(_adv_line(ro, ex))}<br>"
                 + (f"loss share {ro.loss_share:+.5f}" + (f", KL {ro.kl:.4f}" if s["beta"] else "")
                    if ro.trained else "not trained on (masked)") + "</p>")
        h.append("</div>")

    h += ["<h2>Summary</h2>", "<table>", "<tr><th>#</th><th>format</th><th>rec</th><th>qas</th><th>pas</th>"
          "<th>total</th><th>A<sub>i</sub></th><th>A normal</th><th>A wrong</th><th>loss share</th></tr>"]
    for k, ro in enumerate(ex.rollouts, 1):
        cells = [f"{ro.format:+.2f}", f"{ro.rec:+.3f}", f"{ro.qas:.3f}", f"{ro.pas:.3f}", f"{ro.total:+.4f}",
                 f"{ro.advantage:+.3f}", _fmt(ro.normal_advantage), _fmt(ro.penalised_advantage),
                 f"{ro.loss_share:+.5f}" if ro.trained else "masked"]
        h.append(f'<tr><td><a href="#rollout-{k}">{k}</a></td>' + "".join(f'<td class="num">{c}</td>' for c in cells)
                 + "</tr>")
    h.append("</table>")
    h.append(f"<p>group mean {ex.group_mean:+.4f}, s {ex.group_scale:.4f} ({e(s['scale_rewards'])} scaling)"
             + ("; all rewards equal: no contrast" if ex.flat else "") + "</p>")
    h += ["<h2>Curriculum</h2>", f"<p>difficulty {ex.difficulty:.3f} ({e(s['difficulty_metric'])})</p>", "<ul>"]
    h += [f"<li>{e(ln)}</li>" for ln in ex.curriculum.lines]
    h += ["</ul>", "<h2>Loss</h2>",
          f"<p>{e(ex.loss_type)}, StepNorm(tokens={ex.norm.tokens}, seqs={ex.norm.seqs}, max_len={ex.norm.max_len}, "
          f"micro_batches={ex.norm.micro_batches}); step loss = sum of the shares = {ex.step_loss:+.5f}</p>",
          "</body>", "</html>"]
    return "\n".join(h) + "\n"


# ----------------------------------------------------------------------------- command line

# The Config fields explain takes as flags (train.py's names): what shapes one step of one query.
FLAGS = ("data", "seed", "device", "precision", "num_generations", "max_completion_length", "temperature", "top_p",
         "num_candidates", "negatives", "hard_negatives", "show_attributes", "history_len", "answer_size",
         "request_last", "prompt_examples", "prompt_example_pool", "reward_weights", "format_needs_candidate",
         "reward_fn", "reward_fn_weights", "no_builtin_rewards",
         "shuffle_rewards", "no_qas", "no_pas", "no_raae", "raae_penalty", "raae_floor",
         "raae_advantage", "raae_claims", "scale_rewards", "loss_type", "beta", "epsilon", "epsilon_high", "tis_cap",
         "keep_truncated", "micro_batch_size", "curriculum", "tau", "difficulty_metric", "tiny_layers", "tiny_hidden",
         "tiny_heads", "tiny_kv_heads", "tiny_vocab", "tiny_units", "tiny_kind_init")


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m rerec_mini.explain", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       argument_default=argparse.SUPPRESS)
    p.add_argument("--model", required=True, help="checkpoint directory, .gguf, hub id, alias or 'tiny' (random init)")
    p.add_argument("--query", metavar="QUERY_ID", help="a dataset query [the first training query]")
    p.add_argument("--text", metavar="REQUEST", help="a free request (see above for its ground truth)")
    p.add_argument("--out", metavar="FILE.html", help="also write the report as a self-contained HTML page")
    spec = {f.name: f for f in fields(Config)}
    for name in FLAGS:
        f = spec[name]
        flag = "--" + name.replace("_", "-")
        help_ = f.metadata["help"] + " [a checkpoint's training value, else train.py's default" + \
            (f"; tiny: {TINY_PRESET[name]}" if name in TINY_PRESET else "") + "]"
        if f.type in (bool, "bool"):
            action = argparse.BooleanOptionalAction if negatable(name) else "store_true"
            p.add_argument(flag, dest=name, action=action, help=help_)
        elif f.metadata.get("append"):  # --reward-fn, repeatable
            p.add_argument(flag, dest=name, action="append", metavar=f.metadata["metavar"], help=help_)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type] if isinstance(f.type, str) else f.type
            p.add_argument(flag, dest=name, type=kind, choices=f.metadata.get("choices"), help=help_)
    return p


def _reference_dir(ckpt: Path, cfg: Config) -> Path | None:
    """The frozen reference the run's update used (run.py: out/reference, else its start weights)."""
    out = Path(cfg.output_dir) if cfg.output_dir else ckpt.parent
    for cand in (out / "reference", ckpt.parent / "reference", out / "tiny-init"):
        if (cand / "config.json").exists():
            return cand
    if cfg.model != "tiny":
        try:
            return resolve_model_dir(cfg.model)
        except Exception:  # an alias that is not on this machine
            return None
    return None


def setup(argv, stack: ExitStack) -> tuple[Trainer, Query, list[str], argparse.Namespace]:
    """Parse, check (UsageError on a mistake, before any model loads), build the Trainer; returns
    (trainer, query, notes, args). `stack` keeps a built tiny model's temporary directory alive."""
    args = parser().parse_args(argv)
    user = {k: v for k, v in vars(args).items() if k in FLAGS}
    state = training_state(args.model)
    saved = state.get("config")
    cfg = resolve_config(user, saved=saved) if saved else resolve_config({**user, "model": args.model})
    cfg.fsdp = False  # one process: a run's --fsdp said how it was launched, not what a step computes
    for w in validate(cfg):
        print(f"warning: {w}", file=sys.stderr)
    if getattr(args, "query", None) and getattr(args, "text", None):
        raise UsageError("give --query QUERY_ID or --text REQUEST, not both")
    device = pick_device(cfg.device)
    ds = open_dataset(cfg.data, trained_by=args.model if saved and "data" not in user else None)
    warning = assumed_settings(args.model, saved or {},
                               {k: getattr(cfg, k) for k in ("data", *PROMPT_FORMAT) if k not in user})
    if warning:
        print(warning, file=sys.stderr)
    if not ds.queries.get("train"):
        raise UsageError(f"--data {cfg.data}: no training queries")
    check_reward_fns(cfg, ds)
    notes: list[str] = []
    if getattr(args, "text", None):
        q, assumed = text_query(args.text, ds)
        notes.append(assumed)
    elif getattr(args, "query", None):
        q = next((x for x in ds.all_queries() if x.query_id == args.query), None)
        if q is None:
            first = ", ".join(f"{k}: {v[0].query_id} ..." for k, v in ds.queries.items() if v)
            raise UsageError(f"--query {args.query}: not a query of {cfg.data} ({first})")
    else:
        q = ds.queries["train"][0]

    if args.model == "tiny":  # built as run.py builds a run's start (Run._start_dir), in a temporary directory
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rerec-explain-")))
        model_dir = build_tiny_start(cfg, ds, tmp / "tiny-init")
        notes.append("an untrained tiny model (random weights): its rollouts are noise, so are the rewards; "
                     "pass a trained checkpoint (e.g. runs/X/final) to watch a trained policy")
    else:
        try:
            model_dir = resolve_model_dir(args.model)
        except (FileNotFoundError, ValueError, ImportError) as e:
            raise UsageError(f"--model {args.model}: " + " ".join(str(e).split())) from None
        if not (Path(model_dir) / "config.json").exists():
            raise UsageError(f"--model {args.model}: {model_dir} has no config.json")

    if state.get("phase") == "rl":  # as a resumed run: its reference, step and curriculum
        ref = _reference_dir(Path(args.model), cfg) if cfg.beta != 0 else None
        tr = Trainer(cfg, ds, model_dir, device, reference_dir=ref)
        tr.phase, tr.step_no = "rl", int(state["step"])
        if saved.get("curriculum") == cfg.curriculum:
            tr.curriculum.load_state_dict(state["curriculum"])
        else:
            notes.append(f"--curriculum {cfg.curriculum} differs from the run's: a fresh curriculum answers")
        if cfg.beta != 0 and ref is None:
            tr.start_rl()
            notes.append("the run's reference weights were not found: the checkpoint itself is the reference (KL 0)")
    else:  # a base model, an SFT checkpoint or tiny: RL would start here
        tr = Trainer(cfg, ds, model_dir, device)
        tr.start_rl()
    if split_of(ds, q) == "test":
        notes.append("a test-split query: training never rolls it out; shown as if it were in a step")
    if args.model != "tiny":
        tr.cfg.model = args.model  # the report names what was loaded (a checkpoint's config names its base)
    return tr, q, notes, args


def split_of(ds: Dataset, q: Query) -> str:
    return next((s for s, qs in ds.queries.items() if any(x.query_id == q.query_id for x in qs)), "text")


def main(argv=None) -> int:
    with ExitStack() as stack:
        try:
            tr, q, notes, args = setup(argv, stack)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        ex = explain(tr, q, notes)
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    print(render_text(ex, color))
    if getattr(args, "out", None):
        Path(args.out).write_text(render_html(ex), encoding="utf-8")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
