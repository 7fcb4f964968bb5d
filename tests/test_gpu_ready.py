"""GPU readiness on a machine without a GPU (issue 18): device planning, default precision, and the
step loops run with FakeTensors on `cuda:0`, watched for every operation that makes the host wait
for the device or mixes CPU and CUDA tensors.

The fake-CUDA runs: torch.cuda's queries are monkeypatched to describe one sm_90 GPU, the models and
data are moved to `cuda:0` inside FakeTensorMode (shapes, dtypes and devices, no values), and a
TorchDispatchMode above it records, with the project line that caused it, each
  _local_scalar_dense (.item(), int(), float(), .tolist()), nonzero, bincount,
  device-to-host copy (but a non_blocking copy_ into pinned memory: engine.predict's, which waits once),
  host-to-device copy that blocks (non_blocking=False or from unpinned memory),
  operation that mixes CPU and CUDA tensors (a CPU index into a CUDA tensor is a blocking copy).
Host reads of fake tensors return 1 and device-to-host copies real zeros, so the print points run through.
What FakeTensors cannot do without a driver, and what stands in: autograd's engine needs a real CUDA
context (pytorch/pytorch#92627), so `loss.backward()` is replaced by zero gradients (the optimizer
step runs); a CUDA torch.Generator cannot be made, so the device loader's is a CPU one; pinning is
not implemented, so the recorder marks tensors pinned itself (DataLoader's pinning thread cannot run:
the MoCo batches are made beforehand and marked; the loaders of imagenet_inat and tools/tsne.py are
checked for `pin_memory` and their batches marked, made outside the fake mode with real values as
their CPU worker processes make them; the classic loader's `pin_memory` is checked instead); host
work on real host tensors (labels, predicted rows in pinned buffers) runs for real; fake parameters
cannot be converted twice, so the 32x32 models stay NCHW (the images are channels_last as in a run)
and imagenet_inat's and tools/tsne.py's are converted before they are placed, their own `.to()`
then left out; autocast turns itself off without CUDA, so bf16 is not exercised.
"""
import collections
import contextlib
import functools
import inspect
import os
import sys
import threading
import traceback
import types
import unittest.mock

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.data import DataLoader

import dist
import engine
import fixtures
import fixtures_jpeg
import pretrain_moco
import pretrain_rot
import train
import train_semi
import trainer
from dataset import DATASETS, digits
from errors import UserError
from fixtures import REPO
from imagenet_inat import layout
from losses import build_criterion
from models import build_model
from moco.builder import MoCo

aten = torch.ops.aten
CUDA = torch.device('cuda', 0)
# The pinned wheel's list (torch 2.14.1+cu130).
WHEEL_ARCHS = ['sm_75', 'sm_80', 'sm_86', 'sm_90', 'sm_100', 'sm_120']


def fake_gpu(monkeypatch, capability=(9, 0), count=1, archs=WHEEL_ARCHS, name='NVIDIA H100'):
    """torch.cuda describes `count` GPUs of `capability`; nothing opens a CUDA context."""
    for attr, value in {'is_available': lambda: True, 'device_count': lambda: count,
                        'get_device_capability': lambda device=None: capability,
                        'get_arch_list': lambda: list(archs), 'get_device_name': lambda device=None: name,
                        'set_device': lambda device: None}.items():
        monkeypatch.setattr(torch.cuda, attr, value)


# ---------------------------------------------------------------- bad input: one line, before anything is written

@pytest.mark.parametrize('env,gpus,message', [
    # torchrun --nproc_per_node 2 on a 1-GPU box: NCCL's "Duplicate GPU" abort at the first collective
    ({'LOCAL_RANK': '1', 'LOCAL_WORLD_SIZE': '2'}, 1, '2 processes on this node but 1 visible GPU'),
    ({'LOCAL_RANK': '0', 'LOCAL_WORLD_SIZE': '4'}, 2, 'start at most 2 per node'),
])
def test_processes_sharing_a_gpu_are_refused_under_nccl(monkeypatch, env, gpus, message):
    fake_gpu(monkeypatch, count=gpus)
    for k, v in {'RANK': '0', 'WORLD_SIZE': env['LOCAL_WORLD_SIZE'], **env}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(dist, '_join', lambda *a: pytest.fail('joined the group'))
    with pytest.raises(UserError, match=message) as e:
        dist.setup()
    assert 'IMB_DIST_BACKEND=gloo' in str(e.value) and '\n' not in str(e.value)
    # Asked for explicitly, gloo shares the GPU (2 ranks on one GPU, as bench/gpu_check.sh runs them).
    joined = []
    monkeypatch.setattr(dist, '_join', lambda backend, *a: joined.append(backend))
    monkeypatch.setenv('IMB_DIST_BACKEND', 'gloo')
    ctx = dist.setup()
    assert joined == ['gloo'] and ctx.device == torch.device('cuda', int(env['LOCAL_RANK']) % gpus)


def test_one_gpu_per_process_slurm_binding_still_runs():
    # srun --gpus-per-task=1: each process sees one GPU, and no LOCAL_WORLD_SIZE says they share it
    assert dist.plan_device(None, 1, 2, 1).device == 'cuda:0'


@pytest.mark.parametrize('capability,archs,ok', [
    ((7, 0), WHEEL_ARCHS, False),              # V100: the first kernel would fail with "no kernel image"
    ((6, 0), WHEEL_ARCHS, False),              # P100
    ((7, 5), WHEEL_ARCHS, True),               # T4
    ((8, 9), WHEEL_ARCHS, True),               # L4 / RTX 40xx: sm_86 cubins run on 8.9
    ((9, 0), WHEEL_ARCHS, True),               # H100 / H200
    ((12, 0), WHEEL_ARCHS, True),
    ((7, 0), ['sm_80', 'compute_70'], True),   # PTX is compiled by the driver for later GPUs
    ((9, 0), ['sm_80', 'sm_86'], False),      # cubins do not cross a major version
    ((9, 0), ['sm_90a'], True),
    ((10, 0), ['sm_90a'], False),              # 'a' kernels run on their own architecture only
])
def test_arch_check(capability, archs, ok):
    if ok:
        dist.check_arch(capability, archs)
    else:
        with pytest.raises(UserError, match=f'is sm_{capability[0]}{capability[1]}, but this PyTorch'):
            dist.check_arch(capability, archs)


