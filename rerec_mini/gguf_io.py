"""GGUF in: a llama.cpp model file (llama / qwen2 architectures) becomes a plain Hugging Face directory.

`converted_dir("m.gguf")` dequantises every tensor to float32 with the `gguf` package, undoes
llama.cpp's q/k row permutation (llama only), and writes config.json + model.safetensors +
generation_config.json + the tokenizer (built by transformers from the same file, chat template kept),
once, under $XDG_CACHE_HOME/rerec-mini/gguf-<key>. `load_model`, the trainer and its checkpoints then
only ever see an ordinary HF checkpoint. The way back out is rerec_mini/export.py.

A GGUF written by export.py from one of our checkpoints also carries the run's training config under
custom keys (RUN_CONFIG, RUN_DATASET); `run_config(path)` reads it back in milliseconds, straight
from the header, so ask / eval.py / explain take the same prompt settings and dataset from the file
as from the checkpoint directory.

    python -m rerec_mini.gguf_io            # what the conversion cache holds, and its size
    python -m rerec_mini.gguf_io --clear    # empty it (a converted file is rebuilt on its next use)
"""

import hashlib
import json
import math
import mmap
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .architecture import ARCHITECTURES, ModelConfig, rope_inv_freq

FORMAT_VERSION = 1  # part of the cache key: bump it when the converted layout changes
FLOAT_TYPES = ("F32", "F16", "BF16")
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
INSTALL_HINT = ('reading or writing GGUF files needs the `gguf` package: pip install -e ".[gguf]" '
                "(or pip install gguf)")

# HF module name -> GGUF tensor name; per-layer ones get "model.layers.{i}." / "blk.{i}." in front
GLOBAL_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's form of Llama-3 RoPE scaling: one divisor per frequency
# Custom metadata keys of a GGUF exported from a training checkpoint (llama.cpp ignores them): the
# training config as JSON (what trainer_state/state.json holds under "config") and the dataset's name.
RUN_CONFIG = "rerec_mini.train_config"
RUN_DATASET = "rerec_mini.dataset"


