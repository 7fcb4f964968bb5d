"""Crash safety: SIGKILL / SIGTERM / SIGINT mid-run, exact resume (with and without --seed, with
data-loading workers, for train.py, train_semi.py and pretrain_rot.py), the run-folder lock,
atomic writes under SIGKILL, the divergence guard.

No test relies on timing: a subprocess run pauses after a known optimizer step (the HOOKED
wrapper below), writes a marker file, and the test signals it only then; in-process runs signal
themselves from inside that step.
"""
import math
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import fixtures
import pretrain_rot
import signals
import train
import train_semi
import trainer
from checkpoint import load_checkpoint, save_checkpoint
from dataset.digits import ImbalanceDigits
from errors import UserError
from fixtures import REPO

NAME = 'digits_resnet20_CE_None_exp_0.1_ss_pretrained'
# Every run here uses fixtures.shrink_digits (40 images per digit, 10 of them for testing):
# --imb_factor 0.1 keeps 118 training images, 4 steps per epoch at -b 32.
TRAIN_SIZE = 118
STEPS = math.ceil(TRAIN_SIZE / 32)

# train.py run as `python -c HOOKED train <args>` on the small digits, with test hooks chosen by
# environment variables:
#   PAUSE_AFTER=N   after the process's N-th optimizer step, create PAUSE_MARKER and wait until a stop
#                   signal has been handled (a SIGKILL ends it right there); the step then completes;
#   HOLD=1          keep waiting after the first signal too, as a long step would: only a second
#                   signal can end the run;
#   SIGNAL_MARKER   a file created once the run's handler has taken a signal.
HOOKED = r'''
import os, sys, time
import torch
import cli, trainer
sys.path.insert(0, 'tests')
import fixtures
fixtures.shrink_digits(setattr)
env = os.environ
handled = []
_handle = trainer.GracefulStop._handle
def handle(self, signum, frame):
    _handle(self, signum, frame)
    handled.append(signum)
    if 'SIGNAL_MARKER' in env:
        open(env['SIGNAL_MARKER'], 'w').close()
trainer.GracefulStop._handle = handle
_step = torch.optim.SGD.step
steps = [0]
def step(self, *args, **kwargs):
    out = _step(self, *args, **kwargs)
    steps[0] += 1
    if steps[0] == int(env.get('PAUSE_AFTER', 0)):
        open(env['PAUSE_MARKER'], 'w').close()
        deadline = time.time() + 120
        while (env.get('HOLD') or not handled) and time.time() < deadline:
            time.sleep(0.01)
    return out
torch.optim.SGD.step = step
cli.run_main(__import__(sys.argv[1]).main, sys.argv[2:])
'''


def _argv(root, *extra):
    return ['--dataset', 'digits', '--imb_factor', '0.1', '--epochs', '2', '-a', 'resnet20', '-b', '32',
            '-j', '0', '--seed', '1', '-p', '1',
            '--root_log', str(root / 'log'), '--root_model', str(root / 'ckpt'), *extra]


# The data-loading workers belong to the per-image loader (the default loader has none).
WORKERS = ['--loader', 'torchvision', '-j', '2']


def _env(**hooks):
    # Same thread count in every run: CPU kernels are bit-reproducible only for a fixed one.
    return fixtures.script_env(**{k: str(v) for k, v in hooks.items()})


