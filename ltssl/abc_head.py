"""ABC, the auxiliary balanced classifier (Lee, Shin & Kim, NeurIPS 2021, "ABC: Auxiliary Balanced Classifier
for Class-imbalanced Semi-supervised Learning"), as an add-on to a FixMatch step. Written from the paper's
equations; its authors' repository (LeeHyuck/ABC) publishes no licence. Defaults and the schedule of the
unlabeled masks as USB's ABC (MIT; semilearn/imb_algorithms/abc/abc.py), which DASO's re-run shares.

A second linear head on the backbone's features, trained on the same batch, its loss added to FixMatch's:
- labeled (Eq. 2): mean_b M_b * CE(g(x_b), y_b), M_b ~ Bernoulli(p_{y_b}), p_c = min_k N_k / N_c with N_k the
  labeled images of class k, so every class is kept as often as the rarest: a balanced classifier;
- unlabeled (Eq. 3-4): the head's own hard pseudo-label q_b = argmax softmax(g(A_w(u_b))) (detached),
  mean_b 1(max >= tau_abc) * M_b * CE(g(A_s(u_b)), q_b) with M_b ~ Bernoulli(1 - (e / E)(1 - p_{q_b})),
  e the 0-based evaluation period and E their number: every pseudo-label counts at first, and by the end
  only as often as the labeled rule keeps its class (USB: `1 - (self.epoch / self.epochs) * (1 - lb_class_dist)`).
The total is L_fixmatch + weight * (labeled + unlabeled). Evaluations score the ABC head (`eval_head`).
The masks are drawn from a generator seeded by the step (SSLBatch.seed), so a resumed run draws the same.
"""
import torch
import torch.nn as nn

from ltssl.fixmatch import AddOn, masked_ce, threshold_mask
from utils import derive_seed

STREAM_ABC = 0x616263


def keep_probabilities(counts):
    """p_c = min_k N_k / N_c, float64 (C,)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    return counts.min() / counts


def unlabeled_keep(p, epoch, epochs):
    """1 - (epoch / epochs) (1 - p): the Bernoulli parameter of the unlabeled masks in evaluation period `epoch`."""
    return 1 - (epoch / epochs) * (1 - p)


class ABC(AddOn):
    name = 'abc'
    eval_head = 'abc'

    def __init__(self, labeled_counts, epochs, threshold=0.95, weight=1.0):
        self.keep = keep_probabilities(labeled_counts)
        self.epochs, self.threshold, self.weight = epochs, threshold, weight
        self.generator = None

    def heads(self, feat_dim, num_classes):
        return {'abc': nn.Linear(feat_dim, num_classes)}

    def _bernoulli(self, p):
        return torch.bernoulli(p, generator=self.generator).float()

    def extra_loss(self, out, batch, n_lb, epoch):
        abc_lb, abc_w, abc_s = out['abc']
        device = abc_lb.device
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
            self.keep = self.keep.to(device)
        self.generator.manual_seed(derive_seed(batch.seed, STREAM_ABC))
        mask_lb = self._bernoulli(self.keep[batch.y_lb])
        loss_lb = masked_ce(abc_lb, batch.y_lb, mask_lb)
        with torch.no_grad():
            probs = torch.softmax(abc_w.detach(), dim=1)
            pseudo = probs.argmax(dim=1)
            keep_u = unlabeled_keep(self.keep, batch.epoch, self.epochs)
            mask_u = threshold_mask(probs, self.threshold) * self._bernoulli(keep_u[pseudo])
        return self.weight * (loss_lb + masked_ce(abc_s, pseudo, mask_u))
