"""Short CPU runs of the trainer: every switch, exact resume, the NaN guard, the bf16 path's numerics,
the SFT target's end token, RNG state, the train benchmark's FLOP count."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from rerec_mini import trainer as T
from rerec_mini.config import TINY_PRESET, Config, resolve_config
from rerec_mini.model import load_model, load_tokenizer, source_names, token_logprobs
from rerec_mini.prompts import eos_ids, turn_end_id
from rerec_mini.run import Run, prepare, train
from rerec_mini.trainer import Trainer, TrainingStopped, frozen_copy

REQUIRED = ["step", "phase", "reward", "reward_std", "rewards/format/mean", "rewards/rec/mean", "rewards/qas/mean",
            "rewards/pas/mean", "format_ok", "hit_rate", "hallucination_rate", "frac_reward_zero_std",
            "completions/mean_length", "completions/clipped_ratio", "kl", "entropy", "clip_ratio/region_mean",
            "grad_norm", "learning_rate", "raae/penalised_token_frac", "sampling/logp_diff_mean",
            "time/sample", "time/score", "time/update", "tokens_per_s"]


def micro_config(model: str, out: Path, **kw) -> Config:
    # keep_truncated: an untrained model never ends within 12 tokens, and masking every
    # truncated rollout would leave no update to test.
    base = dict(model=model, output_dir=str(out), max_steps=2, batch_size=2, num_generations=2,
                max_completion_length=12, num_candidates=3, show_attributes="auto", learning_rate=1e-3,
                warmup_steps=1, micro_batch_size=3, eval_limit=5, save_steps=2, sft_steps=0, beta=0.0,
                keep_truncated=True)
    return Config(**{**base, **kw})


@pytest.fixture
def varied_rewards(monkeypatch):
    """An untrained model fails every answer alike: all rewards equal, every advantage 0.
    Spread the rewards within each group so the update has something to learn."""
    real = T.Scorer.score

    def score(self, queries, responses, candidates=None):
        r = real(self, queries, responses, candidates)
        r.total = r.total + 0.1 * (np.arange(len(r.total)) % 2)
        return r

    monkeypatch.setattr(T.Scorer, "score", score)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


SWITCHES = [
    {},
    {"loss_type": "grpo", "curriculum": "paper", "difficulty_metric": "reward", "scale_rewards": "batch"},
    {"loss_type": "dr_grpo", "curriculum": "none", "no_raae": True, "scale_rewards": "none"},
    {"loss_type": "bnpo", "raae_advantage": "paper", "raae_floor": 0.5},
    {"beta": 0.05, "num_iterations": 2, "epsilon_high": 0.28, "tis_cap": 2.0},
    {"beta": 0.01, "ref_offload": True, "gradient_checkpointing": "on"},
    {"raae_claims": True, "raae_penalty": 0.5, "no_qas": True, "no_pas": True, "reward_weights": "0.1,1,0.01,0.01"},
    {"hard_negatives": 1, "history_len": 2, "answer_size": 2, "show_attributes": "genre,director", "negatives": "hard"},
    {"num_candidates": 0, "keep_truncated": False, "top_p": 0.9, "temperature": 0.7, "negatives": "uniform"},
    {"sft_steps": 2, "sft_prompt_weight": 0.5, "eval_steps": 1, "save_total_limit": 1, "logging_steps": 2},
    {"precision": "bf16", "beta": 0.02, "sft_steps": 1, "loss_type": "seq-mean"},
]


@pytest.mark.parametrize("switches", SWITCHES, ids=[",".join(s) or "defaults" for s in SWITCHES])
def test_every_switch_runs(micro_model, tmp_path, switches, varied_rewards):
    cfg = micro_config(micro_model, tmp_path / "run", **switches)
    start = load_model(micro_model).state_dict()
    results = train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if r["phase"] == "rl"]
    assert [r["step"] for r in rows] == ([2] if cfg.logging_steps == 2 else [1, 2])
    for r in rows:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        assert all(math.isfinite(r[k]) for k in REQUIRED if not isinstance(r[k], str)), r
        assert any(k.startswith("curriculum/") for k in r)
        assert -1.0 <= r["reward"] <= 1.5 and 0.0 <= r["format_ok"] <= 1.0
    final = results["final"]
    assert set(final) >= {"overall", "by_type"} and final["overall"]["count"] == 5
    assert json.loads((tmp_path / "run" / "eval_final.json").read_text())["overall"] == final["overall"]
    # final/ is a plain HF model directory, and the updates changed the weights
    end = load_model(str(tmp_path / "run" / "final")).state_dict()
    if cfg.keep_truncated:
        assert all(r["grad_norm"] > 0 for r in rows)
        assert any(not torch.equal(start[k], end[k]) for k in start)
    if switches.get("beta"):
        assert rows[-1]["kl"] >= 0.0
    if switches.get("sft_steps"):
        assert (tmp_path / "run" / "eval_sft.json").exists()
        assert any(r["phase"] == "sft" for r in read_metrics(tmp_path / "run"))
    if switches.get("eval_steps"):
        assert (tmp_path / "run" / "eval_step1.json").exists()
    if switches.get("no_raae"):
        assert all(r["raae/penalised_token_frac"] == 0.0 for r in rows)
    if cfg.save_total_limit:
        assert len(list((tmp_path / "run").glob("checkpoint-*"))) <= cfg.save_total_limit
    assert (tmp_path / "run" / "report.md").exists()


def _weights(path) -> dict:
    return load_model(str(path)).state_dict()


def test_resume_continues_exactly(micro_model, tmp_path, varied_rewards):
    cfg = micro_config(micro_model, tmp_path / "a", max_steps=4, save_steps=10, sft_steps=2, beta=0.02)
    train(cfg)
    b = replace(cfg, output_dir=str(tmp_path / "b"))
    with pytest.raises(TrainingStopped, match="at step 2"):
        train(b, until_step=2)
    assert (tmp_path / "b" / "checkpoint-2").exists()
    train(replace(b, resume="latest"))
    wa, wb = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the logged run is the same too (timings aside), with no duplicated steps
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("time", "tokens_per"))} for r in rows]
    assert strip(read_metrics(tmp_path / "a")) == strip(read_metrics(tmp_path / "b"))


def test_a_finished_run_extends_with_more_steps(micro_model, tmp_path, varied_rewards):
    """Reaching --max-steps used to leave only final/ (not resumable): the last step is checkpointed now."""
    out = tmp_path / "run"
    train(micro_config(micro_model, out, max_steps=3, save_steps=2))
    assert (out / "checkpoint-3").exists() and (out / "final").exists()
    train(micro_config(micro_model, out, max_steps=5, save_steps=2, resume="latest"))
    rows = [r["step"] for r in read_metrics(out) if r["phase"] == "rl"]
    assert rows == [1, 2, 3, 4, 5]
    state = json.loads((out / "final" / "trainer_state" / "state.json").read_text())
    assert state["step"] == 5
    # one uninterrupted 5-step run gives the same weights
    train(micro_config(micro_model, tmp_path / "straight", max_steps=5, save_steps=2))
    wa, wb = _weights(out / "final"), _weights(tmp_path / "straight" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nan_loss_skips_the_update_then_stops_after_three(micro_model, tmp_path, monkeypatch, varied_rewards, ds):
    real = T.policy_loss
    calls = {"n": 0}

    def nan_first(*args, **kw):
        loss, sums = real(*args, **kw)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 1 else loss), sums

    monkeypatch.setattr(T, "policy_loss", nan_first)
    tr = Trainer(micro_config(micro_model, tmp_path / "nan", max_steps=1, micro_batch_size=100), ds, micro_model,
                 torch.device("cpu"))
    tr.start_rl()
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    row = tr.step()
    assert row["skipped_updates"] == 1 and tr.nan_streak == 1
    assert all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items())  # nothing reached the weights

    monkeypatch.setattr(T, "policy_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    with pytest.raises(TrainingStopped, match="NaN/inf in 3 updates in a row.*checkpoint-2 is the last good state") as e:
        train(micro_config(micro_model, tmp_path / "nan2", max_steps=10, micro_batch_size=100))
    assert e.value.signum is None and (tmp_path / "nan2" / "checkpoint-2").exists()


# ----------------------------------------------------------------------------- the bf16 (GPU) path, run on CPU


def test_bf16_sampling_copy_is_synced_after_sft(micro_model, tmp_path):
    """The evaluation after SFT (and a --max-steps 0 final) used the bf16 copy made before SFT."""
    run = Run(prepare(micro_config(micro_model, tmp_path / "run", precision="bf16", sft_steps=3, max_steps=0,
                                   sft_learning_rate=1e-2)))
    tr = run.trainer
    assert tr.rollout_model is not tr.model
    assert tr.rollout_model.model.layers[0].mlp.gate_up_proj.weight.dtype == torch.bfloat16  # the matmuls: bf16
    assert tr.rollout_model.model.embed_tokens.weight.dtype == torch.float32                # the residual stream: not
    run.execute()
    init = load_model(micro_model).state_dict()
    trained = dict(tr.model.named_parameters())
    for name, copy in tr.rollout_model.named_parameters():  # fused projections: their parts' rows; a tied
        parts = [trained[n].detach() for n in source_names(name, trained)]  # head: the embedding (a bf16 copy)
        assert torch.equal(copy, torch.cat(parts).to(copy.dtype)), name
    assert any(not torch.equal(init[n], p.detach()) for n, p in tr.model.named_parameters())


def test_the_sampling_copy_samples_what_the_policy_computes(micro_model, tmp_path, ds):
    """bf16 mode: the sampler's log-probs of its own tokens against the policy's under autocast. The
    trainer's copy (bf16 matmul weights, float32 residual and norms, sampling under autocast) is much
    closer than a pure-bf16 copy; what is left is the decode kernels' rounding (TIS corrects it)."""
    from rerec_mini.bench.train import sampler_gap
    tr = Trainer(micro_config(micro_model, tmp_path / "gap", precision="bf16", max_completion_length=16,
                              num_generations=4), ds, micro_model, torch.device("cpu"))
    tr.start_rl()
    gap = sampler_gap(tr, queries=8)
    assert gap["trainer_copy"]["tokens"] > 200 and gap["pure_bf16_copy"]["tokens"] > 200
    assert gap["trainer_copy"]["mean_abs"] < 0.5 * gap["pure_bf16_copy"]["mean_abs"]
    assert gap["trainer_copy"]["max_abs"] < 0.01


