"""User reward functions, the way TRL's GRPOTrainer takes them: `--reward-fn MODULE:FUNCTION`.

A reward function is called once per batch of N completions with keyword arguments, every one a
list of N (row n = completion n; the G completions of a prompt are adjacent):

    def my_reward(prompts, completions, **kwargs) -> list[float | None]:
        ...

    prompts         [N] str        the prompt as the model read it (chat template applied)
    completions     [N] str        the sampled response, decoded (special tokens dropped)
    completion_ids  [N] list[int]  its token ids (None in evaluation and the probe)
    query           [N] str        the request text
    query_id        [N] str        its dataset id
    query_type      [N] str        explicit | implicit | misinformed | interest | demographic
    candidates      [N] list[str] | None   candidate titles in prompt order (None: open generation)
    answer          [N] list[str]  titles the last \\boxed{} named, matched to the catalogue (candidates
                                   first), repeats dropped, in answer order; [] without a box
    boxed           [N] list[str] | None   the box's raw entries (None: no box)
    ground_truth    [N] list[str]  the query's ground-truth titles

It returns one float per completion, or None where it does not apply (TRL's convention: a None adds
nothing to the total and is left out of the logged mean). Accept **kwargs, as TRL asks: new context
columns may be added. Each function's value w * f joins the total reward before the group-normalised
advantages; `--reward-fn-weights` gives the w's (1 each by default), `--no-builtin-rewards` drops
ReRec's own terms (format, NDCG, QAS, PAS) from the total, so that the functions are the whole
reward. Each one is logged as rewards/<function name>/mean (and /std), like the built-in terms.

Checks, before any work (run.prepare, explain): the module imports, the function exists, is
callable and takes only the arguments above (or **kwargs), and on a probe batch (two completions
of one training query) returns N numbers; every later call is checked the same way. Errors name
the function. Two examples ship with the package: rerec_mini/example_rewards.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import Dataset, Query
from .prompts import CandidateSampler, build_messages, parse_answer

COLUMNS = ("prompts", "completions", "completion_ids", "query", "query_id", "query_type", "candidates", "answer",
           "boxed", "ground_truth")
BUILTIN_TERMS = ("format", "rec", "qas", "pas")  # rewards/<term>/mean names a user function must not take


class RewardFnError(ValueError):
    """A user reward function that cannot be loaded or returned something unusable; the message
    is one line naming the function."""


@dataclass
class RewardFn:
    """One --reward-fn: what to call, under which name it is logged, and its weight."""

    spec: str  # "module:function" as given
    name: str  # the function's __name__: logged as rewards/<name>/mean
    func: Callable
    weight: float = 1.0


def load(spec: str, weight: float = 1.0) -> RewardFn:
    """'package.module:function' (or 'path/to/file.py:function') -> a RewardFn; RewardFnError
    (one line) when the module does not import, the function is missing or takes other arguments."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name.isidentifier():
        raise RewardFnError(f"--reward-fn {spec!r}: give MODULE:FUNCTION, e.g. "
                            "rerec_mini.example_rewards:last_candidate")
    try:
        if module_name.endswith(".py"):  # a file: imported under its stem
            path = Path(module_name).expanduser().resolve()
            if not path.is_file():
                raise RewardFnError(f"--reward-fn {spec!r}: no such file {path}")
            spec_ = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:  # as `python -m` would: the cwd's modules
                sys.path.append(str(Path.cwd()))
            module = importlib.import_module(module_name)
    except RewardFnError:
        raise
    except Exception as e:  # ModuleNotFoundError, or the module's own import-time error
        raise RewardFnError(f"--reward-fn {spec!r}: cannot import {module_name} "
                            f"({type(e).__name__}: {' '.join(str(e).split())})") from None
    func = getattr(module, func_name, None)
    if func is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                        and getattr(v, "__module__", None) == module.__name__)
        raise RewardFnError(f"--reward-fn {spec!r}: {module_name} has no function {func_name!r}"
                            + (f" (it has {', '.join(public)})" if public else ""))
    if not callable(func):
        raise RewardFnError(f"--reward-fn {spec!r}: {func_name} is a {type(func).__name__}, not a function")
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: the probe call will tell
        params = []
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        unknown = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                   and p.name not in COLUMNS and p.default is p.empty]
        if unknown:
            raise RewardFnError(f"--reward-fn {spec!r}: {func_name} needs argument(s) {', '.join(unknown)} that a "
                                f"reward function is not given (it gets {', '.join(COLUMNS)}; accept **kwargs)")
    name = getattr(func, "__name__", func_name)
    if name in BUILTIN_TERMS:
        raise RewardFnError(f"--reward-fn {spec!r}: the name {name!r} is a built-in reward term's "
                            f"(rewards/{name}/mean); rename the function")
    return RewardFn(spec, name, func, weight)


def parse_weights(text: str, count: int) -> list[float]:
    """--reward-fn-weights '0.5,2' -> one finite float per --reward-fn ('' -> 1 each)."""
    if not text.strip():
        return [1.0] * count
    try:
        w = [float(x) for x in text.split(",")]
    except ValueError:
        w = []
    if len(w) != count or not all(math.isfinite(x) for x in w):
        raise RewardFnError(f"--reward-fn-weights {text!r}: give {count} number(s), one per --reward-fn, "
                            "comma-separated")
    return w


