"""Losses: Focal == CE at gamma 0, numerical stability, LDAM margins, class-balanced weights."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError
from losses import (
    LOSSES, FocalLoss, LDAMLoss, build_criterion, effective_num_weights, uses_norm,
)


def batch(n=16, c=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=gen) * 3, torch.randint(0, c, (n,), generator=gen)


# ---------------------------------------------------------------- Focal

def test_focal_gamma0_equals_cross_entropy():
    logits, target = batch()
    torch.testing.assert_close(FocalLoss(gamma=0.)(logits, target), F.cross_entropy(logits, target))


def test_focal_matches_formula():
    logits, target = batch()
    p_t = logits.softmax(1)[torch.arange(len(target)), target]
    expected = (-(1 - p_t) ** 2 * p_t.log()).mean()
    torch.testing.assert_close(FocalLoss(gamma=2.)(logits, target), expected)


def test_focal_down_weights_easy_examples():
    logits, target = batch()
    assert FocalLoss(gamma=2.)(logits, target) < FocalLoss(gamma=0.)(logits, target)


@pytest.mark.parametrize('gamma', [0., 0.5, 1., 2.])
def test_focal_finite_value_and_grad_when_confident(gamma):
    # Row 0: the target logit is huge, so p_t rounds to exactly 1 and 1 - p_t to 0, where
    # (1 - p_t)^gamma has an infinite slope for gamma < 1. Row 1: huge logit on a wrong class.
    logits = torch.tensor([[1e4, 0., -3.], [0., 1e4, 2.], [0.1, 0.2, 0.3]], requires_grad=True)
    target = torch.tensor([0, 2, 1])
    loss = FocalLoss(gamma=gamma)(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0].abs().max() < 1e-6  # a perfectly classified sample gives no signal


def _original_weighted_focal(logits, target, weight, gamma):
    """The original code's formula, written out: the weighted per-sample cross-entropy enters p too."""
    ce_w = weight[target] * -torch.log_softmax(logits.double(), dim=1)[torch.arange(len(target)), target]
    return ((1 - torch.exp(-ce_w)) ** gamma * ce_w).mean()


@pytest.mark.parametrize('gamma', [0., 0.5, 1., 2.])
def test_weighted_focal_is_the_original_formula(gamma):
    torch.manual_seed(int(gamma * 10))
    logits, target = 3 * torch.randn(64, 7), torch.randint(0, 7, (64,))
    weight = torch.rand(7) * 3
    expected = _original_weighted_focal(logits, target, weight, gamma).float()
    torch.testing.assert_close(FocalLoss(weight=weight, gamma=gamma)(logits, target), expected)
    # Not the textbook weighting w[y] * (1 - p_y)^gamma * CE (what this project computed before).
    textbook = (weight[target] * F.cross_entropy(logits, target, reduction='none')
                * (1 - torch.softmax(logits, 1)[torch.arange(64), target]) ** gamma).mean()
    if gamma > 0:
        assert not torch.allclose(FocalLoss(weight=weight, gamma=gamma)(logits, target), textbook)


