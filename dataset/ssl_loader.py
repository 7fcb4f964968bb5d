"""The batches of a semi-supervised step (train_ssl.py): B labeled images (weak view) and mu * B unlabeled
images (weak and strong views, dataset.randaugment), with their labels and unlabeled indices.

Order. Each set is an endless stream of permutations: pass p of a set of N images is a permutation seeded
by (run seed, set, p), and global step t takes positions t * B .. t * B + B - 1 of the labeled stream (the
unlabeled: t * mu * B ...), across pass boundaries, as USB's and kekmodel's samplers without replacement
run on. A rank r of `world` takes positions r, r + world, ... of each global batch, so the processes of a
distributed run together see the batch of one process. Views: drawn per step from a generator seeded by
(run seed, step, rank). Everything is a pure function of (seed, step, rank): a resumed run skips the
steps already done and goes on exactly; nothing is saved for the data.

Two paths, the same batches where the ops are exact: 'device' (default) keeps the uint8 images on the
training device and makes each batch there in a few batched operations; 'torchvision' makes them per
image with PIL (dataset.randaugment_pil) in DataLoader worker processes, the streams and the drawn
parameters computed on the host. On a CPU the two are equal bit for bit (tests/test_randaugment.py).
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dataset import randaugment as ra
from dataset import randaugment_pil as rp
from dataset.device_loader import as_nhwc, normalize
from utils import derive_seed

STREAM_LABELED, STREAM_UNLABELED, STREAM_VIEWS, STREAM_STEP = 0x6c62, 0x756c62, 0x76696577, 0x73746570


@dataclass
class SSLBatch:
    x_lb: torch.Tensor                  # (B, 3, S, S) weak views of the labeled images, normalised
    y_lb: torch.Tensor                  # (B,) labels
    x_ulb_w: Optional[torch.Tensor]     # (mu B, 3, S, S) weak views of the unlabeled images (None: supervised)
    x_ulb_s: Optional[torch.Tensor]     # (mu B, 3, S, S) strong views
    idx_ulb: Optional[torch.Tensor]     # (mu B,) their indices in the unlabeled set
    epoch: int                          # 0-based evaluation period
    step: int                           # 0-based global step
    seed: int                           # this step's seed for the method's own draws (ABC's masks)

    def to(self, device):
        moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in vars(self).items()}
        return SSLBatch(**moved)

    def pin_memory(self):
        """For DataLoader(pin_memory=True): page-locked copies, so the copy to the GPU need not wait."""
        return SSLBatch(**{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in vars(self).items()})


class Streams:
    """Positions of the endless permutation streams (module docstring) on `device`."""

    def __init__(self, seed, device):
        self.seed, self.device = seed, torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.cache = {}

    def _perm(self, stream, n, p):
        key = (stream, p)
        if key not in self.cache:
            self.generator.manual_seed(derive_seed(self.seed, stream, p))
            self.cache[key] = torch.randperm(n, generator=self.generator, device=self.device)
            for old in [k for k in self.cache if k[0] == stream and k[1] < p - 1]:
                del self.cache[old]
        return self.cache[key]

    def indices(self, stream, n, start, stop, step=1):
        """Set indices at stream positions start, start + step, ... < stop."""
        first, last = start // n, (stop - 1) // n
        if first == last:  # within one pass (most steps): no copy of the permutation
            return self._perm(stream, n, first)[start - first * n:stop - first * n:step]
        perms = torch.cat([self._perm(stream, n, p) for p in range(first, last + 1)])
        return perms[torch.arange(start - first * n, stop - first * n, step, device=self.device)]


class SSLSource:
    """The uint8 images of both sets and how one step's batch is made (on `device`, or with PIL on the host)."""

    def __init__(self, lb_images, lb_targets, ulb_images, batch_size, mu, mean, std, *, flip, seed, rank=0,
                 world=1, device='cpu', pil=False, unlabeled=True):
        self.device = torch.device(device)
        self.lb_images = torch.as_tensor(as_nhwc(np.asarray(lb_images))).to(self.device).contiguous()
        self.lb_targets = torch.as_tensor(np.asarray(lb_targets, dtype=np.int64)).to(self.device)
        self.ulb_images = (torch.as_tensor(as_nhwc(np.asarray(ulb_images))).to(self.device).contiguous()
                           if unlabeled else None)
        self.batch_size, self.mu, self.flip = batch_size, mu, flip
        self.seed, self.rank, self.world, self.pil = seed, rank, world, pil
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.size = self.lb_images.shape[1]
        self.streams = Streams(seed, self.device)
        self.views = torch.Generator(device=self.device)
        self.randaugment = ra.RandAugment(self.size, self.device)

    def batch(self, t, epoch):
        """This rank's SSLBatch of global step t."""
        b, u = self.batch_size, self.mu * self.batch_size
        lb = self.streams.indices(STREAM_LABELED, len(self.lb_images), t * b + self.rank, (t + 1) * b, self.world)
        self.views.manual_seed(derive_seed(self.seed, STREAM_VIEWS, t, self.rank))
        weak_lb = ra.draw(len(lb), self.views, strong=False, flip=self.flip, size=self.size)
        x_lb = self._weak(self.lb_images, lb, weak_lb)
        x_w = x_s = ulb = None
        if self.ulb_images is not None:
            ulb = self.streams.indices(STREAM_UNLABELED, len(self.ulb_images), t * u + self.rank, (t + 1) * u,
                                       self.world)
            weak_u = ra.draw(len(ulb), self.views, strong=False, flip=self.flip, size=self.size)
            strong_u = ra.draw(len(ulb), self.views, strong=True, flip=self.flip, size=self.size)
            x_w = self._weak(self.ulb_images, ulb, weak_u)
            x_s = self._strong(self.ulb_images, ulb, strong_u)
        images = [None if x is None else normalize(x, self.mean, self.std) for x in (x_lb, x_w, x_s)]
        return SSLBatch(images[0], self.lb_targets[lb], images[1], images[2], ulb, epoch, t,
                        derive_seed(self.seed, STREAM_STEP, t, self.rank))

    def _weak(self, images, index, views):
        if self.pil:
            return self._per_image(rp.weak, images, index, views)
        return ra.weak_pixels(images, index, views)

    def _strong(self, images, index, views):
        if self.pil:
            return self._per_image(rp.strong, images, index, views)
        return self.randaugment(ra.weak_pixels(images, index, views), views)

    @staticmethod
    def _per_image(transform, images, index, views):
        out = [np.asarray(transform(Image.fromarray(images[i].numpy()), views.row(k)))
               for k, i in enumerate(index.tolist())]
        return torch.from_numpy(np.stack(out))


