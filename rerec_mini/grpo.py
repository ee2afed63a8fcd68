"""The GRPO policy loss: clipped surrogate + k3 KL to a frozen reference, four aggregations.

Per token t of rollout i, with ratio rho = exp(logp - logp_old) and advantage A:
    loss(i,t) = -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A) * w(i,t) + beta*KL(i,t)
    KL(i,t)   = exp(ref - logp) - (ref - logp) - 1          (k3: unbiased, always >= 0)
    w(i,t)    = min(exp(logp_old - logp_sampler), C)        (truncated importance sampling,
                                                             --tis-cap C; 1 when off)
The sampler decodes from a bf16 copy of the policy while the loss runs on the fp32 weights, so
the tokens were drawn from a slightly different distribution than the one differentiated;
w reweights each token towards the trained policy, capped so one token cannot dominate (TRL's
`vllm_importance_sampling_correction`). Aggregation over one optimiser step, TRL's names:
    dapo      sum over every token of the step / tokens in the step                  (default)
    grpo      mean over rollouts of (the rollout's token mean)     (the GRPO paper; long answers
                                                                    weigh less per token)
    dr_grpo   sum over every token / (rollouts in the step * max_completion_length)
    bnpo      mean over micro-batches of (the micro-batch's token mean)
Micro-batches add up to the step's loss: each call returns its share, already normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")
# The names this project used before it took TRL's; still accepted.
LOSS_ALIASES = {"token-mean": "dapo", "seq-mean": "grpo", "dr-grpo": "dr_grpo"}


def loss_type_name(name: str) -> str:
    """A loss type or one of its old aliases -> the TRL name; unknown names raise."""
    name = LOSS_ALIASES.get(name, name)
    if name not in LOSS_TYPES:
        raise ValueError(f"unknown loss type {name!r} (choose from {', '.join(LOSS_TYPES)}; "
                         f"old aliases {', '.join(LOSS_ALIASES)})")
    return name


@dataclass
class StepNorm:
    """What one optimiser step's loss is normalised by (counted over all its micro-batches)."""

    tokens: int  # response tokens with mask 1 in the step
    seqs: int  # rollouts in the step
    max_len: int  # --max-completion-length (dr_grpo's constant)
    micro_batches: int = 1  # micro-batches in the step (bnpo)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    norm: StepNorm,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    loss_type: str = "dapo",
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one micro-batch, already divided by the step's normaliser.

    logp, old_logp, ref_logp, advantages, mask, is_weight: [B, T] (mask: 1 on trained response
    tokens; is_weight: the truncated importance weights w, no gradient). Returns (scalar loss to
    backprop, sums for logging: kl, clipped tokens (low / high side), tokens).
    """
    loss_type = loss_type_name(loss_type)
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if is_weight is not None:
        per_token = per_token * is_weight
    kl = torch.zeros_like(logp)
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs the reference model's log-probs")
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1.0
        per_token = per_token + beta * kl

    total = (per_token * mask).sum()
    if loss_type == "dapo":
        loss = total / max(norm.tokens, 1)
    elif loss_type == "grpo":
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        loss = per_seq.sum() / max(norm.seqs, 1)
    elif loss_type == "dr_grpo":
        loss = total / max(norm.seqs * norm.max_len, 1)
    else:  # bnpo
        loss = total / mask.sum().clamp(min=1) / max(norm.micro_batches, 1)

    with torch.no_grad():
        # The clip is active where the min picked the clipped branch and it differs.
        low = (ratio < 1 - eps_low) & (advantages < 0)
        high = (ratio > 1 + eps_high) & (advantages > 0)
        sums = {
            "kl_sum": float((kl * mask).sum()),
            "clipped_sum": float(((low | high).to(mask.dtype) * mask).sum()),
            "clipped_low_sum": float((low.to(mask.dtype) * mask).sum()),
            "clipped_high_sum": float((high.to(mask.dtype) * mask).sum()),
            "tokens": float(mask.sum()),
        }
    return loss, sums
