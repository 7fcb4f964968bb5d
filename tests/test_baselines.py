"""Added baselines (not in the original): Balanced Softmax, the logit-adjusted loss, post-hoc logit adjustment.

Crafted logits where the post-hoc adjustment flips a prediction, then real train.py runs: the README's
offline digits command (148, 89, 53, 32, 19, 11, 6, 4, 2, 1 training images, 365 in all), 2 epochs
per new loss, what criterion each epoch really trained with (the spy of test_values.py), and the
adjusted evaluations (per epoch, and -e) against a float32 recomputation from the checkpoint.
"""
import json
import math
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import gen_pseudolabels
import train
import train_semi
from checkpoint import load_checkpoint
from engine import evaluate
from losses import BalancedSoftmaxLoss, LogitAdjustedLoss, PosthocLogitAdjustment
from models import build_model
from test_values import CLS_NUM, _install_spy, _logits, _pool_images, _test_set

pytestmark = pytest.mark.usefixtures('one_thread')  # see conftest.py

LOG_PRIOR = [math.log(n / 365) for n in CLS_NUM]


# ---------------------------------------------------------------- post-hoc adjustment, crafted

class _FixedLogits(nn.Module):
    """Returns row i of `rows` for the input i (the image's index)."""

    def __init__(self, rows):
        super().__init__()
        self.register_buffer('rows', torch.tensor(rows))

    def forward(self, x):
        return self.rows[x.long().view(-1)]


# Two classes with 9 and 1 training images: log prior = log 0.9, log 0.1 = -0.105, -2.303.
# Image 0 (class 1): logits (2.0, 0.5) -> class 0; minus log prior: (2.105, 2.803) -> class 1.
# Image 1 (class 0): logits (3.0, 0.0) -> class 0; minus log prior: (3.105, 2.303) -> still class 0.
# At tau 0.5 image 0 gives (2.053, 1.651): still class 0.
@pytest.mark.parametrize('tau,top1', [(None, 50.0), (1.0, 100.0), (0.5, 50.0), (0.0, 50.0)])
def test_posthoc_adjustment_flips_a_tail_prediction(tau, top1):
    model = _FixedLogits([[2.0, 0.5], [3.0, 0.0]])
    if tau is not None:
        model = PosthocLogitAdjustment(model, [9, 1], tau)
    batches = [(torch.tensor([0., 1.]), torch.tensor([1, 0]))]
    metrics = evaluate(model, nn.CrossEntropyLoss(), batches, torch.device('cpu'), 2)
    assert metrics['top1'] == pytest.approx(top1)
    if tau == 1.0:
        torch.testing.assert_close(model(torch.tensor([0.])),
                                   torch.tensor([[2.0 - math.log(0.9), 0.5 - math.log(0.1)]]))


# ---------------------------------------------------------------- flags

def test_train_semi_takes_the_new_flags():
    args = train_semi.build_parser().parse_args(['--dataset', 'digits', '--loss_type', 'LogitAdjusted',
                                                 '--la_tau', '2', '--posthoc_la', '0.5'])
    assert (args.loss_type, args.la_tau, args.posthoc_la) == ('LogitAdjusted', 2.0, 0.5)
    defaults = train.build_parser().parse_args([])
    assert defaults.la_tau == 1.0 and defaults.posthoc_la is None


@pytest.mark.parametrize('flag', ['--la_tau', '--posthoc_la'])
def test_negative_tau_is_one_line_and_writes_nothing(flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.main(['--dataset', 'digits', '-j', '0', flag, '-1'])
    assert e.value.code == 2
    assert f"argument {flag}: '-1' is not a non-negative number" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- real runs

# The README's offline digits command (`make demo`'s: -b 64, --exp_str demo), 2 epochs, in a test folder;
# float32 NCHW evaluations (--no-channels-last), so that the recomputation here runs the same kernels.
def _readme_args(root, *extra):
    return ['--dataset', 'digits', '--imb_factor', '0.01', '--epochs', '2', '--lr_steps', '20', '25', '-b', '64',
            '-j', '0', '--seed', '0', '--exp_str', 'demo', '--no-channels-last',
            '--root_log', str(root / 'log'), '--root_model', str(root / 'ckpt'), *extra]


def _run(tmp_path_factory, name, *extra):
    root = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng():
        calls = _install_spy(mp)
        assert train.main(_readme_args(root, *extra)) == 0
    return root, calls


@pytest.fixture(scope='module')
def balanced_softmax_run(tmp_path_factory):
    """With the per-epoch evaluations post-hoc adjusted (tau 2), which changes predictions of this model."""
    return _run(tmp_path_factory, 'bs', '--loss_type', 'BalancedSoftmax', '--posthoc_la', '2.0')


@pytest.fixture(scope='module')
def logit_adjusted_run(tmp_path_factory):
    return _run(tmp_path_factory, 'la', '--loss_type', 'LogitAdjusted', '--la_tau', '2')


def _folder(loss):
    return f'digits_resnet32_{loss}_None_exp_0.01_demo'


def _check_criterion(calls, cls, tau):
    assert [c['epoch'] for c in calls] == [0, 1]
    for c in calls:
        crit = c['criterion']
        assert type(crit) is cls and crit.tau == tau and crit.weight is None
        assert isinstance(c['model'].fc, nn.Linear)  # a linear head, as CE's
        np.testing.assert_allclose(crit.log_prior.cpu().numpy(), LOG_PRIOR, rtol=1e-6)
        # its value on a batch: the mean of -log(pi_y^tau e^{f_y} / sum_c pi_c^tau e^{f_c})
        logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0)).double()
        y = torch.tensor([0, 9, 3, 9])
        prior = torch.tensor(CLS_NUM, dtype=torch.float64) / 365
        terms = prior ** tau * logits.exp()
        expected = -(terms[torch.arange(4), y] / terms.sum(1)).log().mean()
        assert crit(logits.float().to(crit.log_prior.device), y.to(crit.log_prior.device)).item() == \
            pytest.approx(expected.item(), rel=1e-5)


