"""Evaluate a model: `python eval.py --model runs/X/final [--baselines random,popularity,attribute]`.

Greedy answers on the held-out split, on the same deterministic candidate sets the trainer used:
hit@1 / NDCG / recall / format / hallucination / QAS / PAS per query type, each model row beside
the popularity baseline on the same candidate sets (a model must beat "name the famous one").
Prompt settings come from the flag, else the checkpoint's training config (which a .gguf written by
rerec_mini.export carries too), else the defaults;
`python eval.py --model CKPT --help` shows the values that checkpoint will use.
`--num-samples G`: also G sampled answers per query (sampled hit@1, pass@G, majority vote, and the
sampled hit rate where the greedy answer is wrong: what RL's rollouts could sharpen towards), at
the checkpoint's RL temperature and top-p unless --temperature / --top-p say otherwise.
`--retention --model TRAINED [--base BASE]`: KL and perplexity change on neutral texts.
Exit codes: 0 done; 2 a usage error (nothing evaluated).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from rerec_mini.cli import ArgumentParser
from rerec_mini.config import BUNDLED_DATA, REPO_ROOT, UsageError, check_prompt_format
from rerec_mini.evaluate import (BASELINES, PROMPT_DEFAULTS, evaluate_baseline, evaluate_policy, evaluate_samples,
                                 markdown_table, prompt_settings, read_texts, retention, sampled_table, stratified_head)
from rerec_mini.model import load_model, load_tokenizer, resolve_model_dir
from rerec_mini.prompts import NEGATIVE_MODES, CandidateSampler, eos_ids
from rerec_mini.rewards import RewardConfig, Scorer
from rerec_mini.run import assumed_settings, checkpoint_config, open_dataset, pick_device

# Settings without a checkpoint config (a base model): flag > the checkpoint's > these.
DEFAULTS = dict(data=str(BUNDLED_DATA), **PROMPT_DEFAULTS)
# --num-samples draws like the run's RL rollouts did: flag > the checkpoint's > these.
SAMPLING_DEFAULTS = dict(temperature=1.0, top_p=1.0)


def parser(train_cfg: dict | None = None) -> argparse.ArgumentParser:
    """The flags; defaults shown are what this checkpoint will use (train_cfg: its training config)."""
    known = {k: (train_cfg or {}).get(k, v) for k, v in {**DEFAULTS, **SAMPLING_DEFAULTS}.items()}
    src = "the checkpoint's" if train_cfg else "with a checkpoint: its training value"

    def d(key):
        v = known[key]
        return f" [{src}: {v!r}]" if train_cfg else f" [{src}, else {v!r}]"
    p = ArgumentParser(prog="python eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory, .gguf file, hub id, alias or 'tiny'")
    p.add_argument("--data", help="dataset directory" + d("data"))
    p.add_argument("--split", default="test", help="query split to evaluate [test]")
    p.add_argument("--limit", type=int, default=0, help="evaluate N queries, the types in turn [0: all]")
    p.add_argument("--baselines", default="", help=f"comma list of {','.join(BASELINES)} [none]")
    p.add_argument("--compare-base", action="store_true", help="also evaluate the untrained base model")
    p.add_argument("--base", help="the base model [the checkpoint's starting model]")
    p.add_argument("--num-candidates", type=int, help="candidates per prompt; 0 = open generation" + d("num_candidates"))
    p.add_argument("--negatives", choices=NEGATIVE_MODES, help="how negatives are drawn" + d("negatives"))
    p.add_argument("--hard-negatives", type=int, help="hard negatives per candidate set" + d("hard_negatives"))
    p.add_argument("--show-attributes", help="candidate attributes shown, e.g. genre,director" + d("show_attributes"))
    p.add_argument("--history-len", type=int, help="recent history titles in the prompt" + d("history_len"))
    p.add_argument("--request-last", action=argparse.BooleanOptionalAction,
                   help="the request after the candidate list" + d("request_last"))
    p.add_argument("--prompt-examples", type=int, help="worked examples shown before the request" + d("prompt_examples"))
    p.add_argument("--prompt-example-pool", type=int,
                   help="each prompt draws its worked examples from the first P (0: the same first K for every "
                        "prompt)" + d("prompt_example_pool"))
    p.add_argument("--answer-size", type=int, help="titles in the answer box" + d("answer_size"))
    p.add_argument("--max-completion-length", "--max-new-tokens", type=int, dest="max_completion_length",
                   help="most tokens per answer" + d("max_completion_length"))
    p.add_argument("--seed", type=int, help="candidate-set seed" + d("seed"))
    p.add_argument("--num-samples", type=int, default=0,
                   help="also sample G answers per query at --temperature: sampled hit@1, pass@G, majority@G and "
                        "the sampled hit where greedy misses [0: greedy only]")
    p.add_argument("--temperature", type=float, help="sampling temperature of --num-samples" + d("temperature"))
    p.add_argument("--top-p", type=float, help="nucleus threshold of --num-samples" + d("top_p"))
    p.add_argument("--batch-size", type=int, default=64,
                   help="prompts decoded together; with --num-samples, rows (prompts x samples) [64]")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto [auto]")
    p.add_argument("--output", help="write every sample and the tables as JSON here")
    p.add_argument("--retention", action="store_true", help="KL / perplexity change vs --base on neutral texts")
    p.add_argument("--texts", default=str(REPO_ROOT / "data" / "retention.txt"), help="texts for --retention")
    return p


def base_of(train_cfg: dict) -> str:
    if not train_cfg:
        raise UsageError("--compare-base/--retention: give --base (the checkpoint has no training config)")
    if train_cfg["model"] == "tiny":
        return str(Path(train_cfg["output_dir"]) / "tiny-init")
    return train_cfg["model"]


def check(args, s: dict, train_cfg: dict) -> tuple:
    """Every check before any model runs; raises UsageError. Returns (device, model dir, base name, dataset)."""
    unknown = [b for b in args.baselines.split(",") if b and b not in BASELINES]
    if unknown:
        raise UsageError(f"--baselines {args.baselines}: unknown {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    if args.baselines and s["num_candidates"] == 0:
        raise UsageError("--baselines rank a candidate set: they need --num-candidates > 0")
    device = pick_device(args.device)
    try:
        model_dir = resolve_model_dir(args.model)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--model {args.model}: " + " ".join(str(e).split())) from None
    base = args.base or (base_of(train_cfg) if (args.compare_base or args.retention) else None)
    if base is not None:
        try:
            resolve_model_dir(base)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--base {base}: " + " ".join(str(e).split())) from None
    if args.num_samples < 0:
        raise UsageError(f"--num-samples {args.num_samples}: must be >= 0")
    if not args.num_samples and (args.temperature is not None or args.top_p is not None):
        raise UsageError("--temperature / --top-p set how --num-samples samples: give --num-samples G too")
    if args.num_samples:
        sampling = prompt_settings(args, train_cfg, SAMPLING_DEFAULTS)
        if not (sampling["temperature"] > 0 and math.isfinite(sampling["temperature"])):
            raise UsageError(f"--temperature {sampling['temperature']}: --num-samples needs a temperature > 0")
        if not 0 < sampling["top_p"] <= 1:
            raise UsageError(f"--top-p {sampling['top_p']}: must be in (0, 1]")
    if args.num_samples and args.retention:
        raise UsageError("--num-samples evaluates answers; --retention measures texts: give one of them")
    if args.retention:
        if not Path(args.texts).is_file():
            raise UsageError(f"--texts {args.texts}: no such file")
        return device, model_dir, base, None
    ds = open_dataset(s["data"], trained_by=args.model if args.data is None and train_cfg.get("data") else None)
    if args.split not in ds.queries or not ds.queries[args.split]:
        raise UsageError(f"--split {args.split!r}: the dataset's splits with queries are "
                         f"{', '.join(k for k, v in ds.queries.items() if v)}")
    if args.limit < 0:
        raise UsageError(f"--limit {args.limit}: must be >= 0 (0: all)")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be >= 1")
    check_prompt_format(s)
    return device, model_dir, base, ds


def evaluate(argv=None) -> int:
    train_cfg = checkpoint_config(argv)  # before the parser: --help shows the checkpoint's values
    args = parser(train_cfg).parse_args(argv)
    s = prompt_settings(args, train_cfg, DEFAULTS)
    device, model_dir, base_name, ds = check(args, s, train_cfg)
    warning = assumed_settings(args.model, train_cfg, {k: v for k, v in s.items() if getattr(args, k) is None})
    if warning and not args.retention:
        print(warning, file=sys.stderr)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, device=device, dtype=dtype).eval()

    if args.retention:
        base = load_model(base_name, device=device, dtype=dtype).eval()
        res = retention(model, base, tokenizer, read_texts(args.texts))
        print(json.dumps(res, indent=2))
        if args.output:
            Path(args.output).write_text(json.dumps(res, indent=2) + "\n")
        return 0

    queries = stratified_head(ds.queries[args.split], args.limit)
    scorer = Scorer(ds, RewardConfig(k=s["answer_size"]))
    show = tuple(a for a in s["show_attributes"].split(",") if a)
    common = dict(scorer=scorer, candidate_sampler=CandidateSampler(ds), num_candidates=s["num_candidates"],
                  hard_negatives=s["hard_negatives"], negatives=s["negatives"], seed=s["seed"])
    prompt = dict(history_len=s["history_len"], show_attributes=show, answer_size=s["answer_size"],
                  request_last=s["request_last"], prompt_examples=s["prompt_examples"],
                  prompt_example_pool=s["prompt_example_pool"],
                  max_new_tokens=s["max_completion_length"], batch_size=args.batch_size)
    eos = eos_ids(tokenizer, model.cfg.hf, model_dir)
    results = {"model": evaluate_policy(model, tokenizer, ds, queries, eos_token_id=eos, **common, **prompt)}
    sampled = None
    if args.num_samples:
        greedy_hit = [r["hit"] for r in results["model"]["samples"]]
        sampled = evaluate_samples(model, tokenizer, ds, queries, greedy_hit, num_samples=args.num_samples,
                                   eos_token_id=eos, **prompt_settings(args, train_cfg, SAMPLING_DEFAULTS),
                                   **common, **prompt)
    if args.compare_base:
        base_dir = resolve_model_dir(base_name)
        base, base_tok = load_model(base_dir, device=device, dtype=dtype).eval(), load_tokenizer(base_dir)
        results["base"] = evaluate_policy(base, base_tok, ds, queries,
                                          eos_token_id=eos_ids(base_tok, base.cfg.hf, base_dir), **common, **prompt)
    for name in [b for b in args.baselines.split(",") if b]:
        results[name] = evaluate_baseline(name, ds, queries, **common)
    print(markdown_table(results))
    out = {**results["model"], "settings": {**s, "model": args.model, "split": args.split, "count": len(queries)}}
    if sampled:
        print()
        print(sampled_table(sampled))
        out["sampled"] = sampled
    if "base" in results:
        out["base"] = results["base"]
    out["baselines"] = {k: v for k, v in results.items() if k not in ("model", "base")}
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    try:
        return evaluate(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
