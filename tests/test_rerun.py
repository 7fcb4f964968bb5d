"""The same command run again (rerun.py; issue 34 item 1): after Ctrl-C or a crash it resumes the unfinished run of
the same flags; a finished run, or a run of other flags, is kept and the command refused in one line unless
--overwrite; two data folders never share a run folder. For every script that writes a run folder: the trainer's
(train.py, train_semi.py, train_stage2.py, pretrain_rot.py), pretrain_moco.py and imagenet_inat (its stages:
tests/test_imagenet_inat.py)."""
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import cli
import fixtures
import pretrain_moco
import pretrain_rot
import train
import train_semi
import train_stage2
from checkpoint import load_checkpoint
from dataset.digits import ImbalanceDigits
from errors import UserError
from fixtures import REPO

pytestmark = pytest.mark.usefixtures('one_thread', 'small_digits')

ARGV = ['--dataset', 'digits', '--imb_factor', '0.1', '-a', 'resnet20', '-b', '32', '-j', '0', '--seed', '1', '-p', '1']
NAME = 'digits_resnet20_CE_None_exp_0.1_ss_pretrained'
STEPS = 4  # fixtures.shrink_digits keeps 118 training images at --imb_factor 0.1: 4 steps of 32


def _argv(root, *extra, epochs=3):
    return [*ARGV, '--epochs', str(epochs), '--root_log', str(root / 'log'), '--root_model', str(root / 'ckpt'),
            *extra]


def _count_steps(monkeypatch, signal_after=None, signum=signal.SIGINT):
    """The optimizer steps the process takes from now on; after the `signal_after`-th it signals itself."""
    real, steps = torch.optim.SGD.step, []

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == signal_after:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(torch.optim.SGD, 'step', step)
    return steps


def _files(*folders):
    return {p: p.read_bytes() for d in folders for p in d.rglob('*') if p.is_file()}


def test_the_same_command_after_ctrl_c_resumes_the_run(tmp_path, monkeypatch, capsys):
    """The trial's s1 and s2: Ctrl-C in epoch 3, then the same line again. It goes on from the stopped step (the
    rest of epoch 3 only), says so in one line, and ends as the uninterrupted run: weights, best checkpoint, logs."""
    whole, parts = tmp_path / 'whole', tmp_path / 'parts'
    assert train.main(_argv(whole)) == 0
    with monkeypatch.context() as m:
        _count_steps(m, signal_after=2 * STEPS + 2)
        assert train.main(_argv(parts)) == 128 + signal.SIGINT
    stopped = load_checkpoint(str(parts / 'ckpt' / NAME / 'ckpt.pth.tar'))
    assert (stopped['epoch'], stopped['step']) == (2, 2)
    capsys.readouterr()
    steps = _count_steps(monkeypatch)
    assert train.main(_argv(parts)) == 0  # the same command, no --resume
    out = capsys.readouterr().out
    assert len(steps) == STEPS - 2
    assert (f"=> {parts / 'ckpt' / NAME} holds an unfinished run of these flags (stopped in epoch 3 of 3 after "
            f"step 2): resuming it from {parts / 'ckpt' / NAME / 'ckpt.pth.tar'} (--overwrite starts over)") in out
    for name in ('ckpt.pth.tar', 'ckpt.best.pth.tar'):
        a, b = (load_checkpoint(str(root / 'ckpt' / NAME / name)) for root in (whole, parts))
        assert (a['epoch'], float(a['best_acc1']), a['best_epoch']) == (b['epoch'], float(b['best_acc1']),
                                                                          b['best_epoch'])
        fixtures.assert_same_tensors(a['state_dict'], b['state_dict'])
    logs = [{n: (root / 'log' / NAME / n).read_text() for n in ('log_train.csv', 'log_test.csv')}
            for root in (whole, parts)]
    assert logs[0] == logs[1]


def test_a_finished_run_is_kept_unless_overwrite(tmp_path, capsys):
    """The same command after a finished run: refused in one line, every file as it was; --overwrite starts anew
    (the earlier run's checkpoints and tensorboard events removed, logs started over)."""
    assert train.main(_argv(tmp_path, epochs=1)) == 0
    log_dir, model_dir = tmp_path / 'log' / NAME, tmp_path / 'ckpt' / NAME
    before = _files(log_dir, model_dir)
    proc = subprocess.run([sys.executable, '-c', 'import sys; sys.path.insert(0, "tests"); import fixtures, cli, '
                           'train; fixtures.shrink_digits(setattr); cli.run_main(train.main, sys.argv[1:])',
                           *_argv(tmp_path, epochs=1)], cwd=REPO, env=fixtures.script_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: {model_dir} holds a finished run (1 of 1 epochs done) of these flags; pass --overwrite to start "
        f"over (it removes that run's checkpoints), or --exp_str NAME for a new run folder"], proc.stderr
    assert _files(log_dir, model_dir) == before
    capsys.readouterr()
    assert train.main(_argv(tmp_path, '--overwrite', epochs=1)) == 0
    assert "=> a new run: removing the earlier run's ckpt.best.pth.tar, ckpt.pth.tar, events.out" in \
        capsys.readouterr().out
    assert len([n for n in os.listdir(log_dir) if n.startswith('events.out')]) == 1
    assert (log_dir / 'log_test.csv').read_text().count('val Results') == 1
    assert (log_dir / 'args.txt').read_text().count('Namespace(') == 1


