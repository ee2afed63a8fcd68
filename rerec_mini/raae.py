"""Reasoning-aware advantage estimation (RAAE, ReRec §4.2).

The response before its final box is cut into reasoning segments (lines, and explicit step
markers). When the final top item is wrong, the segments that argued for it (mention it) are
wrong, and their tokens get a lower advantage than the rest of their rollout.

    spans  = token_char_spans(tokenizer, ids)          # exact char span of every sampled token
    wrong  = wrong_segments(text, top_title, is_hit)    # char spans of the faulty reasoning
    bad    = in_spans(spans, wrong)                     # [T] bool: the tokens inside them
    adv    = group_advantages([bad, ...], rewards, G)   # token advantages of every rollout

Where the penalty goes: the paper, the authors' release, and ours.
  paper    r(i,t) = r_i - w|r_i| on wrong tokens, A(i,t) = (r(i,t) - mean_G r) / (std_G r + eps).
           The penalty w|r_i| is in reward units and is then divided by the group's std. When
           the G rewards differ only through the small QAS/PAS terms (every answer wrong: the
           usual case early in RL) the std is ~1e-3 and a wrong token's advantage is -72 while
           the other tokens sit at +-2; in a 1-hit-4-wrong group the same penalty is 0.1 std.
           RAAE's strength would follow the noise in the alignment terms.  (--raae-advantage paper)
  release  multiplies the wrong tokens' reward by 0.7, which *raises* a negative reward
           (-0.5 -> -0.35): wrong reasoning in a failed answer is rewarded, not penalised.
  ours     penalise the normalised advantage instead of the reward   (--raae-advantage bounded)
               A_i    = (r_i - mean_G r) / s                      (s: --scale-rewards, below)
               A(i,t) = A_i - w * max(|A_i|, c)   on wrong tokens, A_i on the others
           The penalty is w * max(|A_i|, c) in advantage units whatever the group's spread. Like
           the paper's r - w|r| it lowers a wrong token whatever the sign of A_i, by a share w of
           its rollout's own advantage; the floor c (--raae-floor, 1 = one group std) keeps it from
           vanishing when A_i ~ 0. With group scaling |A_i| <= sqrt(G-1), so no wrong token ever
           moves by more than w * max(sqrt(G-1), c): 0.6 for w = 0.3, G = 5.
           A flat group (all G rewards equal) has no contrast between rollouts: A_i = 0, and only
           the wrong tokens move, to -w*c (the reasoning behind a wrong answer is still
           discouraged; the paper's formula divides by eps there, and is set to 0 instead).
Std scaling, TRL's `scale_rewards`: group (std of the query's G rewards, the default), batch
(std of every reward in the step; the mean stays per group), none (no division, as Dr. GRPO).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# A new step starts at each line, and also at "Step 3:" inside a line (run-on responses).
# Numbered ("3.", "3)") and bulleted ("- ", "* ", "• ") markers only count at a line start:
# mid-line they collide with titles such as "Se7en (1995). Then ...".
_LINE_MARKER = re.compile(r"^[ \t]*(?:step\s*\d+\s*[:.)]|\d+[.)](?=\s)|[-*•](?=\s))", re.IGNORECASE)
_INLINE_STEP = re.compile(r"(?<=\S)[ \t]+(?=step\s*\d+\s*[:.)])", re.IGNORECASE)
_BOX = "\\boxed"
_YEAR = re.compile(r"\s*\((\d{4})\)\s*$")
_ARTICLE_SUFFIX = re.compile(r"^(.*), (the|a|an)$", re.IGNORECASE)


def segment(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the reasoning segments before the final box.

    >>> t = "Step 1: need War. Step 2: Jaws (1975) fits.\\n- so pick it\\n\\\\boxed{Jaws (1975)}"
    >>> [t[a:b] for a, b in segment(t)]
    ['Step 1: need War.', 'Step 2: Jaws (1975) fits.', '- so pick it']
    """
    end = text.rfind(_BOX)
    body_end = len(text) if end < 0 else end
    spans = []
    pos = 0
    for line in text[:body_end].split("\n"):
        # Lines are steps; so is every "Step N:" inside a line.
        cuts = [0] + [m.end() for m in _INLINE_STEP.finditer(line)] + [len(line)]
        for a, b in zip(cuts, cuts[1:]):
            piece = line[a:b]
            lead, trail = len(piece) - len(piece.lstrip()), len(piece.rstrip())
            if trail > lead:
                spans.append((pos + a + lead, pos + a + trail))
        pos += len(line) + 1
    return spans


