"""Candidate sets, prompt rendering and \\boxed{} answer parsing (rerec_mini/prompts.py)."""

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rerec_mini.data import Item, load_dataset
from rerec_mini.prompts import (DEFAULT_NEGATIVES, NEGATIVE_MODES, CandidateSampler, build_candidates, build_messages,
                                answer_instruction, candidate_line, match_answer, parse_answer, render_prompt,
                                render_sft_target, shown_relations)
from rerec_mini.titles import TitleIndex

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "synth-movies"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def ds():
    return load_dataset(BUNDLED)


@pytest.fixture(scope="module")
def sampler(ds):
    return CandidateSampler(ds)


def by_type(ds, qtype, n=None):
    qs = [q for q in ds.all_queries() if q.type == qtype]
    return qs if n is None else qs[:n]


# ----------------------------------------------------------------------------- candidates


def _has_all(item, conditions):
    return all(item.has(r, v) for r, v in conditions)


@pytest.mark.parametrize("qtype", ["explicit", "implicit", "misinformed", "interest", "demographic"])
def test_candidates_contain_one_answer_and_no_other_correct_item(ds, sampler, qtype):
    for q in by_type(ds, qtype, 40):
        c = sampler.sample(q, num_candidates=20, seed=3)
        assert len(c) == 20 and len(set(c)) == 20
        assert c.count(q.ground_truth[0]) == 1
        negatives = [i for i in c if i != q.ground_truth[0]]
        assert not set(negatives) & set(q.ground_truth)
        if q.conditions and qtype != "demographic":  # demographic conditions are not requested
            assert not any(_has_all(ds.items[i], q.conditions) for i in negatives)
        for anchor in (q.hop, q.misinformation):
            if anchor is not None:
                assert anchor.item_id not in negatives


def test_candidates_deterministic_and_shuffled(ds, sampler):
    qs = ds.queries["train"][:50]
    a = [sampler.sample(q, seed=0) for q in qs]
    assert a == [sampler.sample(q, seed=0) for q in qs]
    assert a == [build_candidates(q, ds, seed=0) for q in qs[:50]]
    assert a != [sampler.sample(q, seed=1) for q in qs]
    # the answer is not always at the same position
    assert len({c.index(q.ground_truth[0]) for c, q in zip(a, qs)}) > 5


def test_candidates_independent_of_hash_seed(ds, sampler):
    q = ds.queries["test"][7]
    code = ("from rerec_mini.data import load_dataset; from rerec_mini.prompts import NEGATIVE_MODES, build_candidates;"
            f"ds = load_dataset({str(BUNDLED)!r}); q = ds.queries['test'][7];"
            "[print(','.join(build_candidates(q, ds, hard_negatives=5, seed=4, negatives=m))) for m in NEGATIVE_MODES]")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.split()
    assert [line.split(",") for line in out] == [sampler.sample(q, hard_negatives=5, seed=4, negatives=m)
                                                 for m in NEGATIVE_MODES]


def test_open_generation_and_small_sets(ds, sampler):
    q = ds.queries["train"][0]
    assert sampler.sample(q, num_candidates=0) is None
    assert build_candidates(q, ds, num_candidates=0) is None
    assert sampler.sample(q, num_candidates=1) == [q.ground_truth[0]]
    assert len(sampler.sample(q, num_candidates=5)) == 5


def test_hard_negatives_share_some_but_not_all_conditions(ds, sampler):
    queries = [q for q in by_type(ds, "explicit") if len(q.conditions) >= 2][:30]
    for q in queries:
        allowed, hard = sampler.pools(q)
        c = sampler.sample(q, num_candidates=20, hard_negatives=6, seed=1)
        assert len(c) == 20
        negatives = [ds.items[i] for i in c if i != q.ground_truth[0]]
        n_hard = sum(any(it.has(*cond) for cond in q.conditions) for it in negatives)
        # at least min(6, available) share a condition; none share all of them
        assert n_hard >= min(6, int(hard.sum()))
        assert not any(_has_all(it, q.conditions) for it in negatives)
    # random negatives rarely share a condition: hard_negatives changes the mix
    q = max(queries, key=lambda q: sampler.pools(q)[1].sum())
    easy = [ds.items[i] for i in sampler.sample(q, hard_negatives=0, seed=1) if i != q.ground_truth[0]]
    hard = [ds.items[i] for i in sampler.sample(q, hard_negatives=19, seed=1) if i != q.ground_truth[0]]
    share = lambda its: sum(any(it.has(*c) for c in q.conditions) for it in its)  # noqa: E731
    assert share(hard) > share(easy)


