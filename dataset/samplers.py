"""Samplers whose order is a pure function of (seed, epoch), so a run can be resumed mid-epoch
and split across DDP processes.

Each epoch: draw the global order from a generator seeded by (seed, epoch), pad it by repeating
from the start to a multiple of num_replicas (as DistributedSampler does), take every
num_replicas-th index from `rank`, and skip the indices this rank already consumed.
"""
import math

import numpy as np
import torch
from torch.utils.data import Sampler, Subset

from losses import effective_num_weights


def get_targets(dataset):
    """Class labels of a data set (its `.targets` or `.labels`) as an int64 array; through Subsets."""
    if isinstance(dataset, Subset):
        return get_targets(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    for attr in ('targets', 'labels'):
        if hasattr(dataset, attr):
            return np.asarray(getattr(dataset, attr), dtype=np.int64)
    raise TypeError(f"{type(dataset).__name__} has neither .targets nor .labels")


class EpochSampler(Sampler):
    """Base class: subclasses set `num_samples` (the global epoch length) and define `_order`."""

    def __init__(self, seed=0, num_replicas=1, rank=0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self._skip = 0

    def skip(self, n):
        """Leave out the first n indices of this rank's share of the current epoch (to resume)."""
        if n < 0:
            raise ValueError(f"cannot skip {n} samples")
        self._skip = n

    @property
    def skipped(self):
        """How many of this rank's indices the current epoch leaves out (dataset.step_seeds numbers the rest)."""
        return self._skip

    def _order(self, generator):
        raise NotImplementedError

    def _shard_size(self):
        return math.ceil(self.num_samples / self.num_replicas)

    def __iter__(self):
        # SeedSequence mixes the two numbers, so (seed, epoch + 1) never repeats (seed + 1, epoch).
        seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, np.uint64)[0])
        order = self._order(torch.Generator().manual_seed(seed))
        total = self._shard_size() * self.num_replicas
        if order:
            order = (order * math.ceil(total / len(order)))[:total]
        return iter(order[self.rank::self.num_replicas][self._skip:])

    def __len__(self):
        return max(self._shard_size() - self._skip, 0)


class ShuffleSampler(EpochSampler):
    """A plain (optionally shuffled) pass over range(num_samples)."""

    def __init__(self, num_samples, shuffle=True, seed=0, num_replicas=1, rank=0):
        super().__init__(seed, num_replicas, rank)
        self.num_samples, self.shuffle = num_samples, shuffle

    def _order(self, generator):
        if self.shuffle:
            return torch.randperm(self.num_samples, generator=generator).tolist()
        return list(range(self.num_samples))


class ImbalancedDatasetSampler(EpochSampler):
    """Re-sampling with replacement, each sample weighted by its class's inverse effective number
    (1 - beta) / (1 - beta^n_c) (Cui et al. 2019), beta = 0.9999, as in the original."""
    beta = 0.9999

    def __init__(self, dataset, indices=None, num_samples=None, seed=0, num_replicas=1, rank=0):
        super().__init__(seed, num_replicas, rank)
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        self.num_samples = len(self.indices) if num_samples is None else num_samples
        labels = get_targets(dataset)[np.asarray(self.indices, dtype=np.int64)]
        # The class weights Reweight/DRW use, per sample; multinomial ignores their normalisation.
        self.weights = effective_num_weights(np.bincount(labels), self.beta).double()[labels]

    def _order(self, generator):
        drawn = torch.multinomial(self.weights, self.num_samples, True, generator=generator).tolist()
        # The original returned positions in `indices`, which only equal data set indices when
        # `indices` is all of them; map them back.
        return [self.indices[i] for i in drawn]


class DeferredSampler(EpochSampler):
    """`before`'s order for epochs before `switch_epoch`, `after`'s from then on (deferred re-sampling, DRS:
    Cao et al. 2019). Both are EpochSamplers of the same data set and length; each epoch's order stays a pure
    function of (seed, epoch), so resuming on either side of the switch draws what an uninterrupted run drew."""

    def __init__(self, before, after, switch_epoch):
        super().__init__(before.seed, before.num_replicas, before.rank)
        if before.num_samples != after.num_samples:
            raise ValueError(f"the samplers draw {before.num_samples} and {after.num_samples} samples an epoch")
        self.before, self.after, self.switch_epoch = before, after, switch_epoch
        self.num_samples = before.num_samples

    def _order(self, generator):
        return (self.before if self.epoch < self.switch_epoch else self.after)._order(generator)


class ClassAwareSampler(EpochSampler):
    """Class-balanced sampling (Kang et al. 2020, "Decoupling representation and classifier"):
    pick a class from a cycle over the classes, then take `num_samples_cls` consecutive samples
    from that class's own cycle. Every cycle is reshuffled at the start of each pass (the
    original's RandomCycleIter, whose first pass is shuffled too) and, as the original's, the
    cycles continue across epochs: epoch e takes the next `num_samples` draws (default: largest
    class size x classes), starting with a fresh run of `num_samples_cls` as the original's new
    generator did.

    Still a pure function of (seed, epoch): pass p of a cycle is a permutation seeded by
    (seed, cycle, p), and a class's draws before chunk j are known without replaying them (every
    pass over the classes picks each class once, so chunk j's class has been picked j // classes
    times before), so an epoch costs the same whether it follows the previous one or a resume.
    """

    def __init__(self, data_source, num_samples_cls=4, seed=0, num_replicas=1, rank=0, num_samples=None):
        super().__init__(seed, num_replicas, rank)
        labels = get_targets(data_source)
        # Only classes that have samples: an empty class would have nothing to cycle over.
        self.per_class = [np.where(labels == c)[0] for c in np.unique(labels)]
        self.num_samples = (max(map(len, self.per_class), default=0) * len(self.per_class)
                            if num_samples is None else num_samples)
        self.num_samples_cls = num_samples_cls

    def _pass(self, cycle, p, n):
        """Pass p of a cycle over n items: its permutation (cycle 0: the classes, c + 1: class c)."""
        seed = int(np.random.SeedSequence([self.seed, cycle, p]).generate_state(1, np.uint64)[0])
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(n, generator=generator).numpy()

    def _cycle(self, cycle, start, stop, n):
        """Positions start..stop-1 of an endless cycle over n items."""
        first, last = start // n, (stop - 1) // n
        walk = np.concatenate([self._pass(cycle, p, n) for p in range(first, last + 1)])
        return walk[start - first * n:stop - first * n]

    def _order(self, generator):
        num_classes, k = len(self.per_class), self.num_samples_cls
        if not num_classes or not self.num_samples:
            return []
        chunks = -(-self.num_samples // k)
        j = np.arange(self.epoch * chunks, (self.epoch + 1) * chunks)
        classes = self._cycle(0, j[0], j[-1] + 1, num_classes)
        picked = j // num_classes  # times chunk j's class was picked before: once per earlier pass
        order = np.empty((chunks, k), dtype=np.int64)
        for c in np.unique(classes):
            rows = np.flatnonzero(classes == c)
            start = picked[rows[0]] * k
            # this class's chunks in the epoch are consecutive in its own cycle
            walk = self._cycle(int(c) + 1, start, (picked[rows[-1]] + 1) * k, len(self.per_class[c]))
            draws = (picked[rows] * k - start)[:, None] + np.arange(k)
            order[rows] = self.per_class[c][walk[draws]]
        return order.reshape(-1)[:self.num_samples].tolist()
