"""reproduce.py: the printed plans parse with each script's own parser; tiny tables run every stage,
skip finished ones on a second call, resume a stage stopped half-way; --collect marks missing cells.

The tiny runs use the CIFAR fixtures, whose md5 sums are patched in this process only, so their stages
run in-process (repro.scheduler.execute is swapped for a call of the script's main); one digits run goes
through the real subprocess path.
"""
import csv
import importlib
import math
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10

import cli
import fixtures
import gen_pseudolabels
import reproduce
import train
import train_semi
import trainer
from repro import results, scheduler, scripts, tables
from checkpoint import load_checkpoint
from dataset import DATASETS
from errors import UserError
from fixtures import REPO
from utils import shot_accuracy

pytestmark = pytest.mark.usefixtures('one_thread')  # see conftest.py

TINY = '--stage-args=-a resnet20 -b 64 -j 0'
MODULES = {'train.py': 'train', 'gen_pseudolabels.py': 'gen_pseudolabels', 'train_semi.py': 'train_semi',
           'pretrain_rot.py': 'pretrain_rot', 'pretrain_moco.py': 'pretrain_moco', 'train_stage2.py': 'train_stage2'}


def _commands(capsys, argv):
    """The command lines that `reproduce.py ... --dry-run` prints, split into words."""
    assert reproduce.main([*argv, '--dry-run']) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line and not line.startswith('#')]


def _script(cmd):
    """(SCRIPTS key, flags) of a printed command."""
    if '-m' in cmd and cmd[cmd.index('-m') + 1] == 'imagenet_inat.main':
        return 'imagenet_inat', cmd[cmd.index('-m') + 2:]
    i = next(k for k, w in enumerate(cmd) if w.endswith('.py'))
    return os.path.basename(cmd[i]), cmd[i + 1:]


def _flag(argv, name):
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]


@pytest.mark.parametrize('table', list(tables.TABLES))
def test_dry_run_commands_parse_with_their_own_parsers(table, tmp_path, capsys):
    out = tmp_path / 'out'
    commands = _commands(capsys, ['--table', table, '--seeds', '0', '1', '--out', str(out)])
    assert commands and not out.exists()  # a dry run writes nothing
    for cmd in commands:
        assert cmd[0] == sys.executable
        script, argv = _script(cmd)
        spec = scripts.SCRIPTS[script]
        args = getattr(importlib.import_module(spec.module), spec.parser)().parse_args(argv)
        if hasattr(args, 'seed'):
            assert args.seed in (0, 1)
    seeds = [int(_flag(argv, '--seed')) for argv in (_script(c)[1] for c in commands) if '--seed' in argv]
    assert seeds == sorted(seeds) and set(seeds) == {0, 1}  # seed 0's stages first


def test_dry_run_semi_plan_in_order(tmp_path, capsys):
    commands = [_script(c) for c in _commands(capsys, ['--table', 'cifar10-semi', '--seeds', '3',
                                                        '--data_path', 'D', '--out', str(tmp_path)])]
    assert [s for s, _ in commands] == ['train.py', 'gen_pseudolabels.py'] + ['train_semi.py'] * 4
    (_, base), (_, gen), *semis = commands
    import train
    base_args = train.build_parser().parse_args(base)
    assert (base_args.imb_factor, base_args.seed, base_args.rand_number, base_args.epochs) == (0.02, 3, 3, 200)
    assert base_args.lr_steps == [160, 180] and base_args.loss_type == 'CE' and base_args.train_rule == 'None'
    run = os.path.join(str(tmp_path), 'runs', 'cifar10-semi')
    ckpt = os.path.join(run, 'checkpoint', train.supervised_store_name(base_args), 'ckpt.pth.tar')
    assert _flag(gen, '--resume') == ckpt and _flag(gen, '--data_dir') == 'D'
    pseudo = os.path.join(_flag(gen, '--output_dir'), 'pseudo_labeled_cifar.pickle')
    assert [_flag(a, '--imb_factor_unlabel') for _, a in semis] == ['1', '0.04', '0.02', '0.01']
    assert all(_flag(a, '--pseudo_labels') == pseudo and _flag(a, '--imb_factor') == '0.02' for _, a in semis)


@pytest.mark.parametrize('schedule, e2', [('first-release', 200), ('current', 180)])
def test_schedules(schedule, e2, tmp_path, capsys):
    """first-release: x0.01 from epoch 161 to the end, never x0.0001 (trainer.lr_at with the printed --lr_steps)."""
    commands = _commands(capsys, ['--table', 'cifar10-ssp', '--seeds', '0', '--schedule', schedule,
                                  '--out', str(tmp_path)])
    flags = [_script(c)[1] for c in commands]
    assert {tuple(a[a.index('--lr_steps') + 1:a.index('--lr_steps') + 3]) for a in flags} == {('160', str(e2))}
    lrs = [trainer.lr_at(epoch, 0.1, (160, e2)) for epoch in range(200)]  # 0-based epochs
    assert lrs[:5] == [0.1 * e / 5 for e in range(1, 6)] and set(lrs[5:160]) == {0.1}
    assert set(lrs[160:e2]) == {0.1 * 1e-2} and set(lrs[e2:]) <= {0.1 * 1e-4}
    assert (0.1 * 1e-4 in lrs) == (schedule == 'current')


def test_launcher_prefixes_multi_process_stages_only(tmp_path, capsys):
    commands = _commands(capsys, ['--table', 'cifar10-semi', '--seeds', '0', '--out', str(tmp_path),
                                  '--launcher', 'torchrun --nproc_per_node=8'])
    heads = {_script(c)[0]: c[:c.index(next(w for w in c if w.endswith('.py')))] for c in commands}
    # torchrun waits 300 s (not its 30 s) between the SIGTERM it passes on and a SIGKILL (gpu review B3)
    assert heads['train.py'] == heads['train_semi.py'] == ['torchrun', '--nproc_per_node=8',
                                                           '--shutdown_timeout', '300']
    assert heads['gen_pseudolabels.py'] == [sys.executable]
    commands = _commands(capsys, ['--table', 'cifar10-semi', '--seeds', '0', '--out', str(tmp_path), '--launcher',
                                  'python -m torch.distributed.run --shutdown-timeout=60 --nproc_per_node=2'])
    heads = {_script(c)[0]: c[:c.index(next(w for w in c if w.endswith('.py')))] for c in commands}
    assert heads['train.py'] == ['python', '-m', 'torch.distributed.run', '--shutdown-timeout=60',
                                 '--nproc_per_node=2']  # the user's own kept


def _in_process(monkeypatch, stop_first=None):
    """Run stages by calling the script's main in this process. `stop_first`: a script whose first
    run is cut to one epoch and reported as killed by SIGTERM (a stage stopped half-way)."""
    ran = []

    def execute(cmd, env, *log_echo_children):
        script, argv = _script(cmd)
        ran.append((script, argv))
        if script == stop_first and sum(s == script for s, _ in ran) == 1:
            assert importlib.import_module(MODULES[script]).main([*argv, '--epochs', '1']) == 0
            return 128 + 15
        try:
            return importlib.import_module(MODULES[script]).main(argv) or 0
        except UserError as e:
            print(f'error: {e}')
            return 2

    monkeypatch.setattr(scheduler, 'execute', execute)
    return ran


