"""Every training option in one flat dataclass, the tiny preset, and the checks made before any work.

`train.py` turns each `Config` field into a `--flag` with its help text; names follow TRL's GRPO
vocabulary where one exists. `validate(cfg)` checks ranges and choices in microseconds, so a
typo fails before SFT instead of after it; its errors are `UsageError`s (one line naming the
flag and what to do; the command lines print it and exit 2).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .prompts import DEFAULT_NEGATIVES, NEGATIVE_MODES

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DATA = REPO_ROOT / "data" / "synth-movies"


class UsageError(Exception):
    """A user mistake (a flag out of range, a missing file, a used output directory): the message
    is one line that names the flag or file and says what to do. Internal errors are not these."""


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    """Every training option; `train.py` turns each field into a `--flag` with this help."""

    # what to train, on what, where
    model: str = _opt("tiny", "local dir, .gguf file, hub id, alias (Qwen2.5-0.5B|1.5B|3B|7B, Llama-3.2-1B|3B, "
                              "SmolLM2-135M|360M|1.7B) or 'tiny'")
    data: str = _opt(str(BUNDLED_DATA), "dataset directory (format: data/README.md)")
    output_dir: str = _opt("", "where checkpoints, metrics.jsonl, evaluations and report.md go "
                               "(default: runs/<timestamp> in the current directory)")
    overwrite: bool = _opt(False, "start afresh in an --output-dir that already holds a run (its files are deleted)")
    resume: str = _opt("", "continue a run: bare --resume takes the newest checkpoint of --output-dir (or of the "
                           "newest run in runs/); --resume PATH a given checkpoint", nargs="?", const="latest")
    override_config: bool = _opt(False, "with --resume: accept flags that change the run's meaning (recorded)")
    seed: int = _opt(0, "seed for init, candidates, sampling and the curriculum")
    device: str = _opt("auto", "cuda, cuda:N, cpu or auto")
    precision: str = _opt("auto", "bf16: bf16 autocast, bf16 sampling copy; fp32: all float32; auto: bf16 on CUDA",
                          choices=("auto", "bf16", "fp32"))
    # the RL loop (names follow TRL's GRPO where one exists)
    max_steps: int = _opt(200, "RL steps; 0: an SFT-only run (a finished run continues with --resume --max-steps N)")
    batch_size: int = _opt(16, "queries per RL step")
    num_generations: int = _opt(5, "rollouts per query (the group size G, >= 2)")
    max_completion_length: int = _opt(512, "most tokens sampled per rollout")
    temperature: float = _opt(1.0, "sampling temperature (> 0; the trainer's log-probs use the same one)")
    top_p: float = _opt(1.0, "nucleus sampling threshold, in (0, 1]")
    learning_rate: float = _opt(5e-6, "AdamW learning rate of the RL phase")
    warmup_steps: int = _opt(10, "linear learning-rate warmup, in RL steps (and in SFT steps for the warm start)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping")
    beta: float = _opt(0.01, "KL coefficient (k3 to the frozen start); 0 loads no reference model")
    epsilon: float = _opt(0.2, "lower clip range of the ratio")
    epsilon_high: float = _opt(0.2, "upper clip range of the ratio")
    loss_type: str = _opt("dapo", "loss aggregation (TRL's names): dapo token mean over the step; grpo per-rollout "
                                  "mean; dr_grpo / (rollouts x max length); bnpo token mean per micro-batch",
                          choices=("dapo", "grpo", "dr_grpo", "bnpo", "token-mean", "seq-mean", "dr-grpo"))
    scale_rewards: str = _opt("group", "advantage std scaling: the query's group, the whole batch, or none",
                              choices=("group", "batch", "none"))
    num_iterations: int = _opt(1, "optimiser passes over each batch of rollouts (mu)")
    micro_batch_size: int = _opt(8, "rollouts per forward/backward (memory)")
    gradient_checkpointing: str = _opt("auto", "recompute layer activations in backward (memory); auto: on for CUDA",
                                       choices=("auto", "on", "off"))
    keep_truncated: bool = _opt(False, "also train on rollouts cut off at --max-completion-length")
    tis_cap: float = _opt(-1.0, "truncated importance sampling: weight tokens by min(p_train/p_sampler, cap); 0: off; "
                                "-1: 2 when sampling in bf16 (its kernels differ from training's), off in fp32")
    ref_offload: bool = _opt(False, "keep the reference model on the CPU between uses (GPU memory)")
    fsdp: bool = _opt(False, "under torchrun: shard the weights, gradients and AdamW state across the processes "
                             "(FSDP2), for a model whose training state does not fit one GPU; the sampling copy "
                             "and the reference stay whole on each GPU")
    logprob_chunk: int = _opt(1024, "tokens per chunk of the log-prob head (memory)")
    share_prompt: str = _opt("auto", "update: compute each prompt once for its G rollouts instead of once per rollout "
                                     "(same loss and gradients); auto: on the CPU when (G-1) x mean prompt length >= "
                                     "mean completion length, off on CUDA (where it measured slower)",
                       choices=("auto", "on", "off"))
    # ReRec's components and their ablation switches
    curriculum: str = _opt("buckets", "query sampler", choices=("none", "paper", "buckets"))
    tau: float = _opt(0.1, "difficulty below which a query counts as mastered (retired)")
    difficulty_metric: str = _opt("rec", "curriculum difficulty: 1-rec or 1-reward", choices=("rec", "reward"))
    no_raae: bool = _opt(False, "ablation: plain GRPO advantages (no reasoning-aware token advantages)")
    raae_penalty: float = _opt(0.3, "RAAE: wrong-segment tokens get A - penalty*max(|A|, floor)")
    raae_floor: float = _opt(1.0, "RAAE: the penalty's floor in advantage units (with --scale-rewards group, 1 = one "
                                  "group std; with none, reward units)")
    raae_advantage: str = _opt("bounded", "RAAE: bounded (ours, see raae.py) or the paper's literal formula",
                               choices=("bounded", "paper"))
    raae_claims: bool = _opt(False, "RAAE: also mark segments that attribute a condition to an item lacking it")
    no_qas: bool = _opt(False, "ablation: drop the query-alignment (item-attribute graph) reward")
    no_pas: bool = _opt(False, "ablation: drop the preference-alignment (interaction graph) reward")
    reward_weights: str = _opt("0.1,1.0,0.1,0.1", "weights of format,rec,qas,pas (the release used 0.01 for qas,pas)")
    # your own reward terms (user_rewards.py) and the control every RL claim needs
    reward_fn: list = field(default_factory=list, metadata={
        "help": "a reward function of yours, TRL-style (repeatable): called per batch with prompts, completions, "
                "query, candidates, answer, ... as keyword arguments, returns a float (or None) per completion; "
                "logged as rewards/<name>/mean. Examples: rerec_mini.example_rewards:last_candidate, "
                "rerec_mini.example_rewards:shortest_title", "append": True, "metavar": "MODULE:FUNCTION"})
    reward_fn_weights: str = _opt("", "weights of the --reward-fn terms in their order, comma-separated (1 each)")
    no_builtin_rewards: bool = _opt(False, "the --reward-fn terms are the whole reward: format, NDCG, QAS, PAS weigh "
                                           "0 (still logged) and RAAE, which reads the ground truth, is off")
    shuffle_rewards: bool = _opt(False, "control: permute the rewards across the batch's rollouts before the "
                                        "advantages (seeded per step; RAAE off): nothing should be learnt")
    format_needs_candidate: bool = _opt(False, "format credit only for a listed candidate: with a candidate list, a "
                                               "box whose top item is not one of the prompt's candidates scores as "
                                               "no box (format -0.5, NDCG -0.5); the release credits any catalogue "
                                               "title, so boxing one fixed title earns the format reward")
    # the task
    num_candidates: int = _opt(20, "candidates per prompt (1 correct + negatives); 0 = open generation")
    negatives: str = _opt(DEFAULT_NEGATIVES, "how negatives are drawn: uniform over the catalogue, from the ground "
                                             "truth's popularity bin (the default before issue 23), matched to its "
                                             "popularity with its rank in the set uniform (no popularity shortcut), or "
                                             "hard (sharing some of the request's conditions)", choices=NEGATIVE_MODES)
    hard_negatives: int = _opt(0, "negatives that share some but not all conditions")
    answer_size: int = _opt(1, "titles in the answer box (NDCG@k with k = this)")
    history_len: int = _opt(0, "recent history titles shown in the prompt")
    show_attributes: str = _opt("", "candidate attributes shown in the prompt, e.g. genre,director; "
                                    "'auto': those the request names")
    prompt_examples: int = _opt(0, "prompt: this many worked examples (training queries with their gold reasoning) "
                                   "as earlier chat turns, the same for every prompt unless --prompt-example-pool: "
                                   "the format shown, not taught "
                                   "(how the authors' release starts RL with no SFT)")
    prompt_example_pool: int = _opt(0, "prompt: draw each prompt's --prompt-examples worked examples from the first "
                                       "N of the pool, by its query id (0: the first ones, the same for every "
                                       "prompt): no one answer sits in every prompt to be copied")
    request_last: bool = _opt(False, "prompt: the candidate list first, then the request next to the answer (a model "
                                     "from scratch learns to copy the request's values from there much sooner)")
    # SFT warm start
    sft_steps: int = _opt(0, "SFT steps on gold reasoning before RL (needed by from-scratch models)")
    sft_source: str = _opt("gold", "SFT targets: the gold reasoning, or self: the model's own correct answers "
                                   "(rejection-sampling fine-tuning: --num-generations samples per query at "
                                   "--temperature, the distinct ones that hit and end kept), or format: only "
                                   "\\boxed{a candidate drawn at random}, the answer format and nothing about which "
                                   "item", choices=("gold", "self", "format"))
    sft_learning_rate: float = _opt(1e-5, "AdamW learning rate of the SFT warm start")
    sft_lr_decay: bool = _opt(False, "SFT: after the warmup, decay the learning rate (cosine) to 0 at --sft-steps")
    sft_batch_size: int = _opt(16, "queries per SFT step")
    sft_candidate_ramp: float = _opt(0.0, "SFT: start with 2 candidates per prompt and grow to --num-candidates "
                                          "over this fraction of the SFT steps (0: all from the start)")
    sft_prompt_weight: float = _opt(0.0, "SFT: weight of a language-model loss on the prompt tokens (from-scratch models)")
    sft_fresh: int = _opt(0, "SFT on this many freshly generated queries per type (the query generator run on the "
                             "dataset's catalogue and histories, none the same question as a train or test query) "
                             "instead of the train split: RL then trains on queries SFT has not memorised")
    rl_fresh: int = _opt(0, "RL on up to this many freshly generated queries per type (none the same question as "
                            "a train, test or SFT query) instead of the train split: no answer SFT taught is asked "
                            "again (after --sft-fresh 3200 the generator has ~840 left, no demographic ones)")
    sft_facts: int = _opt(0, "SFT: catalogue fact passages per step, with a language-model loss: the film knowledge a "
                             "pretrained LLM brings, for a model trained from scratch")
    # evaluation, logging and checkpoints
    eval_steps: int = _opt(0, "evaluate on held-out queries every N RL steps (0: only after SFT and at the end)")
    eval_limit: int = _opt(0, "held-out queries per evaluation, the types in turn (0: all)")
    eval_split: str = _opt("test", "split used for evaluation")
    logging_steps: int = _opt(1, "write a metrics row (and the console line) every N RL steps")
    report_to: str = _opt("none", "also log to tensorboard (pip install tensorboard)", choices=("none", "tensorboard"))
    save_steps: int = _opt(50, "checkpoint every N RL steps (and at the end)")
    save_total_limit: int = _opt(2, "checkpoints kept (older ones deleted before a new one is written; 0: keep all). "
                                    "A checkpoint is ~12 bytes per parameter (float32 weights + AdamW moments: "
                                    "18.5 GB at 1.5B, 1.6 GB for SmolLM2-135M); only the newest keeps the moments, "
                                    "older ones are a third of that")
    # the tiny model (only with --model tiny)
    tiny_layers: int = _opt(4, "tiny: transformer layers")
    tiny_hidden: int = _opt(256, "tiny: hidden size")
    tiny_heads: int = _opt(4, "tiny: attention (query) heads")
    tiny_kv_heads: int = _opt(2, "tiny: key/value heads (grouped-query attention: each serves --tiny-heads / this "
                                 "many query heads; as many as --tiny-heads: plain multi-head attention)")
    tiny_vocab: int = _opt(2048, "tiny: BPE vocabulary size")
    tiny_kind_init: bool = _opt(False, "tiny: each unit's embedding starts from a direction shared by its kind "
                                       "(title, person, genre, ...) plus its own (with --tiny-units)")
    tiny_units: bool = _opt(True, "tiny: every title and person / genre / place name is one token (--no-tiny-units: "
                                  "BPE pieces)")


# `python train.py --model tiny` is the offline demo: these replace the defaults above for any
# flag the user did not set. SFT + RL + two evaluations take 8½-9 minutes on 2 CPU cores (8.3-8.7
# measured); the SFT recipe is the one with which the model learns to read its request
# (BENCHMARKS.md, "Reading the request"), RL's lr is the one that did not undo it.
TINY_PRESET = dict(
    tiny_hidden=128, tiny_layers=2, tiny_vocab=1024, tiny_kind_init=True,
    num_candidates=8, show_attributes="auto", request_last=True,
    sft_steps=2000, sft_learning_rate=5e-3, sft_lr_decay=True, sft_batch_size=16, sft_prompt_weight=0.5,
    sft_fresh=3200, sft_candidate_ramp=0.6,
    max_steps=150, batch_size=8, num_generations=6, max_completion_length=80, learning_rate=1e-4,
    warmup_steps=5, beta=0.0, micro_batch_size=48, save_steps=50,
)

def negatable(name: str) -> bool:
    """Whether switch `name` needs a --no- form on the command line: it is on by default, or the
    tiny preset turns it on (so a user can turn it off again)."""
    return bool(Config.__dataclass_fields__[name].default or TINY_PRESET.get(name))


# Flags that only change how a run is carried out or looked at, not what it computes: a resumed
# run may change them freely. Every other flag changes the run's meaning (--override-config).
# Not here: device (cpu <-> cuda switches precision=auto between fp32 and bf16). Two caveats:
# micro_batch_size and share_prompt matter for loss_type bnpo (run.prepare checks), and a longer max_steps
# stretches the buckets curriculum's easy -> hard schedule over the new length.
HARMLESS = {"output_dir", "overwrite", "resume", "override_config", "max_steps", "micro_batch_size",
            "gradient_checkpointing", "ref_offload", "fsdp", "logprob_chunk", "share_prompt", "eval_steps", "eval_limit", "eval_split",
            "logging_steps", "report_to", "save_steps", "save_total_limit"}


# The prompt's format. A new run that starts from one of our checkpoints (--model runs/X/final) takes
# these from that checkpoint's training unless the user sets them, as eval.py and ask do: the demo's
# model, trained on 8 candidates with the request last, would otherwise be handed 20 candidates with
# the request first and no attributes, and start RL by relearning its format.
PROMPT_FORMAT = ("num_candidates", "hard_negatives", "negatives", "show_attributes", "history_len", "answer_size",
                 "request_last", "prompt_examples", "prompt_example_pool", "max_completion_length")


def resolve_config(user: dict, saved: dict | None = None, start: dict | None = None) -> Config:
    """The user's flags, over a resumed run's saved settings (if any), over the tiny preset (for
    --model tiny) or the prompt format `start` was trained with (the training config of the
    checkpoint --model names, if any), over the defaults. Unknown keys raise TypeError."""
    known = {f.name for f in fields(Config)}
    if saved is not None:  # a resumed run keeps what it was trained with
        return Config(**{**{k: v for k, v in saved.items() if k in known}, **user})
    if user.get("model", "tiny") == "tiny":
        base = dict(TINY_PRESET)
    else:
        base = {k: v for k, v in (start or {}).items() if k in PROMPT_FORMAT}
    return Config(**{**base, **user})


def reward_weights(cfg: Config) -> tuple[float, float, float, float]:
    """--reward-weights as four floats (format, rec, qas, pas)."""
    try:
        w = tuple(float(x) for x in cfg.reward_weights.split(","))
    except ValueError:
        w = ()
    if len(w) != 4 or not all(math.isfinite(x) for x in w):
        raise UsageError(f"--reward-weights {cfg.reward_weights!r}: give four numbers format,rec,qas,pas "
                         "(e.g. 0.1,1.0,0.1,0.1)")
    return w  # type: ignore[return-value]


def check_prompt_format(s: dict) -> None:
    """The ranges of the prompt format's settings (PROMPT_FORMAT -> value), wherever they come from:
    train.py's flags (validate), or eval.py's and ask's flags over a checkpoint's. Raises UsageError
    on the first bad one."""
    def need(ok: bool, flag: str, what: str):
        if not ok:
            raise UsageError(f"--{flag.replace('_', '-')} {s[flag]!r}: {what}")

    need(s["num_candidates"] == 0 or s["num_candidates"] >= 2, "num_candidates",
         "must be >= 2 (1 correct + negatives), or 0 for open generation")
    need(s["hard_negatives"] >= 0, "hard_negatives", "must be >= 0")
    need(s["answer_size"] >= 1, "answer_size", "must be >= 1")
    need(s["history_len"] >= 0, "history_len", "must be >= 0")
    need(s["max_completion_length"] >= 1, "max_completion_length", "must be >= 1 token")
    need(s["prompt_examples"] >= 0, "prompt_examples", "must be >= 0")
    need(s["prompt_examples"] == 0 or s["answer_size"] == 1, "prompt_examples",
         "needs --answer-size 1 (the examples' gold answers name one title)")
    need(s["prompt_example_pool"] >= 0, "prompt_example_pool", "must be >= 0 (0: the same examples in every prompt)")
    need(s["prompt_example_pool"] == 0 or s["prompt_examples"] >= 1, "prompt_example_pool",
         "draws the worked examples of --prompt-examples K: give K >= 1 too")
    need(s["prompt_example_pool"] == 0 or s["prompt_example_pool"] > s["prompt_examples"], "prompt_example_pool",
         f"must be 0 (the same examples in every prompt) or more than --prompt-examples {s['prompt_examples']} "
         "(each prompt draws its K from the first P)")


def validate(cfg: Config) -> list[str]:
    """Check every option's range; raise UsageError on the first bad one. Returns warnings about
    settings that are legal but make learning impossible or suspicious."""
    def need(ok: bool, flag: str, what: str):
        if not ok:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(cfg, flag)!r}: {what}")

    for f in fields(Config):  # choices first: a typo in a name is the commonest mistake
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            need(False, f.name, f"choose one of {', '.join(choices)}")
    need(cfg.max_steps >= 0, "max_steps", "must be >= 0")
    need(cfg.batch_size >= 1, "batch_size", "must be >= 1 query per step")
    need(cfg.num_generations >= 2, "num_generations", "must be >= 2: a group of one rollout has no contrast, "
                                                        "so every advantage would be 0")
    need(cfg.temperature > 0 and math.isfinite(cfg.temperature), "temperature",
         "must be > 0 for training (the log-probs divide by it); greedy decoding is for evaluation (eval.py)")
    need(0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]")
    need(cfg.learning_rate > 0, "learning_rate", "must be > 0")
    need(cfg.sft_learning_rate > 0, "sft_learning_rate", "must be > 0")
    need(cfg.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    need(cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(cfg.max_grad_norm > 0, "max_grad_norm", "must be > 0")
    need(cfg.beta >= 0, "beta", "must be >= 0 (0 loads no reference model)")
    need(0 <= cfg.epsilon < 1, "epsilon", "must be in [0, 1)")
    need(cfg.epsilon_high >= 0, "epsilon_high", "must be >= 0")
    need(cfg.num_iterations >= 1, "num_iterations", "must be >= 1")
    need(cfg.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
    need(cfg.tis_cap >= 0 or cfg.tis_cap == -1, "tis_cap", "must be >= 0 (0: off) or -1 (2 under bf16, off in fp32)")
    need(cfg.logprob_chunk >= 1, "logprob_chunk", "must be >= 1")
    need(0 <= cfg.tau <= 1, "tau", "must be in [0, 1]")
    need(0 <= cfg.raae_penalty <= 1, "raae_penalty", "must be in [0, 1]")
    need(cfg.raae_floor >= 0, "raae_floor", "must be >= 0")
    check_prompt_format({k: getattr(cfg, k) for k in PROMPT_FORMAT})
    need(cfg.sft_steps >= 0, "sft_steps", "must be >= 0")
    need(cfg.sft_batch_size >= 1, "sft_batch_size", "must be >= 1")
    need(cfg.sft_prompt_weight >= 0, "sft_prompt_weight", "must be >= 0")
    need(0 <= cfg.sft_candidate_ramp <= 1, "sft_candidate_ramp", "must be in [0, 1] (a fraction of --sft-steps)")
    need(cfg.sft_facts >= 0, "sft_facts", "must be >= 0")
    need(cfg.sft_fresh >= 0, "sft_fresh", "must be >= 0 (0: SFT on the train split)")
    need(cfg.rl_fresh >= 0, "rl_fresh", "must be >= 0 (0: RL on the train split)")
    need(cfg.eval_steps >= 0, "eval_steps", "must be >= 0")
    need(cfg.eval_limit >= 0, "eval_limit", "must be >= 0 (0: all)")
    need(cfg.logging_steps >= 1, "logging_steps", "must be >= 1")
    need(cfg.save_steps >= 1, "save_steps", "must be >= 1")
    need(cfg.save_total_limit >= 0, "save_total_limit", "must be >= 0 (0: keep all)")
    need(cfg.tiny_layers >= 1, "tiny_layers", "must be >= 1")
    need(cfg.tiny_heads >= 1, "tiny_heads", "must be >= 1")
    need(cfg.tiny_kv_heads >= 1 and cfg.tiny_heads % cfg.tiny_kv_heads == 0, "tiny_kv_heads",
         f"must divide --tiny-heads {cfg.tiny_heads}")
    need(cfg.tiny_hidden > 0 and cfg.tiny_hidden % (2 * cfg.tiny_heads) == 0, "tiny_hidden",
         f"must be a positive multiple of 2 x --tiny-heads {cfg.tiny_heads} (rotary positions need an even head size)")
    need(cfg.tiny_vocab >= 300, "tiny_vocab", "must be >= 300 (256 bytes + special tokens + merges)")
    need(not cfg.no_builtin_rewards or bool(cfg.reward_fn), "no_builtin_rewards",
         "needs at least one --reward-fn MODULE:FUNCTION (without either the reward is 0)")
    w = reward_weights(cfg)
    warnings = []
    if cfg.shuffle_rewards:
        warnings.append("--shuffle-rewards: the control run; the advantages see the rewards permuted across the "
                        "batch, so nothing should be learnt")
    if cfg.no_builtin_rewards and cfg.curriculum != "none" and cfg.difficulty_metric == "rec":
        warnings.append(f"--no-builtin-rewards with --curriculum {cfg.curriculum}: difficulty is still measured by "
                        "NDCG, which the reward no longer asks for (--difficulty-metric reward, or --curriculum none)")
    if w[1] == 0 and not cfg.no_builtin_rewards:
        warnings.append("--reward-weights gives NDCG weight 0: the reward no longer asks for the right item")
    if cfg.num_candidates and cfg.hard_negatives >= cfg.num_candidates:
        warnings.append(f"--hard-negatives {cfg.hard_negatives} >= --num-candidates {cfg.num_candidates}: "
                        "every negative is hard")
    if cfg.temperature < 0.3:
        warnings.append(f"--temperature {cfg.temperature}: nearly greedy rollouts give groups with little contrast")
    return warnings


def differences(cfg: Config, base: Config | None = None) -> dict:
    """Settings of `cfg` that differ from `base` (default: the defaults, or the tiny preset)."""
    if base is None:
        base = resolve_config({"model": cfg.model})
    a, b = asdict(cfg), asdict(base)
    return {k: v for k, v in a.items() if v != b[k]}
