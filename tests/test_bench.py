"""The benchmarks' code paths run (figures are recorded in BENCHMARKS.md, never asserted here)."""

import json

import pytest
import torch

from rerec_mini.bench import gpu


def test_gpu_check_smoke_runs_every_part_on_cpu(tmp_path):
    """`python -m rerec_mini.bench gpu --smoke`: the GPU check's parts with reduced sizes, on CPU."""
    assert gpu.main(["--smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu.json").read_text())
    parts = res["parts"]
    assert set(parts) == {"graph", "kernels", "sampler", "decode", "train", "share", "real", "torchrun"}
    assert not any("error" in p for p in parts.values())
    assert parts["graph"]["identical_rows"] == parts["graph"]["rows"] and parts["graph"]["reference_check"] == "passed"
    assert parts["graph"]["reference"]["float32"]["math"]["tokens"] > 0
    sites = parts["kernels"]["sdpa_by_call_site"]
    assert len(sites) == 3 and all(any("scaled_dot_product" in k for k in ks) for ks in sites.values())
    assert parts["kernels"]["logprob_head"]["fp32_logits"]["logp_err_max"] < 1e-4
    assert parts["train"]["sampler_gap"]["trainer_copy"]["tokens"] > 0 and parts["train"]["tis_cap"] == 2.0
    assert parts["share"]["on_trunk_tokens"] < parts["share"]["off_trunk_tokens"] and parts["share"]["on_shared"] == 1
    assert parts["sampler"]["ratio"] > 0 and parts["sampler"]["floor_ms_per_step"] > 0
    assert parts["sampler"]["fused"] and parts["sampler"]["ops_per_step"]["ops"] > 0
    dec = parts["decode"]  # fused vs unfused sampling copy: fewer ops, the same bytes, both timed
    assert dec["fused"]["ops"] < dec["unfused"]["ops"] and dec["fused"]["param_gb"] == dec["unfused"]["param_gb"]
    assert dec["step_speedup"] > 0 and dec["tok_s_ratio"] > 0 and dec["greedy_identical_rows"].startswith("4 of 4")
    assert parts["train"]["update_tokens"] > 0 and parts["train"]["update_model_tflops"] > 0
    assert "hit@1" in parts["real"]["final"]["overall"]
    for name in ("torchrun", "fsdp"):  # a process group of one trains what python train.py does
        r = parts["torchrun"][f"{name}_vs_plain"]
        assert r["moved"] > 1e-2 and r["relative"] < 1e-5, (name, r)
    md = (tmp_path / "gpu.md").read_text()
    assert all(f"## {name}" in md for name in parts)


def test_gpu_check_records_a_failing_part_and_runs_the_others(tmp_path, monkeypatch):
    def boom(smoke):
        raise RuntimeError("simulated")
    monkeypatch.setattr(gpu, "part_graph", boom)
    assert gpu.main(["--smoke", "--out", str(tmp_path), "--parts", "graph,train"]) == 1
    parts = json.loads((tmp_path / "gpu.json").read_text())["parts"]
    assert parts["graph"]["error"] == "RuntimeError: simulated" and "Traceback" in parts["graph"]["traceback"]
    assert "update_tokens" in parts["train"]


def test_an_isolated_part_that_crashes_costs_only_itself(tmp_path):
    """On the H200 an MMU fault took the whole check down (transformers' compiled generate after the
    train part, in one process): with --isolate each part runs in a child, and a child that dies by a
    signal is recorded with its last lines."""
    import sys
    died = gpu.run_isolated([sys.executable, "-c", "import os; print('loading the model'); os.abort()"],
                            tmp_path / "none.json")
    assert "killed by signal 6" in died["error"] and "loading the model" in died["traceback"]
    (tmp_path / "r.json").write_text('{"figure": 1.5}')
    assert gpu.run_isolated([sys.executable, "-c", "pass"], tmp_path / "r.json") == {"figure": 1.5}


def test_gpu_check_isolated_runs_a_part_in_a_child(tmp_path):
    assert gpu.main(["--smoke", "--isolate", "--out", str(tmp_path), "--parts", "sampler"]) == 0
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["isolated"] and res["parts"]["sampler"]["ratio"] > 0
    assert not list(tmp_path.glob(".part-*"))


def test_sampler_bench_on_a_real_checkpoint_reads_its_weights():
    """`bench sampler --model M`: both sides hold the checkpoint's weights (tiny: the bundled tokenizer's
    vocabulary, not the preset's), and every row gets exactly the asked number of tokens."""
    from rerec_mini.bench import sampler
    from rerec_mini.model import load_model
    res = sampler.run("cpu-small", model_name="tiny", prompts=2, samples=2, new_tokens=4, prompt_len=8, repeats=1,
                      threads=1)
    assert res["model"] == "tiny" and res["params"] == load_model("tiny").num_parameters()
    assert res["rows"] == 4 and res["ours_tok_s"] > 0 and res["hf_tok_s"] > 0


def test_sft_bench_times_both_head_paths_and_restores_the_threshold(monkeypatch):
    """The two arms really take the two paths: only the recomputed arm checkpoints the head."""
    from rerec_mini import model as model_module
    from rerec_mini.bench.train import run_sft
    before, seen = model_module.KEEP_LOGITS, []
    real = model_module.checkpoint

    def counting(*args, **kwargs):
        seen.append(model_module.KEEP_LOGITS)  # the threshold of the arm that made the call
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "checkpoint", counting)
    out = run_sft("cpu", steps=1, warmup=0)
    assert out["sft_step_s_kept"] > 0 and out["sft_step_s_recomputed"] > 0
    assert seen and set(seen) == {0}
    assert model_module.KEEP_LOGITS == before


