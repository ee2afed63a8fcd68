"""The command lines' flags (rerec_mini/cli.py, train.py --help): no prefix matching anywhere, negative
numbers reach the range checks, a usage error is one line, and train.py's --help is grouped; progress
bars write a few lines, not one per step, into a log file."""

import ast
import importlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from rerec_mini.cli import ArgumentParser
from rerec_mini.config import Config

REPO = Path(__file__).resolve().parents[1]


def script(name: str):
    """train.py / eval.py as modules, in process."""
    spec = importlib.util.spec_from_file_location(f"{name}_cli", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entry(name: str):
    """The main(argv) of a command line: 'train.py', 'eval.py' or a module such as 'rerec_mini.ask'."""
    if name.endswith(".py"):
        return script(name[:-3]).main
    return importlib.import_module(name).main


# (command, argv with a flag abbreviated, that flag as typed, the flag it abbreviates): every command line
ABBREVIATED = [
    ("train.py", ["--max-step", "5"], "--max-step", "--max-steps"),
    ("eval.py", ["--model", "tiny", "--lim", "3"], "--lim", "--limit"),
    ("rerec_mini.ask", ["--mod", "tiny", "war movies"], "--mod", "--model"),
    ("rerec_mini.explain", ["--model", "tiny", "--quer", "x"], "--quer", "--query"),
    ("rerec_mini.export", ["ckpt", "--gg", "x.gguf"], "--gg", "--gguf"),
    ("rerec_mini.datasets", ["synth", "--ou", "x"], "--ou", "--out"),
    ("rerec_mini.report", ["run", "--x"], "--x", None),
    ("rerec_mini.ablate", ["--seed", "3"], "--seed", "--seeds"),
    ("rerec_mini.bench.sampler", ["--repeat", "1"], "--repeat", "--repeats"),
    ("rerec_mini.bench.scorer", ["--rollout", "8"], "--rollout", "--rollouts"),
    ("rerec_mini.bench.train", ["--step", "1"], "--step", "--steps"),
    ("rerec_mini.bench.gpu", ["--ou", "x", "--smoke"], "--ou", "--out"),
    ("rerec_mini.gguf_io", ["--clea"], "--clea", "--clear"),
]


@pytest.mark.parametrize("name, argv, typed, meant", ABBREVIATED, ids=[a[0] for a in ABBREVIATED])
def test_an_abbreviated_flag_is_refused_in_one_line(name, argv, typed, meant, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, but if it were, not into the repository
    with pytest.raises(SystemExit) as stop:
        entry(name)(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith(f"error: argument {typed}: unknown flag"), err
    assert err.count("\n") == 1, err  # one line, no usage dump
    if meant:
        assert f"did you mean {meant}?" in err, err
    assert "--help" in err
    assert list(tmp_path.iterdir()) == []


def test_every_command_line_builds_its_parser_without_prefix_matching():
    """A new command line that builds a plain argparse parser would bring prefix matching back."""
    files = [*sorted((REPO / "rerec_mini").rglob("*.py")), REPO / "train.py", REPO / "eval.py"]
    plain = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "ArgumentParser" and getattr(node.func.value, "id", "") == "argparse":
                if not any(k.arg == "allow_abbrev" and getattr(k.value, "value", True) is False for k in node.keywords):
                    plain.append(f"{f.relative_to(REPO)}:{node.lineno}")
    assert plain == [], f"use rerec_mini.cli.ArgumentParser: {plain}"
    mains = [f for f in files if "ArgumentParser(" in f.read_text(encoding="utf-8") and f.name != "cli.py"]
    assert len(mains) >= 13  # every command line above, and run.py's pre-parser of --model


@pytest.mark.parametrize("value", ["-1e-4", "-2.5E+3", "-.5", "-4", "-inf", "-1.", "-3e2"])
def test_negative_numbers_are_values_not_flags(value):
    p = ArgumentParser(prog="t")
    p.add_argument("--x", type=float)
    p.add_argument("--n", type=float)
    assert p.parse_args(["--x", value, "--n", "1"]).x == float(value)


def test_a_negative_learning_rate_reaches_its_range_check(capsys):
    """Not argparse's "expected one argument" after the usage text: the check's own one line."""
    train = entry("train.py")
    for argv, message in ((["--learning-rate", "-1e-4"], "--learning-rate -0.0001: must be > 0"),
                          (["--beta", "-1e-3"], "--beta -0.001: must be >= 0"),
                          (["--sft-learning-rate", "-5E-3"], "--sft-learning-rate -0.005: must be > 0")):
        assert train(argv + ["--data", "/nonexistent"]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {err[7:]}" and message in err and err.count("\n") == 1, err


def test_a_bad_value_is_one_line_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        entry("train.py")(["--loss-type", "sum"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: argument --loss-type: invalid choice: 'sum'")


# ----------------------------------------------------------------------------- train.py --help


def help_text(columns: int) -> str:
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True,
                          check=True, env=env, cwd=REPO).stdout


def test_train_help_is_grouped_with_its_notation_explained_and_one_line_per_flag_when_wide():
    train = script("train")
    text = help_text(400)
    headers = [ln[:-1] for ln in text.splitlines() if ln.endswith(":") and not ln.startswith(" ")]
    assert headers[headers.index("options") + 1:] == list(train.GROUPS)
    assert "[16]       the default" in text and "(tiny: 8)  what --model tiny uses instead" in text
    assert "--max-steps N" in text and "0: an SFT-only run" in text
    flag_lines = [ln for ln in text.splitlines() if ln.startswith("  --")]
    assert len(flag_lines) == len(fields(Config))
    assert all(len(ln.split("  ", 2)) == 3 and ln.split("  ", 2)[2].strip() for ln in flag_lines)  # help beside
    assert not any(ln.startswith(" " * 20) for ln in text.splitlines())  # no wrapped help at 400 columns
    # each group holds what it says
    group = {f.name: train.help_group(f.name, [g.name for g in fields(Config)]) for f in fields(Config)}
    assert group["learning_rate"].startswith("RL") and group["no_raae"].startswith("ReRec")
    assert group["data"] == group["num_candidates"] == group["show_attributes"] == "data and prompt"
    assert group["micro_batch_size"] == group["logprob_chunk"] == "memory and speed"
    assert group["sft_fresh"] == "SFT warm start" and group["save_total_limit"].startswith("evaluation")
    assert group["tiny_vocab"].startswith("the tiny model") and group["seed"] == "model and run"


def test_a_new_field_lands_in_the_group_of_the_section_it_is_written_in():
    train = script("train")
    order = [f.name for f in fields(Config)]
    grown = order[:order.index("reward_weights") + 1] + ["reward_fn", "shuffle_rewards"] \
        + order[order.index("reward_weights") + 1:]
    grown.insert(grown.index("logprob_chunk") + 1, "share_prompt")
    assert train.help_group("reward_fn", grown) == train.help_group("shuffle_rewards", grown) == \
        "ReRec components and ablations"
    assert train.help_group("share_prompt", grown) == "memory and speed"


# ----------------------------------------------------------------------------- progress bars in a log file


def test_a_progress_bar_in_a_log_file_writes_a_few_lines_not_one_per_step(monkeypatch):
    from rerec_mini import cli
    log = io.StringIO()  # not a terminal, as under CI, nohup or `> train.log`
    monkeypatch.setattr(sys, "stderr", log)
    with cli.progress(total=500, desc="sft") as bar:
        assert bar.mininterval == cli.LOG_INTERVAL >= 10  # a slow step still waits its turn
        for i in range(500):
            bar.set_postfix(loss=f"{i:.3f}", refresh=False)
            bar.update(1)
    lines = [ln for ln in log.getvalue().replace("\r", "\n").splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 3, lines  # the start and the end, not 500 redraws
    assert "500/500" in lines[-1] and "loss=499.000" in lines[-1]


def test_every_bar_is_a_log_friendly_one():
    """A bare tqdm(...) or a postfix that refreshes would bring back a line per step in log files."""
    for f in [*sorted((REPO / "rerec_mini").rglob("*.py")), REPO / "train.py", REPO / "eval.py"]:
        text = f.read_text(encoding="utf-8")
        if f.name != "cli.py":
            assert "tqdm(" not in text, f"{f.name}: use rerec_mini.cli.progress"
        for call in re.findall(r"set_postfix\((.*?)\)\n", text, flags=re.S):
            assert "refresh=False" in call, f"{f.name}: set_postfix(..., refresh=False)"