def title_patterns(title: str) -> re.Pattern:
    """A case-insensitive pattern for a title with or without its year, either article order.

    "Matrix, The (1999)" matches "the matrix", "The Matrix (1999)" and "Matrix, The".
    """
    name = _YEAR.sub("", title).strip()
    names = {name}
    m = _ARTICLE_SUFFIX.match(name)
    if m:
        names.add(f"{m.group(2)} {m.group(1)}")
    alts = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alts})(?!\w)", re.IGNORECASE)


def wrong_segments(
    text: str,
    top_title: str | None,
    is_hit: bool,
    *,
    claims: list[tuple[str, list[tuple[str, str]]]] = (),
) -> list[tuple[int, int]]:
    """Spans of the segments that reasoned towards a wrong answer.

    Paper rule: when the final top item is not in the ground truth, every segment that
    mentions it is wrong. `claims` (--raae-claims): (title, [(relation, value), ...]) for
    catalogue items paired with the query conditions each one LACKS; a segment that names
    such an item together with one of those values attributes a false fact to it.
    """
    spans = segment(text)
    bad = set()
    if top_title is not None and not is_hit:
        pat = title_patterns(top_title)
        bad.update(s for s in spans if pat.search(text, s[0], s[1]))
    for title, lacking in claims:
        pat = title_patterns(title)
        for s in spans:
            piece = text[s[0]:s[1]]
            if s not in bad and pat.search(piece) and any(v.lower() in piece.lower() for _, v in lacking):
                bad.add(s)
    return sorted(bad)


def token_char_spans(tokenizer, ids: list[int]) -> tuple[str, np.ndarray]:
    """Decode sampled `ids`; return the text and each token's char span, [T, 2] int64.

    Exact for the sampled ids: a token's span is the text it adds to the decoded string.
    Fast path: every token decodes to whole characters on its own (one batched decode).
    Otherwise (a multi-byte character split across tokens) decode incrementally: a token
    that ends inside a character adds nothing until the character is complete, and the
    tokens that built it share its span. Special tokens (EOS) get an empty span.
    """
    text = tokenizer.decode(ids, skip_special_tokens=True)
    pieces = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True)
    if "".join(pieces) == text:
        ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
        return text, np.stack([ends - [len(p) for p in pieces], ends], axis=1).reshape(len(ids), 2)
    spans = np.zeros((len(ids), 2), dtype=np.int64)
    out = ""
    prefix = read = 0  # decode only the window ids[prefix:]: O(T), not O(T^2)
    for k in range(len(ids)):
        seen = tokenizer.decode(ids[prefix:read], skip_special_tokens=True)
        new = tokenizer.decode(ids[prefix:k + 1], skip_special_tokens=True)
        complete = len(new) > len(seen) and not new.endswith("\ufffd")
        if complete or k == len(ids) - 1:
            delta = new[len(seen):]
            spans[read:k + 1] = (len(out), len(out) + len(delta))
            out += delta
            prefix, read = read, k + 1
    if out != text:  # a decoder that is not prefix-stable in a window: use whole prefixes
        lens = [len(tokenizer.decode(ids[:k], skip_special_tokens=True)) for k in range(len(ids) + 1)]
        spans = np.stack([lens[:-1], lens[1:]], axis=1).astype(np.int64)
    return text, spans


