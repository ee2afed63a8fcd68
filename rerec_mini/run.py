"""A training run's lifecycle: check everything, claim the output directory, resume, save, stop.

    plan = prepare(flags)     # seconds, writes nothing: options, dataset, model, device, output dir
    run = Run(plan)           # creates the directory, loads the model (or the checkpoint), banner
    results = run.execute()   # SFT, RL, evaluations, checkpoints, metrics.jsonl, report.md

`train(flags)` does all three. A user mistake anywhere in `prepare` is a `UsageError` (one line;
the command lines exit 2) before any work is done and before anything is written.

Output directory: `--output-dir`, else runs/<timestamp> in the current directory. A directory
that already holds a run is refused unless `--resume` (continue it) or `--overwrite` (start over).
Checkpoints `checkpoint-<step>` (RL) and `checkpoint-sft-<step>` hold the HF-format model, its
tokenizer and `trainer_state/` (optimiser, RNGs, curriculum, counters, the config); they are
written into `<name>.tmp`, every file fsynced, marked complete last, then renamed. Resume takes
the newest complete checkpoint that loads, and says so when it has to fall back to an older one.
The last step is always checkpointed, so a finished run continues with `--resume --max-steps N`;
`final/` is a hard-linked copy of that checkpoint.

Exit codes (train.py): 0 finished; 1 stopped by repeated NaN/inf losses (a checkpoint was
written); 2 a usage error (nothing was done); 128 + N stopped by signal N after writing a
checkpoint (130 for Ctrl-C/SIGINT, 143 for SIGTERM), so a scheduler can tell a preemption from
a finished run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import distributed as dist
from . import user_rewards
from .cli import progress
from .config import HARMLESS, PROMPT_FORMAT, Config, UsageError, differences, resolve_config, validate
from .grpo import loss_type_name
from .data import QUERY_TYPES, DataError, Dataset, load_dataset
from .model import ModelConfig, build_tiny, resolve_model_dir, save_model
from .prompts import build_messages, render_sft_target
from .splits import overlaps, total_overlap
from .trainer import Trainer, TrainingStopped

RUNS_DIR = Path("runs")
COMPLETE = "complete"  # the marker a checkpoint's trainer_state/ gets last


# ----------------------------------------------------------------------------- small helpers


def pick_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a device that exists here, else a UsageError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: not a device name; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r}: this machine has no CUDA GPU visible to torch "
                         f"(torch {torch.__version__}); use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: rerec-mini runs on cpu or cuda")
    return dev


def open_dataset(path, trained_by: str | None = None) -> Dataset:
    """--data PATH loaded and validated, or a UsageError naming the flag (and the file:line: field).
    trained_by: the model whose training config named PATH (no --data given)."""
    if not Path(path).is_dir() and trained_by:
        raise UsageError(f"--data: {trained_by} was trained on {Path(path).name} ({path}), which is not on this "
                         "machine; pass --data DIR")
    if not Path(path).is_dir():
        raise UsageError(f"--data {path}: no such directory (format: data/README.md)")
    try:
        return load_dataset(path)
    except DataError as e:
        raise UsageError(f"--data: {e}") from None


def training_state(model) -> dict:
    """A checkpoint's trainer_state/state.json ({} for a base model, an alias or anything else); for
    a .gguf file that export.py wrote from a checkpoint, {"config": the training config it carries}."""
    if model and str(model).endswith(".gguf") and Path(model).is_file():
        from .gguf_io import run_config
        try:
            config = run_config(model)
        except (ValueError, OSError):
            return {}  # not a readable GGUF: loading the model says so, in its own words
        return {"config": config} if config else {}
    path = Path(model) / "trainer_state" / "state.json" if model else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def assumed_settings(model, train_cfg: dict, assumed: dict) -> str | None:
    """A warning for a .gguf that carries no training config (not exported from one of our checkpoints)
    used without --data: one line naming the settings assumed for it (`assumed`: those no flag gave)."""
    if not str(model).endswith(".gguf") or train_cfg or "data" not in assumed:
        return None
    return (f"warning: {Path(model).name} carries no rerec-mini run settings (export.py writes them from a training "
            "checkpoint); assuming " + ", ".join(f"{k}={v!r}" for k, v in assumed.items())
            + "; pass --data and the prompt flags it was trained with")


def checkpoint_config(argv) -> dict:
    """The training config of the checkpoint that argv's --model names ({} for a base model): a command
    line reads it before building its parser, so its defaults (and --help) are the checkpoint's."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--model")
    return training_state(pre.parse_known_args(argv)[0].model).get("config", {})