def load_all(specs: Sequence[str], weights: str = "") -> list[RewardFn]:
    """Every --reward-fn with its weight; RewardFnError on the first bad one (or a repeated name)."""
    ws = parse_weights(weights, len(specs))
    fns = [load(s, w) for s, w in zip(specs, ws)]
    names = [f.name for f in fns]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise RewardFnError(f"--reward-fn: two functions are named {dup!r} (both would log rewards/{dup}/mean); "
                            "rename one")
    return fns


def call(fn: RewardFn, columns: dict[str, list]) -> np.ndarray:
    """fn(**columns) -> [N] float64, NaN where it returned None. Raises RewardFnError naming fn when
    it raises, returns other than N values, or a value that is not a finite number or None."""
    n = len(columns["completions"])
    try:
        out = fn.func(**columns)
    except RewardFnError:
        raise
    except Exception as e:
        raise RewardFnError(f"--reward-fn {fn.spec}: raised {type(e).__name__}: {' '.join(str(e).split())}") from e
    if isinstance(out, np.ndarray):
        out = out.tolist()
    if isinstance(out, (str, bytes)) or not isinstance(out, Sequence):
        raise RewardFnError(f"--reward-fn {fn.spec}: returned a {type(out).__name__}; return a list of {n} floats "
                            "(None to skip a completion)")
    if len(out) != n:
        raise RewardFnError(f"--reward-fn {fn.spec}: returned {len(out)} values for {n} completions; "
                            "return one float (or None) per completion")
    values = np.full(n, np.nan)
    for k, v in enumerate(out):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise RewardFnError(f"--reward-fn {fn.spec}: value {k} is {v!r} ({type(v).__name__}); return a finite "
                                "float or None per completion")
        values[k] = float(v)
    return values


def columns(ds: Dataset, queries: Sequence[Query], candidates: Sequence[Sequence[str] | None],
            prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[list[int] | None],
            parsed: Sequence[Sequence[str]]) -> dict[str, list]:
    """The keyword arguments of a call (module docstring), from per-completion rows [N]: queries,
    candidate ids (None: open generation), prompt texts, responses, their ids and the matched answer
    ids (the scorer's `parsed`)."""
    title = ds.items
    return {
        "prompts": list(prompts), "completions": list(completions), "completion_ids": list(completion_ids),
        "query": [q.text for q in queries], "query_id": [q.query_id for q in queries],
        "query_type": [q.type for q in queries],
        "candidates": [None if c is None else [title[i].title for i in c] for c in candidates],
        "answer": [[title[i].title for i in p] for p in parsed], "boxed": [parse_answer(t) for t in completions],
        "ground_truth": [[title[i].title for i in q.ground_truth] for q in queries],
    }


def evaluate(fns: Sequence[RewardFn], cols: dict[str, list]) -> dict[str, np.ndarray]:
    """{name: [N] values (NaN = None)} for every function."""
    return {fn.name: call(fn, cols) for fn in fns}


def weighted_sum(fns: Sequence[RewardFn], values: dict[str, np.ndarray], n: int) -> np.ndarray:
    """[N] sum of w * f over the functions, a None (NaN) counting 0: TRL's nansum."""
    total = np.zeros(n)
    for fn in fns:
        total += fn.weight * np.nan_to_num(values[fn.name], nan=0.0)
    return total


def scored_mean(v: np.ndarray) -> float | None:
    """The mean over the completions a function scored (NaN = skipped); None when it skipped all."""
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else None


def summary(values: dict[str, np.ndarray]) -> dict[str, float | None]:
    """rewards/<name>/mean and /std over the completions a function scored (None when it skipped all)."""
    out: dict[str, float | None] = {}
    for name, v in values.items():
        scored = v[~np.isnan(v)]
        out[f"rewards/{name}/mean"] = scored_mean(v)
        out[f"rewards/{name}/std"] = float(scored.std()) if len(scored) else None
    return out


def probe(fns: Sequence[RewardFn], ds: Dataset, num_candidates: int, seed: int = 0, negatives: str = "popularity",
          show_attributes: tuple[str, ...] = (), request_last: bool = False) -> None:
    """Call every function once on a probe batch before any work: the first training query, two
    completions (one boxing its first candidate, one without a box). Raises RewardFnError as `call`.
    The probe's prompt is the user message without the chat template (no tokenizer is loaded yet)
    and its completion_ids are None."""
    if not fns or not ds.queries.get("train"):
        return
    q = ds.queries["train"][0]
    cands = CandidateSampler(ds).sample(q, num_candidates, seed=seed, negatives=negatives)
    first = ds.items[cands[0] if cands else q.ground_truth[0]]
    prompt = build_messages(q, ds, cands, show_attributes=show_attributes, request_last=request_last)[-1]["content"]
    texts = [f"\\boxed{{{first.title}}}", "I cannot tell."]
    cols = columns(ds, [q, q], [cands, cands], [prompt] * 2, texts, [None, None], [[first.item_id], []])
    evaluate(fns, cols)
