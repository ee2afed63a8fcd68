"""Benchmark one GRPO step: time per phase (sample / score / advantages / update), tokens/s, MFU.

    python -m rerec_mini.bench train                      # the tiny preset on CPU
    python -m rerec_mini.bench train --preset qwen2.5-1.5b --device cuda
                                                          # the Qwen2.5-1.5B architecture, random weights
    python -m rerec_mini.bench train --model runs/sft/final
                                                          # a trained checkpoint at the tiny preset's settings

Runs real `Trainer.step()`s on the bundled dataset (after `--warmup` untimed steps) and reports
the median of each phase. The tiny preset's untrained model never writes a valid answer, so its
groups carry no reward spread and every update is skipped: give `--model` an SFT checkpoint to time
the update the demo's RL phase runs. MFU is model FLOPs over wall time over the device's peak:
    policy forward + backward   6 x (trunk matmul weights x all tokens + head x completion tokens)
                                + 6 x layers x heads x head_dim x seq^2 (causal attention)
    reference forward           a third of that (when beta > 0)
per trained rollout, counted once: gradient-checkpoint recompute is hardware work, not model work,
so it lowers MFU rather than being counted. Peak: --peak-tflops (989 = H100/H200 SXM bf16 dense).
Random weights rarely emit EOS, so the 1.5B preset trains on truncated rollouts (keep_truncated):
every rollout is --max-completion-length tokens and every one trains.

    python -m rerec_mini.bench train --sft-steps 40       # the tiny preset's SFT step, two ways

times SFT steps of the tiny preset at 8 candidates (the prompt-token loss scores every position),
alternating the log-prob head's two paths step by step: logits kept for backward (the default below
model.KEEP_LOGITS entries) and every chunk checkpointed and recomputed (the only path before).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..cli import ArgumentParser
from ..config import BUNDLED_DATA, resolve_config
from ..data import load_dataset
from .. import model as model_module
from ..model import CausalLM, ModelConfig, build_tiny, copy_weights, resolve_model_dir, save_model, token_logprobs
from ..run import build_tiny_start, dataset_texts, pick_device
from ..sampling import DecoderPool, generate
from ..trainer import Trainer

# Qwen2.5-1.5B-Instruct's config.json (the fields our decoder reads).
QWEN25_15B = dict(
    model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=1536,
    intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True,
    hidden_act="silu", bos_token_id=151643, eos_token_id=151645,
)

PRESETS = {
    # the offline demo's RL phase, as `python train.py --model tiny` runs it
    "tiny": dict(),
    # DESIGN §8's memory target: 64 rollouts (8 queries x 8) x 1k tokens, bf16, reference on the GPU
    "qwen2.5-1.5b": dict(batch_size=8, num_generations=8, max_completion_length=1024, micro_batch_size=8,
                         num_candidates=20, show_attributes="", beta=0.01, gradient_checkpointing="on",
                         keep_truncated=True, learning_rate=5e-6, sft_steps=0),
}


def make_model(preset: str, out: Path, layers: int | None, model_overrides: dict | None = None,
               device: torch.device | str = "cpu") -> str:
    """A model directory for the preset. tiny: the demo's own start, as `train.py --model tiny` builds
    it before SFT (whole-word units with their kind init: 2,169 logits per position). qwen2.5-1.5b:
    its architecture with random weights and the tiny byte-level tokenizer without units, whose prompt
    lengths are closer to a real BPE's (no hub access here). model_overrides: config.json fields to
    shrink it (bench gpu --smoke)."""
    ds = load_dataset(BUNDLED_DATA)
    cfg = resolve_config({"model": "tiny"})
    if preset == "tiny":
        return str(build_tiny_start(cfg, ds, out / "model"))
    path = build_tiny(out / "model", dataset_texts(ds), vocab_size=cfg.tiny_vocab, hidden_size=cfg.tiny_hidden,
                      num_layers=cfg.tiny_layers, num_heads=cfg.tiny_heads, num_kv_heads=cfg.tiny_kv_heads,
                      intermediate_size=2 * cfg.tiny_hidden)
    names = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads"}
    hf = dict(QWEN25_15B, **{names.get(k, k): v for k, v in (model_overrides or {}).items()})
    hf["num_hidden_layers"] = layers or hf["num_hidden_layers"]
    with torch.device("meta"):  # initialised where it will run: 1.5B random numbers take a while on a CPU
        big = CausalLM(ModelConfig.from_hf_dict(hf))
    big = big.to_empty(device=device).init_weights(0)
    for f in path.glob("*.safetensors"):
        f.unlink()
    save_model(big, path)
    return str(path)


def update_flops(model: CausalLM, row: dict, with_reference: bool) -> float:
    """Model FLOPs of one update phase, from its step row (see the module docstring)."""
    c = model.cfg
    head = c.vocab_size * c.hidden_size
    trunk = model.num_parameters() - head - (0 if model.lm_head is None else head)  # embedding lookups: no FLOPs
    fwd = (2 * trunk * row["update_tokens"] + 2 * head * row["update_completion_tokens"]
           + 2 * c.num_layers * c.num_heads * c.head_dim * row["update_seq_sq"])
    return fwd * (3 + (1 if with_reference else 0))


class PeakWatch:
    """Which part of a step sets the memory peak: wraps methods of the trainer (one more step, after the
    timed ones) and keeps, per label, the most memory allocated while a call with that label ran. Calls
    nest (update holds the log-prob passes and the optimiser step): at every call's start and end the
    peak since the last such moment is credited to every call open across it, then the counter is
    reset. `peak` and `reset` default to the CUDA allocator's (a test passes its own)."""

    def __init__(self, peak=None, reset=None):
        self.peak = peak or (lambda: torch.cuda.max_memory_allocated() / 1e9)
        self.reset = reset or torch.cuda.reset_peak_memory_stats
        self.peaks: dict[str, float] = {}
        self.open: list[str] = []

    def settle(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = self.peak()
        for label in self.open:
            self.peaks[label] = max(self.peaks.get(label, 0.0), now)
        self.reset()

    def wrap(self, obj, name: str, label=None) -> None:
        """obj.name, watched under `label` (a string, or a function of the call's arguments; default: name)."""
        f = getattr(obj, name)

        def watched(*args, **kwargs):
            self.settle()
            self.open.append(label(*args) if callable(label) else label or name)
            try:
                return f(*args, **kwargs)
            finally:
                self.settle()
                self.open.pop()
        setattr(obj, name, watched)


def peak_by_phase(tr: Trainer, w: PeakWatch | None = None) -> dict[str, float]:
    """One more step, watched (PeakWatch): GB allocated at most during sampling, scoring, advantages, the
    update, and within the update the reference, old-policy and policy log-prob passes, the optimiser
    step and the sampling copy's refresh. A pass's label covers its forward only: the policy's backward
    runs after `logprobs` returns, so a peak in a backward shows as `update` above every label inside it."""
    w = w or PeakWatch()
    for name, label in (("rollout", "sample"), ("score", "score"), ("advantages", "advantages"),
                        ("update", "update"), ("sync_rollout_model", "update: refresh sampling copy")):
        w.wrap(tr, name, label)
    w.wrap(tr, "logprobs", lambda model, m, *rest: "update: reference pass" if model is tr.ref else
           "update: policy pass" + (" (no grad)" if not torch.is_grad_enabled() else ""))
    w.wrap(tr.optimizer, "step", "update: optimizer step")
    w.settle()
    tr.step()
    return {k: round(v, 3) for k, v in w.peaks.items()}


def run(preset: str = "tiny", device: str = "auto", steps: int = 5, warmup: int = 1, layers: int | None = None,
        peak_tflops: float = 989.0, overrides: dict | None = None, model_overrides: dict | None = None,
        model: str | None = None, gap: bool = False) -> dict:
    """The benchmark as a function (bench gpu calls it): median figures of `steps` timed steps.
    overrides: Config fields over the preset; model_overrides: config.json fields (see make_model);
    model: a checkpoint directory to time instead of the preset's freshly initialised model;
    gap: also measure the sampler/trainer log-prob gap first (`sampler_gap`)."""
    dev = pick_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = model or make_model(preset, Path(tmp), layers, model_overrides, dev)
        cfg = resolve_config({"model": "tiny", **PRESETS[preset], "device": device, "output_dir": tmp,
                              "max_steps": warmup + steps + 1, "sft_steps": 0, **(overrides or {})})  # +1: peak_by_phase
        tr = Trainer(replace(cfg, model=path), load_dataset(cfg.data), path, dev)
        tr.start_rl()
        gaps = sampler_gap(tr) if gap else None
        tr.decoders.clear()  # the gap check's graphs and KV cache (another row count) must not count below
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            static_gb = torch.cuda.memory_allocated() / 1e9  # policy, gradients-to-be excluded, copies, reference
            torch.cuda.reset_peak_memory_stats()
        rows = []
        for k in range(warmup + steps):
            t0 = time.perf_counter()
            row = tr.step()
            row["time/step"] = time.perf_counter() - t0
            if k == 0:
                first = row
            if k >= warmup:
                rows.append(row)
        keys = ("time/sample", "time/score", "time/advantage", "time/update", "time/step", "tokens_per_s",
                "completions/mean_length", "update_tokens", "update_completion_tokens", "update_seq_sq")
        med = {k: statistics.median(r[k] for r in rows) for k in keys}
        flops = update_flops(tr.model, med, cfg.beta != 0)
        out = {
            "preset": preset, "model": model or "freshly initialised", "device": str(dev),
            "params": tr.model.num_parameters(),
            "rollouts_per_step": cfg.batch_size * cfg.num_generations,
            "gradient_checkpointing": tr.model.gradient_checkpointing, "precision": "bf16" if tr.bf16 else "fp32",
            **{k: round(v, 4) for k, v in med.items()},
            "update_model_tflops": flops / 1e12, "update_tflop_per_s": flops / med["time/update"] / 1e12,
        }
        out["phase_share"] = {k: round(med[k] / med["time/step"], 3)
                              for k in ("time/sample", "time/score", "time/advantage", "time/update")}
        out["first_step"] = {k: first.get(k) for k in ("sampling/logp_diff_mean", "sampling/logp_diff_max",
                                                        "sampling/ratio_off_frac", "kl", "time/step")}
        out["tis_cap"] = tr.tis_cap
        if gaps:
            out["sampler_gap"] = gaps
        if dev.type == "cuda":
            out["memory_before_first_step_gb"] = static_gb
            out["peak_tflops"] = peak_tflops
            out["mfu_update"] = out["update_tflop_per_s"] / peak_tflops
            out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9  # + the allocator's cache: what a card needs
            out["device_name"] = torch.cuda.get_device_name(dev)
            out["memory_between_steps_gb"] = torch.cuda.memory_allocated() / 1e9  # + gradients and AdamW moments
            try:  # where the peak is; a failure here must not cost the figures above
                out["peak_by_phase_gb"] = peak_by_phase(tr)
            except Exception as e:
                out["peak_by_phase_error"] = f"{type(e).__name__}: {e}"
    return out


def sampler_gap(tr: Trainer, queries: int = 8) -> dict:
    """How far the sampler's log-probs are from the policy's, on the tokens it sampled (what --tis-cap
    corrects): the trainer's sampling copy (bf16 matmul weights, float32 residual and norms, under
    autocast) against a pure-bf16 copy (the copy used before 2026-12), each on its own samples of the
    same prompts, both scored by the policy under autocast as the update scores them."""
    cfg, G = tr.cfg, tr.cfg.num_generations
    b = tr.rollout(tr.train_queries[:queries])
    with torch.device("meta"):
        pure = CausalLM(tr.model.cfg)
    pure = copy_weights(pure.to(torch.bfloat16).to_empty(device=tr.device), tr.model).eval()
    ro = generate(pure, b.prompt_ids, max_new_tokens=cfg.max_completion_length, num_samples=G,
                  temperature=cfg.temperature, top_p=cfg.top_p, eos_token_id=tr.eos, seed=cfg.seed, pool=DecoderPool())
    del pure

    def stats(completions, logprobs) -> dict:
        rows = [r for r, c in enumerate(completions) if c]
        ids, mask = tr._pack([b.prompt_ids[r // G] for r in rows], [completions[r] for r in rows])
        with torch.no_grad(), tr.autocast():
            lp = token_logprobs(tr.model, ids, mask, temperature=cfg.temperature, chunk_size=cfg.logprob_chunk)
        sampled = torch.tensor([x for r in rows for x in logprobs[r]], device=lp.device)
        d = (lp[mask] - sampled).abs()
        return {"tokens": d.numel(), "mean_abs": float(d.mean()), "max_abs": float(d.max()),
                "ratio_off_frac": float(((d.exp() - 1).abs() > 0.1).float().mean())}
    return {"trainer_copy": stats(b.completions, b.sampler_logprobs), "pure_bf16_copy": stats(ro.completions, ro.logprobs),
            "rows": len(b.completions), "precision": "bf16" if tr.bf16 else "fp32"}


def sampler_gap_of(model: str, data: str, prompt: dict, device: str = "auto") -> dict:
    """sampler_gap for a model directory/.gguf/alias on a dataset, with the given prompt settings."""
    dev = pick_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve_config({"model": model, "data": data, **prompt, "device": device, "output_dir": tmp,
                              "sft_steps": 0, "beta": 0.0, "num_generations": 4})
        path = resolve_model_dir(model)
        tr = Trainer(replace(cfg, model=str(path)), load_dataset(data), path, dev)
        tr.start_rl()
        return sampler_gap(tr)


def run_share(model: str = "tiny", data: str | None = None, device: str = "auto", repeats: int = 3,
              overrides: dict | None = None, model_overrides: dict | None = None) -> dict:
    """The update of one batch of rollouts with --share-prompt on and off, alternating in one run.

    model: "tiny" (the demo's start, its preset's shapes), "qwen2.5-1.5b" (that architecture with random
    weights: bench gpu), or anything train.py's --model takes (a checkpoint, alias, .gguf). One real
    batch is sampled, then every timed update trains on it with random advantages (so no update is
    skipped, whatever the model answers). Reports median update seconds per mode, the tokens the trunk
    processes, and the activation memory each mode holds for backward (on CPU: the bytes autograd
    saves in one micro-batch's forward, the most of any micro-batch; on CUDA: peak allocated)."""
    dev = pick_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        preset = "tiny" if model == "tiny" else "qwen2.5-1.5b" if model == "qwen2.5-1.5b" else None
        path = make_model(preset, Path(tmp), None, model_overrides, dev) if preset else str(resolve_model_dir(model))
        settings = {"model": "tiny", **(PRESETS[preset] if preset else {}), "device": device, "output_dir": tmp,
                    "sft_steps": 0, "keep_truncated": True, **(overrides or {})}
        if data:
            settings["data"] = data
        cfg = resolve_config(settings)
        tr = Trainer(replace(cfg, model=path), load_dataset(cfg.data), path, dev)
        tr.start_rl()
        b = tr.rollout()
        rng = np.random.default_rng(0)
        adv = [rng.normal(size=len(c)).astype(np.float32) for c in b.completions]
        saved = {"now": 0, "max": 0}

        def pack(t):
            saved["now"] += t.numel() * t.element_size()
            return t

        def logprobs(model_, m, with_entropy=False):  # the activations one micro-batch holds for backward
            saved["now"] = 0
            out = Trainer.logprobs(tr, model_, m, with_entropy)
            saved["max"] = max(saved["max"], saved["now"])
            return out
        tr.logprobs = logprobs
        times: dict[str, list[float]] = {"on": [], "off": []}
        rows: dict[str, dict] = {}
        for k in range(2 * (repeats + 1)):  # the first round of each mode is a warm-up
            mode = ("on", "off")[k % 2]
            tr.cfg = replace(tr.cfg, share_prompt=mode)
            saved["max"] = 0
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                row = tr.update(b, adv)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if k >= 2:
                times[mode].append(time.perf_counter() - t0)
            rows[mode] = {"trunk_tokens": row["update_tokens"], "completion_tokens": row["update_completion_tokens"],
                          "activation_bytes": saved["max"], "shared": row["update_shared_prompt"]}
            if dev.type == "cuda":
                rows[mode]["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        G = cfg.num_generations
        med = {m: statistics.median(t) for m, t in times.items()}
        auto = replace(tr.cfg, share_prompt="auto")
        tr.cfg = auto
        return {
            "model": model, "device": str(dev), "threads": torch.get_num_threads(), "rollouts": len(b.completions),
            "num_generations": G, "micro_batch_size": cfg.micro_batch_size,
            "prompt_len_mean": float(np.mean([len(p) for p in b.prompt_ids])),
            "completion_len_mean": float(np.mean([len(c) for c in b.completions])),
            "update_s_on": med["on"], "update_s_off": med["off"], "speedup": med["off"] / med["on"],
            "runs_s": times, **{f"{m}_{k}": v for m, r in rows.items() for k, v in r.items()},
            "auto_picks": "on" if tr.shares_prompt(b) else "off", "repeats": repeats,
        }


def run_sft(device: str = "auto", steps: int = 40, warmup: int = 2) -> dict:
    """Median seconds per tiny-preset SFT step with the head's logits kept and recomputed, the two
    arms alternating so that both see the same mix of batches and the same machine noise."""
    dev = pick_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        # The train split rather than --sft-fresh's generated queries: the same prompts, no minute of generation.
        cfg = resolve_config({"model": "tiny", "device": device, "output_dir": tmp, "sft_candidate_ramp": 0.0,
                              "sft_fresh": 0})
        # The demo's own start (whole-word units: 2,169 logits per position, not a plain BPE's 1,024):
        # the head's share of a step, which this bench is about, depends on it.
        model = make_model("tiny", Path(tmp), None)
        tr = Trainer(replace(cfg, model=model), load_dataset(cfg.data), model, dev)
        times: dict[str, list[float]] = {"kept": [], "recomputed": []}
        default = model_module.KEEP_LOGITS
        try:
            for k in range(2 * (warmup + steps)):
                arm = ("kept", "recomputed")[k % 2]
                model_module.KEEP_LOGITS = default if arm == "kept" else 0
                t0 = time.perf_counter()
                tr.sft_step()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if k >= 2 * warmup:
                    times[arm].append(time.perf_counter() - t0)
        finally:
            model_module.KEEP_LOGITS = default
    med = {arm: statistics.median(ts) for arm, ts in times.items()}
    return {"preset": "tiny", "device": str(dev), "threads": torch.get_num_threads(), "sft_steps_per_arm": steps,
            "sft_step_s_kept": round(med["kept"], 4), "sft_step_s_recomputed": round(med["recomputed"], 4),
            "speedup": round(med["recomputed"] / med["kept"], 3)}


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m rerec_mini.bench train", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--steps", type=int, default=5, help="timed RL steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed RL steps first (allocation, CUDA graphs)")
    p.add_argument("--layers", type=int, help="override the layer count (a smoke run of a big preset on CPU)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (bf16 dense)")
    p.add_argument("--model", help="time the RL steps of this checkpoint directory instead of a freshly "
                   "initialised model, e.g. the demo's SFT start: python train.py --model tiny --max-steps 0 "
                   "--output-dir runs/sft, then --model runs/sft/final (the preset's settings still apply)")
    p.add_argument("--sft-steps", type=int, default=0,
                   help="instead: time this many tiny-preset SFT steps per head path (logits kept / recomputed)")
    p.add_argument("--share-prompt", action="store_true",
                   help="instead: time one batch's update with --share-prompt on and off, alternating; --model "
                        "takes tiny, qwen2.5-1.5b (random weights) or what train.py's --model takes")
    p.add_argument("--data", help="--share-prompt: the dataset [the bundled one]")
    p.add_argument("--num-generations", type=int, help="--share-prompt: rollouts per prompt [the preset's]")
    p.add_argument("--batch-size", type=int, help="--share-prompt: prompts [the preset's]")
    p.add_argument("--max-completion-length", type=int, help="--share-prompt: completion tokens [the preset's]")
    p.add_argument("--num-candidates", type=int, help="--share-prompt: candidates per prompt (prompt length)")
    p.add_argument("--micro-batch-size", type=int, help="--share-prompt: rollouts per micro-batch")
    p.add_argument("--repeats", type=int, default=3, help="--share-prompt: timed updates per mode [3]")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    if args.share_prompt:
        given = {k: getattr(args, k) for k in ("num_generations", "batch_size", "max_completion_length",
                                              "num_candidates", "micro_batch_size") if getattr(args, k)}
        out = run_share(args.model or args.preset, args.data, args.device, args.repeats,
                        {"show_attributes": "auto", **given})
        print(json.dumps(out, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        return 0
    if args.model and not (Path(args.model) / "config.json").is_file():
        p.error(f"--model {args.model}: not a checkpoint directory (no config.json there)")
    if args.model and args.layers:
        p.error("--layers shrinks the preset's own model; --model brings its own: give one")
    if args.model and args.sft_steps:
        p.error("--model times RL steps of a checkpoint; --sft-steps times the demo's untrained start: give one")
    if args.sft_steps:
        out = run_sft(args.device, args.sft_steps)
    else:
        out = run(args.preset, args.device, args.steps, args.warmup, args.layers, args.peak_tflops,
                  model=args.model)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0
