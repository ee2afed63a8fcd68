"""Evaluation: ranking metrics per query type, for a model (greedy, batched) or a baseline.

Every method answers the same deterministic candidate sets the trainer uses and is scored
by the same scorer, so the numbers are comparable: hit@1 (ReRec's accuracy), ndcg@5,
ndcg@10, recall@10, format_ok, hallucination, off_list, qas, pas, response length, count.
`evaluate_samples` adds G sampled answers per query to a greedy evaluation: pass@G, the
majority vote, and the sampled hit rate where greedy misses.
Baselines rank the candidates without a model: random, popularity, attribute. Every result
also carries `reference`: what the popularity shortcut and chance score on the *same*
candidate sets, so a model's number is never read without the number it must beat.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from .cli import progress as progress_bar
from .config import PROMPT_FORMAT, Config
from .data import QUERY_TYPES, Dataset, Query
from .prompts import DEFAULT_NEGATIVES, CandidateSampler, render_prompt
from .rewards import Scorer
from .sampling import generate
from .user_rewards import RewardFn, columns, scored_mean
from .user_rewards import evaluate as call_reward_fns

# Prompt settings of eval.py and ask: flag > the checkpoint's training config > these (a base model):
# train.py's defaults for the prompt format, and the seed that draws the candidates.
PROMPT_DEFAULTS = {**{k: Config.__dataclass_fields__[k].default for k in PROMPT_FORMAT}, "seed": 0}


def prompt_settings(args, train_cfg: dict, defaults: dict) -> dict:
    """Each setting of `defaults`: the flag if given, else the checkpoint's (train_cfg), else the default."""
    return {k: (getattr(args, k) if getattr(args, k, None) is not None else train_cfg.get(k, v))
            for k, v in defaults.items()}

METRICS = ("hit@1", "ndcg@5", "ndcg@10", "recall@10", "format_ok", "hallucination", "off_list", "qas", "pas",
           "response_len")


def ndcg_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    """Binary-relevance NDCG@k; the ideal DCG puts min(|relevant|, k) hits first.

    >>> round(ndcg_at_k(["x", "a"], {"a"}, 5), 4)   # the hit at rank 2: 1/log2(3)
    0.6309
    """
    dcg = sum(1.0 / math.log2(r + 2) for r, item in enumerate(ranked[:k]) if item in relevant)
    ideal = sum(1.0 / math.log2(r + 2) for r in range(min(len(relevant), k)))
    return dcg / ideal if ideal else 0.0


def recall_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    return len(set(ranked[:k]) & relevant) / len(relevant) if relevant else 0.0


def relevant_items(q: Query, candidates: Sequence[str] | None) -> set[str]:
    """The ground truth a method can reach: the ground-truth candidates, or all of it in open generation
    (and all of it when no candidate is one, as the scorer's Scorer.relevant does)."""
    gt = set(q.ground_truth)
    return (gt & set(candidates) or gt) if candidates is not None else gt


def summarise(queries: Sequence[Query], candidates, scored, response_lens: Sequence[int]) -> dict:
    """{"overall": {metric: mean}, "by_type": {type: {...}}} from a scorer's RewardBreakdown.

    format_ok: the box names at least one catalogue item, the release's rule, whichever rule the
    scorer's reward follows (--format-needs-candidate), so that runs with and without it compare.
    off_list: the box's top item is a catalogue title that is not among the prompt's candidates (0
    in open generation): an answer copied from elsewhere, e.g. a worked example's."""
    per_query = []
    for n, q in enumerate(queries):
        ranked = scored.parsed[n]
        rel = relevant_items(q, candidates[n])
        per_query.append({
            "hit@1": float(bool(ranked) and ranked[0] in rel),  # as the reward's hit: among what was shown
            "ndcg@5": ndcg_at_k(ranked, rel, 5), "ndcg@10": ndcg_at_k(ranked, rel, 10),
            "recall@10": recall_at_k(ranked, rel, 10), "format_ok": float(bool(ranked)),
            "off_list": float(bool(ranked) and candidates[n] is not None and ranked[0] not in candidates[n]),
            "qas": float(scored.qas[n]), "pas": float(scored.pas[n]), "response_len": float(response_lens[n]),
            "_entries": int(scored.n_entries[n]), "_hallucinated": int(scored.n_hallucinated[n]),
        })

    def mean(rows):
        if not rows:
            return {**{m: 0.0 for m in METRICS}, "count": 0}
        out = {m: float(np.mean([r[m] for r in rows])) for m in METRICS if m != "hallucination"}
        entries = sum(r["_entries"] for r in rows)
        out["hallucination"] = sum(r["_hallucinated"] for r in rows) / entries if entries else 0.0
        out["count"] = len(rows)
        return {m: out[m] for m in (*METRICS, "count")}

    by_type = {t: mean([r for r, q in zip(per_query, queries) if q.type == t]) for t in QUERY_TYPES}
    return {"overall": mean(per_query), "by_type": {t: v for t, v in by_type.items() if v["count"]}}


