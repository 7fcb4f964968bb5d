"""Split files, transforms and loaders of the decoupled ImageNet-LT / iNaturalist 2018 stages.

Phases (as the original's dataloader.load_data):
    train        <dataset>_train.txt (or _val.txt with --val_as_train), training transform
    train_plain  <dataset>_train.txt, evaluation transform (features for --save_feat)
    val, test    <dataset>_val.txt, <dataset>_test.txt, evaluation transform
Transforms: RandomResizedCrop(224) + flip (+ ColorJitter(0.4, 0.4, 0.4, 0) except for
iNaturalist18) for training; Resize(256) + CenterCrop(224) for evaluation.
"""
import itertools
import os

import torch
from torch.utils.data import DataLoader, Sampler, Subset
from torchvision import transforms

from dataset.samplers import ShuffleSampler
from imagenet_inat.networks import SAMPLERS
from moco.loader import IMAGENET_MEAN, IMAGENET_STD, INAT_MEAN, INAT_STD, SplitFileDataset

# Where the best weights are evaluated after training, and what --test evaluates by default:
# the original had no test split for these two (iNaturalist 2018 publishes none).
FINAL_SPLIT = {'iNaturalist18': 'val', 'ImageNet': 'val'}


def final_split(dataset):
    return FINAL_SPLIT.get(dataset, 'test')


def statistics(dataset):
    return (INAT_MEAN, INAT_STD) if dataset == 'iNaturalist18' else (IMAGENET_MEAN, IMAGENET_STD)


def build_transform(dataset, train, crop_size=224, resize_size=256):
    mean, std = statistics(dataset)
    if train:
        jitter = [] if dataset == 'iNaturalist18' else [
            transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0)]
        head = [transforms.RandomResizedCrop(crop_size), transforms.RandomHorizontalFlip(), *jitter]
    else:
        head = [transforms.Resize(resize_size), transforms.CenterCrop(crop_size)]
    return transforms.Compose(head + [transforms.ToTensor(), transforms.Normalize(mean, std)])


def split_file(split_dir, dataset, split):
    return os.path.join(split_dir, f'{dataset}_{split}.txt')


def load_phase(cfg, phase, data_root, split_dir, val_as_train=False):
    """The data set of `phase`; every listed image and label is checked here, before training."""
    split = {'train': 'val' if val_as_train else 'train', 'train_plain': 'train'}.get(phase, phase)
    transform = build_transform(cfg.dataset, phase == 'train', cfg.crop_size, cfg.resize_size)
    return SplitFileDataset(data_root, split_file(split_dir, cfg.dataset, split), transform,
                            num_classes=cfg.num_classes, flags=('--split_dir', '--data_root'))


class FirstN(Sampler):
    """The first `num_samples` indices of an epoch sampler's share: the original stopped every
    epoch after floor(N_train / batch_size) steps, whatever the sampler's own length."""

    def __init__(self, sampler, num_samples):
        self.sampler, self.num_samples = sampler, num_samples
        self._skip = 0

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)
        self._skip = 0

    def skip(self, n):
        self.sampler.skip(n)
        self._skip = n

    def __iter__(self):
        return itertools.islice(iter(self.sampler), len(self))

    def __len__(self):
        return max(self.num_samples - self._skip, 0)


def train_loader(cfg, train_set, seed, rank, world, workers):
    """(loader, sampler, steps per epoch). `cfg.batch_size` is the total over `world` processes."""
    per_rank = cfg.batch_size // world
    steps = len(train_set) // cfg.batch_size
    if cfg.sampler is None:
        inner = ShuffleSampler(len(train_set), shuffle=True, seed=seed, num_replicas=world, rank=rank)
    else:
        inner = SAMPLERS[cfg.sampler](train_set, num_samples_cls=cfg.num_samples_cls, seed=seed,
                                      num_replicas=world, rank=rank)
    sampler = FirstN(inner, steps * per_rank)
    # Own generator, re-seeded every epoch by the driver: loader worker seeds then depend on
    # (seed, epoch, rank) only, not on the global RNG, so a resumed run sees the same augmentations.
    loader = DataLoader(train_set, batch_size=per_rank, sampler=sampler, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), generator=torch.Generator())
    return loader, sampler, steps


def shard(data, rank, world):
    """Every rank evaluates a disjoint slice (rank, rank + world, ...), unpadded, so that counts
    summed over ranks are exact."""
    return data if world == 1 else Subset(data, range(rank, len(data), world))


def eval_loader(data, batch_size, workers, rank=0, world=1):
    return DataLoader(shard(data, rank, world), batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(0))
