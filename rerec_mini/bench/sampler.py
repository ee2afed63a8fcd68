"""Sampler benchmark: our KV-cache sampler vs transformers `generate`, same weights, same rows.

    python -m rerec_mini.bench sampler                                  # cpu-small preset
    python -m rerec_mini.bench sampler --preset qwen2.5-1.5b --device cuda
    python -m rerec_mini.bench sampler --preset qwen2.5-1.5b --device cpu --layers 2 --new-tokens 16  # smoke test
    python -m rerec_mini.bench sampler --model SmolLM2-135M --threads 1 --prompts 4 --samples 4 --prompt-len 256 --new-tokens 96

Both sides sample (temperature 1, no top-k/top-p) exactly --new-tokens tokens for every row (no
EOS), in the same process, alternating ours/HF; we report the median of --repeats runs. Random
weights: the arithmetic and memory traffic of the real architecture, without a download. Also
reports our ms per decode step against the memory-bandwidth floor (weights + KV read once per step),
and the ops one decode step launches (decode_step_ops). Ours runs with fused projections, as the
trainer's sampling copy does (one q|k|v and one gate|up GEMM a layer); --unfused: HF's seven.
With --model the weights are a real model's (a checkpoint, .gguf or alias, as train.py takes it), loaded
by us and by transformers from the same directory; the preset then gives only the sizes and the device.
"""

import contextlib
import json
import os
import platform
import statistics
import time

import torch

from ..cli import ArgumentParser
from ..model import CausalLM, KVCache, ModelConfig, _dtype, load_model, resolve_model_dir
from ..sampling import DecodeStep, DecoderPool, generate

PRESETS = {
    "cpu-small": dict(
        cfg=dict(model_type="qwen2", vocab_size=8192, hidden_size=256, intermediate_size=704, num_layers=4,
                 num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
        device="cpu", dtype="float32", prompts=8, samples=4, new_tokens=128, prompt_len=64, repeats=5),
    "qwen2.5-1.5b": dict(  # Qwen/Qwen2.5-1.5B-Instruct's config.json
        cfg=dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                 num_heads=12, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
                 max_position_embeddings=32768, qkv_bias=True, tie_word_embeddings=True),
        device="cuda", dtype="bfloat16", prompts=8, samples=8, new_tokens=512, prompt_len=256, repeats=3),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes=1 << 30) -> float:
    """Bytes/s of a large device-to-device copy (read + write both counted): the practical ceiling
    for a memory-bound decode step."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    sync(device)
    return 2 * nbytes * 5 / (time.perf_counter() - t)


# aten ops that launch no kernel: views, allocations, dtype queries, and `to` itself (a cast shows as its
# _to_copy child, a no-op cast as nothing)
NO_KERNEL = {f"aten::{n}" for n in (
    "view _unsafe_view reshape _reshape_alias as_strided alias t transpose permute expand unsqueeze squeeze select "
    "slice chunk split split_with_sizes narrow unflatten flatten detach lift_fresh empty empty_like empty_strided "
    "resize_ resolve_conj resolve_neg result_type to contiguous").split()}


def decode_step_ops(model: CausalLM, rows: int, prompt_len: int, amp: bool = False) -> dict:
    """What one decode step (the step a CUDA graph captures) launches, counted with the profiler.

    ops: the aten ops the model's code calls (the profiler's outermost aten events) that do work, so an
    op counts once however the CPU implements it (a linear, one GEMM with its bias on CUDA, or
    F.rms_norm, one fused kernel on CUDA in recent torch, each count 1; a view or a no-op cast 0).
    cuda_kernels: the kernels the GPU ran, when the model is on CUDA. amp: under bf16 autocast, as the
    trainer's sampling copy runs."""
    from torch.profiler import ProfilerActivity, profile
    dev = next(model.parameters()).device
    ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        length = prompt_len + 1
        cache = KVCache.empty(model.cfg, rows, length, dev, model.compute_dtype)
        pad, slot = torch.zeros(rows, dtype=torch.long, device=dev), torch.full((1,), prompt_len, device=dev)
        step = DecodeStep(model, cache, pad, slot, length, cuda_graph=False)
        tok = torch.zeros(rows, dtype=torch.long, device=dev)
        step.run(tok, length, static=True)  # warm-up: first-call work (kernel choice, lazy init) is not the step's
        sync(dev)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            step.run(tok, length, static=True)
            sync(dev)
    events = prof.events()

    def works(e) -> bool:
        return e.name not in NO_KERNEL or any(works(c) for c in e.cpu_children)
    outer = [e for e in events if e.name.startswith("aten::") and e.device_type == torch.autograd.DeviceType.CPU
             and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    out = {"ops": sum(works(e) for e in outer)}
    if dev.type == "cuda":
        out["cuda_kernels"] = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)
    return out


