"""Memory of one RL update, traced on CPU: what is alive at the peak, and in which phase.

    python -m rerec_mini.bench memory                      # qwen2.5-1.5b's architecture, shrunk to CPU size
    python -m rerec_mini.bench memory --hidden 128 --vocab 16384 --rows 32 --json mem.json

A GPU's peak (bench train reads torch.cuda.max_memory_allocated) needs a GPU, but which tensors an update
creates, and how long each lives, is the same code on any device. This bench runs the trainer's update
twice on a synthetic batch (the first creates the AdamW moments, as a run's first step does) and
traces the second: a TorchDispatchMode sees every op's outputs, a weakref finalizer sees each
storage freed. It reports the most bytes alive at once above what was held before the update (weights,
moments, the frozen copies; the gradients are the update's own), the phase it happened in, and the
largest groups of tensors alive then.

The shape is the preset's with small widths (bf16 autocast, gradient checkpointing, every head chunk
checkpointed as at full size), so bytes are the small shape's. What carries over is what is alive
and in how many copies: the issue-30 bug, two [chunk, V] float32 tensors left alive per head chunk by
the logged entropy's autograd graph, shows here as 19 such tensors alive at once instead of 3. On CPU
the head's bf16 GEMM upcasts its weight to float32 (CUDA runs one mixed-precision GEMM); that copy is
not counted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import weakref
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..cli import ArgumentParser
from ..config import resolve_config
from ..data import load_dataset
from .. import model as M
from ..trainer import Batch, Trainer
from .train import PRESETS, make_model


class LiveTensors(TorchDispatchMode):
    """Bytes of the tensor storages created while active and still alive, their peak, the phase of the
    peak (the innermost label in `phase`), and the storages alive at it: {(op, shape, dtype): [bytes, n]}.
    With `count(shape, dtype) -> bool`, also the most storages of that kind alive at once (`most`)."""

    def __init__(self, count=None):
        super().__init__()
        self.alive: dict[int, tuple] = {}  # id(storage) -> (bytes, op, shape, dtype)
        self.now = self.peak = 0
        self.count, self.counted, self.most = count, set(), 0
        self.phase: list[str] = ["update"]
        self.peak_phase, self.at_peak = "", {}
        self.by_phase: dict[str, int] = defaultdict(int)
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.add(t, func.overloadpacket.__name__)
        return out

    def add(self, t: torch.Tensor, op: str) -> None:
        st = t.untyped_storage()
        if id(st) in self.alive or st.nbytes() == 0:
            return
        self.alive[id(st)] = (st.nbytes(), op, tuple(t.shape), str(t.dtype).removeprefix("torch."))
        self.now += st.nbytes()
        if self.count and self.count(*self.alive[id(st)][2:]):
            self.counted.add(id(st))
            self.most = max(self.most, len(self.counted))
        weakref.finalize(st, self.free, id(st))
        where = "/".join(self.phase)
        self.by_phase[where] = max(self.by_phase[where], self.now)
        if self.now > self.peak:
            self.peak, self.peak_phase = self.now, where
            self.at_peak = defaultdict(lambda: [0, 0])
            for n, *key in self.alive.values():
                self.at_peak[tuple(key)][0] += n
                self.at_peak[tuple(key)][1] += 1

    def free(self, key: int) -> None:
        self.now -= self.alive.pop(key)[0]
        self.counted.discard(key)

    def label(self, obj, name: str, label):
        """obj.name's calls run under `label` (a string, or a function of the call's arguments).
        Returns the function that puts the original back."""
        f = getattr(obj, name)

        def labelled(*args, **kwargs):
            self.phase.append(label(*args) if callable(label) else label)
            try:
                return f(*args, **kwargs)
            finally:
                self.phase.pop()
        setattr(obj, name, labelled)
        return lambda: setattr(obj, name, f)


def synthetic_batch(tr: Trainer, rows: int, prompt_len: int, completion_len: int, seed: int = 0):
    """rows rollouts of random ids (G per prompt) and advantages: the update's input without sampling."""
    rng = np.random.default_rng(seed)
    G = tr.cfg.num_generations
    vocab = tr.model.cfg.vocab_size
    prompts = [rng.integers(5, vocab, prompt_len - k).tolist() for k in range(rows // G)]
    comps = [rng.integers(5, vocab, completion_len - r % 3).tolist() for r in range(rows)]
    b = Batch(queries=[None] * len(prompts), indices=None, candidates=[None] * len(prompts), prompt_ids=prompts,
              completions=comps, sampler_logprobs=[[-7.0] * len(c) for c in comps], truncated=[True] * rows)
    return b, [rng.normal(size=len(c)).astype(np.float32) for c in comps]


def run(preset: str = "qwen2.5-1.5b", hidden: int = 96, vocab: int = 9496, intermediate: int = 560, layers: int = 3,
        heads: int = 12, kv_heads: int = 2, rows: int = 16, prompt_len: int = 36, completion_len: int = 92,
        chunk: int = 92, micro_batch: int = 8) -> dict:
    """The trace of one update (see the module docstring) -> figures."""
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(preset, Path(tmp), layers, dict(hidden_size=hidden, intermediate_size=intermediate,
                                                         num_heads=heads, num_kv_heads=kv_heads, vocab_size=vocab))
        cfg = resolve_config({"model": "tiny", **PRESETS[preset], "device": "cpu", "precision": "bf16",
                              "output_dir": tmp, "share_prompt": "off", "logprob_chunk": chunk,
                              "micro_batch_size": micro_batch, "num_generations": min(rows, 8)})
        tr = Trainer(replace(cfg, model=path), load_dataset(cfg.data), path, torch.device("cpu"))
        tr.start_rl()
    b, adv = synthetic_batch(tr, rows, prompt_len, completion_len)
    keep, M.KEEP_LOGITS = M.KEEP_LOGITS, 0  # every head chunk checkpointed, as at a real vocabulary
    try:
        tr.update(b, adv)  # AdamW moments exist from here on, as after a run's first step
        V = tr.model.cfg.vocab_size  # a head chunk's tensors: [<= chunk, V] float32
        live = LiveTensors(count=lambda shape, dtype: dtype == "float32" and len(shape) == 2 and shape[1] == V
                           and shape[0] <= chunk)
        restore = [live.label(tr, "logprobs", lambda model, m, *r: "reference pass" if model is tr.ref
                              else "policy forward"),
                   live.label(torch.Tensor, "backward", "backward"),  # the class's: restored below
                   live.label(tr.optimizer, "step", "optimizer step"),
                   live.label(tr, "sync_rollout_model", "refresh sampling copy")]
        fwd = M.Fp32OutMatmul.forward

        def gpu_like(ctx, h, w):  # CUDA: one mixed GEMM; CPU upcasts w to float32 first, a copy not counted
            live.paused = True
            try:
                out = fwd(ctx, h, w)
            finally:
                live.paused = False
            live.add(out, "head")
            return out
        M.Fp32OutMatmul.forward = staticmethod(gpu_like)
        try:
            with live:
                stats = tr.update(b, adv)
        finally:
            M.Fp32OutMatmul.forward = staticmethod(fwd)
            for undo in restore:
                undo()
    finally:
        M.KEEP_LOGITS = keep
    top = sorted(live.at_peak.items(), key=lambda kv: -kv[1][0])[:10]
    return {"preset": preset, "shape": dict(hidden=hidden, vocab=V, layers=layers, rows=rows, prompt_len=prompt_len,
                                            completion_len=completion_len, chunk=chunk, micro_batch=micro_batch),
            "held_mb": sum(p.numel() * p.element_size() for p in tr.model.parameters()) * 3 / 1e6,  # + 2 moments
            "peak_mb": live.peak / 1e6, "peak_phase": live.peak_phase,
            "peak_by_phase_mb": {k: round(v / 1e6, 3) for k, v in live.by_phase.items()},
            "head_chunk_tensors_most": live.most,  # [<= chunk, V] float32 tensors alive at once, at most
            "at_peak": [{"op": op, "shape": list(shape), "dtype": dtype, "mb": n / 1e6, "count": c}
                        for (op, shape, dtype), (n, c) in top],
            "loss": stats["loss"], "entropy": stats["entropy"]}


def describe(r: dict) -> str:
    s = r["shape"]
    lines = [f"memory of one update: {r['preset']} at hidden {s['hidden']}, vocab {s['vocab']}, {s['layers']} layers, "
             f"{s['rows']} rows of {s['prompt_len']} + {s['completion_len']} tokens, micro-batch {s['micro_batch']}, "
             f"head chunk {s['chunk']} (bf16 autocast, checkpointing)",
             f"  held before it: the policy's weights and AdamW moments {r['held_mb']:.1f} MB, and the frozen copies",
             f"  peak above that (gradients included): {r['peak_mb']:.1f} MB, in {r['peak_phase']}",
             f"  [chunk, V] float32 tensors alive at once, at most: {r['head_chunk_tensors_most']}",
             "  peak by phase (MB):"]
    lines += [f"    {v:9.2f}  {k}" for k, v in sorted(r["peak_by_phase_mb"].items(), key=lambda kv: -kv[1])]
    lines.append("  alive at the peak, largest first:")
    lines += [f"    {t['mb']:9.2f} MB  {t['count']:3d} x {t['op']} {t['shape']} {t['dtype']}" for t in r["at_peak"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m rerec_mini.bench memory", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen2.5-1.5b", choices=[k for k in PRESETS if k != "tiny"])
    for name, default, what in (("hidden", 96, "hidden size"), ("vocab", 9496, "vocabulary"),
                                ("intermediate", 560, "MLP width"), ("layers", 3, "layers"),
                                ("rows", 16, "rollouts in the update"), ("prompt-len", 36, "prompt tokens"),
                                ("completion-len", 92, "completion tokens"), ("chunk", 92, "head chunk (--logprob-chunk)"),
                                ("micro-batch", 8, "rollouts per micro-batch")):
        p.add_argument(f"--{name}", type=int, default=default, help=f"{what} [{default}]")
    p.add_argument("--json", help="also write the figures to this file")
    a = p.parse_args(argv)
    r = run(a.preset, a.hidden, a.vocab, a.intermediate, a.layers, rows=a.rows, prompt_len=a.prompt_len,
            completion_len=a.completion_len, chunk=a.chunk, micro_batch=a.micro_batch)
    print(describe(r))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
