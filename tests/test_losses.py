"""Losses: Focal == CE at gamma 0, numerical stability, LDAM margins, class-balanced weights, Balanced
Softmax and the logit-adjusted loss (values, gradients, the authors' formulas)."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError
from losses import (
    LOSSES, AdaptiveLogitAdjustedLoss, BalancedSoftmaxLoss, FocalLoss, LDAMLoss, LogitAdjustedLoss, build_criterion,
    effective_num_weights, uses_norm,
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


# ---------------------------------------------------------------- Balanced Softmax, logit-adjusted loss

# 6, 3 and 1 training images: prior 0.6, 0.3, 0.1.
COUNTS = [6, 3, 1]
PRIOR = [0.6, 0.3, 0.1]


def _adjusted_nll(row, y, tau):
    """-log(pi_y^tau e^{f_y} / sum_c pi_c^tau e^{f_c}), written out with math on one row of logits."""
    terms = [p ** tau * math.exp(f) for p, f in zip(PRIOR, row)]
    return -math.log(terms[y] / sum(terms))


def test_balanced_softmax_hand_computed_loss():
    logits = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]])
    target = torch.tensor([2, 0])
    expected = (_adjusted_nll([1.0, 0.0, 2.0], 2, 1) + _adjusted_nll([0.5, -1.0, 0.0], 0, 1)) / 2
    assert BalancedSoftmaxLoss(COUNTS)(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # the prior is the training label distribution, in log space
    torch.testing.assert_close(BalancedSoftmaxLoss(COUNTS).log_prior, torch.tensor(PRIOR).log())


@pytest.mark.parametrize('tau', [0.0, 0.5, 2.0])
def test_logit_adjusted_hand_computed_loss(tau):
    logits = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]])
    target = torch.tensor([2, 1])
    expected = (_adjusted_nll([1.0, 0.0, 2.0], 2, tau) + _adjusted_nll([0.5, -1.0, 0.0], 1, tau)) / 2
    assert LogitAdjustedLoss(COUNTS, tau=tau)(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_logit_adjusted_tau0_is_cross_entropy_and_tau1_is_balanced_softmax():
    logits, target = batch(c=3)
    torch.testing.assert_close(LogitAdjustedLoss(COUNTS, tau=0.0)(logits, target), F.cross_entropy(logits, target))
    torch.testing.assert_close(LogitAdjustedLoss(COUNTS, tau=1.0)(logits, target),
                               BalancedSoftmaxLoss(COUNTS)(logits, target))


def test_logit_adjusted_gradient_is_adjusted_softmax_minus_one_hot():
    # d/df_c of -log(pi_y^tau e^{f_y} / Z) = pi_c^tau e^{f_c} / Z - [c = y], for one image.
    row, y, tau = [1.0, 0.0, 2.0], 0, 2.0
    logits = torch.tensor([row], requires_grad=True)
    LogitAdjustedLoss(COUNTS, tau=tau)(logits, torch.tensor([y])).backward()
    terms = [p ** tau * math.exp(f) for p, f in zip(PRIOR, row)]
    expected = [t / sum(terms) - (c == y) for c, t in enumerate(terms)]
    np.testing.assert_allclose(logits.grad[0].numpy(), expected, rtol=1e-5, atol=1e-7)


def test_logit_adjusted_with_class_weights_is_the_weighted_mean():
    # As CE takes a weight: sum_i w[y_i] l_i / sum_i w[y_i], l_i the unweighted adjusted loss.
    rows, ys, w = [[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [0.0, 3.0, -1.0]], [2, 0, 1], [0.2, 1.0, 5.0]
    tau = 0.5
    expected = sum(w[y] * _adjusted_nll(r, y, tau) for r, y in zip(rows, ys)) / sum(w[y] for y in ys)
    criterion = LogitAdjustedLoss(COUNTS, tau=tau, weight=torch.tensor(w))
    assert criterion(torch.tensor(rows), torch.tensor(ys)).item() == pytest.approx(expected, rel=1e-6)
    weighted_bs = BalancedSoftmaxLoss(COUNTS, weight=torch.tensor(w))(torch.tensor(rows), torch.tensor(ys))
    assert weighted_bs.item() == pytest.approx(
        sum(w[y] * _adjusted_nll(r, y, 1) for r, y in zip(rows, ys)) / sum(w[y] for y in ys), rel=1e-6)


def _authors_balanced_softmax(logits, target, counts):
    """BalancedMetaSoftmax-Classification, loss/BalancedSoftmaxLoss.py: logits + log(sample_per_class)."""
    spc = torch.tensor(counts, dtype=logits.dtype).unsqueeze(0).expand(logits.shape[0], -1)
    return F.cross_entropy(logits + spc.log(), target)


def _authors_logit_adjusted(logits, target, counts, tau):
    """google-research logit_adjustment: base_probs = counts / sum, logits + log(base_probs**tau + 1e-12)."""
    base_probs = torch.tensor(counts, dtype=logits.dtype) / sum(counts)
    return F.cross_entropy(logits + torch.log(base_probs ** tau + 1e-12), target)


CASES = {
    'random': (torch.randn(64, 5, generator=torch.Generator().manual_seed(1)) * 3,
               torch.randint(0, 5, (64,), generator=torch.Generator().manual_seed(2)), [500, 120, 40, 9, 1]),
    'extreme': (torch.tensor([[1e4, 0., -3.], [0., 1e4, 2.], [-1e4, 1e4, 0.]]), torch.tensor([0, 2, 0]), [100, 10, 1]),
    'one image in a class': (torch.tensor([[0.2, 0.1], [0.0, 0.3]]), torch.tensor([1, 1]), [1000, 1]),
}


@pytest.mark.parametrize('case', list(CASES))
def test_balanced_softmax_equals_the_authors_formula(case):
    logits, target, counts = CASES[case]
    expected = _authors_balanced_softmax(logits.double(), target, counts)
    torch.testing.assert_close(BalancedSoftmaxLoss(counts)(logits, target).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('case', list(CASES))
@pytest.mark.parametrize('tau', [0.5, 1.0, 2.0])
def test_logit_adjusted_equals_the_authors_formula(case, tau):
    logits, target, counts = CASES[case]
    logits = logits.clone().requires_grad_()
    loss = LogitAdjustedLoss(counts, tau=tau)(logits, target)
    expected = _authors_logit_adjusted(logits.detach().double(), target, counts, tau)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_logit_adjustment_state_moves_with_to():
    criterion = LogitAdjustedLoss([10, 5], tau=2.0, weight=torch.ones(2)).to('meta')
    assert criterion.log_prior.device.type == 'meta' and criterion.weight.device.type == 'meta'


@pytest.mark.parametrize('make', [lambda c: BalancedSoftmaxLoss(c), lambda c: LogitAdjustedLoss(c, tau=1.0)])
def test_logit_adjustment_rejects_empty_class(make):
    with pytest.raises(UserError, match='at least one training image in every class'):
        make([10, 0, 3])


def test_logit_adjusted_rejects_negative_tau():
    with pytest.raises(UserError, match='tau must be >= 0'):
        LogitAdjustedLoss([10, 1], tau=-0.5)


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


# ---------------------------------------------------------------- logit adjustment + adaptive margin

@pytest.mark.parametrize('tau', [1.0, 0.5])
def test_adaptive_logit_adjusted_is_menons_pairwise_margin_loss(tau):
    """Menon et al. (ICLR 2021) Sec. 6.2: the pairwise margin loss log(1 + sum_{y' != y} exp(Delta_yy' + f_y' - f_y))
    with Delta_yy' = tau log(pi_y' / pi_y) + pi_y^(-1/4), written out per image."""
    counts = [60, 25, 10, 4, 1]
    prior = np.array(counts, dtype=np.float64) / 100
    logits, target = batch(c=5, seed=3)
    expected = []
    for f, y in zip(logits.double().numpy(), target.numpy()):
        delta = tau * np.log(prior / prior[y]) + prior[y] ** -0.25
        others = [c for c in range(5) if c != y]
        expected.append(np.log1p(np.sum(np.exp(delta[others] + f[others] - f[y]))))
    loss = AdaptiveLogitAdjustedLoss(counts, tau=tau)(logits, target)
    assert loss.item() == pytest.approx(np.mean(expected), rel=1e-5)
    # the margins: prior^(-1/4), not rescaled (LDAM's would be 0.5 at most)
    np.testing.assert_allclose(AdaptiveLogitAdjustedLoss(counts).margin.numpy(), prior ** -0.25, rtol=1e-6)
    assert AdaptiveLogitAdjustedLoss(counts).margin[-1].item() == pytest.approx(100 ** 0.25, rel=1e-6)


def test_adaptive_logit_adjusted_with_class_weights_is_the_weighted_mean():
    counts, w = [8, 4, 2], torch.tensor([0.5, 1.0, 2.0])
    logits, target = batch(c=3, seed=4)
    per_image = F.cross_entropy(logits + torch.log(torch.tensor(counts) / 14.0)
                                - F.one_hot(target, 3) * (torch.tensor(counts) / 14.0).pow(-0.25)[target][:, None],
                                target, reduction='none')
    expected = (w[target] * per_image).sum() / w[target].sum()
    torch.testing.assert_close(AdaptiveLogitAdjustedLoss(counts, weight=w)(logits, target), expected)


# ---------------------------------------------------------------- registry

@pytest.mark.parametrize('name,cls', [('CE', nn.CrossEntropyLoss), ('Focal', FocalLoss),
                                      ('LDAM', LDAMLoss), ('BalancedSoftmax', BalancedSoftmaxLoss),
                                      ('LogitAdjusted', LogitAdjustedLoss),
                                      ('LogitAdjustedAdaptive', AdaptiveLogitAdjustedLoss)])
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
    assert build_criterion('BalancedSoftmax', [10, 1]).tau == 1.0
    assert build_criterion('LogitAdjusted', [10, 1]).tau == 1.0  # --la_tau's default
    assert build_criterion('LogitAdjusted', [10, 1], la_tau=2.5).tau == 2.5
    assert build_criterion('LogitAdjustedAdaptive', [10, 1], la_tau=2.5).tau == 2.5


def test_only_ldam_uses_normed_head():
    assert [name for name in LOSSES if uses_norm(name)] == ['LDAM']


def test_unknown_loss_raises_user_error():
    with pytest.raises(UserError, match="choose one of: CE, Focal, LDAM"):
        build_criterion('Hinge', [10, 1])