def in_spans(spans: np.ndarray, wrong: list[tuple[int, int]]) -> np.ndarray:
    """[T] bool: the token's char span overlaps one of the `wrong` spans."""
    inside = np.zeros(len(spans), dtype=bool)
    for a, b in wrong:
        inside |= (spans[:, 0] < b) & (spans[:, 1] > a)
    return inside


SCALES = ("group", "batch", "none")
MODES = ("bounded", "paper")


@dataclass
class Advantages:
    """What `group_advantages` returns for N rollouts (the G rollouts of a query adjacent)."""

    tokens: list[np.ndarray]  # N arrays [T_i] float32: the advantage of every response token
    sequence: np.ndarray  # [N] float64: A_i, the rollout's advantage before any RAAE penalty
    flat_groups: int  # groups whose G rewards are all equal (no contrast between rollouts)
    penalised_tokens: int  # tokens inside wrong segments
    penalty: np.ndarray  # [penalised_tokens] A_i - A(i,t) of each of them, in advantage units


def sequence_advantages(rewards: np.ndarray, group_size: int, scale: str = "group",
                        eps: float = 1e-4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A_i = (r_i - mean_G r) / s: rewards [N] -> (A [N], mean per rollout [N], s per rollout [N]).

    s is the std of the rollout's group (`group`), of the whole batch (`batch`), or 1 (`none`),
    plus eps. Population std, as TRL's GRPO computes it.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if scale not in SCALES:
        raise ValueError(f"unknown reward scaling {scale!r} (choose from {', '.join(SCALES)})")
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    groups = rewards.reshape(-1, group_size)
    mean = np.repeat(groups.mean(1), group_size)
    if scale == "group":
        s = np.repeat(groups.std(1), group_size) + eps
    elif scale == "batch":
        s = np.full(len(rewards), rewards.std() + eps)
    else:
        s = np.ones(len(rewards))
    return (rewards - mean) / s, mean, s


def group_advantages(penalised: list[np.ndarray], rewards: np.ndarray, group_size: int, *, penalty: float = 0.3,
                     scale: str = "group", floor: float = 1.0, mode: str = "bounded",
                     eps: float = 1e-4) -> Advantages:
    """Token advantages of N rollouts; the tokens in `penalised` ([T_i] bool each) are RAAE's.

    bounded (ours): A(i,t) = A_i - penalty * max(|A_i|, floor) on penalised tokens, A_i elsewhere.
    paper:          A(i,t) = (r(i,t) - mean_G r) / s with r(i,t) = r_i - penalty*|r_i| on penalised
                    tokens; a flat group gets 0 everywhere (the formula would divide by eps).
    With no penalised token both are plain GRPO: every token of rollout i gets A_i.
    """
    if mode not in MODES:
        raise ValueError(f"unknown RAAE advantage {mode!r} (choose from {', '.join(MODES)})")
    rewards = np.asarray(rewards, dtype=np.float64)
    if len(penalised) != len(rewards):
        raise ValueError(f"{len(penalised)} token masks for {len(rewards)} rewards")
    seq, mean, s = sequence_advantages(rewards, group_size, scale, eps)
    flat = np.ptp(rewards.reshape(-1, group_size), axis=1) < 1e-9  # [N/G]
    seq[np.repeat(flat, group_size)] = 0.0  # exactly 0, not (r - mean) / eps rounding noise
    tokens, gaps = [], []
    for i, bad in enumerate(penalised):
        adv = np.full(len(bad), seq[i])
        if bad.any():
            if mode == "bounded":
                adv[bad] = seq[i] - penalty * max(abs(seq[i]), floor)
            elif not flat[i // group_size]:
                adv[bad] = (rewards[i] - penalty * abs(rewards[i]) - mean[i]) / s[i]
            gaps.append(seq[i] - adv[bad])
        tokens.append(adv.astype(np.float32))
    gap = np.concatenate(gaps) if gaps else np.zeros(0)
    return Advantages(tokens, seq, int(flat.sum()), len(gap), gap)