def test_misinformed_hard_negatives_carry_the_false_value(ds, sampler):
    for q in by_type(ds, "misinformed", 20):
        m = q.misinformation
        _, hard = sampler.pools(q)
        wrong = [i for i in ds.item_ids if ds.items[i].has(m.relation, m.wrong_value)]
        assert all(hard[ds.item_index[i]] for i in wrong if i != m.item_id and i not in q.ground_truth
                   and not _has_all(ds.items[i], q.conditions))
        c = sampler.sample(q, hard_negatives=len(wrong), seed=0)
        assert len(c) == 20
        # with one condition, the only hard negatives are the false claim's items
        if len(q.conditions) == 1:
            picked = [i for i in c if ds.items[i].has(m.relation, m.wrong_value)]
            assert len(picked) == min(len(wrong), 19, int(hard.sum()))


def test_too_few_hard_negatives_fall_back_to_random(ds, sampler):
    q = next(q for q in by_type(ds, "explicit") if len(q.conditions) == 1)
    _, hard = sampler.pools(q)
    assert hard.sum() == 0  # one condition: nothing shares "some but not all"
    assert len(sampler.sample(q, hard_negatives=10)) == 20


# ----------------------------------------------------------------------------- negative modes


def _negatives(q, c):
    return [i for i in c if i != q.ground_truth[0]]


def _assert_no_correct_negative(ds, q, c):
    """Every exclusion rule of CandidateSampler: no ground truth, no item with all requested
    conditions, no hop / false-claim anchor among the negatives; the answer once; no repeats."""
    neg = _negatives(q, c)
    assert c.count(q.ground_truth[0]) == 1 and len(set(c)) == len(c)
    assert not set(neg) & set(q.ground_truth)
    if q.conditions and q.type != "demographic":
        assert not any(_has_all(ds.items[i], q.conditions) for i in neg)
    for anchor in (q.hop, q.misinformation):
        if anchor is not None:
            assert anchor.item_id not in neg


def test_negative_modes_constants():
    assert NEGATIVE_MODES == ("uniform", "popularity", "matched", "hard") and DEFAULT_NEGATIVES == "matched"


@pytest.mark.parametrize("mode", NEGATIVE_MODES)
def test_no_negative_is_a_correct_answer_in_any_mode(ds, sampler, mode):
    for q in ds.all_queries():  # all 1000 queries of the synthetic world, with and without hard negatives
        for h in (0, 5):
            c = sampler.sample(q, 20, h, seed=2, negatives=mode)
            assert len(c) == 20
            _assert_no_correct_negative(ds, q, c)


@settings(max_examples=150, deadline=None)
@given(k=st.integers(0, 999), m=st.integers(1, 700), h=st.integers(0, 30), seed=st.integers(0, 10**6),
       mode=st.sampled_from(NEGATIVE_MODES))
def test_candidate_sets_property(ds, sampler, k, m, h, seed, mode):
    """Any query, size (up to more than the catalogue), hard count, seed and mode: the exclusion
    rules hold; the set is as large as asked or holds every allowed item; the same inputs
    give the same set."""
    q = ds.all_queries()[k]
    c = sampler.sample(q, m, h, seed, mode)
    _assert_no_correct_negative(ds, q, c)
    allowed, _ = sampler.pools(q)
    assert len(c) == min(m, int(allowed.sum()) + 1)
    assert c == sampler.sample(q, m, h, seed, mode)


@pytest.mark.parametrize("mode", NEGATIVE_MODES)
def test_modes_deterministic_per_seed_and_query(ds, sampler, mode):
    qs = ds.queries["test"][::4]
    a = [sampler.sample(q, seed=0, negatives=mode) for q in qs]
    assert a == [sampler.sample(q, seed=0, negatives=mode) for q in reversed(qs)][::-1]  # call order plays no part
    assert a == [CandidateSampler(ds).sample(q, seed=0, negatives=mode) for q in qs]  # nor the sampler object
    assert a[:3] == [build_candidates(q, ds, seed=0, negatives=mode) for q in qs[:3]]
    assert a != [sampler.sample(q, seed=1, negatives=mode) for q in qs]
    assert len({c.index(q.ground_truth[0]) for c, q in zip(a, qs)}) > 5  # shuffled


