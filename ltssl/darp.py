"""DARP, distribution aligning refinery of pseudo-labels (Kim et al., NeurIPS 2020), as an add-on to a
FixMatch step: the pseudo-labels of all unlabeled images are refined together so that their class totals
match a target distribution, by the convex solver of DARP's code (bbuing9/DARP common.py, MIT; the same in
USB's semilearn/imb_algorithms/darp/utils.py and DASO's lib/algorithm/darp_reproduce.py).

State: `pseudo_orig` (N_u x C), every unlabeled image's latest weak-view softmax, written at every step (all
ranks' rows: they are gathered); `pseudo_refine` (N_u x C), the refined rows of the last solve (uniform before
the first). From step t0 = warm-up epochs x steps per epoch on, a step solves at t0 and every `every` steps
after it and otherwise reads the stored rows; the batch's pseudo-labels are the argmax of its refined rows,
its mask thresholds the refined rows (--darp_mask refined: DARP's and DASO's code) or the raw ones (raw: USB).

A solve, with target totals c (C,), sum N_u:
1. estimate_pseudo: for each class k, the floor(alpha * c_k) images most confident in k form a 0/1 column,
   and w_k = (c_k + 1e-6) / (their summed confidence + 1e-6); every row is scaled by (its 0/1 entries * w)
   and renormalised (+1e-6 before the normalisation).
2. opt_solver on those rows A: with per-row weights 1/H_i (H_i the row's entropy), it looks for
   X_ik = A_ik / e * x_i * exp(-nu_k H_i), rows summing to 1 (x_i by normalisation) and columns to c_k (nu_k by
   scipy's secant method, scipy.optimize.newton without a derivative, from the previous nu, tolerance `tol`
   on nu, at most 30 iterations), alternating the two T times; the rows are normalised once more.
Here the whole solve runs on the training device in float64 (theirs on the host, in NumPy and scipy), so no
step waits for a copy; the secant iterations are scipy's, per class, step for step. Two departures, both
in docs/ltssl.md: a secant step whose two function values are equal returns the midpoint (scipy raises,
which ends their run), and the first solve comes at t0 itself (theirs at the next multiple of 10, the steps
in between using the uniform initial rows: USB then trains confident images towards class 0).
"""
import math

import torch

import dist
from ltssl.fixmatch import AddOn

NEWTON_ITERS = 30  # their num_newton
EPS = 1e-4          # scipy's secant: the second start point x0 * (1 + 1e-4) +- 1e-4


def selection_sizes(target, alpha):
    """floor(alpha * c_k) per class, from the target on the host (their int(self.alpha * q_y[i]))."""
    return [int(alpha * float(c)) for c in torch.as_tensor(target, dtype=torch.float64).cpu()]


def estimate_pseudo(target, probs, sizes):
    """(0/1 selection N x C, per-class weights C): step 1 of the module docstring, `sizes` from
    selection_sizes. float64."""
    selected = torch.zeros_like(probs)
    k_probs = torch.zeros(probs.shape[1], dtype=probs.dtype, device=probs.device)
    for k, take in enumerate(sizes):
        top, index = probs[:, k].sort(descending=True)
        selected[index[:take], k] = 1
        k_probs[k] = top[:take].sum()
    return selected, (target + 1e-6) / (k_probs + 1e-6)


def scaled_rows(probs, target, sizes):
    """The rows the solver starts from (step 1)."""
    selected, weights = estimate_pseudo(target, probs, sizes)
    scaled = probs * (selected * weights[None]) + 1e-6
    return scaled / scaled.sum(dim=1, keepdim=True)