def test_other_flags_are_refused_naming_them(tmp_path):
    assert train.main(_argv(tmp_path, epochs=1)) == 0
    path = tmp_path / 'ckpt' / NAME / 'ckpt.pth.tar'
    with pytest.raises(UserError, match=re.escape(
            f"holds a finished run (1 of 1 epochs done) of other flags (--epochs 1 there, 2 here; --lr 0.1 there, "
            f"0.05 here); pass --resume {path} to continue it with this command's flags, --overwrite")):
        train.main(_argv(tmp_path, '--lr', '0.05', epochs=2))
    # as it says: --resume continues it with the new flags
    assert train.main(_argv(tmp_path, '--lr', '0.05', '--resume', str(path), epochs=2)) == 0
    assert load_checkpoint(str(path))['epoch'] == 2


def test_resume_into_a_folder_holding_another_run(tmp_path):
    """--resume of another run's checkpoint would write into this command's run folder: refused while that holds a
    run, unless --overwrite; --overwrite with --resume of the folder's own checkpoint contradicts itself."""
    assert train.main(_argv(tmp_path, epochs=1)) == 0
    assert train.main(_argv(tmp_path, '--exp_str', 'other', epochs=1)) == 0
    other = tmp_path / 'ckpt' / 'digits_resnet20_CE_None_exp_0.1_other' / 'ckpt.pth.tar'
    mine = tmp_path / 'ckpt' / NAME / 'ckpt.pth.tar'
    with pytest.raises(UserError, match=f"holds another run than --resume {re.escape(str(other))}; pass --overwrite"):
        train.main(_argv(tmp_path, '--resume', str(other), epochs=2))
    with pytest.raises(UserError, match='cannot also --resume its checkpoint'):
        train.main(_argv(tmp_path, '--resume', str(mine), '--overwrite', epochs=2))
    assert train.main(_argv(tmp_path, '--resume', str(other), '--overwrite', epochs=2)) == 0
    assert (tmp_path / 'log' / NAME / 'log_test.csv').read_text().count('val Results') == 1  # epoch 2 only


def _semi_argv(tmp_path):
    data = tmp_path / 'data'
    data.mkdir(exist_ok=True)
    fixtures.write_pseudo_labels(str(data / 'pseudo_labeled_digits.pickle'),
                                 ImbalanceDigits(None, 'exp', 0.1, 0).unused_targets)
    return ['--data_path', str(data), '--imb_factor_unlabel', '0.1', '--unlabel_size_factor', '1']


@pytest.mark.parametrize('script', ['train_semi', 'pretrain_rot', 'train_stage2'])
def test_every_trainer_script_keeps_a_finished_run_and_resumes_an_unfinished_one(script, tmp_path, monkeypatch,
                                                                               capsys):
    """The behaviour comes with trainer.run: each script stopped in its last epoch resumes when run again, and
    once finished refuses to start over."""
    main, extra = {'train_semi': (train_semi.main, _semi_argv(tmp_path)), 'pretrain_rot': (pretrain_rot.main, []),
                   'train_stage2': (train_stage2.main, ['--stage', 'LWS', '--stage1', str(tmp_path / 'ckpt' / NAME /
                                                                                     'ckpt.pth.tar')])}[script]
    if script == 'train_stage2':
        assert train.main(_argv(tmp_path, epochs=1)) == 0
        extra += ['-b', '16']  # LWS: class-balanced epochs of floor(118 / 16) = 7 steps
    argv = _argv(tmp_path, *extra, epochs=2)
    if script == 'train_stage2':  # -a comes with the stage-1 checkpoint
        argv.remove('-a'), argv.remove('resnet20')
    with monkeypatch.context() as m:
        _count_steps(m, signal_after=1)
        assert main(argv) == 128 + signal.SIGINT
    capsys.readouterr()
    steps = _count_steps(monkeypatch)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert 'holds an unfinished run of these flags (stopped in epoch 1 of 2 after step 1): resuming it' in out
    per_epoch = (len(steps) + 1) // 2
    assert len(steps) == 2 * per_epoch - 1
    with pytest.raises(UserError, match=r'holds a finished run \(2 of 2 epochs done\) of these flags; pass '
                                        r'--overwrite'):
        main(argv)