def _rows(out, table):
    with open(os.path.join(out, f'{table}.csv')) as f:
        return {r['cell']: r for r in csv.DictReader(f)}


def _log_values(log_dir):
    """(best top-1, the last shot line's many/medium/few, number of evaluations, last per-class accuracy %,
    last top-1). numpy wraps the per-class list over several lines past 12 classes: joined back here."""
    with open(os.path.join(log_dir, 'log_test.csv')) as f:
        text = f.read()
    lines = text.splitlines()
    best = float([x for x in lines if x.startswith('Best Prec@1:')][-1].split()[-1])
    shots = [x for x in lines if x.startswith('val Shot Accuracy:')][-1].split()
    per_class = re.findall(r'val Class Accuracy: \[([^\]]*)\]', text)[-1].replace('\n', '').split(',')
    last = float([x for x in lines if x.startswith('val Results')][-1].split()[3])
    return (best, [float(shots[i]) for i in (4, 6, 8)], sum(x.startswith('val Results') for x in lines),
            100 * np.array([float(v) for v in per_class]), last)


def _mtimes(root):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, files in os.walk(root) for f in files}


def test_tiny_cifar10_semi_runs_every_stage_then_skips(cifar10_semi_root, tmp_path, monkeypatch, capsys):
    ran = _in_process(monkeypatch)
    out = str(tmp_path / 'out')
    argv = ['--table', 'cifar10-semi', '--seeds', '0', '--epochs', '1', '--cells', 'CE', 'DU_rhoU50',
            '--data_path', cifar10_semi_root, '--out', out, TINY]
    assert reproduce.main(argv) == 0
    assert [s for s, _ in ran] == ['train.py', 'gen_pseudolabels.py', 'train_semi.py']
    semi_args = importlib.import_module('train_semi').build_parser().parse_args(ran[2][1])
    assert (semi_args.arch, semi_args.batch_size, semi_args.epochs, semi_args.imb_factor_unlabel) == \
        ('resnet20', 64, 1, 0.02)
    rows = _rows(out, 'cifar10-semi')
    assert list(rows) == ['CE', 'DU_rhoU50']
    # shot groups of both rows by the labeled counts (the semi run's own log counts its pseudo-labels too)
    labeled = DATASETS['cifar10'].build_train(cifar10_semi_root, 'exp', 0.02, 0, None).get_cls_num_list()
    for key, (script, argv_) in (('CE', ran[0]), ('DU_rhoU50', ran[2])):
        module = importlib.import_module(MODULES[script])
        args = module.build_parser().parse_args(argv_)
        name = module.supervised_store_name(args) if script == 'train.py' else module.semi_store_name(args)
        best, shots, n_val, per_class, _ = _log_values(os.path.join(args.root_log, name))
        assert n_val == 1 and rows[key]['n'] == '1' and rows[key]['status'] == 'done'
        assert float(rows[key]['best_err']) == pytest.approx(100 - best, abs=1e-4)
        expected = shot_accuracy(per_class, labeled)
        got = [float(rows[key][g]) if rows[key][g] else np.nan for g in ('many', 'medium', 'few')]
        assert got == pytest.approx([expected[g] for g in ('many', 'medium', 'few')], abs=1e-3, nan_ok=True)
        if key == 'CE':
            assert got == pytest.approx(shots, abs=0.05, nan_ok=True)  # its own log's groups (3-decimal rounding)
    assert rows['CE']['paper'] == '' and float(rows['DU_rhoU50']['paper']) == 18.36
    assert float(rows['DU_rhoU50']['best_minus_paper']) == pytest.approx(float(rows['DU_rhoU50']['best_err']) - 18.36,
                                                                         abs=1e-3)
    with open(os.path.join(out, 'cifar10-semi.md')) as f:
        md = f.read()
    assert '18.36' in md and 'x0.01 after 1 and x0.0001 after 1 of 1 epochs' in md
    assert open(os.path.join(out, 'cifar10-semi.png'), 'rb').read(8) == b'\x89PNG\r\n\x1a\n'

    before = _mtimes(os.path.join(out, 'runs'))
    capsys.readouterr()
    assert reproduce.main(argv) == 0
    assert len(ran) == 3  # nothing ran again
    assert capsys.readouterr().out.count('skipped') == 3
    assert _mtimes(os.path.join(out, 'runs')) == before
    assert reproduce.main([*argv, '--dry-run']) == 0
    assert capsys.readouterr().out.count(': done, skipped') == 3


@pytest.fixture(scope='module')
def ssp_run(tmp_path_factory):
    """A tiny cifar10-ssp cell (rotation pre-training -> train.py) whose train.py stage is stopped
    after epoch 1 of 2, then the same command again."""
    tmp = tmp_path_factory.mktemp('ssp')
    fixtures.write_cifar10(tmp / 'data', per_class=20, test_per_class=10)
    out = str(tmp / 'out')
    argv = ['--table', 'cifar10-ssp', '--seeds', '0', '--epochs', '2', '--cells', 'Uniform+SSP_rho10',
            '--data_path', str(tmp / 'data'), '--out', out, TINY]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CIFAR10, '_check_integrity', lambda self: True)
        ran = _in_process(mp, stop_first='train.py')
        first = reproduce.main(argv)
        n_first = len(ran)
        second = reproduce.main(argv)
    return {'out': out, 'argv': argv, 'ran': ran, 'codes': (first, second), 'n_first': n_first}


def test_stage_stopped_half_way_is_resumed(ssp_run):
    ran, n_first = ssp_run['ran'], ssp_run['n_first']
    assert ssp_run['codes'] == (143, 0)
    assert [s for s, _ in ran] == ['pretrain_rot.py', 'train.py', 'train.py']
    assert n_first == 2 and '--resume' not in ran[1][1]
    resumed = ran[2][1]
    ckpt_path = _flag(resumed, '--resume')
    args = importlib.import_module('train').build_parser().parse_args(resumed)
    assert ckpt_path == os.path.join(args.root_model, importlib.import_module('train').supervised_store_name(args),
                                     'ckpt.pth.tar')
    ckpt = load_checkpoint(ckpt_path)
    assert (ckpt['epoch'], ckpt['step']) == (2, 0)
    # resumed, not restarted: the log holds epochs 1 and 2 once each (a restart would append two more)
    best, _, n_val, _, _ = _log_values(os.path.join(args.root_log, ckpt['store_name']))
    assert n_val == 2 and ckpt['best_acc1'] == pytest.approx(best, abs=1e-3)
    assert float(_rows(ssp_run['out'], 'cifar10-ssp')['Uniform+SSP_rho10']['best_err']) == \
        pytest.approx(100 - best, abs=1e-4)


