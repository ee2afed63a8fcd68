"""What a Qwen2 / Llama-3.x model is, before any weights: its hyperparameters (config.json in and
out, both transformers 4.x and 5.x styles) and its RoPE frequencies (plain, linear, llama3).

Shared by the decoder (model.py) and the GGUF reader (gguf_io.py), which builds a config from a
llama.cpp file's metadata without touching the decoder.
"""

import math
from dataclasses import dataclass, field

import torch

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}  # model_type -> HF class
ROPE_TYPES = ("default", "linear", "llama3")


# ----------------------------------------------------------------------------- config

@dataclass
class ModelConfig:
    model_type: str = "qwen2"
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # None = plain RoPE; else {"rope_type": "llama3"|"linear", "factor": ...}
    max_position_embeddings: int = 2048
    qkv_bias: bool = True               # Qwen2: always; Llama: `attention_bias`, which also biases o_proj
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hf: dict = field(default_factory=dict, repr=False)  # config.json as read: saving keeps every field

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture: model_type={mt!r} (architectures={d.get('architectures')}); "
                             f"rerec-mini supports {sorted(ARCHITECTURES)} (Qwen2/Qwen2.5, Llama-3.x)")
        if d.get("hidden_act", "silu") != "silu" or d.get("use_sliding_window"):
            raise ValueError(f"unsupported {mt} variant: hidden_act={d.get('hidden_act')!r}, "
                             f"use_sliding_window={d.get('use_sliding_window')} (need silu, no sliding window)")
        # transformers 5.x writes `rope_parameters` (theta included); 4.x writes `rope_theta` + `rope_scaling`
        rope = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
        theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        kind = rope.pop("type", None) or rope.get("rope_type", "default")  # very old configs say "type"
        if kind not in ROPE_TYPES:
            raise ValueError(f"unsupported rope type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
        llama = mt == "llama"
        return cls(
            model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta,
            rope_scaling=None if kind == "default" else {**rope, "rope_type": kind},
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            qkv_bias=bool(d.get("attention_bias", False)) if llama else True,
            o_bias=bool(d.get("attention_bias", False)) if llama else False,
            mlp_bias=bool(d.get("mlp_bias", False)) if llama else False,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), hf=dict(d))

    def to_hf_dict(self) -> dict:
        """config.json contents: the original dict with our fields written over it. A config we made
        ourselves gets both rope styles, so transformers 4.x (and vLLM) and 5.x all read it."""
        d = dict(self.hf)
        d.update(architectures=[ARCHITECTURES[self.model_type]], model_type=self.model_type,
                 vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                 intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                 num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                 rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_position_embeddings,
                 tie_word_embeddings=self.tie_word_embeddings, hidden_act="silu")
        if self.model_type == "llama":
            d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias, head_dim=self.head_dim)
        elif self.head_dim != self.hidden_size // self.num_heads:
            d["head_dim"] = self.head_dim
        v5, v4 = "rope_parameters" in self.hf, "rope_theta" in self.hf or "rope_scaling" in self.hf
        if v5 or not v4:
            d["rope_parameters"] = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        if v4 or not v5:
            d.update(rope_theta=self.rope_theta, rope_scaling=self.rope_scaling)
        return d


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim // 2], float32, computed exactly as transformers does."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, blend smoothly in between
    f, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * inv / f + smooth * inv
    return torch.where(wavelen > old / lo, inv / f, torch.where(wavelen < old / hi, inv, blended))
