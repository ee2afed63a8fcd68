"""The fast sampler against slow, obvious paths: transformers' greedy generate, a full forward."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from rerec_mini.model import CausalLM, ModelConfig, save_model
from rerec_mini.sampling import DecodeStep, DecoderPool, generate, sample_next

pytestmark = pytest.mark.usefixtures("one_thread")
V = 512
LENGTHS = (3, 7, 5, 11)  # different prompt lengths decode together (left-padded)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(ours, transformers) with the same random weights; std 0.2 so greedy text is not degenerate."""
    cfg = ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, tie_word_embeddings=True)
    ours = CausalLM(cfg).init_weights(0, std=0.2).eval()
    d = save_model(ours, tmp_path_factory.mktemp("model"))
    return ours, AutoModelForCausalLM.from_pretrained(d).eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in LENGTHS]


def teacher_forced(model, prompt, completion, temperature):
    """log softmax(logits / T) of the completion tokens, from one full forward (T=0: raw logits)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion]))[0, len(prompt) - 1:-1].float()
    logp = torch.log_softmax(logits / (temperature or 1.0), -1)
    return logp, logp.gather(-1, torch.tensor(completion)[:, None])[:, 0]


def test_greedy_equals_transformers(models, prompts):
    ours, hf = models
    r = generate(ours, prompts, max_new_tokens=16, temperature=0)
    assert r.prompt_index == [0, 1, 2, 3] and r.truncated == [True] * 4 and r.steps == 16
    for p, c in zip(prompts, r.completions):  # HF one prompt at a time: no padding ambiguity
        ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=16, min_new_tokens=16,
                          eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert c == ref
        assert len(set(c)) > 4  # a non-degenerate continuation, so the comparison means something
    for p, c, lp in zip(prompts, r.completions, r.logprobs):  # greedy log-probs: of the raw logits
        torch.testing.assert_close(torch.tensor(lp), teacher_forced(ours, p, c, 0)[1], atol=1e-4, rtol=1e-4)


def test_eos_stops_each_row_right_after_it(models, prompts):
    ours, _ = models
    free = generate(ours, prompts, max_new_tokens=16, temperature=0).completions
    eos = next(t for t in free[0][2:] if t not in free[0][:2])  # a token greedy reaches in row 0
    for eos_arg in (eos, [eos, V + 7]):
        r = generate(ours, prompts, max_new_tokens=16, temperature=0, eos_token_id=eos_arg, sync_every=4)
        assert r.completions[0][-1] == eos and not r.truncated[0]
        for full, c, lp, trunc in zip(free, r.completions, r.logprobs, r.truncated):
            cut = full.index(eos) + 1 if eos in full else len(full)  # up to and including the first EOS
            assert c == full[:cut] and len(lp) == len(c) and trunc == (eos not in full)


def test_finished_rows_are_compacted_away(models, prompts):
    """4 samples of each of 2 prompts; prompt 0's rows end early, the batch halves, and greedy
    output is unchanged by it."""
    ours, _ = models
    two = prompts[:2]
    free = generate(ours, two, max_new_tokens=24, temperature=0, num_samples=4).completions
    eos = free[0][1]
    assert eos not in free[4][:20]
    r = generate(ours, two, max_new_tokens=24, temperature=0, num_samples=4, eos_token_id=eos, sync_every=2)
    assert r.compactions >= 1 and r.prompt_index == [0] * 4 + [1] * 4
    for full, c in zip(free, r.completions):
        assert c == (full[:full.index(eos) + 1] if eos in full else full)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_full_forward(models, prompts, temperature):
    ours, _ = models
    r = generate(ours, prompts, max_new_tokens=20, num_samples=3, temperature=temperature, seed=0)
    assert len(r.completions) == 12 and r.prompt_index == [i // 3 for i in range(12)]
    for i, (c, lp) in enumerate(zip(r.completions, r.logprobs)):
        ref = teacher_forced(ours, prompts[r.prompt_index[i]], c, temperature)[1]
        torch.testing.assert_close(torch.tensor(lp), ref, atol=1e-4, rtol=1e-4)


def test_seed_reproduces_and_samples_differ(models, prompts):
    ours, _ = models
    run = lambda seed: generate(ours, prompts, max_new_tokens=12, num_samples=4, temperature=1.0, seed=seed)
    a, b, c = run(5), run(5), run(6)
    assert a.completions == b.completions and a.logprobs == b.logprobs
    assert a.completions != c.completions
    for k in range(len(prompts)):  # samples of one prompt differ from each other
        assert len({tuple(x) for x in a.completions[4 * k:4 * k + 4]}) > 1


def test_top_k_top_p_restrict_support(models, prompts):
    ours, _ = models
    greedy = generate(ours, prompts, max_new_tokens=10, temperature=0).completions
    assert generate(ours, prompts, max_new_tokens=10, top_k=1, seed=0).completions == greedy
    assert generate(ours, prompts, max_new_tokens=10, top_p=1e-6, seed=0).completions == greedy
    for kw in (dict(top_k=5), dict(top_p=0.3), dict(top_k=20, top_p=0.5)):
        r = generate(ours, prompts, max_new_tokens=10, num_samples=4, temperature=0.8, seed=1, **kw)
        for i, c in enumerate(r.completions):
            logp, lp = teacher_forced(ours, prompts[r.prompt_index[i]], c, 0.8)
            torch.testing.assert_close(torch.tensor(r.logprobs[i]), lp, atol=1e-4, rtol=1e-4)  # not renormalised
            probs, order = logp.exp().sort(-1, descending=True)
            rank = (order == torch.tensor(c)[:, None]).float().argmax(-1)  # 0 = most likely
            assert (rank < kw.get("top_k", V)).all()
            before = (probs.cumsum(-1) - probs).gather(-1, rank[:, None])[:, 0]  # mass ranked above it
            assert (before < kw.get("top_p", 1.0) + 1e-6).all()


def test_sample_next_follows_the_distribution():
    """20k rows of one distribution: frequencies within a few standard errors of softmax(logits/T)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0, 0.5]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    tok, lp = sample_next(logits, temperature=0.8, generator=g)
    p = torch.softmax(logits[0] / 0.8, -1)
    freq = torch.bincount(tok, minlength=6).float() / len(tok)
    assert ((freq - p).abs() < 4 * (p * (1 - p) / len(tok)).sqrt() + 1e-4).all(), (freq, p)
    torch.testing.assert_close(lp, p.log()[tok])
    tok, _ = sample_next(logits, temperature=0.8, top_k=2, generator=g)
    freq = torch.bincount(tok, minlength=6).float() / len(tok)
    assert abs(freq[0] - p[0] / (p[0] + p[1])) < 0.02 and freq[2:].sum() == 0