def test_balanced_softmax_run_trains_with_balanced_softmax(balanced_softmax_run):
    _check_criterion(balanced_softmax_run[1], BalancedSoftmaxLoss, 1.0)


def test_logit_adjusted_run_trains_with_its_tau(logit_adjusted_run):
    _check_criterion(logit_adjusted_run[1], LogitAdjustedLoss, 2.0)


def _adjusted_predictions(ckpt, tau):
    """Test-set top-1 and confusion matrix of argmax(logits - tau * log prior), recomputed in float32."""
    test_set = _test_set()
    targets = torch.tensor(test_set.targets)
    logits = _logits(_model_from_resnet32(ckpt), test_set)
    assert logits.dtype == torch.float32
    pred = (logits - tau * torch.tensor(LOG_PRIOR)).argmax(1)
    cm = np.zeros((10, 10), dtype=np.int64)
    np.add.at(cm, (targets.numpy(), pred.numpy()), 1)
    return 100 * np.trace(cm) / cm.sum(), cm, logits


def _model_from_resnet32(path):
    model = build_model('resnet32', 10)
    model.load_state_dict(load_checkpoint(str(path))['state_dict'])
    return model


def test_posthoc_per_epoch_evaluation_is_logged_and_scores_adjusted_logits(balanced_softmax_run):
    root, _ = balanced_softmax_run
    log_train = (root / 'log' / _folder('BalancedSoftmax') / 'log_train.csv').read_text()
    assert ('=> post-hoc logit adjustment on: every evaluation scores logits - 2 * log(prior), '
            'prior = training images per class / 365 (--posthoc_la)') in log_train
    log_test = (root / 'log' / _folder('BalancedSoftmax') / 'log_test.csv').read_text()
    top1, cm, logits = _adjusted_predictions(root / 'ckpt' / _folder('BalancedSoftmax') / 'ckpt.pth.tar', 2.0)
    logged = re.findall(r'val Results: Prec@1 ([\d.]+)', log_test)
    assert len(logged) == 2 and float(logged[-1]) == pytest.approx(top1, abs=5e-4)
    logged_cm = json.loads(re.findall(r'val Confusion Matrix: (\[\[.*\]\])', log_test)[-1])
    np.testing.assert_array_equal(logged_cm, cm)
    # the checkpoint itself is unadjusted: its plain predictions differ from the adjusted ones here
    assert not np.array_equal(logits.argmax(1).numpy(), (logits - 2 * torch.tensor(LOG_PRIOR)).argmax(1).numpy())


def test_evaluate_with_posthoc_la_is_the_adjusted_float32_top1(balanced_softmax_run, capsys):
    root, _ = balanced_softmax_run
    ckpt = root / 'ckpt' / _folder('BalancedSoftmax') / 'ckpt.pth.tar'
    capsys.readouterr()
    assert train.main(_readme_args(root, '--loss_type', 'BalancedSoftmax', '--resume', str(ckpt), '-e',
                                   '--posthoc_la', '1.0', '--confusion')) == 0
    out = capsys.readouterr().out
    assert '=> post-hoc logit adjustment on: every evaluation scores logits - 1 * log(prior)' in out
    top1, cm, logits = _adjusted_predictions(ckpt, 1.0)
    assert float(re.search(r'val Results: Prec@1 ([\d.]+)', out)[1]) == pytest.approx(top1, abs=5e-4)
    matrix = out.split('Confusion matrix (rows: true class, columns: prediction):\n')[1]
    printed = np.array([[int(v) for v in re.findall(r'\d+', row)] for row in matrix.strip().splitlines()[:10]])
    np.testing.assert_array_equal(printed, cm)
    # -e's own tau, not the one the run evaluated with: the predictions differ
    assert not np.array_equal(cm, _adjusted_predictions(ckpt, 2.0)[1])
    assert not np.array_equal(logits.argmax(1).numpy(), (logits - torch.tensor(LOG_PRIOR)).argmax(1).numpy())


def test_gen_pseudolabels_loads_a_balanced_softmax_checkpoint(balanced_softmax_run, tmp_path):
    root, _ = balanced_softmax_run
    ckpt = root / 'ckpt' / _folder('BalancedSoftmax') / 'ckpt.pth.tar'
    assert gen_pseudolabels.main(['--dataset', 'digits', '--imb_factor', '0.9', '--resume', str(ckpt),
                                  '--output_dir', str(tmp_path), '-j', '0', '--no-amp', '--no-channels-last',
                                  '--loss_type', 'BalancedSoftmax']) == 0
    with open(tmp_path / 'pseudo_labeled_digits.pickle', 'rb') as f:
        entry = pickle.load(f)
    # the model's own (unadjusted) argmax, as for CE
    expected = _logits(_model_from_resnet32(ckpt), _pool_images()).argmax(1).numpy()
    np.testing.assert_array_equal(entry['extrapolated_targets'], expected)