def import_gguf():
    """The `gguf` package, imported only when a GGUF file is actually read or written (it is an extra)."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return gguf


def tensor_names(num_layers: int) -> dict[str, str]:
    """HF parameter name -> GGUF tensor name, e.g. model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight."""
    names = {}
    for kind in ("weight", "bias"):
        names.update({f"{hf}.{kind}": f"{gg}.{kind}" for hf, gg in GLOBAL_TENSORS.items()})
        for i in range(num_layers):
            names.update({f"model.layers.{i}.{hf}.{kind}": f"blk.{i}.{gg}.{kind}" for hf, gg in LAYER_TENSORS.items()})
    return names


def permute_qk(w: torch.Tensor, n_heads: int, *, to_gguf: bool) -> torch.Tensor:
    """Reorder the rows of a llama q/k projection between HF's and llama.cpp's rotary layouts.

    w: [n_heads * D, ...] (weight [n_heads * D, hidden] or bias [n_heads * D]). HF rotates the pairs
    (x[j], x[j + D/2]) of a head, llama.cpp's llama kernel the pairs (x[2j], x[2j + 1]); its converter
    therefore moves row j of each half to rows 2j and 2j + 1 (to_gguf), and a reader moves them back.
    Qwen2 uses the half-split layout in llama.cpp too, so it is never permuted.
    """
    D = w.shape[0] // n_heads
    split = (n_heads, 2, D // 2) if to_gguf else (n_heads, D // 2, 2)
    return w.reshape(*split, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- read

def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _f32(v) -> float:
    """GGUF stores floats as float32, so 1e-06 reads back as 9.99999997e-07: take the shortest decimal
    with the same float32 value instead, which is what the original config.json said."""
    return float(str(np.float32(v)))


def llama3_scaling_from_rope_freqs(divisors: torch.Tensor, theta: float, head_dim: int) -> dict:
    """Recover HF's llama3 `rope_scaling` from llama.cpp's per-frequency divisors [head_dim // 2].

    The file stores only the divisors. factor = the largest; low/high_freq_factor = 1 and 4 (the values
    of every Llama 3.x release); the original context length follows from a blended frequency, where
    divisor = 1 / ((1 - s) / factor + s) with s = (original / wavelength - 1) / 3. The result is checked
    by recomputing the frequencies, so a file made with other parameters fails loudly, not silently."""
    d = divisors.double()
    factor = d.max().item()
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).double() / head_dim))
    wavelen = 2 * math.pi / inv
    blended = ((d > 1 + 1e-6) & (d < factor - 1e-6)).nonzero().flatten()
    if len(blended) == 0:
        raise ValueError(f"{ROPE_FREQS} has no blended frequency, so its Llama-3 RoPE scaling can't be recovered")
    i = blended[0]
    s = (1 / d[i] - 1 / factor) / (1 - 1 / factor)
    original = round((wavelen[i] * (3 * s + 1)).item())
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": original}
    ours = rope_inv_freq(ModelConfig(head_dim=head_dim, rope_theta=theta, rope_scaling=scaling)).double()
    if not torch.allclose(ours, inv / d, rtol=1e-4):
        raise ValueError(f"{ROPE_FREQS} does not match Llama-3 RoPE scaling with low/high_freq_factor 1/4; "
                         "rerec-mini supports plain, linear and Llama-3 RoPE")
    return scaling


def check_supported(reader, path):
    """A clear ValueError for an architecture or a tensor type we can't read, before anything else."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; rerec-mini reads {', '.join(ARCHITECTURES)}")
    bad = sorted({t.tensor_type.name for t in reader.tensors} - set(FLOAT_TYPES + QUANT_TYPES))
    if bad:
        raise ValueError(f"{path}: unsupported GGUF tensor type(s) {', '.join(bad)}; "
                         f"rerec-mini reads {', '.join(FLOAT_TYPES + QUANT_TYPES)}")


def read_config(reader, path) -> ModelConfig:
    """The model's shape from the GGUF metadata (`{arch}.block_count`, ...) and its tensor list."""
    check_supported(reader, path)
    arch = _field(reader, "general.architecture")

    def get(key, default=None):
        v = _field(reader, f"{arch}.{key}", default)
        if v is None:
            raise ValueError(f"{path}: GGUF metadata {arch}.{key} is missing")
        return v

    tensors = {t.name: t for t in reader.tensors}
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise ValueError(f"{path}: per-layer head counts are not supported")
    head_dim = int(_field(reader, f"{arch}.attention.key_length") or hidden // heads)
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"{path}: partial rotary embeddings (rope.dimension_count != head_dim) are not supported")
    theta = _f32(get("rope.freq_base", 10000.0))
    kind = get("rope.scaling.type", "none")
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": _f32(get("rope.scaling.factor"))}
    elif kind == "none":
        scaling = None
    else:
        raise ValueError(f"{path}: unsupported RoPE scaling {kind!r}; supported: none, linear, Llama-3 (rope_freqs)")
    if ROPE_FREQS in tensors:
        divisors = torch.from_numpy(tensors[ROPE_FREQS].data.astype("float32").reshape(-1))
        if not torch.all(divisors == 1):
            scaling = llama3_scaling_from_rope_freqs(divisors, theta, head_dim)
    has = lambda name: name in tensors  # noqa: E731
    llama = arch == "llama"
    # special ids: generation stops at EOS and at the end-of-turn/-message tokens Llama-3 GGUFs add
    tok = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "eot", "eom")}
    eos = list(dict.fromkeys(int(tok[k]) for k in ("eos", "eot", "eom") if tok[k] is not None))
    hf = {"bos_token_id": tok["bos"], "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
          "pad_token_id": tok["padding"], "torch_dtype": "float32", "dtype": "float32",
          # llama.cpp's name for the text splitting; travels in checkpoints so an export can write it back
          "gguf_tokenizer_pre": _field(reader, "tokenizer.ggml.pre")}
    return ModelConfig(
        model_type=arch, vocab_size=int(tensors["token_embd.weight"].shape[1]),  # GGUF shapes are [cols, rows]
        hidden_size=hidden, intermediate_size=int(get("feed_forward_length")), num_layers=int(get("block_count")),
        num_heads=heads, num_kv_heads=int(kv_heads), head_dim=head_dim,
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon")), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=int(get("context_length", 2048)),
        qkv_bias=has("blk.0.attn_q.bias") if llama else True,  # qwen2 always has q/k/v biases
        o_bias=has("blk.0.attn_output.bias"), mlp_bias=has("blk.0.ffn_gate.bias"),
        tie_word_embeddings=not has("output.weight"),  # llama.cpp omits the head when it is the embedding
        hf={k: v for k, v in hf.items() if v is not None})


