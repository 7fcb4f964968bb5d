"""The exponential moving average of a network's weights, which FixMatch-family code evaluates.

Two styles, as their codes do it, with `decay` d and t the number of updates before this one:
- 'copy' (kekmodel's ModelEMA, USB's EMA hook): parameters e <- d e + (1 - d) p; buffers (BatchNorm's
  running statistics) copied from the network.
- 'daso' (DASO's EMAModel): the decay warms up, d_t = min(1 - 1 / (t + 1), d), so the first update copies
  the network; parameters and floating-point buffers alike e <- d_t e + (1 - d_t) p (counters are copied).
The average starts as a copy of the network. A decay of 0 makes it the network itself after every step.
"""
import copy

import torch

STYLES = ('copy', 'daso')


class EMA:
    """`module`: a deep copy of the network (no gradients), moved along with it by whoever places it."""

    def __init__(self, net, decay, style='copy'):
        if style not in STYLES:
            raise ValueError(f"unknown EMA style {style!r}")
        self.module = copy.deepcopy(net)
        self.module.requires_grad_(False)
        self.decay, self.style = decay, style
        self.updates = 0  # t

    @torch.no_grad()
    def update(self, net):
        d = self.decay if self.style == 'copy' else min(1 - 1 / (self.updates + 1), self.decay)
        averaged = list(self.module.parameters())
        torch._foreach_mul_(averaged, d)
        torch._foreach_add_(averaged, [p.detach() for p in net.parameters()], alpha=1 - d)
        for e, b in zip(self.module.buffers(), net.buffers()):
            if self.style == 'daso' and e.is_floating_point():
                e.mul_(d).add_(b, alpha=1 - d)
            else:
                e.copy_(b)
        self.updates += 1

    def load_updates(self, updates):
        self.updates = updates
