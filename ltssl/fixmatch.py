"""One FixMatch step (Sohn et al., NeurIPS 2020), the add-on protocol, and the supervised-only step.

FixMatch, as in its authors' and USB's code: one forward pass over cat(labeled weak, unlabeled weak,
unlabeled strong) (BatchNorm over the whole batch), then
    L = CE(f(x_lb), y_lb) + lambda_u * mean_b[ 1(max q_b >= tau) * CE(f(A_s(u_b)), argmax q_b) ]
with q_b = softmax(f(A_w(u_b))) of the detached weak logits, the mean over all mu * B unlabeled images
and the threshold inclusive (torch's `ge`). Losses are computed in float32 on logits taken out of autocast.

An add-on (ABC, DARP) changes the step only at these points, called in this order, each a no-op by default:
    heads(feat_dim, C)                    extra heads on the features: {name: module}
    pseudo_probs(probs_w, batch)          -> (probs the pseudo-labels are the argmax of, probs the mask
                                          thresholds): DARP's refined rows
    extra_loss(out, batch, n_lb, epoch)   a loss added to L: ABC's
    state_dict() / load_state_dict(d)     what exact resume needs
and names the head evaluations score (`eval_head`). A step with no add-on is plain FixMatch.
"""
import torch
import torch.nn.functional as F


class AddOn:
    """The extension points of a FixMatch step (module docstring)."""
    name = ''
    eval_head = 'logits'

    def heads(self, feat_dim, num_classes):
        return {}

    def pseudo_probs(self, probs_w, batch):
        return probs_w, probs_w

    def extra_loss(self, out, batch, n_lb, epoch):
        return None

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def threshold_mask(probs, threshold):
    """(mu B,) float 1/0: whether the top probability reaches `threshold` (inclusive)."""
    return probs.max(dim=1).values.ge(threshold).float()


def masked_ce(logits, targets, mask):
    """mean_b mask_b * CE(logits_b, targets_b) over the whole batch (masked-out images count in the mean)."""
    return (F.cross_entropy(logits, targets, reduction='none') * mask).mean()


def split_outputs(out, n_lb, n_u):
    """{name: (labeled, unlabeled weak, unlabeled strong)} of a forward pass over the concatenated batch,
    float32."""
    return {k: (v[:n_lb].float(), v[n_lb:n_lb + n_u].float(), v[n_lb + n_u:].float()) for k, v in out.items()}


class FixMatchStep:
    """step(run, batch, epoch, step) -> (loss, labeled logits, labels) for engine.train_one_epoch; `run(x)`
    is the model's forward pass under the step's autocast. `observe(raw, used, mask, batch)`: the pseudo-label
    diagnostics (ltssl.diagnostics), or None."""

    def __init__(self, threshold, lambda_u, addons=(), observe=None):
        self.threshold, self.lambda_u, self.addons, self.observe = threshold, lambda_u, tuple(addons), observe

    def __call__(self, run, batch, epoch, step):
        n_lb, n_u = batch.y_lb.numel(), batch.idx_ulb.numel()
        out = split_outputs(run(torch.cat([batch.x_lb, batch.x_ulb_w, batch.x_ulb_s])), n_lb, n_u)
        logits_lb, logits_w, logits_s = out['logits']
        sup = F.cross_entropy(logits_lb, batch.y_lb)
        probs_w = torch.softmax(logits_w.detach(), dim=1)
        label_probs, mask_probs = probs_w, probs_w
        for addon in self.addons:
            label_probs, mask_probs = addon.pseudo_probs(label_probs, batch)
        mask = threshold_mask(mask_probs, self.threshold)
        pseudo = label_probs.argmax(dim=1)
        loss = sup + self.lambda_u * masked_ce(logits_s, pseudo, mask)
        for addon in self.addons:
            extra = addon.extra_loss(out, batch, n_lb, epoch)
            if extra is not None:
                loss = loss + extra
        if self.observe is not None:
            self.observe(probs_w, label_probs, mask, batch)
        return loss, logits_lb, batch.y_lb


class SupervisedStep:
    """The labeled batch alone: CE(f(x_lb), y_lb) (USB's `supervised` row)."""

    def __call__(self, run, batch, epoch, step):
        logits = run(batch.x_lb)['logits'].float()
        return F.cross_entropy(logits, batch.y_lb), logits, batch.y_lb
