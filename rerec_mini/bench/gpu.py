"""The GPU check: every GPU figure of DESIGN §8, in calls that each fit a 10-minute lease.

    python -m rerec_mini.bench gpu --out DIR --parts graph,kernels,train,share,sampler   # ~6 min on an H200
    python -m rerec_mini.bench gpu --out DIR --parts decode                                 # ~2 min
    python -m rerec_mini.bench gpu --out DIR --parts real --gguf SmolLM2-135M-Instruct.Q4_1.gguf --data data/ml1m
    python -m rerec_mini.bench gpu --out DIR --smoke                                 # every part on CPU, < 2 min

Parts, each guarded (one failing part records its error and traceback; the others still run), with
DIR/gpu.json and DIR/gpu.md rewritten after every part so a timed-out call still leaves results:
  graph     Qwen2.5-1.5B architecture, random weights. CUDA-graph vs eager greedy decode, fp32: the rows
            must be token-identical (a row may part only after a step whose top-2 logits tie within
            1e-3). Then the reference check that a kernel shared by both cannot pass: the sampler's
            greedy log-probs against a full forward over the finished sequences (`token_logprobs`),
            under the default SDPA kernels and under the math kernel, in fp32 and in bf16
  kernels   which SDPA kernel each call site takes (training, prefill with and without a mask, decode);
            the cost of a new sequence length per backend (cuDNN builds a plan per shape); the
            log-prob head with bf16 vs float32 output: time and error
  train     one GRPO step at 1.5B (64 rollouts x 1k tokens, reference on the GPU, checkpointing):
            seconds per phase, model-FLOPs MFU, peak memory, and the sampler/trainer log-prob gap
  share     the update with each prompt computed once per group vs once per rollout, 1.5B, the
            paper's shape (G = 5, 20 candidates with attributes, 256 tokens): seconds, memory
  sampler   ours vs transformers `generate` with its static cache, bf16, 64 rows x 512 new tokens, same
            run, ratio (both warmed up at the timed shape); ms per decode step vs the bandwidth floor
  decode    the trainer's sampling copy (bf16 matmul weights, under autocast) with fused projections
            (one q|k|v, one gate|up GEMM a layer) against the unfused copy, same run, alternating, 1.5B,
            64 rows x 512 new tokens: ms per decode step, tokens/s, the ratio; ops and CUDA kernels per
            decode step; the bandwidth floor; greedy rows identical between the two
  real      (with --gguf) the real SmolLM2-135M through the command lines, all on the GPU: the
            sampler/trainer gap on real weights; train.py (SFT, RL, checkpoints), stopped halfway and
            continued with --resume; eval.py and ask on the result; held-out hit@1, seconds per step
  torchrun  train.py under `torchrun --nproc-per-node 1` (NCCL, a process group of one), plain and
            with --fsdp, against `python train.py` with the same settings (final weights apart,
            relative to how far they moved); an --fsdp run stopped halfway and finished without
            torchrun. Tiny model, ~1 min. (One GPU: no multi-GPU speed-up can be measured here.)
The GPU machine has no package index and no hub: the real model comes as a file argument, and its
reader, the pure-Python `gguf` package, comes along as a wheel (`pip download --no-deps gguf`),
installed there with `pip install --no-deps --target DIR` and PYTHONPATH=DIR (its own dependencies,
numpy, pyyaml, tqdm and requests, are on the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cli import ArgumentParser
from ..model import CausalLM, Fp32OutMatmul, ModelConfig, frozen_copy, token_logprobs
from ..sampling import DecoderPool, generate
from .sampler import decode_step_ops
from . import sampler as sampler_bench
from . import train as train_bench

SMOKE_MODEL = dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                   vocab_size=4096)
REPO = Path(__file__).resolve().parents[2]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def qwen15(smoke: bool, dtype=torch.float32, layers: int | None = None) -> CausalLM:
    """The Qwen2.5-1.5B architecture (SMOKE_MODEL's sizes with --smoke), random weights, on the device."""
    dev = torch.device("cpu" if smoke else "cuda")
    over = {**(SMOKE_MODEL if smoke else {}), **({"num_layers": layers} if layers else {})}
    cfg = ModelConfig(**{**sampler_bench.PRESETS["qwen2.5-1.5b"]["cfg"], **over})
    with torch.device("meta"):
        model = CausalLM(cfg)
    return model.to(dtype).to_empty(device=dev).init_weights(0).eval()


# ----------------------------------------------------------------------------- graph


def part_graph(smoke: bool) -> dict:
    """Greedy decode with and without CUDA graphs on the same prompts; the rows must match. Then the
    sampler's log-probs against a full forward, default kernels and math kernel, fp32 and bf16."""
    model = qwen15(smoke)
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=gen).tolist() for n in (40, 64, 90, 128) * 4]
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
    assert all(t["top2_gap"] < 1e-3 for t in ties), f"CUDA-graph decode differs from eager beyond a tie: {ties}"
    out = {"rows": len(prompts), "new_tokens": n_new, "identical_rows": same, "diverged_at_ties": ties,
           "captures_first_call": graphed.captures, "check": "passed"}
    # The reference check: the decode path against a full forward, which shares no attention call with it
    # (no KV cache, is_causal instead of a mask). A kernel bug in decode shows as a large gap; the math
    # kernel gives the same check with every fused kernel out of the way.
    out["reference"] = {"float32": reference_check(model, prompts, n_new, graphs=not smoke)}
    model = model.to(torch.bfloat16)
    out["reference"]["bfloat16"] = reference_check(model, prompts, n_new, graphs=not smoke)
    fp32, bf16 = out["reference"]["float32"], out["reference"]["bfloat16"]
    # fp32 decode vs fp32 full forward differ by summation order only; bf16 by rounding, far below a bug's size
    out["reference_check"] = "passed"
    assert max(fp32["default"]["max_abs"], fp32["math"]["max_abs"]) < 1e-3, f"fp32 decode vs full forward: {fp32}"
    assert max(bf16["default"]["mean_abs"], bf16["math"]["mean_abs"]) < 0.1, f"bf16 decode vs full forward: {bf16}"
    return out