def test_tis_is_on_by_default_only_when_sampling_in_bf16(micro_model, tmp_path, ds):
    caps = {}
    for precision, cap in (("bf16", -1.0), ("fp32", -1.0), ("bf16", 0.0), ("fp32", 3.0)):
        tr = Trainer(micro_config(micro_model, tmp_path / f"{precision}{cap}", precision=precision, tis_cap=cap), ds,
                     micro_model, torch.device("cpu"))
        caps[precision, cap] = tr.tis_cap
    assert caps == {("bf16", -1.0): 2.0, ("fp32", -1.0): 0.0, ("bf16", 0.0): 0.0, ("fp32", 3.0): 3.0}
    assert Config().tis_cap == -1.0


def test_cuda_batches_pad_to_a_multiple_so_attention_sees_few_shapes(micro_model, tmp_path, ds):
    """cuDNN attention builds a plan per new sequence length (55-400 ms each): on CUDA the update's and
    SFT's batches are padded to a multiple of PAD_MULTIPLE positions; on the CPU nothing is added."""
    tr = Trainer(micro_config(micro_model, tmp_path / "pad"), ds, micro_model, torch.device("cpu"))
    prompts, completions = [[5] * 30, [6] * 41], [[7] * 9, [8] * 3]
    ids, mask = tr._pack(prompts, completions, move=False)
    assert ids.shape[1] == 44
    tr.device = torch.device("cuda")  # move=False: nothing touches a GPU
    ids, mask = tr._pack(prompts, completions, move=False)
    assert ids.shape[1] == T.PAD_MULTIPLE and mask.sum() == 12 and (ids[:, 44:] == tr.pad).all()


