"""What the model sees and what it answers: candidate sets, chat prompts, `\\boxed{}` parsing.

For each query: draw the candidate items (the primary ground truth + negatives), render the
request through the tokenizer's chat template, and read the model's final `\\boxed{…}` back
into a ranked list of titles, then (with titles.TitleIndex) into catalogue item ids.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .data import Dataset, Item, Query
from .querygen import fmt_conditions
from .titles import TitleIndex

SYSTEM = "You are a recommendation assistant."

# ----------------------------------------------------------------------------- candidates


# How the negatives of a candidate set are drawn (see CandidateSampler). Ground-truth items come
# from real histories and are popular; uniform negatives are mostly obscure, so on MovieLens
# "name the most-rated candidate" scores hit@1 0.39 against 0.05 for chance. Popularity-matched
# negatives bring that shortcut down to chance (measured in BENCHMARKS.md), hence the default.
NEGATIVE_MODES = ("uniform", "popularity", "matched", "hard")
DEFAULT_NEGATIVES = "matched"
MATCH_WINDOW = 2  # "matched": each side's negatives come from the nearest 2 x (negatives per set) on that side


class CandidateSampler:
    """Draws candidate sets for a dataset; the (relation, value) -> items index and the
    popularity strata are built once.

    A candidate set is the primary ground-truth item `query.ground_truth[0]` plus negatives,
    shuffled. A negative must not also be a correct answer to the request, so the negative
    pool leaves out:
      - every ground-truth item;
      - every item that has *all* of the query's conditions (when it has any) — for explicit,
        implicit and misinformed queries the ground truth already is that set; for interest
        queries it is not (their ground truth is what the user watched next), and an unlisted
        item that fits the whole request would be a "negative" the model is right to pick.
        Demographic queries are the exception: their conditions only describe what the
        group's favourites share, they are not part of the request;
      - the anchor item of a hop or of a false claim: it has the resolved condition itself,
        so as a negative it would look right, yet the request asks for *other* items.
    Hard negatives share some but not all of the conditions; for a misinformed query an item
    that carries the false claimed value ("directed by <wrong person>") is hard as well: it
    is what a model that believes the claim would pick.

    Negative modes (`negatives=`), all within that pool:
      - "uniform": uniformly from the pool (the sampler as it always was, draw for draw).
      - "popularity": from the ground-truth item's popularity stratum. The catalogue is sorted
        by interaction count and cut into nested quantile bins (halves, quarters, eighths, ...
        down to bins of one or two items); the negatives come uniformly from the narrowest bin
        around the ground-truth item that still holds enough allowed items, i.e. a bin that
        runs dry widens to the neighbouring bin it merges with. Nested bins, not a window
        centred on the answer: in a centred window the answer would always sit at the median
        popularity of its set, a shortcut of its own.
        Kept draw for draw for the figures read while it was the default (until issue 23). Its
        residue: an answer's place inside its bin is fixed by the bin grid, so an answer at the
        top of its bin is the most popular candidate of every set drawn for it. Over many answers
        that nearly averages out (MovieLens, 8 candidates: popularity baseline 0.144 against
        chance 0.125); over few answers it does not: on the split by component MovieLens' 64
        held-out demographic queries share six answers, and the baseline reads 0.20 on them at
        20 candidates (chance 0.05).
      - "matched" (default): popularity-matched with the answer's rank in its set uniform by
        construction. j ~ U{0..M-1} of the M-1 negatives have more interactions than the answer,
        drawn uniformly from the nearest MATCH_WINDOW x (M-1) allowed items above it, the others
        from the nearest as many below it; items with exactly as many interactions as the answer
        are left out (a tie is broken arbitrarily by a ranking, which would move the answer's
        rank); a side that runs short (an answer at the very top or bottom of the catalogue)
        leaves its remainder to the other. So "name the k-th most popular candidate" is right
        1/M of the time for every k, whatever the answer and however few answers a split has.
      - "hard": "uniform" with hard negatives on by default: `hard_negatives=0` means half of
        the negatives, rounded up (as many as the hard pool holds).
    `hard_negatives=H` works in every mode: H of the negatives (fewer when the hard pool runs
    short) come from the hard pool, the rest from the whole pool; in "popularity" and "matched"
    modes both draws are popularity-matched (in "matched" the j negatives above the answer are
    spread over the two draws at random, so its rank in the whole set stays uniform).
    """

    def __init__(self, dataset: Dataset):
        self.item_ids = dataset.item_ids
        self.item_index = dataset.item_index
        postings: dict[tuple[str, str], list[int]] = {}
        for k, item in enumerate(dataset.items.values()):
            for rel, values in item.attributes.items():
                for v in values:
                    postings.setdefault((rel, v), []).append(k)
        # (relation, value) -> sorted item rows; per-query work is then a few array ops.
        self.postings = {key: np.asarray(rows, np.int64) for key, rows in postings.items()}
        self._empty = np.zeros(0, np.int64)
        # Popularity strata. by_popularity [I]: item rows, least interacted first (ties: catalogue
        # order, so the strata are deterministic); rank [I]: each row's position in it. Level l
        # cuts those positions into 2^l bins, edges [2^l + 1]; each bin is the union of two bins
        # of level l + 1, so widening a bin means merging it with its neighbour.
        n = len(self.item_ids)
        self.counts = dataset.popularity  # [I] interactions per item
        self.by_popularity = np.argsort(dataset.popularity, kind="stable")
        self.popularity_rank = np.empty(n, np.int64)
        self.popularity_rank[self.by_popularity] = np.arange(n)
        levels = int(np.log2(n)) if n > 1 else 0  # finest level: bins of 1-2 items
        self.strata_edges = [(np.arange(2 ** lv + 1) * n) // 2 ** lv for lv in range(levels + 1)]

    def pools(self, query: Query) -> tuple[np.ndarray, np.ndarray]:
        """(allowed [I] bool: may be a negative, hard [I] bool: allowed and a hard negative)."""
        n = len(self.item_ids)
        hits = np.zeros(n, np.int32)  # how many of the query's conditions each item has
        for cond in query.conditions:
            hits[self.postings.get(tuple(cond), self._empty)] += 1
        allowed = np.ones(n, bool)
        # A demographic query's "conditions" only describe its ground truth (what the group's
        # favourites share); nobody asked for them, so items that have them stay negatives.
        if query.conditions and query.type != "demographic":
            allowed[hits == len(query.conditions)] = False
        allowed[[self.item_index[i] for i in query.ground_truth]] = False
        for anchor in (query.hop, query.misinformation):
            if anchor is not None:
                allowed[self.item_index[anchor.item_id]] = False
        hard = hits > 0
        if query.misinformation is not None:
            m = query.misinformation
            hard[self.postings.get((m.relation, m.wrong_value), self._empty)] = True
        return allowed, hard & allowed

    def stratum(self, pool: np.ndarray, row: int, k: int) -> np.ndarray:
        """The rows of `pool` ([I] bool) in the narrowest popularity bin around item `row` that
        holds at least k of them; all of `pool` when no bin does. Sorted by popularity."""
        ranked = pool[self.by_popularity]  # [I] bool, least popular first
        cum = np.concatenate(([0], np.cumsum(ranked)))  # [I + 1] pool items before each position
        r = self.popularity_rank[row]
        for edges in reversed(self.strata_edges):  # narrowest bins first; level 0 is everything
            j = np.searchsorted(edges, r, side="right") - 1
            lo, hi = edges[j], edges[j + 1]
            if cum[hi] - cum[lo] >= k:
                break
        return self.by_popularity[lo:hi][ranked[lo:hi]]

    def beside(self, pool: np.ndarray, row: int, above: int, below: int, window: int,
               rng: random.Random) -> list[int]:
        """`above` rows of `pool` ([I] bool) with more interactions than item `row` and `below` with
        fewer, each side drawn uniformly from its `window` pool items nearest to `row` in popularity
        ("matched" negatives). Items with as many interactions as `row` are left out: a popularity
        ranking can only break such a tie arbitrarily, so they would push the answer's rank off
        uniform. A side with fewer than asked gives all it has and leaves the rest to the other;
        fewer than above + below come back when the two sides together hold fewer."""
        ranked = self.by_popularity[pool[self.by_popularity]]  # pool rows, least popular first
        counts, c = self.counts[ranked], self.counts[row]
        lower, upper = ranked[counts < c][::-1], ranked[counts > c]  # each side nearest first
        k = above + below
        above = min(above, len(upper))
        below = min(k - above, len(lower))
        above = min(k - below, len(upper))
        picks = []
        for side, n in ((upper, above), (lower, below)):
            near = side[:max(window, n)]
            picks += [int(near[j]) for j in rng.sample(range(len(near)), n)]
        return picks

    def sample(self, query: Query, num_candidates: int = 20, hard_negatives: int = 0,
               seed: int = 0, negatives: str = DEFAULT_NEGATIVES) -> list[str] | None:
        """Candidate item ids, shuffled; None when num_candidates == 0 (open generation).

        `negatives` is one of NEGATIVE_MODES (see the class docstring). Deterministic per
        (seed, query_id) in every mode: the RNG is seeded with that string (str seeds are hashed
        with SHA-512 by `random`, so PYTHONHASHSEED plays no part). Fewer than `num_candidates`
        come back only when the catalogue has too few allowed items.
        """
        if negatives not in NEGATIVE_MODES:
            raise ValueError(f"unknown negatives mode {negatives!r} (choose from {', '.join(NEGATIVE_MODES)})")
        if num_candidates == 0:
            return None
        rng = random.Random(f"{seed}:{query.query_id}")
        allowed, hard = self.pools(query)
        n_neg = num_candidates - 1
        if negatives == "hard" and hard_negatives == 0:
            hard_negatives = (n_neg + 1) // 2
        answer = self.item_index[query.ground_truth[0]]

        def draw(pool: np.ndarray, k: int) -> list[int]:
            """k rows of `pool` (fewer if it runs short), without replacement."""
            rows = self.stratum(pool, answer, k) if negatives == "popularity" and k > 0 else np.flatnonzero(pool)
            # rng.sample over a range is O(k), not O(catalogue): only the picks are materialised.
            return [int(rows[j]) for j in rng.sample(range(len(rows)), min(k, len(rows)))]

        if negatives == "matched":
            # j negatives more popular than the answer, j uniform: its rank in the set is uniform.
            # Which of them are hard is random too, so the two draws together keep that rank.
            j = rng.randint(0, n_neg)
            up = [True] * j + [False] * (n_neg - j)
            rng.shuffle(up)
            h = min(hard_negatives, n_neg)
            window = MATCH_WINDOW * n_neg
            picks = self.beside(hard, answer, sum(up[:h]), h - sum(up[:h]), window, rng)
            hard[picks] = False
            picks += draw(hard, h - len(picks))  # a small hard pool: its items tied with the answer too
            allowed[picks] = False
            above = max(0, sum(up) - sum(self.counts[r] > self.counts[answer] for r in picks))
            rest = n_neg - len(picks)
            picks += self.beside(allowed, answer, min(above, rest), rest - min(above, rest), window, rng)
            allowed[picks] = False
            picks += draw(allowed, n_neg - len(picks))  # a catalogue too small: the answer's ties too
        else:
            picks = draw(hard, min(hard_negatives, n_neg))
            allowed[picks] = False
            picks += draw(allowed, n_neg - len(picks))
        out = [query.ground_truth[0]] + [self.item_ids[r] for r in picks]
        rng.shuffle(out)
        return out


def build_candidates(query: Query, dataset: Dataset, *, num_candidates: int = 20, hard_negatives: int = 0,
                     seed: int = 0, negatives: str = DEFAULT_NEGATIVES) -> list[str] | None:
    """One query's candidate ids (see CandidateSampler). Builds the index each call: in a loop
    over many queries, make one `CandidateSampler(dataset)` and call `.sample`."""
    return CandidateSampler(dataset).sample(query, num_candidates, hard_negatives, seed, negatives)


# ----------------------------------------------------------------------------- prompt


def fmt_attributes(item: Item, relations: Sequence[str]) -> str:
    """'genre: War, Drama; starring: Tom Hanks, Matt Damon' — the listed relations, in that order."""
    return "; ".join(f"{r}: {', '.join(item.attributes[r])}" for r in relations if item.attributes.get(r))


def candidate_line(item: Item, relations: Sequence[str] = ()) -> str:
    """'Saving Private Ryan (1998) | genre: War, Drama; starring: Tom Hanks, Matt Damon'."""
    attrs = fmt_attributes(item, relations)
    return f"{item.title} | {attrs}" if attrs else item.title


def answer_instruction(answer_size: int = 1) -> str:
    if answer_size == 1:
        return "Reason one step per line, then finish with \\boxed{Title (Year)}."
    return (f"Reason one step per line, then finish with your {answer_size} best titles, best first: "
            f"\\boxed{{Title (Year); Title (Year); ...}}.")


def shown_relations(query: Query, show_attributes: Sequence[str]) -> tuple[str, ...]:
    """The relations listed beside each candidate. "auto" stands for the relations the request
    is about (its conditions; none for a demographic query, whose conditions nobody asked for):
    the facts a reader needs, in a fraction of the tokens of listing everything."""
    out: list[str] = []
    for rel in show_attributes:
        if rel == "auto":
            out += [r for r, _ in query.conditions] if query.type != "demographic" else []
        else:
            out.append(rel)
    return tuple(dict.fromkeys(out))


def build_messages(query: Query, dataset: Dataset, candidates: Sequence[str] | None, *, history_len: int = 0,
                   show_attributes: tuple[str, ...] = (), answer_size: int = 1,
                   request_last: bool = False, examples: int = 0, examples_from: int = 0) -> list[dict[str, str]]:
    """[system, (user, assistant) x examples, user] chat messages for one query (see `render_prompt`).

    The user message: the request; the last `history_len` titles of `query.history`; the
    candidates one per line (none in open generation); the answer instruction. Short on
    purpose: a tiny model must cope with it and CPU time grows with prompt length.
    request_last: the candidates first, then the request, next to where the answer starts. The
    answer begins by restating what the request asks for; a model trained from scratch learns to
    copy those values much sooner when they are the nearest of their kind, not 200 tokens back
    behind eight candidate lines full of other genres and names (BENCHMARKS.md, offline demo).
    examples: that many worked examples first (`example_turns`), the format shown rather than taught;
    examples_from: drawn per query from the first that many of the pool (0: the first `examples`).
    """
    shots = example_turns(query, dataset, examples, len(candidates) if candidates is not None else 0,
                          history_len=history_len, show_attributes=show_attributes, request_last=request_last,
                          examples_from=examples_from)
    return [{"role": "system", "content": SYSTEM}, *shots, _request(query, dataset, candidates, history_len,
                                                                     show_attributes, answer_size, request_last)]


def _request(query: Query, dataset: Dataset, candidates, history_len, show_attributes, answer_size,
             request_last) -> dict[str, str]:
    """The user message of `build_messages`."""
    items = dataset.items
    lines = [f"Request: {query.text}"]
    recent = query.history[-history_len:] if history_len > 0 else []
    if recent:
        lines.append("Recently watched: " + "; ".join(items[i].title for i in recent))
    if candidates is not None:
        relations = shown_relations(query, show_attributes)
        listed = ["Candidates:"] + [candidate_line(items[i], relations) for i in candidates]
        lines = listed + lines if request_last else lines + listed
    lines.append(answer_instruction(answer_size))
    return {"role": "user", "content": "\n".join(lines)}


# Seed of the worked examples' candidate sets: fixed, so every prompt of every run shows the same ones.
EXAMPLE_SEED = 12345
_EXAMPLE_POOLS: dict[tuple[int, int], tuple[Dataset, list[tuple[Query, list[str] | None]]]] = {}


def example_pool(dataset: Dataset, num_candidates: int, size: int) -> list[tuple[Query, list[str] | None]]:
    """The first `size` worked examples of a dataset: training queries taken one type at a time
    (explicit, implicit, misinformed, interest, demographic, then the second of each...), each with
    a fixed candidate set of `num_candidates` (0: open generation). Built once per dataset."""
    key = (id(dataset), num_candidates)
    if key not in _EXAMPLE_POOLS or len(_EXAMPLE_POOLS[key][1]) < size:
        from .data import QUERY_TYPES
        by_type = [[q for q in dataset.queries.get("train", []) if q.type == t] for t in QUERY_TYPES]
        order = [qs[i] for i in range(max(map(len, by_type), default=0)) for qs in by_type if i < len(qs)][:size]
        sampler = CandidateSampler(dataset) if num_candidates else None
        pool = [(q, sampler.sample(q, num_candidates, 0, EXAMPLE_SEED) if sampler else None) for q in order]
        _EXAMPLE_POOLS[key] = (dataset, pool)  # holding the dataset keeps its id from being reused
    return _EXAMPLE_POOLS[key][1][:size]


def example_turns(query: Query, dataset: Dataset, k: int, num_candidates: int, *, history_len: int = 0,
                  show_attributes: tuple[str, ...] = (), request_last: bool = False,
                  examples_from: int = 0) -> list[dict[str, str]]:
    """K worked examples as earlier chat turns: a training query's request in the prompt's own format,
    then its gold reasoning and box as the assistant's answer (`render_sft_target`). This is how the
    authors' release starts RL without SFT: the answer format comes from the prompt.

    examples_from 0: the first K examples of the pool, the same for every prompt (a query is never its own
    example: the next one takes its place). examples_from P > K: K of the first P, drawn by the query's id
    (the same prompt every time it is asked), never the query itself. Why: with one fixed example, RL
    from an instruct model learnt the format by boxing that example's answer for every request
    (docs/experiments/study.md); examples that differ per prompt leave no single title to copy."""
    if k <= 0:
        return []
    if examples_from > k:
        pool = example_pool(dataset, num_candidates, examples_from)
        others = [(q, c) for q, c in pool if q.query_id != query.query_id]
        picks = random.Random(f"examples:{query.query_id}").sample(others, min(k, len(others)))
    else:
        picks = [(q, c) for q, c in example_pool(dataset, num_candidates, k + 1) if q.query_id != query.query_id][:k]
    turns = []
    for q, cands in picks:
        turns.append(_request(q, dataset, cands, history_len, show_attributes, 1, request_last))
        turns.append({"role": "assistant", "content": render_sft_target(q, dataset)})
    return turns


def render_prompt(query: Query, dataset: Dataset, candidates: Sequence[str] | None, tokenizer, *, history_len: int = 0,
                  show_attributes: tuple[str, ...] = (), answer_size: int = 1, request_last: bool = False,
                  examples: int = 0, examples_from: int = 0) -> str:
    """The prompt text through the tokenizer's chat template, ending where the assistant starts."""
    messages = build_messages(query, dataset, candidates, history_len=history_len, show_attributes=show_attributes,
                              answer_size=answer_size, request_last=request_last, examples=examples,
                              examples_from=examples_from)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# The noun a fact sentence uses for a relation ("the director of X is ..."), as the gold reasoning does.