def test_unknown_negatives_mode_names_the_choices(ds, sampler):
    q = ds.queries["test"][0]
    with pytest.raises(ValueError, match="'popular'.*uniform, popularity, matched, hard"):
        sampler.sample(q, negatives="popular")
    with pytest.raises(ValueError, match="choose from"):  # checked even in open generation
        build_candidates(q, ds, num_candidates=0, negatives="Uniform")


def test_uniform_and_popularity_modes_are_the_old_draws(ds, sampler):
    """Candidate sets of runs made before the modes existed (issue 15), and of runs made with the
    "popularity" default before issue 23, are reproducible: the query that was the bundled set's
    test-explicit-00000 (a draw depends on its id and content, not on the split it sits in)."""
    text = "Recommend me movies directed by Ada Bell, from the 1960s, in English, please."
    q = replace(next(x for x in ds.all_queries() if x.text == text), query_id="test-explicit-00000")
    assert sampler.sample(q, 20, 0, 0, "popularity")[:10] == [
        "m0580", "m0220", "m0084", "m0273", "m0260", "m0027", "m0391", "m0405", "m0262", "m0032"]
    assert sampler.sample(q, 20, 0, 0, "uniform") == [
        "m0113", "m0128", "m0084", "m0493", "m0484", "m0075", "m0487", "m0450", "m0367", "m0373",
        "m0570", "m0514", "m0501", "m0545", "m0551", "m0549", "m0163", "m0350", "m0370", "m0371"]
    assert sampler.sample(q, 20, 5, 0, "uniform")[:5] == ["m0096", "m0129", "m0084", "m0498", "m0488"]


def test_popularity_negatives_come_from_the_answers_stratum(ds, sampler):
    """The median popularity-rank gap between the answer and its negatives, as a share of the
    catalogue: about a third for uniform negatives, a few percent when matched."""
    rank, n = sampler.popularity_rank, len(ds.item_ids)

    def gap(mode):
        return np.median([np.median([abs(rank[ds.item_index[i]] - rank[ds.item_index[q.ground_truth[0]]]) / n
                                     for i in _negatives(q, sampler.sample(q, 20, 0, 0, mode))])
                          for q in ds.queries["test"]])

    assert gap("popularity") < 0.05 < 0.2 < gap("uniform")
    # the strata are quantile bins of the whole catalogue: ranks sort the interaction counts
    assert np.all(np.diff(ds.popularity[sampler.by_popularity]) >= 0)


@pytest.mark.parametrize("hard_negatives", [0, 3])
def test_matched_negatives_put_the_answer_at_a_uniform_rank(ds, sampler, hard_negatives):
    """"matched" (the default): the number of negatives with more interactions than the answer is
    uniform over 0..M-1 (so is the answer's rank for a popularity ranking), none ties the answer,
    and they sit near it in popularity. Queries whose answer has fewer than M-1 allowed items above
    it (the top of the catalogue) are left out: there the rank cannot reach the top places; so are
    those whose hard pool is too small to give its negatives without the answer's ties."""
    M, counts = 8, ds.popularity
    above = {}
    for t in range(10):
        for q in ds.all_queries()[::2]:
            a = ds.item_index[q.ground_truth[0]]
            allowed, hard = sampler.pools(q)
            if (allowed & (counts > counts[a])).sum() < M - 1 or (allowed & (counts < counts[a])).sum() < M - 1 \
                    or (hard & (counts != counts[a])).sum() < hard_negatives:  # (a hard pool that small lends ties)
                continue
            negs = [ds.item_index[i] for i in _negatives(q, sampler.sample(q, M, hard_negatives, t, "matched"))]
            assert len(negs) == M - 1 and all(counts[n] != counts[a] for n in negs)
            j = sum(counts[n] > counts[a] for n in negs)
            above[j] = above.get(j, 0) + 1
    n = sum(above.values())
    assert n > 3000 and sorted(above) == list(range(M))
    assert all(abs(v / n - 1 / M) < 0.025 for v in above.values()), above  # ~4 standard errors
    # bins, for comparison, are not uniform: an answer's place in its bin is fixed by the grid
    rank, size = sampler.popularity_rank, len(ds.item_ids)

    def gap(mode):
        return np.median([np.median([abs(rank[ds.item_index[i]] - rank[ds.item_index[q.ground_truth[0]]]) / size
                                     for i in _negatives(q, sampler.sample(q, 20, 0, 0, mode))])
                          for q in ds.queries["test"]])

    assert gap("matched") < 0.05 < 0.2 < gap("uniform")