def test_gpu_without_kernels_and_gpu_beyond_the_count_stop_train_before_writing(tmp_path, monkeypatch, capsys):
    fixtures.shrink_digits(monkeypatch.setattr)
    fake_gpu(monkeypatch, capability=(7, 0), name='Tesla V100-SXM2-16GB')
    argv = ['--dataset', 'digits', '--data_path', str(tmp_path / 'data'), '--root_log', str(tmp_path / 'log'),
            '--root_model', str(tmp_path / 'ckpt'), '--epochs', '1', '-j', '0']
    with pytest.raises(SystemExit) as e:
        import cli
        cli.run_main(train.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert 'Tesla V100-SXM2-16GB is sm_70' in err[0] and 'sm_75 sm_80' in err[0] and 'README' in err[0]
    with pytest.raises(SystemExit) as e:
        cli.run_main(train.main, argv + ['--gpu', '3'])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == ("error: --gpu 3 does not exist: this machine shows 1 GPU(s), --gpu 0 to 0 "
                                         "(CUDA_VISIBLE_DEVICES renumbers them from 0)")
    assert not (tmp_path / 'log').exists() and not (tmp_path / 'ckpt').exists()


R535 = 'NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.154.05  Thu Dec 28 15:37:48 UTC 2023\nGCC version:  gcc\n'
R580_OPEN = 'NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder@U16)\n'


def no_usable_gpu(monkeypatch, tmp_path, version_text=None, cuda='13.0', control_device=True):
    """A machine with an NVIDIA driver (its /proc version file, its control device) whose GPUs torch cannot use."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.version, 'cuda', cuda)
    version = tmp_path / 'nvidia_version'
    if version_text is not None:
        version.write_text(version_text)
    control = tmp_path / 'nvidiactl'
    if control_device:
        control.write_text('')
    monkeypatch.setattr(dist, 'NVIDIA_VERSION_FILE', str(version))
    monkeypatch.setattr(dist, 'NVIDIA_CONTROL_DEVICE', str(control))


@pytest.mark.parametrize('text,cuda,visible,expected', [
    # the pinned cu130 wheel on a CUDA 12 driver: torch.cuda.is_available() is False, with a warning at most
    (R535, '13.0', None, 'the NVIDIA driver 535.154.05 is older than this PyTorch (2.14.1+cu130) needs for its CUDA '
                         '13.0 (driver 580 or later), so torch cannot use the GPU: install a cu12x wheel of PyTorch '
                         '(docs/gpu.md) or a newer driver, or set CUDA_VISIBLE_DEVICES= to train on the CPU on purpose'),
    (R535.replace('535.154.05', '440.33.01'), '13.0', None, 'install a newer driver, or set CUDA_VISIBLE_DEVICES='),
    (R535, None, None, 'driver 535.154.05 but this PyTorch (2.14.1+cu130) is a CPU-only build: install a CUDA build'),
    # a new enough driver (the open modules' line): no GPU granted to the job, or the index does not exist
    (R580_OPEN, '13.0', None, 'driver 580.65.06 but torch (2.14.1+cu130, CUDA 13.0) sees no usable GPU (none granted'),
    (R580_OPEN, '13.0', '3', 'sees no usable GPU with CUDA_VISIBLE_DEVICES=3 (none granted'),
    (None, '13.0', None, 'NVIDIA driver (version unknown) but torch'),  # /dev/nvidiactl only (a container)
    (R535, '13.0', '', None),   # hidden on purpose: the CPU
    (R535, '13.0', '-1', None),
])
def test_gpu_that_torch_cannot_use_is_refused_unless_hidden_on_purpose(monkeypatch, tmp_path, text, cuda, visible,
                                                                        expected):
    no_usable_gpu(monkeypatch, tmp_path, text, cuda)
    monkeypatch.setattr(torch, '__version__', '2.14.1+cu130')
    if visible is None:
        monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    else:
        monkeypatch.setenv('CUDA_VISIBLE_DEVICES', visible)
    if expected is None:
        assert dist.setup().device == torch.device('cpu')
        return
    with pytest.raises(UserError) as e:
        dist.setup()
    assert expected in str(e.value) and '\n' not in str(e.value)


def test_no_nvidia_driver_is_a_cpu_machine(monkeypatch, tmp_path):
    no_usable_gpu(monkeypatch, tmp_path, None, control_device=False)
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    assert dist.setup().device == torch.device('cpu') and dist.visible_gpus() == 0


@pytest.mark.parametrize('script', ['train', 'pretrain_moco'])
def test_old_driver_stops_a_run_in_one_line_before_writing(tmp_path, monkeypatch, capsys, script):
    fixtures.shrink_digits(monkeypatch.setattr)
    no_usable_gpu(monkeypatch, tmp_path, R535)
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    import cli
    if script == 'train':
        main, argv = train.main, ['--dataset', 'digits', '--data_path', str(tmp_path / 'data'), '--root_log',
                                  str(tmp_path / 'log'), '--root_model', str(tmp_path / 'ckpt'), '--epochs', '1', '-j', '0']
    else:  # refused before the launch layout is chosen (one CPU process otherwise)
        main, argv = pretrain_moco.main, ['--dataset', 'digits', '--root_path', str(tmp_path / 'log'), '--epochs', '1',
                                          '--moco-k', '64', '-b', '16', '-j', '0']
    with pytest.raises(SystemExit) as e:
        cli.run_main(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and 'driver 535.154.05 is older than' in err[0], err
    assert not (tmp_path / 'log').exists() and not (tmp_path / 'ckpt').exists()


@pytest.mark.parametrize('capability,expected', [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True),
                                                 ((12, 0), True)])
def test_bf16_autocast_by_default_only_where_bf16_is_native(monkeypatch, capability, expected):
    fake_gpu(monkeypatch, capability=capability)
    # is_bf16_supported() says True on sm_75 too (it counts emulation): it must not decide
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)
    assert engine.default_amp(CUDA) is expected


# ---------------------------------------------------------------- fake CUDA: who makes the host wait

def _project_line():
    """'file.py:N' of the innermost frame in the project (not in tests/), or None."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path.startswith(REPO + os.sep) and not path.startswith(os.path.join(REPO, 'tests')):
            return f"{os.path.relpath(path, REPO)}:{frame.lineno}"
    return None


def _copy_ends(func, args, kwargs):
    """(source, destination device, dtype, non_blocking) of a copy between tensors, else None.
    Tensor.to() reaches the mode as aten.to.* under inference_mode, as aten._to_copy otherwise."""
    if func is aten.copy_.default:
        return args[1], args[0].device, args[0].dtype, bool(args[2] if len(args) > 2 else kwargs.get('non_blocking'))
    if func is not aten._to_copy.default and func.overloadpacket is not aten.to:
        return None
    src, rest = args[0], args[1:]
    device = kwargs.get('device') or next((a.device if isinstance(a, torch.Tensor) else a for a in rest
                                           if isinstance(a, (torch.Tensor, torch.device, str))), src.device)
    dtype = kwargs.get('dtype') or next((a for a in rest if isinstance(a, torch.dtype)), src.dtype)
    non_blocking = kwargs.get('non_blocking', next((a for a in rest if isinstance(a, bool)), False))
    return src, torch.device(device), dtype, non_blocking


class WaitRecorder(TorchDispatchMode):
    """Host waits and CPU/CUDA mixes: {(kind, project line): steps it happened in}; sits above
    FakeTensorMode. Step k is the time from the k-th batch's arrival to the next one's (0: before the
    first, when an epoch's loader starts), as counted by `steps(loader)`."""

    READS = {aten._local_scalar_dense.default: 'host read', aten.item.default: 'host read',
             aten.nonzero.default: 'nonzero', aten.bincount.default: 'bincount'}

    def __init__(self):
        super().__init__()
        self.passes = collections.defaultdict(lambda: collections.defaultdict(set))  # name -> events
        self.lengths = {}  # name -> batches of the pass
        self.current = None
        self.pinned = set()
        self.step = 0

    @property
    def events(self):
        """{(kind, project line): steps} of the current pass (what happens after a pass's loop counts
        as its last step, a print point, until the next pass starts)."""
        return self.passes[self.current]

    def _note(self, kind):
        self.events[(kind, _project_line())].add(self.step)

    def steps(self, loader, name=None):
        self.current, self.step = name, 0
        if name is not None:
            self.lengths[name] = len(loader)
        for batch in loader:
            self.step += 1
            yield batch

    def pin(self, tensor):
        """What DataLoader(pin_memory=True) gives the step loop: the batch in pinned memory."""
        self.pinned.add(id(tensor))
        return tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func in (aten.pin_memory.default, aten._pin_memory.default):  # not implemented for FakeTensors
            return self.pin(args[0])
        if func is aten.is_pinned.default:
            return id(args[0]) in self.pinned
        if kwargs.get('pin_memory'):  # torch.empty(..., pin_memory=True): host memory a copy need not wait for
            with unset_fake_temporarily():  # (real: what is copied into it is read on the host)
                return self.pin(func(*args, **{**kwargs, 'pin_memory': False}))
        copy = _copy_ends(func, args, kwargs)
        if tensors and all(t.device.type == 'cpu' and not isinstance(t, FakeTensor) for t in tensors) \
                and (copy is None or copy[1].type == 'cpu'):
            with unset_fake_temporarily():  # host work on host data (a loader's labels, predicted rows): real
                return func(*args, **kwargs)
        if copy is not None and copy[1].type == 'cuda' and not isinstance(copy[0], FakeTensor):
            # a real host batch copied to the fake GPU (under inference_mode its .to() would run for real)
            if copy[0].dim() > 0 and not (copy[3] and id(copy[0]) in self.pinned):
                self._note('blocking host-to-device copy')
            fake = self.fake_mode.from_tensor(copy[0])
            args = (args[0], fake, *args[2:]) if func is aten.copy_.default else (fake, *args[1:])
            return func(*args, **kwargs)
        if func in self.READS:
            if args[0].device.type == 'cuda':  # (the CPU reads: the sampler's order)
                self._note(self.READS[func])
            if func in (aten._local_scalar_dense.default, aten.item.default):
                return True if args[0].dtype == torch.bool else 1
            # Data-dependent shapes: every element selected, every bin of `minlength` (fake values anyway).
            if func is aten.nonzero.default:
                return torch.zeros(args[0].numel(), args[0].dim(), dtype=torch.int64, device=args[0].device)
            if func is aten.bincount.default:
                minlength = kwargs.get('minlength', args[2] if len(args) > 2 else 0)
                return torch.zeros(minlength, dtype=torch.int64, device=args[0].device)
        if copy is not None:
            src, dst, dtype, non_blocking = copy
            if src.device.type == 'cuda' and dst.type == 'cpu':
                # Only a copy_ into pinned memory with non_blocking=True leaves the host running.
                if not (func is aten.copy_.default and non_blocking and id(args[0]) in self.pinned):
                    self._note('device-to-host copy')
                with unset_fake_temporarily():  # real zeros, so that .numpy() at a print point works
                    if func is aten.copy_.default and not isinstance(args[0], FakeTensor):
                        return args[0].zero_()  # (into engine.predict's pinned buffers)
                    return torch.zeros(src.shape, dtype=dtype)
            if src.device.type == 'cpu' and dst.type == 'cuda' and src.dim() > 0 \
                    and not (non_blocking and id(src) in self.pinned):
                self._note('blocking host-to-device copy')
        elif copy is None and {t.device.type for t in tensors if t.dim() > 0} >= {'cpu', 'cuda'}:
            self._note(f'CPU/CUDA mix in {func}')
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_cuda(monkeypatch, model):
    """FakeTensorMode with `model` on cuda:0 and backward as zero gradients; yields (model, recorder).
    torch.cuda.is_available() stays False: FakeTensorMode would then run constant conversions for real."""
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (9, 0))
    real_generator = torch.Generator
    # A CUDA generator needs a driver; a CPU one feeds fake CUDA draws the same way.
    monkeypatch.setattr(torch, 'Generator', lambda device='cpu': real_generator())
    recorder = WaitRecorder()
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda device=None: recorder._note('synchronize'))
    with FakeTensorMode(allow_non_fake_inputs=True) as recorder.fake_mode:
        model = model.to(CUDA)

        def zero_grads(loss, *a, **k):
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)

        monkeypatch.setattr(torch.Tensor, 'backward', zero_grads)
        # The print points read dummy values (1): a "non-finite" first_bad is theirs to raise on.
        real_check = engine._check_finite

        def check_finite(*a):
            with contextlib.suppress(engine.DivergenceError):
                real_check(*a)

        monkeypatch.setattr(engine, '_check_finite', check_finite)
        yield model, recorder