@pytest.mark.parametrize('gamma', [0., 0.5, 1., 2.])
def test_weighted_focal_finite_for_extreme_logits(gamma):
    logits = torch.tensor([[1e4, 0., -3.], [0., 1e4, 2.], [-1e4, 1e4, 0.]], requires_grad=True)
    target = torch.tensor([0, 2, 0])
    loss = FocalLoss(weight=torch.tensor([0.3, 1., 5.]), gamma=gamma)(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_focal_rejects_negative_gamma():
    with pytest.raises(UserError):
        FocalLoss(gamma=-1.)


# ---------------------------------------------------------------- LDAM

def test_ldam_margins_follow_quarter_power_law():
    counts = [5000, 500, 50, 5]
    m = LDAMLoss(counts, max_m=0.5).m_list
    assert m.dtype == torch.float32
    assert m.max().item() == pytest.approx(0.5)
    assert m.argmax().item() == 3  # the rarest class gets the largest margin
    expected = torch.tensor([n ** -0.25 for n in counts])
    torch.testing.assert_close(m, expected / expected.max() * 0.5)


def test_ldam_hand_computed_loss():
    # Two classes with 16 and 1 samples: margins 0.5 * (1/2, 1) = (0.25, 0.5).
    criterion = LDAMLoss([16, 1], max_m=0.5, s=2)
    logits = torch.tensor([[0.3, -0.2], [0.1, 0.4]])
    target = torch.tensor([0, 1])
    # Sample 0: true class 0 -> [0.3-0.25, -0.2] * 2; sample 1: true class 1 -> [0.1, 0.4-0.5] * 2.
    z0 = [0.1, -0.4]
    z1 = [0.2, -0.2]
    nll0 = -z0[0] + math.log(math.exp(z0[0]) + math.exp(z0[1]))
    nll1 = -z1[1] + math.log(math.exp(z1[0]) + math.exp(z1[1]))
    assert criterion(logits, target).item() == pytest.approx((nll0 + nll1) / 2, rel=1e-6)


def test_ldam_weighted_equals_weighted_cross_entropy_on_adjusted_logits():
    logits, target = batch(c=3)
    weight = torch.tensor([0.2, 1.0, 1.8])
    criterion = LDAMLoss([100, 10, 1], max_m=0.5, weight=weight, s=30)
    adjusted = logits.clone()
    adjusted[torch.arange(len(target)), target] -= criterion.m_list[target]
    torch.testing.assert_close(criterion(logits, target),
                               F.cross_entropy(30 * adjusted, target, weight=weight))


def test_ldam_state_moves_with_to():
    criterion = LDAMLoss([10, 5], weight=torch.ones(2))
    assert {name for name, _ in criterion.named_buffers()} == {'m_list', 'weight'}
    # 'meta' is a real device that exists without a GPU, so this checks the device move itself.
    criterion.to('meta')
    assert criterion.m_list.device.type == 'meta' and criterion.weight.device.type == 'meta'
    assert criterion.s == 30


def test_ldam_rejects_empty_class():
    with pytest.raises(UserError):
        LDAMLoss([10, 0, 3])


# ---------------------------------------------------------------- class-balanced weights

def test_effective_num_weights_sum_to_num_classes_and_favour_tail():
    counts = [5000, 2000, 500, 100, 50]
    w = effective_num_weights(counts, beta=0.9999)
    assert w.dtype == torch.float32 and w.shape == (5,)
    assert w.sum().item() == pytest.approx(5.0, rel=1e-5)
    assert (w[1:] > w[:-1]).all()  # fewer samples -> larger weight
    raw = torch.tensor([(1 - 0.9999) / (1 - 0.9999 ** n) for n in counts], dtype=torch.float64)
    torch.testing.assert_close(w, (raw / raw.sum() * 5).float())


def test_effective_num_weights_beta0_is_ones():
    torch.testing.assert_close(effective_num_weights([5000, 50, 1], beta=0), torch.ones(3))


def test_effective_num_weights_empty_class_gets_zero():
    w = effective_num_weights([100, 0, 10], beta=0.999)
    assert torch.isfinite(w).all()
    assert w[1] == 0
    assert w.sum().item() == pytest.approx(3.0, rel=1e-5)


def test_effective_num_weights_rejects_bad_beta():
    with pytest.raises(UserError):
        effective_num_weights([10, 1], beta=1.0)


# ---------------------------------------------------------------- registry

@pytest.mark.parametrize('name,cls', [('CE', nn.CrossEntropyLoss), ('Focal', FocalLoss),
                                      ('LDAM', LDAMLoss)])
def test_build_criterion(name, cls):
    counts = [100, 10, 1]
    weight = effective_num_weights(counts)
    criterion = build_criterion(name, counts, weight=weight)
    assert isinstance(criterion, cls)
    torch.testing.assert_close(criterion.weight, weight)
    logits, target = batch(c=3)
    assert torch.isfinite(criterion(logits, target))


def test_build_criterion_settings_match_paper():
    assert build_criterion('Focal', [10, 1]).gamma == 1
    ldam = build_criterion('LDAM', [10, 1])
    assert ldam.s == 30 and ldam.m_list.max().item() == pytest.approx(0.5)
    assert build_criterion('CE', [10, 1]).weight is None


def test_only_ldam_uses_normed_head():
    assert [name for name in LOSSES if uses_norm(name)] == ['LDAM']


def test_unknown_loss_raises_user_error():
    with pytest.raises(UserError, match="choose one of: CE, Focal, LDAM"):
        build_criterion('Hinge', [10, 1])