def reference_check(model: CausalLM, prompts, n_new: int, graphs: bool) -> dict:
    """|sampler log-prob - full-forward log-prob| over every greedy token: under the default SDPA kernels
    (decoding as the trainer does, with CUDA graphs), and under the math kernel (eager: a graph captured
    under other kernels would replay those)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dev = next(model.parameters()).device
    res, rows = {}, {}
    for name in ("default", "math"):
        with sdpa_kernel(SDPBackend.MATH) if name == "math" else contextlib.nullcontext():
            use_graph = graphs and name == "default"
            ro = generate(model, prompts, max_new_tokens=n_new, temperature=0, use_cuda_graph=use_graph,
                          pool=DecoderPool() if use_graph else None)
            diffs = []
            for p, c, lp in zip(prompts, ro.completions, ro.logprobs):
                ids = torch.tensor([p + c], device=dev)
                mask = torch.zeros_like(ids, dtype=torch.bool)
                mask[0, len(p):] = True
                with torch.no_grad():
                    full = token_logprobs(model, ids, mask)[mask].cpu()
                diffs.append((full - torch.tensor(lp)).abs())
        d = torch.cat(diffs)
        res[name] = {"tokens": d.numel(), "mean_abs": float(d.mean()), "max_abs": float(d.max())}
        rows[name] = ro.completions
    res["rows_identical_default_vs_math"] = f"{sum(a == b for a, b in zip(rows['default'], rows['math']))} of {len(prompts)}"
    return res


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


# ----------------------------------------------------------------------------- kernels


def sdpa_ops(fn) -> list[str]:
    """The scaled-dot-product-attention implementations `fn` calls, as the profiler names them
    (aten::_scaled_dot_product_{cudnn,flash,efficient}_attention, ..._math, and their backwards)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
        sync()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if "scaled_dot_product" in n and n != "aten::scaled_dot_product_attention")


