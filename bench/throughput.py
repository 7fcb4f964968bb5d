"""End-to-end throughput of ResNet-32 on a CIFAR-10-LT-sized set, against the machine's matmul roofline.

    python bench/throughput.py [--train-steps N] [--skip-compile] [--only TEXT] [--skip-process]   (make bench)

In one run on one machine:
  1. the float32 matmul GFLOP/s of the device (2048 x 2048, best of several), the roofline;
  2. for each configuration (the classic torchvision loader with NCHW eager float32, as before
     issue 11; the device loader; + channels_last; + bf16 autocast; + torch.compile; the classic
     loader and pre-made batches, both with channels_last + bf16: what `--loader torchvision`
     trains at, and the bound no loader can beat), training
     images/s (the engine's real step, batch 128, data loading included, from the first batch) and
     evaluation images/s over the 10,000 test images, and the training fraction of the roofline:
     images/s x 0.413 GFLOP (ResNet-32: 68.9 M multiply-adds per 32x32 forward, x2 FLOP, x3 with
     the backward pass) / measured GFLOP/s;
  3. the wall time of whole `train.py` processes, one epoch each (start-up, data loading, training,
     evaluation, checkpoint): the defaults, `--loader torchvision`, and the pre-issue-11 pipeline.
The data set is synthetic, written in CIFAR-10's real file format (tests/fixtures.py) with CIFAR-10's
sizes (5,000 training images per class, 1,000 test images per class), so `--imb_factor 0.01` keeps
12,406 training images as for the real one. Prints a markdown table; bench/README.md records results.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import CIFAR10

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'tests'))
import fixtures  # noqa: E402
from dataset import DATASETS, build_transform  # noqa: E402
from dataset.device_loader import DeviceLoader, eval_batch_size  # noqa: E402
from dataset.imbalance_cifar import ImbalanceCIFAR10  # noqa: E402
from dataset.samplers import ShuffleSampler  # noqa: E402
from engine import evaluate, train_one_epoch  # noqa: E402
from models import build_model  # noqa: E402

GFLOP_PER_TRAINED_IMAGE = 0.413
BATCH = 128
# The synthetic files cannot match CIFAR-10's md5 sums; everything else runs the real loading code.
UNCHECKED_TRAIN = ("import sys; from torchvision.datasets import CIFAR10; "
                   "CIFAR10._check_integrity = lambda self: True; import cli, train; cli.run_main(train.main)")


def machine(device):
    cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')),
               'unknown CPU')
    gpu = f", GPU: {torch.cuda.get_device_name(device)}" if device.type == 'cuda' else ', no GPU'
    return f"{cpu}, {torch.get_num_threads()} threads{gpu}; torch {torch.__version__}"


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def matmul_gflops(device, n=2048, repeats=10):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float('inf')
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def _quiet(line, console=None):
    pass


def _loaders(cfg, train_set, val_set, device):
    info = DATASETS['cifar10']
    sampler = ShuffleSampler(len(train_set), seed=0)
    if cfg['loader'] == 'torchvision':
        pin = device.type == 'cuda'
        train = DataLoader(train_set, batch_size=BATCH, sampler=sampler, num_workers=4, pin_memory=pin,
                           generator=torch.Generator().manual_seed(0))
        val = DataLoader(val_set, batch_size=100, num_workers=4, pin_memory=pin)
        return train, val
    if cfg['loader'] == 'premade':  # the device loader's batches made once, then only replayed
        train, val = _loaders({**cfg, 'loader': 'device'}, train_set, val_set, device)
        return _Replay(train), _Replay(val)
    train = DeviceLoader.from_dataset(train_set, sampler, BATCH, device, info, train=True, flip=info.flip,
                                      channels_last=cfg['channels_last'])
    val = DeviceLoader.from_dataset(val_set, range(len(val_set)), eval_batch_size(device), device, info, train=False,
                                    channels_last=cfg['channels_last'])
    return train, val


def measure(cfg, train_set, val_set, device, train_steps):
    """(training images/s, evaluation images/s, seconds of the first step) for one configuration."""
    torch.manual_seed(0)
    model = build_model('resnet32', 10).to(device)
    if cfg['channels_last']:
        model = model.to(memory_format=torch.channels_last)
    if cfg['compile']:
        model.compile()
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=2e-4)
    criterion = torch.nn.CrossEntropyLoss()
    train, val = _loaders(cfg, train_set, val_set, device)
    hooks = dict(amp=cfg['amp'], channels_last=cfg['channels_last'])
    # First step alone: compile time (and one-off kernel selection) is reported, not averaged in.
    start = time.perf_counter()
    train_one_epoch(model, criterion, train, optimizer, device, 0, log=_quiet, num_steps=1,
                    should_stop=lambda sync: True, **hooks)
    _sync(device)
    first = time.perf_counter() - start
    # Whole batches only: the last, partial batch of an epoch would make a compiled model recompile
    # for its shape inside the timed loop.
    whole = len(train_set) // BATCH
    steps = min(train_steps or whole, whole)
    start = time.perf_counter()
    train_one_epoch(model, criterion, _first(train, steps), optimizer, device, 0, log=_quiet, **hooks)
    _sync(device)
    train_rate = steps * BATCH / (time.perf_counter() - start)
    # Evaluation as train.py runs it: float32 (its --amp-eval is off by default).
    eval_hooks = dict(hooks, amp=cfg.get('amp_eval', False))
    evaluate(model, criterion, _first(val, 1), device, 10, **eval_hooks)  # eval-mode compile, kernel selection
    start = time.perf_counter()
    evaluate(model, criterion, val, device, 10, **eval_hooks)
    _sync(device)
    return train_rate, len(val_set) / (time.perf_counter() - start), first


class _Replay:
    """A loader's batches, made once and kept: iterating costs nothing, so a configuration fed by it
    times the model alone, the bound no data loader can beat."""

    def __init__(self, loader):
        self.batches = list(loader)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class _first:
    """The first `n` batches of a loader (each pass starts the loader afresh, workers included)."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n

    def __len__(self):
        return self.n

    def __iter__(self):
        for k, batch in enumerate(self.loader):
            if k == self.n:
                return
            yield batch