def test_progress_of_a_mid_epoch_checkpoint(tmp_path):
    stage = scripts.Stage('train.py', ('--dataset', 'digits', '--epochs', '3', '--exp_str', 'x',
                                         '--root_model', str(tmp_path)))
    path = stage.output()
    assert not stage.progress().done and stage.progress().resume == ()
    os.makedirs(os.path.dirname(path))
    torch.save({'epoch': 2, 'step': 3}, path)
    p = stage.progress()
    assert not p.done and p.resume == ('--resume', path) and 'epoch 2 step 3 of 3' in p.note
    torch.save({'epoch': 3, 'step': 0}, path)
    assert stage.progress().done


def test_collect_marks_missing_cells(ssp_run, capsys):
    argv = [a for a in ssp_run['argv'] if a not in ('--cells', 'Uniform+SSP_rho10')]
    assert reproduce.main([*argv, '--collect', '--cells', 'Uniform_rho10', 'Uniform+SSP_rho10']) == 0
    rows = _rows(ssp_run['out'], 'cifar10-ssp')
    assert list(rows) == ['Uniform_rho10', 'Uniform+SSP_rho10']
    assert (rows['Uniform_rho10']['n'], rows['Uniform_rho10']['status'], rows['Uniform_rho10']['best_err']) == \
        ('0', 'missing', '')
    assert rows['Uniform+SSP_rho10']['status'] == 'done' and float(rows['Uniform+SSP_rho10']['paper']) == 12.28
    md = open(os.path.join(ssp_run['out'], 'cifar10-ssp.md')).read()
    assert '| rho = 10: CE (Uniform) | 0 | missing |' in md
    assert len(ssp_run['ran']) == 3  # --collect ran nothing