def test_beside_takes_each_side_from_its_nearest_window_and_lends_what_it_lacks(ds, sampler):
    import random
    counts, order = ds.popularity, sampler.by_popularity  # least interacted first
    everything = np.ones(len(order), bool)
    mid = int(order[len(order) // 2])
    rows = sampler.beside(everything, mid, 3, 4, 10, random.Random(0))
    up = [r for r in rows if counts[r] > counts[mid]]
    down = [r for r in rows if counts[r] < counts[mid]]
    assert len(rows) == 7 and len(up) == 3 and len(down) == 4  # and none ties the middle item
    assert set(up) <= set(order[counts[order] > counts[mid]][:10])  # the 10 nearest above
    assert set(down) <= set(order[counts[order] < counts[mid]][::-1][:10])  # the 10 nearest below
    top = int(order[-1])
    rows = sampler.beside(everything, top, 5, 2, 10, random.Random(0))  # nothing above the top: all below
    assert len(rows) == 7 and all(counts[r] < counts[top] for r in rows)


def test_stratum_narrowest_bin_with_enough_items(ds, sampler):
    n = len(ds.item_ids)
    everything = np.ones(n, bool)
    top = int(sampler.by_popularity[-1])  # the most interacted item
    finest = sampler.stratum(everything, top, 1)
    assert top in finest and len(finest) <= 2  # the finest bins hold one or two items
    pool = np.random.default_rng(0).random(n) < 0.3
    sizes = []
    for k in (1, 5, 19, 60, 10**6):
        rows = sampler.stratum(pool, top, k)
        assert pool[rows].all() and np.all(np.diff(sampler.popularity_rank[rows]) > 0)  # sorted by popularity
        assert len(rows) >= k or len(rows) == pool.sum()  # enough, or all there is
        # a contiguous run of the popularity order that ends at the top (where `top` sits)
        lo = sampler.popularity_rank[rows].min()
        assert set(rows) == set(sampler.by_popularity[lo:][pool[sampler.by_popularity[lo:]]])
        sizes.append(len(rows))
    assert sizes == sorted(sizes) and sizes[-1] == pool.sum()  # a bin that runs dry widens


def test_hard_mode_defaults_to_half_hard_negatives(ds, sampler):
    qs = [q for q in by_type(ds, "explicit") if sampler.pools(q)[1].sum() >= 10][:20]
    assert qs
    for q in qs:
        _, hard = sampler.pools(q)
        c = sampler.sample(q, 20, 0, seed=1, negatives="hard")
        assert sum(hard[ds.item_index[i]] for i in _negatives(q, c)) >= 10  # (19 + 1) // 2, more by chance
        # "hard" is "uniform" with hard negatives on by default; an explicit count is kept
        assert c == sampler.sample(q, 20, 10, seed=1, negatives="uniform")
        assert sampler.sample(q, 20, 3, 1, "hard") == sampler.sample(q, 20, 3, 1, "uniform")
        # hard negatives work in popularity mode too
        p = sampler.sample(q, 20, 6, seed=1, negatives="popularity")
        assert sum(hard[ds.item_index[i]] for i in _negatives(q, p)) >= 6


# ----------------------------------------------------------------------------- prompt


def test_messages_content(ds):
    q = next(q for q in by_type(ds, "explicit") if len(q.history) >= 3)
    c = build_candidates(q, ds, num_candidates=5)
    sys_msg, user = build_messages(q, ds, c, history_len=3, show_attributes=("genre", "director"))
    assert sys_msg["role"] == "system" and user["role"] == "user"
    text = user["content"]
    assert q.text in text
    assert "Recently watched: " + "; ".join(ds.items[i].title for i in q.history[-3:]) in text
    for i in c:
        it = ds.items[i]
        line = f"{it.title} | genre: {', '.join(it.attributes['genre'])}; director: {', '.join(it.attributes['director'])}"
        assert line in text.splitlines()
    assert text.endswith("\\boxed{Title (Year)}.")
    # no history, no attributes, open generation, list answers
    _, plain = build_messages(q, ds, None, answer_size=3)
    assert "Recently watched" not in plain["content"] and "Candidates" not in plain["content"]
    assert "3 best titles" in plain["content"] and "\\boxed{Title (Year); Title (Year); ...}" in plain["content"]


def test_request_last_moves_the_request_after_the_candidates_and_nothing_else(ds):
    q = next(q for q in by_type(ds, "explicit") if len(q.history) >= 2)
    c = build_candidates(q, ds, num_candidates=4)
    kw = dict(history_len=2, show_attributes=("auto",))
    first = build_messages(q, ds, c, **kw)[1]["content"].splitlines()
    last = build_messages(q, ds, c, request_last=True, **kw)[1]["content"].splitlines()
    assert sorted(first) == sorted(last) and first != last
    assert first[0] == f"Request: {q.text}" and last[0] == "Candidates:"
    lines = [candidate_line(ds.items[i], shown_relations(q, ("auto",))) for i in c]
    assert last[1:5] == lines and last[5] == f"Request: {q.text}" and last[6].startswith("Recently watched: ")
    assert last[-1] == first[-1] == answer_instruction(1)
    # open generation has no list to move
    assert build_messages(q, ds, None, request_last=True) == build_messages(q, ds, None)


def test_auto_attributes_are_the_relations_the_request_names(ds):
    q = next(q for q in by_type(ds, "explicit") if len({r for r, _ in q.conditions}) >= 2)
    rels = tuple(dict.fromkeys(r for r, _ in q.conditions))
    assert shown_relations(q, ("auto",)) == rels
    assert shown_relations(q, ("genre", "auto")) == tuple(dict.fromkeys(("genre",) + rels))
    demo = next(q for q in by_type(ds, "demographic") if q.conditions)
    assert shown_relations(demo, ("auto",)) == ()  # its conditions are not part of the request
    c = build_candidates(q, ds, num_candidates=4)
    user = build_messages(q, ds, c, show_attributes=("auto",))[1]["content"]
    for i in c:
        assert candidate_line(ds.items[i], rels) in user.splitlines()


def test_candidate_line_relation_order():
    it = Item("x", "Saving Private Ryan (1998)",
              {"genre": ["War", "Drama"], "director": ["Steven Spielberg"], "starring": ["Tom Hanks", "Matt Damon"]})
    assert candidate_line(it, ("genre", "starring")) == \
        "Saving Private Ryan (1998) | genre: War, Drama; starring: Tom Hanks, Matt Damon"
    assert candidate_line(it, ("starring", "country")) == "Saving Private Ryan (1998) | starring: Tom Hanks, Matt Damon"
    assert candidate_line(it) == "Saving Private Ryan (1998)"


def test_render_prompt_uses_the_chat_template(ds):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tok.chat_template = CHATML
    q = ds.queries["test"][0]
    c = build_candidates(q, ds, num_candidates=5)
    prompt = render_prompt(q, ds, c, tok)
    sys_msg, user = build_messages(q, ds, c)
    assert prompt == (f"<|im_start|>system\n{sys_msg['content']}<|im_end|>\n"
                      f"<|im_start|>user\n{user['content']}<|im_end|>\n<|im_start|>assistant\n")


def test_sft_target_is_gold_reasoning_and_parses_to_the_answer(ds):
    index = TitleIndex(ds.items.values())
    for q in ds.queries["train"][::40]:
        target = render_sft_target(q, ds)
        assert target == q.gold_reasoning
        ids, unmatched = match_answer(parse_answer(target), index)
        assert ids == [q.ground_truth[0]] and unmatched == 0
    # a query without gold reasoning gets one in the same style
    q = next(q for q in by_type(ds, "explicit"))
    bare = type(q)(**{**vars(q), "gold_reasoning": None})
    target = render_sft_target(bare, ds)
    assert target.splitlines()[0].startswith("Needed: ") and parse_answer(target) == [ds.items[q.ground_truth[0]].title]


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, expected", [
    ("Step 1: war.\n\\boxed{Saving Private Ryan (1998)}", ["Saving Private Ryan (1998)"]),
    ("no box here", None),
    ("\\boxed{}", []),
    ("\\boxed{ ; ;}", []),
    ("\\boxed{A (1990)} then \\boxed{B (1991)}", ["B (1991)"]),  # the last box counts
    ("\\boxed{Heat (1995); Jaws (1975) ;Alien (1979)}", ["Heat (1995)", "Jaws (1975)", "Alien (1979)"]),
    ("\\boxed {Heat (1995)}", ["Heat (1995)"]),
    ("\\\\boxed{Heat (1995)}", ["Heat (1995)"]),
    ("\\boxed{Se7en {1995}}", ["Se7en (1995)"]),
    ("\\boxed{\\text{The Matrix (1999)}}", ["The Matrix (1999)"]),
    ("\\boxed{\\textbf{Heat} (1995)}", ["Heat (1995)"]),
    ("\\boxed{Heat (1995)\nmore text", ["Heat (1995)"]),  # unclosed: to the end of the line
    ("\\boxed{Heat (1995)", ["Heat (1995)"]),
    ("\\boxed{**Heat (1995)**; _Jaws (1975)_}", ["Heat (1995)", "Jaws (1975)"]),
    ("\\boxed{1. \"Heat (1995)\"; 2) “Jaws (1975)”.; #3 'Alien (1979)'; - `Big (1988)`}",
     ["Heat (1995)", "Jaws (1975)", "Alien (1979)", "Big (1988)"]),
    ("\\boxed{Heat (1995).}", ["Heat (1995)"]),
    ("\\boxed{1941 (1979); 10 Things I Hate About You (1999)}", ["1941 (1979)", "10 Things I Hate About You (1999)"]),
    ("\\boxed{Mr. Smith Goes to Washington (1939)}", ["Mr. Smith Goes to Washington (1939)"]),
    ("\\boxed{Bonnie \\& Clyde (1967)}", ["Bonnie & Clyde (1967)"]),
    ("\\boxed{A;\nB}", ["A", "B"]),  # a closed box may span lines
])
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("\\boxed{}; ()*_\"'.1\n aZ")) | st.characters(), max_size=200))
def test_parse_answer_never_raises(text):
    out = parse_answer(text)
    assert out is None or (isinstance(out, list) and all(isinstance(e, str) and e for e in out))