def _inside_steps(events, steps):
    """The waits in steps 1 .. steps-1: not at an epoch's start, not at its print point (the last step,
    with print_freq above the step count) or after the loop."""
    return {key: sorted(s) for key, s in events.items() if any(0 < k < steps for k in s)}


def _mixes(events):
    return {key: sorted(s) for key, s in events.items() if key[0].startswith('CPU/CUDA mix')}


STEPS = 3


def _captured_experiment(monkeypatch, script, argv):
    seen = {}
    monkeypatch.setattr(trainer, 'run', lambda args, exp: seen.update(args=args, exp=exp) or {})
    assert script.main(argv) == 0
    return seen['args'], seen['exp']


def _digits_argv(tmp_path, *extra):
    # -b 16: 3 steps over the shrunk long-tailed digits; the documented defaults otherwise
    return ['--dataset', 'digits', '--data_path', str(tmp_path), '--imb_factor', '0.1', '-b', '16', *extra]


@pytest.fixture
def semi_digits(tmp_path, monkeypatch):
    fixtures.shrink_digits(monkeypatch.setattr)
    pool = digits.ImbalanceDigits(None, 'exp', 0.1, 0)
    fixtures.write_pseudo_labels(tmp_path / 'pseudo_labeled_digits.pickle', pool.unused_targets)
    return tmp_path


