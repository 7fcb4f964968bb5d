"""train.py end to end on tiny CIFAR-10-LT / digits fixtures (in-process, one or two epochs)."""
import collections
import os
import re

import pytest
import torch

import fixtures
import train
from checkpoint import load_checkpoint
from errors import UserError
from models import build_model


def _args(root, tmp_path, *extra):
    return ['--dataset', 'cifar10', '--data_path', str(root), '--imb_factor', '0.1', '--epochs', '1',
            '-b', '16', '-j', '0', '--seed', '0', '--root_log', str(tmp_path / 'log'),
            '--root_model', str(tmp_path / 'ckpt'), '-p', '2', *extra]


def _run_dir(tmp_path, loss='CE', rule='None', exp_str='ss_pretrained', dataset='cifar10', factor='0.1'):
    name = f'{dataset}_resnet32_{loss}_{rule}_exp_{factor}_{exp_str}'
    return tmp_path / 'log' / name, tmp_path / 'ckpt' / name


@pytest.mark.parametrize('loss,rule', [('CE', 'None'), ('Focal', 'None'), ('LDAM', 'None'),
                                       ('CE', 'Resample'), ('CE', 'Reweight'), ('LDAM', 'DRW')])
def test_one_epoch_writes_run_folder(cifar10_root, tmp_path, loss, rule):
    assert train.main(_args(cifar10_root, tmp_path, '--loss_type', loss, '--train_rule', rule)) == 0
    log_dir, model_dir = _run_dir(tmp_path, loss, rule)
    for name in ('log_train.csv', 'log_test.csv', 'args.txt', 'per_class_acc.png'):
        assert (log_dir / name).stat().st_size > 0, name
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(log_dir))
    assert 'val Results: Prec@1' in (log_dir / 'log_test.csv').read_text()
    assert 'val Shot Accuracy: Many' in (log_dir / 'log_test.csv').read_text()
    for name in ('ckpt.pth.tar', 'ckpt.best.pth.tar'):
        ckpt = load_checkpoint(str(model_dir / name))
        assert ckpt['epoch'] == 1 and ckpt['arch'] == 'resnet32'
        assert not any(k.startswith('module.') for k in ckpt['state_dict'])
        assert {'optimizer', 'best_acc1'} <= set(ckpt)
    assert not (model_dir / '.lock').exists()


def test_drw_switches_weights_inside_a_run(cifar10_root, tmp_path, monkeypatch):
    import trainer
    seen = []
    real = trainer.build_criterion
    monkeypatch.setattr(trainer, 'build_criterion', lambda t, c, w, *tau: seen.append(w) or real(t, c, w, *tau))
    train.main(_args(cifar10_root, tmp_path, '--train_rule', 'DRW', '--epochs', '2', '--lr_steps', '1', '2'))
    assert torch.allclose(seen[0], torch.ones(10))
    assert seen[1][-1] > seen[1][0]


def test_resume_continues_and_evaluate(cifar10_root, tmp_path, capsys):
    whole = tmp_path / 'whole'
    train.main(_args(cifar10_root, whole, '--epochs', '2'))
    train.main(_args(cifar10_root, tmp_path))
    log_dir, model_dir = _run_dir(tmp_path)
    ckpt_path = str(model_dir / 'ckpt.pth.tar')
    train.main(_args(cifar10_root, tmp_path, '--epochs', '2', '--resume', ckpt_path))
    # 1 epoch + resume = 2 epochs uninterrupted (--seed, -j 0): the same weights and logs
    resumed, uninterrupted = load_checkpoint(ckpt_path), load_checkpoint(str(_run_dir(whole)[1] / 'ckpt.pth.tar'))
    assert resumed['epoch'] == uninterrupted['epoch'] == 2
    fixtures.assert_same_tensors(resumed['state_dict'], uninterrupted['state_dict'])
    for name in ('log_train.csv', 'log_test.csv'):
        assert (log_dir / name).read_text() == (_run_dir(whole)[0] / name).read_text(), name
    capsys.readouterr()
    train.main(_args(cifar10_root, tmp_path, '--resume', ckpt_path, '-e'))
    out = capsys.readouterr().out
    assert 'val Results: Prec@1' in out and 'Class Accuracy' in out and 'Shot Accuracy' in out
    assert 'Confusion matrix' not in out  # only when asked
    train.main(_args(cifar10_root, tmp_path, '--resume', ckpt_path, '-e', '--confusion'))
    matrix = capsys.readouterr().out.split('Confusion matrix (rows: true class, columns: prediction):\n')[1]
    assert len(matrix.splitlines()) == 10 and sum(int(n) for n in re.findall(r'\d+', matrix)) == 100


