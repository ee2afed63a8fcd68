"""Our decoder against transformers (same weights, fp32), checkpoint I/O, chunked log-probs, tiny."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rerec_mini.model import (CausalLM, ModelConfig, RMSNorm, Rotary, apply_rope, build_tiny, hub_cli, load_model,
                              load_tokenizer, save_model, tiny_model_dir, token_logprobs)

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # short, so a 40-token input spans all three bands


def hf_model(arch, seed=0):
    """A random transformers model with non-trivial weights everywhere (biases and norms too)."""
    torch.manual_seed(seed)
    if arch == "qwen2":  # qkv bias, tied head
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True, rope_theta=10000.0))
    else:  # llama3 rope scaling, untied head, attention_bias
        model = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False, attention_bias=True,
                                             rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE)))  # HF edits it in place
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model.eval()


def to_v4_style(path):
    """Rewrite a transformers-5 config.json the way transformers 4.x wrote it."""
    d = json.loads((path / "config.json").read_text())
    rope = dict(d.pop("rope_parameters"))
    d["rope_theta"] = rope.pop("rope_theta")
    d["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    d["torch_dtype"] = d.pop("dtype", "float32")
    (path / "config.json").write_text(json.dumps(d))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("style", ["v5", "v4"])
def test_logits_match_transformers(tmp_path, arch, style):
    hf = hf_model(arch)
    hf.save_pretrained(tmp_path)
    if style == "v4":
        to_v4_style(tmp_path)
    ours = load_model(tmp_path)
    assert ours.cfg.rope_scaling == (None if arch == "qwen2" else LLAMA3_ROPE)
    assert (ours.lm_head is None) == (arch == "qwen2")
    x = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        assert rel_err(ours(x), hf(x).logits) < 1e-4


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_save_roundtrip_and_sharding(tmp_path, arch):
    hf = hf_model(arch)
    hf.save_pretrained(tmp_path / "src")
    ours = load_model(tmp_path / "src")
    save_model(ours, tmp_path / "one")
    save_model(ours, tmp_path / "sharded", max_shard_bytes=100_000)
    assert (tmp_path / "one" / "model.safetensors").exists()
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    x = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        ref = ours(x)
        for d in ("one", "sharded"):
            assert torch.equal(load_model(tmp_path / d)(x), ref)  # ours reads it back bit for bit
            back = AutoModelForCausalLM.from_pretrained(tmp_path / d).eval()  # and transformers reads it
            assert rel_err(ref, back(x).logits) < 1e-5
    cfg = json.loads((tmp_path / "sharded" / "config.json").read_text())  # fields transformers needs survive
    src = json.loads((tmp_path / "src" / "config.json").read_text())
    for key in ("architectures", "model_type", "tie_word_embeddings", "rope_parameters", "bos_token_id", "eos_token_id"):
        assert cfg[key] == src[key], key


def test_refusals(tmp_path):
    cfg = ModelConfig().to_hf_dict()
    (tmp_path / "mistral").mkdir()
    (tmp_path / "mistral" / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    with pytest.raises(ValueError, match="unsupported architecture.*mistral.*llama.*qwen2"):
        load_model(tmp_path / "mistral")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(ValueError, match="pytorch_model.bin.*never unpickles"):
        load_model(tmp_path / "pickled")
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        ModelConfig.from_hf_dict({**cfg, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})


def test_offline_missing_model_says_how_to_download(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = "from rerec_mini.model import load_model; load_model('Qwen2.5-1.5B')"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    msg = r.stderr[r.stderr.rindex("FileNotFoundError"):]
    cli = hub_cli()
    assert f"{cli} download Qwen/Qwen2.5-1.5B-Instruct" in msg and "local directory" in msg, r.stderr[-2000:]


def test_the_download_command_named_is_the_one_huggingface_hub_installed(monkeypatch):
    import importlib.metadata

    class Script:
        def __init__(self, name):
            self.name, self.value = name, f"huggingface_hub.commands:{name}"
    for scripts, want in ((["hf", "huggingface-cli"], "hf"), (["huggingface-cli"], "huggingface-cli"), ([], "hf")):
        monkeypatch.setattr(importlib.metadata, "entry_points", lambda group, s=scripts: [Script(n) for n in s])
        assert hub_cli() == want, scripts


def small_model(tie=True, seed=0):
    cfg = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, tie_word_embeddings=tie)
    return CausalLM(cfg).init_weights(seed, std=0.1)


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("keep_logits", [0, 10 ** 6])  # 0: every chunk checkpointed; 10**6: all kept
def test_token_logprobs_equal_naive(with_entropy, keep_logits):
    """The chunked path, checkpointed or not, against one full log_softmax: values and parameter gradients."""
    model = small_model(tie=False)
    ids = torch.randint(0, 512, (3, 20))
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[0, 5:20], mask[1, 8:14], mask[2, 1:3] = True, True, True  # completions of different lengths
    T, w = 0.7, torch.randn(1, 3, 20)

    def naive():
        logp = torch.log_softmax(model(ids).float() / T, -1)[:, :-1]  # position t-1 predicts ids[:, t]
        lp = logp.gather(-1, ids[:, 1:, None])[..., 0]
        ent = -(logp.exp() * logp).sum(-1)
        shift = lambda t: torch.cat([torch.zeros(3, 1), t], 1) * mask
        return shift(lp), shift(ent)

    def values_and_grads(fn):
        model.zero_grad()
        lp, ent = fn()
        (lp * w[0]).sum().backward()  # the entropy is a logged figure: token_logprobs gives it no gradient
        return lp.detach(), ent.detach(), [p.grad.clone() for p in model.parameters()]

    def chunked():
        out = token_logprobs(model, ids, mask, temperature=T, chunk_size=4, with_entropy=with_entropy,
                             keep_logits=keep_logits)
        return out if with_entropy else (out, torch.zeros_like(out))

    ref, got = values_and_grads(naive), values_and_grads(chunked)
    assert not chunked()[1].requires_grad  # no graph kept alive for it (issue 30: ~10 GB at 1.5B)
    assert got[0].dtype == torch.float32 and (got[0][~mask] == 0).all()
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    if with_entropy:
        torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
    for g, r in zip(got[2], ref[2]):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the no-grad path (no checkpointing, one chunk) gives the same values
        torch.testing.assert_close(token_logprobs(model, ids, mask, temperature=T), ref[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        token_logprobs(model, ids, torch.ones_like(mask))


def test_gradient_checkpointing_same_gradients():
    model = small_model()
    ids = torch.randint(0, 512, (2, 16))
    got = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        torch.log_softmax(model(ids), -1)[:, :-1].gather(-1, ids[:, 1:, None]).sum().backward()
        got.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*got):
        torch.testing.assert_close(a, b)


def test_bf16_keeps_rope_in_float32_and_counts():
    model = small_model().to(torch.bfloat16)
    assert model.model.rotary.inv_freq.dtype == torch.float32
    assert model(torch.randint(0, 512, (1, 8))).dtype == torch.float32  # the head's output: see the next test
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.flops_per_token(128) > 6 * (model.num_parameters() - 512 * 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_and_rope_compute_hfs_formulas_exactly(dtype):
    """RMSNorm as one F.rms_norm and RoPE as a roll against a pre-negated sin are fewer kernels than HF's
    written-out formulas (six for the norm; a neg and a cat per RoPE): the same numbers, bit for bit."""
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64))
    for x in (torch.randn(3, 5, 64) * 7, torch.randn(3, 5, 64).to(dtype)):  # float32 residual; a bf16 model's
        xf = x.float()
        hf = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        assert torch.equal(norm(x), hf)
    x = (torch.randn(3, 5, 64) * 7).requires_grad_()  # training: the gradients, within float32 rounding
    g = torch.randn(3, 5, 64)
    norm = norm.float()
    grads = [torch.autograd.grad((f(x) * g).sum(), [x, norm.weight]) for f in (
        norm, lambda x: norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    cfg = ModelConfig(vocab_size=8, hidden_size=64, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=32, rope_theta=1e6)
    rotary = Rotary(cfg)
    positions = torch.randint(0, 30000, (3, 5))
    cos, sin = rotary(positions, torch.float32)
    ang = positions[..., None].float() * rotary.inv_freq
    ang = torch.cat([ang, ang], dim=-1)
    assert torch.equal(cos, ang.cos())
    q = torch.randn(3, 2, 5, 32).to(dtype)  # a bf16 projection's output meets float32 cos/sin, as under autocast
    q1, q2 = q.chunk(2, dim=-1)
    hf = q * ang.cos()[:, None] + torch.cat([-q2, q1], dim=-1) * ang.sin()[:, None]
    assert torch.equal(apply_rope(q, cos, sin), hf)


@pytest.mark.parametrize("where", ["bf16 model", "fp32 model under bf16 autocast"])
def test_head_logits_are_float32_products_of_the_bf16_operands(where):
    """bf16 logits are quantised (a step of 0.125 between 16 and 32), an error every log-prob, ratio and
    KL would carry. The head multiplies bf16 operands but accumulates and returns float32: equal to the
    float64 product of the same operands within float32 rounding, and its gradient reaches both."""
    torch.manual_seed(0)
    model = small_model()
    if where == "bf16 model":
        model = model.to(torch.bfloat16)
    h = (torch.randn(3, 5, 64) * 4).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=where != "bf16 model"):
        logits = model.head(h.to(next(model.parameters()).dtype))
    w = model.model.embed_tokens.weight
    exact = h.detach().bfloat16().double() @ w.detach().bfloat16().double().t()
    assert logits.dtype == torch.float32 and logits.shape == (3, 5, 512)
    assert (logits.double() - exact).abs().max() < 1e-5 * exact.abs().max()
    rounded = exact.bfloat16().double()  # what a bf16 output would have been: far coarser
    assert (rounded - exact).abs().max() > 100 * (logits.double() - exact).abs().max()
    logits.square().sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


TEXTS = ["The Matrix (1999)", "Amélie (2001)", "Crouching Tiger, Hidden Dragon (2000)",
         "war movies starring Tom Hanks", "Step 1: the user asks for a war film.\nStep 2: Saving Private Ryan "
         "stars Tom Hanks.\n\\boxed{Saving Private Ryan (1998)}"] * 20
TINY = dict(vocab_size=400, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


def test_build_tiny_deterministic_and_loadable(tmp_path):
    a, b = build_tiny(tmp_path / "a", TEXTS, **TINY), build_tiny(tmp_path / "b", TEXTS, **TINY)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ours, hf = load_model(a), AutoModelForCausalLM.from_pretrained(a).eval()
    x = torch.randint(0, 400, (2, 12))
    with torch.no_grad():
        assert rel_err(ours(x), hf(x).logits) < 1e-5

    tok = load_tokenizer(a)
    for text in ["Amélie — 東京 🎬 ½ naïve", "  spaces\n\nand tabs\t!", "\\boxed{Saving Private Ryan (1998)}"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == json.loads((a / "config.json").read_text())["eos_token_id"]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.convert_tokens_to_ids("<|im_start|>") == ids[0] and tok.eos_token_id in ids
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi\n"
    assert AutoTokenizer.from_pretrained(a).encode("Amélie") == tok.encode("Amélie")


def test_tiny_is_built_once_from_the_dataset(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "queries").mkdir(parents=True)
    (data / "items.jsonl").write_text("\n".join(json.dumps({"id": i, "title": t}) for i, t in enumerate(TEXTS[:3])))
    (data / "queries" / "train.jsonl").write_text(json.dumps({"text": TEXTS[3], "gold_reasoning": TEXTS[4]}) + "\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = tiny_model_dir(data, **TINY)
    assert d.parent == tmp_path / "cache" / "rerec-mini" and d.name.startswith("tiny-")
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    assert tiny_model_dir(data, **TINY) == d and (d / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(FileNotFoundError, match="items.jsonl"):
        tiny_model_dir(tmp_path / "nowhere")


def test_tiny_units_are_single_tokens_and_decode_back(tmp_path):
    from rerec_mini.model import build_tiny, load_tokenizer
    units = ["The Detective of Empires (1970)", "Bea Pike", "Horror", "1990s"]
    texts = ["Request: I loved The Detective of Empires (1970). More by Bea Pike, Horror from the 1990s."] * 20
    path = build_tiny(tmp_path / "m", texts, vocab_size=300, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=32, units=units)
    tok = load_tokenizer(path)
    for u in units:
        assert len(tok.encode(u, add_special_tokens=False)) == 1, u
    s = "I loved The Detective of Empires (1970) and Bea Pike's Horror films of the 1990s."
    ids = tok.encode(s, add_special_tokens=False)
    assert tok.decode(ids) == s
    assert tok.convert_tokens_to_ids("Bea Pike") in ids
    assert "Horrors" not in [tok.decode([i]) for i in tok.encode("Horrors", add_special_tokens=False)]  # whole words only
    assert json.loads((path / "config.json").read_text())["vocab_size"] >= len(tok)


def test_tiny_unit_kinds_share_a_direction_in_the_initial_embedding(tmp_path):
    """units given as {unit: kind}: each unit's embedding starts as (its kind's vector + its own) / sqrt(2),
    so units of one kind point the same way (cosine ~1/2) and units of different kinds do not (~0)."""
    import torch.nn.functional as F
    from rerec_mini.model import build_tiny, load_model, load_tokenizer
    kinds = {f"Person{i}": "person" for i in range(40)} | {f"Genre{i}": "genre" for i in range(40)}
    texts = [" ".join(kinds)] * 5
    kw = dict(vocab_size=300, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
    path = build_tiny(tmp_path / "k", texts, units=kinds, **kw)
    tok, E = load_tokenizer(path), load_model(path).model.embed_tokens.weight.detach()
    vec = {u: E[tok.convert_tokens_to_ids(u)] for u in kinds}

    def mean_cos(a, b):
        return sum(F.cosine_similarity(vec[x], vec[y], dim=0).item() for x in a for y in b if x != y) / \
            sum(1 for x in a for y in b if x != y)
    people, genres = [u for u in kinds if kinds[u] == "person"], [u for u in kinds if kinds[u] == "genre"]
    assert 0.35 < mean_cos(people, people) < 0.65 and 0.35 < mean_cos(genres, genres) < 0.65
    assert abs(mean_cos(people, genres)) < 0.15
    # other tokens keep the plain init scale; a plain list of units adds no kind direction
    plain = load_model(build_tiny(tmp_path / "p", texts, units=list(kinds), **kw)).model.embed_tokens.weight.detach()
    pv = {u: plain[tok.convert_tokens_to_ids(u)] for u in kinds}
    assert abs(sum(F.cosine_similarity(pv[x], pv[y], dim=0).item() for x in people for y in people if x != y)
               / (40 * 39)) < 0.1
    assert E.std().item() == pytest.approx(plain.std().item(), rel=0.2)


def test_tiny_tokenizer_keeps_the_prompts_fixed_words_short(ds, tmp_path):
    """The tokenizer is trained on every train prompt as rendered, so the words every prompt repeats
    merge into a few tokens (trained on one prompt, the instruction line was ~33 tokens)."""
    from rerec_mini.model import build_tiny, load_tokenizer
    from rerec_mini.prompts import SYSTEM, build_messages
    from rerec_mini.run import dataset_texts, tiny_units
    path = build_tiny(tmp_path / "t", dataset_texts(ds), vocab_size=1024, hidden_size=16, num_layers=1, num_heads=2,
                      num_kv_heads=1, intermediate_size=32, units=tiny_units(ds))
    tok = load_tokenizer(path)
    q = ds.queries["test"][0]
    instruction = build_messages(q, ds, q.ground_truth[:1])[1]["content"].splitlines()[-1]
    assert instruction.startswith("Reason")
    assert len(tok.encode(instruction, add_special_tokens=False)) <= 16  # one per word and sign
    assert len(tok.encode(SYSTEM, add_special_tokens=False)) <= 6
    assert len(tok.encode("Candidates:", add_special_tokens=False)) <= 2


def test_tiny_start_has_the_heads_its_flags_ask_for(ds, tmp_path):
    from rerec_mini.config import Config
    from rerec_mini.run import build_tiny_start
    small = dict(tiny_hidden=16, tiny_layers=1, tiny_vocab=300, tiny_kind_init=True)
    for heads, kv in ((4, 2), (4, 4), (2, 1)):
        path = build_tiny_start(Config(**small, tiny_heads=heads, tiny_kv_heads=kv), ds, tmp_path / f"h{heads}kv{kv}")
        hf = json.loads((path / "config.json").read_text())
        assert (hf["num_attention_heads"], hf["num_key_value_heads"]) == (heads, kv)
        model = load_model(path)
        assert model.model.layers[0].self_attn.k_proj.weight.shape == (kv * 16 // heads, 16)


def test_tiny_units_of_a_dataset_have_kinds(ds):
    from rerec_mini.run import tiny_units
    units = tiny_units(ds)
    some = next(iter(ds.items.values()))
    assert units[some.title] == "title"
    assert {units[v] for v in some.attributes.get("director", [])} <= {"person"}
    assert set(units.values()) <= {"title", "person", "genre", "country", "language", "decade"}
    assert not any(k.isdigit() and len(k) == 4 for k in units)  # years stay BPE digits