def dataset_texts(ds: Dataset) -> list[str]:
    """What the tiny tokenizer is trained on: titles, attributes, requests, reasoning, prompts."""
    texts = [it.title for it in ds.items.values()]
    texts += ["; ".join(f"{r}: {', '.join(v)}" for r, v in it.attributes.items()) for it in ds.items.values()]
    for q in ds.all_queries():
        texts.append(q.text)
        texts.append(render_sft_target(q, ds))
    # Every train query's prompt as the model will read it (its answer as the one candidate): the
    # prompt's fixed words then weigh in BPE as often as they occur in training, and merge into a few
    # tokens ("Candidates:", the instruction line); from one prompt, they stayed letters and
    # syllables: the demo's prompts were a fifth longer (190 vs 150 tokens on the test queries).
    for q in ds.queries["train"]:
        texts += [m["content"] for m in build_messages(q, ds, q.ground_truth[:1], show_attributes=("auto",))]
    return texts


def tiny_units(ds: Dataset) -> dict[str, str]:
    """What the tiny tokenizer keeps whole (--tiny-units), each with its kind: every title ("title")
    and every attribute value but years (four digits; they appear inside every title anyway), of
    the kind of its relation, where director, writer and starring are all "person" (one name can be
    all three)."""
    person = {"director", "writer", "starring"}
    units = {v: ("person" if rel in person else rel)
             for it in ds.items.values() for rel, vs in it.attributes.items() if rel != "year" for v in vs}
    units.update({it.title: "title" for it in ds.items.values()})
    return dict(sorted(units.items()))


def build_tiny_start(cfg: Config, ds: Dataset, path: Path) -> Path:
    """`--model tiny`: a random-init model and a tokenizer trained on the dataset, per the tiny_* flags
    (units with their kinds, a mapping, start from their kind's direction: --tiny-kind-init)."""
    units = tiny_units(ds) if cfg.tiny_units else {}
    return build_tiny(path, dataset_texts(ds), vocab_size=cfg.tiny_vocab, hidden_size=cfg.tiny_hidden,
                      num_layers=cfg.tiny_layers, num_heads=cfg.tiny_heads, num_kv_heads=cfg.tiny_kv_heads,
                      intermediate_size=2 * cfg.tiny_hidden, seed=cfg.seed,
                      units=units if cfg.tiny_kind_init else sorted(units))


def check_reward_fns(cfg: Config, ds: Dataset) -> None:
    """--reward-fn: import each function and call it on a probe batch, before any work (user_rewards.py);
    a UsageError (one line naming the function) when one cannot be loaded or returns something unusable."""
    try:
        user_rewards.probe(user_rewards.load_all(cfg.reward_fn, cfg.reward_fn_weights), ds, cfg.num_candidates,
                           seed=cfg.seed, negatives=cfg.negatives,
                           show_attributes=tuple(a for a in cfg.show_attributes.split(",") if a),
                           request_last=cfg.request_last)
    except user_rewards.RewardFnError as e:
        raise UsageError(str(e)) from None


def dataset_hash(path: str | Path) -> str:
    """sha256 over the dataset's files (names and bytes): a resumed run checks its data is unchanged."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".tsv")):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (SFT ones before RL ones, then by step)."""
    def order(p: Path):
        parts = p.name.split("-")
        return (0 if parts[1] == "sft" else 1, int(parts[-1]))
    found = [p for p in out.glob("checkpoint-*") if not p.name.endswith(".tmp") and p.name.split("-")[-1].isdigit()]
    return sorted((p for p in found if (p / "trainer_state" / COMPLETE).exists()), key=order)


def drop_optimizer_state(ckpt: Path) -> None:
    """Rewrite a checkpoint's trainer_state tensors without the optimiser moments (atomically)."""
    path = ckpt / "trainer_state" / "tensors.safetensors"
    if not path.exists():
        return
    with safe_open(str(path), "pt") as f:
        if not any(k.startswith("state.") for k in f.keys()):
            return
        kept = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("state.")}
    tmp = path.with_name("tensors.safetensors.tmp")
    save_file(kept, str(tmp))
    os.replace(tmp, path)


def check_checkpoint(path: Path) -> tuple[dict, dict]:
    """Open every file a resume reads; return (config.json, trainer_state/state.json). Raises
    ValueError naming the file that cannot be read."""
    for f in sorted(path.rglob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f}: {e}") from None
    out = []
    for f in (path / "config.json", path / "trainer_state" / "state.json"):
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{f}: {e}") from None
    return out[0], out[1]