@pytest.mark.filterwarnings('ignore:CUDA is not available')  # autocast off: no real CUDA
@pytest.mark.parametrize('script,extra', [
    (train, ('--loss_type', 'CE', '--train_rule', 'None')),
    (train, ('--loss_type', 'LDAM', '--train_rule', 'DRW')),
    (train, ('--loss_type', 'Focal', '--train_rule', 'Resample')),
    (train_semi, ('--imb_factor_unlabel', '0.1', '--unlabel_size_factor', '1')),
    (pretrain_rot, ()),
])
def test_training_and_evaluation_loops_never_wait_for_the_device(semi_digits, monkeypatch, script, extra):
    args, exp = _captured_experiment(monkeypatch, script, _digits_argv(semi_digits, *extra))
    with fake_cuda(monkeypatch, exp.model) as (model, recorder):
        train_loader, sampler, val_loader = trainer._loaders(args, exp, 0, 0, 1, CUDA)
        assert type(train_loader).__name__ == 'DeviceLoader'  # the default for the 32x32 sets
        optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
        weights = trainer.TRAIN_RULES[args.train_rule].weights(170, exp.cls_num_list, args.lr_steps[0])
        criterion = build_criterion(args.loss_type, exp.cls_num_list,
                                    None if weights is None else weights.to(CUDA)).to(CUDA)
        trainer.begin_epoch(sampler, train_loader, 0, 0, 0)
        steps = len(train_loader)
        assert steps >= STEPS
        amp = engine.default_amp(CUDA)
        with recorder:
            stats = engine.train_one_epoch(model, criterion, recorder.steps(train_loader), optimizer, CUDA, 0,
                                           batch_fn=exp.batch_fn, print_freq=10 ** 6, log=lambda *a, **k: None,
                                           num_steps=steps, amp=amp, channels_last=args.channels_last)
        assert stats['steps'] == steps
        assert not _mixes(recorder.events), recorder.events
        assert not _inside_steps(recorder.events, steps), dict(recorder.events)
        recorder.events.clear()
        val_loader.batch_size = 16  # several batches of the small test set (eval_batch_size(cuda) takes it whole)
        batches = len(val_loader)
        assert batches >= STEPS
        with recorder:
            engine.evaluate(model, torch.nn.CrossEntropyLoss().to(CUDA), recorder.steps(val_loader), CUDA,
                            exp.num_classes, batch_fn=exp.eval_batch_fn, amp=amp, channels_last=args.channels_last)
        assert not _mixes(recorder.events), recorder.events
        assert not _inside_steps(recorder.events, batches), dict(recorder.events)


@pytest.mark.filterwarnings('ignore:CUDA is not available')
def test_moco_step_loop_never_waits_for_the_device(tmp_path, monkeypatch):
    fixtures.shrink_digits(monkeypatch.setattr)
    args = pretrain_moco.resolve_args(pretrain_moco.build_parser().parse_args(
        ['--dataset', 'digits', '--data', str(tmp_path), '--moco-k', '64', '-b', '16']))
    train_set = pretrain_moco.PRETRAIN_DATA['digits'].build(args)
    moco = MoCo(functools.partial(build_model, args.arch), args.moco_dim, args.moco_k, args.moco_m, args.moco_t,
                args.mlp)
    batches = list(DataLoader(train_set, batch_size=16, shuffle=True, drop_last=True, num_workers=0))
    with fake_cuda(monkeypatch, moco) as (model, recorder):
        optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
        # pretrain_moco's loader pins its batches on CUDA; the pinning thread cannot run without a driver
        pinned = [([recorder.pin(v) for v in views], recorder.pin(y)) for views, y in batches]
        assert len(pinned) >= STEPS
        with recorder:
            stats = engine.train_one_epoch(model, torch.nn.CrossEntropyLoss().to(CUDA), recorder.steps(pinned),
                                           optimizer, CUDA, 0, forward=pretrain_moco.moco_forward,
                                           print_freq=10 ** 6, log=lambda *a, **k: None, num_steps=len(pinned),
                                           **engine.step_hooks(args, CUDA))
        assert stats['steps'] == len(pinned)
        assert not _mixes(recorder.events), recorder.events
        assert not _inside_steps(recorder.events, len(pinned)), dict(recorder.events)


def test_classic_loaders_pin_host_batches_on_cuda_only(semi_digits, monkeypatch):
    args, exp = _captured_experiment(monkeypatch, train, _digits_argv(semi_digits, '--loader', 'torchvision', '-j', '0'))
    for device, pinned in ((torch.device('cpu'), False), (CUDA, True)):
        train_loader, _, val_loader = trainer._loaders(args, exp, 0, 0, 1, device)
        assert train_loader.pin_memory is pinned and val_loader.pin_memory is pinned


@pytest.mark.parametrize('world,batch,extra,per_rank', [(4, 128, (), 32), (3, 128, (), None), (2, 1, (), None),
                                                         (3, 128, ('-e',), 42)])  # -e trains nothing
