"""train_ssl.py end to end on the small digits (in-process, two evaluation periods of 6 steps): the run folder and
checkpoint, exact resume after a SIGTERM in the middle of a period (network, weight average, the add-on's state,
every log), the hidden labels never reaching training, -e, and every refusal in one line with nothing written.
torchrun with two processes: the slow test at the end."""
import json
import os
import signal
import subprocess

import pytest
import torch

import fixtures
import train_ssl
from checkpoint import load_checkpoint
from errors import UserError
from fixtures import REPO
from ltssl.diagnostics import read_pseudo_log

# 30 pool images per digit (small_digits): labeled [12, 10, 8, 7, 6, 5, 4, 4, 3, 3], unlabeled [16, 13, ..., 4] (84)
ARGV = ['--dataset', 'digits', '--num_max', '12', '--num_max_u', '16', '--imb_factor', '0.25', '-a', 'resnet20',
        '--epochs', '2', '--eval_step', '6', '-b', '4', '--mu', '2', '--ema_decay', '0.9', '-j', '0', '-p', '1',
        '--threshold', '0.5', '--lr_schedule', 'constant']
LOGS = ('log_train.csv', 'log_test.csv', 'log_pseudo.csv')


def _name(imb='darp', ssl='fixmatch'):
    return f'digits_resnet20_{ssl}_{imb}_N12_M16_0.25_0.25_usb_ssl'


def _args(root, *extra, imb='darp'):
    return [*ARGV, '--imb_alg', imb, '--seed', '1', '--root_log', str(root / 'log'), '--root_model', str(root / 'ckpt'),
            *extra]


def _ckpt(root, imb='darp'):
    return load_checkpoint(str(root / 'ckpt' / _name(imb) / 'ckpt.pth.tar'))


def _logs(root, imb='darp'):
    return {n: (root / 'log' / _name(imb) / n).read_text() for n in LOGS}