_FACT_NOUN = {"director": "director", "writer": "writer", "starring": "lead actor", "genre": "genre",
              "country": "country", "language": "language", "decade": "decade", "year": "year"}


def item_facts(item: Item, rng: random.Random) -> str:
    """One item's knowledge-graph facts as short sentences, in a random order, in the phrasings the
    gold reasoning uses ("Its writer is Bea Pike.", "X has genre: Horror."): what a pretrained LLM
    knows about a film, for a model trained from scratch to learn (SFT's fact rows)."""
    facts = []
    for rel, values in item.attributes.items():
        if not values:
            continue
        noun = _FACT_NOUN.get(rel, rel)
        facts.append(rng.choice([f"{item.title} has {rel}: {', '.join(values)}.",
                                 f"The {noun} of {item.title} is {values[0]}."]))
    rng.shuffle(facts)
    return " ".join(facts)


def render_sft_target(query: Query, dataset: Dataset) -> str:
    """The gold reasoning the SFT warm start imitates (answer size 1).

    Builders write `gold_reasoning`; for a query without one (e.g. converted RecBench+
    records) the same style is rebuilt from the conditions and the primary item.
    """
    if query.gold_reasoning:
        return query.gold_reasoning
    item = dataset.items[query.ground_truth[0]]
    steps = [f"Needed: {fmt_conditions(query.conditions)}.", f"{item.title} has {fmt_conditions(query.conditions)}."]
    return "\n".join((steps if query.conditions else []) + [f"\\boxed{{{item.title}}}"])


