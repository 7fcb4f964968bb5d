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


def _random_cycle(items, generator):
    """Endless walk over `items`, reshuffled at the start of every pass (Kang et al.'s RandomCycleIter)."""
    while True:
        for i in torch.randperm(len(items), generator=generator).tolist():
            yield items[i]


class ClassAwareSampler(EpochSampler):
    """Class-balanced sampling (Kang et al. 2020, "Decoupling representation and classifier"):
    pick a class from a reshuffled cycle of classes, then take `num_samples_cls` consecutive
    samples from that class's own reshuffled cycle. An epoch is largest class size x classes."""

    def __init__(self, data_source, num_samples_cls=4, seed=0, num_replicas=1, rank=0):
        super().__init__(seed, num_replicas, rank)
        labels = get_targets(data_source)
        # Only classes that have samples: an empty class would have nothing to cycle over.
        self.per_class = [np.where(labels == c)[0].tolist() for c in np.unique(labels)]
        self.num_samples = max(map(len, self.per_class), default=0) * len(self.per_class)
        self.num_samples_cls = num_samples_cls

    def _order(self, generator):
        classes = _random_cycle(range(len(self.per_class)), generator)
        samples = [_random_cycle(idx, generator) for idx in self.per_class]
        order = []
        while len(order) < self.num_samples:
            cycle = samples[next(classes)]
            order.extend(next(cycle) for _ in range(self.num_samples_cls))
        return order[:self.num_samples]