def _signal_after_step(monkeypatch, step):
    """A SIGTERM right after the process's `step`-th optimizer step (taken by the run's own handler)."""
    real, count = torch.optim.SGD.step, [0]

    def step_then_signal(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        count[0] += 1
        if count[0] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(torch.optim.SGD, 'step', step_then_signal)


# DARP refines from step 6 (half of 2 x 6) every 2 steps: 6, 8, 10; the stop after step 9 falls between two
# solves, in the middle of period 2, with ABC's masks and the pseudo-label sums of the period half done.
@pytest.mark.parametrize('imb,extra', [('darp', ('--darp_warmup', '0.5', '--darp_every', '2')), ('abc', ())])
def test_sigterm_mid_period_then_resume_is_exact(tmp_path, monkeypatch, small_digits, one_thread, imb, extra):
    whole, parts = tmp_path / 'whole', tmp_path / 'parts'
    assert train_ssl.main(_args(whole, *extra, imb=imb)) == 0
    with monkeypatch.context() as m:
        _signal_after_step(m, 9)
        assert train_ssl.main(_args(parts, *extra, imb=imb)) == 128 + signal.SIGTERM
    stopped = _ckpt(parts, imb)
    assert (stopped['epoch'], stopped['step']) == (1, 3)
    assert train_ssl.main(_args(parts, *extra, '--resume', str(parts / 'ckpt' / _name(imb) / 'ckpt.pth.tar'),
                                imb=imb)) == 0
    a, b = _ckpt(whole, imb), _ckpt(parts, imb)
    for key in ('state_dict', 'ema_state_dict', 'optimizer'):
        fixtures.assert_same_tensors(a[key], b[key])
    tensors = ('heads', 'ema_heads', 'addons', 'pseudo')
    fixtures.assert_same_tensors({k: a['ssl_state'][k] for k in tensors}, {k: b['ssl_state'][k] for k in tensors})
    assert a['ssl_state']['ema_updates'] == b['ssl_state']['ema_updates'] == 12
    la, lb = _logs(whole, imb), _logs(parts, imb)
    assert la == lb  # log_train.csv's running averages of the stopped epoch included
    records = read_pseudo_log(str(whole / 'log' / _name(imb) / 'log_pseudo.csv'))
    assert [r['epoch'] for r in records] == [0, 1] and all(sum(r['raw_counts']) == 48 for r in records)
    if imb == 'darp':
        state = a['ssl_state']['addons']['darp']
        assert state['pseudo_refine'].shape == (84, 10)
        assert not torch.allclose(state['pseudo_refine'], torch.full((84, 10), 0.1))
        assert records[1]['used_counts'] != records[1]['raw_counts']  # refined labels were used in period 2
    else:
        assert set(a['ssl_state']['heads']) == {'abc.weight', 'abc.bias'}


def test_run_folder_checkpoint_evaluation_and_hidden_labels(tmp_path, monkeypatch, small_digits, one_thread, capsys):
    """One period of FixMatch: the checkpoint keeps train.py's keys (resnet20's) for the classifier and its average;
    -e scores the average; permuting the hidden unlabeled labels changes the diagnostics only."""
    assert train_ssl.main(_args(tmp_path, '--epochs', '1', imb='none')) == 0
    out = capsys.readouterr().out
    assert 'labeled per class: [12, 10, 8, 7, 6, 5, 4, 4, 3, 3] (62 images)' in out
    assert 'unlabeled per class: [16, 13, 11, 10, 8, 7, 6, 5, 4, 4] (84 images)' in out
    preset = next(line for line in out.splitlines() if line.startswith('=> protocol usb: '))
    given = next(line for line in out.splitlines() if line.startswith('=> given on the command line instead: '))
    assert 'mu 2' in preset and 'lr 0.03' in preset and 'epochs 1' in given and 'eval_step 6' in given
    ckpt = _ckpt(tmp_path, 'none')
    from models import build_model
    keys = list(build_model('resnet20', 10).state_dict())
    assert list(ckpt['state_dict']) == keys and list(ckpt['ema_state_dict']) == keys
    assert ckpt['ssl_state']['algorithm'] == 'fixmatch+none' and ckpt['script'] == 'train_ssl'
    last = [line for line in _logs(tmp_path, 'none')['log_test.csv'].splitlines() if 'Results' in line][-1]
    assert train_ssl.main(_args(tmp_path, '--epochs', '1', '--resume',
                                str(tmp_path / 'ckpt' / _name('none') / 'ckpt.pth.tar'), '-e', imb='none')) == 0
    assert last in capsys.readouterr().out

    import ltssl.diagnostics
    real = ltssl.diagnostics.PseudoLabelStats.__init__
    monkeypatch.setattr(ltssl.diagnostics.PseudoLabelStats, '__init__',
                        lambda self, truth, counts: real(self, truth[::-1].copy(), counts))
    other = tmp_path / 'permuted'
    assert train_ssl.main(_args(other, '--epochs', '1', imb='none')) == 0
    fixtures.assert_same_tensors(ckpt['state_dict'], _ckpt(other, 'none')['state_dict'])
    assert _logs(other, 'none')['log_pseudo.csv'] != _logs(tmp_path, 'none')['log_pseudo.csv']


@pytest.mark.parametrize('extra,message', [
    (('--num_max', '20', '--num_max_u', '12'), r'class 0 \(0\) has 30 training images, but the split asks for 20 '
                                               r'labeled \+ 12 unlabeled'),
    (('--ssl_alg', 'supervised', '--imb_alg', 'abc'), 'was never published'),
    (('--imb_alg', 'darp', '--unlabel_order', 'reversed'), 'assumes the unlabeled data follow the labeled'),
    (('--imb_type', 'step'), 'exponential'),
    (('-b', '3', '--imb_alg', 'none'), None),  # fine on one process
])
def test_bad_input_is_one_sentence_and_writes_nothing(tmp_path, small_digits, extra, message):
    argv = [*_args(tmp_path, '--epochs', '1', '--eval_step', '1'), *extra]
    if message is None:
        assert train_ssl.main(argv) == 0
        return
    with pytest.raises(UserError, match=message):
        train_ssl.main(argv)
    assert not (tmp_path / 'log').exists() and not (tmp_path / 'ckpt').exists()


def test_a_checkpoint_of_another_algorithm_or_script_is_refused(tmp_path, small_digits, one_thread):
    assert train_ssl.main(_args(tmp_path, '--epochs', '1', '--eval_step', '1', imb='none')) == 0
    ckpt = str(tmp_path / 'ckpt' / _name('none') / 'ckpt.pth.tar')
    for flags in (('--imb_alg', 'abc'), ('--imb_alg', 'abc', '-e')):
        with pytest.raises(UserError, match=r'was trained with fixmatch\+none; this run is fixmatch\+abc'):
            train_ssl.main([*_args(tmp_path, '--epochs', '1', '--eval_step', '1', '--resume', ckpt), *flags])
    assert not (tmp_path / 'log' / _name('abc')).exists()
    import train
    assert train.main(['--dataset', 'digits', '-a', 'resnet20', '--imb_factor', '0.25', '--epochs', '1', '-j', '0',
                       '--root_log', str(tmp_path / 'tlog'), '--root_model', str(tmp_path / 'tckpt')]) == 0
    supervised = tmp_path / 'tckpt' / 'digits_resnet20_CE_None_exp_0.25_ss_pretrained' / 'ckpt.pth.tar'
    with pytest.raises(UserError, match=r'was written by train.py, not train_ssl.py; start from its weights with '
                                        r'--pretrained_model'):
        train_ssl.main(_args(tmp_path, '--epochs', '1', '--resume', str(supervised), imb='none'))
    # its classifier's weights are what --pretrained_model takes
    assert train_ssl.main(_args(tmp_path / 'ssp', '--epochs', '1', '--eval_step', '1', '--pretrained_model',
                                str(supervised), imb='none')) == 0


@pytest.mark.slow
def test_torchrun_two_processes_agree_and_evaluate_like_one(tmp_path, small_digits, capsys):
    """ABC under torchrun (2 gloo processes): the ranks end with the same network (probed checkpoint states), the
    merged evaluation in the log equals -e of the saved weights in one process, and the pseudo-label line counts
    both ranks' images (4 x 2 per step)."""
    argv = _args(tmp_path, imb='abc')
    env = fixtures.script_env(IMB_DIST_TIMEOUT_MIN='2', SMALL_DIGITS='1', PROBE_STATES='1', PROBE_DIR=str(tmp_path))
    cmd = fixtures.torchrun_cmd(os.path.join(REPO, 'tests', 'dist_driver.py'), 'train_ssl.py', *argv)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in (0, 1):
        assert (tmp_path / f'rank{r}_epoch2_step0.pt').exists()
    fixtures.assert_same_tensors(torch.load(tmp_path / 'rank0_epoch2_step0.pt', weights_only=True),
                                 torch.load(tmp_path / 'rank1_epoch2_step0.pt', weights_only=True))
    log = _logs(tmp_path, 'abc')
    last = [line for line in log['log_test.csv'].splitlines() if 'Results' in line][-1]
    capsys.readouterr()
    ckpt = str(tmp_path / 'ckpt' / _name('abc') / 'ckpt.pth.tar')
    assert train_ssl.main(_args(tmp_path, '--resume', ckpt, '-e', imb='abc')) == 0
    assert last in capsys.readouterr().out
    record = json.loads(log['log_pseudo.csv'].splitlines()[-1].split(' ', 2)[2])
    assert sum(record['raw_counts']) == 6 * 8


# ---------------------------------------------------------------- reproduce.py

def test_ltssl_tables_plan_their_rows_with_the_published_column():
    """ltssl-cifar10-usb: 4 settings x (supervised, FixMatch, + DARP, + ABC), USB's CSV numbers as errors."""
    from repro.tables import TABLES, Options
    cells = TABLES['ltssl-cifar10-usb'].build(Options('ltssl-cifar10-usb', 'data', 'out', None, 'current', None, {}), 2)
    assert len(cells) == 16
    papers = {c.key: c.paper for c in cells}
    # results/classic_cv_imb.csv, lb1500/ulb3000 100/100 and lb500/ulb4000 150/150
    assert papers['supervised_N1500_M3000_g100'] == pytest.approx(100 - 63.83)
    assert papers['fixmatch_N1500_M3000_g100'] == pytest.approx(100 - 76.69)
    assert papers['fixmatch+darp_N1500_M3000_g100'] == pytest.approx(100 - 78.49)
    assert papers['fixmatch+abc_N1500_M3000_g100'] == pytest.approx(100 - 83.88)
    assert papers['fixmatch+abc_N500_M4000_g150'] == pytest.approx(100 - 77.15)
    args = cells[6].stages[0].args()  # FixMatch + DARP, N1 1500, gamma 150
    assert (args.imb_alg, args.num_max, args.imb_factor, args.epochs, args.seed, args.rand_number) == \
        ('darp', 1500, 1 / 150, 256, 2, 2)
    assert 'classic_cv_imb.csv' in cells[6].source


def test_digits_table_runs_and_reports_tail_recall_and_kl(tmp_path, monkeypatch, small_digits, one_thread):
    """`reproduce.py --table ltssl-digits-mini` (one seed, 2 steps per period, a smaller split for the small
    digits): every row runs, and the tail recall and KL columns are the logs' values."""
    import csv

    import numpy as np

    import reproduce
    from repro import scheduler

    def execute(cmd, env, *rest):
        i = next(k for k, w in enumerate(cmd) if w.endswith('.py'))
        return train_ssl.main(cmd[i + 1:]) or 0

    monkeypatch.setattr(scheduler, 'execute', execute)
    out = tmp_path / 'out'
    assert reproduce.main(['--table', 'ltssl-digits-mini', '--seeds', '0', '--epochs', '1', '--out', str(out),
                           '--stage-args=--eval_step 2 --num_max 12 --num_max_u 16 -b 4']) == 0
    with open(out / 'ltssl-digits-mini.csv') as f:
        rows = {r['cell']: r for r in csv.DictReader(f)}
    assert list(rows) == [f'{k}_N40_M100_g10' for k in ('supervised', 'fixmatch', 'fixmatch+darp', 'fixmatch+abc')]
    for key, row in rows.items():
        assert (row['n'], row['status'], row['paper']) == ('1', 'done', '')
        method = key.split('_')[0].split('+')
        log = tmp_path / 'out' / 'runs' / 'ltssl-digits-mini' / 'log' / \
            f"digits_resnet20_{'supervised' if method[0] == 'supervised' else 'fixmatch'}_" \
            f"{method[1] if len(method) > 1 else 'none'}_N12_M16_0.1_0.1_usb_ssl_s0r0e1"
        text = (log / 'log_test.csv').read_text()
        per_class = [float(v) for v in text.split('Class Accuracy: [')[-1].split(']')[0].split(',')]
        assert float(row['tail']) == pytest.approx(100 * np.mean(per_class[7:]), abs=1e-4)
        if method[0] == 'supervised':
            assert row['kl'] == '' and not (log / 'log_pseudo.csv').exists()
        else:
            assert float(row['kl']) == pytest.approx(read_pseudo_log(str(log / 'log_pseudo.csv'))[-1]['kl_used'],
                                                     abs=1e-4)
    assert 'Per seed' in (out / 'ltssl-digits-mini.md').read_text()


def test_cifar_fixtures_with_wrn28_2_and_the_torchvision_loader(cifar10_root, cifar100_root, tmp_path, one_thread):
    """The real CIFAR loading code: CIFAR-10 with the Wide ResNet and --loader torchvision in 2 worker processes
    (USB's split and ImageNet statistics), CIFAR-100 (100 classes; USB's balanced rule: N1 200 over 100 classes)
    with the device loader and a ResNet-20; each one period of 2 steps, evaluated and logged."""
    common = ['--epochs', '1', '--eval_step', '2', '-b', '4', '--mu', '1', '--seed', '0', '-p', '1',
              '--data_path', cifar10_root, '--root_log', str(tmp_path / 'log'), '--root_model', str(tmp_path / 'ckpt')]
    assert train_ssl.main([*common, '--dataset', 'cifar10', '--num_max', '8', '--num_max_u', '10', '--imb_factor',
                           '0.1', '--imb_alg', 'abc', '--loader', 'torchvision', '-j', '2']) == 0
    assert train_ssl.main([*common, '--dataset', 'cifar100', '--num_max', '200', '--num_max_u', '200',
                           '--imb_factor', '1', '-j', '0', '-a', 'resnet20']) == 0
    for name, classes, arch, width in (('cifar10_wrn28_2_fixmatch_abc_N8_M10_0.1_0.1_usb_ssl', 10, 'wrn28_2', 128),
                                       ('cifar100_resnet20_fixmatch_none_N200_M200_1.0_1.0_usb_ssl', 100, 'resnet20',
                                        64)):
        records = read_pseudo_log(str(tmp_path / 'log' / name / 'log_pseudo.csv'))
        assert len(records) == 1 and len(records[0]['raw_counts']) == classes
        from trainer.reports import read_test_log
        (record,) = read_test_log(str(tmp_path / 'log' / name / 'log_test.csv'))
        assert len(record['per_class']) == classes
        ckpt = load_checkpoint(str(tmp_path / 'ckpt' / name / 'ckpt.pth.tar'))
        assert ckpt['arch'] == arch and ckpt['state_dict']['fc.weight'].shape == (classes, width)