def _run(root, *extra, **hooks):
    proc = subprocess.run([sys.executable, '-c', HOOKED, 'train', *_argv(root, *extra)], cwd=REPO,
                          env=_env(**hooks), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def _start(root, *extra, session=False, **hooks):
    return subprocess.Popen([sys.executable, '-c', HOOKED, 'train', *_argv(root, *extra)], cwd=REPO,
                            env=_env(**hooks), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=session)


def _wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {os.path.basename(path)}:\n{proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f'timed out waiting for {path}')
        time.sleep(0.02)


def _pause_at(root, step, *extra, **kw):
    """Start a run that pauses after global optimizer step `step`; return it once it has paused."""
    marker = root / 'paused'
    proc = _start(root, *extra, PAUSE_AFTER=step, PAUSE_MARKER=marker, **kw)
    _wait_for(marker, proc)
    return proc


def _ckpt(root, name=NAME):
    return root / 'ckpt' / name / 'ckpt.pth.tar'


def _logs(root, name=NAME):
    return {n: (root / 'log' / name / n).read_text() for n in ('log_train.csv', 'log_test.csv')}


def _assert_same_weights(a, b):
    assert a['epoch'] == b['epoch']
    fixtures.assert_same_tensors(a['state_dict'], b['state_dict'])


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp('uninterrupted')
    _run(root)
    return load_checkpoint(str(_ckpt(root))), _logs(root)


@pytest.fixture(scope='module')
def uninterrupted_workers(tmp_path_factory):
    """The same run with -j 2: other augmentation streams (the workers'), so other weights."""
    root = tmp_path_factory.mktemp('uninterrupted_j2')
    _run(root, *WORKERS)
    return load_checkpoint(str(_ckpt(root))), _logs(root)


# ---------------------------------------------------------------- subprocess runs, external signals

def test_sigkill_during_epoch_2_then_resume_is_exact(tmp_path, uninterrupted):
    proc = _pause_at(tmp_path, STEPS + 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    model_dir = tmp_path / 'ckpt' / NAME
    files = set(os.listdir(model_dir))  # the killed run's lock stays, to be taken over
    assert 'ckpt.pth.tar' in files and files <= {'.lock', 'ckpt.pth.tar', 'ckpt.best.pth.tar'}
    for name in files - {'.lock'}:
        assert load_checkpoint(str(model_dir / name))['epoch'] == 1
    _run(tmp_path, '--resume', str(_ckpt(tmp_path)))
    _assert_same_weights(load_checkpoint(str(_ckpt(tmp_path))), uninterrupted[0])
    assert _logs(tmp_path) == uninterrupted[1]


def test_sigterm_saves_after_the_current_step_and_resume_is_exact(tmp_path, uninterrupted):
    proc = _pause_at(tmp_path, STEPS + 2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert 'stopped by SIGTERM during epoch 2 after step 2' in out and '--resume' in out
    ckpt = load_checkpoint(str(_ckpt(tmp_path)))
    assert (ckpt['epoch'], ckpt['step']) == (1, 2)
    _run(tmp_path, '--resume', str(_ckpt(tmp_path)))
    # With -j 0 the mid-epoch checkpoint carries the exact RNG state and the epoch's step meters: weights and
    # logs match, the running averages '(...)' of the stopped epoch's progress lines included.
    _assert_same_weights(load_checkpoint(str(_ckpt(tmp_path))), uninterrupted[0])
    assert _logs(tmp_path) == uninterrupted[1]


def test_second_signal_stops_at_once(tmp_path):
    proc = _pause_at(tmp_path, 2, HOLD=1, SIGNAL_MARKER=tmp_path / 'signalled')
    proc.send_signal(signal.SIGTERM)
    _wait_for(tmp_path / 'signalled', proc)  # the first one is taken: the run would finish the step
    proc.send_signal(signal.SIGTERM)  # at once: a copy of the same request (a group's and a launcher's), ignored
    time.sleep(signals.REPEAT_WINDOW_S + 0.5)
    assert proc.poll() is None
    start = time.time()
    proc.send_signal(signal.SIGTERM)  # later: a second request
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM, out  # ended by the signal itself, not by an exit()
    assert time.time() - start < 20  # not the 120 s the held step would take
    assert 'received SIGTERM' in out and 'stopped by' not in out
    assert not _ckpt(tmp_path).exists()


def test_the_same_signal_again_within_a_moment_is_the_same_request(monkeypatch):
    """A group signal and a launcher's forwarded copy of it (reproduce.py, a shell's trap, torchrun) arrive
    together: one request, the run saves. The same signal after the moment, or another one, stops at once."""
    now, killed = [0.0], []
    monkeypatch.setattr(os, 'kill', lambda pid, signum: killed.append(signum))
    monkeypatch.setattr(signal, 'signal', lambda signum, handler: None)
    stop = trainer.GracefulStop(lambda line: None)
    stop._repeats = signals.Repeats(clock=lambda: now[0])
    stop._handle(signal.SIGTERM, None)
    now[0] = signals.REPEAT_WINDOW_S - 0.1
    stop._handle(signal.SIGTERM, None)
    assert stop.signum == signal.SIGTERM and killed == []
    now[0] = 2 * signals.REPEAT_WINDOW_S
    stop._handle(signal.SIGTERM, None)
    assert killed == [signal.SIGTERM]
    other = trainer.GracefulStop(lambda line: None)
    other._handle(signal.SIGTERM, None)
    other._handle(signal.SIGINT, None)  # Ctrl-C after a SIGTERM: a second request
    assert killed == [signal.SIGTERM, signal.SIGINT]


def test_second_run_on_same_folder_is_refused(tmp_path, capsys):
    import cli
    holder = _pause_at(tmp_path, 1)  # holds the lock until stopped: it cannot finish first
    try:
        with pytest.raises(SystemExit) as e:
            cli.run_main(train.main, _argv(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f'process {holder.pid}' in err and 'Traceback' not in err


# ---------------------------------------------------------------- data-loading workers

def test_sigkill_with_workers_then_resume_from_the_epoch_end_is_exact(tmp_path, uninterrupted_workers):
    proc = _pause_at(tmp_path, STEPS + 1, *WORKERS)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(str(_ckpt(tmp_path)))['epoch'] == 1
    _run(tmp_path, *WORKERS, '--resume', str(_ckpt(tmp_path)))
    _assert_same_weights(load_checkpoint(str(_ckpt(tmp_path))), uninterrupted_workers[0])
    assert _logs(tmp_path) == uninterrupted_workers[1]


def test_ctrl_c_with_workers_stops_once_and_resumes_exactly(tmp_path, uninterrupted_workers):
    """Ctrl-C signals the whole process group, loader workers included. The run stops after the
    step once, and resumes; the workers draw each step's augmentations from (seed, epoch, step, rank)
    (dataset.step_seeds), so the rest of the stopped epoch, and the weights, are the uninterrupted run's."""
    proc = _pause_at(tmp_path, STEPS + 2, *WORKERS, session=True)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, out
    assert out.count('received SIGINT') == 1 and 'stopped by SIGINT during epoch 2 after step 2' in out
    assert (load_checkpoint(str(_ckpt(tmp_path)))['step']) == 2
    _run(tmp_path, *WORKERS, '--resume', str(_ckpt(tmp_path)))
    log, whole = _logs(tmp_path)['log_train.csv'].splitlines(), uninterrupted_workers[1]['log_train.csv'].splitlines()
    steps = [line.split(',')[0] for line in log if line.startswith('Epoch: [1][')]
    assert steps == [f'Epoch: [1][{s}/{STEPS}]' for s in range(1, STEPS + 1)]  # each step once, in order
    assert log == whole and _logs(tmp_path) == uninterrupted_workers[1]
    _assert_same_weights(load_checkpoint(str(_ckpt(tmp_path))), uninterrupted_workers[0])


# ---------------------------------------------------------------- in-process runs that signal themselves

def _signal_after_step(monkeypatch, step, signum=signal.SIGTERM):
    """The process signals itself right after its `step`-th optimizer step (a real signal, taken by
    the run's handler), so the stop lands after exactly that step."""
    real, count = torch.optim.SGD.step, [0]

    def step_then_signal(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        count[0] += 1
        if count[0] == step:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(torch.optim.SGD, 'step', step_then_signal)


def _in_process_args(argv, root, *extra, seed=True):
    return [*argv, '--epochs', '2', '-j', '0', *(['--seed', '1'] if seed else []), '-p', '1',
            '--root_log', str(root / 'log'), '--root_model', str(root / 'ckpt'), *extra]


def _exact_resume_in_process(tmp_path, monkeypatch, main, argv, name, stop_after, signum=signal.SIGTERM,
                             stopped_at=None, message=''):
    """Two epochs uninterrupted, and with a signal after optimizer step `stop_after` and a resume:
    the stop lands where expected, and both end with the same weights and logs."""
    whole, parts = tmp_path / 'whole', tmp_path / 'parts'
    assert main(_in_process_args(argv, whole)) == 0
    with monkeypatch.context() as m:
        _signal_after_step(m, stop_after, signum)
        assert main(_in_process_args(argv, parts)) == 128 + signum
    ckpt = load_checkpoint(str(_ckpt(parts, name)))
    assert (ckpt['epoch'], ckpt.get('step', 0)) == stopped_at
    assert message in (parts / 'log' / name / 'log_train.csv').read_text()
    assert main(_in_process_args(argv, parts, '--resume', str(_ckpt(parts, name)))) == 0
    _assert_same_weights(load_checkpoint(str(_ckpt(whole, name))), load_checkpoint(str(_ckpt(parts, name))))
    a, b = _logs(whole, name), _logs(parts, name)
    assert a == b  # the running averages of the stopped epoch's progress lines included
    return a, b


TRAIN_ARGV = ['--dataset', 'digits', '--imb_factor', '0.1', '-a', 'resnet20', '-b', '32']


def test_sigint_stops_like_sigterm_and_resumes_exactly(tmp_path, monkeypatch, one_thread, small_digits):
    before = signal.getsignal(signal.SIGINT)
    _exact_resume_in_process(tmp_path, monkeypatch, train.main, TRAIN_ARGV, NAME, STEPS + 2, signal.SIGINT,
                             (1, 2), 'stopped by SIGINT during epoch 2 after step 2')
    assert signal.getsignal(signal.SIGINT) == before  # the handler is put back


def test_signal_in_the_last_step_stops_at_the_end_of_the_epoch(tmp_path, monkeypatch, one_thread, small_digits):
    whole, parts = _exact_resume_in_process(tmp_path, monkeypatch, train.main, TRAIN_ARGV, NAME, STEPS,
                                            signal.SIGTERM, (1, 0), 'stopped by SIGTERM at the end of epoch 1')
    assert parts == whole  # stopped at an epoch end: not even the running averages differ


def test_train_semi_resumes_exactly(tmp_path, monkeypatch, one_thread, small_digits):
    data = tmp_path / 'data'
    data.mkdir()
    pool = ImbalanceDigits(None, 'exp', 0.1, 0).unused_targets
    fixtures.write_pseudo_labels(str(data / 'pseudo_labeled_digits.pickle'), pool)  # the true labels
    argv = ['--dataset', 'digits', '--data_path', str(data), '--imb_factor', '0.1', '--imb_factor_unlabel', '0.1',
            '--unlabel_size_factor', '1', '-a', 'resnet20', '-b', '32']
    size = len(train_semi.load_data(train_semi.build_parser().parse_args(argv))[1])
    assert TRAIN_SIZE < size <= 2 * TRAIN_SIZE
    _exact_resume_in_process(tmp_path, monkeypatch, train_semi.main, argv, 'digits_resnet20_CE_None_exp_0.1_0.1_semi',
                             math.ceil(size / 32) + 2, stopped_at=(1, 2))


def test_pretrain_rot_resumes_exactly(tmp_path, monkeypatch, one_thread, small_digits):
    _exact_resume_in_process(tmp_path, monkeypatch, pretrain_rot.main, TRAIN_ARGV,
                             'digits_resnet20_CE_None_exp_0.1_pretrain_rot', STEPS + 2, stopped_at=(1, 2))


def test_exact_resume_without_seed(tmp_path, monkeypatch, one_thread, small_digits):
    """Without --seed the run draws its seed once and stores it: resumed at the epoch boundary,
    stopped mid-epoch and resumed again, it ends where the uninterrupted run did."""
    whole, parts = tmp_path / 'whole', tmp_path / 'parts'
    snapshot = tmp_path / 'epoch1.pth.tar'
    real_save = trainer.RunFolder.save

    def save_and_keep_epoch_1(folder, state, *args, **kwargs):
        real_save(folder, state, *args, **kwargs)
        if state['epoch'] == 1 and not state.get('step'):
            shutil.copy(folder.ckpt_path, snapshot)

    with monkeypatch.context() as m:
        m.setattr(trainer.RunFolder, 'save', save_and_keep_epoch_1)
        assert train.main(_in_process_args(TRAIN_ARGV, whole, seed=False)) == 0
    with monkeypatch.context() as m:
        _signal_after_step(m, 2)
        assert train.main(_in_process_args(TRAIN_ARGV, parts, '--resume', str(snapshot), seed=False)) == 143
    assert load_checkpoint(str(_ckpt(parts)))['step'] == 2
    assert train.main(_in_process_args(TRAIN_ARGV, parts, '--resume', str(_ckpt(parts)), seed=False)) == 0
    a, b = load_checkpoint(str(_ckpt(whole))), load_checkpoint(str(_ckpt(parts)))
    assert a['seed'] == b['seed'] == load_checkpoint(str(snapshot))['seed']
    _assert_same_weights(a, b)


# ---------------------------------------------------------------- atomic writes, divergence

def _save_forever(path, first, saved):
    """Save {'i': i, 'data': BIG + i} for i = first, first + 1, ... and publish each finished i."""
    torch.set_num_threads(1)
    big = torch.arange(4_000_000, dtype=torch.float32)  # 16 MB: each save takes a while
    i = first
    while True:
        save_checkpoint({'i': i, 'data': big + i}, path)
        saved.value = i
        i += 1


def test_atomic_save_survives_sigkill_at_random_moments(tmp_path):
    path = tmp_path / 'ckpt.pth.tar'
    ctx = multiprocessing.get_context('fork')  # the child inherits torch: no import per kill
    rng = random.Random(0)
    big = torch.arange(4_000_000, dtype=torch.float32)
    last = -1
    for _ in range(6):
        saved = ctx.Value('q', last, lock=False)  # a lock held by a killed child would block us
        child = ctx.Process(target=_save_forever, args=(str(path), last + 1, saved))
        child.start()
        deadline = time.time() + 60
        while saved.value == last and time.time() < deadline:  # at least one complete save
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        done = saved.value
        obj = load_checkpoint(str(path))
        assert obj['i'] in (done, done + 1)  # the last finished save, or the one the kill interrupted
        assert torch.equal(obj['data'], big + obj['i'])  # never a torn file
        last = obj['i']
    # The next save of that file removes what the killed writers left behind.
    save_checkpoint({'i': -1}, str(path))
    assert load_checkpoint(str(path)) == {'i': -1}
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pth.tar']


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, small_digits):
    args = ['--dataset', 'digits', '--imb_factor', '0.1', '--epochs', '1', '-a', 'resnet20', '-b', '64', '-j', '0',
            '--seed', '0',
            '--root_log', str(tmp_path / 'log'), '--root_model', str(tmp_path / 'ckpt')]
    train.main(args)
    ckpt = tmp_path / 'ckpt' / NAME / 'ckpt.pth.tar'
    good = ckpt.read_bytes()

    class NanLoss(torch.nn.Module):
        def forward(self, output, target):
            return output.sum() * float('nan')

    monkeypatch.setattr(trainer, 'build_criterion', lambda *a: NanLoss())
    with pytest.raises(UserError, match=r'became \S+ at epoch 2, step 1'):
        train.main(args + ['--epochs', '2', '--resume', str(ckpt)])
    assert ckpt.read_bytes() == good
    assert not (ckpt.parent / '.lock').exists()
