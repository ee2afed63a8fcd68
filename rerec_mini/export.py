"""GGUF out: write a checkpoint directory as one .gguf file, so a trained assistant runs in llama.cpp / ollama.

    python -m rerec_mini.export runs/my-run/final --gguf assistant.gguf --type q8_0

Weights: 2-D matrices in the chosen type, norms and biases always F32, llama's q/k rows permuted into
llama.cpp's rotary layout (gguf_io.permute_qk), Llama-3 RoPE scaling as llama.cpp's `rope_freqs` divisors.
q8_0 stores each row in blocks of 32 weights with one scale (8.5 bits a weight); a matrix whose rows
don't split into blocks of 32 falls back to f16. Tokenizer: byte-level BPE (tokens, types, merges,
special ids, add-BOS flag, chat template), padded with [PAD<i>] tokens up to the embedding rows.
The run: a checkpoint of ours (trainer_state/state.json) gives its training config to the file, under
the custom keys gguf_io.RUN_CONFIG (the config as JSON) and RUN_DATASET (the dataset's name), so
`ask` / eval.py / explain use the prompt settings and dataset it was trained with, as they do for the
checkpoint directory itself.

Measured round-trip error, max |logit - logit_fp32| / max |logit_fp32|, of the file read back by
gguf_io (transformers reads the same values; tests/test_gguf.py): f32 0; f16 0.7-1.5e-3 (tested < 5e-3);
q8_0 2-4e-2 (tested < 6e-2) on random 2-layer Qwen2/Llama models and 3.1-4.1e-2 on SmolLM2-135M (whose
argmax then agrees on 97% of positions; the weights' own q8_0 error is 0.5% RMS).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .cli import ArgumentParser
from .config import PROMPT_FORMAT
from .gguf_io import ROPE_FREQS, RUN_CONFIG, RUN_DATASET, import_gguf, permute_qk, tensor_names
from .model import QWEN2_SPLIT, CausalLM, ModelConfig, load_model, load_tokenizer, rope_inv_freq

# Llama 3's split: Qwen2's, except that digits go in groups of up to three instead of one by one
LLAMA3_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}  # --type -> gguf.LlamaFileType


def pre_tokenizer_name(cfg: ModelConfig, tokenizer_json: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre`: which regex splits text before BPE. A model converted from a
    GGUF remembers the original name; otherwise it is read off the tokenizer's pre-tokenizer."""
    if cfg.hf.get("gguf_tokenizer_pre"):
        return cfg.hf["gguf_tokenizer_pre"]
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    kinds = [s.get("type") for s in steps]
    if kinds == ["Split", "ByteLevel"]:
        known = {QWEN2_SPLIT: "qwen2", LLAMA3_SPLIT: "llama-bpe"}
        if steps[0].get("pattern", {}).get("Regex") in known:
            return known[steps[0]["pattern"]["Regex"]]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # SmolLM's digits-then-GPT-2 split
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    raise ValueError(f"no llama.cpp pre-tokenizer matches this tokenizer's {kinds} pre-tokenizer; "
                     "llama.cpp would split text differently from the model's training")


def add_tokenizer(writer, gguf, tok, cfg: ModelConfig):
    """Byte-level BPE vocabulary, merges, special tokens and chat template, under llama.cpp's keys."""
    tj = json.loads(tok.backend_tokenizer.to_str())
    if tj["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(tj.get("decoder")):
        raise ValueError(f"only byte-level BPE tokenizers export to GGUF; this one is {tj['model']['type']}")
    T = gguf.TokenType
    vocab = tok.get_vocab()  # token -> id, added tokens included
    if max(vocab.values()) >= cfg.vocab_size:
        raise ValueError(f"tokenizer has ids up to {max(vocab.values())}, "
                         f"beyond the model's {cfg.vocab_size} embedding rows")
    # llama.cpp wants one token per embedding row: unused rows get placeholder names
    tokens, types = [f"[PAD{i}]" for i in range(cfg.vocab_size)], [T.UNUSED] * cfg.vocab_size
    for text, i in vocab.items():
        tokens[i], types[i] = text, T.NORMAL
    for i, added in tok.added_tokens_decoder.items():
        types[i] = T.CONTROL if added.special else T.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre_tokenizer_name(cfg, tj))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    # the tokenizer's special tokens, else config.json's ids (Qwen2's tokenizer has no BOS, its config does)
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id, "unk": tok.unk_token_id}
    for name in ("bos", "eos", "pad"):
        if ids[name] is None:
            i = cfg.hf.get(f"{name}_token_id")
            ids[name] = i[0] if isinstance(i, list) else i
    for name, i in ids.items():
        if i is not None:
            getattr(writer, f"add_{name}_token_id")(int(i))
    # llama.cpp adds BOS/EOS around a prompt only when told; ask the tokenizer what it does itself
    plain, full = tok.encode("a", add_special_tokens=False), tok.encode("a")
    writer.add_add_bos_token(ids["bos"] is not None and len(full) > len(plain) and full[0] == ids["bos"])
    writer.add_add_eos_token(ids["eos"] is not None and len(full) > len(plain) and full[-1] == ids["eos"])
    if isinstance(tok.chat_template, str):
        writer.add_chat_template(tok.chat_template)


