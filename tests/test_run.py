"""A run's lifecycle (rerec_mini/run.py, train.py): every bad input ends in one clear line and exit 2 before
any work, nothing half-written; resume rules; output directories; damaged checkpoints; signals; report."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import importlib.util

import pytest
import torch

from rerec_mini.config import BUNDLED_DATA, Config, UsageError, validate
from rerec_mini.run import checkpoints

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_cli", REPO / "train.py")  # the command line, in process
train_py = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_py)


def micro_flags(model: str, out: Path, **kw) -> list[str]:
    flags = {**dict(model=model, output_dir=str(out), max_steps=2, batch_size=2, num_generations=2,
                    max_completion_length=8, num_candidates=3, eval_limit=2, save_steps=1, beta=0.0), **kw}
    argv = []
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return argv


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = train_py.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


BAD = [
    (["--batch-size", "-4"], "--batch-size -4: must be >= 1"),
    (["--num-generations", "1"], "--num-generations 1: must be >= 2"),
    (["--num-generations", "0"], "--num-generations 0: must be >= 2"),
    (["--temperature", "0"], "--temperature 0.0: must be > 0 for training"),
    (["--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    (["--reward-weights", "1,2"], "--reward-weights '1,2': give four numbers"),
    (["--eval-split", "valid"], "--eval-split 'valid': the dataset has splits train, test"),
    (["--device", "gpu"], "--device 'gpu': not a device name"),
    (["--device", "cuda:0"], "--device 'cuda:0': this machine has no CUDA GPU"),
    (["--data", "/nonexistent/data"], "--data /nonexistent/data: no such directory"),
    (["--model", "/nonexistent/model"], "--model /nonexistent/model"),
    (["--model", "NoSuchOrg/NoSuchModel-0B"], "--model NoSuchOrg/NoSuchModel-0B"),
    (["--tiny-hidden", "12"], "--tiny-hidden 12: must be a positive multiple of 2 x --tiny-heads 4"),  # head size 3: RoPE fails
    (["--tiny-kv-heads", "3"], "--tiny-kv-heads 3: must divide --tiny-heads 4"),
    (["--tiny-hidden", "0"], "--tiny-hidden 0: must be a positive multiple of 2 x --tiny-heads 4"),
    (["--tiny-heads", "0"], "--tiny-heads 0: must be >= 1"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_is_one_line_exit_2_and_nothing_written(micro_model, tmp_path, capsys, monkeypatch, extra, message):
    if "cuda" in " ".join(extra) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    t = time.perf_counter()
    code, stdout, err = run_cli(micro_flags(micro_model, out) + extra, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err  # one line
    assert not out.exists()  # no empty directory left behind
    assert time.perf_counter() - t < 20


def test_usage_errors_for_a_file_output_dir_a_used_dir_and_no_run_to_resume(micro_model, tmp_path, capsys,
                                                                               monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = run_cli(micro_flags(micro_model, f), capsys)
    assert code == 2 and "is a file" in err
    monkeypatch.chdir(tmp_path)  # runs/ is relative to the current directory
    code, _, err = run_cli(["--resume"], capsys)
    assert code == 2 and "no run with a checkpoint" in err and not (tmp_path / "runs").exists()
    code, _, err = run_cli(["--resume", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "neither a checkpoint" in err
    # a fresh run into a directory that holds a run is refused: nothing appended, nothing mixed
    used = tmp_path / "used"
    assert run_cli(micro_flags(micro_model, used, max_steps=1), capsys)[0] == 0
    before = (used / "metrics.jsonl").read_text()
    code, _, err = run_cli(micro_flags(micro_model, used, max_steps=1), capsys)
    assert code == 2 and "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (used / "metrics.jsonl").read_text() == before
    # --overwrite starts afresh: the old checkpoints are gone
    assert run_cli(micro_flags(micro_model, used, max_steps=1, save_steps=5, overwrite=True), capsys)[0] == 0
    assert [p.name for p in checkpoints(used)] == ["checkpoint-1"]


def test_resume_without_output_dir_takes_the_newest_run(micro_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = micro_flags(micro_model, tmp_path / "x", max_steps=1)
    flags = flags[:flags.index("--output-dir")] + flags[flags.index("--output-dir") + 2:]  # default runs/<timestamp>
    assert run_cli(flags, capsys)[0] == 0
    (run_dir,) = list((tmp_path / "runs").iterdir())
    code, stdout, err = run_cli(["--resume", "--max-steps", "2"], capsys)
    assert code == 0, err
    assert f"resuming the newest run in runs/: {run_dir}" in stdout
    assert "resuming checkpoint-1" in stdout
    assert [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["phase"] == "rl"] == [1, 2]
    assert len(list((tmp_path / "runs").iterdir())) == 1  # no new empty runs/<timestamp>
    # --resume PATH: a given checkpoint (TRL's resume_from_checkpoint)
    code, stdout, _ = run_cli(["--resume", str(run_dir / "checkpoint-1"), "--max-steps", "2"], capsys)
    assert code == 0 and "resuming checkpoint-1" in stdout


def test_resume_refuses_meaning_changes_unless_overridden(micro_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(micro_flags(micro_model, out, max_steps=1), capsys)[0] == 0
    saved = (out / "train_config.json").read_text()
    code, _, err = run_cli(["--output-dir", str(out), "--resume", "--num-generations", "3", "--max-steps", "2"], capsys)
    assert code == 2 and "--num-generations 3 (was 2)" in err and "--override-config" in err
    assert (out / "train_config.json").read_text() == saved
    # what only extends the run is fine; the rest of the settings come from the run, not the defaults
    code, stdout, err = run_cli(["--output-dir", str(out), "--resume", "--max-steps", "2"], capsys)
    assert code == 0, err
    assert json.loads((out / "train_config.json").read_text())["num_generations"] == 2
    # accepted with --override-config, and recorded
    code, _, err = run_cli(["--output-dir", str(out), "--resume", "--num-generations", "3", "--max-steps", "3",
                            "--override-config"], capsys)
    assert code == 0, err
    rec = json.loads((out / "train_config.json").read_text())
    assert rec["num_generations"] == 3
    assert rec["overrides"][-1]["changed"] == {"num_generations": {"was": 2, "now": 3}}


def test_resume_with_changed_data_is_refused(micro_model, tmp_path, capsys):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(BUNDLED_DATA, data)
    out = tmp_path / "run"
    assert run_cli(micro_flags(micro_model, out, max_steps=1, data=data), capsys)[0] == 0
    with open(data / "queries" / "train.jsonl", "a") as f:  # the same directory, other content
        f.write((data / "queries" / "train.jsonl").read_text().splitlines()[0].replace("train-", "extra-") + "\n")
    code, _, err = run_cli(["--output-dir", str(out), "--resume", "--max-steps", "2"], capsys)
    assert code == 2 and "changed since the run started" in err
    code, _, err = run_cli(["--output-dir", str(out), "--resume", "--data", str(BUNDLED_DATA), "--max-steps", "2"],
                           capsys)
    assert code == 2 and "--data" in err and "would change" in err


def test_truncated_checkpoint_falls_back_to_the_previous_one(micro_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(micro_flags(micro_model, out, max_steps=2, save_steps=1, save_total_limit=0), capsys)[0] == 0
    damaged = out / "checkpoint-2" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    code, stdout, err = run_cli(["--output-dir", str(out), "--resume", "--max-steps", "3"], capsys)
    assert code == 0, err
    assert "checkpoint-2 cannot be read" in stdout and str(damaged) in stdout and "falling back" in stdout
    assert "resuming checkpoint-1" in stdout
    # the same with the trainer state
    (out / "checkpoint-3" / "trainer_state" / "tensors.safetensors").write_bytes(b"\x00" * 10)
    code, stdout, err = run_cli(["--output-dir", str(out), "--resume", "--max-steps", "4"], capsys)
    assert code == 0 and "checkpoint-3 cannot be read" in stdout and "tensors.safetensors" in stdout


def test_a_checkpoint_without_its_completion_mark_is_ignored(micro_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(micro_flags(micro_model, out, max_steps=2, save_steps=1, save_total_limit=0), capsys)[0] == 0
    (out / "checkpoint-2" / "trainer_state" / "complete").unlink()  # as if the writer died before the mark
    assert [p.name for p in checkpoints(out)] == ["checkpoint-1"]


def test_checkpoints_are_pruned_before_writing_and_only_the_newest_keeps_the_optimiser(micro_model, tmp_path, capsys,
                                                                                          monkeypatch):
    """At 1.5B a checkpoint is ~18.5 GB: never limit + 1 of them on disk while one is written, and only
    the newest keeps the AdamW moments (two thirds of the bytes). A resume from an older one says that
    the moments restart."""
    from safetensors import safe_open
    from rerec_mini import run as run_module
    complete_while_writing = []
    real = run_module.save_model

    def spy(model, out_dir, **kw):
        if Path(out_dir).name.startswith("checkpoint-"):
            complete_while_writing.append(len(checkpoints(Path(out_dir).parent)))
        return real(model, out_dir, **kw)

    monkeypatch.setattr(run_module, "save_model", spy)
    out = tmp_path / "run"
    assert run_cli(micro_flags(micro_model, out, max_steps=4, save_steps=1, save_total_limit=2, keep_truncated=True),
                   capsys)[0] == 0
    assert complete_while_writing == [0, 1, 1, 1]
    assert [p.name for p in checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]

    def moments(ckpt):
        with safe_open(str(ckpt / "trainer_state" / "tensors.safetensors"), "pt") as f:
            return [k for k in f.keys() if k.startswith("state.")], [k for k in f.keys() if k.startswith("rng.")]
    assert moments(out / "checkpoint-4")[0] and not moments(out / "checkpoint-3")[0]
    assert moments(out / "checkpoint-3")[1]  # everything else stays
    code, stdout, err = run_cli(["--resume", str(out / "checkpoint-3"), "--max-steps", "4"], capsys)
    assert code == 0 and "AdamW's moments restart from zero" in stdout, err
    code, stdout, err = run_cli(["--resume", "--output-dir", str(out), "--max-steps", "5"], capsys)
    assert code == 0 and "moments restart" not in stdout, err


def test_sigterm_writes_a_checkpoint_and_exits_143(micro_model, tmp_path):
    out = tmp_path / "sig"
    cmd = [sys.executable, str(REPO / "train.py")] + micro_flags(micro_model, out, max_steps=500, save_steps=1000)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and '"rl"' in (out / "metrics.jsonl").read_text():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert f"python train.py --output-dir {out} --resume" in err
    ckpts = checkpoints(out)
    assert len(ckpts) == 1
    step = int(ckpts[0].name.split("-")[-1])
    assert step >= 1 and json.loads((ckpts[0] / "trainer_state" / "state.json").read_text())["step"] == step
    assert not (out / "final").exists()


def test_a_finished_run_leaves_a_report_and_phased_metrics(micro_model, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(micro_flags(micro_model, out, sft_steps=2), capsys)
    assert code == 0
    head = stdout.splitlines()[:8]
    assert head[0] == "rerec-mini train" and any(l.strip().startswith("output") and str(out) in l for l in head)
    assert any("parameters" in l for l in head) and any("items" in l for l in head)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in rows} == {"sft", "rl"}
    report = (out / "report.md").read_text()
    assert "Held-out hit@1" in report and "| after" not in report and "| sft | all |" in report
    assert "| final | all |" in report and "popularity hit@1" in report
    if importlib.util.find_spec("matplotlib"):
        assert (out / "curve_reward.png").exists() and "![curve_reward.png]" in report
    else:
        assert "| reward |" in report


def test_checkpoints_hold_absolute_paths_and_evaluate_from_anywhere(micro_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    rel_data = os.path.relpath(BUNDLED_DATA, REPO)
    out = tmp_path / "run"
    assert run_cli(micro_flags(micro_model, out, max_steps=1, data=rel_data), capsys)[0] == 0
    state = json.loads((out / "final" / "trainer_state" / "state.json").read_text())
    assert state["config"]["data"] == str(BUNDLED_DATA) and Path(state["config"]["output_dir"]).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), "--model", str(out / "final"), "--limit", "2"],
                          cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_validate_warns_about_settings_that_cannot_learn():
    assert any("NDCG weight 0" in w for w in validate(Config(reward_weights="0.1,0,0.1,0.1")))
    with pytest.raises(UsageError, match="--loss-type 'sum'"):
        validate(Config(loss_type="sum"))
    with pytest.raises(UsageError, match="--sft-candidate-ramp"):
        validate(Config(sft_candidate_ramp=1.5))
    assert validate(Config()) == []


def test_train_py_help_lists_every_option_once_with_real_defaults():
    out = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name in asdict(Config()):
        assert "--" + name.replace("_", "-") in out, name
    assert "(tiny: " in out and "[]" not in out and "exit codes" in out


def test_switches_the_tiny_preset_turns_on_can_be_turned_off():
    """A boolean the preset sets (--request-last, --sft-lr-decay, --tiny-kind-init) gets a --no- form,
    and the user's --no- wins over the preset; one off everywhere stays a plain switch."""
    from rerec_mini.config import TINY_PRESET, resolve_config
    on = [name for name, v in TINY_PRESET.items() if v is True]
    assert {"request_last", "sft_lr_decay", "tiny_kind_init"} <= set(on)
    for name in on:
        flags = vars(train_py.parser().parse_args(["--no-" + name.replace("_", "-")]))
        assert flags == {name: False}
        assert getattr(resolve_config({"model": "tiny", **flags}), name) is False
        assert getattr(resolve_config({"model": "tiny"}), name) is True
    with pytest.raises(SystemExit):
        train_py.parser().parse_args(["--no-rl-fresh"])  # not a switch: an int, 0 by default
    with pytest.raises(SystemExit):
        train_py.parser().parse_args(["--no-raae-claims"])  # off by default and in the preset


