"""Samplers: one order per (seed, epoch), shards that cover it, mid-epoch resume, and the class
balance each sampler promises."""
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from dataset.samplers import (ClassAwareSampler, DeferredSampler, ImbalancedDatasetSampler, ShuffleSampler,
                              get_targets)

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
    'deferred': lambda **kw: DeferredSampler(ShuffleSampler(65, **kw),
                                             ImbalancedDatasetSampler(Labelled(LONG_TAIL), **kw), 2),
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


# ------------------------------------------------------------------ Resample: beta = 0.9999 (was in test_pinned.py)
# Expected values from Cui et al. 2019 and the original's utils.py: class c is drawn with probability
# n_c * w_c / sum_j n_j * w_j, w_c = (1 - beta) / (1 - beta^n_c), beta = 0.9999.

# CIFAR-10-LT, rho = 100: int(5000 * 0.01^(i/9)) (README "Data preparation").
CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


class Labels:
    """A data set as the sampler sees it: a length and `.targets`."""

    def __init__(self, targets):
        self.targets = targets

    def __len__(self):
        return len(self.targets)


def _class_probabilities(counts, beta):
    """Cui et al. 2019: per-sample weight (1 - beta) / (1 - beta^n_c), so class c is drawn with
    probability proportional to n_c times it."""
    mass = [n * (1 - beta) / (1 - beta ** n) for n in counts]
    return np.array(mass) / sum(mass)


def test_resample_draws_classes_by_inverse_effective_numbers():
    labels = np.repeat(np.arange(10), CIFAR10_LT_100)
    sampler = ImbalancedDatasetSampler(Labels(labels.tolist()), seed=0)
    expected = _class_probabilities(CIFAR10_LT_100, 0.9999)
    # the numbers: the head class about 12 % with beta = 0.9999, 27 % with 0.999
    assert expected[0] == pytest.approx(0.1193, abs=1e-4)
    assert _class_probabilities(CIFAR10_LT_100, 0.999)[0] == pytest.approx(0.2679, abs=1e-4)
    weights = sampler.weights.double()
    exact = np.array([weights[labels == c].sum().item() for c in range(10)]) / weights.sum().item()
    np.testing.assert_allclose(exact, expected, rtol=1e-6)  # the weights are float32 (losses.effective_num_weights)
    # and what it really draws: two epochs (24,812 draws); the binomial sd of the head share is 0.2 points
    drawn = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        drawn += list(sampler)
    share = np.bincount(labels[drawn], minlength=10) / len(drawn)
    np.testing.assert_allclose(share, expected, atol=0.01)
    assert len(drawn) == 2 * sum(CIFAR10_LT_100)


def test_deferred_sampler_is_the_plain_order_then_the_resampled_one():
    """DRS: epochs 0-2 draw exactly ShuffleSampler's order, epochs 3 on exactly ImbalancedDatasetSampler's (same
    seed and shard), and a skip (mid-epoch resume) applies on either side of the switch."""
    for rank in (0, 1):
        kw = dict(seed=5, num_replicas=2, rank=rank)
        plain, balanced = ShuffleSampler(65, **kw), ImbalancedDatasetSampler(Labelled(LONG_TAIL), **kw)
        deferred = DeferredSampler(ShuffleSampler(65, **kw), ImbalancedDatasetSampler(Labelled(LONG_TAIL), **kw), 3)
        for e in range(5):
            assert epoch(deferred, e) == epoch(plain if e < 3 else balanced, e), (rank, e)
        deferred.set_epoch(3)
        deferred.skip(4)
        assert list(deferred) == epoch(balanced, 3)[4:]
    assert sorted(epoch(DeferredSampler(ShuffleSampler(65), ImbalancedDatasetSampler(Labelled(LONG_TAIL)), 1), 0)) \
        == list(range(65))  # before the switch: every image once
