"""Numbers users compare with the paper are float32 by default (issue 17): per-epoch evaluation, `-e` and
pseudo-labels, even when the training steps run in bf16 (`--amp`); bf16 there is an explicit opt-in
(`--amp-eval`, gen_pseudolabels.py `--amp`). Each value is recomputed here in float32, NCHW, with plain
PyTorch, from the checkpoint the run saved.
"""
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import engine
import gen_pseudolabels
import train
from checkpoint import load_checkpoint
from dataset import build_transform, load_unlabeled_pool
from dataset.digits import ImbalanceDigits
from models import build_model

pytestmark = pytest.mark.usefixtures('one_thread')  # see conftest.py

# The README's digits command (ResNet-32, -b 64), two epochs; --amp forces bf16 training steps on any CPU.
README_DIGITS = ['--dataset', 'digits', '--imb_factor', '0.01', '-b', '64', '-j', '0', '--seed', '0']
NAME = 'digits_resnet32_CE_None_exp_0.01_ss_pretrained'
RESULTS = r'val Results: Prec@1 ([\d.]+) Prec@5 ([\d.]+) Loss ([\d.]+)'


@pytest.fixture(scope='module')
def bf16_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('f32')
    with pytest.MonkeyPatch.context():
        assert train.main([*README_DIGITS, '--epochs', '2', '--lr_steps', '1', '2', '-p', '100', '--amp',
                           '--root_log', str(root / 'log'), '--root_model', str(root / 'ckpt')]) == 0
    return root


@torch.no_grad()
def _float32_logits(ckpt_path, images):
    model = build_model('resnet32', 10)
    model.load_state_dict(load_checkpoint(str(ckpt_path))['state_dict'])
    model.eval()
    return torch.cat([model(x) for x in images.split(100)])


def _test_set():
    data = ImbalanceDigits(None, train=False, transform=build_transform('digits', train=False))
    images, targets = zip(*(data[i] for i in range(len(data))))
    return torch.stack(images), torch.tensor(targets)


def _expected(ckpt_path):
    images, targets = _test_set()
    logits = _float32_logits(ckpt_path, images)
    top1 = 100 * (logits.argmax(1) == targets).double().mean().item()
    return top1, F.cross_entropy(logits.double(), targets).item()


def test_per_epoch_evaluation_is_float32_under_bf16_training(bf16_run):
    log = (bf16_run / 'log' / NAME / 'log_test.csv').read_text()
    top1, _, loss = (float(x) for x in re.findall(RESULTS, log)[-1])
    exp_top1, exp_loss = _expected(bf16_run / 'ckpt' / NAME / 'ckpt.pth.tar')
    assert top1 == pytest.approx(exp_top1, abs=5e-4)
    # the log's 5 decimals, or float32 summation's rounding at a large loss; bf16 moves it by ~1e-3 relative
    assert loss == pytest.approx(exp_loss, rel=1e-6, abs=2e-5)


def _evaluate(capsys, root, *extra):
    assert train.main([*README_DIGITS, '--resume', str(root / 'ckpt' / NAME / 'ckpt.pth.tar'), '-e',
                       '--amp', *extra]) is not None
    top1, _, loss = (float(x) for x in re.findall(RESULTS, capsys.readouterr().out)[-1])
    return top1, loss


def test_evaluate_flag_is_float32_and_amp_eval_opts_into_bf16(bf16_run, capsys):
    exp_top1, exp_loss = _expected(bf16_run / 'ckpt' / NAME / 'ckpt.pth.tar')
    top1, loss = _evaluate(capsys, bf16_run)
    assert (top1, loss) == (pytest.approx(exp_top1, abs=5e-4), pytest.approx(exp_loss, rel=1e-6, abs=2e-5))
    # the opt-in really computes something else, so the test above can tell the two apart
    _, bf16_loss = _evaluate(capsys, bf16_run, '--amp-eval')
    assert abs(bf16_loss - exp_loss) > max(2e-5, 1e-5 * abs(exp_loss))


def _pseudo_labels(root, *extra):
    out = root / 'pl'
    assert gen_pseudolabels.main(['--dataset', 'digits', '--resume', str(root / 'ckpt' / NAME / 'ckpt.pth.tar'),
                                  '--output_dir', str(out), '-j', '0', '--overwrite', *extra]) == 0
    with open(out / 'pseudo_labeled_digits.pickle', 'rb') as f:
        return pickle.load(f)


def test_pseudo_labels_are_float32_by_default(bf16_run, monkeypatch):
    images, _, _, _ = load_unlabeled_pool('digits', None, imb_type='exp', imb_factor=0.01, rand_number=0)
    transform = build_transform('digits', train=False)
    batch = torch.stack([transform(img) for img in images])
    logits = _float32_logits(bf16_run / 'ckpt' / NAME / 'ckpt.pth.tar', batch)
    dtypes, real = [], torch.nn.Linear.forward
    # the dtype each batch's classifier computes in (its confidences may all round to 1.0 either way)
    monkeypatch.setattr(torch.nn.Linear, 'forward', lambda self, x: dtypes.append(real(self, x).dtype) or real(self, x))
    entry = _pseudo_labels(bf16_run)
    np.testing.assert_array_equal(entry['extrapolated_targets'], logits.argmax(1).numpy())  # the original's argmax
    np.testing.assert_allclose(entry['confidence'], torch.softmax(logits, 1).max(1).values.numpy(), atol=1e-5)
    assert dtypes and set(dtypes) == {torch.float32}
    dtypes.clear()
    _pseudo_labels(bf16_run, '--amp')
    assert dtypes and set(dtypes) == {torch.bfloat16}


def _precisions():
    """cuDNN convolutions', cuDNN RNNs' and matmuls' float32 precision, and the legacy cuDNN flag, which
    raises where convolutions and RNNs disagree (so that code reading it would crash)."""
    b = torch.backends
    return b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, b.cuda.matmul.fp32_precision, b.cudnn.allow_tf32


class _Probe(nn.Module):
    """Records the float32 precision that convolutions and matmuls are set to while it runs."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.seen = []

    def forward(self, x):
        self.seen.append(_precisions())
        return self.fc(x)


def test_exact_float32_from_a_state_another_library_mixed_up():
    cudnn = torch.backends.cudnn
    try:
        cudnn.conv.fp32_precision = 'ieee'  # the new API on convolutions alone: the legacy getter raises
        with pytest.raises(RuntimeError, match='mix of the legacy and new APIs'):
            _precisions()
        with engine.exact_float32():
            assert _precisions() == ('ieee', 'ieee', 'ieee', False)
        assert (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision) == ('ieee', 'tf32')
    finally:
        cudnn.allow_tf32 = True  # torch's defaults: 'tf32' for both, the legacy flag on
    assert _precisions()[:2] == ('tf32', 'tf32') and cudnn.allow_tf32


def test_tf32_is_off_inside_evaluation_and_prediction_only():
    before = _precisions()
    probe = _Probe()
    data = list(DataLoader(torch.utils.data.TensorDataset(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])),
                           batch_size=3))
    cpu = torch.device('cpu')
    engine.evaluate(probe, nn.CrossEntropyLoss(), data, cpu, 3)
    outputs, targets = engine.predict(probe, data, cpu)
    assert probe.seen == [('ieee', 'ieee', 'ieee', False)] * 4
    assert _precisions() == before
    assert outputs.dtype == torch.float32 and outputs.shape == (6, 3) and targets.tolist() == [0, 1, 2, 0, 1, 2]
    with torch.no_grad():
        torch.testing.assert_close(outputs, probe.fc(torch.cat([x for x, _ in data])))