def train_process_seconds(root, extra, device):
    """Wall time of one whole `train.py` process: one epoch of the synthetic CIFAR-10-LT."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, '-c', UNCHECKED_TRAIN, '--dataset', 'cifar10', '--data_path', root,
               '--imb_factor', '0.01', '--epochs', '1', '--seed', '0', '-p', '20', '--root_log', f'{out}/log',
               '--root_model', f'{out}/ckpt', *extra]
        start = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--train-steps', type=int, default=0, help='training steps timed per configuration '
                        '(default 0: the whole epoch, 97 steps)')
    parser.add_argument('--skip-compile', action='store_true', help='leave out the torch.compile configurations')
    parser.add_argument('--skip-process', action='store_true', help='leave out the whole-process train.py epochs')
    parser.add_argument('--only', default='', metavar='TEXT',
                        help='time only the configurations whose name contains TEXT (and the classic one)')
    parser.add_argument('--repeats', type=int, default=1, help='whole-process runs per configuration (interleaved)')
    args = parser.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    print(f"machine: {machine(device)}", flush=True)
    gflops = matmul_gflops(device)
    print(f"float32 matmul 2048x2048: {gflops:.1f} GFLOP/s -> roofline {gflops / GFLOP_PER_TRAINED_IMAGE:.0f} "
          f"trained images/s", flush=True)

    configs = [
        ('classic loader, NCHW, eager float32 (before issue 11)', dict(loader='torchvision', channels_last=False)),
        ('device loader', dict(loader='device', channels_last=False)),
        ('device loader + channels_last', dict(loader='device', channels_last=True)),
        ('device loader + channels_last + bf16 autocast', dict(loader='device', channels_last=True, amp=True)),
        ('classic loader + channels_last + bf16 autocast (`--loader torchvision`)',
         dict(loader='torchvision', channels_last=True, amp=True)),
        ('pre-made batches + channels_last + bf16 autocast (no loading: the bound for any loader)',
         dict(loader='premade', channels_last=True, amp=True)),
    ]
    if not args.skip_compile:
        configs += [('device loader + channels_last + compile',
                     dict(loader='device', channels_last=True, compile=True)),
                    ('device loader + channels_last + bf16 + compile',
                     dict(loader='device', channels_last=True, amp=True, compile=True))]
    # the first (classic) configuration stays: the ratios are against it
    configs = configs[:1] + [c for c in configs[1:] if args.only in c[0]]
    with tempfile.TemporaryDirectory() as root:
        fixtures.write_cifar10(root, per_class=5000, test_per_class=1000)
        CIFAR10._check_integrity = lambda self: True  # synthetic files; see UNCHECKED_TRAIN
        train_set = ImbalanceCIFAR10(root, imb_factor=0.01, transform=build_transform('cifar10', train=True))
        val_set = ImbalanceCIFAR10(root, train=False, transform=build_transform('cifar10', train=False))
        print(f"synthetic CIFAR-10-LT: {len(train_set)} training, {len(val_set)} test images", flush=True)
        rows = []
        for name, cfg in configs:
            cfg = {'amp': False, 'compile': False, **cfg}
            train_rate, eval_rate, first = measure(cfg, train_set, val_set, device, args.train_steps)
            rows.append((name, train_rate, eval_rate, first))
            print(f"  {name}: train {train_rate:.1f} img/s, eval {eval_rate:.1f} img/s, first step {first:.1f} s",
                  flush=True)
        processes = []
        if not args.skip_process:
            runs = [('`train.py` defaults', []), ('`train.py --loader torchvision`', ['--loader', 'torchvision']),
                    ('`--loader torchvision --no-channels-last --no-amp` (before issue 11)',
                     ['--loader', 'torchvision', '--no-channels-last', '--no-amp'])]
            times = {name: [] for name, _ in runs}
            for _ in range(args.repeats):
                for name, extra in runs:
                    times[name].append(train_process_seconds(root, extra, device))
                    print(f"  {name}: {times[name][-1]:.1f} s", flush=True)
            processes = [(name, min(t)) for name, t in times.items()]

    base = rows[0][1]
    print("\n| configuration | train img/s | vs classic | roofline | eval img/s | first step s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, train_rate, eval_rate, first in rows:
        print(f"| {name} | {train_rate:.1f} | {train_rate / base:.2f}x | "
              f"{100 * train_rate * GFLOP_PER_TRAINED_IMAGE / gflops:.0f} % | {eval_rate:.1f} | {first:.1f} |")
    if processes:
        print("\n| whole `train.py` process, 1 epoch | seconds | speed-up of the defaults |")
        print("| --- | ---: | ---: |")
        default = processes[0][1]
        for name, seconds in processes:
            print(f"| {name} | {seconds:.1f} | {seconds / default:.2f}x |")


if __name__ == '__main__':
    main()