def test_bf16_path_logs_the_sampler_gap_and_fp32_has_none(micro_model, tmp_path, varied_rewards, ds):
    rows = {}
    for precision in ("fp32", "bf16"):
        tr = Trainer(micro_config(micro_model, tmp_path / precision, precision=precision), ds, micro_model,
                     torch.device("cpu"))
        with torch.no_grad():  # the random micro model's logits are all near 0, where bf16 rounding barely
            tr.model.model.norm.weight.mul_(3)  # shows (3e-8 against fp32's 1e-8): give them a trained model's spread
        tr.start_rl()
        rows[precision] = tr.step()
    assert rows["fp32"]["sampling/logp_diff_mean"] < 1e-4  # same weights: only kernel rounding
    assert rows["bf16"]["sampling/logp_diff_mean"] > 10 * rows["fp32"]["sampling/logp_diff_mean"]
    assert 0 <= rows["bf16"]["sampling/ratio_off_frac"] <= 1


def test_tis_weights_reach_the_loss(micro_model, tmp_path, monkeypatch, varied_rewards, ds):
    seen = []
    real = T.policy_loss

    def spy(*a, **kw):
        seen.append(kw.get("is_weight"))
        return real(*a, **kw)

    monkeypatch.setattr(T, "policy_loss", spy)
    for cap in (0.0, 1.5):
        tr = Trainer(micro_config(micro_model, tmp_path / str(cap), precision="bf16", tis_cap=cap), ds, micro_model,
                     torch.device("cpu"))
        tr.start_rl()
        tr.step()
    off, on = seen[0], seen[-1]
    assert off is None and on is not None and float(on.max()) <= 1.5 and float(on.min()) > 0


