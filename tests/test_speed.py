"""Speed levers of issue 35 that must change no number and no behaviour (bench/README.md measures them).

engine.evaluate on a CPU runs each evaluation batch through the network in pieces (engine.pieced_forward): every
number it reports must be the one a single pass over the whole batch gives, bit for bit, for the heads the scripts
use (10 and 100 classes, the 4-way rotation head), both memory formats and the thread counts runs use. The
entry scripts freeze their imports out of the garbage collector (cli.run_main), only when run as scripts.
`--amp`'s default on a CPU follows what bench/README.md measured: bf16 where it trains faster; a resumed run goes on in
the precision its checkpoint's steps ran in.
"""
import contextlib
import gc
import sys

import numpy as np
import pytest
import torch

import cli
import engine
import train
from models import build_model


@contextlib.contextmanager
def threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _model(classes):
    """ResNet-32 with BatchNorm statistics and weights away from their initial values."""
    torch.manual_seed(classes)
    model = build_model('resnet32', classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _batches(classes):
    """A full 250-image evaluation batch (pieces of 63, 63, 62, 62) and a last, partial one of 137 (46, 46, 45)."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, 32, 32, generator=g), torch.randint(classes, (n,), generator=g)) for n in (250, 137)]


@pytest.mark.parametrize('num_threads', [1, 2])
@pytest.mark.parametrize('classes,channels_last', [(10, True), (100, True), (4, True), (10, False)])
def test_pieced_evaluation_reports_the_single_pass_numbers_bit_for_bit(classes, channels_last, num_threads,
                                                                       monkeypatch):
    model, batches = _model(classes), _batches(classes)
    criterion = torch.nn.CrossEntropyLoss()
    device = torch.device('cpu')
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    with threads(num_threads), torch.inference_mode():
        pieced = engine.evaluate(model, criterion, batches, device, classes, channels_last=channels_last)
        # each batch's logits, the partial one's too (the smallest pieces)
        inputs = [b[0].contiguous(memory_format=torch.channels_last) if channels_last else b[0] for b in batches]
        logits_pieced = [engine.pieced_forward(model, x, device, channels_last=channels_last) for x in inputs]
        logits_whole = [model(x) for x in inputs]
        monkeypatch.setattr(engine, 'CPU_EVAL_PIECE', 10 ** 9)  # one pass per batch
        whole = engine.evaluate(model, criterion, batches, device, classes, channels_last=channels_last)
    assert all(torch.equal(p, w) for p, w in zip(logits_pieced, logits_whole))
    assert pieced['count'] == whole['count'] == 387
    for key in ('loss', 'top1', 'top5'):
        assert pieced[key] == whole[key], key  # exact, not approximately
    np.testing.assert_array_equal(pieced['per_class'], whole['per_class'])
    if classes <= 10:
        np.testing.assert_array_equal(pieced['confusion'], whole['confusion'])


def test_pieces_are_near_equal_and_never_a_lone_image(monkeypatch):
    seen = []
    model = lambda x: seen.append(x.size(0)) or torch.zeros(x.size(0), 2)  # noqa: E731
    device = torch.device('cpu')
    for n in (1, 64, 65, 129, 250):
        seen.clear()
        out = engine.pieced_forward(model, torch.zeros(n, 3, 4, 4), device)
        assert out.shape == (n, 2)
        assert seen == {1: [1], 64: [64], 65: [33, 32], 129: [43, 43, 43], 250: [63, 63, 62, 62]}[n]
    seen.clear()
    engine.pieced_forward(model, torch.zeros(250, 3, 65, 65), device)  # above 64 px: one pass (not measured)
    engine.pieced_forward(model, torch.zeros(250, 3, 64, 64), device)
    assert seen == [250, 63, 63, 62, 62]


def test_run_main_freezes_the_imports_only_when_run_as_a_script(monkeypatch):
    seen = []

    def main(argv):
        seen.append((argv, gc.get_freeze_count()))
        return 0

    gc.unfreeze()
    try:
        with pytest.raises(SystemExit) as stop:
            cli.run_main(main, ['--epochs', '1'])  # in-process, as the tests call it: nothing frozen
        assert stop.value.code == 0 and seen == [(['--epochs', '1'], 0)]
        monkeypatch.setattr(sys, 'argv', ['train.py'])
        with pytest.raises(SystemExit):
            cli.run_main(main)  # as `python train.py` does: argv None, main reads sys.argv
        assert seen[1][0] is None and seen[1][1] > 10000  # torch's objects among them
    finally:
        gc.unfreeze()


def _training_conv_dtypes(monkeypatch):
    """The dtype of every convolution's output in training mode, in call order, from now on."""
    seen = []
    conv = torch.nn.Conv2d.forward

    def spy(self, x):
        out = conv(self, x)
        if self.training:
            seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv2d, 'forward', spy)
    return seen


