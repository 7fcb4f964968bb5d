"""Shared pytest fixtures. Tiny data in the real file formats comes from tests/fixtures.py.

no_checksum        torchvision's md5 check of CIFAR-10/100 and SVHN passes (fixture files
                   cannot match the real checksums), and so does dataset.download's for a file
                   that exists (SVHN's extra split): nothing is downloaded; nothing else is bypassed.
cifar10_root       a folder with cifar-10-batches-py/: 20 training and 10 test images per class.
cifar10_semi_root  cifar10_root plus ti_80M_selected.pickle (100 images per class); no
                   pseudo-label file: write one with fixtures.write_pseudo_labels.
cifar100_root      a folder with cifar-100-python/: 5 training and 2 test images per class.
svhn_root          a folder with train_32x32.mat (SVHN_TRAIN_PER_CLASS images of digits 0..9),
                   test_32x32.mat (10 per class) and extra_32x32.mat (60 per class).
The *_root fixtures return the folder as a str and include no_checksum.
"""
import os

import pytest
from torchvision.datasets import CIFAR10, CIFAR100, SVHN

import dataset.download
import fixtures

# Like SVHN itself, digit 1 is the most frequent and 0 is not the rarest.
SVHN_TRAIN_PER_CLASS = [40, 60, 50, 45, 40, 35, 30, 30, 25, 25]


@pytest.fixture
def no_checksum(monkeypatch):
    for cls in (CIFAR10, CIFAR100, SVHN):
        monkeypatch.setattr(cls, '_check_integrity', lambda self: True)
    monkeypatch.setattr(dataset.download, 'check_integrity', lambda path, md5=None: os.path.isfile(path))


@pytest.fixture
def cifar10_root(tmp_path, no_checksum):
    fixtures.write_cifar10(tmp_path, per_class=20, test_per_class=10)
    return str(tmp_path)


@pytest.fixture
def cifar10_semi_root(cifar10_root):
    fixtures.write_tinyimages(f'{cifar10_root}/ti_80M_selected.pickle', n_per_class=100)
    return cifar10_root


@pytest.fixture
def cifar100_root(tmp_path, no_checksum):
    fixtures.write_cifar100(tmp_path, per_class=5, test_per_class=2)
    return str(tmp_path)


@pytest.fixture
def svhn_root(tmp_path, no_checksum):
    fixtures.write_svhn(tmp_path, 'train', per_class=SVHN_TRAIN_PER_CLASS, seed=0)
    fixtures.write_svhn(tmp_path, 'test', per_class=10, seed=1)
    fixtures.write_svhn(tmp_path, 'extra', per_class=60, seed=2)
    return str(tmp_path)


@pytest.fixture
def one_thread():
    """One torch thread during the test (why: fixtures.one_thread)."""
    with fixtures.one_thread():
        yield


def pytest_addoption(parser):
    parser.addoption('--shard', default=None, metavar='K/N',
                     help='run only the K-th of N disjoint shares of the collected tests (K from 0); '
                          'tests/shards.py runs the N shares side by side')


def pytest_collection_modifyitems(config, items):
    """--shard K/N: the slow tests dealt out first, one each in turn, then the others, so that every
    share gets about as many multi-process tests (most of the time) as the others."""
    shard = config.getoption('--shard')
    if shard is None:
        return
    k, _, n = shard.partition('/')
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise pytest.UsageError(f'--shard {shard}: expected K/N with 0 <= K < N')
    k, n = int(k), int(n)
    dealt = sorted(range(len(items)), key=lambda i: items[i].get_closest_marker('slow') is None)
    mine = {i for turn, i in enumerate(dealt) if turn % n == k}
    config.hook.pytest_deselected(items=[item for i, item in enumerate(items) if i not in mine])
    items[:] = [item for i, item in enumerate(items) if i in mine]


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: multi-process (torchrun) tests; `make test` runs them, '
                                       '`pytest -m "not slow"` leaves them out')
