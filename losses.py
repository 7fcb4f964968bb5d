"""Losses for class-imbalanced training: CE, Focal, LDAM, class-balanced re-weighting, and (added,
not in the original) Balanced Softmax, the logit-adjusted loss (also with Cao et al.'s adaptive margin),
post-hoc logit adjustment, and weight balancing's class-balanced loss and MaxNorm.

All state (class weights, margins) lives in registered buffers, so `criterion.to(device)` moves
it together with the model. Shapes: logits (N, C), target (N,) int64 class ids.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError


def effective_num_weights(cls_num_list, beta=0.9999):
    """Class-balanced weights (Cui et al. 2019, "Class-Balanced Loss Based on Effective Number
    of Samples"): w_j = (1 - beta) / (1 - beta^n_j), rescaled so the C weights sum to C.

    beta = 0 gives all ones (no re-weighting; DRW uses it before its switch epoch); beta -> 1
    approaches inverse class frequency. A class with n_j = 0 gets weight 0 (its formula would
    divide by zero, and it never appears as a target anyway). Returns a float32 tensor (C,).
    """
    if not 0 <= beta < 1:
        raise UserError(f"class-balancing beta must be in [0, 1), got {beta}")
    counts = np.asarray(cls_num_list, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = (1.0 - beta) / (1.0 - np.power(beta, counts[present]))
    weights = weights / weights.sum() * len(counts)
    return torch.tensor(weights, dtype=torch.float32)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017) exactly as the original code computes it, class weights included:

        ce_i = w[y_i] * (-log p_{y_i})          (F.cross_entropy(..., weight=w, reduction='none'))
        loss = mean_i (1 - exp(-ce_i))^gamma * ce_i

    With weights, the weight enters the modulating factor too (exp(-ce_i) = p_y^w[y], not p_y); this
    is the loss behind the paper's CB-Focal numbers, so it is kept. Without weights it is the
    textbook -(1 - p_y)^gamma log p_y. gamma = 0 is (weighted) cross-entropy with an unweighted batch
    mean. Computed from log-softmax, so extreme logits give no NaN.
    """

    def __init__(self, weight=None, gamma=0.):
        super().__init__()
        if gamma < 0:
            raise UserError(f"focal loss gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.register_buffer('weight', weight)

    def forward(self, logits, target):
        ce = -F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)  # (N,) -log p_y >= 0
        if self.weight is not None:
            ce = ce * self.weight[target]
        # 1 - exp(-ce) = -expm1(-ce) stays accurate when ce is tiny; clamping away from 0 keeps pow's
        # gradient gamma * (1 - exp(-ce))^(gamma - 1) finite for 0 < gamma < 1.
        modulator = (-torch.expm1(-ce)).clamp_min(torch.finfo(ce.dtype).tiny)
        return (modulator.pow(self.gamma) * ce).mean()


class LDAMLoss(nn.Module):
    """Label-Distribution-Aware Margin loss (Cao et al. 2019, "Learning Imbalanced Datasets with
    Label-Distribution-Aware Margin Loss").

    Class j gets margin m_j proportional to n_j^(-1/4), scaled so the largest (rarest class) is
    max_m. The margin is subtracted from the true-class logit only, then cross-entropy is taken
    on s * logits. Meant for cosine logits in [-1, 1] (NormedLinear head), hence the scale s.
    """

    def __init__(self, cls_num_list, max_m=0.5, weight=None, s=30):
        super().__init__()
        counts = np.asarray(cls_num_list, dtype=np.float64)
        if (counts <= 0).any():
            raise UserError("LDAM needs at least one training sample in every class")
        if s <= 0:
            raise UserError(f"LDAM scale s must be positive, got {s}")
        m_list = counts ** -0.25
        m_list = m_list * (max_m / m_list.max())
        self.register_buffer('m_list', torch.tensor(m_list, dtype=torch.float32))  # (C,)
        self.register_buffer('weight', weight)
        self.s = s

    def forward(self, logits, target):
        is_target = F.one_hot(target, logits.shape[1]).to(logits.dtype)  # (N, C)
        margins = self.m_list[target][:, None] * is_target  # m_y in the true-class column only
        return F.cross_entropy(self.s * (logits - margins), target, weight=self.weight)


def log_prior(cls_num_list, what):
    """log(n_c / N) per class as a float32 tensor (C,): the log of the training label distribution.
    An empty class would get -inf (post-hoc adjustment would then predict it for every image), so
    it is refused, as LDAM refuses it."""
    counts = np.asarray(cls_num_list, dtype=np.float64)
    if (counts <= 0).any():
        raise UserError(f"{what} needs at least one training image in every class (the log prior of an "
                        f"empty class is -inf)")
    return torch.tensor(np.log(counts / counts.sum()), dtype=torch.float32)


def _check_tau(tau, what):
    if not tau >= 0:
        raise UserError(f"{what} tau must be >= 0, got {tau}")


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted loss (Menon et al., ICLR 2021, "Long-tail learning via logit adjustment"):

        loss = CE(logits + tau * log prior, y),   prior_c = n_c / N (training images per class)

    i.e. -log(pi_y^tau e^{f_y} / sum_c pi_c^tau e^{f_c}). The logits the model outputs are used
    unadjusted at test time. A per-class `weight` enters as in CE: F.cross_entropy's weighted mean,
    sum_i w[y_i] l_i / sum_i w[y_i]. (The authors' TensorFlow code adds log(prior^tau + 1e-12); the
    1e-12 only matters for a prior below about 1e-10.)
    """

    def __init__(self, cls_num_list, tau=1.0, weight=None):
        super().__init__()
        _check_tau(tau, 'logit adjustment')
        self.tau = tau
        self.register_buffer('log_prior', log_prior(cls_num_list, 'the logit-adjusted loss'))  # (C,)
        self.register_buffer('weight', weight)

    def forward(self, logits, target):
        return F.cross_entropy(logits + self.tau * self.log_prior, target, weight=self.weight)


class AdaptiveLogitAdjustedLoss(LogitAdjustedLoss):
    """Logit adjustment plus Cao et al.'s adaptive margin (Menon et al., ICLR 2021, Sec. 6.2 "Discussion and
    extensions", Table 4 last row): the pairwise margin loss with Delta_{yy'} = tau * log(pi_y' / pi_y) + pi_y^(-1/4),

        loss = CE(logits + tau * log prior - m_y * onehot(y), y),   m_c = prior_c^(-1/4),

    i.e. the logit-adjusted loss with the margin m_y subtracted from the true class's adjusted logit. The margin is
    theirs: prior^(-1/4) on the plain logits (no scale s, not rescaled to a largest margin of 0.5 as LDAM's).
    Their released code has only the logit-adjusted loss; the formula is the paper's."""

    def __init__(self, cls_num_list, tau=1.0, weight=None):
        super().__init__(cls_num_list, tau, weight)
        self.register_buffer('margin', torch.exp(-0.25 * self.log_prior))  # (C,) prior^(-1/4)

    def forward(self, logits, target):
        adjusted = logits + self.tau * self.log_prior
        adjusted = adjusted - F.one_hot(target, logits.shape[1]).to(logits.dtype) * self.margin[target][:, None]
        return F.cross_entropy(adjusted, target, weight=self.weight)


class BalancedSoftmaxLoss(LogitAdjustedLoss):
    """Balanced Softmax (Ren et al., NeurIPS 2020, "Balanced Meta-Softmax for Long-Tailed Visual
    Recognition"): CE(logits + log prior, y), the logit-adjusted loss at tau = 1. The authors' code adds
    log n_c rather than log(n_c / N): the same loss, since a softmax ignores a shift shared by all classes."""

    def __init__(self, cls_num_list, weight=None):
        super().__init__(cls_num_list, tau=1.0, weight=weight)


class PosthocLogitAdjustment(nn.Module):
    """`model` whose logits come out as logits - tau * log prior (Menon et al. 2021, post-hoc logit
    adjustment): for evaluating a classifier trained on long-tailed data; training is unchanged.
    (The attribute is `classifier`, not `module`: checkpoint.unwrap would take it for a DDP wrapper.)"""

    def __init__(self, model, cls_num_list, tau):
        super().__init__()
        _check_tau(tau, 'post-hoc logit adjustment')
        self.classifier = model
        self.tau = tau
        self.register_buffer('log_prior', log_prior(cls_num_list, 'post-hoc logit adjustment'))

    def forward(self, images):
        return self.classifier(images) - self.tau * self.log_prior


class ClassBalancedSoftmaxBCELoss(nn.Module):
    """The class-balanced loss of weight balancing's stage 2 (Alshammari et al., CVPR 2022), as their code computes
    it (LTR-weight-balancing utils/class_balanced_loss.py, CB_loss(..., "softmax", beta=0.9999), from Cui et al.
    2019's reference code): binary cross-entropy between the softmax probabilities and the one-hot target, every
    one of image i's C terms weighted by w[y_i] = effective_num_weights(cls_num_list, beta)[y_i], averaged over
    the N x C terms:

        loss = 1/(N C) sum_i sum_c w[y_i] * -(t_ic log p_ic + (1 - t_ic) log(1 - p_ic)),  p_i = softmax(z_i)

    (not the weighted cross-entropy of --train_rule Reweight). Logs are clamped at -100, as
    F.binary_cross_entropy does."""

    def __init__(self, cls_num_list, beta=0.9999):
        super().__init__()
        self.register_buffer('weight', effective_num_weights(cls_num_list, beta))  # (C,)

    def forward(self, logits, target):
        probs = logits.softmax(dim=1)
        one_hot = F.one_hot(target, logits.shape[1]).to(probs.dtype)
        return F.binary_cross_entropy(probs, one_hot, weight=self.weight[target][:, None].expand_as(probs))


class MaxNorm:
    """MaxNorm by projected gradient descent (Alshammari et al., CVPR 2022, "Long-Tailed Recognition via Weight
    Balancing"; their utils/regularizers.py MaxNorm_via_PGD): each row of a classifier's weight matrix (one
    class, C x D) whose L2 norm exceeds `radius` is scaled back onto the ball of that radius; rows inside it
    stay as they are. Call it with the weight after an optimizer step (a step hook); the bias is not
    constrained (theirs gets an infinite threshold)."""

    def __init__(self, radius):
        self.radius = float(radius)

    @classmethod
    def from_weight(cls, weight, thresh=0.1):
        """Their radius: min + thresh * (max - min) of the row norms of the weight training starts from."""
        norms = weight.detach().norm(p=2, dim=1)
        return cls(norms.min() + thresh * (norms.max() - norms.min()))

    @torch.no_grad()
    def __call__(self, weight):
        norms = weight.norm(p=2, dim=1, keepdim=True)  # (C, 1)
        # on the device, no host sync: rows within the ball are multiplied by 1
        weight.mul_(torch.where(norms > self.radius, self.radius / norms, torch.ones_like(norms)))


# name -> builder(cls_num_list, weight, la_tau); `weight` is a per-class tensor (C,) or None, `la_tau`
# the logit-adjusted loss's tau (--la_tau).
LOSSES = {
    'CE': lambda cls_num_list, weight, la_tau: nn.CrossEntropyLoss(weight=weight),
    'Focal': lambda cls_num_list, weight, la_tau: FocalLoss(weight=weight, gamma=1),
    'LDAM': lambda cls_num_list, weight, la_tau: LDAMLoss(cls_num_list, max_m=0.5, s=30, weight=weight),
    'BalancedSoftmax': lambda cls_num_list, weight, la_tau: BalancedSoftmaxLoss(cls_num_list, weight=weight),
    'LogitAdjusted': lambda cls_num_list, weight, la_tau: LogitAdjustedLoss(cls_num_list, tau=la_tau, weight=weight),
    'LogitAdjustedAdaptive': lambda cls_num_list, weight, la_tau: AdaptiveLogitAdjustedLoss(cls_num_list, tau=la_tau,
                                                                                           weight=weight),
}

# LDAM's margins are calibrated for cosine logits, so the model needs NormedLinear (use_norm=True).
USES_NORMED_HEAD = frozenset({'LDAM'})


def uses_norm(loss_type):
    """Whether the model for `loss_type` should be built with use_norm=True (cosine head)."""
    return loss_type in USES_NORMED_HEAD


def build_criterion(loss_type, cls_num_list, weight=None, la_tau=1.0):
    """Build the training loss by name (a key of LOSSES) as an nn.Module."""
    if loss_type not in LOSSES:
        raise UserError(f"unknown loss type {loss_type!r}; choose one of: {', '.join(LOSSES)}")
    return LOSSES[loss_type](cls_num_list, weight, la_tau)