def stratified_head(queries: Sequence[Query], n: int) -> list[Query]:
    """The first n queries taking the types in turn (files are grouped by type), or all when n <= 0."""
    if n <= 0 or n >= len(queries):
        return list(queries)
    by_type = {t: [q for q in queries if q.type == t] for t in QUERY_TYPES}
    out: list[Query] = []
    for k in range(len(queries)):
        for t in QUERY_TYPES:
            if k < len(by_type[t]) and len(out) < n:
                out.append(by_type[t][k])
    return out


def draw_candidates(ds: Dataset, queries, sampler: CandidateSampler | None, num_candidates: int,
                    hard_negatives: int, seed: int, negatives: str = DEFAULT_NEGATIVES) -> list[list[str] | None]:
    """Each query's candidate set (CandidateSampler.sample), [N] lists of ids or None (open generation)."""
    sampler = sampler or CandidateSampler(ds)
    return [sampler.sample(q, num_candidates, hard_negatives, seed, negatives) for q in queries]


def encode_prompts(tokenizer, ds: Dataset, queries: Sequence[Query], candidates, *, history_len: int = 0,
                   show_attributes: tuple[str, ...] = (), answer_size: int = 1, request_last: bool = False,
                   prompt_examples: int = 0, prompt_example_pool: int = 0) -> list[list[int]]:
    """[N] prompt token ids, one per query with its candidate set, in the trainer's prompt format."""
    texts = (render_prompt(q, ds, c, tokenizer, history_len=history_len, show_attributes=show_attributes,
                           answer_size=answer_size, request_last=request_last, examples=prompt_examples,
                           examples_from=prompt_example_pool)
             for q, c in zip(queries, candidates))
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def decode(model, tokenizer, prompts: list[list[int]], *, num_samples: int = 1, temperature: float = 0.0,
           top_p: float = 1.0, max_new_tokens: int = 512, eos_token_id=None, seed: int = 0, batch_size: int = 64,
           progress: bool = True, pool=None) -> tuple[list[str], list[int]]:
    """Answers to every prompt, batched through our sampler: ([N * num_samples] texts, their token
    counts), the samples of one prompt adjacent. batch_size counts prompts."""
    # Similar lengths together: less padding in each batch.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: dict[int, list[list[int]]] = {}
    bar = progress_bar(total=len(prompts), desc="eval", disable=not progress, leave=False)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        # Each batch its own seed, so that sampled batches are not copies of one random stream
        # (greedy decoding draws nothing: its answers do not depend on it).
        ro = generate(model, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens, num_samples=num_samples,
                      temperature=temperature, top_p=top_p, eos_token_id=eos_token_id, seed=seed + s, pool=pool)
        for j, i in enumerate(chunk):
            outputs[i] = ro.completions[j * num_samples:(j + 1) * num_samples]
        bar.update(len(chunk))
    bar.close()
    rows = [c for i in range(len(prompts)) for c in outputs[i]]
    return [tokenizer.decode(c, skip_special_tokens=True) for c in rows], [len(c) for c in rows]


