"""The GRPO loss against hand-computed values, for every aggregation."""

import math

import pytest
import torch

from rerec_mini.grpo import LOSS_ALIASES, StepNorm, loss_type_name, policy_loss


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_ratio_one_gives_minus_mean_advantage_and_policy_gradient():
    logp = t([[-1.0, -2.0], [-0.5, -0.1]]).requires_grad_()
    adv = t([[1.0, 1.0], [-2.0, -2.0]])
    mask = t([[1, 1], [1, 0]])
    loss, sums = policy_loss(logp, logp.detach(), adv, mask, StepNorm(tokens=3, seqs=2, max_len=4))
    assert loss.item() == pytest.approx(-(1 + 1 - 2) / 3)
    loss.backward()
    # d/dlogp of -rho*A at rho=1 is -A (masked tokens get no gradient)
    assert logp.grad.flatten().tolist() == pytest.approx([-1 / 3, -1 / 3, 2 / 3, 0.0])
    assert sums == {"kl_sum": 0.0, "clipped_sum": 0.0, "clipped_low_sum": 0.0, "clipped_high_sum": 0.0, "tokens": 3.0}


def test_clipping_hand_computed():
    old = t([[0.0, 0.0, 0.0, 0.0]])
    logp = t([[math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)]])
    adv = t([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.float64)
    loss, sums = policy_loss(logp, old, adv, mask, StepNorm(4, 1, 4), eps_low=0.2, eps_high=0.3)
    # rho=1.5,A=+1 -> min(1.5, 1.3)=1.3 ; rho=1.5,A=-1 -> min(-1.5,-1.3)=-1.5
    # rho=0.5,A=+1 -> min(0.5, 0.8)=0.5 ; rho=0.5,A=-1 -> min(-0.5,-0.8)=-0.8
    assert loss.item() == pytest.approx(-(1.3 - 1.5 + 0.5 - 0.8) / 4)
    assert sums["clipped_sum"] == 2.0  # tokens 0 and 3 sit on the clipped branch
    assert sums["clipped_high_sum"] == 1.0 and sums["clipped_low_sum"] == 1.0


def test_k3_kl_term():
    logp = t([[-1.0, -2.0]])
    ref = t([[-1.5, -2.0]])
    mask = torch.ones(1, 2, dtype=torch.float64)
    loss, sums = policy_loss(logp, logp, torch.zeros(1, 2, dtype=torch.float64), mask, StepNorm(2, 1, 2),
                             ref_logp=ref, beta=0.1)
    kl0 = math.exp(-0.5) + 0.5 - 1
    assert sums["kl_sum"] == pytest.approx(kl0)
    assert loss.item() == pytest.approx(0.1 * kl0 / 2)
    with pytest.raises(ValueError):
        policy_loss(logp, logp, logp, mask, StepNorm(2, 1, 2), beta=0.1)


def test_aggregations_and_micro_batches_add_up():
    torch.manual_seed(0)
    logp = torch.randn(4, 5, dtype=torch.float64)
    old = logp + 0.1 * torch.randn(4, 5, dtype=torch.float64)
    adv = torch.randn(4, 5, dtype=torch.float64)
    mask = t([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    per_token = -torch.minimum(torch.exp(logp - old) * adv, torch.clamp(torch.exp(logp - old), 0.8, 1.2) * adv)
    parts_rows = (slice(0, 1), slice(1, 3), slice(3, 4))
    norm = StepNorm(tokens=int(mask.sum()), seqs=4, max_len=8, micro_batches=len(parts_rows))
    expected = {
        "dapo": (per_token * mask).sum() / mask.sum(),
        "grpo": ((per_token * mask).sum(1) / mask.sum(1)).mean(),
        "dr_grpo": (per_token * mask).sum() / (4 * 8),
        "bnpo": sum((per_token[s] * mask[s]).sum() / mask[s].sum() for s in parts_rows) / len(parts_rows),
    }
    for loss_type, want in expected.items():
        parts = sum(policy_loss(logp[s], old[s], adv[s], mask[s], norm, loss_type=loss_type)[0] for s in parts_rows)
        assert parts.item() == pytest.approx(want.item()), loss_type
        if loss_type != "bnpo":  # bnpo's normaliser depends on how the step is split
            whole, _ = policy_loss(logp, old, adv, mask, norm, loss_type=loss_type)
            assert whole.item() == pytest.approx(want.item()), loss_type
    for old_name, new_name in LOSS_ALIASES.items():  # the names this project used first still work
        assert loss_type_name(old_name) == new_name
        a, _ = policy_loss(logp, old, adv, mask, norm, loss_type=old_name)
        b, _ = policy_loss(logp, old, adv, mask, norm, loss_type=new_name)
        assert a.item() == b.item()
    with pytest.raises(ValueError, match="unknown loss type"):
        policy_loss(logp, old, adv, mask, norm, loss_type="sum")


def test_truncated_importance_weights_scale_the_surrogate_not_the_kl():
    logp = t([[-1.0, -2.0]]).requires_grad_()
    ref = t([[-1.5, -2.0]])
    adv = t([[1.0, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.float64)
    w = t([[0.5, 2.0]])
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, StepNorm(2, 1, 2), ref_logp=ref, beta=0.1, is_weight=w)
    kl0 = math.exp(-0.5) + 0.5 - 1
    assert loss.item() == pytest.approx((-(1.0 * 0.5) + (1.0 * 2.0) + 0.1 * kl0) / 2)
    loss.backward()
    # at rho = 1 the surrogate's gradient is -A * w per token (plus the KL's)
    dkl0 = -math.exp(-0.5) + 1  # d/dlogp of exp(ref-logp) - (ref-logp) - 1
    assert logp.grad.flatten().tolist() == pytest.approx([(-0.5 + 0.1 * dkl0) / 2, (2.0 + 0.0) / 2])
