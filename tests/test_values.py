"""Values, not files: what a run computed, recomputed here independently from what it saved.

On long-tailed digits (--imb_factor 0.01: 148, 89, 53, 32, 19, 11, 6, 4, 2, 1 training images, so
one many-shot, three medium-shot and six few-shot classes; a balanced test set of 30 per class),
resnet20, -b 32, one epoch, in-process. `spy` records what each epoch really trained with: the
model, the criterion, the loader's sampler and the targets it delivered.
"""
import copy
import inspect
import json
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import fixtures
import gen_pseudolabels
import train
import trainer
from checkpoint import load_checkpoint, unwrap
from dataset import build_transform
from dataset.digits import ImbalanceDigits
from dataset.samplers import ImbalancedDatasetSampler
from engine import evaluate
from losses import FocalLoss, LDAMLoss, effective_num_weights
from models import build_model
from models.resnet_cifar import NormedLinear
from moco.builder import MoCo

CLS_NUM = [148, 89, 53, 32, 19, 11, 6, 4, 2, 1]
TEST_PER_CLASS = 30


pytestmark = pytest.mark.usefixtures('one_thread')  # see conftest.py


# fp32 in the NCHW layout, as the recomputations here: bf16 autocast (the default on a CPU with
# bf16 instructions) would move logits by more than the logs' rounding.
EXACT = ['--no-amp', '--no-channels-last']


def _args(root, *extra):
    return ['--dataset', 'digits', '--imb_factor', '0.01', '-a', 'resnet20', '-b', '32', '-j', '0',
            '--seed', '0', '--epochs', '1', '-p', '100', '--root_log', str(root / 'log'),
            '--root_model', str(root / 'ckpt'), *EXACT, *extra]


def _name(loss='CE', rule='None'):
    return f'digits_resnet20_{loss}_{rule}_exp_0.01_ss_pretrained'


class _Stop(Exception):
    """Raised by a spy that has seen what it wanted, so the run ends before training."""