def test_batch_that_does_not_divide_over_the_ranks_is_refused(semi_digits, monkeypatch, world, batch, extra, per_rank):
    """-b is the batch of all processes: 128 on 3 GPUs would train 3 x 42 = 126, another lr / batch ratio."""
    args, exp = _captured_experiment(monkeypatch, train, _digits_argv(semi_digits, '--loader', 'torchvision', '-j', '0',
                                                                       '-b', str(batch), *extra))
    if per_rank is None:
        with pytest.raises(UserError, match=rf'^-b {batch} is the batch of all {world} processes and must divide '
                                            rf'evenly over them .*e.g. -b {batch - batch % world or world}$'):
            trainer._loaders(args, exp, 0, 0, world, torch.device('cpu'))
    else:
        assert trainer._loaders(args, exp, 0, 0, world, torch.device('cpu'))[0].batch_size == per_rank


@pytest.mark.parametrize('local,batch,ok', [('2', 128, True), ('3', 128, False), ('3', 129, True)])
def test_moco_batch_under_torchrun_must_divide_over_the_nodes_processes(monkeypatch, local, batch, ok):
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', local)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', local)
    args = pretrain_moco.resolve_args(pretrain_moco.build_parser().parse_args(
        ['--dataset', 'digits', '-b', str(batch), '--moco-k', str(batch * 8)]))
    layout = pretrain_moco.launch_layout(1, (int(local), int(local)), True, 1, batch)
    if ok:
        pretrain_moco.check_layout(args, layout)
    else:
        with pytest.raises(UserError, match=f'-b {batch} is the batch of one node and must divide evenly over its '
                                            f'{local} processes'):
            pretrain_moco.check_layout(args, layout)


# ---------------------------------------------------------------- policies: loader workers, SyncBatchNorm, cuDNN

STREAMED = types.SimpleNamespace(transform=lambda train: None)  # a folder above 64 px: images read from their files


@pytest.mark.parametrize('cores,local,info,flag,train_workers,moco_workers', [
    (2, '1', None, (), 4, 32),         # this 2-core machine: the scripts' own defaults
    (2, '8', STREAMED, (), 1, 4),      # 4 and 32 per node over 8 processes
    (64, '8', None, (), 7, 7),         # 8 H100s, 64 cores: 7 workers each (~300 JPEGs/s per worker)
    (96, '1', STREAMED, (), 95, 95),   # one process (DataParallel's, or --gpu)
    (96, '8', 'digits', (), 4, 11),    # images held in memory: train.py keeps the original's 4
    (96, '8', None, ('-j', '16'), 16, 2),  # an explicit -j: per process (train.py), per node (MoCo, as the original)
])
def test_jpeg_loader_workers_default_from_the_cores_each_process_may_use(monkeypatch, cores, local, info, flag,
                                                                           train_workers, moco_workers):
    monkeypatch.setenv('LOCAL_WORLD_SIZE', local)
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(cores)))
    args = train.build_parser().parse_args(['--dataset', 'digits', *flag])
    assert trainer.loader_workers(args, DATASETS['digits'] if info == 'digits' else info) == train_workers
    margs = pretrain_moco.build_parser().parse_args(['--dataset', 'digits', *flag])
    assert pretrain_moco.loader_workers(margs) == moco_workers