def test_reference_computes_exactly_what_the_policy_computes(micro_model):
    """Under bf16 autocast, a reference with bf16 matmul weights and float32 norms/embeddings gives the
    policy's log-probs bit for bit (at RL start the KL must be exactly 0); a pure-bf16 copy does not."""
    policy = load_model(micro_model, dtype=torch.float32)
    ids = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 10:] = True
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lp = token_logprobs(policy, ids, mask)
        ref = token_logprobs(frozen_copy(policy, True, "cpu"), ids, mask)
        pure = token_logprobs(load_model(micro_model, dtype=torch.bfloat16), ids, mask)
    assert torch.equal(lp, ref)
    assert not torch.equal(lp, pure)


def test_gradient_checkpointing_defaults_on_for_cuda():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    auto = Config()
    assert T.wants_checkpointing(auto, cuda) and not T.wants_checkpointing(auto, cpu)
    assert T.wants_checkpointing(replace(auto, gradient_checkpointing="on"), cpu)
    assert not T.wants_checkpointing(replace(auto, gradient_checkpointing="off"), cuda)
    assert T.uses_bf16(auto, cuda) and not T.uses_bf16(auto, cpu)


# ----------------------------------------------------------------------------- smaller defects


def test_sft_target_ends_with_the_chat_templates_turn_end(micro_model, tmp_path, ds):
    """Llama-3.x: eos_token <|end_of_text|> has the smaller id than the <|eot_id|> its template ends a turn
    with; SFT used the smallest EOS id. Here: the tokenizer's EOS made <|endoftext|> (id 0), the template
    still closes turns with <|im_end|>."""
    import shutil
    model = tmp_path / "m"
    shutil.copytree(micro_model, model)
    tc = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tc, "eos_token": "<|endoftext|>"}))
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7]}))
    tok = load_tokenizer(model)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == 0 and turn_end_id(tok) == end
    hf = json.loads((model / "config.json").read_text())
    assert eos_ids(tok, hf, model) == sorted({0, end, 7, hf["eos_token_id"]})
    tr = Trainer(micro_config(str(model), tmp_path / "run", sft_steps=1), ds, model, torch.device("cpu"))
    seen = []
    real = tr._pack
    tr._pack = lambda p, c: (seen.extend(c), real(p, c))[1]
    tr.sft_step()
    assert seen and all(c[-1] == end for c in seen)


def test_rng_states_round_trip(micro_model, tmp_path, ds):
    tr = Trainer(micro_config(micro_model, tmp_path / "r"), ds, micro_model, torch.device("cpu"))
    np.random.seed(5)
    np.random.normal()  # a cached gaussian is part of numpy's state too
    tensors, state = tr.state_dict()
    state = json.loads(json.dumps(state))  # as it goes through state.json
    want = (np.random.rand(3).tolist(), np.random.normal(), torch.rand(2).tolist())
    np.random.seed(99)
    torch.manual_seed(99)
    tr.load_state_dict(tensors, state)
    assert (np.random.rand(3).tolist(), np.random.normal(), torch.rand(2).tolist()) == want


