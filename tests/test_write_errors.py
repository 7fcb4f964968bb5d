"""Issue 22: the modes of the files a run writes, and write errors (a full disk) that end a run with one
line, exit status 2, the previous checkpoint intact, no temporary, and an exact resume.

A full disk is simulated by fixtures.full_disk: from its `nth` opening for writing on, a chosen file fails
with ENOSPC once `after` bytes of it are written, as write(2) does when the disk fills up part-way.
"""
import os
import re
import stat
import subprocess
import sys
import time

import pytest
import torch

import cli
import fixtures
import fixtures_jpeg as fx
import gen_pseudolabels
import pretrain_moco
import train
from checkpoint import load_checkpoint, save_checkpoint
from errors import UserError
from fixtures import REPO
from imagenet_inat import main as ii_main

pytestmark = pytest.mark.usefixtures('one_thread')  # see conftest.py

NAME = 'digits_resnet32_CE_None_exp_0.01_ss_pretrained'


def _train_argv(root, *extra):
    # The README's digits command (make demo), two epochs.
    return ['--dataset', 'digits', '--imb_factor', '0.01', '--epochs', '2', '-b', '64', '-j', '0', '--seed', '0',
            '--root_log', str(root / 'log'), '--root_model', str(root / 'ckpt'), *extra]


def _exit_line(capsys, argv):
    """Run train.py as its command line does; the exit status and what it wrote to stderr."""
    with pytest.raises(SystemExit) as e:
        cli.run_main(train.main, argv)
    return e.value.code, capsys.readouterr().err


@pytest.fixture
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp('whole')
    with fixtures.one_thread():
        assert train.main(_train_argv(root)) == 0
    return root


# ---------------------------------------------------------------- modes

def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


@pytest.mark.parametrize('umask', [0o022, 0o027], indirect=True)
def test_every_kind_of_file_gets_the_mode_open_gives(tmp_path, umask, small_digits):
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask  # 0644/0755 and 0640/0750
    run = tmp_path / 'run'
    assert train.main(_train_argv(run, '--epochs', '1')) == 0
    model_dir, log_dir = run / 'ckpt' / NAME, run / 'log' / NAME
    ckpt = model_dir / 'ckpt.pth.tar'
    written = [ckpt, model_dir / 'ckpt.best.pth.tar', log_dir / 'per_class_acc.png', log_dir / 'log_train.csv',
               log_dir / 'args.txt', *log_dir.glob('events.out.tfevents.*')]
    folders = [model_dir, log_dir]

    out = tmp_path / 'pseudo'
    assert gen_pseudolabels.main(['--dataset', 'digits', '--imb_factor', '0.01', '--resume', str(ckpt),
                                  '--output_dir', str(out), '-j', '0']) == 0
    written += [out / 'pseudo_labeled_digits.pickle', out / 'prediction.log']

    moco = tmp_path / 'moco'
    # as test_moco's digits run (8 px crops), with batches the shrunken digits fill
    assert pretrain_moco.main(['--dataset', 'digits', '--root_path', str(moco), '--moco-k', '64', '-b', '32',
                               '--crop-size', '8', '-j', '0', '--epochs', '1', '--seed', '0']) == 0
    written.append(moco / 'digits' / 'checkpoint' / 'moco_ckpt_0001.pth.tar')

    data = tmp_path / 'jpeg'
    images, splits = fx.write_jpeg_dataset(str(data))
    fx.write_moco_checkpoint(str(data / 'moco.pth.tar'))
    stage = tmp_path / 'stage1'
    cfg = fx.write_config(tmp_path / 'stage1.yaml', fx.stage_config(stage, sampler=False, epochs=1, batch=16))
    assert ii_main.main(['--cfg', str(cfg), '--data_root', images, '--split_dir', splits, '--seed', '0',
                         '--model_dir', str(data / 'moco.pth.tar')]) == 0
    written += [stage / 'latest_model_checkpoint.pth', stage / 'final_model_checkpoint.pth',
                stage / 'results_test.json', stage / 'log.txt']
    folders.append(stage)

    modes = {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in written}
    assert modes == {k: oct(file_mode) for k in modes}
    assert {str(p): oct(_mode(p)) for p in folders} == {str(p): oct(dir_mode) for p in folders}
    assert not [p for p in tmp_path.rglob('*.tmp')]


@pytest.mark.parametrize('umask', [0o077], indirect=True)  # strict: it must not apply to a file being replaced
def test_a_replaced_file_keeps_its_mode(tmp_path, umask, small_digits):
    run = tmp_path / 'run'
    assert train.main(_train_argv(run, '--epochs', '1')) == 0
    ckpt = run / 'ckpt' / NAME / 'ckpt.pth.tar'
    assert _mode(ckpt) == 0o600
    os.chmod(ckpt, 0o664)  # its owner opened it to the group
    assert train.main(_train_argv(run, '--resume', str(ckpt))) == 0
    assert load_checkpoint(str(ckpt))['epoch'] == 2 and _mode(ckpt) == 0o664


