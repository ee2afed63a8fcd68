"""train.py under torchrun (gloo, 2 CPU processes): it trains what one process trains, with DDP-style
summed gradients and with --fsdp (FSDP2), resumes on another number of processes either way, stops every
rank on a signal to one, and refuses a batch the ranks cannot share or --fsdp without ranks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")

# A micro model: SFT on gold reasoning makes real gradients (RL on an untrained model has none to give).
FLAGS = ["--model", "tiny", "--tiny-hidden", "32", "--tiny-layers", "1", "--tiny-vocab", "400", "--device", "cpu",
         "--num-candidates", "3", "--max-completion-length", "8", "--sft-steps", "3", "--sft-batch-size", "4",
         "--sft-learning-rate", "1e-2", "--batch-size", "4", "--num-generations", "2", "--learning-rate", "1e-3",
         "--warmup-steps", "1", "--beta", "0.05", "--keep-truncated", "--eval-limit", "4", "--save-steps", "1",
         "--seed", "3"]


def run(args: list[str], nproc: int = 1, wait: bool = True):
    """python train.py ARGS, or torchrun with nproc processes."""
    launch = [sys.executable, "train.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "train.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(launch + args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    return subprocess.run(launch + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def weights(run_dir: Path, name: str = "final") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / name / "model.safetensors"))


def assert_same_training(a: Path, b: Path):
    """Final weights equal within fp32 rounding, measured against how far training moved them."""
    wa, wb, w0 = weights(a), weights(b), weights(a, "tiny-init")
    moved = sum(float((wa[k] - w0[k]).norm()) ** 2 for k in wa) ** 0.5
    apart = sum(float((wa[k] - wb[k]).norm()) ** 2 for k in wa) ** 0.5
    assert moved > 1e-2 and apart <= 1e-5 * moved, (apart, moved)
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert [r["phase"] for r in rows[0]] == [r["phase"] for r in rows[1]]
    for x, y in zip(*rows):
        for key in ("loss", "reward", "kl", "completions/mean_length"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (key, x, y)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """FLAGS trained for 3 RL steps in one process: what the ranks must reproduce."""
    out = tmp_path_factory.mktemp("one") / "run"
    r = run(FLAGS + ["--max-steps", "3", "--output-dir", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_two_ranks_train_what_one_process_trains_and_resume_on_either(tmp_path, one_process):
    two = run(FLAGS + ["--max-steps", "3", "--output-dir", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("rerec-mini train") == 1  # rank 0 alone prints
    assert_same_training(one_process, tmp_path / "two")
    # 2 ranks -> 1 process: two RL steps on two ranks, the third alone, equals three steps in one process
    part = tmp_path / "part"
    r = run(FLAGS + ["--max-steps", "2", "--output-dir", str(part)], nproc=2)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run(["--resume", "--output-dir", str(part), "--max-steps", "3"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_training(one_process, part)


def test_two_ranks_take_the_rl_step_one_process_takes_under_shuffled_user_rewards(tmp_path):
    """RL alone, with rewards that vary in every group (a user reward on the completion's length), so the
    policy gradient is not zero; --shuffle-rewards permutes them across the whole step (every rank's
    rollouts), which only holds if the ranks gather before they permute."""
    fn = tmp_path / "length_reward.py"
    fn.write_text("def by_length(completions, **kw):\n    return [float(len(c) % 5) for c in completions]\n")
    flags = FLAGS + ["--sft-steps", "0", "--max-steps", "3", "--reward-fn", f"{fn}:by_length", "--shuffle-rewards"]
    one = run(flags + ["--output-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stdout + one.stderr
    two = run(flags + ["--output-dir", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, two.stdout + two.stderr
    rows = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["frac_reward_zero_std"] < 1 for r in rows if r["phase"] == "rl")  # some group had a spread
    assert_same_training(tmp_path / "one", tmp_path / "two")


def test_fsdp_trains_what_one_process_trains_and_resumes_across_world_sizes(tmp_path):
    """--fsdp shards weights, gradients and AdamW moments; the result must still be one process's. The run
    is made to exercise what sharding changes: SFT that teaches the box (so completions end by themselves)
    and RL on a reward that varies, with micro-batches of one rollout and truncated rollouts dropped, so the
    ranks hold different numbers of micro-batches (the padding that keeps their collectives in step), a
    reference model (gathered from the shards), and checkpoints written from gathered tensors."""
    fn = tmp_path / "length_reward.py"
    fn.write_text("def by_length(completions, **kw):\n    return [float(len(c) % 5) for c in completions]\n")
    flags = [f for f in FLAGS if f != "--keep-truncated"] + [
        "--sft-source", "format", "--sft-steps", "15", "--micro-batch-size", "1", "--reward-fn", f"{fn}:by_length"]
    one = run(flags + ["--max-steps", "3", "--output-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stdout + one.stderr
    rows = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if r["phase"] == "rl"]
    assert all(r["loss"] != 0 for r in rl) and 0 < sum(r["completions/clipped_ratio"] for r in rl) < len(rl), rl
    sharded = run(flags + ["--fsdp", "--max-steps", "3", "--output-dir", str(tmp_path / "fsdp")], nproc=2)
    assert sharded.returncode == 0, sharded.stdout + sharded.stderr
    assert_same_training(tmp_path / "one", tmp_path / "fsdp")
    # 1 process -> 2 sharded ranks: the saved moments are cut into shards
    up = tmp_path / "up"
    r = run(flags + ["--max-steps", "2", "--output-dir", str(up)])
    assert r.returncode == 0, r.stdout + r.stderr
    r = run(["--resume", "--output-dir", str(up), "--max-steps", "3", "--fsdp"], nproc=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_training(tmp_path / "one", up)
    # 2 sharded ranks -> 1 process: the checkpoint holds whole tensors
    down = tmp_path / "down"
    r = run(flags + ["--fsdp", "--max-steps", "2", "--output-dir", str(down)], nproc=2)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run(["--resume", "--output-dir", str(down), "--max-steps", "3"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_training(tmp_path / "one", down)


def test_one_process_to_two_ranks(tmp_path, one_process):
    """A run started in one process continues under torchrun (data parallel) as if it had not moved."""
    part = tmp_path / "part"
    r = run(FLAGS + ["--max-steps", "2", "--output-dir", str(part)])
    assert r.returncode == 0, r.stdout + r.stderr
    r = run(["--resume", "--output-dir", str(part), "--max-steps", "3"], nproc=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_training(one_process, part)


def test_a_signal_to_one_rank_stops_every_rank_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = run(FLAGS + ["--sft-steps", "0", "--max-steps", "500", "--output-dir", str(out)], nproc=2, wait=False)
    deadline = time.time() + 120
    while not list(out.glob("checkpoint-*/trainer_state/complete")) and time.time() < deadline:
        time.sleep(0.5)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    rank1 = [int(p) for p in children if b"LOCAL_RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes()]
    assert len(rank1) == 1, children
    os.kill(rank1[0], signal.SIGTERM)  # rank 1 only
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, output
    assert "stopped by SIGTERM" in output
    last = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit())
    r = run(["--resume", "--output-dir", str(out), "--max-steps", str(last + 1)])  # one process, one more step
    assert r.returncode == 0 and f"resuming checkpoint-{last}" in r.stdout, r.stdout + r.stderr


def test_a_batch_the_ranks_cannot_share_is_refused_before_any_work(tmp_path):
    r = run(FLAGS + ["--batch-size", "3", "--output-dir", str(tmp_path / "run")], nproc=2)
    assert r.returncode != 0 and "--batch-size 3: must be a multiple of the 2 processes" in r.stderr + r.stdout
    assert not (tmp_path / "run").exists()


def test_fsdp_in_one_process_is_refused_before_any_work(tmp_path):
    r = run(FLAGS + ["--fsdp", "--output-dir", str(tmp_path / "run")])
    assert r.returncode == 2 and "--fsdp shards the training state across processes" in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "run").exists()