def read_gguf(path, reader=None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A .gguf file -> (config, HF-named state dict of float32 tensors), every quant type dequantised.
    reader: an open gguf.GGUFReader of the file, to skip parsing its metadata again (seconds for a
    large vocabulary)."""
    gguf = import_gguf()
    path = Path(path)
    reader = reader or gguf.GGUFReader(path)
    cfg = read_config(reader, path)
    hf_name = {gg: hf for hf, gg in tensor_names(cfg.num_layers).items()}
    sd = {}
    for t in reader.tensors:
        if t.name == ROPE_FREQS:  # already folded into cfg.rope_scaling
            continue
        if t.name not in hf_name:
            raise ValueError(f"{path}: unexpected tensor {t.name!r} for a {cfg.model_type} model")
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype("float32").reshape(shape))
        if cfg.model_type == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            w = permute_qk(w, cfg.num_heads if ".attn_q." in t.name else cfg.num_kv_heads, to_gguf=False)
        sd[hf_name[t.name]] = w.contiguous()
    return cfg, sd


# GGUF value types (the format's numbering) -> struct codes; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_metadata(path, prefix: str) -> dict:
    """The metadata values of a GGUF file whose keys start with `prefix`, read straight from its
    header without the gguf package. Every other value is skipped, not decoded: milliseconds where
    gguf.GGUFReader parses the whole token list (seconds for a 49k vocabulary)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF" or len(mm) < 24:
            raise ValueError(f"{path}: not a GGUF file")
        e = "<" if struct.unpack_from("<I", mm, 4)[0] < 1 << 16 else ">"  # a big-endian file reads its version huge
        n_kv = struct.unpack_from(e + "Q", mm, 16)[0]  # after magic, version (u32), tensor count (u64)
        pos = 24

        def string(at):
            n = struct.unpack_from(e + "Q", mm, at)[0]
            return bytes(mm[at + 8:at + 8 + n]).decode("utf-8", "replace"), at + 8 + n

        def value(kind, at, keep):
            if kind in _SCALARS:
                code = e + _SCALARS[kind]
                return (struct.unpack_from(code, mm, at)[0] if keep else None), at + struct.calcsize(code)
            if kind == _STRING:
                if keep:
                    return string(at)
                return None, at + 8 + struct.unpack_from(e + "Q", mm, at)[0]
            if kind == _ARRAY:
                inner, n = struct.unpack_from(e + "IQ", mm, at)
                at += 12
                if inner in _SCALARS and not keep:  # fixed size: jump over it
                    return None, at + n * struct.calcsize(e + _SCALARS[inner])
                items = []
                for _ in range(n):
                    v, at = value(inner, at, keep)
                    items.append(v)
                return (items if keep else None), at
            raise ValueError(f"{path}: unknown GGUF value type {kind}")

        out = {}
        try:
            for _ in range(n_kv):
                key, pos = string(pos)
                kind = struct.unpack_from(e + "I", mm, pos)[0]
                v, pos = value(kind, pos + 4, key.startswith(prefix))
                if key.startswith(prefix):
                    out[key] = v
        except struct.error:
            raise ValueError(f"{path}: its GGUF metadata ends early (a truncated or damaged file)") from None
        return out


def run_config(path) -> dict:
    """The training config a GGUF exported from one of our checkpoints carries ({} for any other GGUF)."""
    meta = read_metadata(path, "rerec_mini.")
    return json.loads(meta[RUN_CONFIG]) if RUN_CONFIG in meta else {}


# ----------------------------------------------------------------------------- convert + cache

def save_tokenizer(path: Path, out: Path, chat_template: str | None = None, max_length: int | None = None):
    """transformers' tokenizer of a GGUF (vocab, merges, special tokens from the metadata), saved as
    tokenizer.json + tokenizer_config.json + chat template."""
    from transformers import AutoTokenizer
    path = Path(path).resolve()
    # a directory holding only the file: transformers would merge any tokenizer files beside it
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / path.name).symlink_to(path)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=path.name)
    if chat_template and not tok.chat_template:
        tok.chat_template = chat_template
    if max_length:
        tok.model_max_length = max_length  # else "unlimited" (1e30), and truncation never triggers
    tok.save_pretrained(out)
    return tok


