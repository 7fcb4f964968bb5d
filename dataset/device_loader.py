"""A device-resident data path for the 32x32 data sets (CIFAR-10/100, SVHN, digits, their semi sets),
and a user's folder of S x S images alike (S for 32 below).

The whole uint8 data set lives as one N x 32 x 32 x 3 tensor on the training device. Each batch is
gathered by the indices a sampler yields and augmented in one batched operation there: a random
32x32 window of the image zero-padded by 4 pixels, a horizontal flip with p = 0.5 where the data set
flips, then ToTensor's /255 and Normalize's (x - mean) / std, in that order and in float32, so the
values equal torchvision's `RandomCrop(32, padding=4)`, `RandomHorizontalFlip()`, `ToTensor()`,
`Normalize(mean, std)` pipeline (`dataset.build_transform`) bit for bit for the same window and flip.
The windows and flips follow the same distribution as torchvision's (offsets uniform in 0..8, flip
iff u < 0.5) but come from a generator seeded by (seed, epoch, step, rank): a resumed run, which
skips the steps already done, draws the same augmentations for the remaining ones.

A loader is a plain iterable of (images, targets) batches already on the device, with `__len__`,
so engine.train_one_epoch / evaluate take it like a DataLoader.
"""
import math

import numpy as np
import torch

from dataset.augment import cutout_mask
from dataset.samplers import get_targets
from utils import derive_seed

PAD = 4


def eval_batch_size(device):
    """Images per evaluation batch: 1,000 on a GPU; 250 on a CPU, where batches of 1,000 outgrow the
    caches and measured 10-45 % slower than 100-250 (bench/README.md)."""
    return 1000 if torch.device(device).type == 'cuda' else 250


def as_nhwc(data):
    """N x S x S x 3 uint8 images from N x S x S x 3 (CIFAR, digits, folder) or N x 3 x S x S (SVHN)."""
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 4:
        raise ValueError(f"expected N x S x S x 3 or N x 3 x S x S uint8 images, got {data.dtype} {data.shape}")
    if data.shape[3] == 3 and data.shape[1] == data.shape[2]:
        return data
    if data.shape[1] == 3 and data.shape[2] == data.shape[3]:
        return data.transpose(0, 2, 3, 1)
    raise ValueError(f"expected N x S x S x 3 or N x 3 x S x S uint8 images, got {data.shape}")


def _skipped(sampler):
    """How many of this epoch's indices the sampler leaves out (`EpochSampler.skip`, mid-epoch resume)."""
    if not hasattr(sampler, 'num_replicas'):
        return 0
    return math.ceil(sampler.num_samples / sampler.num_replicas) - len(sampler)


