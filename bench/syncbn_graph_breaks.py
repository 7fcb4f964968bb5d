"""Does torch.compile keep a DDP ResNet with SyncBatchNorm in one graph? (why trainer.compile_in_place
skips --compile with SyncBatchNorm). Two gloo ranks on the CPU:

    TORCH_LOGS=graph_breaks,recompiles OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/syncbn_graph_breaks.py
    SYNC_BN=0 ... the same model with plain BatchNorm, for comparison

SyncBatchNorm's statistics operators (batch_norm_stats, batch_norm_gather_stats_with_counts,
batch_norm_elemt and their backward) have CUDA kernels only; CPU ones are registered here from their
definitions, and SyncBatchNorm.forward's device list gets "cpu" (its code otherwise unchanged, as
dynamo traces it). Rank 0 prints each step's time and dynamo's counters (graph breaks, unique graphs).
"""
import inspect
import os
import sys
import textwrap
import time

import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torch.nn.modules import batchnorm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import build_model  # noqa: E402


def _reduced(x):
    return [d for d in range(x.dim()) if d != 1]


def _per_channel(t, x):
    return t.view([1, -1] + [1] * (x.dim() - 2))


def stats(x, eps):
    return x.mean(_reduced(x)), (x.var(_reduced(x), unbiased=False) + eps).rsqrt()


def gather_stats(x, mean, invstd, running_mean, running_var, momentum, eps, counts):
    n = counts.sum()
    total_mean = (counts[:, None] * mean).sum(0) / n
    total_var = (counts[:, None] * (invstd.pow(-2) - eps + (mean - total_mean) ** 2)).sum(0) / n
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(momentum * total_mean)
    if running_var is not None:
        running_var.mul_(1 - momentum).add_(momentum * total_var * n / (n - 1))
    return total_mean, (total_var + eps).rsqrt()


def elemt(x, weight, bias, mean, invstd, eps):
    y = (x - _per_channel(mean, x)) * _per_channel(invstd, x)
    y = y * _per_channel(weight, x) if weight is not None else y
    y = y + _per_channel(bias, x) if bias is not None else y
    return y.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and x.is_contiguous(
        memory_format=torch.channels_last) else y


def backward_reduce(dy, x, mean, invstd, weight, input_g, weight_g, bias_g):
    sum_dy = dy.sum(_reduced(x))
    sum_dy_xmu = (dy * (x - _per_channel(mean, x))).sum(_reduced(x))
    return sum_dy, sum_dy_xmu, sum_dy_xmu * invstd if weight_g else None, sum_dy if bias_g else None


def backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    n, inv = count.sum(), _per_channel(invstd, x)
    grad = (dy - _per_channel(sum_dy / n, x) - (x - _per_channel(mean, x)) * inv * inv
            * _per_channel(sum_dy_xmu / n, x)) * inv
    return grad * _per_channel(weight, x) if weight is not None else grad


def allow_syncbn_on_cpu():
    library = torch.library.Library('aten', 'IMPL')
    for name, fn in (('batch_norm_stats', stats), ('batch_norm_gather_stats_with_counts', gather_stats),
                     ('batch_norm_elemt', elemt), ('batch_norm_backward_reduce', backward_reduce),
                     ('batch_norm_backward_elemt', backward_elemt)):
        library.impl(name, fn, 'CPU')
    source = textwrap.dedent(inspect.getsource(batchnorm.SyncBatchNorm.forward))
    assert source.count('"xpu",') == 1, 'SyncBatchNorm.forward changed: update this check'
    namespace = {}
    exec(compile(source.replace('"xpu",', '"xpu", "cpu",'), batchnorm.__file__, 'exec'), vars(batchnorm), namespace)
    batchnorm.SyncBatchNorm.forward = namespace['forward']
    nn.parallel.DistributedDataParallel._passing_sync_batchnorm_handle = lambda self, module: None
    return library


def main():
    library = allow_syncbn_on_cpu()  # noqa: F841 (the registrations live as long as it does)
    torch_dist.init_process_group('gloo')
    torch.manual_seed(0)
    model = build_model(os.environ.get('ARCH', 'resnet32'), 10)
    if os.environ.get('SYNC_BN', '1') == '1':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = nn.parallel.DistributedDataParallel(model.to(memory_format=torch.channels_last))
    model.compile()
    optimizer = torch.optim.SGD(model.parameters(), 0.1)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    for step in range(3):
        start = time.time()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if torch_dist.get_rank() == 0:
            print(f"step {step}: {time.time() - start:.1f} s", flush=True)
    if torch_dist.get_rank() == 0:
        from torch._dynamo.utils import counters
        print('unique graphs:', counters['stats']['unique_graphs'], '; graph breaks:',
              sum(counters['graph_break'].values()))
        for reason, count in counters['graph_break'].items():
            print(f"  {count} x {reason.splitlines()[0]}: {reason.splitlines()[1].strip()[:120]}")
    torch_dist.destroy_process_group()


if __name__ == '__main__':
    main()