def test_a_fresh_run_starts_its_logs_anew(cifar10_root, tmp_path, capsys):
    """As the original's open(..., 'w'): a new run in a folder whose earlier run left no checkpoint (killed before
    its first save) does not add to that run's logs (a reader would see two runs' epochs)."""
    assert train.main(_args(cifar10_root, tmp_path)) == 0
    log_dir, model_dir = _run_dir(tmp_path)
    for name in ('ckpt.pth.tar', 'ckpt.best.pth.tar'):
        (model_dir / name).unlink()
    capsys.readouterr()
    assert train.main(_args(cifar10_root, tmp_path)) == 0
    text = (log_dir / 'log_test.csv').read_text()
    assert text.count('val Results: Prec@1') == 1 and text.count('Best Prec@1') == 1
    assert (log_dir / 'args.txt').read_text().count('Namespace(') == 1
    assert f"=> starting {log_dir / 'log_train.csv'} anew (it held an earlier run's log)" in capsys.readouterr().out


def test_evaluate_original_format_checkpoint(cifar10_root, tmp_path, capsys):
    model = build_model('resnet32', 10)
    sd = collections.OrderedDict(('module.' + k, v) for k, v in model.state_dict().items())
    path = tmp_path / 'orig.pth.tar'
    torch.save({'epoch': 200, 'arch': 'resnet32', 'state_dict': sd, 'best_acc1': torch.tensor(50.0),
                'optimizer': torch.optim.SGD(model.parameters(), 0.1).state_dict()}, path)
    train.main(_args(cifar10_root, tmp_path, '--resume', str(path), '-e'))
    out = capsys.readouterr().out
    assert 'val Results: Prec@1' in out
    assert not (tmp_path / 'ckpt').exists(), '-e must not create a run folder'


def test_bad_resume_files_are_refused_and_nothing_is_destroyed(cifar10_root, tmp_path):
    train.main(_args(cifar10_root, tmp_path))
    log_dir, model_dir = _run_dir(tmp_path)
    def snapshot():
        return {p: p.read_bytes() for d in (log_dir, model_dir) for p in d.rglob('*') if p.is_file()}

    before = snapshot()
    corrupt = tmp_path / 'corrupt.pth.tar'
    corrupt.write_bytes(b'garbage')
    with pytest.raises(UserError, match='corrupt'):
        train.main(_args(cifar10_root, tmp_path, '--resume', str(corrupt)))
    with pytest.raises(UserError, match='not found'):
        train.main(_args(cifar10_root, tmp_path, '--resume', str(tmp_path / 'missing.pth.tar')))
    other = tmp_path / 'c100.pth.tar'
    torch.save({'epoch': 1, 'state_dict': build_model('resnet32', 100).state_dict()}, other)
    with pytest.raises(UserError, match='another number of classes'):
        train.main(_args(cifar10_root, tmp_path, '--resume', str(other)))
    with pytest.raises(UserError, match='not found'):
        train.main(_args(tmp_path / 'empty', tmp_path, '--no-download'))
    assert snapshot() == before


def test_pretrain_rot_then_train_with_pretrained_model(cifar10_root, tmp_path, capsys):
    import pretrain_rot
    assert pretrain_rot.main(_args(cifar10_root, tmp_path)) == 0
    log_dir, model_dir = _run_dir(tmp_path, exp_str='pretrain_rot')
    assert 'Rotation Prec@1' in (log_dir / 'log_test.csv').read_text()
    rot_ckpt = model_dir / 'ckpt.pth.tar'
    capsys.readouterr()
    train.main(_args(cifar10_root, tmp_path, '--pretrained_model', str(rot_ckpt)))
    out = capsys.readouterr().out
    n_backbone = len([k for k in build_model('resnet32', 10).state_dict() if not k.startswith('fc.')])
    assert f'loaded {n_backbone} backbone tensors from rotation/supervised checkpoint' in out
    with pytest.raises(UserError, match='does not fit the architecture'):
        train.main(_args(cifar10_root, tmp_path, '-a', 'resnet20', '--pretrained_model', str(rot_ckpt)))
    with pytest.raises(UserError, match='pretrain_rot.py'):
        train.main(_args(cifar10_root, tmp_path, '--resume', str(rot_ckpt)))


@pytest.mark.parametrize('flag,value', [('--dataset', 'mnist'), ('-a', 'vgg'), ('--loss_type', 'Hinge'),
                                        ('--train_rule', 'Oversample'), ('--imb_factor', '0'),
                                        ('--imb_factor', '1.5'), ('--epochs', '0'), ('-b', '-3')])