def test_train_bench_times_the_demos_own_tiny_start(tmp_path):
    """`bench train`'s tiny preset is the model `train.py --model tiny` trains (its whole-word units in
    the vocabulary), not a plain byte-level BPE model of the same size."""
    from rerec_mini.bench.train import make_model
    from rerec_mini.config import resolve_config
    from rerec_mini.data import load_dataset
    from rerec_mini.model import load_model
    from rerec_mini.run import build_tiny_start
    cfg = resolve_config({"model": "tiny"})
    demo = load_model(str(build_tiny_start(cfg, load_dataset(cfg.data), tmp_path / "demo")))
    bench = load_model(make_model("tiny", tmp_path / "bench", None))
    assert bench.cfg.vocab_size == demo.cfg.vocab_size > cfg.tiny_vocab
    assert all(a.equal(b) for a, b in zip(bench.state_dict().values(), demo.state_dict().values()))


def test_train_bench_times_a_given_checkpoint(tmp_path):
    """`bench train --model DIR` trains the checkpoint it is given (here a plain-BPE tiny model, which the
    preset would never build) and says so in its figures."""
    from rerec_mini.bench.train import main
    from rerec_mini.model import build_tiny, load_model
    ckpt = build_tiny(tmp_path / "ckpt", ["a small corpus for a small tokenizer"] * 4, vocab_size=300,
                      hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    out = tmp_path / "train.json"
    assert main(["--model", str(ckpt), "--steps", "1", "--warmup", "0", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["model"] == str(ckpt) and res["params"] == load_model(str(ckpt)).num_parameters()
    assert res["time/step"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent"], "--model /nonexistent: not a checkpoint directory"),
    (["--model", ".", "--sft-steps", "2"], "--model times RL steps of a checkpoint"),
    (["--model", ".", "--layers", "2"], "--layers shrinks the preset's own model"),
])
def test_train_bench_bad_flags_exit_2_with_the_flag_named(argv, message, capsys, tmp_path):
    from rerec_mini.bench.train import main
    (tmp_path / "config.json").write_text("{}")
    argv = [str(tmp_path) if a == "." else a for a in argv]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_peak_watch_credits_each_peak_to_the_calls_open_during_it():
    """PeakWatch (bench train's memory by phase), on a fake allocator: a nested call's peak is its own,
    and the outer call's is the largest while it ran, before, inside and after the inner one."""
    from rerec_mini.bench.train import PeakWatch
    mem = {"now": 0.0, "peak": 0.0}

    def alloc(x):
        mem["now"] = x
        mem["peak"] = max(mem["peak"], x)

    class Job:
        def inner(self):
            alloc(5.0)
            alloc(2.0)

        def outer(self):
            alloc(3.0)
            self.inner()
            alloc(4.0)
            alloc(1.0)

        def after(self):
            alloc(1.5)

    job = Job()
    w = PeakWatch(peak=lambda: mem["peak"], reset=lambda: mem.update(peak=mem["now"]))
    w.wrap(job, "inner")
    w.wrap(job, "outer", "the outer")
    w.wrap(job, "after", lambda *a: "labelled by its arguments")
    job.outer()
    job.after()
    assert w.peaks == {"the outer": 5.0, "inner": 5.0, "labelled by its arguments": 1.5}


def test_peak_by_phase_watches_every_phase_of_a_real_step(micro_model, ds, tmp_path):
    """The watched step runs as a plain one would and names each phase (on CPU a counter stands in for
    the CUDA allocator: it counts calls, so every watched phase must have been entered)."""
    from rerec_mini.bench.train import PeakWatch, peak_by_phase
    from rerec_mini.config import Config
    from rerec_mini.trainer import Trainer
    cfg = Config(model=micro_model, output_dir=str(tmp_path), num_candidates=3, batch_size=2, num_generations=2,
                 max_completion_length=4, keep_truncated=True, beta=0.05, sft_steps=0, max_steps=2)
    tr = Trainer(cfg, ds, micro_model, torch.device("cpu"))
    tr.start_rl()
    ticks = iter(range(1, 1000))
    peaks = peak_by_phase(tr, PeakWatch(peak=lambda: float(next(ticks)), reset=lambda: None))
    assert set(peaks) == {"sample", "score", "advantages", "update", "update: reference pass", "update: policy pass",
                          "update: optimizer step", "update: refresh sampling copy"}, peaks
    assert peaks["update"] >= max(v for k, v in peaks.items() if k.startswith("update: ")) and tr.step_no == 1


def test_memory_bench_names_what_is_alive_at_the_update_peak_and_restores_what_it_wraps():
    from rerec_mini import model as M
    from rerec_mini.bench import memory
    backward, head, keep = torch.Tensor.backward, M.Fp32OutMatmul.forward, M.KEEP_LOGITS
    r = memory.run(hidden=32, vocab=700, intermediate=64, layers=1, heads=4, kv_heads=2, rows=8, prompt_len=12,
                   completion_len=40, chunk=16, micro_batch=4)
    assert torch.Tensor.backward is backward and M.Fp32OutMatmul.forward is head and M.KEEP_LOGITS == keep
    phases = set(r["peak_by_phase_mb"])
    assert {"update/reference pass", "update/policy forward", "update/backward", "update/optimizer step"} <= phases
    assert r["peak_mb"] == pytest.approx(max(r["peak_by_phase_mb"].values()), abs=1e-3) and r["peak_mb"] > 0
    # one head chunk at a time (the logged entropy's autograd graph once kept two per chunk alive)
    assert 1 <= r["head_chunk_tensors_most"] <= 4, r["head_chunk_tensors_most"]
    assert "update/backward" in memory.describe(r) and r["at_peak"][0]["mb"] >= r["at_peak"][-1]["mb"]
