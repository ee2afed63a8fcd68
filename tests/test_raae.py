"""RAAE: segmentation, the wrong-segment rule, exact char->token spans, token rewards, advantages."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rerec_mini.raae import group_advantages, in_spans, segment, sequence_advantages, title_patterns, token_char_spans, wrong_segments


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE: non-ASCII characters split into several byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = ["Step 1: the request wants War movies.", "Saving Private Ryan (1998) stars Tom Hanks.",
             "\\boxed{Jaws (1975)}", "Amélie (2001) is French."] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_end|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


def pieces(text, spans):
    return [text[a:b] for a, b in spans]


def test_segments_lines_and_markers():
    text = ("Step 1: need a War movie. Step 2: starring Tom Hanks.\n\n"
            "1. Saving Private Ryan (1998) fits.\n- Jaws (1975) does not.\n   \n"
            "So the answer is clear.\n\\boxed{Saving Private Ryan (1998)}")
    assert pieces(text, segment(text)) == [
        "Step 1: need a War movie.", "Step 2: starring Tom Hanks.",
        "1. Saving Private Ryan (1998) fits.", "- Jaws (1975) does not.", "So the answer is clear.",
    ]
    # only the text before the FINAL box is reasoning; a year followed by '.' is not a marker
    t2 = "I pick Se7en (1995). 2) nope \\boxed{a} then \\boxed{Se7en (1995)}"
    assert pieces(t2, segment(t2)) == ["I pick Se7en (1995). 2) nope \\boxed{a} then"]
    assert segment("") == [] and segment("\\boxed{x}") == []


def test_title_patterns_year_optional_and_articles():
    pat = title_patterns("Matrix, The (1999)")
    for s in ("the matrix was great", "THE MATRIX (1999)", "Matrix, The", "see: the Matrix."):
        assert pat.search(s), s
    assert not pat.search("the matrixes") and not pat.search("Matrix Reloaded")
    assert title_patterns("Se7en (1995)").search("I liked se7en a lot")


def test_wrong_segments_paper_rule():
    text = ("Needed: director: Ada Bell.\nJaws (1975) has director: Ada Bell.\n"
            "Also the matrix is close.\n\\boxed{Jaws (1975)}")
    segs = segment(text)
    # wrong top item -> every segment mentioning it (with or without year) is wrong
    assert pieces(text, wrong_segments(text, "Jaws (1975)", is_hit=False)) == ["Jaws (1975) has director: Ada Bell."]
    lower = text.replace("Jaws (1975) has", "jaws has")
    assert pieces(lower, wrong_segments(lower, "Jaws (1975)", False)) == ["jaws has director: Ada Bell."]
    # a hit, or no parsed item -> nothing is wrong
    assert wrong_segments(text, "Jaws (1975)", is_hit=True) == []
    assert wrong_segments(text, None, is_hit=False) == []
    # claims: "The Matrix" is said to have a condition value the knowledge graph says it lacks
    claims = [("Matrix, The (1999)", [("director", "Ada Bell")])]
    text2 = "The Matrix has director: Ada Bell.\nJaws fits.\n\\boxed{Jaws (1975)}"
    assert pieces(text2, wrong_segments(text2, "Jaws (1975)", True, claims=claims)) == ["The Matrix has director: Ada Bell."]
    assert len(segs) == 3


def _check_spans(tokenizer, ids):
    text, spans = token_char_spans(tokenizer, ids)
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert spans.shape == (len(ids), 2)
    # spans tile the text in order; every character belongs to some token
    assert (spans[:, 0] <= spans[:, 1]).all() and (np.diff(spans[:, 0]) >= 0).all()
    covered = "".join(text[a:b] for a, b in np.unique(spans, axis=0) if b > a)
    assert covered == text
    # exactness: the text up to each complete token equals decoding the ids up to it
    for k in range(len(ids)):
        if k + 1 == len(ids) or spans[k + 1, 0] >= spans[k, 1]:
            prefix = tokenizer.decode(ids[:k + 1], skip_special_tokens=True)
            if not prefix.endswith("\ufffd"):
                assert text[:spans[k, 1]] == prefix
    return text, spans


def test_char_spans_exact_ascii_and_multibyte(tokenizer):
    for s in ["Step 1: Saving Private Ryan (1998)\n\\boxed{Jaws (1975)}",
              "Amélie (2001) — très bien 🎬 ok", "日本語のタイトル (1999)", "é"]:
        ids = tokenizer.encode(s, add_special_tokens=False) + [tokenizer.eos_token_id]
        text, spans = _check_spans(tokenizer, ids)
        assert text == s
        assert spans[-1, 0] == spans[-1, 1] == len(s)  # EOS adds no text
    # the tokens of one multi-byte character share its span
    ids = tokenizer.encode("🎬", add_special_tokens=False)
    assert len(ids) > 1
    _, spans = token_char_spans(tokenizer, ids)
    assert (spans == [0, 1]).all()


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_char_spans_any_text(tokenizer, s):
    _check_spans(tokenizer, tokenizer.encode(s, add_special_tokens=False))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 299), max_size=30))
def test_char_spans_any_ids_even_broken_utf8(tokenizer, ids):
    text, spans = token_char_spans(tokenizer, ids)
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert spans.shape == (len(ids), 2) and (spans[:, 1] <= len(text)).all()


def test_in_spans_marks_overlapping_tokens():
    spans = np.array([[0, 5], [5, 10], [10, 15], [15, 15]])
    assert in_spans(spans, [(6, 12)]).tolist() == [False, True, True, False]
    assert in_spans(spans, []).tolist() == [False] * 4


def masks(*lengths_and_bad):
    """[T] bool masks: (T, [penalised positions])."""
    out = []
    for T, bad in lengths_and_bad:
        m = np.zeros(T, bool)
        m[list(bad)] = True
        out.append(m)
    return out


def test_plain_grpo_hand_computed_for_every_scaling():
    rewards = np.array([1.0, 0.0, 0.5, 0.5, 0.2, 0.2])  # two groups of 3
    none_bad = masks(*[(2, [])] * 6)
    mean1, std1 = 0.5, np.std([1.0, 0.0, 0.5])
    std2 = np.std([0.5, 0.2, 0.2])  # group 2: mean 0.3
    a = group_advantages(none_bad, rewards, 3, scale="group", eps=0.0)
    assert a.sequence == pytest.approx([(1 - mean1) / std1, -mean1 / std1, 0.0, 0.2 / std2, -0.1 / std2, -0.1 / std2])
    assert all((t == np.float32(s)).all() for t, s in zip(a.tokens, a.sequence))
    assert a.flat_groups == 0 and a.penalised_tokens == 0
    b = group_advantages(none_bad, rewards, 3, scale="batch", eps=0.0)
    assert b.sequence == pytest.approx([0.5 / rewards.std(), -0.5 / rewards.std(), 0, 0.2 / rewards.std(),
                                        -0.1 / rewards.std(), -0.1 / rewards.std()])
    n = group_advantages(none_bad, rewards, 3, scale="none")
    assert n.sequence == pytest.approx([0.5, -0.5, 0.0, 0.2, -0.1, -0.1])
    flat = group_advantages(masks(*[(3, [])] * 4), np.array([1.0, 1.0, 0.3, 0.3]), 2)
    assert flat.flat_groups == 2 and all((t == 0).all() for t in flat.tokens)
    with pytest.raises(ValueError):
        group_advantages(none_bad, rewards, 4)
    with pytest.raises(ValueError, match="scaling"):
        sequence_advantages(rewards, 3, scale="rank")


def test_bounded_raae_hand_computed():
    rewards = np.array([1.0, 0.0, 0.5])
    a = group_advantages(masks((2, []), (2, [1]), (2, [0])), rewards, 3, penalty=0.3, floor=1.0, eps=0.0)
    A = a.sequence
    assert a.tokens[1].tolist() == pytest.approx([A[1], A[1] - 0.3 * abs(A[1])])  # |A_1| = 1.22 > floor
    assert a.tokens[2].tolist() == pytest.approx([A[2] - 0.3 * 1.0, A[2]])  # A_2 = 0: the floor applies
    assert a.penalised_tokens == 2 and a.penalty.tolist() == pytest.approx([0.3 * abs(A[1]), 0.3])


def test_the_issue_case_near_flat_group_no_longer_explodes():
    """Rewards [0.120 x4, 0.121]: the old formula gave the wrong tokens -72 where the rest sat at +-2."""
    rewards = np.array([0.120, 0.120, 0.120, 0.120, 0.121])
    bad = masks((4, [1, 2]), (4, [1]), (4, []), (4, [3]), (4, []))
    a = group_advantages(bad, rewards, 5, penalty=0.3)
    lowest = min(t.min() for t in a.tokens)
    assert lowest > -1.0  # A_i = -0.5, penalised: -0.5 - 0.3 * 1 = -0.8
    assert a.tokens[0][1] == pytest.approx(a.sequence[0] - 0.3)
    paper = group_advantages(bad, rewards, 5, penalty=0.3, mode="paper")
    assert min(t.min() for t in paper.tokens) < -50  # the paper's formula, kept behind a flag, explodes


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 8), st.sampled_from(["flat", "near", "mixed"]), st.sampled_from(["group", "batch", "none"]),
       st.floats(0.0, 1.0), st.floats(0.1, 2.0), st.integers(0, 2**31 - 1))
def test_penalty_bounded_whatever_the_group(G, kind, scale, w, c, seed):
    """A penalised token's advantage differs from its rollout's by exactly w * max(|A_i|, c), never more;
    with group scaling that is at most w * max(sqrt(G-1), c), however small the group's std."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(-0.6, 1.2, size=3)
    groups = []
    for b in base:
        if kind == "flat":
            groups.append(np.full(G, b))
        elif kind == "near":
            groups.append(b + rng.uniform(0, 1e-3, G))
        else:
            groups.append(rng.uniform(-0.6, 1.2, G))
    rewards = np.concatenate(groups)
    bad = [rng.random(7) < 0.4 for _ in rewards]
    a = group_advantages(bad, rewards, G, penalty=w, floor=c, scale=scale)
    for i, (tok, m) in enumerate(zip(a.tokens, bad)):
        Ai = a.sequence[i]
        assert np.allclose(tok[~m], Ai, atol=1e-5)
        assert np.allclose(Ai - tok[m], w * max(abs(Ai), c), atol=1e-5)
        if scale == "group":
            assert (Ai - tok[m] <= w * max(np.sqrt(G - 1), c) + 1e-5).all()
    if kind == "flat":  # the documented flat-group behaviour: 0, and -w*c on wrong tokens
        assert a.flat_groups == 3 and (a.sequence == 0).all()
        assert all(np.allclose(t[m], -w * c) and np.allclose(t[~m], 0) for t, m in zip(a.tokens, bad))