# (CPU features, vendor) -> whether train.py's steps run in bf16 without --amp / --no-amp. bench/README.md,
# ResNet-32 training images/s, channels_last, bf16 against float32: AMD EPYC with AVX512-BF16 590.5 against
# 368.0 (run 3 of issue 11), Intel Xeon with AVX512-BF16 and no AMX 286.0 against 367.8 (run 6).
@pytest.mark.parametrize('avx512_bf16,amx_bf16,vendor,bf16', [
    (True, False, 'AuthenticAMD', True),
    (True, False, 'GenuineIntel', False),
    (True, False, 'Intel64 Family 6 Model 143 Stepping 8, GenuineIntel', False),  # Windows: platform.processor()
    (True, True, 'GenuineIntel', True),     # AMX tiles
    (False, False, 'AuthenticAMD', False),  # bf16 would be emulated
    (False, False, 'GenuineIntel', False),
])
def test_amp_default_on_a_cpu_is_bf16_only_where_it_was_measured_faster(tmp_path, monkeypatch, avx512_bf16,
                                                                         amx_bf16, vendor, bf16):
    monkeypatch.setattr(torch.cpu, 'get_capabilities', lambda: {'avx512_bf16': avx512_bf16, 'amx_bf16': amx_bf16})
    monkeypatch.setattr(engine, 'cpu_vendor', lambda: vendor)
    seen = _training_conv_dtypes(monkeypatch)
    argv = ['--dataset', 'digits', '--imb_factor', '0.01', '-a', 'resnet20', '--epochs', '1', '-b', '128', '-j', '0',
            '--seed', '0', '--root_log', str(tmp_path / 'log'), '--root_model', str(tmp_path / 'ckpt')]
    assert train.main(argv) == 0
    # 365 images in batches of 128: 3 steps of resnet20's 19 convolutions, none evaluated in bf16
    assert seen == [torch.bfloat16 if bf16 else torch.float32] * (3 * 19)



def _machine(monkeypatch, bf16):
    """This CPU made one where --amp's default is bf16 (an AMD EPYC with AVX512-BF16) or float32 (an Intel Xeon
    without AMX)."""
    monkeypatch.setattr(torch.cpu, 'get_capabilities', lambda: {'avx512_bf16': True, 'amx_bf16': False})
    monkeypatch.setattr(engine, 'cpu_vendor', lambda: 'AuthenticAMD' if bf16 else 'GenuineIntel')


@pytest.mark.parametrize('flags,saved,bf16,notice', [
    ((), True, True, True),             # the run's bf16 goes on, and the console says so
    (('--no-amp',), True, False, False),  # the command says which
    ((), None, False, False),           # a checkpoint from before the entry: this machine's default
])
def test_a_resumed_run_keeps_the_precision_its_steps_ran_in(tmp_path, monkeypatch, capsys, flags, saved, bf16,
                                                             notice):
    argv = ['--dataset', 'digits', '--imb_factor', '0.01', '-a', 'resnet20', '-b', '128', '-j', '0', '--seed', '0',
            '--root_log', str(tmp_path / 'log'), '--root_model', str(tmp_path / 'ckpt')]
    _machine(monkeypatch, bf16=True)
    assert train.main(argv + ['--epochs', '1']) == 0  # started where bf16 is the default
    path, = (tmp_path / 'ckpt').glob('*/ckpt.pth.tar')
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    assert ckpt['amp'] is True
    if saved is None:
        del ckpt['amp']
        torch.save(ckpt, path)
    capsys.readouterr()

    _machine(monkeypatch, bf16=False)  # resumed where float32 is the default
    seen = _training_conv_dtypes(monkeypatch)
    assert train.main(argv + ['--epochs', '2', '--resume', str(path), *flags]) == 0
    # the second epoch: 3 steps of resnet20's 19 convolutions
    assert seen == [torch.bfloat16 if bf16 else torch.float32] * (3 * 19)
    printed = capsys.readouterr().out
    assert ('=> the training steps go on in bf16, as the resumed run\'s did (this machine\'s default: float32; '
            '--amp or --no-amp chooses)' in printed) == notice
    assert torch.load(path, map_location='cpu', weights_only=True)['amp'] is bf16

def test_cpu_vendor_reads_proc_cpuinfo_and_falls_back_to_the_platform(tmp_path, monkeypatch):
    amd = tmp_path / 'cpuinfo'
    amd.write_text('processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel name\t: AMD EPYC 9654\n\n'
                   'processor\t: 1\nvendor_id\t: AuthenticAMD\n')
    assert engine.cpu_vendor(str(amd)) == 'AuthenticAMD'
    monkeypatch.setattr(engine.platform, 'processor', lambda: 'Intel64 Family 6 Model 143 Stepping 8, GenuineIntel')
    assert engine.cpu_vendor(str(tmp_path / 'absent')) == 'Intel64 Family 6 Model 143 Stepping 8, GenuineIntel'
    arm = tmp_path / 'arm'
    arm.write_text('processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n')  # aarch64: no vendor_id
    assert engine.cpu_vendor(str(arm)) == 'Intel64 Family 6 Model 143 Stepping 8, GenuineIntel'