def test_train_bench_counts_model_flops_on_rollouts_that_train():
    """The 1.5B preset trained on 0 tokens (random weights never end, truncated rollouts were masked)."""
    from rerec_mini.bench import train as bt
    assert bt.PRESETS["qwen2.5-1.5b"]["keep_truncated"] is True
    out = bt.run("tiny", "cpu", steps=1, warmup=0, overrides={"keep_truncated": True})
    assert out["update_tokens"] > 0 and out["update_model_tflops"] > 0

    class M:  # hand count: trunk 100, head 10 x 4, 1 layer, 2 heads x 3
        cfg = type("C", (), dict(vocab_size=10, hidden_size=4, num_layers=1, num_heads=2, head_dim=3))
        lm_head = None
        num_parameters = staticmethod(lambda: 140)
    row = {"update_tokens": 50, "update_completion_tokens": 20, "update_seq_sq": 1000}
    fwd = 2 * 100 * 50 + 2 * 40 * 20 + 2 * 1 * 2 * 3 * 1000
    assert bt.update_flops(M, row, with_reference=False) == 3 * fwd
    assert bt.update_flops(M, row, with_reference=True) == 4 * fwd


def test_tiny_preset_applies_only_to_unset_flags():
    cfg = resolve_config({"model": "tiny", "max_steps": 3})
    assert cfg.max_steps == 3 and cfg.sft_steps == TINY_PRESET["sft_steps"]
    assert resolve_config({"model": "Qwen2.5-1.5B"}).learning_rate == 5e-6