def test_bad_flags_exit_with_argparse_error(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        train.main([flag, value])
    assert e.value.code == 2
    assert 'error' in capsys.readouterr().err


def test_confusion_matrix_logged_every_epoch(cifar10_root, tmp_path):
    import json
    train.main(_args(cifar10_root, tmp_path, '--epochs', '2'))
    log_dir, _ = _run_dir(tmp_path)
    rows = [line for line in (log_dir / 'log_test.csv').read_text().splitlines()
            if line.startswith('val Confusion Matrix: ')]
    assert len(rows) == 2
    cm = json.loads(rows[-1][len('val Confusion Matrix: '):])
    assert len(cm) == 10 and all(len(r) == 10 for r in cm) and sum(map(sum, cm)) == 100  # 10 test images/class


def test_resume_training_from_original_format_checkpoint(cifar10_root, tmp_path, capsys):
    """The original's files resume too (no RNG state in them, so without the exactness guarantee)."""
    model = build_model('resnet32', 10)
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=2e-4)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # a real momentum buffer in the optimizer state
    sd = collections.OrderedDict(('module.' + k, v) for k, v in model.state_dict().items())
    path = tmp_path / 'orig.pth.tar'
    torch.save({'epoch': 1, 'arch': 'resnet32', 'state_dict': sd, 'best_acc1': torch.tensor(12.5),
                'optimizer': optimizer.state_dict()}, path)
    assert train.main(_args(cifar10_root, tmp_path, '--epochs', '2', '--resume', str(path))) == 0
    _, model_dir = _run_dir(tmp_path)
    ckpt = load_checkpoint(str(model_dir / 'ckpt.pth.tar'))
    assert ckpt['epoch'] == 2 and ckpt['best_acc1'] >= 12.5
    assert "orig.pth.tar' (1 of 2 epochs done)" in capsys.readouterr().out


def test_checkpoint_best_acc1_is_a_tensor_the_original_can_move(cifar10_root, tmp_path):
    """The original's --resume does `best_acc1.to(gpu)`: a float would crash it."""
    train.main(_args(cifar10_root, tmp_path, '--epochs', '2'))
    log_dir, model_dir = _run_dir(tmp_path)
    best_logged = float([line for line in (log_dir / 'log_test.csv').read_text().splitlines()
                         if line.startswith('Best Prec@1:')][-1].split()[-1])
    for name in ('ckpt.pth.tar', 'ckpt.best.pth.tar'):
        best = load_checkpoint(str(model_dir / name))['best_acc1']
        assert torch.is_tensor(best) and best.dim() == 0
        assert round(float(best.to('cpu')), 3) == best_logged


@pytest.mark.parametrize('num_classes, size', [(10, (480, 280)), (8142, (1920, 280))])
def test_per_class_plot_is_drawn_for_any_class_count(num_classes, size):
    """per_class_acc.png at 80 dpi, 3.5 in high, 0.12 in per class between 6 and 24 in wide: iNaturalist
    2018's 8,142 classes at 0.12 in would be 78,163 px wide and take seconds every epoch."""
    import io

    import numpy as np
    from PIL import Image

    import trainer
    accuracy, counts = np.linspace(0, 1, num_classes), np.arange(num_classes, 0, -1)
    png = trainer.per_class_plot(accuracy, counts, 'epoch 1: top-1 50.00%')
    assert Image.open(io.BytesIO(png)).size == size


def test_best_checkpoint_is_the_first_epoch_of_the_best_top1(cifar10_root, tmp_path, monkeypatch, one_thread):
    """The original's `is_best = acc1 > best_acc1`: of equal best top-1s the first epoch's weights stay in
    ckpt.best.pth.tar. Top-1 0, 80, 80 over three epochs (the evaluations' top-1 replaced): the best file
    holds epoch 1 after epoch 1 (written even at 0 %, unlike the original, which then wrote none), epoch 2
    after epochs 2 and 3; the logs' Best Prec@1 reads 0, 80, 80."""
    import trainer
    scores, best_epochs = [0.0, 80.0, 80.0], []
    real = trainer.evaluate
    name = 'cifar10_resnet20_CE_None_exp_0.1_ss_pretrained'
    log_dir, model_dir = tmp_path / 'log' / name, tmp_path / 'ckpt' / name
    best = model_dir / 'ckpt.best.pth.tar'

    def evaluate(*args, **kwargs):
        best_epochs.append(load_checkpoint(str(best))['epoch'] if best.exists() else None)
        return {**real(*args, **kwargs), 'top1': scores[len(best_epochs) - 1]}

    monkeypatch.setattr(trainer, 'evaluate', evaluate)
    assert train.main(_args(cifar10_root, tmp_path, '-a', 'resnet20', '--epochs', '3')) == 0
    assert best_epochs == [None, 1, 2]
    saved = load_checkpoint(str(best))
    assert saved['epoch'] == 2 and float(saved['best_acc1']) == 80.0
    assert load_checkpoint(str(model_dir / 'ckpt.pth.tar'))['epoch'] == 3
    logged = [line for line in (log_dir / 'log_test.csv').read_text().splitlines() if line.startswith('Best Prec@1')]
    assert logged == ['Best Prec@1: 0.000', 'Best Prec@1: 80.000', 'Best Prec@1: 80.000']