def newest_run(root: Path = RUNS_DIR) -> Path | None:
    runs = [p for p in root.glob("*") if p.is_dir() and checkpoints(p)] if root.is_dir() else []
    return max(runs, key=lambda p: max(c.stat().st_mtime for c in checkpoints(p))) if runs else None


# What a run writes into its directory: --overwrite removes these and nothing else.
RUN_FILES = ("checkpoint-*", "final", "final.tmp", "reference", "reference.tmp", "tiny-init", "tiny-init.tmp",
             "metrics.jsonl", "train_config.json", "eval_*.json", "report.md", "curve_*.png", "tensorboard")


def run_files(out: Path) -> list[Path]:
    return sorted({p for pattern in RUN_FILES for p in out.glob(pattern)}) if out.is_dir() else []


def holds_a_run(out: Path) -> bool:
    return any(p.name in ("metrics.jsonl", "train_config.json", "final") or p.name.startswith("checkpoint-")
               for p in run_files(out))


def set_aside(out: Path, paths: list[Path]) -> Path:
    """Move `paths` into out/abandoned-<time>/ (a resume from an older checkpoint forks the run)."""
    aside = out / time.strftime("abandoned-%Y%m%d-%H%M%S")
    aside.mkdir()
    for p in paths:
        p.rename(aside / p.name)
    return aside


def resume_command(out: Path) -> str:
    return f"python train.py --output-dir {out} --resume"


# ----------------------------------------------------------------------------- prepare: checks, no writes


@dataclass
class Plan:
    """What `prepare` decided, before anything is written."""

    cfg: Config
    out: Path
    device: torch.device
    ds: Dataset
    data_hash: str
    resume_from: list[Path] = field(default_factory=list)  # checkpoints to try, newest first
    overrides: dict = field(default_factory=dict)  # meaning-changing flags accepted on resume
    warnings: list[str] = field(default_factory=list)
    fork: bool = False  # --resume PATH of an older checkpoint: the newer ones are set aside
    inherited: dict = field(default_factory=dict)  # prompt settings taken from --model's training


def _absolute(flags: dict) -> dict:
    """Paths as absolute paths: a checkpoint must work from any directory."""
    out = dict(flags)
    for key in ("data", "output_dir"):
        if out.get(key):
            out[key] = str(Path(out[key]).expanduser().resolve())
    if out.get("model") and Path(out["model"]).expanduser().exists():
        out["model"] = str(Path(out["model"]).expanduser().resolve())
    return out


def prepare(flags: dict | Config) -> Plan:
    """Every check a run needs, in seconds; raises UsageError (nothing written) on the first failure.
    Under torchrun every rank checks, and all of them stop with the first rank's error if any has one
    (a rank that stopped alone would leave the others waiting)."""
    flags = asdict(flags) if isinstance(flags, Config) else dict(flags)
    if dist.launched():
        dist.setup(pick_device(flags.get("device") or "auto"))
    plan, error = None, None
    try:
        plan = _prepare(flags)
    except UsageError as e:
        error = str(e)
    errors = [e for e in dist.gather(error) if e]
    if errors:
        raise UsageError(errors[0])
    return plan