def part_kernels(smoke: bool) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    out: dict = {}
    # 1. which kernel each call site takes: a 2-layer slice of the architecture, as the trainer runs it
    # (float32 master weights under bf16 autocast; the sampling copy with bf16 matmul weights)
    policy = qwen15(smoke, layers=2)
    dev = next(policy.parameters()).device
    copy = frozen_copy(policy, True, dev)
    amp = lambda: torch.autocast(dev.type, dtype=torch.bfloat16)  # noqa: E731
    T = 64 if smoke else 1152
    ids = torch.randint(0, policy.cfg.vocab_size, (4 if smoke else 8, T), device=dev)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, T // 2:] = True

    def train_fwd_bwd():
        with amp():
            token_logprobs(policy, ids, mask).sum().backward()

    def sample(lengths):
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, policy.cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
        with amp():
            generate(copy, prompts, max_new_tokens=4, num_samples=2, temperature=1.0, seed=0, use_cuda_graph=False)

    n = 32 if smoke else 700
    out["sdpa_by_call_site"] = {
        "training forward+backward (is_causal, GQA)": sdpa_ops(train_fwd_bwd),
        "prefill, prompts of one length (is_causal)": sdpa_ops(lambda: sample([n, n])),
        "prefill + decode, prompts of two lengths (mask)": sdpa_ops(lambda: sample([n, n - 5])),
    }
    names = {int(v): k for k, v in SDPBackend.__members__.items()}
    out["default_sdpa_priority"] = [names.get(int(b), str(b)) for b in getattr(torch._C, "_get_sdp_priority_order",
                                                                               lambda: [])()]
    del policy, copy
    # 2. a new sequence length per backend: first call (plan build) vs the same shape again
    B, H, KV, D = (2, 4, 2, 32) if smoke else (8, 12, 2, 128)
    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    base = (60, 70, 80) if smoke else (1000, 1037, 1074, 1111)
    shape_cost = {}
    for i, (name, backend) in enumerate(backends.items()):
        lengths = [L + i for L in base]  # lengths no earlier backend saw: a plan cache must not carry over
        ctx = contextlib.nullcontext() if backend is None else sdpa_kernel(backend)
        first, again = [], []
        try:
            with ctx:
                for L in lengths:
                    for bucket in (first, again):
                        q = torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
                        k, v = (torch.randn(B, KV, L, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
                        sync()
                        t = time.perf_counter()
                        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
                        sync()
                        bucket.append(1e3 * (time.perf_counter() - t))
            shape_cost[name] = {"first_call_ms": statistics.median(first), "repeat_ms": statistics.median(again)}
        except RuntimeError as e:  # this backend does not take the shape (or is not built)
            shape_cost[name] = {"unavailable": str(e).splitlines()[0][:160]}
    out["sdpa_new_length_cost"] = {"shape": f"q [{B}, {H}, L, {D}], k/v {KV} heads, causal, fwd+bwd, L near {base}",
                                   **shape_cost}
    # 3. the log-prob head: bf16 logits then float32 (before) vs float32 output from bf16 operands (now)
    N, Hd, V = (256, 128, 4096) if smoke else (1024, 1536, 151936)
    h = torch.randn(N, Hd, device=dev, requires_grad=True)
    w = (torch.randn(V, Hd, device=dev) * 0.02).requires_grad_()
    tgt = torch.randint(0, V, (N,), device=dev)

    def bf16_out():
        with amp():
            return torch.log_softmax(F.linear(h, w).float(), -1).gather(-1, tgt[:, None])

    def fp32_out():
        return torch.log_softmax(Fp32OutMatmul.apply(h.bfloat16(), w.bfloat16()), -1).gather(-1, tgt[:, None])

    with torch.no_grad():  # reference: the same bf16-rounded operands, float64 arithmetic
        ref = torch.log_softmax(h.bfloat16().double() @ w.bfloat16().double().t(), -1).gather(-1, tgt[:, None])
    head = {"shape": f"[{N}, {Hd}] x [{V}, {Hd}]^T, log-softmax, gather, fwd+bwd"}
    for name, fn in (("bf16_logits", bf16_out), ("fp32_logits", fp32_out)):
        times = []
        for i in range(6):
            sync()
            t = time.perf_counter()
            lp = fn()
            lp.sum().backward()
            sync()
            times.append(1e3 * (time.perf_counter() - t))
        err = (lp.detach().double() - ref).abs()
        head[name] = {"ms": statistics.median(times[1:]), "logp_err_mean": float(err.mean()),
                      "logp_err_max": float(err.max())}
    head["mixed_gemm"] = Fp32OutMatmul.mixed_gemm
    out["logprob_head"] = head
    return out


# ----------------------------------------------------------------------------- sampler, train


def part_sampler(smoke: bool) -> dict:
    if smoke:
        return sampler_bench.run("qwen2.5-1.5b", device="cpu", dtype="float32", prompts=2, samples=2, new_tokens=8,
                                 prompt_len=16, repeats=1, model_overrides=SMOKE_MODEL)
    shape = dict(device="cuda", dtype="bfloat16", prompts=8, samples=8, new_tokens=512, prompt_len=256, repeats=2)
    try:
        return sampler_bench.run("qwen2.5-1.5b", **shape, hf_static_cache=True)
    except Exception as e:  # transformers' compiled static-cache path is theirs: keep our figures either way
        res = sampler_bench.run("qwen2.5-1.5b", **shape, hf_static_cache=False)
        return {**res, "static_cache_error": f"{type(e).__name__}: {str(e)[:300]}"}


def part_decode(smoke: bool) -> dict:
    """The sampling copy as the trainer builds it (frozen_copy of a float32 policy: bf16 matmul weights,
    sampled under bf16 autocast), with and without fused projections, timed in the same run, alternating
    (so drift in machine speed hits both alike), every CUDA-graph bucket captured in a warm-up."""
    policy = qwen15(smoke)  # float32, as the trainer holds it
    dev = next(policy.parameters()).device
    copies = {"fused": frozen_copy(policy, True, dev), "unfused": frozen_copy(policy, True, dev, fused=False)}
    cfg = policy.cfg
    del policy
    P, G, N, L, repeats = (2, 2, 8, 16, 1) if smoke else (8, 8, 512, 256, 3)
    R = P * G
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (P, L), generator=g).tolist()
    pools = {name: DecoderPool() for name in copies}

    def sample(name, n=N, temperature=1.0):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            return generate(copies[name], prompts, max_new_tokens=n, num_samples=G, temperature=temperature, seed=0,
                            use_cuda_graph=not smoke, pool=pools[name])

    greedy = {name: sample(name, min(N, 64), 0.0).completions for name in copies}
    for name in copies:  # warm-up at the timed shape: every graph bucket captured
        sample(name)
    runs: dict = {name: {"seconds": [], "ms_per_step": []} for name in copies}
    for _ in range(repeats):
        for name in copies:
            sync()
            t = time.perf_counter()
            r = sample(name)
            sync()
            assert r.num_tokens == R * N
            runs[name]["seconds"].append(time.perf_counter() - t)
            runs[name]["ms_per_step"].append(1e3 * (r.seconds - r.prefill_seconds) / r.steps)
    bw = sampler_bench.copy_bandwidth(dev)
    kv = cfg.num_layers * 2 * R * cfg.num_kv_heads * cfg.head_dim * 2 * (L + N / 2)  # bf16 cache, mean over steps
    out: dict = {"shape": f"{P} prompts x {G} samples = {R} rows, prompt {L}, {N} new tokens, bf16 autocast, "
                          f"{cfg.num_layers} layers", "repeats": repeats, "copy_gb_s": bw / 1e9}
    for name, copy in copies.items():
        read = sum(p.numel() * p.element_size() for n, p in copy.named_parameters() if "embed_tokens" not in n)
        s, ms = statistics.median(runs[name]["seconds"]), statistics.median(runs[name]["ms_per_step"])
        out[name] = {"seconds": s, "tok_s": R * N / s, "ms_per_step": ms, "floor_ms_per_step": 1e3 * (read + kv) / bw,
                     "x_floor": ms / (1e3 * (read + kv) / bw), "runs_s": runs[name]["seconds"],
                     "param_gb": sum(p.numel() * p.element_size() for p in copy.parameters()) / 1e9,
                     **decode_step_ops(copy, R, L, amp=True)}
    out["step_speedup"] = out["unfused"]["ms_per_step"] / out["fused"]["ms_per_step"]
    out["tok_s_ratio"] = out["fused"]["tok_s"] / out["unfused"]["tok_s"]
    same = sum(a == b for a, b in zip(greedy["fused"], greedy["unfused"]))
    out["greedy_identical_rows"] = f"{same} of {R} ({min(N, 64)} tokens; bf16 rows may part at near-ties)"
    return out


def part_train(smoke: bool, peak_tflops: float) -> dict:
    if smoke:
        return train_bench.run("qwen2.5-1.5b", "cpu", steps=1, warmup=0, peak_tflops=peak_tflops,
                               overrides={"batch_size": 2, "num_generations": 2, "max_completion_length": 8,
                                          "micro_batch_size": 2, "precision": "bf16"},
                               model_overrides={k: v for k, v in SMOKE_MODEL.items() if k != "vocab_size"},
                               gap=True)
    return train_bench.run("qwen2.5-1.5b", "cuda", steps=2, warmup=1, peak_tflops=peak_tflops, gap=True)


def part_share(smoke: bool) -> dict:
    """The update with each prompt computed once per group vs once per rollout (--share-prompt), at the
    paper's shape: G = 5, 20 candidates with attributes, 256 completion tokens, 1.5B architecture."""
    shape = {"num_generations": 5, "batch_size": 8, "max_completion_length": 256, "num_candidates": 20,
             "show_attributes": "auto", "micro_batch_size": 10}
    if smoke:
        shape.update(batch_size=1, max_completion_length=8, micro_batch_size=5, num_candidates=4, beta=0.0)
        return train_bench.run_share("qwen2.5-1.5b", device="cpu", repeats=1, overrides=shape,
                                     model_overrides={k: v for k, v in SMOKE_MODEL.items() if k != "vocab_size"})
    return train_bench.run_share("qwen2.5-1.5b", device="cuda", repeats=3, overrides=shape)


# ----------------------------------------------------------------------------- real


def _cli(args: list[str], log: Path) -> float:
    """Run one of the project's command lines (python train.py ...) from the repository root; seconds."""
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(args)}\n")
        f.flush()
        r = subprocess.run([sys.executable, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(args[:2])} ...` exited {r.returncode}; see {log.name}")
    return time.perf_counter() - t


def _phase_seconds(metrics: Path) -> dict:
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    rl = [r for r in rows if r.get("phase") == "rl"]
    out = {"rl_steps": len(rl), "sft_steps": sum(r.get("phase") == "sft" for r in rows)}
    if rl:
        phases = ("time/sample", "time/score", "time/advantage", "time/update")
        out.update({k: statistics.median(r[k] for r in rl) for k in phases})
        out["rl_step_s"] = statistics.median(sum(r[k] for k in phases) for r in rl)
        out["first_rl_step_gap"] = {k: rl[0].get(k) for k in ("sampling/logp_diff_mean", "sampling/logp_diff_max",
                                                               "sampling/ratio_off_frac")}
    return out


def part_real(smoke: bool, gguf: str | None, data: str | None, out_dir: Path) -> dict:
    """The real model through the command lines, on the GPU: README's SmolLM2 recipe (SFT for the answer
    format, then ReRec RL), stopped at half the RL steps and continued with --resume, then eval.py
    and ask on the final checkpoint."""
    model = gguf or ("tiny" if smoke else None)
    if model is None:
        return {"skipped": "no --gguf given (the SmolLM2-135M-Instruct GGUF file)"}
    data = data or str(REPO / "data" / "synth-movies")
    prompt = dict(num_candidates=8, show_attributes="auto", max_completion_length=96)
    steps = 4 if smoke else 40
    settings = dict(model=model, data=data, **prompt, sft_steps=60, sft_batch_size=4, sft_learning_rate=1e-4,
                    batch_size=4, num_generations=4, learning_rate=2e-5, warmup_steps=5, beta=0, micro_batch_size=8,
                    eval_limit=100, eval_steps=steps // 2, save_steps=steps // 4)
    if smoke:
        settings.update(sft_steps=2, eval_limit=4, max_completion_length=8, tiny_hidden=32, tiny_layers=1,
                        tiny_vocab=400, num_generations=2, batch_size=2)
    flags = [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    res: dict = {"model": model, "data": data, "flags": flags}
    log = out_dir / "real.log"
    # the sampler/trainer log-prob gap on real weights: the trainer's copy vs a pure-bf16 copy
    if not smoke:
        res["sampler_gap"] = train_bench.sampler_gap_of(model, data, prompt)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        res["train_s"] = _cli(["train.py", *flags, "--output-dir", str(run), "--max-steps", str(steps // 2)], log)
        res["resume_s"] = _cli(["train.py", "--resume", "--output-dir", str(run), "--max-steps", str(steps)], log)
        res["run"] = _phase_seconds(run / "metrics.jsonl")
        for name in ("sft", "final"):
            p = run / f"eval_{name}.json"
            if p.exists():
                ev = json.loads(p.read_text())
                res[name] = {"overall": ev["overall"], "by_type": {k: v["hit@1"] for k, v in ev["by_type"].items()},
                             "step": ev.get("settings", {}).get("step")}
        res["checkpoints"] = sorted(p.name for p in run.glob("checkpoint-*"))
        ev_out = Path(tmp) / "eval.json"
        res["eval_s"] = _cli(["eval.py", "--model", str(run / "final"), "--limit", "100", "--baselines",
                              "random,popularity", "--output", str(ev_out)], log)
        ev = json.loads(ev_out.read_text())
        res["eval_py"] = {"overall": ev["overall"], "baselines": {k: v["overall"].get("hit@1")
                                                                  for k, v in ev["baselines"].items()}}
        res["ask_s"] = _cli(["-m", "rerec_mini.ask", "--model", str(run / "final"), "War movies starring Tom Hanks"],
                            log)
    res["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return res


# ----------------------------------------------------------------------------- torchrun


def part_torchrun(smoke: bool, out_dir: Path) -> dict:
    """train.py under torchrun with one process on the GPU: a process group of one over NCCL, so every
    collective of distributed.py runs (a world of one takes no shortcut through the launch), and with
    --fsdp so does FSDP2 (sharding over one rank, gathered sampling copy and checkpoints). Each against
    plain `python train.py` with the same settings: the final weights' distance, relative to how far
    training moved them; then the --fsdp run stopped halfway and finished without torchrun."""
    from safetensors.torch import load_file
    settings = dict(model="tiny", tiny_hidden=64, tiny_layers=2, tiny_vocab=600, num_candidates=4,
                    max_completion_length=16, sft_source="format", sft_steps=30, sft_batch_size=8,
                    sft_learning_rate=1e-2, batch_size=8, num_generations=4, learning_rate=1e-3, warmup_steps=1,
                    beta=0.05, eval_limit=8, save_steps=2, seed=3, reward_fn="rerec_mini.example_rewards:shortest_title",
                    device="cpu" if smoke else "cuda")
    if smoke:  # the code paths, at sizes a CPU runs in seconds
        settings.update(tiny_hidden=32, tiny_layers=1, tiny_vocab=400, max_completion_length=8, sft_steps=15,
                        sft_batch_size=4, batch_size=4, num_generations=2, eval_limit=4)
    flags = [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "train.py"]
    log = out_dir / "torchrun.log"
    res: dict = {"flags": flags}

    def apart(a: Path, b: Path) -> dict:
        wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
        w0 = load_file(str(a / "tiny-init" / "model.safetensors"))
        moved = sum(float((wa[k].float() - w0[k].float()).norm()) ** 2 for k in wa) ** 0.5
        gap = sum(float((wa[k].float() - wb[k].float()).norm()) ** 2 for k in wa) ** 0.5
        return {"moved": moved, "apart": gap, "relative": gap / max(moved, 1e-12)}

    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: Path(tmp) / name for name in ("plain", "torchrun", "fsdp", "fsdp_resumed")}
        res["plain_s"] = _cli(["train.py", *flags, "--max-steps", "6", "--output-dir", str(runs["plain"])], log)
        res["torchrun_s"] = _cli([*launch, *flags, "--max-steps", "6", "--output-dir", str(runs["torchrun"])], log)
        res["fsdp_s"] = _cli([*launch, *flags, "--fsdp", "--max-steps", "6", "--output-dir", str(runs["fsdp"])], log)
        if not smoke:  # (tests/test_distributed.py resumes across world sizes on CPU)
            half = runs["fsdp_resumed"]
            res["fsdp_half_s"] = _cli([*launch, *flags, "--fsdp", "--max-steps", "3", "--output-dir", str(half)], log)
            res["resumed_s"] = _cli(["train.py", "--resume", "--output-dir", str(half), "--max-steps", "6"], log)
        for name in ("torchrun", "fsdp") + (() if smoke else ("fsdp_resumed",)):
            res[f"{name}_vs_plain"] = apart(runs["plain"], runs[name])
        res["plain"] = _phase_seconds(runs["plain"] / "metrics.jsonl")
        res["fsdp"] = _phase_seconds(runs["fsdp"] / "metrics.jsonl")
    return res


# ----------------------------------------------------------------------------- the command


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


def environment() -> dict:
    import transformers
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu=p.name,
                   gpu_memory_gb=p.total_memory / 1e9, sms=p.multi_processor_count)
    return env


def run_isolated(cmd: list[str], result: Path) -> dict:
    """Run one part in a child process: a crash inside CUDA (an MMU fault takes the whole process down,
    as one did on the H200 when transformers' compiled generate ran after the train part in the same
    process) costs that part only. The child's output streams through; its last lines go into the
    record when it dies without writing `result`."""
    from collections import deque
    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"})
    for line in proc.stdout:
        print(line, end="", flush=True)
        tail.append(line)
    code = proc.wait()
    if result.exists():
        return json.loads(result.read_text())
    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    return {"error": f"the part's process died ({how}) without a result", "traceback": "".join(tail)}


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m rerec_mini.bench gpu", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--out", required=True, help="directory for gpu.json, gpu.md (and real.log)")
    p.add_argument("--smoke", action="store_true", help="run every code path on CPU with reduced sizes")
    p.add_argument("--gguf", help="the SmolLM2-135M-Instruct GGUF file, for the real-model part")
    p.add_argument("--data", help="dataset for the real-model part [the bundled data/synth-movies]")
    p.add_argument("--parts", default="graph,kernels,train,share,sampler,decode,real,torchrun",
                   help="comma list of graph,kernels,train,share,sampler,decode,real,torchrun [all, in that order]")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100/H200 SXM: 989)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each part in its own process, so that a crash costs only that part [on, off with --smoke]")
    p.add_argument("--one-part", help=argparse.SUPPRESS)  # the child of --isolate: run this part, write its JSON
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA GPU here: run with --smoke for the CPU check of the code paths")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runners = {"graph": lambda: part_graph(args.smoke), "kernels": lambda: part_kernels(args.smoke),
               "train": lambda: part_train(args.smoke, args.peak_tflops), "share": lambda: part_share(args.smoke),
               "sampler": lambda: part_sampler(args.smoke), "decode": lambda: part_decode(args.smoke),
               "real": lambda: part_real(args.smoke, args.gguf, args.data, out),
               "torchrun": lambda: part_torchrun(args.smoke, out)}
    parts = [args.one_part] if args.one_part else [n for n in args.parts.split(",") if n]
    unknown = [n for n in parts if n not in runners]
    if unknown:
        p.error(f"--parts: unknown {','.join(unknown)} (choose from {','.join(runners)})")
    isolate = (not args.smoke if args.isolate is None else args.isolate) and not args.one_part
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "smoke": args.smoke,
               "device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0),
               "torch": torch.__version__, "environment": environment(), "isolated": isolate, "parts": {}}
    failed = 0
    for name in parts:
        t = time.perf_counter()
        if not args.one_part:
            print(f"[gpu check] {name} ...", flush=True)
        if isolate:
            child = out / f".part-{name}.json"
            child.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "rerec_mini.bench", "gpu", *(argv if argv is not None else sys.argv[2:]),
                   "--one-part", name]
            r = run_isolated(cmd, child)
            child.unlink(missing_ok=True)
        else:
            try:
                r = runners[name]()
            except Exception as e:  # one part's failure must not cost the others' figures
                r = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            if torch.cuda.is_available():
                r["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        failed += "error" in r
        r["part_seconds"] = time.perf_counter() - t
        if args.one_part:  # the child: hand the result to the parent
            (out / f".part-{name}.json").write_text(json.dumps(r, default=str))
            return 0
        results["parts"][name] = r
        write(out, results)
        print(f"[gpu check] {name}: {'FAILED ' + r['error'] if 'error' in r else 'done'} "
              f"({r['part_seconds']:.0f} s)", flush=True)
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    return 1 if failed else 0