def test_torch_requirement_admits_only_versions_with_gqa_attention():
    """scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"torch>=2.5"' in text


def test_sft_fresh_never_trains_on_train_or_test_queries_and_facts_add_rows(micro_model, tmp_path, ds):
    from rerec_mini.querygen import signature
    cfg = micro_config(micro_model, tmp_path / "f", sft_steps=2, sft_fresh=30, sft_facts=3, sft_batch_size=4)
    tr = Trainer(cfg, ds, micro_model, torch.device("cpu"))
    pool = tr.sft_queries()
    taken = {signature(q) for q in ds.all_queries()}
    assert pool and all(q.query_id.startswith("fresh-") and signature(q) not in taken for q in pool)
    seen = []
    real = tr._pack
    tr._pack = lambda p, c: (seen.append((p, c)), real(p, c))[1]
    row = tr.sft_step()
    prompts, targets = seen[0]
    assert len(prompts) == 4 + 3  # four warm-start queries, three fact passages
    assert all(len(p) == 1 for p in prompts[4:])  # a passage: its first token predicts the rest
    facts = [tr.tokenizer.decode(p + c) for p, c in zip(prompts[4:], targets[4:])]
    assert all(" is " in f or " has " in f for f in facts)
    assert math.isfinite(row["loss"])
    # without --sft-fresh the warm start reads the train split
    assert Trainer(micro_config(micro_model, tmp_path / "g"), ds, micro_model, torch.device("cpu")).sft_queries() \
        == ds.queries["train"]


def test_rl_fresh_draws_rollouts_from_queries_no_split_and_no_sft_query_asks(micro_model, tmp_path, ds):
    """--rl-fresh N: RL's pool is new queries (none the same question as a train, test or SFT query),
    the curriculum sized to it, and a resumed Trainer rebuilds the very same pool."""
    from rerec_mini.querygen import signature
    cfg = micro_config(micro_model, tmp_path / "r", sft_fresh=20, rl_fresh=20)
    tr = Trainer(cfg, ds, micro_model, torch.device("cpu"))
    taken = {signature(q) for q in ds.all_queries() + tr.sft_queries()}
    pool = tr.train_queries
    assert pool and all(signature(q) not in taken for q in pool)
    assert len({signature(q) for q in pool}) == len(pool)
    assert tr.curriculum.n == len(pool) != len(ds.queries["train"])
    tr.start_rl()
    b = tr.rollout()
    assert {q.query_id for q in b.queries} <= {q.query_id for q in pool}
    again = Trainer(cfg, ds, micro_model, torch.device("cpu")).train_queries
    assert [q.query_id for q in again] == [q.query_id for q in pool] and [q.text for q in again] == [q.text for q in pool]


def test_sft_candidate_ramp_and_learning_rate_schedule(micro_model, tmp_path, ds):
    """--sft-candidate-ramp F: 2 candidates at step 0, growing evenly to --num-candidates at F of the SFT
    steps, then all of them; with --sft-lr-decay the SFT learning rate warms up, then decays (cosine) to 0
    at the last step (without: warmup, then constant)."""
    cfg = micro_config(micro_model, tmp_path / "c", num_candidates=8, sft_steps=100, sft_candidate_ramp=0.5,
                       sft_learning_rate=1e-3, warmup_steps=10, sft_batch_size=3, sft_lr_decay=True)
    tr = Trainer(cfg, ds, micro_model, torch.device("cpu"))
    counts = [tr.sft_candidates(s) for s in range(100)]
    assert counts[0] == 2 and counts[25] == 5 and counts[50:] == [8] * 50
    assert all(a <= b for a, b in zip(counts, counts[1:]))
    lrs = [tr.sft_lr_at(s) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and max(lrs) == pytest.approx(lrs[9], rel=1e-9) and lrs[9] < 1e-3
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[100] == pytest.approx(0.0, abs=1e-12)
    assert lrs[55] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.55)))
    # the prompts of a step hold that step's count of candidates
    seen = []
    real = tr._pack
    tr._pack = lambda p, c: (seen.extend(tr.tokenizer.decode(x) for x in p), real(p, c))[1]
    tr.sft_step()
    assert seen and all(s.count("\n") == seen[0].count("\n") for s in seen)
    lines_2 = seen[0].count("\n")
    seen.clear()
    tr.sft_step_no = 60
    tr.sft_step()
    assert all(s.count("\n") == lines_2 + 6 for s in seen)
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(tr.sft_lr_at(60))
    # off (the default): every step has them all
    plain = Trainer(micro_config(micro_model, tmp_path / "d", num_candidates=8, sft_steps=100, warmup_steps=10,
                                 sft_learning_rate=1e-3), ds, micro_model, torch.device("cpu"))
    assert {plain.sft_candidates(s) for s in (0, 50, 99)} == {8}
    assert plain.sft_lr_at(0) == pytest.approx(1e-4) and {plain.sft_lr_at(s) for s in (9, 50, 100)} == {1e-3}


def test_the_update_holds_no_memory_it_does_not_need(micro_model, tmp_path, monkeypatch, varied_rewards, ds):
    """Three things that held GPU memory for nothing at 1.5B (issue 30's 53 GB peak): the policy pass's
    bf16 weight casts, kept by autocast's cache until the pass ended (2.6 GB); gradients, kept through
    the next step's sampling (6.2 GB); the logged entropy's autograd graph, which kept every
    checkpointed head chunk's recomputed [n, V] tensors alive past the backward (~10 GB)."""
    tr = Trainer(micro_config(micro_model, tmp_path / "run", precision="bf16", sft_steps=1, sft_source="gold"),
                 ds, micro_model, torch.device("cpu"))
    seen = []
    real = tr.logprobs

    def spy(model, m, with_entropy=False):
        out = real(model, m, with_entropy=with_entropy)
        if torch.is_grad_enabled():
            seen.append((torch.is_autocast_cache_enabled(), out[1].requires_grad, out[1].grad_fn))
        return out

    monkeypatch.setattr(tr, "logprobs", spy)
    tr.sft_step()
    assert all(p.grad is None for p in tr.model.parameters())  # after an SFT step
    tr.start_rl()
    tr.step()
    assert seen and all(s == (False, False, None) for s in seen), seen
    assert all(p.grad is None for p in tr.model.parameters())  # after an RL update


def test_the_update_holds_one_head_chunk_at_a_time(micro_model, tmp_path, monkeypatch, varied_rewards, ds):
    """With every head chunk checkpointed (as at 1.5B), the update never holds more than one chunk's
    [chunk, V] float32 tensors at once. Before the entropy lost its autograd graph, each chunk's
    recompute left two behind until the next micro-batch's forward: 19 alive at once here, ~10 GB at 1.5B."""
    from rerec_mini import model as M
    from rerec_mini.bench.memory import LiveTensors
    monkeypatch.setattr(M, "KEEP_LOGITS", 0)
    chunk = 3  # not the 4 rollouts' row count, so that no sampling tensor has a chunk's shape
    tr = Trainer(micro_config(micro_model, tmp_path / "run", logprob_chunk=chunk, micro_batch_size=2), ds, micro_model,
                 torch.device("cpu"))
    tr.start_rl()
    shape = (chunk, tr.model.cfg.vocab_size)
    watch, update = LiveTensors(count=lambda s, dtype: dtype == "float32" and s == shape), tr.update

    def watched(*a, **kw):
        with watch:
            return update(*a, **kw)
    monkeypatch.setattr(tr, "update", watched)
    row = tr.step()
    assert row["update_completion_tokens"] > 4 * chunk  # several chunks per micro-batch
    assert 1 <= watch.most <= 4, watch.most  # its logits, log-softmax, and their gradients in backward
