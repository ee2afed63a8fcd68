"""The benchmarks' code paths run (figures are recorded in BENCHMARKS.md, never asserted here)."""

import json

from rerec_mini.bench import gpu


def test_gpu_check_smoke_runs_every_part_on_cpu(tmp_path):
    """`python -m rerec_mini.bench gpu --smoke`: the GPU check's parts with reduced sizes, on CPU."""
    assert gpu.main(["--smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu.json").read_text())
    parts = res["parts"]
    assert set(parts) == {"graph", "sampler", "train", "real"} and not any("error" in p for p in parts.values())
    assert parts["graph"]["identical_rows"] == parts["graph"]["rows"]
    assert parts["sampler"]["ratio"] > 0 and parts["sampler"]["floor_ms_per_step"] > 0
    assert parts["train"]["update_tokens"] > 0 and parts["train"]["update_model_tflops"] > 0
    assert "hit@1" in parts["real"]["final"]["overall"]
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