# ---------------------------------------------------------------- a full disk part-way through a save

def test_full_disk_while_saving_keeps_the_old_checkpoint_and_resume_is_exact(tmp_path, monkeypatch, capsys,
                                                                              small_digits, uninterrupted):
    model_dir = tmp_path / 'ckpt' / NAME
    ckpt, best = model_dir / 'ckpt.pth.tar', model_dir / 'ckpt.best.pth.tar'
    before = {}
    real_save = train.trainer.RunFolder.save

    def save(folder, state, is_best):  # what the epoch-1 save left, just before the epoch-2 save
        if state['epoch'] == 2:
            before.update({p: p.read_bytes() for p in (ckpt, best)})
        return real_save(folder, state, is_best)

    with monkeypatch.context() as m:
        m.setattr(train.trainer.RunFolder, 'save', save)
        fixtures.full_disk(m.setattr, 'ckpt.pth.tar', after=100_000, nth=2)  # the second save: epoch 2
        code, err = _exit_line(capsys, _train_argv(tmp_path))
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: cannot write ckpt.pth.tar into folder '), err
    assert f"folder {model_dir}: No space left on device" in lines[0]
    assert lines[0].endswith('; the previous ckpt.pth.tar is unchanged')
    needed = int(re.search(r'it needs (\d+) bytes', lines[0]).group(1))
    whole = uninterrupted / 'ckpt' / NAME / 'ckpt.pth.tar'
    assert abs(needed - whole.stat().st_size) < 0.01 * needed  # the checkpoint's size (other pickled ints)
    assert ckpt.read_bytes() == before[ckpt] and best.read_bytes() == before[best]
    assert load_checkpoint(str(ckpt))['epoch'] == 1
    assert sorted(os.listdir(model_dir)) == ['ckpt.best.pth.tar', 'ckpt.pth.tar']  # no temporary, no lock

    assert train.main(_train_argv(tmp_path, '--resume', str(ckpt))) == 0
    fixtures.assert_same_tensors(load_checkpoint(str(ckpt))['state_dict'], load_checkpoint(str(whole))['state_dict'])
    for log in ('log_train.csv', 'log_test.csv'):
        assert (tmp_path / 'log' / NAME / log).read_text() == (uninterrupted / 'log' / NAME / log).read_text()


def test_a_full_disk_for_the_log_ends_the_run_with_one_line(tmp_path, monkeypatch, capsys, small_digits):
    fixtures.full_disk(monkeypatch.setattr, 'log_test.csv', after=50)
    code, err = _exit_line(capsys, _train_argv(tmp_path))
    assert code == 2
    assert err.startswith(f"error: cannot write log_test.csv into folder {tmp_path / 'log' / NAME}: "
                          f"No space left on device (") and len(err.splitlines()) == 1, err
    assert not (tmp_path / 'ckpt' / NAME / 'ckpt.pth.tar').exists()  # no checkpoint beyond its logs


def test_a_plot_that_cannot_be_written_is_a_warning(tmp_path, monkeypatch, capsys, small_digits):
    fixtures.full_disk(monkeypatch.setattr, 'per_class_acc.png', after=10)
    assert train.main(_train_argv(tmp_path)) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith('warning: ')]
    assert len(warnings) == 2, warnings  # one each epoch
    assert warnings[0].startswith(f"warning: cannot write per_class_acc.png into folder {tmp_path / 'log' / NAME}: "
                                  f"No space left on device (it needs ") and warnings[0].endswith('; training goes on')
    assert load_checkpoint(str(tmp_path / 'ckpt' / NAME / 'ckpt.pth.tar'))['epoch'] == 2


# train.py on the small digits, with the files matching argv[1] failing after argv[2] bytes.
FULL_DISK_TRAIN = r"""
import sys
sys.path.insert(0, 'tests')
import cli, fixtures, train
fixtures.shrink_digits(setattr)
fixtures.full_disk(setattr, sys.argv[1], int(sys.argv[2]))
cli.run_main(train.main, sys.argv[3:])
"""