@pytest.mark.parametrize('device,world,flag,synced', [
    (CUDA, 2, (), True),                    # torchrun on GPUs: BatchNorm sees the batch of all processes
    (CUDA, 2, ('--no-sync-bn',), False),
    (CUDA, 1, (), False),                   # one process: plain BatchNorm, as the original
    (torch.device('cpu'), 2, (), False),    # SyncBatchNorm has no CPU kernels
])
def test_sync_batchnorm_under_torchrun_on_gpus_by_default(device, world, flag, synced):
    # (--no-channels-last: FakeTensor parameters cannot be converted a second time)
    args = train.build_parser().parse_args(['--dataset', 'digits', '--no-channels-last', *flag])
    model = build_model(args.arch, 10)
    keys = set(model.state_dict())
    with contextlib.ExitStack() as stack:
        if device.type == 'cuda':  # the placement itself needs no GPU here
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        placed = trainer.place_model(model, args, device, world)
    kinds = {type(m) for m in placed.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert kinds == ({torch.nn.SyncBatchNorm} if synced else {torch.nn.BatchNorm2d})
    assert set(placed.state_dict()) == keys


class _RecordingDDP(torch.nn.Module):
    """DistributedDataParallel's place in the run, without a process group: records what it wraps."""
    wrapped = []

    def __init__(self, module, device_ids=None):
        super().__init__()
        self.module = module
        _RecordingDDP.wrapped.append(type(module).__name__)

    def forward(self, *inputs, **kwargs):
        return self.module(*inputs, **kwargs)


def test_compile_wraps_the_ddp_model_not_the_other_way_round(tmp_path, monkeypatch):
    """PyTorch's DDP + torch.compile notes: compile the DDP-wrapped model (DDPOptimizer splits its graph at
    the gradient buckets); a model compiled first, then wrapped, hides its parameters' hooks from DDP."""
    fixtures.shrink_digits(monkeypatch.setattr)
    monkeypatch.setattr(dist, 'setup', lambda gpu=None: dist.ProcessContext(0, 2, 0, torch.device('cpu')))
    monkeypatch.setattr(torch.nn.parallel, 'DistributedDataParallel', _RecordingDDP)
    monkeypatch.setattr(_RecordingDDP, 'wrapped', [])
    compiled = []
    monkeypatch.setattr(torch.nn.Module, 'compile', lambda self, *a, **k: compiled.append(type(self).__name__))
    assert train.main(_digits_argv(tmp_path, '--epochs', '1', '-j', '0', '--compile', '--root_log',
                                   str(tmp_path / 'log'), '--root_model', str(tmp_path / 'ckpt'))) == 0
    assert _RecordingDDP.wrapped == ['ResNetCifar'] and compiled == ['_RecordingDDP']


@pytest.mark.parametrize('sync_bn', [True, False])
def test_compile_is_skipped_with_a_notice_where_syncbatchnorm_would_break_every_graph(monkeypatch, capsys, sync_bn):
    model = build_model('resnet32', 10)
    if sync_bn:  # what place_model makes under torchrun on GPUs
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    compiled = []
    monkeypatch.setattr(torch.nn.Module, 'compile', lambda self, *a, **k: compiled.append(self))
    assert trainer.compile_in_place(model) is not sync_bn
    assert compiled == ([] if sync_bn else [model])
    out = capsys.readouterr().out
    assert ('=> --compile skipped: torch.compile would break the graph at the 31 SyncBatchNorm layers'
            in out) is sync_bn and ('--no-sync-bn compiles' in out) is sync_bn


@pytest.mark.parametrize('argv,deterministic,benchmark', [
    ([], False, True), (['--seed', '0'], True, False),
    (['--seed', '0', '--cudnn-benchmark'], False, True), (['--no-cudnn-benchmark'], True, False)])
def test_cudnn_benchmark_without_seed_deterministic_with_it(monkeypatch, argv, deterministic, benchmark):
    monkeypatch.setattr(torch.backends.cudnn, 'deterministic', not deterministic)
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', not benchmark)
    trainer.seed(train.build_parser().parse_args(argv))
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (deterministic, benchmark)


@pytest.mark.parametrize('table,benchmarked', [('imagenet-lt', {'pretrain_moco': 2, 'imagenet_inat.main': 10}),
                                               ('inat', {'pretrain_moco': 2, 'imagenet_inat.main': 10}),
                                               ('cifar10-ssp', {})])
def test_reproduce_benchmarks_cudnn_in_its_resnet50_stages_only(monkeypatch, capsys, tmp_path, table, benchmarked):
    """reproduce.py always passes --seed, which alone keeps cuDNN deterministic and unsearched: for the ResNet-50
    stages (MoCo, imagenet_inat, where GPU bit-exactness is not claimed) it asks for the benchmark search."""
    import importlib
    import shlex
    import reproduce
    from repro import scripts
    for flag in ('deterministic', 'benchmark'):
        monkeypatch.setattr(torch.backends.cudnn, flag, torch.backends.cudnn.benchmark)  # restored afterwards
    assert reproduce.main(['--table', table, '--seeds', '0', '1', '--out', str(tmp_path), '--dry-run']) == 0
    seen = collections.Counter()
    for line in capsys.readouterr().out.splitlines():
        if not line or line.startswith('#'):
            continue
        cmd = shlex.split(line)
        start = cmd.index('-m') + 1 if '-m' in cmd else next(i for i, w in enumerate(cmd) if w.endswith('.py'))
        module, argv = os.path.basename(cmd[start]).removesuffix('.py'), cmd[start + 1:]
        spec = scripts.SCRIPTS['imagenet_inat' if module == 'imagenet_inat.main' else module + '.py']
        args = getattr(importlib.import_module(spec.module), spec.parser)().parse_args(argv)
        if not hasattr(args, 'cudnn_benchmark'):
            continue  # gen_pseudolabels.py: no training, no cuDNN policy
        assert args.seed in (0, 1)
        trainer.seed(args)
        if torch.backends.cudnn.benchmark:
            seen[module] += 1
        assert torch.backends.cudnn.deterministic is not torch.backends.cudnn.benchmark
    assert dict(seen) == benchmarked


# ---------------------------------------------------------------- DataParallel (imagenet_inat's plain multi-GPU run)

def _data_parallel(monkeypatch, module, gpus=2):
    """imagenet_inat's DataParallel over `gpus` fake GPUs, and torch.accelerator described so that torch's own
    parallel_apply runs here: a thread per replica, entering autocast as it does on CUDA."""
    fake_gpu(monkeypatch, count=gpus)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, 'get_device_properties',
                        lambda device=None: types.SimpleNamespace(total_memory=80 << 30, multi_processor_count=132))
    for attr, value in {'is_available': lambda: True, 'current_accelerator': lambda *a: torch.device('cuda'),
                        'current_stream': lambda *a: contextlib.nullcontext(),
                        'device_index': lambda *a: contextlib.nullcontext()}.items():
        monkeypatch.setattr(torch.accelerator, attr, value)
    return layout.DataParallel(module, device_ids=list(range(gpus)))


class _AutocastProbe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append((threading.current_thread() is not threading.main_thread(),
                          torch.is_autocast_enabled('cuda'), torch.get_autocast_dtype('cuda')))
        return x


@pytest.mark.parametrize('amp', [True, False])
def test_dataparallel_replicas_run_under_the_callers_bf16_autocast(monkeypatch, amp):
    """torch's parallel_apply enters autocast in each replica's thread without a dtype: float16 on CUDA,
    without a loss scaler. The replicas must compute in the training step's bf16 (or float32 without --amp)."""
    probe = _AutocastProbe()
    dp = _data_parallel(monkeypatch, probe)
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp):
        dp.parallel_apply([probe, probe], [(torch.ones(2),), (torch.ones(2),)], [{}, {}])
    assert probe.seen == [(True, amp, torch.bfloat16)] * 2


def _nchw_broadcast(tensors, devices, detach=False):
    """What replicate's coalesced broadcast gives on GPUs (torch/csrc/cuda/comm.cpp): the tensors themselves
    for the first device, and for the others views of one flat copy, contiguous (NCHW), still differentiable."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    if not tensors:
        return []
    copies = [list(tensors)] + [list(_unflatten_dense_tensors(_flatten_dense_tensors(tensors), tensors))
                                for _ in devices[1:]]
    return [[t.detach() for t in c] for c in copies] if detach else copies


def test_dataparallel_replicas_keep_channels_last_weights(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 2)).to(memory_format=torch.channels_last)
    monkeypatch.setattr(sys.modules['torch.nn.parallel.replicate'], '_broadcast_coalesced_reshape', _nchw_broadcast)
    dp = _data_parallel(monkeypatch, model)
    plain = torch.nn.DataParallel.replicate(dp, model, [0, 1])
    assert not plain[1][0].weight.is_contiguous(memory_format=torch.channels_last)  # the stand-in shows the defect
    replicas = dp.replicate(model, [0, 1])
    for replica in replicas:
        assert replica[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert replica[3].weight.shape == (2, 144)  # 2-D weights as they were
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(replicas[1](x), model(x))
    replicas[1](x).sum().backward()  # the replica's gradient reaches the module's weights
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


class _Fixed(torch.nn.Module):
    """Logits that put the argmax on the class in column 0 of each input row."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0].long(), self.num_classes).float() * 5