@torch.no_grad()
def evaluate_policy(model, tokenizer, ds: Dataset, queries: Sequence[Query], *, scorer: Scorer,
                    candidate_sampler: CandidateSampler | None = None, num_candidates: int = 20,
                    hard_negatives: int = 0, seed: int = 0, negatives: str = DEFAULT_NEGATIVES, history_len: int = 0,
                    show_attributes: tuple[str, ...] = (), answer_size: int = 1, request_last: bool = False,
                    prompt_examples: int = 0, prompt_example_pool: int = 0, max_new_tokens: int = 512, eos_token_id=None,
                    temperature: float = 0.0, batch_size: int = 64, progress: bool = True, pool=None,
                    reward_fns: Sequence[RewardFn] = ()) -> dict:
    """Greedy (temperature 0) answers of `model` to `queries`, batched through our sampler.

    {"overall", "by_type"} as `summarise`, plus "reference" (see `shortcut_reference`) and
    "samples": every query with its candidates, ground truth, response, parsed answer, hit flag
    and reward terms (`sample_records`). pool: the sampler's DecoderPool (CUDA graphs reused).
    reward_fns (--reward-fn): each one's mean over the answers joins "overall" and "by_type" as
    rewards/<name>/mean (over the answers it scored), and each sample's "reward" holds its value."""
    candidates = draw_candidates(ds, queries, candidate_sampler, num_candidates, hard_negatives, seed, negatives)
    prompts = encode_prompts(tokenizer, ds, queries, candidates, history_len=history_len,
                             show_attributes=show_attributes, answer_size=answer_size, request_last=request_last,
                             prompt_examples=prompt_examples, prompt_example_pool=prompt_example_pool)
    texts, lens = decode(model, tokenizer, prompts, temperature=temperature, max_new_tokens=max_new_tokens,
                         eos_token_id=eos_token_id, seed=seed, batch_size=batch_size, progress=progress, pool=pool)
    scored = scorer.score(list(queries), texts, candidates)
    result = summarise(queries, candidates, scored, lens)
    result["reference"] = shortcut_reference(ds, queries, candidates, scorer, seed)
    result["samples"] = sample_records(ds, queries, candidates, texts, scored)
    if reward_fns:
        prompt_texts = [tokenizer.decode(p) for p in prompts]
        values = call_reward_fns(reward_fns, columns(ds, queries, candidates, prompt_texts, texts, [None] * len(texts),
                                                     scored.parsed))
        types = np.array([q.type for q in queries])
        for name, v in values.items():
            result["overall"][f"rewards/{name}/mean"] = scored_mean(v)
            for t, row in result["by_type"].items():
                row[f"rewards/{name}/mean"] = scored_mean(v[types == t])
            for rec, x in zip(result["samples"], v):
                rec["reward"][name] = None if np.isnan(x) else float(x)
    return result


class _Sampled(NamedTuple):
    """One query's figures in `sampled_summary`."""
    greedy: bool     # the greedy answer is a hit
    sampled: float   # mean hit of its G samples
    any_hit: bool    # at least one sample hits
    majority: bool   # the most frequent sampled answer hits


