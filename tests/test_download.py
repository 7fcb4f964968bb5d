"""Downloads of CIFAR-10 and SVHN, served from a local HTTP server on 127.0.0.1 (never the internet).

The data set classes' `url` and md5 sums are pointed at tiny fixture files in the real formats (a
cifar-10-python.tar.gz with the real cifar-10-batches-py/ layout, SVHN .mat files), so the real
fetch, md5 check, unpacking and training code run.
"""
import hashlib
import http.server
import os
import re
import shutil
import socket
import tarfile
import threading
from types import SimpleNamespace

import pytest
from torchvision.datasets import CIFAR10, SVHN

import cli
import dataset.download
import fixtures
import train
from checkpoint import load_checkpoint
from dataset import load_unlabeled_pool
from dataset.imbalance_cifar import ImbalanceCIFAR10, img_num_per_cls
from dataset.imbalance_svhn import ImbalanceSVHN

ARCHIVE = 'cifar-10-python.tar.gz'
BATCHES = [name for name, _ in CIFAR10.train_list + CIFAR10.test_list] + ['batches.meta']


def md5(path):
    with open(path, 'rb') as f:
        return hashlib.md5(f.read()).hexdigest()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """An HTTP server on 127.0.0.1 serving `folder`; `requests` lists the paths it was asked for."""
    for var in ('http_proxy', 'HTTP_PROXY', 'https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(dataset.download, 'TIMEOUT_S', 10)
    folder, requests = tmp_path / 'served', []
    folder.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(folder=folder, url=f'http://127.0.0.1:{httpd.server_port}/', requests=requests)
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture
def cifar10_archive(server, tmp_path, monkeypatch):
    """A tiny cifar-10-python.tar.gz (20 training, 10 test images per class) on the server, and
    CIFAR10's url, archive md5 and batch md5 sums pointing at it. Returns the unpacked source folder."""
    source = fixtures.write_cifar10(tmp_path / 'source', per_class=20, test_per_class=10)
    with tarfile.open(server.folder / ARCHIVE, 'w:gz') as tar:
        tar.add(source, arcname='cifar-10-batches-py')
    monkeypatch.setattr(CIFAR10, 'url', server.url + ARCHIVE)
    monkeypatch.setattr(CIFAR10, 'tgz_md5', md5(server.folder / ARCHIVE))
    for attr in ('train_list', 'test_list'):
        monkeypatch.setattr(CIFAR10, attr, [[name, md5(os.path.join(source, name))]
                                            for name, _ in getattr(CIFAR10, attr)])
    return source


def closed_port_url(name):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    return f'http://127.0.0.1:{port}/{name}'


def train_args(data, tmp_path, *extra):
    return ['--dataset', 'cifar10', '--data_path', str(data), '--imb_factor', '0.1', '--epochs', '1',
            '-b', '16', '-j', '0', '--seed', '0', '-a', 'resnet20', '--root_log', str(tmp_path / 'log'),
            '--root_model', str(tmp_path / 'ckpt'), *extra]


def run_expecting_error(argv, capsys):
    """(exit status, the lines on stderr) of train.py run through its real front-end."""
    with pytest.raises(SystemExit) as e:
        cli.run_main(train.main, argv)
    return e.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_first_run_downloads_unpacks_and_trains_second_run_does_not(cifar10_archive, server, tmp_path, capsys):
    data = tmp_path / 'data'  # does not exist yet
    assert train.main(train_args(data, tmp_path)) == 0
    assert server.requests == ['/' + ARCHIVE]
    assert sorted(os.listdir(data)) == ['cifar-10-batches-py', ARCHIVE]  # no temporary file left
    assert md5(data / ARCHIVE) == md5(server.folder / ARCHIVE)
    assert sorted(os.listdir(data / 'cifar-10-batches-py')) == sorted(BATCHES)
    for name in BATCHES:
        assert md5(data / 'cifar-10-batches-py' / name) == md5(os.path.join(cifar10_archive, name)), name
    out = capsys.readouterr().out
    assert f"Downloading {server.url}{ARCHIVE} to {data / ARCHIVE}" in out
    assert f"cls num list: {img_num_per_cls(20.0, 10, 'exp', 0.1)}" in out  # [20, 15, 12, 9, ...]
    ckpt_path = tmp_path / 'ckpt' / 'cifar10_resnet20_CE_None_exp_0.1_ss_pretrained' / 'ckpt.pth.tar'
    ckpt = load_checkpoint(str(ckpt_path))
    assert ckpt['epoch'] == 1

    # A second run (evaluating that checkpoint) reads the same files and fetches nothing.
    unpacked = os.stat(data / 'cifar-10-batches-py' / 'data_batch_1').st_mtime_ns
    assert train.main(train_args(data, tmp_path, '--resume', str(ckpt_path), '-e')) == 0
    assert server.requests == ['/' + ARCHIVE]  # not downloaded again
    assert os.stat(data / 'cifar-10-batches-py' / 'data_batch_1').st_mtime_ns == unpacked  # nor unpacked
    out = capsys.readouterr().out
    assert "Downloading" not in out
    assert f"val Results: Prec@1 {float(ckpt['best_acc1']):.3f}" in out  # the one epoch's test accuracy


def test_unreachable_server_is_one_line_and_a_copy_put_there_by_hand_is_used(cifar10_archive, server, tmp_path,
                                                                             monkeypatch, capsys):
    url = closed_port_url(ARCHIVE)
    monkeypatch.setattr(CIFAR10, 'url', url)
    data = tmp_path / 'data'
    code, lines = run_expecting_error(train_args(data, tmp_path), capsys)
    assert code == 2 and len(lines) == 1, lines
    assert re.fullmatch(rf"error: could not download {re.escape(ARCHIVE)} from {re.escape(url)} \(.*refused.*\); "
                        rf"download it yourself and put it into {re.escape(str(data))}", lines[0]), lines[0]
    assert not data.exists() and not (tmp_path / 'log').exists() and not (tmp_path / 'ckpt').exists()

    # As the message says: the archive put into the folder by hand is unpacked, with no network.
    data.mkdir()
    shutil.copy(server.folder / ARCHIVE, data / ARCHIVE)
    assert ImbalanceCIFAR10(str(data), imb_factor=0.1, download=True).get_cls_num_list() == \
        img_num_per_cls(20.0, 10, 'exp', 0.1)
    assert server.requests == []


def test_corrupt_download_is_one_line_and_leaves_no_file(cifar10_archive, server, tmp_path, capsys):
    served = server.folder / ARCHIVE
    served.write_bytes(served.read_bytes()[:-100])  # truncated: no longer the md5 CIFAR10 expects
    data = tmp_path / 'data'
    code, lines = run_expecting_error(train_args(data, tmp_path), capsys)
    assert code == 2 and len(lines) == 1, lines
    assert re.fullmatch(rf"error: the download of {re.escape(ARCHIVE)} from {re.escape(server.url + ARCHIVE)} "
                        rf"fails its md5 check \(got {md5(served)}, expected {CIFAR10.tgz_md5}\), so it was "
                        rf"deleted and .*{re.escape(ARCHIVE)} left as it was; run again to retry, .*", lines[0]), lines[0]
    assert server.requests == ['/' + ARCHIVE]
    assert os.listdir(data) == []  # neither the archive nor a temporary file nor batches
    assert not (tmp_path / 'log').exists()


def test_no_download_keeps_the_missing_file_message(cifar10_archive, server, tmp_path, capsys):
    data = tmp_path / 'data'
    code, lines = run_expecting_error(train_args(data, tmp_path, '--no-download'), capsys)
    assert code == 2 and len(lines) == 1, lines
    assert re.fullmatch(rf"error: CIFAR-10 not found in {re.escape(str(data))} \(expected .*data_batch_1 \.\.\.; "
                        r"download it from https://www\.cs\.toronto\.edu/~kriz/cifar\.html or pass --data_path\)",
                        lines[0]), lines[0]
    assert server.requests == [] and not data.exists()


@pytest.mark.parametrize('split', ['test', 'extra'])
def test_svhn_mat_is_downloaded_checked_and_read(server, tmp_path, monkeypatch, split):
    served = fixtures.write_svhn(server.folder, split, per_class=3, seed=1)
    monkeypatch.setitem(SVHN.split_list, split, [server.url + os.path.basename(served), os.path.basename(served),
                                                 md5(served)])
    data = tmp_path / 'data'
    labels = fixtures.shuffled_labels(3, 10, 1)
    for _ in range(2):  # the second time the file is there and intact: no request
        if split == 'test':
            got = ImbalanceSVHN(str(data), split='test', download=True).labels
        else:
            got = load_unlabeled_pool('svhn', str(data), download=True)[2]
        assert got.tolist() == labels.tolist()
        assert server.requests == [f'/{split}_32x32.mat']
    assert os.listdir(data) == [f'{split}_32x32.mat'] and md5(data / f'{split}_32x32.mat') == md5(served)
