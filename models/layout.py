"""Gradients that keep the activations' memory format.

Autograd's own backward of a global mean (every model's last pooling) and of a strided slice (the CIFAR
ResNets' shortcut) writes the gradient into a fresh NCHW tensor. With a channels_last model the next
activation's backward then mixes two layouts, 10-20 times slower on a CPU than one: 1.5 ms against 0.07 ms
for a (128, 64, 8, 8) bf16 ReLU backward on the 2-core EPYC (bench/README.md). What is here computes the
same values, bit for bit (tests/test_models.py), in the input's layout.
"""
import torch
import torch.nn.functional as F


def memory_format_of(x):
    """channels_last if the 4-D tensor x is laid out so (and not also plainly contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class _GlobalAvgPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.shape, ctx.memory_format = x.shape, memory_format_of(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    @staticmethod
    def backward(ctx, grad):
        # Every pixel gets its channel's gradient divided by H * W, as autograd's backward of the mean divides.
        n, c, h, w = ctx.shape
        return (grad / (h * w)).view(n, c, 1, 1).expand(ctx.shape).contiguous(memory_format=ctx.memory_format)


def global_avg_pool(x):
    """adaptive_avg_pool2d(x, 1).flatten(1): (N, C, H, W) -> (N, C)."""
    return _GlobalAvgPool.apply(x)