# ----------------------------------------------------------------------------- answer parsing

# What may follow "\boxed": spaces, then the opening brace. `\\boxed{` matches too (the last
# backslash counts). Each check scans only the spaces after one "\boxed", so finding the last
# box is linear in the text length whatever the text.
_BOX_OPEN = re.compile(r"\s*\{")
_BRACE = re.compile(r"[{}]")
_YEAR_IN_BRACES = re.compile(r"\{\s*(\d{4})\s*\}")  # "Se7en {1995}" -> "Se7en (1995)"
_LATEX = re.compile(r"\\[A-Za-z]*")  # "\text", "\textit", and the backslash of "\&"
# List numbering and bullets at the start of an entry: "1. ", "2) ", "#3 ", "- ", "• ".
_NUMBERING = re.compile(r"^(?:\d{1,3}[.)]|#\d{1,3}|[-\u2022])\s+")
# Wrapping an entry may carry: spaces, markdown emphasis, quotes of every kind.
_WRAP = " \t\r\n*_\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"


def _box_content(text: str) -> str | None:
    """The text inside the last `\\boxed{…}`, braces balanced; None when there is no box.

    An unclosed box runs to the end of its line (the model was cut off, or forgot the brace).
    """
    end = len(text)
    while True:
        at = text.rfind("\\boxed", 0, end)
        if at < 0:
            return None
        opening = _BOX_OPEN.match(text, at + len("\\boxed"))
        if opening:
            break
        end = at  # "\boxed" without a brace is not a box: look further back
    start, depth = opening.end(), 1
    for m in _BRACE.finditer(text, start):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return text[start:m.start()]
    end = text.find("\n", start)
    return text[start:] if end < 0 else text[start:end]


