"""Crash safety: SIGKILL / SIGTERM mid-run, exact resume, divergence guard, malicious files."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from checkpoint import load_checkpoint
from errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = 'digits_resnet20_CE_None_exp_0.01_ss_pretrained'


def _cmd(root, *extra):
    return [sys.executable, os.path.join(REPO, 'train.py'), '--dataset', 'digits', '--imb_factor', '0.01',
            '--epochs', '2', '-a', 'resnet20', '-b', '32', '-j', '0', '--seed', '1', '-p', '1',
            '--root_log', str(root / 'log'), '--root_model', str(root / 'ckpt'), *extra]


def _env():
    # Same thread count in every run: CPU kernels are bit-reproducible only for a fixed one.
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}


def _start_and_wait_for(root, marker, *extra):
    """Start train.py and return the process once `marker` appears in its log_train.csv."""
    proc = subprocess.Popen(_cmd(root, *extra), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = root / 'log' / NAME / 'log_train.csv'
    deadline = time.time() + 120
    while time.time() < deadline:
        if log.exists() and marker in log.read_text():
            return proc
        if proc.poll() is not None:
            pytest.fail(f"train.py ended early:\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail('timed out waiting for the run')


def _final_state(root):
    return load_checkpoint(str(root / 'ckpt' / NAME / 'ckpt.pth.tar'))


def _logs(root):
    return {n: (root / 'log' / NAME / n).read_text() for n in ('log_train.csv', 'log_test.csv')}


def _assert_same_weights(a, b):
    assert a['epoch'] == b['epoch']
    assert a['state_dict'].keys() == b['state_dict'].keys()
    for k in a['state_dict']:
        assert torch.equal(a['state_dict'][k], b['state_dict'][k]), k


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp('uninterrupted')
    subprocess.run(_cmd(root), cwd=REPO, env=_env(), check=True, capture_output=True)
    return _final_state(root), _logs(root)


def test_sigkill_during_epoch_2_then_resume_is_exact(tmp_path, uninterrupted):
    proc = _start_and_wait_for(tmp_path, 'Epoch: [1][3/')
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    model_dir = tmp_path / 'ckpt' / NAME
    for name in os.listdir(model_dir):  # no half-written file, no temporary left to trip over
        if name.endswith('.pth.tar'):
            assert load_checkpoint(str(model_dir / name))['epoch'] == 1
    subprocess.run(_cmd(tmp_path, '--resume', str(model_dir / 'ckpt.pth.tar')), cwd=REPO, env=_env(),
                   check=True, capture_output=True)
    _assert_same_weights(_final_state(tmp_path), uninterrupted[0])
    assert _logs(tmp_path) == uninterrupted[1]


def test_sigterm_saves_current_epoch_and_resume_is_exact(tmp_path, uninterrupted):
    proc = _start_and_wait_for(tmp_path, 'Epoch: [1][2/')
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert 'stopped by SIGTERM during epoch 2' in out and '--resume' in out
    ckpt = _final_state(tmp_path)
    assert ckpt['epoch'] == 1 and ckpt['step'] >= 2
    subprocess.run(_cmd(tmp_path, '--resume', str(tmp_path / 'ckpt' / NAME / 'ckpt.pth.tar')), cwd=REPO,
                   env=_env(), check=True, capture_output=True)
    # With -j 0 the mid-epoch checkpoint carries the exact RNG state: the weights match too.
    _assert_same_weights(_final_state(tmp_path), uninterrupted[0])


def test_second_run_on_same_folder_is_refused(tmp_path):
    proc = _start_and_wait_for(tmp_path, 'Epoch: [0][1/')
    try:
        second = subprocess.run(_cmd(tmp_path), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert second.returncode == 2
    assert f'process {proc.pid}' in second.stderr and 'Traceback' not in second.stderr


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import trainer
    args = ['--dataset', 'digits', '--epochs', '1', '-a', 'resnet20', '-b', '64', '-j', '0', '--seed', '0',
            '--root_log', str(tmp_path / 'log'), '--root_model', str(tmp_path / 'ckpt')]
    train.main(args)
    ckpt = tmp_path / 'ckpt' / NAME / 'ckpt.pth.tar'
    good = ckpt.read_bytes()

    class NanLoss(torch.nn.Module):
        def forward(self, output, target):
            return output.sum() * float('nan')

    monkeypatch.setattr(trainer, 'build_criterion', lambda *a: NanLoss())
    with pytest.raises(UserError, match=r'became nan at epoch 2, step 1'):
        train.main(args + ['--epochs', '2', '--resume', str(ckpt)])
    assert ckpt.read_bytes() == good
    assert not (ckpt.parent / '.lock').exists()