def _prepare(flags: dict) -> Plan:
    flags = _absolute(flags)
    resume = flags.get("resume") or ""
    resume_from: list[Path] = []
    overrides: dict = {}
    inherited: dict = {}
    if resume:
        if resume == "latest":
            out = Path(flags["output_dir"]) if flags.get("output_dir") else newest_run(RUNS_DIR.resolve())
            if out is None:
                raise UsageError(f"--resume: no run with a checkpoint in {RUNS_DIR.resolve()}; "
                                 "give --output-dir DIR or --resume PATH")
            if not flags.get("output_dir"):
                print(f"resuming the newest run in {RUNS_DIR}/: {out}")
            resume_from = list(reversed(checkpoints(out)))
            if not resume_from:
                raise UsageError(f"--resume: no complete checkpoint in {out}; start it afresh with --overwrite")
        else:
            path = Path(resume).expanduser().resolve()
            if (path / "trainer_state").is_dir():  # a checkpoint
                resume_from, out = [path], path.parent
            elif checkpoints(path):  # a run directory: its newest complete checkpoint
                resume_from, out = list(reversed(checkpoints(path))), path
            else:
                raise UsageError(f"--resume {resume}: neither a checkpoint (no trainer_state/ inside) nor a run "
                                 "directory with a complete checkpoint")
            if flags.get("output_dir") and Path(flags["output_dir"]) != out:
                raise UsageError(f"--resume {resume} continues the run in {out}, not --output-dir "
                                 f"{flags['output_dir']}; drop one of the two")
        saved = json.loads((out / "train_config.json").read_text()) if (out / "train_config.json").exists() \
            else check_checkpoint(resume_from[0])[1]["config"]
        saved.pop("fsdp", None)  # how this launch holds the state, not what the run computes: given anew each time
        user = {k: v for k, v in flags.items() if k not in ("resume", "output_dir")}
        cfg = resolve_config({**user, "output_dir": str(out), "resume": resume}, saved=saved)
        harmless = set(HARMLESS)
        if loss_type_name(cfg.loss_type) == "bnpo":  # bnpo normalises each micro-batch on its own, and
            harmless -= {"micro_batch_size", "share_prompt"}  # sharing keeps a group's rollouts in one
        changed = {k: (saved.get(k), v) for k, v in user.items() if k not in harmless and saved.get(k) != v}
        if changed and not flags.get("override_config"):
            what = ", ".join(f"--{k.replace('_', '-')} {new!r} (was {old!r})" for k, (old, new) in changed.items())
            raise UsageError(f"--resume: {what} would change what the run computes; drop the flag(s), or add "
                             "--override-config to accept (recorded in train_config.json)")
        overrides = changed
    else:
        start = training_state(flags.get("model")).get("config", {})  # --model runs/X/final: its prompt format
        cfg = resolve_config(flags, start=start)
        inherited = {k: getattr(cfg, k) for k in PROMPT_FORMAT if k in start and k not in flags}
        out = Path(cfg.output_dir) if cfg.output_dir else (RUNS_DIR / time.strftime("%Y%m%d-%H%M%S")).resolve()
        cfg.output_dir = str(out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--output-dir {out}: is a file, not a directory")
        if holds_a_run(out) and not cfg.overwrite:
            raise UsageError(f"--output-dir {out} already holds a run; continue it with --resume, "
                             "start over with --overwrite, or pick another directory")
    warnings = validate(cfg)
    device = dist.setup(pick_device(cfg.device))  # under torchrun: this rank's GPU (LOCAL_RANK)
    if cfg.fsdp and not dist.launched():
        raise UsageError("--fsdp shards the training state across processes, and this one was not started by "
                         "torchrun: launch with torchrun --nproc-per-node N, or drop --fsdp")
    for name in ("batch_size", "sft_batch_size"):
        if getattr(cfg, name) % dist.world():
            raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be a multiple of the "
                             f"{dist.world()} processes torchrun started (each takes whole query groups)")
    if len(set(dist.gather(json.dumps(asdict(cfg), sort_keys=True, default=str)))) > 1:
        raise UsageError("the processes torchrun started were given different settings; launch them with one "
                         "command line")
    if cfg.report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
        except ImportError:
            raise UsageError("--report-to tensorboard: install it first (pip install tensorboard)") from None

    # the dataset
    ds = open_dataset(cfg.data)
    if cfg.eval_split not in ds.queries:
        raise UsageError(f"--eval-split {cfg.eval_split!r}: the dataset has splits {', '.join(ds.queries)}")
    if not ds.queries.get("train"):
        raise UsageError(f"--data {cfg.data}: queries/train.jsonl has no queries to train on")
    if not ds.queries[cfg.eval_split]:
        warnings.append(f"the {cfg.eval_split} split is empty: evaluations will be skipped")
    if len(ds.interactions) == 0 and not cfg.no_pas:
        warnings.append("the dataset has no interactions: PAS is constant 0 and teaches nothing (--no-pas)")
    missing = [t for t in QUERY_TYPES if not any(q.type == t for q in ds.queries["train"])]
    if missing:
        warnings.append(f"no training queries of type {', '.join(missing)}")
    check_reward_fns(cfg, ds)
    data_hash = dataset_hash(cfg.data)
    if resume:
        saved_hash = json.loads((out / "train_config.json").read_text()).get("data_hash") \
            if (out / "train_config.json").exists() else None
        if saved_hash and saved_hash != data_hash and not flags.get("override_config"):
            raise UsageError(f"--resume: the dataset at {cfg.data} changed since the run started "
                             f"(content hash {saved_hash} -> {data_hash}); add --override-config to accept")

    # the model (a fresh run starts from it; a resume reads the checkpoint's)
    if cfg.model != "tiny" and not resume:
        try:
            hf = json.loads((resolve_model_dir(cfg.model) / "config.json").read_text())
            ModelConfig.from_hf_dict(hf)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise UsageError(f"--model {cfg.model}: " + " ".join(str(e).split())) from None  # one line
    return Plan(cfg, out, device, ds, data_hash, resume_from, overrides, warnings, fork=bool(resume) and
                resume != "latest" and resume_from[0] != (checkpoints(out) or [None])[-1], inherited=inherited)