@pytest.mark.parametrize('num_classes', [5, 8142])
def test_evaluation_keeps_no_confusion_matrix_above_1000_classes(num_classes):
    """iNaturalist's 8,142 classes: per-class accuracy from per-class counts, no 530 MB matrix."""
    targets = torch.tensor([0, 0, 1, 1, 1, 4, 4, 2])
    preds = torch.tensor([0, 1, 1, 1, 0, 4, 2, 2])
    batches = [(preds[:5, None].float(), targets[:5]), (preds[5:, None].float(), targets[5:])]
    m = engine.evaluate(_Fixed(num_classes), torch.nn.CrossEntropyLoss(), batches, torch.device('cpu'), num_classes)
    expected = np.full(num_classes, np.nan)
    expected[[0, 1, 2, 4]] = [1 / 2, 2 / 3, 1.0, 1 / 2]  # class 3 has no image
    np.testing.assert_array_equal(m['per_class'], expected)
    assert m['count'] == 8 and m['top1'] == pytest.approx(100 * 5 / 8)
    if num_classes <= 1000:
        assert m['confusion'][1].tolist() == [1, 2, 0, 0, 0] and m['confusion'].sum() == 8
    else:
        assert m['confusion'] is None


# ---------------------------------------------------------------- fake CUDA: imagenet_inat stages, prediction loops

def _passes_waiting(recorder):
    """{pass: waits in its steps 1 .. n-1} (step n is the pass's print point, or after its loop)."""
    waits = {name: _inside_steps(recorder.passes[name], n) for name, n in recorder.lengths.items()}
    return {name: w for name, w in waits.items() if w}


def _all_mixes(recorder):
    return {name: m for name, events in recorder.passes.items() if (m := _mixes(events))}


class _PinnedLoader:
    """A DataLoader(pin_memory=True) as a GPU machine runs it: its batches made on the CPU with real
    values (in its worker processes there: outside the fake mode and the recorder here), in pinned
    memory (pinning needs a driver, so the recorder marks them)."""

    def __init__(self, loader, recorder):
        assert loader.pin_memory, 'a loader feeding a GPU must pin its batches'
        loader.pin_memory = False  # (without a driver DataLoader would only warn)
        self.loader, self.recorder = loader, recorder

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        with _disable_current_modes():
            batches = iter(self.loader)
        while True:
            with _disable_current_modes():
                batch = next(batches, None)
            if batch is None:
                return
            yield pytree.tree_map_only(torch.Tensor, self.recorder.pin, batch)


def _pinned_maker(make, recorder):
    """`make` (a function returning a DataLoader, or (DataLoader, sampler, ...)) run as on a machine with a
    GPU; its samplers are CPU objects (real tensors)."""
    def build(*args, **kwargs):
        with unittest.mock.patch.object(torch.cuda, 'is_available', lambda: True), _disable_current_modes():
            made = make(*args, **kwargs)
        if isinstance(made, tuple):
            return (_PinnedLoader(made[0], recorder),) + made[1:]
        return _PinnedLoader(made, recorder)
    return build


