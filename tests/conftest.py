"""Shared pytest fixtures. Tiny data in the real file formats comes from tests/fixtures.py.

no_checksum        torchvision's md5 check of CIFAR-10/100 and SVHN passes (fixture files
                   cannot match the real checksums), and so does dataset.download's for a file
                   that exists (SVHN's extra split): nothing is downloaded; nothing else is bypassed.
cifar10_root       a folder with cifar-10-batches-py/: 20 training and 10 test images per class.
cifar10_semi_root  cifar10_root plus ti_80M_selected.pickle (100 images per class); no
                   pseudo-label file: write one with fixtures.write_pseudo_labels.
cifar100_root      a folder with cifar-100-python/: 5 training and 2 test images per class.
small_digits       `--dataset digits` in this process is fixtures.shrink_digits' 40 images per
                   digit, 10 of them for testing.
svhn_root          a folder with train_32x32.mat (SVHN_TRAIN_PER_CLASS images of digits 0..9),
                   test_32x32.mat (10 per class) and extra_32x32.mat (60 per class).
The *_root fixtures return the folder as a str and include no_checksum.
"""
import hashlib
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
def small_digits(monkeypatch):
    fixtures.shrink_digits(monkeypatch.setattr)


@pytest.fixture
def one_thread():
    """One torch thread during the test (why: fixtures.one_thread)."""
    with fixtures.one_thread():
        yield


def pytest_addoption(parser):
    parser.addoption('--claims', default=None, metavar='DIR',
                     help='share the collected tests with the other pytest processes given the same DIR: each '
                          'runs the next test that none has claimed yet (tests/shards.py starts them)')
    parser.addoption('--claims-from', default='0/1', metavar='K/N',
                     help='with --claims: start at the K-th of N equal parts of the tests (K from 0)')


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    """--claims DIR: pytest's own loop over the tests this process claims first. A claim is a file in DIR
    created with O_EXCL (named by the test's id), so exactly one process runs each test. Each process
    starts at its own part of the tests (--claims-from) and walks on, wrapping around, until it finds
    none unclaimed: the processes finish within one test of each other, and each module's fixtures are
    mostly built by one process only. The next test is claimed before the current one runs: pytest tears
    fixtures down by the next test it will run."""
    folder, items = session.config.getoption('--claims'), session.items
    if folder is None or session.config.option.collectonly:
        return None
    if session.testsfailed and not session.config.option.continue_on_collection_errors:
        raise session.Interrupted(f'{session.testsfailed} error(s) during collection')
    k, _, n = session.config.getoption('--claims-from').partition('/')
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise pytest.UsageError(f"--claims-from {k}/{n}: expected K/N with 0 <= K < N")
    start = int(k) * len(items) // int(n)
    order = items[start:] + items[:start]

    def claim_from(i):
        for j in range(i, len(order)):
            name = hashlib.sha1(order[j].nodeid.encode()).hexdigest()
            try:
                os.close(os.open(os.path.join(folder, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return j
            except FileExistsError:
                continue
        return None

    current = claim_from(0)
    while current is not None:
        following = claim_from(current + 1)
        order[current].config.hook.pytest_runtest_protocol(
            item=order[current], nextitem=None if following is None else order[following])
        if session.shouldfail:
            raise session.Failed(session.shouldfail)
        if session.shouldstop:
            raise session.Interrupted(session.shouldstop)
        current = following
    return True


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: multi-process (torchrun) tests; `make test` runs them, '
                                       '`pytest -m "not slow"` leaves them out')