def test_digits_stage_runs_as_a_subprocess(tmp_path):
    out = tmp_path / 'out'
    proc = subprocess.run([sys.executable, 'reproduce.py', '--table', 'digits-mini', '--seeds', '0', '--epochs', '1',
                           '--cells', 'CE', '--out', str(out), '--stage-args=-a resnet20'],
                          cwd=REPO, env=fixtures.script_env(gpu=True), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert '[reproduce] stage 1/1' in proc.stdout and 'val Results' in proc.stdout  # the stage's own output
    log_dir = out / 'runs' / 'digits-mini' / 'log' / 'digits_resnet20_CE_None_exp_0.01_base_s0r0e1_current'
    best, shots, _, _, _ = _log_values(str(log_dir))
    row = _rows(str(out), 'digits-mini')['CE']
    assert float(row['best_err']) == pytest.approx(100 - best, abs=1e-4)
    assert float(row['many']) == pytest.approx(shots[0], abs=1e-3)


def _error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.run_main(reproduce.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith('error: ')
    return err[0]


def test_bad_input(cifar10_root, tmp_path, capsys):
    out = tmp_path / 'out'
    assert 'unknown table' in _error(capsys, ['--table', 'cifar10', '--out', str(out)])
    assert 'integers' in _error(capsys, ['--table', 'cifar10-ssp', '--seeds', '0', 'one', '--out', str(out)])
    msg = _error(capsys, ['--table', 'cifar10-semi', '--data_path', cifar10_root, '--out', str(out)])
    assert 'ti_80M_selected.pickle' in msg and 'Data preparation' in msg
    msg = _error(capsys, ['--table', 'cifar100-ssp', '--data_path', cifar10_root, '--out', str(out)])
    assert 'cifar-100-python' in msg and 'toronto' in msg
    msg = _error(capsys, ['--table', 'cifar10-ssp', '--data_path', cifar10_root, '--out', str(out),
                          '--stage-args=--no_such_flag 1'])
    assert 'no_such_flag' in msg and '--stage-args' in msg
    assert 'unknown cell' in _error(capsys, ['--table', 'cifar10-ssp', '--cells', 'CE', '--out', str(out)])
    assert not out.exists()


def test_collect_reads_imagenet_inat_results(tmp_path):
    """The decoupled cells read the results_<split>.json that imagenet_inat writes (its own report())."""
    from imagenet_inat import stages
    out = str(tmp_path / 'out')
    log_dir = os.path.join(out, 'runs', 'imagenet-lt', 'imagenet_inat', 's0', 'feat_uniform')
    os.makedirs(log_dir)
    per_class = np.array([0.9, 0.5, np.nan, 0.2])
    summary = stages.report({'per_class': per_class, 'top1': 53.5, 'top5': 80.0, 'loss': 1.0, 'count': 30},
                            'test', [150, 50, 30, 5], lambda line: None)
    with open(os.path.join(log_dir, 'results_test.json'), 'w') as f:
        import json
        json.dump(summary, f)
    torch.save({'epoch': 90}, os.path.join(log_dir, 'final_model_checkpoint.pth'))
    assert reproduce.main(['--table', 'imagenet-lt', '--seeds', '0', '--out', out, '--collect',
                           '--cells', 'Uniform+SSP', 'cRT+SSP']) == 0
    rows = _rows(out, 'imagenet-lt')
    assert float(rows['Uniform+SSP']['best_err']) == pytest.approx(46.5) and rows['Uniform+SSP']['last_err'] == ''
    # class 2 (medium) has no test image: imagenet_inat leaves it out of its group
    assert [float(rows['Uniform+SSP'][g]) for g in ('many', 'medium', 'few')] == pytest.approx([90, 50, 20])
    assert float(rows['Uniform+SSP']['paper']) == 54.4 and float(rows['Uniform+SSP']['best_minus_paper']) == \
        pytest.approx(46.5 - 54.4)
    assert rows['cRT+SSP']['status'] == 'missing'


# The paper's numbers as the README's tables give them (top-1 error, %), per cell key.
PAPER = {
    'cifar10-semi': {'CE': None, 'DU_rhoU1': 16.79, 'DU_rhoU25': 16.88, 'DU_rhoU50': 18.36, 'DU_rhoU100': 19.94},
    'svhn-semi': {'CE': None, 'DU_rhoU1': 13.07, 'DU_rhoU25': 13.36, 'DU_rhoU50': 13.16, 'DU_rhoU100': 14.54},
    'cifar10-ssp': {'Uniform_rho10': None, 'Uniform+SSP_rho10': 12.28, 'Balanced_rho10': None,
                    'Balanced+SSP_rho10': 11.57, 'Uniform_rho50': None, 'Uniform+SSP_rho50': 21.80,
                    'Balanced_rho50': None, 'Balanced+SSP_rho50': 19.60, 'Uniform_rho100': None,
                    'Uniform+SSP_rho100': 26.50, 'Balanced_rho100': None, 'Balanced+SSP_rho100': 23.47},
    'cifar100-ssp': {'Uniform_rho10': None, 'Uniform+SSP_rho10': 42.93, 'Balanced_rho10': None,
                     'Balanced+SSP_rho10': 41.94, 'Uniform_rho50': None, 'Uniform+SSP_rho50': 54.96,
                     'Balanced_rho50': None, 'Balanced+SSP_rho50': 52.91, 'Uniform_rho100': None,
                     'Uniform+SSP_rho100': 59.60, 'Balanced_rho100': None, 'Balanced+SSP_rho100': 56.94},
}
ROOTS = {'cifar10-semi': 'cifar10_semi_root', 'svhn-semi': 'svhn_root', 'cifar10-ssp': 'cifar10_root',
         'cifar100-ssp': 'cifar100_root'}


def _shots(per_class, counts):
    """README: many > 100, medium 20-100, few < 20 training images; the mean of the group's classes."""
    counts = np.asarray(counts)
    groups = [counts > 100, (counts >= 20) & (counts <= 100), counts < 20]
    return [per_class[g].mean() if g.any() else np.nan for g in groups]


@pytest.mark.parametrize('table', list(ROOTS))
def test_table_runs_with_its_readme_command(table, request, tmp_path, monkeypatch):
    """`python reproduce.py --table T --data_path ./data` as the README writes it (only --seeds 0 and
    --epochs 1 for time): every stage runs with the scripts' defaults and every row is filled with the
    values of the runs' own logs."""
    data = request.getfixturevalue(ROOTS[table])
    ran = _in_process(monkeypatch)
    out = str(tmp_path / 'out')
    assert reproduce.main(['--table', table, '--data_path', data, '--seeds', '0', '--epochs', '1',
                           '--out', out]) == 0
    scripts = [s for s, _ in ran]
    if table.endswith('semi'):
        assert scripts == ['train.py', 'gen_pseudolabels.py'] + ['train_semi.py'] * 4
    else:
        assert scripts == (['train.py', 'pretrain_rot.py'] + ['train.py'] * 3) * 3
        for script, argv in ran:
            if '--pretrained_model' in argv:  # the rotation run's best checkpoint, where pretrain_rot.py wrote it
                weights = _flag(argv, '--pretrained_model')
                assert os.path.isfile(weights) and f'{table[:-4]}_resnet32_CE_None_exp_' in weights
    rows = _rows(out, table)
    assert list(rows) == list(PAPER[table])
    last_runs = {}
    for script, argv in ran:
        if script in ('train.py', 'train_semi.py'):
            module = importlib.import_module(MODULES[script])
            args = module.build_parser().parse_args(argv)
            assert (args.arch, args.batch_size) == ('resnet32', 128 if script == 'train.py' else 256)
            name = module.supervised_store_name(args) if script == 'train.py' else module.semi_store_name(args)
            last_runs[(args.exp_str, args.train_rule, args.imb_factor, getattr(args, 'imb_factor_unlabel', None),
                       bool(args.pretrained_model))] = (args, name)
    dataset = {'cifar10-semi': 'cifar10', 'svhn-semi': 'svhn', 'cifar10-ssp': 'cifar10',
               'cifar100-ssp': 'cifar100'}[table]
    num_classes = 100 if dataset == 'cifar100' else 10
    for key, row in rows.items():
        assert (row['n'], row['status']) == ('1', 'done'), key
        if table.endswith('semi'):
            imb_u = None if key == 'CE' else {'1': 1.0, '25': 0.04, '50': 0.02, '100': 0.01}[key.split('rhoU')[1]]
            args, name = next(v for k, v in last_runs.items() if k[3] == imb_u)
        else:
            rho = key.split('_rho')[1]
            rule = 'Resample' if key.startswith('Balanced') else 'None'
            args, name = next(v for k, v in last_runs.items()
                              if k[1] == rule and k[2] == 1 / int(rho) and k[4] == ('+SSP' in key))
        best, _, n_val, per_class, last = _log_values(os.path.join(args.root_log, name))
        assert n_val == 1 and len(per_class) == num_classes
        assert float(row['best_err']) == pytest.approx(100 - best, abs=1e-4)
        assert float(row['last_err']) == pytest.approx(100 - last, abs=1e-4)
        labeled = DATASETS[dataset].build_train(data, 'exp', args.imb_factor, 0, None).get_cls_num_list()
        got = [float(row[g]) if row[g] else np.nan for g in ('many', 'medium', 'few')]
        assert got == pytest.approx(_shots(per_class, labeled), abs=1e-3, nan_ok=True)
        paper = PAPER[table][key]
        assert (row['paper'] == '') if paper is None else (float(row['paper']) == paper)


def test_a_100_class_log_round_trips_through_the_reader(tmp_path):
    """log_test.csv as the trainer writes it for 100 classes (the per-class list wrapped over lines)."""
    per_class = np.round(np.linspace(0, 1, 100), 3)
    metrics = {'top1': 41.25, 'top5': 70.5, 'loss': 2.34567, 'per_class': per_class}
    lines = trainer.report_lines(metrics, [500 - 4 * i for i in range(100)])
    text = '\n'.join(lines + ['Best Prec@1: 43.000', 'val Confusion Matrix: [[1]]']) + '\n'
    assert text.count('\n') > 8  # wrapped: 100 values do not fit one 75-character line
    (tmp_path / 'log_test.csv').write_text(text * 2)
    records = trainer.read_test_log(str(tmp_path / 'log_test.csv'))
    assert len(records) == 2
    np.testing.assert_array_equal(records[-1]['per_class'], per_class)
    assert (records[-1]['top1'], records[-1]['top5'], records[-1]['loss'], records[-1]['best']) == \
        (41.25, 70.5, 2.34567, 43.0)
    counts = np.array([500 - 4 * i for i in range(100)])  # 500 .. 104: all many-shot
    assert records[-1]['shots'][0] == pytest.approx(100 * per_class[counts > 100].mean(), abs=5e-4)
    result = results.read_trainer_log(str(tmp_path / 'log_test.csv'))
    assert result['best'] == 43.0 and result['last'] == 41.25
    np.testing.assert_allclose(result['per_class'], 100 * per_class)


def test_an_unreadable_log_is_named_in_one_line(tmp_path, capsys):
    log = tmp_path / 'log_test.csv'
    log.write_text('val Results: Prec@1 10.000 Prec@5 50.000 Loss 1.00000\nval Class Accuracy: [0.1,0.2,\n')
    with pytest.raises(UserError) as e:
        trainer.read_test_log(str(log))
    assert str(log) in str(e.value) and 'line 2' in str(e.value) and '\n' not in str(e.value)
    log.write_text('garbage\n')
    with pytest.raises(UserError) as e:
        results.read_trainer_log(str(log))
    assert str(log) in str(e.value) and 'line 1' in str(e.value) and 'Results:' in str(e.value)


# README "Long-tailed baselines": each row's method, as train.py / train_stage2.py flags.
BASELINE_METHODS = {
    'CE': ('CE', 'None', None), 'Focal': ('Focal', 'None', None), 'CB': ('CE', 'Reweight', None),
    'LDAM-DRW': ('LDAM', 'DRW', None), 'BalancedSoftmax': ('BalancedSoftmax', 'None', None),
    'LogitAdjusted': ('LogitAdjusted', 'None', None), 'CE+posthocLA': ('CE', 'None', 1.0),
    'LogitAdjustedAdaptive': ('LogitAdjustedAdaptive', 'None', None),
    'LDAM-DRW+SSP': ('LDAM', 'DRW', None), 'BalancedSoftmax+SSP': ('BalancedSoftmax', 'None', None),
}
STAGE2 = {'cRT': 'cRT', 'tau-norm': 'tau_norm', 'NCM': 'NCM', 'LWS': 'LWS', 'WB': 'WB'}
# BALMS's decoupled stage behind the published cRT / LWS numbers: 2,000 iterations at batch 512, as epochs of
# floor(N / 512) steps: CIFAR-10-LT rho 100 (N = 12,406): 24 steps, 84 epochs; rho 50 (13,996): 27, 75; rho 10
# (20,431): 39, 52
BALMS_EPOCHS = {'0.01': '84', '0.02': '75', '0.1': '52'}
# A few published top-1 errors (%) as their papers print them: Cao et al. 2019 Table 2 (LDAM-DRW), Cui et al.
# 2019 Table 2 (softmax CE); None where no source reports one. Only cells the test below runs.
PUBLISHED_SPOTS = {
    'cifar10-lt-baselines': {'LDAM-DRW_rho100': 22.97, 'CE_rho100': 29.64, 'WB_rho100': None},
    'cifar100-lt-baselines': {'LDAM-DRW_rho10': 41.29, 'CE_rho10': 44.29, 'LogitAdjusted_rho10': None},
}


BASELINE_KEYS = ['CE', 'Focal', 'CB', 'LDAM-DRW', 'BalancedSoftmax', 'LogitAdjusted', 'LogitAdjustedAdaptive',
                 'CE+posthocLA', 'cRT', 'tau-norm', 'NCM', 'LWS', 'WB', 'LDAM-DRW+SSP', 'BalancedSoftmax+SSP']


def test_baseline_table_plans_every_rho_alike(tmp_path, capsys):
    """`python reproduce.py --table cifar10-lt-baselines --data_path ./data` (README "Reproducing the paper")
    plans 17 stages for each of rho = 100, 50, 10: for rho 50 and 10, rho 100's commands with the
    imbalance factor (1/50 = 0.02, 1/10 = 0.1) in its flag and in the run folders' names, and cRT's and LWS's
    epochs of BALMS's 2,000 iterations at that rho (before --epochs, which wins); so a run of the rho-100
    cells (below) stands for the others."""
    commands = _commands(capsys, ['--table', 'cifar10-lt-baselines', '--data_path', str(tmp_path), '--seeds', '0',
                                  '--epochs', '1', '--out', str(tmp_path / 'out')])
    assert len(commands) == 51
    by_factor = {}
    for cmd in commands:
        by_factor.setdefault(_flag(_script(cmd)[1], '--imb_factor'), []).append(cmd)
    assert sorted(by_factor) == ['0.01', '0.02', '0.1'] and all(len(c) == 17 for c in by_factor.values())
    balms = [_script(c)[1] for c in by_factor['0.01'] if '--stage' in c and _flag(c, '--stage') in ('cRT', 'LWS')]
    assert len(balms) == 2 and all(argv[argv.index('--epochs') + 1] == '84' for argv in balms)
    for factor in ('0.02', '0.1'):
        expected = [[factor if prev == '--imb_factor' else w.replace('_exp_0.01_', f'_exp_{factor}_')
                     for prev, w in zip([''] + cmd, cmd)] for cmd in by_factor['0.01']]
        for cmd in expected:
            if '--stage' in cmd and cmd[cmd.index('--stage') + 1] in ('cRT', 'LWS'):
                cmd[cmd.index('--epochs') + 1] = BALMS_EPOCHS[factor]  # the first: the table's, before --epochs 1
        assert by_factor[factor] == expected
    assert len({shlex.join(c) for c in commands}) == 51


@pytest.mark.parametrize('table, rho, per_class', [('cifar10-lt-baselines', 100, 100),
                                                   ('cifar100-lt-baselines', 10, 10)])
def test_baseline_table_runs_with_its_readme_command(table, rho, per_class, tmp_path, monkeypatch, no_checksum,
                                                     one_thread):
    """`python reproduce.py --table T --data_path ./data` (README "Reproducing the paper"), --seeds 0 and
    --epochs 1 for time, the cells of one rho (--cells; every rho plans alike: the test above): every row
    filled from its own run's log, each run with its method's flags, stage 2 on the right stage-1 run, the
    published numbers beside. CIFAR-10 at rho = 100 with 100 training images per class, so that one is left
    in the rarest class (Balanced Softmax, LA and LDAM need one in every class); CIFAR-100 (its 100-class
    logs) at rho = 10 with 10 per class."""
    if table.startswith('cifar100'):
        fixtures.write_cifar100(tmp_path, per_class=per_class, test_per_class=2)
    else:
        fixtures.write_cifar10(tmp_path, per_class=per_class, test_per_class=10)
    ran = _in_process(monkeypatch)
    out = str(tmp_path / 'out')
    cells = [f'{k}_rho{rho}' for k in BASELINE_KEYS]
    assert reproduce.main(['--table', table, '--data_path', str(tmp_path), '--seeds', '0', '--epochs', '1',
                           '--out', out, '--cells', *cells]) == 0
    rows = _rows(out, table)
    assert list(rows) == cells
    dataset, num_classes = table.split('-')[0], 100 if table.startswith('cifar100') else 10
    runs = {}  # run folder name -> (script, args)
    for script, argv in ran:
        module = importlib.import_module(MODULES[script])
        args = module.build_parser().parse_args(argv)
        name = {'train.py': lambda: module.supervised_store_name(args),
                'pretrain_rot.py': lambda: module.rot_store_name(args),
                'train_stage2.py': lambda: module.stage2_store_name(args)}[script]()
        runs[name] = (script, args)
    assert len(runs) == len(ran) == 17  # every stage ran once
    for key, row in rows.items():
        method = key.rsplit('_rho', 1)[0]
        assert (row['n'], row['status']) == ('1', 'done'), key
        # the cell's result run: the one whose log the row holds
        matches = [(name, script, args) for name, (script, args) in runs.items() if args.imb_factor == 1 / rho
                   and script != 'pretrain_rot.py'
                   and ((script == 'train_stage2.py' and args.stage == STAGE2.get(method))
                        or (script == 'train.py' and method in BASELINE_METHODS
                            and (args.loss_type, args.train_rule, args.posthoc_la) == BASELINE_METHODS[method]
                            and bool(args.pretrained_model) == method.endswith('+SSP')
                            and args.weight_decay == 2e-4))]  # not weight balancing's stage 1
        (name, script, args), = matches
        assert args.dataset == dataset and args.epochs == 1
        if script == 'train_stage2.py':
            stage1 = os.path.basename(os.path.dirname(args.stage1))
            s1_script, s1 = runs[stage1]
            assert s1_script == 'train.py' and (s1.loss_type, s1.train_rule, s1.posthoc_la) == ('CE', 'None', None)
            assert s1.imb_factor == args.imb_factor
            if method == 'WB':  # Alshammari et al.'s stage 1, and their stage 2 from its best epoch
                assert (s1.arch, s1.batch_size, s1.lr, s1.lr_schedule, s1.weight_decay) == (
                    'resnet34_cifar', 64, 0.01, 'cosine_nowarmup', 5e-3)
                assert os.path.basename(args.stage1) == 'ckpt.best.pth.tar'
            else:
                assert (s1.arch, s1.weight_decay) == ('resnet32', 2e-4)
                assert os.path.basename(args.stage1) == 'ckpt.pth.tar'
            # cRT and LWS: BALMS's decoupled batch and lr (their epochs: the test above)
            assert (args.batch_size, args.lr) == ((512, 0.1) if method in ('cRT', 'LWS') else
                                                  {'WB': (64, 0.01)}.get(method, (128, 0.1)))
        elif method.endswith('+SSP'):
            rot = os.path.basename(os.path.dirname(args.pretrained_model))
            assert runs[rot][0] == 'pretrain_rot.py' and runs[rot][1].imb_factor == args.imb_factor
        else:
            assert (args.arch, args.batch_size, args.lr_steps) == ('resnet32', 128, [1, 1])
        best, _, n_val, per_class_acc, last = _log_values(os.path.join(args.root_log, name))
        assert n_val == 1 and len(per_class_acc) == num_classes
        assert float(row['best_err']) == pytest.approx(100 - best, abs=1e-4)
        assert float(row['last_err']) == pytest.approx(100 - last, abs=1e-4)
    assert set(PUBLISHED_SPOTS[table]) <= set(rows)
    for key, error in PUBLISHED_SPOTS[table].items():
        assert (float(rows[key]['paper']) if rows[key]['paper'] else None) == error, key
    with open(os.path.join(out, f'{table}.md')) as f:
        text = f.read()
    assert '| published | best − published |' in text and 'Where each published number comes from' in text


# ------------------------------------------------------------------ plans and seeds, pinned (were in test_pinned.py)
# Expected values written out from the README and the original: CE (Balanced) = --train_rule Resample,
# cRT / tau-norm / LWS on the uniform stage 1, the mean and sample std (ddof = 1) over seeds, and the
# documented flags reproduce.py --rand_number and --stage-args "SCRIPT: FLAGS".

def _dry_run(capsys, *argv):
    """[(script, flags)] of the commands `reproduce.py ... --dry-run` prints, in order."""
    capsys.readouterr()
    assert reproduce.main([*argv, '--dry-run']) == 0
    commands = []
    for line in capsys.readouterr().out.splitlines():
        if not line or line.startswith('#'):
            continue
        cmd = shlex.split(line)
        assert cmd[0] == sys.executable
        if cmd[1:3] == ['-m', 'imagenet_inat.main']:
            commands.append(('imagenet_inat', cmd[3:]))
        else:
            commands.append((os.path.basename(cmd[1]), cmd[2:]))
    return commands


@pytest.mark.parametrize('table', ['cifar10-ssp', 'cifar100-ssp'])
def test_ce_balanced_is_resample(table, tmp_path, capsys):
    """README: CE (Balanced) is class-balanced sampling (--train_rule Resample); Uniform is plain CE."""
    for rho in (10, 50, 100):
        for key, rule in (('Uniform', 'None'), ('Balanced', 'Resample')):
            (script, argv), = _dry_run(capsys, '--table', table, '--seeds', '0', '--out', str(tmp_path),
                                       '--cells', f'{key}_rho{rho}')
            args = train.build_parser().parse_args(argv)
            assert (script, args.train_rule, args.loss_type, args.imb_factor) == ('train.py', rule, 'CE', 1 / rho)
            assert not args.pretrained_model
            (rot, _), (script, argv) = _dry_run(capsys, '--table', table, '--seeds', '0', '--out', str(tmp_path),
                                                '--cells', f'{key}+SSP_rho{rho}')
            args = train.build_parser().parse_args(argv)
            assert (rot, script, args.train_rule) == ('pretrain_rot.py', 'train.py', rule) and args.pretrained_model


def test_digits_mini_balanced_is_resample(tmp_path, capsys):
    for key, rule in (('CE', 'None'), ('CE+SSP', 'None'), ('Balanced', 'Resample'), ('Balanced+SSP', 'Resample')):
        script, argv = _dry_run(capsys, '--table', 'digits-mini', '--seeds', '0', '--out', str(tmp_path),
                                '--cells', key)[-1]
        assert script == 'train.py' and train.build_parser().parse_args(argv).train_rule == rule


@pytest.mark.parametrize('table, config_dir', [('imagenet-lt', 'ImageNet_LT'), ('inat', 'iNaturalist18')])
def test_decoupled_stage_2_starts_from_the_uniform_stage_1(table, config_dir, tmp_path, capsys):
    """cRT, tau-norm and LWS re-balance the classifier of the instance-balanced (feat_uniform) stage 1,
    which runs once per seed for all three; CE (Balanced) is the feat_balance stage 1."""
    def cfg(argv):
        path = _flag(argv, '--cfg')
        assert os.path.dirname(os.path.abspath(path)) == os.path.join(fixtures.REPO, 'imagenet_inat', 'config',
                                                                       config_dir)
        return os.path.basename(path)

    moco, *stages = _dry_run(capsys, '--table', table, '--seeds', '0', '--out', str(tmp_path))
    assert moco[0] == 'pretrain_moco.py' and all(s == 'imagenet_inat' for s, _ in stages)
    by_cfg = {cfg(argv): argv for _, argv in stages}
    assert sorted(by_cfg) == sorted(['feat_uniform.yaml', 'feat_balance.yaml', 'cls_crt.yaml',
                                     'cls_tau_norm.yaml', 'cls_lws.yaml']) and len(stages) == 5
    uniform_dir = os.path.abspath(_flag(by_cfg['feat_uniform.yaml'], '--log_dir'))
    balance_dir = os.path.abspath(_flag(by_cfg['feat_balance.yaml'], '--log_dir'))
    assert uniform_dir != balance_dir
    for stage2 in ('cls_crt.yaml', 'cls_tau_norm.yaml', 'cls_lws.yaml'):
        source = os.path.abspath(_flag(by_cfg[stage2], '--model_dir'))
        assert source in (uniform_dir, os.path.join(uniform_dir, 'final_model_checkpoint.pth')), (stage2, source)
    # and the stage 1 of each cell, alone
    for key, first in (('cRT+SSP', 'feat_uniform.yaml'), ('tau-norm+SSP', 'feat_uniform.yaml'),
                       ('LWS+SSP', 'feat_uniform.yaml'), ('Uniform+SSP', 'feat_uniform.yaml'),
                       ('Balanced+SSP', 'feat_balance.yaml')):
        cell = _dry_run(capsys, '--table', table, '--seeds', '0', '--out', str(tmp_path), '--cells', key)
        assert cfg(cell[1][1]) == first


def _write_finished_run(stage_argv, best, top1, per_class):
    """A finished train.py run folder as the trainer writes it: ckpt.pth.tar with all its epochs and a
    log_test.csv of one evaluation (report_lines) plus its Best Prec@1."""
    args = train.build_parser().parse_args(stage_argv)
    name = train.supervised_store_name(args)
    os.makedirs(os.path.join(args.root_model, name))
    torch.save({'epoch': args.epochs, 'step': 0}, os.path.join(args.root_model, name, 'ckpt.pth.tar'))
    os.makedirs(os.path.join(args.root_log, name))
    counts = DATASETS[args.dataset].build_train(args.data_path, args.imb_type, args.imb_factor,
                                                args.rand_number, None).get_cls_num_list()
    metrics = {'top1': top1, 'top5': 100.0, 'loss': 1.0, 'per_class': np.asarray(per_class)}
    lines = trainer.report_lines(metrics, counts) + [f'Best Prec@1: {best:.3f}']
    with open(os.path.join(args.root_log, name, 'log_test.csv'), 'w') as f:
        f.write('\n'.join(lines) + '\n')


def test_std_over_seeds_is_the_sample_std(tmp_path, capsys):
    """Three seeds with best top-1 80, 82, 87 (errors 20, 18, 13): mean 17, sample std sqrt(13) = 3.606
    (the population std would be 2.944); last top-1 70, 75, 77 (errors 30, 25, 23): mean 26, std sqrt(13)."""
    out = str(tmp_path / 'out')
    argv = ['--table', 'digits-mini', '--seeds', '0', '1', '2', '--out', out, '--cells', 'CE']
    commands = _dry_run(capsys, *argv)
    assert [s for s, _ in commands] == ['train.py'] * 3
    # class 0 is digits-LT's only many-shot class (148 images): its accuracy is the many column
    for (_, stage_argv), best, top1, many in zip(commands, (80, 82, 87), (70, 75, 77), (0.9, 0.6, 0.3)):
        _write_finished_run(stage_argv, best, top1, [many] + [0.5] * 9)
    assert reproduce.main([*argv, '--collect']) == 0
    with open(os.path.join(out, 'digits-mini.csv')) as f:
        row, = csv.DictReader(f)
    assert (row['n'], row['status']) == ('3', 'done')
    assert float(row['best_err']) == pytest.approx(17, abs=1e-4)
    assert float(row['best_err_std']) == pytest.approx(math.sqrt(13), abs=1e-4)
    assert float(row['last_err']) == pytest.approx(26, abs=1e-4)
    assert float(row['last_err_std']) == pytest.approx(math.sqrt(13), abs=1e-4)
    assert float(row['many']) == pytest.approx(60, abs=1e-3) and float(row['many_std']) == pytest.approx(30, abs=1e-3)
    with open(os.path.join(out, 'digits-mini.md')) as f:
        assert '| CE (Uniform) | 3 | 17.00 ± 3.61 | 26.00 ± 3.61 |' in f.read()


# ------------------------------------------------------------------ documented flags

def test_rand_number_fixes_the_subset_of_every_seed(tmp_path, capsys):
    """README: each seed draws its own subset (--rand_number = seed); --rand_number N fixes one for all,
    in every stage that draws one (train.py, gen_pseudolabels.py, train_semi.py)."""
    base = ['--table', 'cifar10-semi', '--seeds', '0', '1', '--out', str(tmp_path)]
    own = _dry_run(capsys, *base)
    fixed = _dry_run(capsys, *base, '--rand_number', '7')
    assert len(own) == len(fixed) == 12
    # seed 0's six stages, then seed 1's
    assert [_flag(a, '--rand_number') for _, a in own] == ['0'] * 6 + ['1'] * 6
    assert [_flag(b, '--rand_number') for _, b in fixed] == ['7'] * 12
    # the runs with the fixed subset go to other folders than seed 1's own-subset runs
    assert {_flag(a, '--exp_str') for s, a in fixed if '--exp_str' in a}.isdisjoint(
        {_flag(a, '--exp_str') for s, a in own if '--exp_str' in a and _flag(a, '--seed') == '1'})
    semi = [train_semi.build_parser().parse_args(a) for s, a in fixed if s == 'train_semi.py']
    assert {(x.seed, x.rand_number) for x in semi} == {(0, 7), (1, 7)}


@pytest.mark.parametrize('words', [
    ['--stage-args', 'gen_pseudolabels.py: -b 1000 --overwrite'],    # as reproduce.py --help writes it
    ['--stage-args=gen_pseudolabels.py: -b 1000 --overwrite'],
])
def test_stage_args_for_one_script(words, tmp_path, capsys):
    """README: --stage-args "FLAGS" goes to every stage, --stage-args "SCRIPT: FLAGS" to that script's."""
    commands = _dry_run(capsys, '--table', 'cifar10-semi', '--seeds', '0', '--out', str(tmp_path),
                        '--stage-args', '-j 0', *words)
    assert [s for s, _ in commands] == ['train.py', 'gen_pseudolabels.py'] + ['train_semi.py'] * 4
    for script, argv in commands:
        module = {'train.py': train, 'gen_pseudolabels.py': gen_pseudolabels, 'train_semi.py': train_semi}[script]
        args = module.build_parser().parse_args(argv)
        assert args.workers == 0
        if script == 'gen_pseudolabels.py':
            assert (args.batch_size, args.overwrite) == (1000, True) and argv[-3:] == ['-b', '1000', '--overwrite']
        else:
            assert '--overwrite' not in argv and args.batch_size == {'train.py': 128, 'train_semi.py': 256}[script]


# ------------------------------------------------------------------ partial results

def test_a_cell_whose_seeds_partly_finished_shows_the_finished_ones(tmp_path, capsys):
    """README "Results": mean ± std over the finished seeds and their number n; unfinished cells are marked
    partial. Seeds 0 and 2 finished (best top-1 80 and 86, last 70 and 76: errors 20 and 14, 30 and 24: mean 17
    and 27, sample std sqrt(18) = 4.243 each); seed 1 stopped after epoch 1 of 2 with a log whose Best Prec@1
    (99) must not count. CE (Balanced): only seed 2 finished, n = 1 and no std."""
    out = str(tmp_path / 'out')
    argv = ['--table', 'digits-mini', '--seeds', '0', '1', '2', '--epochs', '2', '--out', out,
            '--cells', 'CE', 'Balanced']
    commands = _dry_run(capsys, *argv)
    assert [s for s, _ in commands] == ['train.py'] * 6
    plain = [a for _, a in commands if _flag(a, '--train_rule') == 'None']
    balanced = [a for _, a in commands if _flag(a, '--train_rule') == 'Resample']
    _write_finished_run(plain[0], 80, 70, [0.5] * 10)
    _write_finished_run(plain[1], 99, 99, [0.99] * 10)
    args = train.build_parser().parse_args(plain[1])
    torch.save({'epoch': 1, 'step': 0}, os.path.join(args.root_model, train.supervised_store_name(args),
                                                     'ckpt.pth.tar'))  # stopped after epoch 1 of 2
    _write_finished_run(plain[2], 86, 76, [0.5] * 10)
    _write_finished_run(balanced[2], 60, 55, [0.5] * 10)
    assert reproduce.main([*argv, '--collect']) == 0
    rows = _rows(out, 'digits-mini')
    ce, bal = rows['CE'], rows['Balanced']
    assert (ce['n'], ce['seeds'], ce['status']) == ('2', '0 2', 'partial (2 of 3 seeds)')
    assert float(ce['best_err']) == pytest.approx(17, abs=1e-4) and float(ce['last_err']) == pytest.approx(27, abs=1e-4)
    assert float(ce['best_err_std']) == pytest.approx(math.sqrt(18), abs=1e-4)
    assert float(ce['last_err_std']) == pytest.approx(math.sqrt(18), abs=1e-4)
    assert (bal['n'], bal['seeds'], bal['status'], bal['best_err_std'], bal['last_err_std']) == \
        ('1', '2', 'partial (1 of 3 seeds)', '', '')
    assert float(bal['best_err']) == pytest.approx(40, abs=1e-4) and float(bal['last_err']) == pytest.approx(45, abs=1e-4)
    with open(os.path.join(out, 'digits-mini.md')) as f:
        md = f.read()
    assert '| CE (Uniform) | 2 | 17.00 ± 4.24 | 27.00 ± 4.24 |' in md
    assert '| CE (Balanced) | 1 | 40.00 | 45.00 |' in md
    assert 'mean ± std over n seeds (of 0 1 2)' in md


def test_a_stage_that_exits_0_without_its_output_fails_and_blocks_what_needs_it(tmp_path, monkeypatch, capsys):
    """A stage whose process exits 0 but leaves no finished artefact (here pretrain_rot.py writes nothing) has
    failed: the SSP run that needs it never starts, reproduce.py exits non-zero and names the stage and its
    log; the independent base model finishes and its row is filled. The same command again retries it."""
    ran, rot_writes = [], []

    def execute(cmd, env, log_path, *echo_children):
        script, argv = _script(cmd)
        ran.append((script, argv))
        if script == 'train.py':
            _write_finished_run(argv, 80, 70, [0.5] * 10)
        elif rot_writes:  # pretrain_rot.py, the second time: it finishes
            path = scripts.Stage(script, tuple(argv)).output()
            os.makedirs(os.path.dirname(path))
            torch.save({'epoch': 2, 'step': 0}, path)
        return 0

    monkeypatch.setattr(scheduler, 'execute', execute)
    out = str(tmp_path / 'out')
    argv = ['--table', 'digits-mini', '--seeds', '0', '--epochs', '2', '--cells', 'CE', 'CE+SSP', '--out', out]
    capsys.readouterr()
    assert reproduce.main(argv) == 1
    assert [s for s, _ in ran] == ['train.py', 'pretrain_rot.py']  # the SSP fine-tuning never started
    rot = scripts.Stage('pretrain_rot.py', tuple(ran[1][1]))
    console = capsys.readouterr().out
    log = os.path.join(out, 'runs', 'digits-mini', 'stage_logs',
                       'pretrain_rot-checkpoint-digits_resnet20_CE_None_exp_0.01_rot_s0r0e2_current.log')
    assert re.search(rf'^\[reproduce\] stage 2/3 failed at \+[\d.]+ s: exited normally but '
                     rf'{re.escape(rot.output())} is not finished; log {re.escape(log)}$', console, re.M)
    last = console.rstrip().splitlines()[-1]
    assert last.startswith('[reproduce] failed: stage 2/3 (pretrain_rot.py, ')
    assert ', exit status 0 but its output unfinished): log ' in last  # not a made-up 'exit status 1'
    assert f'log {log}, so 1 stage(s) that need it did not start; the others finished.' in last
    rows = _rows(out, 'digits-mini')
    assert [(k, r['n'], r['status']) for k, r in rows.items()] == [('CE', '1', 'done'), ('CE+SSP', '0', 'missing')]
    assert float(rows['CE']['best_err']) == pytest.approx(20, abs=1e-4)
    # again: the base model is skipped, the rotation stage retried, then the SSP run starts
    rot_writes.append(True)
    assert reproduce.main(argv) == 0
    assert [s for s, _ in ran[2:]] == ['pretrain_rot.py', 'train.py'] and '--resume' not in ran[2][1]
    assert _flag(ran[3][1], '--pretrained_model') == os.path.join(os.path.dirname(rot.output()), 'ckpt.best.pth.tar')
    assert [(k, r['n'], r['status']) for k, r in _rows(out, 'digits-mini').items()] == \
        [('CE', '1', 'done'), ('CE+SSP', '1', 'done')]


def _decoupled_stages(tmp_path, epochs=None):
    """imagenet-lt's stages of seed 0: MoCo, then imagenet_inat's feat_uniform, feat_balance, cRT, tau-norm, LWS."""
    opts = tables.Options('imagenet-lt', str(tmp_path / 'data'), str(tmp_path / 'out'), epochs, 'current', None, {})
    from repro.command import plan
    return plan(tables.TABLES['imagenet-lt'], opts, [0])[1]


def test_a_moco_stage_resumes_from_its_furthest_checkpoint(tmp_path):
    """README "Runs and resuming": MoCo is finished by moco_ckpt_<epochs>.pth.tar; before, it resumes from the
    furthest of its numbered checkpoints (moco_ckpt_0020: 20 epochs done) and the interrupted one, whose
    (epoch, step) it records: (15, 3) is behind 0020, (20, 7) beyond it."""
    moco = _decoupled_stages(tmp_path, epochs=30)[0]
    assert moco.script == 'pretrain_moco.py'
    final = moco.output()
    folder = os.path.dirname(final)
    assert os.path.basename(final) == 'moco_ckpt_0030.pth.tar'
    assert moco.progress() == scripts.Progress(False)
    os.makedirs(folder)
    for epoch in (10, 20):
        torch.save({'epoch': epoch}, os.path.join(folder, f'moco_ckpt_{epoch:04d}.pth.tar'))
    interrupted = os.path.join(folder, 'moco_ckpt_interrupted.pth.tar')
    torch.save({'epoch': 15, 'step': 3}, interrupted)
    p = moco.progress()
    assert not p.done and p.resume == ('--resume', os.path.join(folder, 'moco_ckpt_0020.pth.tar'))
    assert p.note == 'stopped at epoch 20 step 0: resuming'
    torch.save({'epoch': 20, 'step': 7}, interrupted)
    p = moco.progress()
    assert (p.done, p.resume, p.note) == (False, ('--resume', interrupted), 'stopped at epoch 20 step 7: resuming')
    torch.save({'epoch': 30}, final)
    assert moco.progress().done


def test_a_decoupled_stage_is_finished_by_its_results_file_too(tmp_path):
    """An imagenet_inat stage is finished when final_model_checkpoint.pth and its results_<split>.json exist
    (the JSON is written after the checkpoint: a run that ended between them has no result); with only
    latest_model_checkpoint.pth it resumes from its log folder."""
    crt = next(s for s in _decoupled_stages(tmp_path) if s.script == 'imagenet_inat' and
               os.path.basename(s.flag('--cfg')) == 'cls_crt.yaml')
    log_dir = crt.flag('--log_dir')
    assert crt.output() == os.path.join(log_dir, 'final_model_checkpoint.pth')
    assert crt.progress() == scripts.Progress(False)
    os.makedirs(log_dir)
    torch.save({'epoch': 3}, os.path.join(log_dir, 'latest_model_checkpoint.pth'))
    assert crt.progress() == scripts.Progress(False, ('--resume', log_dir), 'stopped half-way: resuming')
    torch.save({'epoch': 10}, crt.output())
    assert not crt.progress().done  # the final checkpoint without its results file
    with open(os.path.join(log_dir, 'results_test.json'), 'w') as f:
        f.write('{}')
    assert crt.progress().done