# ----------------------------------------------------------------------------- the run


class Run:
    """One training run in its output directory: owns the Trainer and every file of the run."""

    def __init__(self, plan: Plan):
        self.plan, self.cfg, self.out = plan, plan.cfg, plan.out
        cfg = self.cfg
        if not dist.is_main():  # under torchrun only rank 0 prints and writes; the others train beside it
            sys.stdout = open(os.devnull, "w")
        if dist.is_main():
            self._claim(plan)
        dist.barrier()  # the directory (and a tiny start) exists before any rank reads it
        self.start_dir = self._start_dir()
        self.trainer = None
        for ckpt in plan.resume_from or [None]:
            try:
                state = check_checkpoint(ckpt)[1] if ckpt is not None else None
                ref = self.out / "reference" if (self.out / "reference").exists() else self.start_dir
                in_rl = state is not None and state["phase"] == "rl"  # SFT needs no reference
                self.trainer = Trainer(cfg, plan.ds, ckpt or self.start_dir, plan.device,
                                       reference_dir=ref if in_rl else None)
                if ckpt is not None:
                    tensors = load_file(str(ckpt / "trainer_state" / "tensors.safetensors"))
                    self.trainer.load_state_dict(tensors, state)
                    self.resumed_from = ckpt
                    if not any(k.startswith("state.") for k in tensors) and state["param_groups"]:
                        print(f"note: {ckpt.name} is not the newest checkpoint of its run, which alone keeps the "
                              "optimiser moments: AdamW's moments restart from zero")
                break
            except Exception as e:  # whatever makes a checkpoint unreadable, try the one before
                if ckpt is None or ckpt == plan.resume_from[-1]:
                    raise
                bad = ckpt.rename(ckpt.with_name(ckpt.name + ".bad"))  # out of the way of pruning and later resumes
                print(f"warning: checkpoint {ckpt.name} cannot be read ({type(e).__name__}: {e}); renamed it "
                      f"{bad.name} and falling back to an older one")
        self.tb = None
        if cfg.report_to == "tensorboard" and dist.is_main():
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.out / "tensorboard"))
        if dist.is_main():
            self._write_config()
            if plan.resume_from:
                self._truncate_metrics()
        print(self.banner())
        self.stop_signal: int | None = None

    def _claim(self, plan: Plan) -> None:
        """The output directory made ready: cleared (--overwrite), created, a fork's later files set aside."""
        if self.cfg.overwrite and not plan.resume_from:  # a run's own files only, never anything else there
            for p in run_files(self.out):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.out.mkdir(parents=True, exist_ok=True)
        if plan.fork:
            ordered = checkpoints(self.out)
            newer = ordered[ordered.index(plan.resume_from[0]) + 1:]
            newer += [p for p in run_files(self.out) if p.name.startswith(("final", "eval_final", "report"))]
            if newer:
                print(f"resuming from {plan.resume_from[0].name}: the later {', '.join(p.name for p in newer)} "
                      f"moved to {set_aside(self.out, newer).name}/")
        if self.cfg.model == "tiny":
            self._start_dir()

    def _start_dir(self) -> Path:
        """The weights a fresh run starts from: the model's directory, or `tiny` built into the run."""
        if self.cfg.model != "tiny":
            return resolve_model_dir(self.cfg.model)
        path = self.out / "tiny-init"
        if not (path / "config.json").exists():
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            build_tiny_start(self.cfg, self.plan.ds, tmp).rename(path)
        return path

    def settings(self) -> dict:
        """The config as saved: the one-shot flags (--resume, --overwrite, --override-config) never
        carry over to a later resume."""
        return {**asdict(self.cfg), "resume": "", "overwrite": False, "override_config": False}

    def _write_config(self) -> None:
        path = self.out / "train_config.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        record = {**self.settings(), "data_hash": self.plan.data_hash,
                  "overrides": old.get("overrides", [])}
        if self.plan.overrides:
            record["overrides"].append({"at_step": self.trainer.step_no, "at_sft_step": self.trainer.sft_step_no,
                                        "changed": {k: {"was": a, "now": b} for k, (a, b) in self.plan.overrides.items()}})
        path.write_text(json.dumps(record, indent=2) + "\n")

    def banner(self) -> str:
        cfg, tr, ds = self.cfg, self.trainer, self.plan.ds
        what = f"resuming {self.resumed_from.name} (step {tr.step_no}, {tr.phase})" \
            if self.plan.resume_from else "new run"
        precision = "bf16 autocast, bf16 sampling copy" if tr.bf16 else "fp32"
        n_test = len(ds.queries.get(cfg.eval_split, []))
        lines = [
            "rerec-mini train",
            f"  output    {self.out}  ({what})",
            f"  device    {self.plan.device} ({precision})",
            f"  model     {cfg.model} -> {self.start_dir} ({tr.model.num_parameters():,} parameters)",
            f"  data      {cfg.data}: {len(ds.items):,} items, {len(ds.queries['train']):,} train / "
            f"{n_test:,} {cfg.eval_split} queries",
        ]
        # What the held-out queries share with training (data/README.md, "The train/test split").
        shared = total_overlap(overlaps(ds.queries["train"], ds.queries.get(cfg.eval_split, [])))
        leak = "  (per type: python -m rerec_mini.datasets check)" if any(shared.values()) else ""
        lines.append(f"  held-out  {cfg.eval_split} queries sharing with train: "
                     + ", ".join(f"{k} {v}" for k, v in shared.items()) + leak)
        diff = {k: v for k, v in differences(cfg).items() if k not in ("output_dir", "resume", "data", "model")}
        lines.append("  settings  " + (", ".join(f"{k}={v}" for k, v in diff.items()) or "defaults"))
        if self.plan.inherited:
            lines.append("  prompt    as --model was trained: " + ", ".join(f"{k}={v}" for k, v in self.plan.inherited.items()))
        if self.plan.overrides:
            lines.append("  override  " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in self.plan.overrides.items()))
        lines += [f"  warning   {w}" for w in self.plan.warnings]
        return "\n".join(lines)

    # --- files

    def log(self, row: dict) -> None:
        if not dist.is_main():
            return
        # a value with no number (an SFT step with no target has no loss) is null: NaN is not JSON, and
        # jq, pandas' strict readers and JavaScript refuse the whole file over one
        plain = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(plain) + "\n")
        if self.tb is not None:
            step = row.get("step", row.get("sft_step", 0))
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "sft_step"):
                    self.tb.add_scalar(f"{row.get('phase', 'rl')}/{k}", v, step)

    def _truncate_metrics(self) -> None:
        """Drop rows the interrupted run wrote after the checkpoint we resume from."""
        path, tr = self.out / "metrics.jsonl", self.trainer
        if not path.exists():
            return
        def before(row):
            if row.get("phase") == "sft":
                return tr.phase == "rl" or row["sft_step"] <= tr.sft_step_no
            return tr.phase == "rl" and row.get("step", 0) <= tr.step_no
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and before(json.loads(ln))]
        path.write_text("".join(ln + "\n" for ln in keep))

    def save(self) -> Path:
        """An atomic checkpoint: HF-format model + tokenizer, then trainer_state/, fsynced, marked
        complete, renamed into place.

        Disk: at 1.5B a checkpoint is ~18.5 GB (float32 weights 6.2, AdamW moments 12.4), so the
        oldest ones beyond --save-total-limit go *before* the new one is written (one is always
        kept until it is), and once it is complete the older ones keep their weights, RNGs and
        curriculum but drop the optimiser moments: two thirds of the bytes. A resume from such a
        checkpoint restarts AdamW's moments, and says so."""
        tr = self.trainer
        name = f"checkpoint-{tr.step_no}" if tr.phase == "rl" else f"checkpoint-sft-{tr.sft_step_no}"
        final = self.out / name
        weights, (tensors, state) = tr.weights(), tr.state_dict()  # --fsdp: every rank helps gather them
        if not dist.is_main():  # rank 0 writes it: every rank holds the same weights and optimiser state
            return final
        tmp = final.with_name(name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        limit = self.cfg.save_total_limit
        if limit > 0:
            older = [c for c in checkpoints(self.out) if c != final]
            for old in older[:len(older) - max(limit - 1, 1)]:
                shutil.rmtree(old, ignore_errors=True)
        save_model(tr.model, tmp, state_dict=weights)
        tr.tokenizer.save_pretrained(str(tmp))
        (tmp / "trainer_state").mkdir()  # a subdirectory: the top level stays a plain HF model directory
        save_file(tensors, str(tmp / "trainer_state" / "tensors.safetensors"))
        state["config"] = self.settings()
        (tmp / "trainer_state" / "state.json").write_text(json.dumps(state) + "\n")
        _fsync_tree(tmp)
        (tmp / "trainer_state" / COMPLETE).write_text(f"{name}\n")  # last: everything above is on disk
        _fsync_tree(tmp / "trainer_state")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(self.out)
        kept = checkpoints(self.out)
        for old in kept[:-limit] if limit > 0 else []:  # --save-total-limit 1: the one kept while writing
            shutil.rmtree(old, ignore_errors=True)
        for old in kept[-limit if limit > 0 else 0:]:
            if old != final:
                drop_optimizer_state(old)
        return final

    def save_reference(self) -> None:
        """The weights RL starts from, for a resume to rebuild the frozen reference (after SFT only:
        without SFT the start directory already holds them)."""
        weights = self.trainer.weights()  # --fsdp: every rank helps gather them
        if not dist.is_main():
            return
        ref = self.out / "reference"
        tmp = ref.with_name("reference.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(self.trainer.model, tmp, state_dict=weights)
        _fsync_tree(tmp)
        shutil.rmtree(ref, ignore_errors=True)
        tmp.rename(ref)

    def write_eval(self, name: str, result: dict) -> None:
        if not dist.is_main():
            return
        (self.out / f"eval_{name}.json").write_text(json.dumps(result, indent=2) + "\n")

    def finish(self, last: Path) -> None:
        """`final/`: a hard-linked copy of the last checkpoint (no second copy of the weights)."""
        if not dist.is_main():
            return
        final = self.out / "final"
        tmp = self.out / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            shutil.copytree(last, tmp, copy_function=os.link)
        except OSError:  # a filesystem without hard links
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(last, tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)

    # --- the loop

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.stop_signal = signum
        tqdm.write(f"signal {signal.Signals(signum).name}: finishing this step, then writing a checkpoint")

    def stopping(self) -> bool:
        """A signal arrived (on any rank, under torchrun: every rank stops, with its number)."""
        if dist.world() > 1:
            signum = int(dist.totals({"s": self.stop_signal or 0}, maxima=("s",))["s"])
            # every rank answers from the same sum; a signal handled during that collective is kept,
            # and the others hear of it at the next check
            self.stop_signal = self.stop_signal or signum or None
            return signum != 0
        return self.stop_signal is not None

    def checkpoint_now(self) -> Path:
        """The checkpoint of the current step: the one already written, else a new one."""
        tr = self.trainer
        name = f"checkpoint-{tr.step_no}" if tr.phase == "rl" else f"checkpoint-sft-{tr.sft_step_no}"
        done = self.out / name
        written = dist.broadcast((done / "trainer_state" / COMPLETE).exists())  # rank 0's files decide for all
        return done if written else self.save()

    def _stopped(self, where: str) -> TrainingStopped:
        ckpt = self.checkpoint_now()
        by = signal.Signals(self.stop_signal).name if self.stop_signal else "request"
        return TrainingStopped(f"stopped by {by} {where}; checkpoint {ckpt.name} written. Resume with:\n"
                               f"    {resume_command(self.out)}", signum=self.stop_signal)

    def evaluate(self, name: str) -> dict | None:
        if not self.plan.ds.queries[self.cfg.eval_split]:
            return None
        result = None
        if dist.is_main():  # under torchrun rank 0 evaluates while the others wait
            result = self.trainer.evaluate()
            self.write_eval(name, result)
        dist.barrier()
        return result

    def execute(self, until_step: int | None = None) -> dict:
        """SFT (if asked), then RL to --max-steps; returns the evaluations {"sft", "final"}.

        until_step: stop as if signalled after that RL step (tests of resume)."""
        cfg, tr = self.cfg, self.trainer
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        results = {}
        try:
            if tr.phase == "sft":
                if cfg.sft_steps > tr.sft_step_no:
                    with progress(total=cfg.sft_steps, initial=tr.sft_step_no, desc="sft") as bar:
                        while tr.sft_step_no < cfg.sft_steps:
                            try:
                                row = tr.sft_step()
                            except TrainingStopped as e:  # repeated NaN: the weights are the last good step's
                                raise TrainingStopped(f"{e}; checkpoint {self.checkpoint_now().name} written. "
                                                      f"Resume with:\n    {resume_command(self.out)}") from None
                            self.log(row)
                            bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
                            bar.update(1)
                            if self.stopping():
                                raise self._stopped(f"at SFT step {tr.sft_step_no}")
                            if tr.sft_step_no % cfg.save_steps == 0 and tr.sft_step_no < cfg.sft_steps:
                                self.save()
                    self.save()  # the SFT model: the start of every RL variant (ablate.py), and resumable
                    tr.sync_rollout_model()  # evaluation samples from the copy: it must see SFT's weights
                    results["sft"] = self.evaluate("sft")
                    if results["sft"]:
                        print(summary_line("after SFT", results["sft"]))
                    if self.stopping():
                        raise self._stopped("after SFT")
                tr.start_rl()
                if cfg.beta != 0 and cfg.sft_steps > 0:
                    self.save_reference()
            if tr.step_no >= cfg.max_steps and (self.out / "final").exists():
                print(f"the run already finished at step {tr.step_no}; pass a larger --max-steps to continue it")
                return {"final": json.loads((self.out / "eval_final.json").read_text())} \
                    if (self.out / "eval_final.json").exists() else {}
            last = None
            with progress(total=cfg.max_steps, initial=tr.step_no, desc="rl") as bar:
                while tr.step_no < cfg.max_steps:
                    if self.stopping():  # arrived during an evaluation or a save
                        raise self._stopped(f"at step {tr.step_no}")
                    try:
                        row = tr.step()
                    except TrainingStopped as e:
                        # Repeated NaN in this step: its updates were skipped, so the weights are those of the
                        # last completed step; keep that step's checkpoint if there is one (the curriculum has
                        # already moved on, so this state must not replace it), else write one.
                        raise TrainingStopped(f"{e}; checkpoint {self.checkpoint_now().name} is the last good "
                                              f"state. Resume (after changing the settings, with "
                                              f"--override-config) with:\n    {resume_command(self.out)}") from None
                    if tr.step_no % cfg.logging_steps == 0 or tr.step_no == cfg.max_steps:
                        self.log(row)
                    bar.set_postfix(reward=f"{row['reward']:.3f}", hit=f"{row['hit_rate']:.2f}", kl=f"{row['kl']:.4f}",
                                    refresh=False)
                    bar.update(1)
                    if cfg.eval_steps and tr.step_no % cfg.eval_steps == 0 and tr.step_no < cfg.max_steps:
                        res = self.evaluate(f"step{tr.step_no}")
                        if res:
                            self.log({"phase": "eval", "step": tr.step_no, **res["overall"]})
                    if tr.step_no % cfg.save_steps == 0 or tr.step_no == cfg.max_steps:
                        last = self.save()
                    if self.stopping() or tr.step_no == until_step:
                        raise self._stopped(f"at step {tr.step_no}")
            last = last or self.save()
            self.finish(last)
            if cfg.max_steps == 0 and results.get("sft"):  # nothing changed since the SFT evaluation
                results["final"] = results["sft"]
                self.write_eval("final", results["sft"])
            else:
                results["final"] = self.evaluate("final")
            if results["final"]:
                print(summary_line("final", results["final"]))
            self.report()
            return results
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            if self.tb is not None:
                self.tb.flush()

    def report(self) -> None:
        from .report import write_report  # the last stage: it reads what the run wrote
        if not dist.is_main():
            return
        try:
            path = write_report(self.out)
            print(f"report: {path}")
        except Exception as e:  # a report must never cost a finished run
            print(f"warning: report.md not written ({type(e).__name__}: {e}); "
                  f"try python -m rerec_mini.report {self.out}")


def summary_line(name: str, result: dict) -> str:
    o = result["overall"]
    ref = ((result.get("reference") or {}).get("popularity") or {}).get("overall", {}).get("hit@1")
    pop = f"  (popularity baseline {ref:.3f})" if ref is not None else ""
    return (f"[{name}] hit@1 {o['hit@1']:.3f}{pop}  ndcg@5 {o['ndcg@5']:.3f}  format_ok {o['format_ok']:.3f}  "
            f"hallucination {o['hallucination']:.3f}  n={o['count']}")


def train(flags: dict | Config, until_step: int | None = None) -> dict:
    """Check, set up and run; see the module docstring."""
    return Run(prepare(flags)).execute(until_step=until_step)
