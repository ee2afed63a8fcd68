"""The GPU check: one command that measures every GPU figure of DESIGN §8, run first whenever a GPU is lent.

    python -m rerec_mini.bench gpu --out DIR [--gguf SmolLM2-135M-Instruct.Q4_1.gguf]   # ~6 min on an H100
    python -m rerec_mini.bench gpu --out DIR --smoke                                     # the same paths, CPU, < 2 min

Parts, each guarded (one failing part records its error and traceback; the others still run), with
DIR/gpu.json and DIR/gpu.md rewritten after every part so a timed-out call still leaves results:
  graph     CUDA-graph decode vs eager decode, greedy, fp32, Qwen2.5-1.5B architecture (random weights):
            token-identical output (the first execution of the graph path is checked here); a row may
            differ only after a step whose top-2 logits tie within 1e-3 (a rounding coin-flip)
  sampler   ours vs transformers `generate` with its static cache, bf16, 64 rows x 512 new tokens, same
            run, ratio; ms per decode step against the memory-bandwidth floor
  train     one GRPO step at 1.5B (64 rollouts x 1k tokens, reference on the GPU, gradient
            checkpointing): seconds per phase, model-FLOPs MFU, peak memory
  real      (with --gguf) a short ReRec run of the real SmolLM2-135M: held-out hit@1 before and after
The GPU machine has no package index and no hub: the real model comes as a file argument, and its
reader, the pure-Python `gguf` package, comes along: `pip install --no-deps --target .gpu-deps gguf`
where pip works, then run with PYTHONPATH=.gpu-deps (its own dependencies, numpy, pyyaml, tqdm and
requests, are on the machine).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch

from ..model import CausalLM, ModelConfig
from ..sampling import DecoderPool, generate
from . import sampler as sampler_bench
from . import train as train_bench

SMOKE_MODEL = dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                   vocab_size=4096)


def part_graph(smoke: bool) -> dict:
    """Greedy decode with and without CUDA graphs on the same prompts; the rows must match."""
    dev = torch.device("cpu" if smoke else "cuda")
    cfg = ModelConfig(**{**sampler_bench.PRESETS["qwen2.5-1.5b"]["cfg"], **(SMOKE_MODEL if smoke else {})})
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to(torch.float32).to_empty(device=dev).init_weights(0).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in (40, 64, 90, 128) * 4]
    n_new = 16 if smoke else 96
    eager = generate(model, prompts, max_new_tokens=n_new, temperature=0, use_cuda_graph=False)
    pool = DecoderPool()
    if smoke:  # no CUDA: run the graph path's static shapes and buffers without capturing (see tests)
        graphed = _static_without_capture(model, prompts, n_new, pool)
    else:
        graphed = generate(model, prompts, max_new_tokens=n_new, temperature=0, use_cuda_graph=True, pool=pool)
        again = generate(model, prompts, max_new_tokens=n_new, temperature=0, use_cuda_graph=True, pool=pool)
        assert again.captures == 0, "a second call with the same shapes captured new graphs"
        assert again.completions == graphed.completions, "replayed graphs gave other tokens than the first capture"
    same = sum(a == b for a, b in zip(eager.completions, graphed.completions))
    ties = []
    for r, (a, b) in enumerate(zip(eager.completions, graphed.completions)):
        if a != b:  # where do they part, and was that step a near-tie?
            k = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            ids = torch.tensor([prompts[r] + a[:k]], device=dev)
            with torch.no_grad():
                top = model(ids)[0, -1].float().topk(2).values
            ties.append({"row": r, "position": k, "top2_gap": float(top[0] - top[1])})
    ok = all(t["top2_gap"] < 1e-3 for t in ties)
    assert ok, f"CUDA-graph decode differs from eager beyond a tie: {ties}"
    return {"rows": len(prompts), "new_tokens": n_new, "identical_rows": same, "diverged_at_ties": ties,
            "captures_first_call": graphed.captures, "check": "passed"}


def _static_without_capture(model, prompts, n_new, pool):
    from ..sampling import DecodeStep
    real = DecodeStep.capture

    def fake(self, tok, length):  # stands in for torch.cuda.CUDAGraph: recompute into the same buffer
        static_tok = tok.clone()
        out = self.run(static_tok, length, static=True)

        class Replay:
            def replay(_):
                out.copy_(self.run(static_tok, length, static=True))
        return Replay(), static_tok, out
    DecodeStep.capture = fake
    try:
        return generate(model, prompts, max_new_tokens=n_new, temperature=0, use_cuda_graph=True, pool=pool)
    finally:
        DecodeStep.capture = real


def part_sampler(smoke: bool) -> dict:
    if smoke:
        return sampler_bench.run("qwen2.5-1.5b", device="cpu", dtype="float32", prompts=2, samples=2, new_tokens=8,
                                 prompt_len=16, repeats=1, model_overrides=SMOKE_MODEL)
    return sampler_bench.run("qwen2.5-1.5b", device="cuda", dtype="bfloat16", prompts=8, samples=8, new_tokens=512,
                             prompt_len=256, repeats=3, hf_static_cache=True)


def part_train(smoke: bool, peak_tflops: float) -> dict:
    if smoke:
        return train_bench.run("qwen2.5-1.5b", "cpu", steps=1, warmup=0, peak_tflops=peak_tflops,
                               overrides={"batch_size": 2, "num_generations": 2, "max_completion_length": 8,
                                          "micro_batch_size": 2},
                               model_overrides={k: v for k, v in SMOKE_MODEL.items() if k != "vocab_size"})
    return train_bench.run("qwen2.5-1.5b", "cuda", steps=2, warmup=1, peak_tflops=peak_tflops)


def part_real(smoke: bool, gguf: str | None) -> dict:
    """A short ReRec run: SFT for the answer format, then RL; held-out hit@1 at each stage."""
    from ..run import train
    model = gguf or ("tiny" if smoke else None)
    if model is None:
        return {"skipped": "no --gguf given (the SmolLM2-135M-Instruct GGUF file)"}
    settings = dict(model=model, num_candidates=8, show_attributes="auto", max_completion_length=96,
                    sft_steps=120, sft_learning_rate=5e-5, sft_batch_size=16, max_steps=40, batch_size=16,
                    num_generations=6, learning_rate=1e-5, beta=0.0, eval_limit=100, save_steps=1000)
    if smoke:
        settings.update(sft_steps=2, max_steps=1, batch_size=2, num_generations=2, max_completion_length=8,
                        eval_limit=4, tiny_hidden=32, tiny_layers=1, tiny_vocab=400)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        res = train({**settings, "output_dir": str(Path(tmp) / "run")})
        out = {"settings": settings, "seconds": time.perf_counter() - t}
        for name in ("sft", "final"):
            if res.get(name):
                out[name] = {"overall": res[name]["overall"], "by_type": {k: v["hit@1"] for k, v in res[name]["by_type"].items()},
                             "popularity_hit@1": ((res[name].get("reference") or {}).get("popularity") or {})
                             .get("overall", {}).get("hit@1")}
    return out


def write(out: Path, results: dict) -> None:
    (out / "gpu.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    lines = [f"# GPU check, {results['date']}", "", f"device: {results['device']}; torch {results['torch']}", ""]
    for name, r in results["parts"].items():
        lines.append(f"## {name}")
        if "error" in r:
            lines += ["", f"**failed**: {r['error']}", "", "```", r["traceback"].rstrip(), "```"]
        elif name == "sampler":
            lines += ["", "```", sampler_bench.describe(r), "```"]
        else:
            lines += ["", "```json", json.dumps(r, indent=2, default=str), "```"]
        lines.append("")
    (out / "gpu.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rerec_mini.bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for gpu.json and gpu.md")
    p.add_argument("--smoke", action="store_true", help="run every code path on CPU with reduced sizes")
    p.add_argument("--gguf", help="the SmolLM2-135M-Instruct GGUF file, for the real-model part")
    p.add_argument("--parts", default="graph,sampler,train,real", help="comma list of graph,sampler,train,real")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100/H200 SXM: 989)")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA GPU here: run with --smoke for the CPU check of the code paths")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "smoke": args.smoke,
               "device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0),
               "torch": torch.__version__, "parts": {}}
    runners = {"graph": lambda: part_graph(args.smoke), "sampler": lambda: part_sampler(args.smoke),
               "train": lambda: part_train(args.smoke, args.peak_tflops), "real": lambda: part_real(args.smoke, args.gguf)}
    failed = 0
    for name in [n for n in args.parts.split(",") if n]:
        t = time.perf_counter()
        print(f"[gpu check] {name} ...", flush=True)
        try:
            r = runners[name]()
        except Exception as e:  # one part's failure must not cost the others' figures
            r = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            failed += 1
        r["part_seconds"] = time.perf_counter() - t
        results["parts"][name] = r
        write(out, results)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"[gpu check] {name}: {'FAILED ' + r['error'] if 'error' in r else 'done'} "
              f"({r['part_seconds']:.0f} s)", flush=True)
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    return 1 if failed else 0