def sampled_summary(types: Sequence[str], greedy_hit: Sequence[bool], hits: np.ndarray,
                    answers: Sequence[Sequence[str | None]]) -> dict:
    """What G sampled answers per query say beyond the greedy one: {"overall", "by_type"}, each with

        sampled_hit@1   mean hit of a sampled answer (what RL's rollouts score)
        pass@G          share of queries with at least one hit among the G samples
        majority@G      share whose most frequent answer is a hit (samples without an answer do not
                        vote; ties go to the answer drawn first)
        greedy_hit@1    the greedy answer's hit, for reference
        sampled_hit_where_greedy_misses
                        mean sampled hit over the queries greedy gets wrong (None when it gets none
                        wrong): near chance means the policy holds no better answer there for RL
                        to sharpen towards
        greedy_misses   how many queries that figure averages over

    types: [N] query types; greedy_hit: [N]; hits: [N, G] bool; answers: [N][G] first answer ids
    (None: no answer)."""
    hits = np.asarray(hits, dtype=bool)
    if not len(types) == len(greedy_hit) == len(hits) == len(answers):
        raise ValueError(f"sampled_summary: {len(types)} types, {len(greedy_hit)} greedy hits, {len(hits)} rows of "
                         f"hits and {len(answers)} rows of answers; one of each per query")
    rows = []
    for g, h, a in zip(greedy_hit, hits, answers):
        votes = [x for x in a if x is not None]
        top = max(votes, key=votes.count) if votes else None  # max keeps the first of equal counts
        # A sample's hit depends only on its first answer, so the first sample naming `top` speaks for all.
        rows.append(_Sampled(bool(g), float(h.mean()), bool(h.any()), top is not None and bool(h[a.index(top)])))

    def mean(sub: list[_Sampled]) -> dict:
        misses = [r.sampled for r in sub if not r.greedy]
        return {"greedy_hit@1": float(np.mean([r.greedy for r in sub])),
                "sampled_hit@1": float(np.mean([r.sampled for r in sub])),
                "pass@G": float(np.mean([r.any_hit for r in sub])),
                "majority@G": float(np.mean([r.majority for r in sub])),
                "sampled_hit_where_greedy_misses": float(np.mean(misses)) if misses else None,
                "greedy_misses": len(misses), "count": len(sub)}

    by_type = {t: [r for r, ty in zip(rows, types) if ty == t] for t in QUERY_TYPES}
    return {"overall": mean(rows), "by_type": {t: mean(v) for t, v in by_type.items() if v}}