def test_a_tensorboard_file_that_cannot_be_written_is_a_warning(tmp_path):
    """Past their first 40-byte record, tensorboardX writes events from a thread per file; an error
    there ended the thread, and once its queue of 10 events was full the run hung: a subprocess."""
    proc = subprocess.run([sys.executable, '-c', FULL_DISK_TRAIN, 'events.out.tfevents.*', '60',
                           *_train_argv(tmp_path)], cwd=REPO, env=fixtures.script_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [f"warning: cannot write tensorboard events into {tmp_path / 'log' / NAME}: "
                                        f"No space left on device; training goes on without them"]
    assert load_checkpoint(str(tmp_path / 'ckpt' / NAME / 'ckpt.pth.tar'))['epoch'] == 2


def test_a_failed_best_copy_leaves_both_checkpoints_at_the_previous_epoch(tmp_path, monkeypatch):
    ckpt, best = tmp_path / 'ckpt.pth.tar', tmp_path / 'ckpt.best.pth.tar'
    save_checkpoint({'epoch': 1}, str(ckpt), copies=[str(best)])
    before = ckpt.read_bytes(), best.read_bytes()
    state = {'epoch': 2, 'w': torch.zeros(1000)}
    with monkeypatch.context() as m:
        fixtures.full_disk(m.setattr, 'ckpt.best.pth.tar', after=100)
        with pytest.raises(UserError) as e:
            save_checkpoint(state, str(ckpt), copies=[str(best)])
    assert (ckpt.read_bytes(), best.read_bytes()) == before
    assert sorted(os.listdir(tmp_path)) == ['ckpt.best.pth.tar', 'ckpt.pth.tar']
    save_checkpoint(state, str(ckpt))  # the same bytes, written now: the copy needed exactly its size
    assert str(e.value).startswith(f"cannot write ckpt.best.pth.tar into folder {tmp_path}: No space left on "
                                   f"device (it needs {ckpt.stat().st_size} bytes, ")


@pytest.mark.parametrize('name', ['pseudo_labeled_digits.pickle', 'prediction.log'])
def test_gen_pseudolabels_on_a_full_disk_ends_with_one_line(tmp_path, monkeypatch, capsys, small_digits, name):
    run = tmp_path / 'run'
    assert train.main(_train_argv(run, '--epochs', '1')) == 0
    out = tmp_path / 'pseudo'
    fixtures.full_disk(monkeypatch.setattr, name, after=10)
    with pytest.raises(SystemExit) as e:
        cli.run_main(gen_pseudolabels.main, ['--dataset', 'digits', '--imb_factor', '0.01', '--output_dir', str(out),
                                             '--resume', str(run / 'ckpt' / NAME / 'ckpt.pth.tar'), '-j', '0'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'Traceback' not in err
    lines = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(lines) == 1 and lines[0].startswith(f'error: cannot write {name} into folder {out}: '
                                                   f'No space left on device ('), err
    assert not (out / 'pseudo_labeled_digits.pickle').exists() and not list(out.glob('.*.tmp'))


def test_a_real_write_limit_part_way_through_torch_save_is_one_line(tmp_path):
    """The kernel refuses the write (RLIMIT_FSIZE: EFBIG after N bytes) inside torch.save's own writer,
    which reports any write error as a RuntimeError; save_checkpoint still names it."""
    code = r'''
import resource, signal, sys, torch
from checkpoint import load_checkpoint, save_checkpoint
from errors import UserError
path = sys.argv[1]
save_checkpoint({'w': torch.ones(10)}, path)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
try:
    save_checkpoint({'w': torch.zeros(100_000)}, path)
except UserError as e:
    print(e)
print(load_checkpoint(path)['w'].tolist())
'''
    proc = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'ckpt.pth.tar')], cwd=REPO,
                          env=fixtures.script_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    message, kept = proc.stdout.splitlines()
    assert re.fullmatch(rf"cannot write ckpt.pth.tar into folder {tmp_path}: File too large \(it needs \d+ bytes, "
                        r"\d+ bytes are free\); the previous ckpt.pth.tar is unchanged", message), message
    assert kept == str([1.0] * 10) and os.listdir(tmp_path) == ['ckpt.pth.tar']


@pytest.mark.slow
@pytest.mark.parametrize('name', ['ckpt.pth.tar',  # rank 0's save
                                  'log_test.csv'])  # rank 0's log, held back to the save, which it prevents
def test_under_torchrun_every_rank_stops_with_the_line(tmp_path, name):
    cmd = fixtures.torchrun_cmd(os.path.join(REPO, 'tests', 'dist_driver.py'), 'train.py',
                                *_train_argv(tmp_path, '--epochs', '1'))
    env = fixtures.script_env(IMB_DIST_TIMEOUT_MIN='2', PROBE_FULL_DISK=f'{name}:1:50')
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert time.time() - start < 100  # no rank waited for the 2-minute collective timeout
    # Every rank raises the line. The first to exit makes torchrun stop the others (SIGTERM), which may
    # come before a rank has printed it: at least one line, and no rank ended otherwise.
    lines = set(line for line in proc.stderr.splitlines() if line.startswith('error: '))
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines.pop().startswith(f'error: cannot write {name} into folder ') and 'No space left' in proc.stderr
    assert set(re.findall(r'exitcode\s*: (-?\d+)', proc.stderr)) <= {'2', '-15'} and proc.returncode != 0
    # no traceback through the project's code (torchrun's own, from a .venv inside the checkout, may follow)
    assert not fixtures.project_traceback(proc.stderr)
    model_dir = tmp_path / 'ckpt' / NAME
    assert not (model_dir / 'ckpt.pth.tar').exists() and not list(model_dir.glob('.*.tmp'))