def convert(path, out_dir) -> Path:
    """Write the HF directory for a GGUF file: config.json, float32 model.safetensors,
    generation_config.json (with the EOS ids) and the tokenizer."""
    from safetensors.torch import save_file
    gguf = import_gguf()
    path, out = Path(path).resolve(), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(path)
    cfg, sd = read_gguf(path, reader)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    gen = {k: cfg.hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg.hf}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    save_tokenizer(path, out, _field(reader, "tokenizer.chat_template"), cfg.max_position_embeddings)
    return out


def converted_dir(path) -> Path:
    """A .gguf file -> its converted HF directory, built once and cached under
    $XDG_CACHE_HOME/rerec-mini/gguf-<key>; the key covers the file's absolute path, size and mtime
    and FORMAT_VERSION, so an edited or replaced file is converted again."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    key = hashlib.sha256(json.dumps({"v": FORMAT_VERSION, "path": str(path), "size": st.st_size,
                                     "mtime_ns": st.st_mtime_ns}).encode()).hexdigest()[:16]
    root = cache_root()
    final = root / f"gguf-{key}"
    if not (final / "config.json").exists():
        import_gguf()  # fail before making any directory
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
        t0 = time.perf_counter()
        try:
            convert(path, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            os.rename(tmp, final)  # atomic: a concurrent converter either wins or finds it complete
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"converted {path.name} to {final} ({time.perf_counter() - t0:.1f}s, once; "
              "python -m rerec_mini.gguf_io --clear empties the cache)", file=sys.stderr)
    return final


def cache_root() -> Path:
    """$XDG_CACHE_HOME/rerec-mini (else ~/.cache/rerec-mini): converted GGUFs (gguf-*), and the
    `tiny` alias's model (tiny-*, model.tiny_model_dir)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rerec-mini"


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def main(argv=None) -> int:
    """List the conversion cache, or empty it with --clear: each converted GGUF is a float32 copy of
    the model (~517 MB for SmolLM2-135M), rebuilt from its .gguf file on its next use."""
    from .cli import ArgumentParser
    p = ArgumentParser(prog="python -m rerec_mini.gguf_io", description=main.__doc__)
    p.add_argument("--clear", action="store_true", help="delete everything in the cache")
    args = p.parse_args(argv)
    root = cache_root()
    entries = sorted(root.iterdir()) if root.is_dir() else []
    total = 0
    for e in entries:
        n = _size(e)
        total += n
        if args.clear:
            shutil.rmtree(e) if e.is_dir() else e.unlink()
        else:
            print(f"{n / 2**20:9.1f} MiB  {e}")
    what = "removed" if args.clear else "in"
    print(f"{total / 2**20:.1f} MiB {what} {root} ({len(entries)} entries)"
          + ("" if args.clear or not entries else "; --clear deletes them"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