class _Steps(Dataset):
    """Step t -> its batch, made with PIL on the host (one step per DataLoader item: workers build whole steps)."""

    def __init__(self, source, steps_per_epoch):
        self.source, self.steps_per_epoch = source, steps_per_epoch

    def __getitem__(self, t):
        return self.source.batch(t, t // self.steps_per_epoch)

    def __len__(self):
        raise TypeError("an endless stream of steps")


def _as_is(batch):
    return batch


class SSLLoader:
    """`steps` SSLBatches per epoch, on `device`: an epoch-sampler-like loader (set_epoch, skip) for
    trainer.begin_epoch. `workers`: with a PIL source, DataLoader worker processes (0: in this process)."""

    batch_size = None  # trainer.begin_epoch skips whole steps

    def __init__(self, source, steps, device, workers=0):
        self.source, self.steps, self.device, self.workers = source, steps, torch.device(device), workers
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch):
        self.epoch, self._skip = epoch, 0

    def skip(self, n):
        self._skip = n

    def __len__(self):
        return self.steps - self._skip

    def __iter__(self):
        first = self.epoch * self.steps + self._skip
        steps = range(first, (self.epoch + 1) * self.steps)
        if not self.source.pil:
            for t in steps:
                yield self.source.batch(t, self.epoch)
            return
        loader = DataLoader(_Steps(self.source, self.steps), sampler=steps, batch_size=None, num_workers=self.workers,
                            pin_memory=self.device.type == 'cuda', collate_fn=_as_is)
        for batch in loader:
            yield batch.to(self.device)
