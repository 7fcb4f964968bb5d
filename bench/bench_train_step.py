"""Training-step throughput of the CIFAR ResNet-32 (images/s), on whatever device is present.

    python bench/bench_train_step.py [--batch-size 128] [--steps 20] [--arch resnet32]

Measures the engine's real step (forward, loss, backward, SGD) on random 32x32 batches, so data
loading is excluded; bench/README.md records the figures. On a shared or small machine compare
two configurations in one run, as a ratio, rather than numbers from different runs.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine import train_one_epoch  # noqa: E402
from models import build_model  # noqa: E402


def _quiet(line, console_extra=''):
    pass


def measure(arch, batch_size, steps, device, channels_last):
    model = build_model(arch, 10).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=2e-4)
    criterion = torch.nn.CrossEntropyLoss()
    images = torch.randn(batch_size, 3, 32, 32)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    batches = [(images, torch.randint(0, 10, (batch_size,)))] * steps
    train_one_epoch(model, criterion, batches[:3], optimizer, device, 0, log=_quiet)  # warm-up
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    train_one_epoch(model, criterion, batches, optimizer, device, 0, log=_quiet)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='resnet32')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--steps', type=int, default=20)
    args = parser.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({torch.get_num_threads()} threads)'
    base = measure(args.arch, args.batch_size, args.steps, device, channels_last=False)
    cl = measure(args.arch, args.batch_size, args.steps, device, channels_last=True)
    print(f"{name}, torch {torch.__version__}, {args.arch}, batch {args.batch_size}")
    print(f"  contiguous (NCHW): {base:8.1f} images/s")
    print(f"  channels_last:     {cl:8.1f} images/s  (ratio {cl / base:.2f})")


if __name__ == '__main__':
    main()