@given(st.lists(st.sampled_from(["\\boxed{", "\\boxed", "{", "}", ";", " ", "\n", "(1999)", "x", "\\"]), max_size=60))
def test_parse_answer_never_raises_on_box_fragments(parts):
    parse_answer("".join(parts))


def test_parse_answer_linear_on_adversarial_input():
    n = 200_000
    texts = ["\\boxed{" + "{" * n, "\\boxed" + " " * n, "\\boxed{" * (n // 7), "\\" * n + "boxed{x}",
             "\\boxed{" + "1." * n + "}", "\\boxed{" + ";" * n + "}", "\\boxed{" + "{1999" * (n // 5)]
    t = time.perf_counter()
    for s in texts:
        parse_answer(s)
    assert time.perf_counter() - t < 3.0  # catastrophic backtracking would take minutes


def test_match_answer_order_repeats_and_hallucinations():
    items = [Item("h95", "Heat (1995)", {}), Item("h86", "Heat (1986)", {}), Item("j", "Jaws (1975)", {}),
             Item("m", "Matrix, The (1999)", {})]
    index = TitleIndex(items)
    ids, unmatched = match_answer(["The Matrix (1999)", "Jaws", "Made Up (1990)", "jaws (1975)", "Matrix"], index)
    assert ids == ["m", "j"] and unmatched == 1
    # "Heat" alone is ambiguous in the catalogue: unmatched, unless the candidates decide it
    assert match_answer(["Heat"], index) == ([], 1)
    assert match_answer(["Heat"], index, ["h86", "j"]) == (["h86"], 0)


def test_item_facts_state_every_relation_in_the_reasoning_phrasings():
    import random as _random
    from rerec_mini.prompts import item_facts
    item = Item("x", "Heat (1995)", {"genre": ["Crime", "Drama"], "director": ["Michael Mann"], "starring": ["Al Pacino"]})
    text = item_facts(item, _random.Random(0))
    assert text.count("Heat (1995)") == 3 and "Michael Mann" in text and "Al Pacino" in text and "Crime" in text
    phrasings = {item_facts(item, _random.Random(s)) for s in range(20)}
    assert len(phrasings) > 3  # order and phrasing vary with the rng
    assert "Its" not in text and all(p.endswith(".") for p in phrasings)