# ---------------------------------------------------------------- -e checks the checkpoint against the flags

def _shots(text):
    return re.findall(r'val Shot Accuracy: (.*)', text)


def test_evaluate_refuses_flags_that_change_its_numbers(cifar10_root, tmp_path, capsys):
    """The trial's `-e` with another --imb_factor printed Few 0.000 (the shot groups of another training set)
    and exit 0: refused, naming both values; with the run's flags it prints the run's own last numbers."""
    assert train.main(_args(cifar10_root, tmp_path)) == 0
    log_dir, model_dir = _run_dir(tmp_path)
    ckpt = str(model_dir / 'ckpt.pth.tar')
    capsys.readouterr()
    assert train.main(_args(cifar10_root, tmp_path, '--resume', ckpt, '-e')) == 0
    assert _shots(capsys.readouterr().out) == _shots((log_dir / 'log_test.csv').read_text())
    with pytest.raises(UserError, match=r'was trained with --imb_factor 0\.1, this command says 0\.01: pass '
                                        r'--imb_factor 0\.1 \(the shot groups'):
        train.main(_args(cifar10_root, tmp_path, '--resume', ckpt, '-e', '--imb_factor', '0.01'))
    with pytest.raises(UserError, match=r'was trained with --rand_number 0, this command says 3'):
        train.main(_args(cifar10_root, tmp_path, '--resume', ckpt, '-e', '--rand_number', '3'))
    # a checkpoint of an earlier version (no `flags`): its run folder's name says the data set and imbalance
    older = load_checkpoint(ckpt)
    del older['flags']
    torch.save(older, tmp_path / 'older.pth.tar')
    with pytest.raises(UserError, match=r'was trained with --imb_factor 0\.1, this command says 0\.01'):
        train.main(_args(cifar10_root, tmp_path, '--resume', str(tmp_path / 'older.pth.tar'), '-e',
                         '--imb_factor', '0.01'))
    with pytest.raises(UserError, match=r'was trained with --dataset cifar10, this command says digits'):
        train.main(['--dataset', 'digits', '--resume', str(tmp_path / 'older.pth.tar'), '-e', '-j', '0'])


def test_evaluating_an_ldam_checkpoint_without_its_loss_says_so(cifar10_root, tmp_path):
    """LDAM's cosine head (weight D x C, no bias) met by a CE model: 'pass --loss_type LDAM', not 'another
    number of classes'; from the recorded flags and, for files that record none, from the head itself."""
    assert train.main(_args(cifar10_root, tmp_path, '--loss_type', 'LDAM', '--train_rule', 'DRW')) == 0
    ckpt = str(_run_dir(tmp_path, 'LDAM', 'DRW')[1] / 'ckpt.pth.tar')
    with pytest.raises(UserError, match=r'was trained with --loss_type LDAM, this command says CE: pass --loss_type '
                                        r'LDAM'):
        train.main(_args(cifar10_root, tmp_path, '--resume', ckpt, '-e'))
    bare = {'state_dict': load_checkpoint(ckpt)['state_dict']}  # as the original's files: nothing recorded
    torch.save(bare, tmp_path / 'ldam.pth.tar')
    with pytest.raises(UserError, match=r'ldam.pth.tar has a cosine \(LDAM\) classifier head: pass --loss_type LDAM'):
        train.main(_args(cifar10_root, tmp_path, '--resume', str(tmp_path / 'ldam.pth.tar'), '-e'))
    assert train.main(_args(cifar10_root, tmp_path, '--resume', str(tmp_path / 'ldam.pth.tar'), '-e',
                            '--loss_type', 'LDAM')) == 0
    ce = {'state_dict': build_model('resnet32', 10).state_dict()}
    torch.save(ce, tmp_path / 'ce.pth.tar')
    with pytest.raises(UserError, match=r'has a linear classifier head, and --loss_type LDAM builds a cosine one'):
        train.main(_args(cifar10_root, tmp_path, '--resume', str(tmp_path / 'ce.pth.tar'), '-e', '--loss_type', 'LDAM'))
