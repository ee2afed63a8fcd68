"""Frozen copies with fused projections (one q|k|v and one gate|up GEMM a layer) against the policy's
separate ones: the same tokens, the same log-probs, kept in step by copy_weights, no more memory."""

import pytest
import torch

from rerec_mini.bench.sampler import decode_step_ops
from rerec_mini.model import (CausalLM, ModelConfig, copy_weights, frozen_copy, shared_token_logprobs, source_names,
                              token_logprobs)
from rerec_mini.sampling import generate

pytestmark = pytest.mark.usefixtures("one_thread")
V = 512


def policy(tied=True, seed=0) -> CausalLM:
    """A small Qwen2-style model with biases on q/k/v (and, untied, a head of its own). std 0.2 so that
    greedy text is not degenerate; the norms are not all ones, so a norm weight in the wrong place shows."""
    cfg = ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, qkv_bias=True, tie_word_embeddings=tied)
    model = CausalLM(cfg).init_weights(seed, std=0.2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1.0 * name.endswith("norm.weight") + 0.1 * torch.randn_like(p))
    return model


def prompts(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(k),), generator=g).tolist() for k in torch.randint(3, 14, (n,), generator=g)]


def scored(completions, ps):
    """Right-padded prompt + completion rows and the mask of the completion tokens."""
    T = max(len(p) + len(c) for p, c in zip(ps, completions))
    ids, mask = torch.zeros(len(ps), T, dtype=torch.long), torch.zeros(len(ps), T, dtype=torch.bool)
    for r, (p, c) in enumerate(zip(ps, completions)):
        ids[r, :len(p) + len(c)] = torch.tensor(p + c)
        mask[r, len(p):len(p) + len(c)] = True
    return ids, mask


def test_a_fused_copy_has_fused_projections_only():
    model = policy()
    copy = frozen_copy(model, False, "cpu")
    names = {n for n, _ in copy.named_parameters()}
    assert "model.layers.0.self_attn.qkv_proj.bias" in names and "model.layers.1.mlp.gate_up_proj.weight" in names
    assert not any(f".{p}." in n for n in names for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
    assert source_names("model.layers.0.self_attn.qkv_proj.bias", dict(model.named_parameters())) == [
        "model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.bias",
        "model.layers.0.self_attn.v_proj.bias"]
    assert not any(p.requires_grad for p in copy.parameters())


@pytest.mark.parametrize("tied", [True, False])
def test_greedy_decoding_of_a_fused_copy_is_token_identical_to_the_unfused(tied):
    model = policy(tied)
    fused, unfused = frozen_copy(model, False, "cpu"), frozen_copy(model, False, "cpu", fused=False)
    ps = prompts()
    a = generate(fused, ps, max_new_tokens=24, num_samples=2, temperature=0, use_cuda_graph=False)
    b = generate(unfused, ps, max_new_tokens=24, num_samples=2, temperature=0, use_cuda_graph=False)
    assert a.completions == b.completions
    torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)
    assert len({tuple(c) for c in a.completions}) > 4  # not one degenerate text for every prompt


def test_a_fused_copy_scores_what_the_policy_scores():
    """The reference model is a frozen copy and runs the training forwards: token_logprobs and, with
    --share-prompt, shared_token_logprobs. fp32: the policy's values; bf16 matmuls under autocast: the
    policy's under autocast, as close as the unfused copy is."""
    model = policy()
    ps = prompts()
    ro = generate(model, ps, max_new_tokens=12, temperature=1.0, seed=0, use_cuda_graph=False)
    ids, mask = scored(ro.completions, ps)
    with torch.no_grad():
        want = token_logprobs(model, ids, mask)
        torch.testing.assert_close(token_logprobs(frozen_copy(model, False, "cpu"), ids, mask), want,
                                   atol=1e-5, rtol=1e-5)
        # --share-prompt: each prompt once, its completions after it
        plen = torch.tensor([len(p) for p in ps])
        pr = torch.zeros(len(ps), int(plen.max()), dtype=torch.long)
        comp = torch.zeros(len(ps), max(map(len, ro.completions)), dtype=torch.long)
        cmask = torch.zeros_like(comp, dtype=torch.bool)
        for r, (p, c) in enumerate(zip(ps, ro.completions)):
            pr[r, :len(p)], comp[r, :len(c)], cmask[r, :len(c)] = torch.tensor(p), torch.tensor(c), True
        shared = shared_token_logprobs(frozen_copy(model, False, "cpu"), pr, plen, comp, cmask, torch.arange(len(ps)))
        torch.testing.assert_close(shared[cmask], want[mask], atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = token_logprobs(model, ids, mask)
            fused = token_logprobs(frozen_copy(model, True, "cpu"), ids, mask)
            unfused = token_logprobs(frozen_copy(model, True, "cpu", fused=False), ids, mask)
    assert (fused - amp).abs().max() <= 1e-3 and (fused - amp).abs().max() <= 2 * (unfused - amp).abs().max() + 1e-5


@pytest.mark.parametrize("bf16", [False, True])
def test_a_fused_copy_follows_the_policy_after_an_optimiser_step(bf16):
    model = policy()
    copy = frozen_copy(model, bf16, "cpu")
    ids = torch.randint(0, V, (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.log_softmax(model(ids), -1).gather(-1, ids[:, :, None]).sum().backward()
    opt.step()
    stale = torch.cat([p.flatten().float() for p in copy.parameters()])
    copy_weights(copy, model)
    assert not torch.equal(stale, torch.cat([p.flatten().float() for p in copy.parameters()]))
    src = dict(model.named_parameters())
    for name, p in copy.named_parameters():  # every row of a fused projection from its part
        assert torch.equal(p, torch.cat([src[n].detach() for n in source_names(name, src)]).to(p.dtype)), name
    if not bf16:
        with torch.no_grad():
            torch.testing.assert_close(copy(ids), model(ids), atol=1e-5, rtol=1e-5)


def test_a_fused_bf16_copy_takes_no_more_memory():
    """The fused weights replace the separate ones (built on the meta device, filled in place): the
    sampling copy of a 1.5B model is ~3 GB in bf16 and must not double."""
    model = policy()

    def nbytes(m):
        return sum(p.numel() * p.element_size() for p in m.parameters()) + sum(
            b.numel() * b.element_size() for b in m.buffers())
    fused, unfused = frozen_copy(model, True, "cpu"), frozen_copy(model, True, "cpu", fused=False)
    assert nbytes(fused) <= nbytes(unfused)
    assert fused.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    assert fused.model.embed_tokens.weight.dtype == torch.float32  # the residual stream stays float32


def test_a_fused_copy_launches_fewer_ops_per_decode_step():
    """Per layer the fused copy runs 2 fewer GEMMs and one RoPE instead of two (bench sampler's count)."""
    model = policy()
    fused = decode_step_ops(frozen_copy(model, True, "cpu"), rows=4, prompt_len=8, amp=True)["ops"]
    unfused = decode_step_ops(frozen_copy(model, True, "cpu", fused=False), rows=4, prompt_len=8, amp=True)["ops"]
    assert fused <= unfused - 6 * model.cfg.num_layers