def _folder(path):
    sys.path.insert(0, os.path.join(REPO, 'tools'))
    from digits_folder import write_digits_folder
    write_digits_folder(str(path), per_class=6, val_per_class=2)
    return path


def test_two_data_folders_never_share_a_run_folder(tmp_path):
    """--dataset folder: the run folder is named after the data folder; two of one name (in other places) are two
    runs, and the second is refused rather than resumed or overwritten."""
    data = [_folder(tmp_path / 'a' / 'plankton'), _folder(tmp_path / 'b' / 'plankton'),
            _folder(tmp_path / 'a' / 'defects_2024')]
    base = ['--dataset', 'folder', '--epochs', '1', '-b', '16', '-j', '0', '--seed', '0',
            '--root_log', str(tmp_path / 'log'), '--root_model', str(tmp_path / 'ckpt')]
    assert train.main([*base, '--data_path', str(data[0])]) == 0
    assert train.main([*base, '--data_path', str(data[2])]) == 0
    assert sorted(os.listdir(tmp_path / 'ckpt')) == ['folder-defects-2024_resnet32_CE_None_exp_1.0_ss_pretrained',
                                                     'folder-plankton_resnet32_CE_None_exp_1.0_ss_pretrained']
    with pytest.raises(UserError, match=re.escape(f"(data folder {data[0]} there, {data[1]} here)")):
        train.main([*base, '--data_path', str(data[1])])


def _moco_argv(root, data, *extra):
    return ['--dataset', 'folder', '--data', str(data), '-a', 'resnet20', '--moco-k', '32', '-b', '16', '-j', '0',
            '--crop-size', '8', '--epochs', '2', '--save-freq', '5', '--seed', '0', '--root_path', str(root), *extra]


def test_pretrain_moco_resumes_keeps_and_names_by_folder(tmp_path, monkeypatch, capsys):
    """MoCo's checkpoint folder: <root_path>/folder-<name>/checkpoint/ for a user's folder; the same command
    after a stop resumes from the furthest checkpoint (the interrupted one here), once finished refuses, and
    --overwrite removes every checkpoint of the earlier run."""
    data = _folder(tmp_path / 'my_cells')
    folder = tmp_path / 'out' / 'folder-my-cells' / 'checkpoint'
    argv = _moco_argv(tmp_path / 'out', data)
    with monkeypatch.context() as m:
        _count_steps(m, signal_after=5, signum=signal.SIGTERM)  # 60 images, 3 steps an epoch: epoch 2, step 2
        assert pretrain_moco.main(argv) == 128 + signal.SIGTERM
    assert os.listdir(folder) == ['moco_ckpt_interrupted.pth.tar']
    capsys.readouterr()
    steps = _count_steps(monkeypatch)
    assert pretrain_moco.main(argv) == 0
    assert len(steps) == 1 and 'resuming it from' in capsys.readouterr().out
    assert load_checkpoint(str(folder / 'moco_ckpt_0002.pth.tar'))['flags']['moco_k'] == 32
    with pytest.raises(UserError, match=re.escape(f'{folder} holds a finished run (2 of 2 epochs done) of these '
                                                  f'flags; pass --overwrite')):
        pretrain_moco.main(argv)
    with pytest.raises(UserError, match=re.escape('(--moco-k 32 there, 64 here)')):
        pretrain_moco.main(_moco_argv(tmp_path / 'out', data, '--moco-k', '64'))
    assert pretrain_moco.main(argv + ['--overwrite', '--epochs', '1']) == 0
    assert os.listdir(folder) == ['moco_ckpt_0001.pth.tar']


def test_flags_that_say_only_where_or_how_fast_are_not_compared(tmp_path):
    """-j, -p, --gpu, --root_*, --resume: another value is still the same run (and -e / --overwrite are not flags
    of a run at all)."""
    args = train.build_parser().parse_args(_argv(tmp_path))
    other = train.build_parser().parse_args(_argv(tmp_path / 'x', '-j', '3', '-p', '7', '--overwrite', '--confusion'))
    import rerun
    assert rerun.differences(rerun.run_flags(args), rerun.run_flags(other)) == ''
    assert rerun.differences(rerun.run_flags(args), rerun.run_flags(
        train.build_parser().parse_args(_argv(tmp_path, '--loss_type', 'LDAM')))) == '--loss_type CE there, LDAM here'
    assert cli.data_name('folder', '/data/My Plankton_v2/') == 'folder-My-Plankton-v2'