def encode_tensor(gguf, w: torch.Tensor, kind: str):
    """One tensor -> (numpy array to write, raw_dtype): the GGML type of a quantised byte array, or None
    when the numpy dtype (float32 / float16) says it."""
    a = w.detach().float().cpu().numpy()
    if a.ndim == 1 or kind == "f32":  # norms and biases stay F32: llama.cpp computes them in F32
        return a, None
    Q8 = gguf.GGMLQuantizationType.Q8_0
    if kind == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[Q8][0] == 0:  # whole blocks of 32 per row
        return gguf.quants.quantize(a, Q8), Q8
    return a.astype(np.float16), None


def export_gguf(checkpoint, out_path, kind: str = "f16") -> dict:
    """Write `checkpoint` (an HF directory with config.json + *.safetensors + tokenizer) as a GGUF file.
    kind: "f16" | "q8_0" | "f32". Returns a summary: path, bytes, type, arch, tensors, params."""
    import_gguf()  # before loading a large model for nothing
    model, tok = load_model(checkpoint, dtype=torch.float32), load_tokenizer(checkpoint)
    state = Path(checkpoint) / "trainer_state" / "state.json"
    run = json.loads(state.read_text()).get("config") if state.is_file() else None
    return write_gguf(model, tok, out_path, kind, name=Path(checkpoint).resolve().name, run=run)


def write_gguf(model: CausalLM, tok, out_path, kind: str = "f16", name: str = "rerec-mini",
               run: dict | None = None) -> dict:
    """Write a model (any dtype/device; weights are read as float32 on the CPU) and its transformers
    tokenizer as one GGUF file, via a temporary file renamed into place. run: the training config
    to carry (RUN_CONFIG, RUN_DATASET), or None."""
    gguf = import_gguf()
    if kind not in FILE_TYPES:
        raise ValueError(f"unsupported --type {kind!r}; choose from {', '.join(FILE_TYPES)}")
    cfg, arch = model.cfg, model.cfg.model_type
    out = Path(out_path)
    tmp = out.with_name(out.name + ".partial")  # a crash never leaves a truncated file under the real name
    w = gguf.GGUFWriter(tmp, arch)
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType[FILE_TYPES[kind]])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    elif scaling.get("rope_type") == "llama3":
        if arch != "llama":
            raise ValueError("llama.cpp applies Llama-3 RoPE scaling (rope_freqs) to llama models only, not qwen2")
        plain = ModelConfig(head_dim=cfg.head_dim, rope_theta=cfg.rope_theta)
        w.add_tensor(ROPE_FREQS, (rope_inv_freq(plain) / rope_inv_freq(cfg)).numpy())  # divisors, F32
    add_tokenizer(w, gguf, tok, cfg)
    if run:
        w.add_string(RUN_CONFIG, json.dumps(run, sort_keys=True))
        w.add_string(RUN_DATASET, Path(run.get("data", "")).name)

    names = tensor_names(cfg.num_layers)
    sd = model.state_dict()
    for key, t in sd.items():
        if arch == "llama" and (".q_proj." in key or ".k_proj." in key):
            t = permute_qk(t, cfg.num_heads if ".q_proj." in key else cfg.num_kv_heads, to_gguf=True)
        data, raw_dtype = encode_tensor(gguf, t, kind)
        w.add_tensor(names[key], data, raw_dtype=raw_dtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": out, "bytes": out.stat().st_size, "type": kind, "arch": arch, "tensors": len(sd),
            "params": model.num_parameters(), "run": run}


def main(argv=None):
    ap = ArgumentParser(
        prog="python -m rerec_mini.export",
        description="Write a rerec-mini checkpoint (any HF directory of a Qwen2/Llama model: config.json, "
                    "*.safetensors, tokenizer files) as one GGUF file that llama.cpp and ollama run, e.g. "
                    "`llama-cli -m OUT.gguf -cnv` or an ollama Modelfile `FROM ./OUT.gguf`. Needs the gguf "
                    'extra: pip install -e ".[gguf]".')
    ap.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory (e.g. a trainer run's final/)")
    ap.add_argument("--gguf", required=True, metavar="OUT.gguf", help="file to write")
    ap.add_argument("--type", default="f16", choices=list(FILE_TYPES),
                    help="weight matrices as f16 (default; half the fp32 size, near-lossless), q8_0 (8.5 bits "
                         "a weight; logits within a few %% of fp32) or f32; norms and biases are always f32")
    args = ap.parse_args(argv)

    def fail(msg):
        print(f"export: error: {msg}", file=sys.stderr)
        sys.exit(2)

    if not Path(args.checkpoint).is_dir():
        fail(f"checkpoint directory {args.checkpoint} does not exist")
    if not (Path(args.checkpoint) / "config.json").exists():
        fail(f"{args.checkpoint} has no config.json: not a checkpoint directory")
    try:
        info = export_gguf(args.checkpoint, args.gguf, args.type)
    except (ValueError, ImportError, OSError) as e:
        fail(str(e).replace("\n", " "))
    print(f"wrote {info['path']} ({info['bytes'] / 2**20:.1f} MiB, {info['type']}, {info['arch']}, "
          f"{info['params'] / 1e6:.1f}M parameters, {info['tensors']} tensors)")
    run = info["run"]
    if run:
        print(f"with the run's settings (ask / eval.py / explain use them): data {run.get('data')}, "
              + ", ".join(f"{k}={run[k]!r}" for k in PROMPT_FORMAT if k in run))
    else:
        print(f"note: {args.checkpoint} has no trainer_state/state.json (not a training checkpoint of ours): the "
              "file carries no run settings, so ask / eval.py / explain will need --data and the prompt flags")


if __name__ == "__main__":
    main()