def clean_entry(entry: str) -> str:
    """'**1. "The Matrix (1999)".**' -> 'The Matrix (1999)'."""
    s = _NUMBERING.sub("", entry.strip(_WRAP))
    return s.rstrip(_WRAP + ".").lstrip(_WRAP)


def parse_answer(text: str) -> list[str] | None:
    """The titles in the last `\\boxed{…}`, in order; None when there is no box (format failure).

    'Step 1 ...\\n\\boxed{Heat (1995); **Se7en {1995}**}' -> ['Heat (1995)', 'Se7en (1995)'].
    Inner braces are kept balanced and then dropped (a braced 4-digit year becomes "(year)"),
    LaTeX commands such as `\\text{…}` are unwrapped, entries are split on ';' and cleaned
    (`clean_entry`), empty ones dropped — so an empty box gives []. Never raises on a str;
    linear time on any input.
    """
    content = _box_content(text)
    if content is None:
        return None
    if "{" in content or "\\" in content:  # most answers have neither: skip the two regex passes
        content = _LATEX.sub("", _YEAR_IN_BRACES.sub(r"(\1)", content)).replace("{", "").replace("}", "")
    entries = (clean_entry(e) for e in content.split(";"))
    return [e for e in entries if e]


def match_answer(entries: Sequence[str], index: TitleIndex,
                 candidates: Sequence[str] | None = None) -> tuple[list[str], int]:
    """Entries -> (item ids in answer order, repeats dropped; number of unmatched entries).

    Each entry is looked up among the candidates first, then in the whole catalogue
    (TitleIndex.match). An unmatched entry is a hallucination (or an ambiguous title).
    """
    ids: list[str] = []
    unmatched = 0
    for e in entries:
        hit = index.match(e, candidates)
        if hit is None:
            unmatched += 1
        elif hit not in ids:
            ids.append(hit)
    return ids, unmatched


