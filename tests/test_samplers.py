"""Samplers: one order per (seed, epoch), shards that cover it, mid-epoch resume, and the class
balance each sampler promises."""
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from dataset.samplers import ClassAwareSampler, ImbalancedDatasetSampler, ShuffleSampler, get_targets

LONG_TAIL = [0] * 50 + [1] * 10 + [2] * 5  # class sizes 50, 10, 5


class Labelled:
    """The least a sampler needs of a data set: a length and `.targets` (or `.labels`)."""

    def __init__(self, labels, attr='targets'):
        setattr(self, attr, labels)
        self.n = len(labels)

    def __len__(self):
        return self.n


def epoch(sampler, e):
    sampler.set_epoch(e)
    return list(sampler)


SAMPLERS = {
    'shuffle': lambda **kw: ShuffleSampler(20, **kw),
    'resample': lambda **kw: ImbalancedDatasetSampler(Labelled(LONG_TAIL), **kw),
    'class_aware': lambda **kw: ClassAwareSampler(Labelled(LONG_TAIL), **kw),
}


@pytest.mark.parametrize('name', SAMPLERS)
def test_order_is_a_function_of_seed_and_epoch(name):
    make = SAMPLERS[name]
    a, b, other_seed = make(seed=1), make(seed=1), make(seed=2)
    assert epoch(a, 0) == epoch(b, 0) and epoch(a, 3) == epoch(b, 3)
    assert epoch(a, 0) != epoch(a, 1)
    assert epoch(a, 0) != epoch(other_seed, 0)
    assert epoch(a, 1) == epoch(make(seed=1), 1)  # no hidden state carried over from epoch 0
    assert epoch(make(seed=0), 1) != epoch(make(seed=1), 0)  # seed and epoch are mixed, not added


@pytest.mark.parametrize('name', SAMPLERS)
def test_skip_resumes_the_same_order(name):
    sampler = SAMPLERS[name](seed=4)
    full = epoch(sampler, 2)
    sampler.skip(7)
    assert list(sampler) == full[7:] and len(sampler) == len(full) - 7
    sampler.set_epoch(2)  # a new epoch starts from the beginning again
    assert list(sampler) == full and len(sampler) == len(full)


@pytest.mark.parametrize('name', SAMPLERS)
def test_shards_cover_the_padded_order(name):
    whole = epoch(SAMPLERS[name](seed=5), 1)
    shards = [epoch(SAMPLERS[name](seed=5, num_replicas=4, rank=r), 1) for r in range(4)]
    size = -(-len(whole) // 4)
    assert all(len(s) == size == len(SAMPLERS[name](seed=5, num_replicas=4, rank=r)) for r, s in enumerate(shards))
    padded = (whole * 2)[:4 * size]
    assert [shards[i % 4][i // 4] for i in range(4 * size)] == padded


def test_shuffle_sampler():
    assert sorted(epoch(ShuffleSampler(10), 0)) == list(range(10))
    assert epoch(ShuffleSampler(10, shuffle=False), 3) == list(range(10))
    assert [len(ShuffleSampler(10, num_replicas=3, rank=r)) for r in range(3)] == [4, 4, 4]
    with pytest.raises(ValueError):
        ShuffleSampler(10, num_replicas=2, rank=2)


def test_resampling_favours_the_tail():
    sampler = ImbalancedDatasetSampler(Labelled(LONG_TAIL), num_samples=3000)
    counts = Counter(LONG_TAIL[i] for i in epoch(sampler, 0))
    assert len(sampler) == 3000
    # Inverse effective numbers with beta = 0.9999 are close to inverse frequencies: about 1/3 each.
    assert all(800 < counts[c] < 1200 for c in range(3)), counts
    assert counts[2] / 3000 > 3 * LONG_TAIL.count(2) / len(LONG_TAIL)


def test_resampling_draws_only_from_given_indices():
    indices = list(range(40, 65))  # ten of class 0, all of classes 1 and 2
    sampler = ImbalancedDatasetSampler(Labelled(LONG_TAIL), indices=indices, seed=3)
    drawn = epoch(sampler, 0)
    assert len(drawn) == len(indices) and set(drawn) <= set(indices)


def test_class_aware_sampler_balances_classes():
    sampler = ClassAwareSampler(Labelled(LONG_TAIL), num_samples_cls=4, seed=7)
    order = epoch(sampler, 0)
    assert len(order) == len(sampler) == 50 * 3
    labels = [LONG_TAIL[i] for i in order]
    per_class = Counter(labels)
    assert max(per_class.values()) - min(per_class.values()) <= 4
    # runs of num_samples_cls from one class
    assert all(len(set(labels[i:i + 4])) == 1 for i in range(0, len(labels) - 4, 4))
    # each class is walked in full passes: its samples are used equally often, give or take one
    tail = Counter(i for i in order if LONG_TAIL[i] == 2)
    assert set(tail) == {60, 61, 62, 63, 64} and max(tail.values()) - min(tail.values()) <= 1


def test_class_aware_sampler_skips_empty_classes():
    sampler = ClassAwareSampler(Labelled([0, 0, 0, 2]), num_samples_cls=1)
    assert len(sampler) == 6 and set(epoch(sampler, 0)) == {0, 1, 2, 3}


def test_get_targets_reads_targets_labels_and_subsets():
    assert get_targets(Labelled([3, 1], 'targets')).tolist() == [3, 1]
    got = get_targets(Subset(Labelled(np.array([5, 6, 7]), 'labels'), [2, 0]))
    assert got.dtype == np.int64 and got.tolist() == [7, 5]
    with pytest.raises(TypeError):
        get_targets(TensorDataset(torch.zeros(2)))


def test_sampler_drives_a_dataloader():
    data = TensorDataset(torch.arange(20))
    sampler = ShuffleSampler(20, seed=9)
    sampler.set_epoch(1)
    sampler.skip(8)
    batches = [b[0].tolist() for b in DataLoader(data, batch_size=4, sampler=sampler)]
    assert sum(batches, []) == epoch(ShuffleSampler(20, seed=9), 1)[8:]