def _install_spy(mp, stop_after_capture=False):
    """Replace trainer.train_one_epoch by a wrapper that records each epoch's model (weights at the
    start of the epoch), criterion, sampler, learning rate and the targets the loader delivered."""
    calls = []
    real = trainer.train_one_epoch
    signature = inspect.signature(real)

    class Recording:
        def __init__(self, loader, seen):
            self.loader, self.seen = loader, seen

        def __iter__(self):
            for images, targets in self.loader:
                self.seen.append(targets.clone())
                yield images, targets

        def __len__(self):
            return len(self.loader)

        def __getattr__(self, name):
            return getattr(self.loader, name)

    def spy(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        a = bound.arguments
        model = unwrap(a['model'])
        seen = []
        calls.append({'epoch': a['epoch'], 'model': model, 'criterion': a['criterion'],
                      'start_weights': copy.deepcopy(model.state_dict()),
                      'sampler': getattr(a['loader'], 'sampler', None),
                      'lr': a['optimizer'].param_groups[0]['lr'], 'targets': seen})
        if stop_after_capture:
            raise _Stop
        a['loader'] = Recording(a['loader'], seen)
        return real(*bound.args, **bound.kwargs)

    mp.setattr(trainer, 'train_one_epoch', spy)
    return calls


@pytest.fixture
def spy(monkeypatch):
    return _install_spy(monkeypatch)


def _spied_run(tmp_path_factory, name, *extra):
    """train.py on digits under the spy, in a fresh folder: (root, the spy's records)."""
    root = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng(), fixtures.one_thread():
        calls = _install_spy(mp)
        assert train.main(_args(root, *extra)) == 0
    return root, calls


@pytest.fixture(scope='module')
def ce_run(tmp_path_factory):
    """One CE epoch on digits."""
    return _spied_run(tmp_path_factory, 'ce')


@pytest.fixture(scope='module')
def ldam_drw_run(tmp_path_factory):
    """LDAM-DRW on digits, two epochs with DRW switching on at the second (--lr_steps 1 2)."""
    return _spied_run(tmp_path_factory, 'ldam', '--loss_type', 'LDAM', '--train_rule', 'DRW', '--epochs', '2',
                      '--lr_steps', '1', '2')


def _test_set():
    return ImbalanceDigits(None, train=False, transform=build_transform('digits', train=False))


# Where the runs train (the first GPU if there is one): recomputed there, with the same kernels.
DEVICE = torch.device('cuda' if torch.cuda.is_available() else 'cpu')


@torch.no_grad()
def _logits(model, images):
    """The model's logits for a dataset (or an image tensor), in order, in eval mode, on the CPU."""
    model.eval().to(DEVICE)
    if isinstance(images, torch.Tensor):
        return model(images.to(DEVICE)).cpu()
    return torch.cat([model(x.to(DEVICE)).cpu() for x, _ in DataLoader(images, batch_size=100, shuffle=False)])


def _model_from(path, loss='CE'):
    model = build_model('resnet20', 10, use_norm=loss == 'LDAM')
    model.load_state_dict(load_checkpoint(str(path))['state_dict'])
    return model


# ---------------------------------------------------------------- evaluation

def _last(pattern, text):
    return re.findall(pattern, text)[-1]


FLOAT = r'(-?[\d.]+|nan)'


def test_class_counts_of_the_fixture_have_all_three_shot_groups():
    assert ImbalanceDigits(None, 'exp', 0.01, 0).get_cls_num_list() == CLS_NUM
    counts = np.array(CLS_NUM)
    assert (counts > 100).sum() == 1 and ((counts >= 20) & (counts <= 100)).sum() == 3 and (counts < 20).sum() == 6


def test_logged_evaluation_equals_a_recomputation_from_the_checkpoint(ce_run):
    root, _ = ce_run
    log = (root / 'log' / _name() / 'log_test.csv').read_text()
    test_set = _test_set()
    targets = torch.tensor(test_set.targets)
    logits = _logits(_model_from(root / 'ckpt' / _name() / 'ckpt.pth.tar'), test_set)
    pred = logits.argmax(1)
    cm = np.zeros((10, 10), dtype=np.int64)
    for t, p in zip(targets.tolist(), pred.tolist()):
        cm[t, p] += 1  # row: true class

    logged_cm = np.array(json.loads(_last(r'val Confusion Matrix: (\[\[.*\]\])', log)))
    np.testing.assert_array_equal(logged_cm, cm)
    assert logged_cm.sum(axis=1).tolist() == [TEST_PER_CLASS] * 10  # rows are the true classes

    per_class = np.diag(cm) / cm.sum(axis=1)
    logged_pc = [float(x) for x in re.findall(FLOAT, _last(r'val Class Accuracy: (\[[^\]]*\])', log))]
    np.testing.assert_allclose(logged_pc, per_class, atol=5e-4)

    top1, top5, loss = (float(x) for x in re.findall(r'val Results: Prec@1 ([\d.]+) Prec@5 ([\d.]+) Loss ([\d.]+)',
                                                     log)[-1])
    assert top1 == pytest.approx(100 * np.trace(cm) / cm.sum(), abs=5e-4)
    top5_hits = (logits.topk(5, dim=1).indices == targets[:, None]).any(dim=1).double().mean().item()
    assert top5 == pytest.approx(100 * top5_hits, abs=5e-4)
    # The test loss is plain cross-entropy whatever the training loss (README, difference 3).
    assert loss == pytest.approx(F.cross_entropy(logits.double(), targets).item(), abs=2e-5)

    counts = np.array(CLS_NUM)
    expected = [per_class[counts > 100].mean(), per_class[(counts >= 20) & (counts <= 100)].mean(),
                per_class[counts < 20].mean()]
    shots = [float(x) for x in re.search(r'val Shot Accuracy: Many (\S+) Medium (\S+) Few (\S+)', log).groups()]
    np.testing.assert_allclose(shots, 100 * np.array(expected), atol=5e-4)


class _LookupModel(nn.Module):
    """Predicts a fixed class per input: the input is the sample's index, the output a one-hot row."""

    def __init__(self, predictions, num_classes):
        super().__init__()
        self.register_buffer('predictions', torch.tensor(predictions))
        self.num_classes = num_classes

    def forward(self, x):
        return F.one_hot(self.predictions[x.long().view(-1)], self.num_classes).float() * 5


def test_evaluate_confusion_rows_are_true_classes_and_per_class_is_recall():
    targets = [0, 0, 0, 0, 1, 1, 2, 2, 2, 3]
    preds = [0, 1, 1, 2, 1, 1, 2, 0, 2, 0]
    x = torch.arange(len(targets)).float()
    batches = [(x[:4], torch.tensor(targets[:4])), (x[4:], torch.tensor(targets[4:]))]
    m = evaluate(_LookupModel(preds, 4), nn.CrossEntropyLoss(), batches, torch.device('cpu'), 4)
    expected = np.array([[1, 2, 1, 0], [0, 2, 0, 0], [1, 0, 2, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(m['confusion'], expected)
    np.testing.assert_allclose(m['per_class'], [1 / 4, 1.0, 2 / 3, 0.0])
    assert m['top1'] == pytest.approx(50.0) and m['count'] == 10

    # shot groups by training images per class: 150 (many), 50 and 20 (medium), 5 (few)
    lines = trainer.report_lines(dict(m), [150, 50, 20, 5])
    assert lines[-1] == 'val Shot Accuracy: Many 25.000 Medium 83.333 Few 0.000'


# ---------------------------------------------------------------- losses and train rules

def test_ce_trains_a_linear_head_with_plain_cross_entropy(ce_run):
    _, calls = ce_run
    assert len(calls) == 1
    assert isinstance(calls[0]['model'].fc, nn.Linear)
    crit = calls[0]['criterion']
    assert type(crit) is nn.CrossEntropyLoss and crit.weight is None
    assert isinstance(calls[0]['sampler'], trainer.loaders.ShuffleSampler)
    seen = torch.cat(calls[0]['targets'])  # every training image exactly once
    assert np.bincount(seen.numpy(), minlength=10).tolist() == CLS_NUM


def test_focal_trains_with_focal_loss(tmp_path, spy):
    assert train.main(_args(tmp_path, '--loss_type', 'Focal')) == 0
    crit = spy[0]['criterion']
    assert isinstance(crit, FocalLoss) and crit.gamma == 1 and crit.weight is None
    assert isinstance(spy[0]['model'].fc, nn.Linear)
    # the focal value, by hand, on a batch: mean of -(1 - p_y) log p_y
    logits, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    logp = F.log_softmax(logits, 1)[torch.arange(6), y]
    assert crit(logits, y).item() == pytest.approx((-(1 - logp.exp()) * logp).mean().item(), rel=1e-5)


def test_ldam_drw_has_the_cosine_head_margins_and_switches_weights_at_its_epoch(ldam_drw_run):
    root, calls = ldam_drw_run
    assert [c['epoch'] for c in calls] == [0, 1]
    for c in calls:
        assert isinstance(c['model'].fc, NormedLinear)
        crit = c['criterion']
        assert isinstance(crit, LDAMLoss) and crit.s == 30
        m = np.array(CLS_NUM, dtype=np.float64) ** -0.25
        np.testing.assert_allclose(crit.m_list.numpy(), 0.5 * m / m.max(), rtol=1e-6)
    # DRW: plain until the first --lr_steps epoch (0-based epoch 1 here), then effective-number weights
    torch.testing.assert_close(calls[0]['criterion'].weight, torch.ones(10))
    drw = calls[1]['criterion'].weight
    torch.testing.assert_close(drw, effective_num_weights(CLS_NUM, 0.9999))
    assert drw[-1] > 10 * drw[0]
    sd = load_checkpoint(str(root / 'ckpt' / _name('LDAM', 'DRW') / 'ckpt.pth.tar'))['state_dict']
    assert sd['fc.weight'].shape == (64, 10) and 'fc.bias' not in sd  # NormedLinear: (in, out), no bias


def test_reweight_trains_with_effective_number_weights(tmp_path, spy):
    assert train.main(_args(tmp_path, '--train_rule', 'Reweight')) == 0
    weight = spy[0]['criterion'].weight
    torch.testing.assert_close(weight, effective_num_weights(CLS_NUM, 0.9999))
    assert not torch.allclose(weight, torch.ones(10))
    assert (weight[1:] >= weight[:-1]).all() and weight[-1] > 10 * weight[0]  # rarer class, larger weight


def test_resample_draws_tail_classes_more_often_than_their_share(tmp_path, spy):
    assert train.main(_args(tmp_path, '--train_rule', 'Resample')) == 0
    assert isinstance(spy[0]['sampler'], ImbalancedDatasetSampler)
    assert spy[0]['criterion'].weight is None
    seen = np.bincount(torch.cat(spy[0]['targets']).numpy(), minlength=10)
    share = np.array(CLS_NUM) / sum(CLS_NUM)
    drawn = seen / seen.sum()
    assert seen.sum() == sum(CLS_NUM)  # an epoch is as long as the data set
    assert drawn[0] < share[0] / 2  # the head class: 41 % of the data, about 10 % of the draws
    assert drawn[4:].sum() > 3 * share[4:].sum()  # the six few-shot classes: 12 % of the data



def test_drs_shuffles_plainly_until_the_first_lr_step_then_resamples(tmp_path, spy):
    """--train_rule DRS (deferred re-sampling, Cao et al. 2019): epochs before the first --lr_steps step see every
    training image once (the data set's own counts), the epochs after draw as Resample does; no class weights."""
    assert train.main(_args(tmp_path, '--train_rule', 'DRS', '--epochs', '3', '--lr_steps', '2', '3')) == 0
    assert [c['epoch'] for c in spy] == [0, 1, 2] and all(c['criterion'].weight is None for c in spy)
    seen = [np.bincount(torch.cat(c['targets']).numpy(), minlength=10) for c in spy]
    assert seen[0].tolist() == CLS_NUM and seen[1].tolist() == CLS_NUM
    drawn, share = seen[2] / seen[2].sum(), np.array(CLS_NUM) / sum(CLS_NUM)
    assert seen[2].sum() == sum(CLS_NUM) and drawn[0] < share[0] / 2 and drawn[4:].sum() > 3 * share[4:].sum()
    # the default switch is LDAM-DRW's epoch 160 (cifar_train.py: idx = epoch // 160), DRW's too
    assert spy[0]['sampler'].switch_epoch == 2
    default = train.build_parser().parse_args(['--train_rule', 'DRS'])
    assert default.lr_steps[0] == 160


# ---------------------------------------------------------------- gen_pseudolabels.py

# The pool is what the long-tailed draw leaves out: 83 images at --imb_factor 0.9 (1132 at 0.01),
# and any digits classifier may label it.
POOL_FACTOR = 0.9


def _pseudo_label(tmp_path, ckpt, *extra):
    assert gen_pseudolabels.main(['--dataset', 'digits', '--imb_factor', str(POOL_FACTOR), '--resume', str(ckpt),
                                  '--output_dir', str(tmp_path), '-j', '0', '-a', 'resnet20', *EXACT, *extra]) == 0
    with open(tmp_path / 'pseudo_labeled_digits.pickle', 'rb') as f:
        return pickle.load(f)


def _pool_images():
    pool = ImbalanceDigits(None, 'exp', POOL_FACTOR, 0).unused_data
    transform = build_transform('digits', train=False)
    from PIL import Image
    return torch.stack([transform(Image.fromarray(img)) for img in pool])


def test_pseudo_labels_are_the_models_argmax_and_confidence_its_max_softmax(ce_run, tmp_path):
    root, _ = ce_run
    ckpt = root / 'ckpt' / _name() / 'ckpt.pth.tar'
    entry = _pseudo_label(tmp_path, ckpt)
    prob = torch.softmax(_logits(_model_from(ckpt), _pool_images()), dim=1)
    assert len(entry['extrapolated_targets']) == len(prob) == 83
    np.testing.assert_array_equal(entry['extrapolated_targets'], prob.argmax(1).numpy())
    np.testing.assert_allclose(entry['confidence'], prob.max(1).values.numpy(), rtol=1e-5, atol=1e-6)


def test_ldam_pseudo_label_confidence_is_the_softmax_of_scaled_cosines(ldam_drw_run, tmp_path):
    root, _ = ldam_drw_run
    ckpt = root / 'ckpt' / _name('LDAM', 'DRW') / 'ckpt.pth.tar'
    entry = _pseudo_label(tmp_path, ckpt, '--loss_type', 'LDAM')
    cosine = _logits(_model_from(ckpt, 'LDAM'), _pool_images())
    assert cosine.abs().max() <= 1 + 1e-5  # the head gives cosines
    prob = torch.softmax(30 * cosine, dim=1)  # what LDAM trained: softmax(s * cosine), s = 30
    np.testing.assert_array_equal(entry['extrapolated_targets'], cosine.argmax(1).numpy())
    np.testing.assert_allclose(entry['confidence'], prob.max(1).values.numpy(), rtol=1e-5, atol=1e-6)
    assert entry['confidence'].max() > torch.softmax(cosine, 1).max().item()  # not the unscaled softmax


# ---------------------------------------------------------------- --pretrained_model and --resume

def _moco_file(path):
    """A MoCo checkpoint (the original's format) whose key encoder differs from its query encoder."""
    torch.manual_seed(3)
    moco = MoCo(lambda num_classes: build_model('resnet20', num_classes), dim=16, K=32, mlp=True)
    with torch.no_grad():
        for p in moco.encoder_k.parameters():
            p.add_(1.0)
    torch.save({'epoch': 1, 'arch': 'resnet20', 'state_dict': {'module.' + k: v for k, v in moco.state_dict().items()},
                'optimizer': {}}, path)
    return {k[len('encoder_q.'):]: v for k, v in moco.state_dict().items() if k.startswith('encoder_q.')}


def _supervised_file(path):
    torch.manual_seed(4)
    sd = build_model('resnet20', 10).state_dict()
    torch.save({'epoch': 3, 'arch': 'resnet20', 'state_dict': sd, 'best_acc1': 10.0}, path)
    return sd


@pytest.mark.parametrize('kind', ['MoCo', 'rotation/supervised'])
def test_pretrained_model_kind_comes_from_the_content_not_the_name(kind, tmp_path, monkeypatch, capsys):
    # Each file is named as the other kind would be.
    if kind == 'MoCo':
        path = tmp_path / 'w.pth'
        expected = _moco_file(path)
    else:
        path = tmp_path / 'moco_ckpt_0001.pth.tar'
        expected = _supervised_file(path)
    calls = _install_spy(monkeypatch, stop_after_capture=True)
    with pytest.raises(_Stop):
        train.main(_args(tmp_path, '--pretrained_model', str(path)))
    assert f'backbone tensors from {kind} checkpoint' in capsys.readouterr().out
    start = calls[0]['start_weights']
    backbone = [k for k in start if not k.startswith('fc.')]
    assert backbone and set(backbone) <= set(expected)
    fixtures.assert_same_tensors({k: start[k] for k in backbone}, {k: expected[k] for k in backbone})
    if 'fc.weight' in expected:  # the supervised head (MoCo's is an MLP of other names) starts fresh
        assert not torch.equal(start['fc.weight'], expected['fc.weight'])


def test_resume_wins_over_pretrained_model(ce_run, tmp_path, monkeypatch, capsys):
    root, _ = ce_run
    resume = root / 'ckpt' / _name() / 'ckpt.pth.tar'
    moco = _moco_file(tmp_path / 'w.pth')
    calls = _install_spy(monkeypatch, stop_after_capture=True)
    with pytest.raises(_Stop):
        train.main(_args(tmp_path, '--epochs', '2', '--resume', str(resume),
                         '--pretrained_model', str(tmp_path / 'w.pth')))
    assert '--resume wins' in capsys.readouterr().out
    assert calls[0]['epoch'] == 1
    resumed = load_checkpoint(str(resume))['state_dict']
    start = calls[0]['start_weights']
    fixtures.assert_same_tensors(start, resumed)
    assert not torch.equal(start['conv1.weight'], moco['conv1.weight'])