@torch.no_grad()
def evaluate_samples(model, tokenizer, ds: Dataset, queries: Sequence[Query], greedy_hit: Sequence[bool], *,
                     scorer: Scorer, num_samples: int, temperature: float = 1.0, top_p: float = 1.0,
                     candidate_sampler: CandidateSampler | None = None, num_candidates: int = 20,
                     hard_negatives: int = 0, seed: int = 0, negatives: str = DEFAULT_NEGATIVES, history_len: int = 0,
                     show_attributes: tuple[str, ...] = (), answer_size: int = 1, request_last: bool = False,
                     prompt_examples: int = 0, prompt_example_pool: int = 0, max_new_tokens: int = 512, eos_token_id=None,
                     batch_size: int = 64, progress: bool = True) -> dict:
    """`num_samples` answers per query at `temperature` / `top_p`, on the candidate sets `evaluate_policy`
    drew with the same arguments (the sampler seeds each query's draw by seed and query id);
    greedy_hit: [N] its hit flags. `sampled_summary`'s figures, plus the sampling settings.
    batch_size counts rows (prompts x samples). The samples' seeds are fixed, so the figures repeat
    exactly for the same batch size and device."""
    candidates = draw_candidates(ds, queries, candidate_sampler, num_candidates, hard_negatives, seed, negatives)
    prompts = encode_prompts(tokenizer, ds, queries, candidates, history_len=history_len,
                             show_attributes=show_attributes, answer_size=answer_size, request_last=request_last,
                             prompt_examples=prompt_examples, prompt_example_pool=prompt_example_pool)
    G = num_samples
    # seed + 1: not the stream of a greedy call with the same seed (which draws nothing, but might one day).
    texts, _ = decode(model, tokenizer, prompts, num_samples=G, temperature=temperature, top_p=top_p,
                      max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, seed=seed + 1,
                      batch_size=max(1, batch_size // G), progress=progress)
    scored = scorer.score([q for q in queries for _ in range(G)], texts, [c for c in candidates for _ in range(G)])
    hits = scored.hit.reshape(len(queries), G)
    answers = [[p[0] if p else None for p in scored.parsed[n * G:(n + 1) * G]] for n in range(len(queries))]
    return {"num_samples": G, "temperature": temperature, "top_p": top_p,
            **sampled_summary([q.type for q in queries], greedy_hit, hits, answers)}


def sample_records(ds: Dataset, queries: Sequence[Query], candidates, texts: Sequence[str], scored) -> list[dict]:
    """One JSON-able record per query: what the model saw, what it said, how it was scored."""
    title = lambda ids: [ds.items[i].title for i in ids]  # noqa: E731
    return [{
        "query_id": q.query_id, "type": q.type, "query": q.text,
        "candidates": None if c is None else title(c), "ground_truth": title(q.ground_truth),
        "response": t, "parsed": title(scored.parsed[n]),
        "hit": bool(scored.hit[n]),
        "reward": {k: float(getattr(scored, k)[n]) for k in ("total", "format", "rec", "qas", "pas")},
    } for n, (q, c, t) in enumerate(zip(queries, candidates, texts))]


# ----------------------------------------------------------------------------- baselines


def rank_random(q: Query, candidates: list[str], ds: Dataset, seed: int) -> list[str]:
    rng = random.Random(f"{seed}:random:{q.query_id}")
    return rng.sample(candidates, len(candidates))


def rank_popularity(q: Query, candidates: list[str], ds: Dataset, seed: int) -> list[str]:
    """Most-interacted items first (ties: candidate order)."""
    counts = ds.popularity
    return sorted(candidates, key=lambda i: -counts[ds.item_index[i]])


def rank_attribute(q: Query, candidates: list[str], ds: Dataset, seed: int) -> list[str]:
    """Most of the query's conditions satisfied (in the knowledge graph) first; ties at random.

    It reads the resolved conditions (a hop's true value, a misinformed query's true fact),
    so it is a strong, oracle-like reference for condition-based queries."""
    rng = random.Random(f"{seed}:attribute:{q.query_id}")
    shuffled = rng.sample(candidates, len(candidates))
    return sorted(shuffled, key=lambda i: -sum(ds.items[i].has(*c) for c in q.conditions))


BASELINES = {"random": rank_random, "popularity": rank_popularity, "attribute": rank_attribute}


def score_baseline(name: str, ds: Dataset, queries: Sequence[Query], candidates: Sequence[list[str]],
                   scorer: Scorer, seed: int = 0) -> dict:
    """A baseline's ranking of given candidate sets, written as a boxed list and scored like a model's answer."""
    rank = BASELINES[name]
    texts = ["\\boxed{" + "; ".join(ds.items[i].title for i in rank(q, c, ds, seed)[:10]) + "}"
             for q, c in zip(queries, candidates)]
    scored = scorer.score(list(queries), texts, list(candidates))
    return summarise(queries, candidates, scored, [0] * len(queries))


def shortcut_reference(ds: Dataset, queries: Sequence[Query], candidates: Sequence[list[str] | None],
                       scorer: Scorer, seed: int = 0) -> dict | None:
    """What needs no reasoning on these very candidate sets (None in open generation):

      {"popularity": the popularity baseline's summary ({"overall", "by_type"} as `summarise`),
       "random": {"overall": {"hit@1", "count"}, "by_type": {...}}}

    Random's hit@1 is its exact expectation, mean |reachable ground truth| / |candidates|, not a
    draw. No model runs: one scorer pass over N short boxed lists, cheap beside generation."""
    if not queries or any(c is None for c in candidates):
        return None
    chance = [len(relevant_items(q, c)) / len(c) for q, c in zip(queries, candidates)]

    def mean(rows):
        return {"hit@1": float(np.mean(rows)), "count": len(rows)}

    by_type = {t: [p for p, q in zip(chance, queries) if q.type == t] for t in QUERY_TYPES}
    return {"popularity": score_baseline("popularity", ds, queries, candidates, scorer, seed),
            "random": {"overall": mean(chance), "by_type": {t: mean(v) for t, v in by_type.items() if v}}}


def evaluate_baseline(name: str, ds: Dataset, queries: Sequence[Query], *, scorer: Scorer,
                      candidate_sampler: CandidateSampler | None = None, num_candidates: int = 20,
                      hard_negatives: int = 0, seed: int = 0, negatives: str = DEFAULT_NEGATIVES) -> dict:
    """A baseline on the deterministic candidate sets: {"overall", "by_type", "reference"} (as a model's)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r} (choose from {', '.join(BASELINES)})")
    if num_candidates == 0:
        raise ValueError("baselines rank a candidate set; they need --num-candidates > 0")
    candidates = draw_candidates(ds, queries, candidate_sampler, num_candidates, hard_negatives, seed, negatives)
    result = score_baseline(name, ds, queries, candidates, scorer, seed)
    result["reference"] = shortcut_reference(ds, queries, candidates, scorer, seed)
    return result


def markdown_table(results: dict[str, dict], metrics: Sequence[str] = ("hit@1", "ndcg@5", "ndcg@10", "format_ok",
                                                                         "hallucination", "qas", "pas")) -> str:
    """One row per (method, query type): `results` maps a method name to an evaluation result.

    Beside hit@1 (or after the metrics, when hit@1 is not listed) a `pop. hit@1` column holds the
    popularity baseline on the same candidate sets and queries (the result's "reference"; "–"
    when it has none, e.g. open generation): the shortcut a model's hit@1 has to be read against.
    """
    cols = list(metrics)
    at = cols.index("hit@1") + 1 if "hit@1" in cols else len(cols)
    head = "| method | type | n | " + " | ".join(cols[:at] + ["pop. hit@1"] + cols[at:]) + " |"
    lines = [head, "|" + "---|" * (4 + len(cols))]
    for name, res in results.items():
        pop = (res.get("reference") or {}).get("popularity")
        refs = {"all": pop["overall"], **pop["by_type"]} if pop else {}
        for typ, row in [("all", res["overall"]), *res["by_type"].items()]:
            ref = refs.get(typ)
            cells = [f"{row[m]:.3f}" for m in cols]
            cells.insert(at, f"{ref['hit@1']:.3f}" if ref else "–")
            lines.append(f"| {name} | {typ} | {row['count']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sampled_table(sampled: dict) -> str:
    """`evaluate_samples`' figures as a markdown table, one row per query type."""
    G, T = sampled["num_samples"], sampled["temperature"]
    cols = ("greedy_hit@1", "sampled_hit@1", "pass@G", "majority@G", "sampled_hit_where_greedy_misses")
    names = ("greedy hit@1", f"sampled hit@1 (T={T:g})", f"pass@{G}", f"majority@{G}",
             "sampled hit where greedy misses")
    lines = ["| type | n | " + " | ".join(names) + " |", "|" + "---|" * (2 + len(cols))]
    for typ, row in [("all", sampled["overall"]), *sampled["by_type"].items()]:
        cells = ["–" if row[c] is None else f"{row[c]:.3f}" for c in cols]
        cells[-1] += f" (of {row['greedy_misses']})"
        lines.append(f"| {typ} | {row['count']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- retention


def read_texts(path) -> list[str]:
    """One text per line; blank lines and lines starting with '#' skipped."""
    lines = open(path, encoding="utf-8").read().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


@torch.no_grad()
def retention(trained, base, tokenizer, texts: Sequence[str], chunk: int = 256) -> dict:
    """How far fine-tuning moved the model on neutral text (an offline proxy for 'keeps its
    instruction following and knowledge'): mean per-token KL(trained || base) of the next-token
    distributions, and both perplexities. Texts run one at a time, the head in chunks of
    positions, so a 151k vocabulary never needs more than [chunk, V] floats."""
    dev = next(trained.parameters()).device
    kl_sum, nll_t, nll_b, n = 0.0, 0.0, 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)], device=dev)
        if ids.shape[1] < 2:
            continue
        h_t, h_b = trained.hidden_states(ids)[0, :-1], base.hidden_states(ids)[0, :-1]  # [T-1, H]
        target = ids[0, 1:]
        for s in range(0, len(target), chunk):
            lt = torch.log_softmax(trained.head(h_t[s:s + chunk]).float(), -1)  # [c, V]
            lb = torch.log_softmax(base.head(h_b[s:s + chunk]).float(), -1)
            tc = target[s:s + chunk, None]
            kl_sum += float((lt.exp() * (lt - lb)).sum())
            nll_t -= float(lt.gather(-1, tc).sum())
            nll_b -= float(lb.gather(-1, tc).sum())
        n += len(target)
    if n == 0:
        raise ValueError("retention needs at least one text of two tokens or more")
    ppl_t, ppl_b = math.exp(nll_t / n), math.exp(nll_b / n)
    return {"kl_per_token": kl_sum / n, "ppl_trained": ppl_t, "ppl_base": ppl_b,
            "ppl_change": ppl_t / ppl_b - 1.0, "tokens": n, "texts": len(texts)}