class DeviceLoader:
    """(images B x 3 x 32 x 32 float32, targets B int64) batches on `device`.

    images:  uint8 images, N x 32 x 32 x 3 or N x 3 x 32 x 32 (numpy or CPU tensor); copied to `device`
    targets: N class labels
    sampler: what yields the indices of an epoch, in order: a dataset.samplers sampler (its `epoch`
             and `skip` are honoured) or any sized iterable, e.g. range(N) to evaluate
    train:   augment (random crop, flip if `flip`, Cutout if `cutout`); otherwise images are only normalised
    cutout:  side of the square Cutout zeroes after normalisation (dataset.augment), or None
    seed, rank: with the sampler's epoch and the step, they seed each batch's augmentations
    """

    def __init__(self, images, targets, sampler, batch_size, device, mean, std, *, train, flip=False,
                 cutout=None, seed=0, rank=0, channels_last=False):
        self.device = torch.device(device)
        self.images = torch.as_tensor(as_nhwc(np.asarray(images))).to(self.device).contiguous()
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.int64)).to(self.device)
        self.sampler, self.batch_size = sampler, batch_size
        self.train, self.flip, self.cutout, self.seed, self.rank = train, flip, cutout, seed, rank
        self.channels_last = channels_last
        self.mean, self.std = _stats(mean, self.device), _stats(std, self.device)
        self._generator = torch.Generator(device=self.device)
        self.size = self.images.shape[1]  # 32, or a folder's --image_size
        self._arange = torch.arange(self.size, device=self.device)

    @classmethod
    def from_dataset(cls, dataset, sampler, batch_size, device, info, **kwargs):
        """From a data set of this project (`.data`, and `.targets` or `.labels`) and its DatasetInfo."""
        return cls(dataset.data, get_targets(dataset), sampler, batch_size, device, info.mean, info.std, **kwargs)

    def __len__(self):
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        order = torch.as_tensor(list(self.sampler), dtype=torch.int64).to(self.device)
        epoch = getattr(self.sampler, 'epoch', 0)
        first_step = _skipped(self.sampler) // self.batch_size
        for k, start in enumerate(range(0, len(order), self.batch_size)):
            index = order[start:start + self.batch_size]
            if self.train:
                self._generator.manual_seed(derive_seed(self.seed, epoch, first_step + k, self.rank))
                pixels = self.augment(index, self._generator)
            else:
                pixels = self.images[index]
            images = normalize(pixels, self.mean, self.std, self.channels_last)
            if self.train and self.cutout:
                # Drawn after the windows and flips, so those stay what they are without Cutout.
                centres = torch.randint(0, self.size, (index.numel(), 2), generator=self._generator,
                                        device=self.device)
                images = images.masked_fill(cutout_mask(centres, self.cutout, self.size, self.size)[:, None], 0)
            yield images, self.targets[index]

    def augment(self, index, generator):
        """B x 32 x 32 x 3 uint8: random windows of the zero-padded images, flipped where drawn.

        Offsets are uniform in 0..2*PAD (torchvision's RandomCrop draws randint(0, 40 - 32 + 1)) and
        a flip happens iff u < 0.5 (RandomHorizontalFlip's `torch.rand(1) < p`). Window row r of the
        padded image is row r - PAD of the image; rows outside it are the zero padding."""
        n = index.numel()
        offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=generator, device=self.device)
        rows = offsets[:, :1] - PAD + self._arange  # B x 32: image rows of the window
        cols = offsets[:, 1:] - PAD + self._arange
        if self.flip:
            flipped = torch.rand(n, generator=generator, device=self.device) < 0.5
            cols = torch.where(flipped[:, None], cols.flip(1), cols)
        inside = ((rows >= 0) & (rows < self.size))[:, :, None] & ((cols >= 0) & (cols < self.size))[:, None, :]
        pixels = self.images[index[:, None, None], rows.clamp(0, self.size - 1)[:, :, None],
                             cols.clamp(0, self.size - 1)[:, None, :]]
        return pixels * inside[..., None]


def _stats(values, device):
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)


def normalize(pixels, mean, std, channels_last=False):
    """B x 32 x 32 x 3 uint8 -> B x 3 x 32 x 32 float32: ToTensor's x / 255, then Normalize's (x - mean) / std."""
    images = pixels.permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)
    return images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class HostBatches:
    """Normalised batches, in order, of uint8 images kept in host memory, each batch copied to `device`
    on its own: for a pool too large to hold there (gen_pseudolabels.py scores SVHN's 531,131 extra
    images). No labels; the values are DeviceLoader's evaluation batches'."""

    def __init__(self, images, batch_size, device, mean, std, channels_last=False):
        self.images, self.batch_size, self.device = as_nhwc(images), batch_size, torch.device(device)
        self.mean, self.std = _stats(mean, self.device), _stats(std, self.device)
        self.channels_last = channels_last

    def __len__(self):
        return math.ceil(len(self.images) / self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.images), self.batch_size):
            pixels = torch.from_numpy(np.ascontiguousarray(self.images[start:start + self.batch_size]))
            if self.device.type == 'cuda':
                pixels = pixels.pin_memory()  # else the copy below waits for the device
            yield normalize(pixels.to(self.device, non_blocking=True), self.mean, self.std, self.channels_last)
