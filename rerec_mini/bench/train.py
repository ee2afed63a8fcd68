"""Benchmark one GRPO step: time per phase (sample / score / advantages / update), tokens/s, MFU.

    python -m rerec_mini.bench train                      # the tiny preset on CPU
    python -m rerec_mini.bench train --preset qwen2.5-1.5b --device cuda
                                                          # the Qwen2.5-1.5B architecture, random weights

Runs real `Trainer.step()`s on the bundled dataset (after `--warmup` untimed steps) and
reports the median of each phase from the step logs. The update's model FLOPs utilisation
is 6 x parameters x trained tokens (+ attention) over its wall time, against the peak rate
given by `--peak-tflops` (default: 989 for H100/H200 bf16 dense on CUDA; on CPU the achieved
GFLOP/s is printed instead). The 1.5B preset also reports peak GPU memory with the reference
model loaded (beta > 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..data import load_dataset
from ..model import CausalLM, ModelConfig, build_tiny, save_model
from ..trainer import BUNDLED_DATA, Trainer, dataset_texts, resolve_config

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
    # DESIGN §8: 16 queries x 8 samples x 512 tokens, bf16, reference model on the GPU
    "qwen2.5-1.5b": dict(batch_size=16, num_generations=8, max_completion_length=512, micro_batch_size=8,
                         num_candidates=20, show_attributes="", beta=0.01, gradient_checkpointing=True,
                         learning_rate=5e-6, sft_steps=0),
}


def make_model(preset: str, out: Path, layers: int | None) -> str:
    """A model directory for the preset: the tiny model, or Qwen2.5-1.5B's architecture with
    random weights and the tiny byte-level tokenizer (no hub access here). Random weights rarely
    emit EOS, so every rollout runs to --max-completion-length: the worst case, as intended."""
    ds = load_dataset(BUNDLED_DATA)
    cfg = resolve_config({"model": "tiny"})
    path = build_tiny(out / "model", dataset_texts(ds), vocab_size=cfg.tiny_vocab, hidden_size=cfg.tiny_hidden,
                      num_layers=cfg.tiny_layers, intermediate_size=2 * cfg.tiny_hidden)
    if preset == "qwen2.5-1.5b":
        hf = dict(QWEN25_15B, num_hidden_layers=layers or QWEN25_15B["num_hidden_layers"])
        big = CausalLM(ModelConfig.from_hf_dict(hf)).init_weights(0)
        for f in path.glob("*.safetensors"):
            f.unlink()
        save_model(big, path)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rerec_mini.bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--steps", type=int, default=5, help="timed RL steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed RL steps first (allocation, CUDA graphs)")
    p.add_argument("--layers", type=int, help="override the layer count (a smoke run of a big preset on CPU)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (bf16 dense)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(args.preset, Path(tmp), args.layers)
        cfg = resolve_config({"model": "tiny", **PRESETS[args.preset], "device": args.device, "output_dir": tmp,
                              "max_steps": args.warmup + args.steps, "save_every": 10**9, "sft_steps": 0})
        tr = Trainer(replace(cfg, model=model))
        if tr.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rows = []
        for k in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            row = tr.step()
            row["time_step"] = time.perf_counter() - t0
            if k >= args.warmup:
                rows.append(row)
        med = {k: statistics.median(r[k] for r in rows)
               for k in ("time_sample", "time_score", "time_advantage", "time_update", "time_step", "tokens_per_s",
                         "response_len", "update_tokens", "update_seq_len")}
        rollouts = cfg.batch_size * cfg.num_generations
        # Update FLOPs: forward+backward over prompt + completion tokens of every trained rollout
        # (the prompt is re-read by the training forward), plus gradient-checkpoint recompute.
        flops = tr.model.flops_per_token(int(med["update_seq_len"])) * med["update_tokens"] * cfg.num_iterations
        if cfg.gradient_checkpointing:
            flops *= 4 / 3  # one more forward
        out = {
            "preset": args.preset, "device": str(tr.device), "params": tr.model.num_parameters(),
            "rollouts_per_step": rollouts, **{k: round(v, 4) for k, v in med.items()},
            "update_tflops": flops / med["time_update"] / 1e12,
        }
        out["phase_share"] = {k: round(med[k] / med["time_step"], 3)
                              for k in ("time_sample", "time_score", "time_advantage", "time_update")}
        if tr.device.type == "cuda":
            out["mfu_update"] = out["update_tflops"] / args.peak_tflops
            out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0
