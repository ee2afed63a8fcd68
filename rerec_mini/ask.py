"""Try a model: a request in, its reasoning and the catalogue item it names out.

    python -m rerec_mini.ask --model runs/X/final "War movies starring Tom Hanks, please"
    python -m rerec_mini.ask --model runs/X/final --query test-implicit-00003
    python -m rerec_mini.ask --model runs/X/final            # one request per line from stdin

The prompt is built exactly as training builds it: a candidate set from `CandidateSampler`, then
`render_prompt` (the messages of `build_messages` through the tokenizer's chat template); greedy
decoding with our sampler runs up to the end-of-turn ids of `eos_ids`. The answer's last `\\boxed{}`
is read back with `parse_answer` and matched to the catalogue (candidates first), as the scorer does.

Settings come from the flag, else the checkpoint's training config (trainer_state/state.json, as in
eval.py; a .gguf written by rerec_mini.export carries it too), else eval.py's defaults; `--help` after
`--model CKPT` shows the values that will be used.

A dataset query (`--query ID`) is asked with its own candidates, conditions and ground truth: the
output says whether the answer is a ground-truth item and which of the conditions it has.

A typed request has no ground truth. It becomes an `explicit` query whose conditions are the
catalogue attribute values the request names (`named_conditions`: "war movies starring Tom Hanks"
-> genre: War, starring: Tom Hanks). Its candidate set is drawn the way training draws one for an
explicit query: the *anchor* (the most-interacted item having the most named values) plus negatives
matched to the anchor's popularity that lack some named value (`--negatives`, as in training), so
the list holds a plausible answer among plausible-looking others, and `--show-attributes auto`
shows the named relations. A request that names no attribute value gets the anchor drawn (by
--seed) from the most-interacted quarter of the catalogue: a list of well-known items. The output
then says which named values the answered item has; nothing is a "hit".

Exit codes: 0 done; 2 a usage error (missing model, data, query or user), one line on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .cli import ArgumentParser
from .config import BUNDLED_DATA, UsageError, check_prompt_format
from .data import Dataset, Query
from .evaluate import PROMPT_DEFAULTS, prompt_settings
from .model import load_model, load_tokenizer, resolve_model_dir
from .prompts import (NEGATIVE_MODES, CandidateSampler, eos_ids, fmt_attributes, match_answer,
                      parse_answer, render_prompt)
from .run import assumed_settings, checkpoint_config, open_dataset, pick_device
from .sampling import generate
from .titles import TitleIndex

# Without a checkpoint config (a base model) and without a flag: eval.py's defaults.
DEFAULTS = dict(data=str(BUNDLED_DATA), **PROMPT_DEFAULTS)

# A relation with more distinct values than this is an "open" vocabulary (people's names): its values
# must appear in the request with their own capitalisation, so the actor "Sting" is not read out of
# "a sting in the tail". Closed vocabularies (genres, decades, years, countries, languages) match in any case.
OPEN_VOCABULARY = 200
_WORD = re.compile(r"[^\W_](?:[\w'&.\-]*[^\W_])?")  # words, keeping "Children's", "Sci-Fi", "J.J"
# How a request inflects a closed value's last word, undone: (ending, replacement), tried in order.
# Plurals (Comedies -> Comedy, Westerns -> Western) and the adjectives of genre nouns (romantic ->
# romance, comedic -> comedy, dramatic -> drama, animated -> animation, historical -> history). A
# rewrite counts only if the result is a catalogue value, so "fantastic" (-> "fantasce") names nothing.
INFLECTIONS = (("ies", "y"), ("es", ""), ("s", ""), ("atic", "a"), ("ated", "ation"), ("dic", "dy"),
               ("tic", "ce"), ("ical", "y"))


# ----------------------------------------------------------------------------- settings


def parser(train_cfg: dict | None = None) -> argparse.ArgumentParser:
    """The flags; each default shown is what this checkpoint will use (train_cfg: its training config)."""
    known = {k: (train_cfg or {}).get(k, v) for k, v in DEFAULTS.items()}

    def d(key):
        return f" [the checkpoint's: {known[key]!r}]" if train_cfg else f" [a checkpoint's, else {known[key]!r}]"
    p = ArgumentParser(prog="python -m rerec_mini.ask", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("request", nargs="?", help="the request; without one (and without --query), one request per "
                                              "line is read from stdin until end of input")
    p.add_argument("--model", required=True, help="checkpoint directory, .gguf file, hub id, alias or 'tiny'")
    p.add_argument("--data", help="dataset directory (catalogue, queries)" + d("data"))
    p.add_argument("--query", metavar="QUERY_ID", help="ask a dataset query (its candidates, conditions, ground truth)")
    p.add_argument("--user", help="the user behind a typed request (their history, with --history-len)")
    p.add_argument("--num-candidates", type=int,
                   help="candidates in the prompt; 0 = open generation" + d("num_candidates"))
    p.add_argument("--negatives", choices=NEGATIVE_MODES, help="how negatives are drawn" + d("negatives"))
    p.add_argument("--hard-negatives", type=int, help="negatives sharing some named values" + d("hard_negatives"))
    p.add_argument("--show-attributes",
                   help="candidate attributes shown, e.g. genre,director or auto" + d("show_attributes"))
    p.add_argument("--history-len", type=int, help="recent history titles in the prompt" + d("history_len"))
    p.add_argument("--request-last", action=argparse.BooleanOptionalAction,
                   help="the request after the candidate list" + d("request_last"))
    p.add_argument("--prompt-examples", type=int, help="worked examples shown before the request" + d("prompt_examples"))
    p.add_argument("--prompt-example-pool", type=int,
                   help="the worked examples drawn from the first P (0: the first K)" + d("prompt_example_pool"))
    p.add_argument("--answer-size", type=int, help="titles in the answer box" + d("answer_size"))
    p.add_argument("--max-completion-length", "--max-new-tokens", type=int, dest="max_completion_length",
                   help="most tokens in the answer" + d("max_completion_length"))
    p.add_argument("--seed", type=int, help="candidate-set seed" + d("seed"))
    p.add_argument("--device", default="auto", help="cuda, cpu or auto [auto]")
    p.add_argument("--show-prompt", action="store_true", help="also print the prompt as the model sees it")
    return p


# ----------------------------------------------------------------------------- a typed request -> a query


@dataclass
class Vocabulary:
    """The catalogue's attribute values, keyed for lookup in a request's words.

    closed: lower-cased words of a value -> {relation: item count}, for closed vocabularies;
    open: the value's words as written -> {relation: item count}, for open ones (names).
    longest: the most words in any value (the longest n-gram worth looking up)."""

    closed: dict[str, Counter]
    open: dict[str, Counter]
    longest: int

    @classmethod
    def of(cls, ds: Dataset) -> "Vocabulary":
        per_relation: dict[str, Counter] = {}
        for item in ds.items.values():
            for rel, values in item.attributes.items():
                per_relation.setdefault(rel, Counter()).update(values)
        closed: dict[str, Counter] = {}
        opened: dict[str, Counter] = {}
        longest = 1
        for rel, values in per_relation.items():
            is_open = len(values) > OPEN_VOCABULARY
            for value, count in values.items():
                words = _WORD.findall(value)
                if not words:
                    continue
                key = " ".join(words) if is_open else " ".join(words).lower()
                (opened if is_open else closed).setdefault(key, Counter())[(rel, value)] += count
                longest = max(longest, len(words))
        return cls(closed, opened, longest)


def named_conditions(request: str, vocab: Vocabulary) -> list[tuple[str, str]]:
    """The (relation, value) pairs of the catalogue that the request names, in request order.

    The request's word n-grams are looked up longest first, without overlaps ("Tom Hanks" wins over a
    value "Tom"); a plural "s" is forgiven ("Westerns"), and for closed vocabularies (genres, ...) the
    INFLECTIONS of a last word too ("Comedies", "romantic"). A value found under several relations
    (a director who also writes) takes the relation the request hints at (the relation's first four
    letters in the request: "directed" -> director), else the one most items have it under.

    >>> named_conditions("Comedies directed by Woody Allen", vocab)   # doctest: +SKIP
    [('genre', 'Comedy'), ('director', 'Woody Allen')]
    """
    words = _WORD.findall(request)
    lower_text = request.lower()
    found: list[tuple[int, tuple[str, str]]] = []
    taken = [False] * len(words)
    for n in range(min(vocab.longest, len(words)), 0, -1):
        for i in range(len(words) - n + 1):
            if any(taken[i:i + n]):
                continue
            gram = " ".join(words[i:i + n])
            hits = Counter(vocab.open.get(gram, Counter())) + vocab.closed.get(gram.lower(), Counter())
            if not hits and gram.endswith("s") and len(gram) > 3:  # a plural name ("the Coens")
                hits = Counter(vocab.open.get(gram[:-1], Counter()))
            for key in ([] if hits else base_forms(gram.lower())):
                hits = Counter(vocab.closed.get(key, Counter()))
                if hits:
                    break
            if not hits:
                continue
            hinted = [rv for rv in hits if rv[0][:4].lower() in lower_text]
            best = max(hinted or hits, key=lambda rv: hits[rv])
            found.append((i, best))
            taken[i:i + n] = [True] * n
    return list(dict.fromkeys(rv for _, rv in sorted(found)))


def base_forms(gram: str) -> list[str]:
    """`gram` with its last word's inflection undone, each way INFLECTIONS allows (longest word first).

    >>> base_forms("comedies")
    ['comedy', 'comedi', 'comedie']
    """
    head, _, last = gram.rpartition(" ")
    return [(head + " " if head else "") + last[:-len(end)] + base
            for end, base in INFLECTIONS if last.endswith(end) and len(last) > len(end) + 2]


def best_matches(ds: Dataset, conditions: list[tuple[str, str]]) -> tuple[list[str], int]:
    """(the items having the most of `conditions`, most interacted first (ties by id); how many they have)."""
    fit = {iid: sum(it.has(*c) for c in conditions) for iid, it in ds.items.items()}
    most = max(fit.values())
    pop = ds.popularity
    return sorted((i for i, f in fit.items() if f == most), key=lambda i: (-pop[ds.item_index[i]], i)), most


def anchor_item(ds: Dataset, conditions: list[tuple[str, str]], seed: int) -> str:
    """The item a typed request's candidate set is built around: of the items with the most named
    values, the most interacted; with no named value, a seeded draw from the most-interacted quarter."""
    if conditions:
        return best_matches(ds, conditions)[0][0]
    pop = ds.popularity
    by_pop = sorted(ds.item_ids, key=lambda i: -pop[ds.item_index[i]])
    return random.Random(f"{seed}:ask").choice(by_pop[:max(1, len(by_pop) // 4)])


def request_query(request: str, ds: Dataset, vocab: Vocabulary, user: str | None, seed: int) -> Query:
    """A typed request as an explicit query: its named values as conditions, the anchor as the item
    the candidate set is drawn around (ground_truth[0], which CandidateSampler always includes)."""
    conditions = named_conditions(request, vocab)
    qid = "ask-" + hashlib.sha256(request.encode()).hexdigest()[:12]
    return Query(qid, "explicit", request, user, [anchor_item(ds, conditions, seed)], conditions,
                 history=ds.history(user) if user else [])


# ----------------------------------------------------------------------------- asking


class Assistant:
    """A model, its tokenizer and a dataset, loaded once; `ask` answers one query."""

    def __init__(self, model_dir: Path, ds: Dataset, settings: dict, device: torch.device):
        self.ds, self.s = ds, settings
        self.tokenizer = load_tokenizer(model_dir)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = load_model(model_dir, device=device, dtype=dtype).eval()
        self.eos = eos_ids(self.tokenizer, self.model.cfg.hf, model_dir)
        self.sampler = CandidateSampler(ds)
        self.titles = TitleIndex(ds.items.values())
        self.vocab = Vocabulary.of(ds)
        self.show = tuple(a for a in settings["show_attributes"].split(",") if a)

    def prompt(self, q: Query) -> tuple[list[str] | None, str]:
        """(candidate ids or None, the chat-template prompt text), exactly as the trainer builds them."""
        s = self.s
        cands = self.sampler.sample(q, s["num_candidates"], s["hard_negatives"], s["seed"], s["negatives"])
        return cands, render_prompt(q, self.ds, cands, self.tokenizer, history_len=s["history_len"],
                                    show_attributes=self.show, answer_size=s["answer_size"],
                                    request_last=s["request_last"], examples=s["prompt_examples"],
                                    examples_from=s["prompt_example_pool"])

    @torch.no_grad()
    def ask(self, q: Query, known: bool, show_prompt: bool = False) -> dict:
        """Answer `q` greedily and print the report; returns it as a dict. known: a dataset query."""
        ds = self.ds
        cands, text = self.prompt(q)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        ro = generate(self.model, [ids], max_new_tokens=self.s["max_completion_length"], temperature=0.0,
                      eos_token_id=self.eos, seed=self.s["seed"])
        response = self.tokenizer.decode(ro.completions[0], skip_special_tokens=True)
        entries = parse_answer(response)
        answer, unmatched = match_answer(entries or [], self.titles, cands)
        top = ds.items[answer[0]] if answer else None
        has = {c: top.has(*c) for c in q.conditions} if top else {}
        report = {"query_id": q.query_id if known else None, "type": q.type, "request": q.text,
                  "conditions": [list(c) for c in q.conditions],
                  "candidates": None if cands is None else [ds.items[i].title for i in cands],
                  "response": response, "truncated": ro.truncated[0], "boxed": entries,
                  "answer": [ds.items[i].title for i in answer], "answer_ids": answer, "hallucinated": unmatched,
                  "in_candidates": bool(top) and (cands is None or top.item_id in cands),
                  "satisfied": [[r, v, ok] for (r, v), ok in has.items()],
                  "hit": (top.item_id in q.ground_truth) if (known and top) else None}
        print(self.render(q, cands, report, text if show_prompt else None, known))
        return report

    def render(self, q: Query, cands, rep: dict, prompt: str | None, known: bool) -> str:
        ds = self.ds
        out = [f"request     {q.text}" + (f"   [{q.query_id}, {q.type}]" if known else "")]
        named = "; ".join(f"{r}: {v}" for r, v in q.conditions) or "none"
        out.append(f"{'conditions' if known else 'named':<12}{named}")
        if known:
            out.append("truth       " + "; ".join(ds.items[i].title for i in q.ground_truth[:5])
                       + (f" (+{len(q.ground_truth) - 5} more)" if len(q.ground_truth) > 5 else ""))
        if cands is not None:
            out.append(f"candidates  {len(cands)}: " + " | ".join(ds.items[i].title for i in cands))
        if prompt is not None:
            out += ["prompt", *("  " + ln for ln in prompt.splitlines())]
        out.append("reasoning")
        out += ["  " + ln for ln in rep["response"].strip().splitlines()] or ["  (nothing)"]
        if rep["truncated"]:
            out.append(f"  ... (cut off at {self.s['max_completion_length']} tokens)")
        if rep["boxed"] is None:
            out.append("answer      no \\boxed{} answer (a format failure)")
            return "\n".join(out)
        out.append("answer      \\boxed{" + "; ".join(rep["boxed"]) + "}")
        if not rep["answer"]:
            out.append("matched     nothing in the catalogue (a hallucinated title)")
            return "\n".join(out)
        top = ds.items[rep["answer_ids"][0]]
        where = "a candidate" if rep["in_candidates"] else "NOT among the candidates"
        unmatched = f"; {rep['hallucinated']} other entries unmatched" if rep["hallucinated"] else ""
        out.append(f"matched     {top.title} ({where}){unmatched}")
        attrs = fmt_attributes(top, list(top.attributes))
        out.append(f"            {attrs}" if attrs else "            (no attributes)")
        if q.conditions:
            marks = "  ".join(("yes " if ok else "NO  ") + f"{r}: {v}" for r, v, ok in rep["satisfied"])
            n = sum(ok for *_, ok in rep["satisfied"])
            out.append(f"satisfies   {n}/{len(rep['satisfied'])}: {marks}")
        if known:
            out.append("hit         " + ("yes: a ground-truth item" if rep["hit"] else "no: not a ground-truth item"))
        return "\n".join(out)


# ----------------------------------------------------------------------------- command line


def settings_and_checks(args, train_cfg: dict) -> tuple[dict, Path, Dataset, torch.device]:
    """Every check before the model loads; raises UsageError. Returns (settings, model dir, dataset, device)."""
    s = prompt_settings(args, train_cfg, DEFAULTS)
    if args.query and args.request:
        raise UsageError("give a request or --query QUERY_ID, not both")
    check_prompt_format(s)
    device = pick_device(args.device)
    try:
        model_dir = resolve_model_dir(args.model)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise UsageError(f"--model {args.model}: " + " ".join(str(e).split())) from None
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"--model {args.model}: {model_dir} is not a model directory (no config.json)")
    ds = open_dataset(s["data"], trained_by=args.model if args.data is None and train_cfg.get("data") else None)
    if args.user is not None and not ds.history(args.user) and args.user not in ds.users:
        raise UsageError(f"--user {args.user}: no such user in {s['data']}")
    if args.query and not any(q.query_id == args.query for q in ds.all_queries()):
        split = ", ".join(f"{k}: {v[0].query_id} ..." for k, v in ds.queries.items() if v)
        raise UsageError(f"--query {args.query}: not a query of {s['data']} ({split})")
    return s, model_dir, ds, device


def main(argv=None) -> int:
    train_cfg = checkpoint_config(argv)  # before the parser: --help shows the checkpoint's values
    args = parser(train_cfg).parse_args(argv)
    try:
        s, model_dir, ds, device = settings_and_checks(args, train_cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warning = assumed_settings(args.model, train_cfg, {k: v for k, v in s.items() if getattr(args, k) is None})
    if warning:
        print(warning, file=sys.stderr)
    bot = Assistant(model_dir, ds, s, device)
    if args.query:
        q = next(q for q in ds.all_queries() if q.query_id == args.query)
        bot.ask(q, known=True, show_prompt=args.show_prompt)
        return 0
    if args.request:
        bot.ask(request_query(args.request, ds, bot.vocab, args.user, s["seed"]), known=False,
                show_prompt=args.show_prompt)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{args.model} on {s['data']}: type a request, one per line (Ctrl-D ends)")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if line.strip():
            bot.ask(request_query(line.strip(), ds, bot.vocab, args.user, s["seed"]), known=False,
                    show_prompt=args.show_prompt)
            print()


if __name__ == "__main__":
    sys.exit(main())