def hf_twin(model: CausalLM, device, dtype):
    """The transformers model of the same architecture holding our weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    d = model.cfg.to_hf_dict()
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # lm_head: tied
    return hf


def run(preset: str = "cpu-small", *, device=None, dtype=None, prompts=None, samples=None, new_tokens=None,
        prompt_len=None, repeats=None, layers=None, threads=None, cuda_graph=True, hf_static_cache=False, seed=0,
        model_overrides: dict | None = None, model_name: str | None = None, fused: bool = True) -> dict:
    """The benchmark as a function (bench gpu calls it); None takes the preset's value.
    model_name: a real model (path, .gguf or alias) instead of the preset's random weights.
    fused: our model with fused projections (CausalLM.fuse_projections), as the trainer samples."""
    pre = PRESETS[preset]
    given = dict(device=device, dtype=dtype, prompts=prompts, samples=samples, new_tokens=new_tokens,
                 prompt_len=prompt_len, repeats=repeats)
    opt = {k: v if v is not None else pre[k] for k, v in given.items()}
    device, dtype = torch.device(opt["device"]), _dtype(opt["dtype"], opt["device"])
    threads = threads or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    use_graph = device.type == "cuda" and cuda_graph
    if model_name:  # real weights: both sides read the same HF directory
        from transformers import AutoModelForCausalLM
        path = resolve_model_dir(model_name)
        model = load_model(path, device=device, dtype=dtype).eval()
        cfg = model.cfg
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    else:
        cfg = ModelConfig(**{**pre["cfg"], **(model_overrides or {}), **({"num_layers": layers} if layers else {})})
        with torch.device("meta"):  # allocate and initialise straight on the device, in the bench dtype
            model = CausalLM(cfg)
        model = model.to(dtype).to_empty(device=device).init_weights(seed).eval()
        hf = hf_twin(model, device, dtype)
    if fused:  # after the transformers twin took the weights by their HF names
        model.fuse_projections()
    P, G, N, L = opt["prompts"], opt["samples"], opt["new_tokens"], opt["prompt_len"]
    ids = torch.randint(0, cfg.vocab_size, (P, L), generator=torch.Generator().manual_seed(seed))
    hf_input = ids.to(device)
    pool = DecoderPool()  # as the trainer does: graphs captured in the warm-up, replayed after

    def ours(n):
        return generate(model, ids.tolist(), max_new_tokens=n, num_samples=G, temperature=1.0, seed=seed,
                        use_cuda_graph=use_graph, pool=pool)

    @torch.inference_mode()
    def theirs(n):
        extra = {"cache_implementation": "static"} if hf_static_cache else {}
        out = hf.generate(hf_input, attention_mask=torch.ones_like(hf_input), do_sample=True, temperature=1.0,
                          top_k=0, top_p=1.0, max_new_tokens=n, min_new_tokens=n, num_return_sequences=G,
                          eos_token_id=None, pad_token_id=0, **extra)
        assert out.shape == (P * G, L + n), out.shape
        return out

    def timed(fn):
        sync(device)
        t = time.perf_counter()
        r = fn(N)
        sync(device)
        return time.perf_counter() - t, r

    # Warm-up: allocator, kernels, every CUDA graph bucket, lazy imports. transformers compiles `generate`
    # with torch.compile for a static cache on CUDA, once per shape: warm it at the timed shape.
    ours(N), theirs(N if hf_static_cache else min(N, 8))
    t_ours, t_hf, step_ms = [], [], []
    for _ in range(opt["repeats"]):  # alternate, so drift in machine speed hits both alike
        t, r = timed(ours)
        assert r.num_tokens == P * G * N
        t_ours.append(t)
        step_ms.append(1e3 * (r.seconds - r.prefill_seconds) / r.steps)
        t_hf.append(timed(theirs)[0])

    rows, tokens = P * G, P * G * N
    med_ours, med_hf = statistics.median(t_ours), statistics.median(t_hf)
    bw = copy_bandwidth(device)
    elem = torch.finfo(dtype).bits // 8
    weight_bytes = model.num_parameters() * elem
    kv_bytes = cfg.num_layers * 2 * rows * cfg.num_kv_heads * cfg.head_dim * elem * (L + N / 2)  # mean over steps
    floor_ms = 1e3 * (weight_bytes + kv_bytes) / bw
    return dict(
        preset=preset, model=model_name or "random weights", device=str(device),
        device_name=(torch.cuda.get_device_name(device) if device.type == "cuda"
                     else platform.processor() or platform.machine()),
        threads=threads, dtype=str(dtype).removeprefix("torch."),
        layers=cfg.num_layers, params=model.num_parameters(), fused=fused, prompts=P, samples=G, rows=rows,
        prompt_len=L,
        new_tokens=N, repeats=opt["repeats"], cuda_graph=use_graph, graph_captures=pool.captures,
        hf_cache="static" if hf_static_cache else "dynamic",
        ours_s=med_ours, hf_s=med_hf, ours_tok_s=tokens / med_ours, hf_tok_s=tokens / med_hf, ratio=med_hf / med_ours,
        ours_runs_s=t_ours, hf_runs_s=t_hf, ratio_best=min(t_hf) / min(t_ours),
        ours_ms_per_step=statistics.median(step_ms), floor_ms_per_step=floor_ms, copy_gb_s=bw / 1e9,
        ops_per_step=decode_step_ops(model, rows, L),
        torch=torch.__version__, transformers=__import__("transformers").__version__)


def describe(res: dict) -> str:
    lines = [
        f"sampler: preset {res['preset']} ({res['model']}), {res['device']} ({res['device_name']}, "
        f"{res['threads']} threads), "
        f"{res['dtype']}, {res['layers']} layers, {res['params'] / 1e6:.1f}M params",
        f"{res['rows']} rows ({res['prompts']} prompts x {res['samples']} samples), prompt {res['prompt_len']}, "
        f"{res['new_tokens']} new tokens, median of {res['repeats']}",
        f"  {'':14s} {'seconds':>9s} {'tokens/s':>10s}",
        f"  {'rerec-mini':14s} {res['ours_s']:9.3f} {res['ours_tok_s']:10.1f}   "
        f"({'fused' if res.get('fused') else 'separate'} projections)",
        f"  {'transformers':14s} {res['hf_s']:9.3f} {res['hf_tok_s']:10.1f}   ({res['hf_cache']} cache)",
        f"  ratio (ours / transformers tokens/s): {res['ratio']:.2f}x median, {res['ratio_best']:.2f}x best of each",
        f"  decode step: {res['ours_ms_per_step']:.2f} ms, memory-bandwidth floor {res['floor_ms_per_step']:.2f} ms "
        f"({res['ours_ms_per_step'] / res['floor_ms_per_step']:.1f}x; copy bandwidth {res['copy_gb_s']:.0f} GB/s)",
    ]
    ops = res.get("ops_per_step")  # (absent from results recorded before it was counted)
    if ops:
        lines.append(f"  ops per decode step: {ops['ops']}" + (f", CUDA kernels {ops['cuda_kernels']}"
                                                               if "cuda_kernels" in ops else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m rerec_mini.bench sampler", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=PRESETS, default="cpu-small")
    ap.add_argument("--model", help="a real model (checkpoint, .gguf or alias such as SmolLM2-135M) instead of "
                                    "the preset's architecture with random weights")
    ap.add_argument("--device", help="cpu | cuda (default: the preset's)")
    ap.add_argument("--dtype", help="float32 | bfloat16 (default: the preset's)")
    ap.add_argument("--prompts", type=int)
    ap.add_argument("--samples", type=int, help="rows per prompt")
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--layers", type=int, help="override the layer count (a reduced-size smoke run)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both sides")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--unfused", action="store_true", help="our model with HF's separate q/k/v and gate/up projections")
    ap.add_argument("--hf-static-cache", action="store_true", help="transformers with cache_implementation='static'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.model and args.layers:
        ap.error("--layers changes the preset's random-weight architecture; a --model keeps its own layers")
    res = run(args.preset, device=args.device, dtype=args.dtype, prompts=args.prompts, samples=args.samples,
              new_tokens=args.new_tokens, prompt_len=args.prompt_len, repeats=args.repeats, layers=args.layers,
              threads=args.threads, cuda_graph=not args.no_cuda_graph, hf_static_cache=args.hf_static_cache,
              seed=args.seed, model_name=args.model, fused=not args.unfused)
    print(describe(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0