def secant(f, x0, tol, maxiter=NEWTON_ITERS):
    """scipy.optimize.newton(f, x0, tol=tol, maxiter=maxiter) without fprime (the secant method), for every
    entry of x0 at once (f maps (K,) -> (K,) elementwise). Not converged after maxiter: the last iterate."""
    p0 = x0.clone()
    p1 = x0 * (1 + EPS)
    p1 = p1 + torch.where(p1 >= 0, EPS, -EPS)
    q0, q1 = f(p0), f(p1)
    swap = q1.abs() < q0.abs()
    p0, p1 = torch.where(swap, p1, p0), torch.where(swap, p0, p1)
    q0, q1 = torch.where(swap, q1, q0), torch.where(swap, q0, q1)
    done = torch.zeros_like(x0, dtype=torch.bool)
    result = p1.clone()
    for _ in range(maxiter):
        equal = q1 == q0
        p = torch.where(q1.abs() > q0.abs(), (-q0 / q1 * p1 + p0) / (1 - q0 / q1),
                        (-q1 / q0 * p0 + p1) / (1 - q1 / q0))
        p = torch.where(equal, (p1 + p0) / 2, p)
        stop = equal | ((p - p1).abs() <= tol)
        result = torch.where(done, result, p)
        done = done | stop
        p0, q0 = torch.where(done, p0, p1), torch.where(done, q0, q1)
        p1 = torch.where(done, p1, p)
        q1 = torch.where(done, q1, f(p1))
    return result


def opt_solver(probs, target, num_iter, tol):
    """Step 2 of the module docstring: the refined rows (N x C) of `probs` for column totals `target`."""
    entropy = (-probs * torch.log(probs + 1e-6)).sum(dim=1)
    w = (1 / entropy)[:, None]          # (N, 1): their per-row weights
    a_e = probs / math.e
    target = target.to(probs)
    y = torch.exp(-1.0 / w).expand_as(probs)   # nu = 1 at the start
    prev = torch.zeros_like(target)
    for _ in range(num_iter):
        x = 1 / (a_e * y).sum(dim=1, keepdim=True)
        ax = a_e * x
        nu = secant(lambda v: (ax * torch.exp(-v[None] / w)).sum(dim=0) - target, prev, tol)
        prev = nu
        y = torch.exp(-nu[None] / w)
    x = 1 / (a_e * y).sum(dim=1, keepdim=True)
    return a_e * x * y


def refine(probs, target, sizes, num_iter, tol):
    """One DARP solve on the stored predictions `probs` (N x C float32): the refined rows, float32."""
    rows = scaled_rows(probs.double(), target.double(), sizes)
    return opt_solver(rows, target.double(), num_iter, tol).float()


class DARP(AddOn):
    name = 'darp'

    def __init__(self, num_unlabeled, num_classes, target, start_step, every=10, alpha=2.0, num_iter=10, tol=0.1,
                 mask_refined=False):
        self.pseudo_orig = torch.full((num_unlabeled, num_classes), 1 / num_classes)
        self.pseudo_refine = self.pseudo_orig.clone()
        self.target = torch.as_tensor(target, dtype=torch.float64)
        self.sizes = selection_sizes(self.target, alpha)
        self.start_step, self.every, self.num_iter, self.tol = start_step, every, num_iter, tol
        self.mask_refined = mask_refined

    def _to(self, device):
        if self.pseudo_orig.device != device:
            self.pseudo_orig, self.pseudo_refine = self.pseudo_orig.to(device), self.pseudo_refine.to(device)
            self.target = self.target.to(device)

    def pseudo_probs(self, probs_w, batch):
        self._to(probs_w.device)
        index, rows = dist.all_gather_cat(batch.idx_ulb), dist.all_gather_cat(probs_w)
        self.pseudo_orig[index] = rows.to(self.pseudo_orig.dtype)
        t = batch.step
        if t < self.start_step:
            return probs_w, probs_w
        if (t - self.start_step) % self.every == 0:
            self.pseudo_refine = refine(self.pseudo_orig, self.target, self.sizes, self.num_iter, self.tol)
        refined = self.pseudo_refine[batch.idx_ulb]
        return refined, refined if self.mask_refined else probs_w

    def state_dict(self):
        return {'pseudo_orig': self.pseudo_orig, 'pseudo_refine': self.pseudo_refine}

    def load_state_dict(self, state):
        self.pseudo_orig = state['pseudo_orig'].to(self.pseudo_orig.device)
        self.pseudo_refine = state['pseudo_refine'].to(self.pseudo_refine.device)