# ----------------------------------------------------------------------------- ends of a turn


def turn_end_id(tokenizer) -> int:
    """The token the chat template closes an assistant turn with: <|im_end|> for ChatML (Qwen,
    SmolLM2), <|eot_id|> for Llama-3.x — not necessarily `eos_token` (Llama-3's is
    <|end_of_text|>). Found by rendering a short conversation and reading what follows the
    assistant's text; the tokenizer's EOS when the template shows nothing there."""
    probe = "rerec probe answer"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
                                             tokenize=False)
        after = text[text.rindex(probe) + len(probe):]
        ids = tokenizer.encode(after, add_special_tokens=False)
    except Exception:  # a template that rejects this conversation: fall back to EOS
        ids = []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    for i in ids:
        if i in special:
            return int(i)
    return int(tokenizer.eos_token_id)


def eos_ids(tokenizer, model_config: dict, model_dir=None) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS, the end-of-turn token, and the EOS id(s)
    of config.json and generation_config.json (Qwen2.5 lists 151645 and 151643 there)."""
    ids = {tokenizer.eos_token_id, turn_end_id(tokenizer)}
    sources = [model_config]
    if model_dir is not None:
        gen = Path(model_dir) / "generation_config.json"
        if gen.exists():
            sources.append(json.loads(gen.read_text()))
    for src in sources:
        e = src.get("eos_token_id")
        ids.update(e if isinstance(e, list) else [e])
    return sorted(int(i) for i in ids if i is not None)
