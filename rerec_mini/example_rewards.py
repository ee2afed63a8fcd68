"""Two example reward functions for `--reward-fn` (the calling convention: user_rewards.py).

Neither asks for the right answer, and no SFT label encodes either: the candidate order is shuffled
per prompt, and a title's length has nothing to do with which candidate is the ground truth, so the
candidate listed last, or the one with the shortest title, is the ground truth no more often than
chance. A model can only learn them from the reward, which makes them a test of the RL step itself
(`python -m rerec_mini.bench sanity`, tests/test_sanity.py):

    python train.py --model tiny --sft-source format --reward-weights 0.1,0,0,0 --no-raae \\
        --reward-fn rerec_mini.example_rewards:shortest_title

Each returns, per completion, 1.0 when the answer's first title is its target candidate, 0.0
otherwise (another candidate, another title, no box), and None (skipped) in open generation, where
there is no list. Copy one as the start of your own: a module on the path, or a file
(path/to/file.py:function).
"""

from __future__ import annotations


def last_candidate(completions, candidates, answer, **kwargs) -> list[float | None]:
    """1.0 when the answer's first title is the candidate listed last in the prompt, else 0.0."""
    return [None if cands is None else float(bool(ans) and ans[0] == cands[-1])
            for cands, ans in zip(candidates, answer)]


def shortest_title(completions, candidates, answer, **kwargs) -> list[float | None]:
    """1.0 when the answer's first title is a candidate with the fewest characters (each of equally
    short titles counts), else 0.0. A model whose titles are single tokens cannot see their length:
    it can only learn it from the reward."""
    out: list[float | None] = []
    for cands, ans in zip(candidates, answer):
        if cands is None:
            out.append(None)
        else:
            out.append(float(bool(ans) and ans[0] in cands and len(ans[0]) == min(len(t) for t in cands)))
    return out
