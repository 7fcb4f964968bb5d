"""Images per second of the imagenet_inat JPEG loader alone (no model), and of two decoders.

    python bench/jpeg_loader.py [--images 200] [--size 500 375] [--workers 0 2]

Writes `--images` synthetic JPEGs of ImageNet's typical size (500 x 375, quality 90) into a
temporary folder with a split file, then measures, each on the same files:
- decode only: PIL (`Image.open().convert('RGB')`, what the loader uses) and
  `torchvision.io.decode_jpeg` (libjpeg-turbo on the CPU);
- decode + the training transform (RandomResizedCrop(224), flip, ColorJitter, normalise) per image,
  PIL's transforms on the PIL image and the same torchvision transforms on the decoded tensor;
- the real training loader (imagenet_inat.data.train_loader over a SplitFileDataset, batch 128,
  workers started afresh every epoch as in training) with each `--workers` count. Everything runs with one torch thread per process, as loader workers do.
Prints the machine, torch / torchvision versions and one line per measurement.
"""
import argparse
import os
import platform
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg, read_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset.splitfile import SplitFileDataset, build_transform  # noqa: E402
from dataset.statistics import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from imagenet_inat.data import train_loader  # noqa: E402
from trainer import begin_epoch  # noqa: E402


def write_images(folder, n, size, seed=0):
    """Smooth colour fields plus noise: compress and decode like photographs, not like flat colour."""
    rng = np.random.RandomState(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    lines = []
    for i in range(n):
        base = np.stack([np.sin(xx / rng.uniform(20, 80) + rng.uniform(0, 6)) * 80 + 128 for _ in range(3)], -1)
        pixels = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f'{i}.jpg'), quality=90)
        lines.append(f'{i}.jpg {i % 10}')
    split = os.path.join(folder, 'bench_train.txt')
    with open(split, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return split


def rate(fn, items, repeat=2):
    best = float('inf')
    for _ in range(repeat):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return len(items) / best


def pil_decode(path):
    with open(path, 'rb') as f:
        return Image.open(f).convert('RGB')


def tv_decode(path):
    return decode_jpeg(read_file(path), mode=ImageReadMode.RGB)


def tensor_train_transform():
    return transforms.Compose([
        transforms.RandomResizedCrop(224, antialias=True), transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(0.4, 0.4, 0.4, 0), transforms.ConvertImageDtype(torch.float32),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def loader_rate(root, split, workers, batch=128, epochs=2):
    """Images/s of the loader a training stage builds (imagenet_inat.data.train_loader: uniform
    sampling, whole batches only, workers started afresh every epoch), set up per epoch as it is."""
    data = SplitFileDataset(root, split, build_transform('ImageNet_LT', train=True))
    cfg = SimpleNamespace(batch_size=min(batch, len(data)), sampler=None, num_samples_cls=0, shuffle=False)
    loader, sampler, _ = train_loader(cfg, data, seed=0, rank=0, world=1, workers=workers)
    best = float('inf')
    for epoch in range(epochs):
        begin_epoch(sampler, loader, 0, epoch, 0)
        start = time.perf_counter()
        n = sum(len(images) for images, _ in loader)
        best = min(best, time.perf_counter() - start)
    return n / best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', type=int, default=200)
    parser.add_argument('--size', type=int, nargs=2, default=(500, 375), metavar=('W', 'H'))
    parser.add_argument('--workers', type=int, nargs='+', default=(0, 2))
    args = parser.parse_args()
    # One thread, as in a DataLoader worker: tiny per-image ops only lose to OpenMP spinning.
    torch.set_num_threads(1)
    print(f"{platform.node()}: {os.cpu_count()} CPUs, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, {torch.get_num_threads()} threads; {args.images} JPEGs of "
          f"{args.size[0]}x{args.size[1]}")
    with tempfile.TemporaryDirectory() as folder:
        split = write_images(folder, args.images, args.size)
        paths = [os.path.join(folder, f'{i}.jpg') for i in range(args.images)]
        pil_train, tv_train = build_transform('ImageNet_LT', train=True), tensor_train_transform()
        print(f"decode only, PIL:                      {rate(pil_decode, paths):8.1f} images/s (1 process)")
        print(f"decode only, torchvision.io:           {rate(tv_decode, paths):8.1f} images/s (1 process)")
        print(f"decode + train transform, PIL:         {rate(lambda p: pil_train(pil_decode(p)), paths):8.1f} images/s")
        print(f"decode + train transform, tensor path: {rate(lambda p: tv_train(tv_decode(p)), paths):8.1f} images/s")
        for workers in args.workers:
            print(f"imagenet_inat training loader, -j {workers}: {loader_rate(folder, split, workers):8.1f} images/s")


if __name__ == '__main__':
    main()
