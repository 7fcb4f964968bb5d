"""Small helpers the original kept in utils.py: meters, accuracy, seeding; plus shot-group accuracy."""
import os
import random

import numpy as np
import torch

from dataset.samplers import ImbalancedDatasetSampler  # noqa: F401  (the original exported it from here)

# Shot groups as in Liu et al. 2019 (OLTR) and the paper: by number of *training* images per class.
MANY_SHOT_THR = 100
FEW_SHOT_THR = 20


class AverageMeter:
    """Keeps the latest value and the running (sample-weighted) average."""

    def __init__(self, name='', fmt=':f'):
        self.name = name
        self.fmt = fmt
        self.reset()

    def reset(self):
        self.val = 0.
        self.avg = 0.
        self.sum = 0.
        self.count = 0

    def update(self, val, n=1):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count

    def __str__(self):
        return ('{name} {val' + self.fmt + '} ({avg' + self.fmt + '})').format(**self.__dict__)


def accuracy(output, target, topk=(1,)):
    """Top-k accuracies in percent, as a list of 1-element tensors (the original's interface).

    k larger than the number of classes counts as k = C (every prediction is then correct).
    """
    with torch.no_grad():
        maxk = min(max(topk), output.size(1))
        batch_size = target.size(0)
        _, pred = output.topk(maxk, 1, True, True)
        correct = pred.t().eq(target.reshape(1, -1).expand(maxk, -1))
        # reshape, not view: `correct[:k]` is non-contiguous after the transpose.
        return [correct[:min(k, maxk)].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / batch_size)
                for k in topk]


def shot_accuracy(per_class_acc, train_cls_num_list, many_thr=MANY_SHOT_THR, few_thr=FEW_SHOT_THR):
    """Mean per-class accuracy over many- (>many_thr), medium- and few-shot (<few_thr) classes.

    A class absent from the evaluated split (per-class accuracy NaN: 0 of 0 images) is left out of its group, as
    the original's ImageNet-LT shot_acc skips it, so one missing class does not turn its whole group into NaN. A
    group without classes gets NaN, so nobody mistakes "no few-shot classes" for 0 % accuracy.
    """
    acc = np.asarray(per_class_acc, dtype=np.float64)
    present = ~np.isnan(acc)
    acc, counts = acc[present], np.asarray(train_cls_num_list)[present]
    groups = {'many': counts > many_thr, 'medium': (counts <= many_thr) & (counts >= few_thr),
              'few': counts < few_thr}
    return {name: float(acc[mask].mean()) if mask.any() else float('nan') for name, mask in groups.items()}


def new_figure(figsize):
    """A matplotlib figure outside pyplot (its Agg canvas is found when saving): no global list of open
    figures to close, nothing shared between the threads reproduce.py may run stages in, no GUI backend
    looked for, and a plot redrawn every epoch stays cheap."""
    from matplotlib.figure import Figure
    return Figure(figsize=figsize)


def figure_png(fig, dpi=80):
    """A figure (from new_figure) as PNG bytes, for atomic writes of plots."""
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=dpi)
    return buf.getvalue()


def derive_seed(*numbers):
    """A 63-bit seed mixed from integers, e.g. (run seed, epoch, rank): distinct tuples give
    unrelated streams (SeedSequence hashes them), unlike seed + epoch, where (s, e + 1) == (s + 1, e)."""
    entropy = [int(n) % 2 ** 64 for n in numbers]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too
    os.environ['PYTHONHASHSEED'] = str(seed)


def rng_state():
    """Every RNG stream a training step touches, in a form `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': {'kind': kind, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'cached': float(cached)},
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_as_tuple(state['python']))
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


def _as_tuple(x):
    # random.setstate wants tuples; a save/load round trip may hand lists back.
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