def test_graph_path_logic_on_cpu(models, prompts, monkeypatch):
    """What a CUDA graph would replay (static bucketed shapes, static input/output buffers), run
    eagerly on CPU, against the eager path. The capture itself needs a GPU and is untested here."""
    ours, _ = models

    def fake_capture(self, tok, length):
        static_tok = tok.clone()
        out = self.run(static_tok, length, static=True)

        class Replay:  # stands in for torch.cuda.CUDAGraph: recompute into the same output buffer
            def replay(_):
                out.copy_(self.run(static_tok, length, static=True))
        return Replay(), static_tok, out

    monkeypatch.setattr(DecodeStep, "capture", fake_capture)
    monkeypatch.setattr(DecodeStep, "BUCKET", 4)  # prompts of 3..11 tokens + 14 new cross several buckets
    for kw in (dict(temperature=0), dict(temperature=1.0, num_samples=2, seed=3)):
        eager = generate(ours, prompts, max_new_tokens=14, use_cuda_graph=False, **kw)
        graph = generate(ours, prompts, max_new_tokens=14, use_cuda_graph=True, **kw)
        assert graph.completions == eager.completions
        for a, b in zip(graph.logprobs, eager.logprobs):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-5)


def test_graphs_are_captured_once_and_reused_across_calls(models, prompts, monkeypatch):
    """A pool keeps each (rows, cache length)'s decode step: later calls replay its graphs
    (same output as eager, new prompts and pads copied into the same buffers), no new captures."""
    ours, _ = models
    calls = []

    def fake_capture(self, tok, length):
        calls.append(length)
        static_tok = tok.clone()
        out = self.run(static_tok, length, static=True)

        class Replay:
            def replay(_):
                out.copy_(self.run(static_tok, length, static=True))
        return Replay(), static_tok, out

    monkeypatch.setattr(DecodeStep, "capture", fake_capture)
    monkeypatch.setattr(DecodeStep, "BUCKET", 8)
    pool = DecoderPool()
    other = [p[::-1] for p in prompts]  # same rows, other tokens and pads
    first = generate(ours, prompts, max_new_tokens=10, temperature=0, use_cuda_graph=True, pool=pool)
    assert first.captures == len(calls) > 0
    for batch in (other, prompts, other):
        n = len(calls)
        got = generate(ours, batch, max_new_tokens=10, temperature=0, use_cuda_graph=True, pool=pool)
        assert got.captures == 0 and len(calls) == n
        assert got.completions == generate(ours, batch, max_new_tokens=10, temperature=0).completions
    # without a pool every call captures again (the old behaviour)
    n = len(calls)
    generate(ours, prompts, max_new_tokens=10, temperature=0, use_cuda_graph=True)
    assert len(calls) > n
    # another row count is another entry; the oldest are dropped beyond max_entries
    small = DecoderPool(max_entries=1)
    generate(ours, prompts, max_new_tokens=10, temperature=0, use_cuda_graph=True, pool=small)
    generate(ours, prompts[:2], max_new_tokens=10, temperature=0, use_cuda_graph=True, pool=small)
    assert len(small.entries) == 1


def test_failed_graph_capture_falls_back_to_eager(models, prompts):
    ours, _ = models
    eager = generate(ours, prompts, max_new_tokens=6, temperature=0)
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):  # no GPU here: capture raises
        assert generate(ours, prompts, max_new_tokens=6, temperature=0, use_cuda_graph=True).completions == eager.completions


def test_edge_cases(models, prompts):
    ours, _ = models
    assert generate(ours, [], max_new_tokens=4).completions == []
    one = generate(ours, prompts, max_new_tokens=1, temperature=0)
    assert [len(c) for c in one.completions] == [1] * 4 and one.steps == 1
    with pytest.raises(ValueError):
        generate(ours, [[]], max_new_tokens=4)