def _counted(fn, recorder, label):
    """`fn` (train_one_epoch, evaluate or predict) with its `loader` counted as the steps of a pass."""
    signature, calls = inspect.signature(fn), []

    @functools.wraps(fn)
    def run(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        calls.append(1)
        bound.arguments['loader'] = recorder.steps(bound.arguments['loader'], f'{label} {len(calls)}')
        return fn(*bound.args, **bound.kwargs)
    return run


class _NoFolder:
    """stages.train's log folder, writing nothing (FakeTensors cannot be saved)."""

    def scalar(self, *args):
        pass

    def save_checkpoint(self, *args, **kwargs):
        pass

    def log_sizes(self):
        return {}


@pytest.fixture(scope='module')
def inat_world(tmp_path_factory):
    """tests/fixtures_jpeg.py's long-tailed JPEGs, a MoCo checkpoint, and a stage-1 result (untrained)
    for cRT, LWS and tau-norm to start from."""
    from imagenet_inat import weights
    from imagenet_inat.networks import DotProductClassifier, ResNetFeature
    root = tmp_path_factory.mktemp('inat')
    images, splits = fixtures_jpeg.write_jpeg_dataset(str(root))
    fixtures_jpeg.write_moco_checkpoint(str(root / 'moco.pth.tar'))
    torch.manual_seed(0)
    nets = {'feat_model': ResNetFeature(*fixtures_jpeg._resnet10()), 'classifier': DotProductClassifier(512, 3)}
    (root / 'stage1').mkdir()
    torch.save(weights.final_state(1, 1, {k: weights.original_layout(v) for k, v in nets.items()}, 0.5),
               root / 'stage1' / weights.FINAL)
    return {'images': images, 'splits': splits, 'moco': str(root / 'moco.pth.tar'), 'stage1': str(root / 'stage1')}


STAGE_KINDS = {  # kind: (fixtures_jpeg.stage_config arguments, starts from, extra flags)
    'stage 1, uniform': (dict(sampler=False), 'moco', ()),
    'stage 1, class-aware, 2 BatchNorm pieces': (dict(sampler=True), 'moco', ('--bn_pieces', '2')),
    'cRT': (dict(fix=True), 'stage1', ()),
    'LWS': (dict(classifier='LWSClassifier', fix=True), 'stage1', ()),
    'tau-norm': (dict(fix=True, sampler=False, epochs=0, tau=True), 'stage1', ()),
}
STAGE_BATCH = 16  # 9 training steps over the 145 images; 2 evaluation batches of the 18 val / test images


@pytest.mark.filterwarnings('ignore:CUDA is not available')
@pytest.mark.parametrize('kind', list(STAGE_KINDS))
def test_imagenet_inat_stages_never_wait_for_the_device(inat_world, tmp_path, monkeypatch, kind):
    from imagenet_inat import main as ii_main
    from imagenet_inat import stages
    config, start, extra = STAGE_KINDS[kind]
    raw = fixtures_jpeg.stage_config(tmp_path / 'run', batch=STAGE_BATCH, **config)
    raw['training_opt']['display_step'] = 10 ** 6  # the one print point: each epoch's last step
    args = ii_main.build_parser().parse_args([
        '--cfg', fixtures_jpeg.write_config(tmp_path / 'c.yaml', raw), '--data_root', inat_world['images'],
        '--split_dir', inat_world['splits'], '--model_dir', inat_world[start], '--seed', '0', *extra])
    cfg = ii_main.load_stage(args)
    (tmp_path / 'run').mkdir()
    quiet = lambda *a, **k: None  # noqa: E731
    run = stages.build(args, cfg, dist.ProcessContext(0, 1, 0, CUDA), quiet)
    # stages.placed's channels_last model, made before fake_cuda places it (FakeTensor parameters cannot be
    # converted a second time)
    run.model.to(memory_format=torch.channels_last)
    monkeypatch.setattr(stages, 'placed', lambda run: run.model)
    # tau-norm's searched classifier evaluates 2 rows at a time, so that the search has several batches too
    monkeypatch.setattr(stages, 'OUTPUT_BATCH', 2)
    with fake_cuda(monkeypatch, run.model) as (model, recorder):
        for name in ('train_loader', 'eval_loader'):
            monkeypatch.setattr(stages.data_mod, name, _pinned_maker(getattr(stages.data_mod, name), recorder))
        for name in ('train_one_epoch', 'evaluate', 'predict_batches'):
            monkeypatch.setattr(stages, name, _counted(getattr(stages, name), recorder, name))
        monkeypatch.setattr(stages, 'save_checkpoint', quiet)  # tau-norm's result file
        with recorder:
            code = stages.tau_norm(run, quiet) if cfg.taus is not None else stages.train(run, _NoFolder(), quiet)
    assert code == 0
    taus = len(cfg.taus or ())
    assert set(recorder.lengths) == ({f'predict_batches {i}' for i in (1, 2)} |  # val and test features
                                     {f'evaluate {i}' for i in range(1, 2 * taus + 2)} if taus else
                                     {'train_one_epoch 1', 'evaluate 1', 'evaluate 2'})  # val, then test
    assert recorder.lengths.get('train_one_epoch 1', 9) == 9 and recorder.lengths['evaluate 1'] >= 2
    assert not _all_mixes(recorder), dict(recorder.passes)
    assert not _passes_waiting(recorder), dict(recorder.passes)


@pytest.mark.filterwarnings('ignore:CUDA is not available')
def test_imagenet_inat_save_feat_and_output_logits_never_wait_for_the_device(inat_world, tmp_path, monkeypatch):
    from imagenet_inat import main as ii_main
    from imagenet_inat import stages
    cfg_path = fixtures_jpeg.write_config(tmp_path / 'c.yaml', fixtures_jpeg.stage_config(tmp_path / 'run',
                                                                                          batch=STAGE_BATCH))
    monkeypatch.setattr(stages, 'OUTPUT_BATCH', 2)
    quiet = lambda *a, **k: None  # noqa: E731
    for flags in (('--save_feat', 'val'), ('--output_logits',)):
        args = ii_main.build_parser().parse_args([
            '--cfg', cfg_path, '--data_root', inat_world['images'], '--split_dir', inat_world['splits'],
            '--model_dir', inat_world['stage1'], '--test', *flags])
        run = stages.build(args, ii_main.load_stage(args), dist.ProcessContext(0, 1, 0, CUDA), quiet)
        run.model.to(memory_format=torch.channels_last)
        with monkeypatch.context() as m, fake_cuda(m, run.model) as (model, recorder):
            m.setattr(stages, 'placed', lambda run: run.model)  # as in the test above
            m.setattr(stages.data_mod, 'eval_loader', _pinned_maker(stages.data_mod.eval_loader, recorder))
            for name in ('evaluate', 'predict_batches'):
                m.setattr(stages, name, _counted(getattr(stages, name), recorder, name))
            with recorder:
                assert stages.test(run, quiet) == 0
        assert set(recorder.lengths) == {'predict_batches 1'} | ({'evaluate 1'} if '--output_logits' in flags
                                                                 else set())
        assert recorder.lengths['predict_batches 1'] == 2
        assert not _all_mixes(recorder), dict(recorder.passes)
        assert not _passes_waiting(recorder), dict(recorder.passes)


class _Placed(torch.nn.Module):
    """A model fake_cuda placed, whose .to(device) has nothing left to do (FakeTensor parameters cannot
    be converted a second time)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def to(self, *args, **kwargs):
        return self


@pytest.mark.filterwarnings('ignore:CUDA is not available')
def test_pseudo_labelling_and_tsne_predictions_never_wait_for_the_device(cifar10_root, monkeypatch):
    """engine.predict as gen_pseudolabels.py drives it (HostBatches, its default --loader device) and as
    tools/tsne.py's extract() does (a DataLoader of the data set's images)."""
    import gen_pseudolabels
    from dataset import DATASETS, build_transform
    from dataset.device_loader import HostBatches
    from tools import tsne
    info = DATASETS['cifar10']
    args = gen_pseudolabels.build_parser().parse_args(['--resume', 'model.pth.tar', '-b', '16'])
    pool = np.random.RandomState(0).randint(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    classifier = build_model('resnet32', 10).to(memory_format=torch.channels_last)
    with monkeypatch.context() as m, fake_cuda(m, classifier) as (model, recorder):
        with recorder:  # gen_pseudolabels.main's prediction, with its defaults on a GPU
            loader = HostBatches(pool, args.batch_size, CUDA, info.mean, info.std, args.channels_last)
            engine.predict(model, recorder.steps(loader, 'gen_pseudolabels'), CUDA, amp=args.amp,
                           channels_last=args.channels_last)
    assert recorder.lengths == {'gen_pseudolabels': 3}
    assert not _all_mixes(recorder) and not _passes_waiting(recorder), dict(recorder.passes)

    with fake_cuda(monkeypatch, build_model('resnet32', 10, return_features=True)) as (model, recorder):
        monkeypatch.setattr(tsne, 'DataLoader', _pinned_maker(DataLoader, recorder))
        monkeypatch.setattr(tsne, 'predict', _counted(tsne.predict, recorder, 'tsne'))
        data = info.build_val(cifar10_root, build_transform('cifar10', train=False))
        with recorder:
            feats, labels = tsne.extract(lambda x: model(x)[1], _Placed(model), data, CUDA, batch_size=40)
    assert recorder.lengths == {'tsne 1': 3} and feats.shape == (100, 64) and labels.shape == (100,)
    assert not _all_mixes(recorder) and not _passes_waiting(recorder), dict(recorder.passes)