def test_overwrite_removes_a_runs_files_and_nothing_else(micro_model, tmp_path, capsys):
    out = tmp_path / "mixed"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    assert run_cli(micro_flags(micro_model, out, max_steps=1), capsys)[0] == 0
    assert run_cli(micro_flags(micro_model, out, max_steps=1, overwrite=True), capsys)[0] == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "data").is_dir()
    # a directory with no run in it is left alone entirely
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "keep.py").write_text("x = 1")
    assert run_cli(micro_flags(micro_model, plain, max_steps=1, overwrite=True), capsys)[0] == 0
    assert (plain / "keep.py").exists()


def test_resume_from_an_older_checkpoint_sets_the_later_ones_aside(micro_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(micro_flags(micro_model, out, max_steps=3, save_total_limit=0), capsys)[0] == 0
    code, stdout, err = run_cli(["--resume", str(out / "checkpoint-1"), "--max-steps", "2"], capsys)
    assert code == 0, err
    assert "moved to abandoned-" in stdout
    (aside,) = list(out.glob("abandoned-*"))
    assert {p.name for p in aside.iterdir()} >= {"checkpoint-3", "final", "eval_final.json"}
    assert [p.name for p in checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    state = json.loads((out / "final" / "trainer_state" / "state.json").read_text())
    assert state["step"] == 2
    # a run directory works as --resume PATH too (its newest checkpoint), and a mismatching --output-dir is refused
    code, stdout, _ = run_cli(["--resume", str(out), "--max-steps", "3"], capsys)
    assert code == 0 and "resuming checkpoint-2" in stdout
    code, _, err = run_cli(["--resume", str(out / "checkpoint-1"), "--output-dir", str(tmp_path / "else")], capsys)
    assert code == 2 and "drop one of the two" in err


def test_one_shot_flags_are_not_saved(micro_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(micro_flags(micro_model, out, max_steps=1), capsys)[0] == 0
    assert run_cli(["--output-dir", str(out), "--resume", "--max-steps", "2", "--num-generations", "3",
                    "--override-config"], capsys)[0] == 0
    for saved in (json.loads((out / "train_config.json").read_text()),
                  json.loads((out / "final" / "trainer_state" / "state.json").read_text())["config"]):
        assert saved["override_config"] is False and saved["overwrite"] is False and saved["resume"] == ""
    # so the next resume is checked again
    code, _, err = run_cli(["--output-dir", str(out), "--resume", "--max-steps", "3", "--num-generations", "4"], capsys)
    assert code == 2 and "--num-generations 4 (was 3)" in err


def test_a_run_from_our_checkpoint_keeps_its_prompt_format_unless_told(micro_model, tmp_path, capsys):
    """--model runs/X/final: the prompt settings unset on the command line are the checkpoint's, the set ones win."""
    first = tmp_path / "first"
    argv = micro_flags(micro_model, first, max_steps=1, request_last=True, show_attributes="genre")
    assert run_cli(argv, capsys)[0] == 0
    second = tmp_path / "second"
    argv = ["--model", str(first / "final"), "--output-dir", str(second), "--max-steps", "1", "--batch-size", "2",
            "--num-generations", "2", "--eval-limit", "2", "--beta", "0", "--num-candidates", "4"]
    code, stdout, _ = run_cli(argv, capsys)
    assert code == 0
    saved = json.loads((second / "train_config.json").read_text())
    assert saved["request_last"] is True and saved["show_attributes"] == "genre"  # from the checkpoint
    assert saved["max_completion_length"] == 8 and saved["num_candidates"] == 4  # the checkpoint's; the flag's
    line = next(l for l in stdout.splitlines() if l.strip().startswith("prompt"))
    assert "request_last=True" in line and "show_attributes=genre" in line and "num_candidates" not in line


def test_the_banner_counts_what_held_out_queries_share_with_training(micro_model, tmp_path, capsys):
    """0 / 0 / 0 on the bundled set; a training query that repeats a test query shows in the counts."""
    import shutil
    code, stdout, _ = run_cli(micro_flags(micro_model, tmp_path / "a", max_steps=1), capsys)
    assert code == 0 and "held-out  test queries sharing with train: conditions 0, group 0, answers 0\n" in stdout
    data = tmp_path / "data"
    shutil.copytree(BUNDLED_DATA, data)
    first_test = (data / "queries" / "test.jsonl").read_text().splitlines()[0]  # an explicit query
    with open(data / "queries" / "train.jsonl", "a") as f:
        f.write(first_test.replace('"test-', '"leak-') + "\n")
    code, stdout, _ = run_cli(micro_flags(micro_model, tmp_path / "b", max_steps=1, data=data), capsys)
    assert code == 0 and "sharing with train: conditions 1, group 0, answers 1  (per type: " in stdout
