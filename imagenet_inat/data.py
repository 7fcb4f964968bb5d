"""The data sets and loaders of the decoupled ImageNet-LT / iNaturalist 2018 stages, per phase.

Phases (as the original's dataloader.load_data):
    train        <dataset>_train.txt (or _val.txt with --val_as_train), training transform
    train_plain  <dataset>_train.txt, evaluation transform (features for --save_feat)
    val, test    <dataset>_val.txt, <dataset>_test.txt, evaluation transform
The split files' reader and the transforms are the data's (dataset/splitfile.py).
"""
import itertools

import torch
from torch.utils.data import DataLoader, Sampler, Subset

from dataset.samplers import ShuffleSampler
from dataset.splitfile import SplitFileDataset, build_transform, split_file
from dataset.step_seeds import StepNumberedBatches, StepSeeded
from imagenet_inat.networks import SAMPLERS
from utils import derive_seed

# Where the best weights are evaluated after training, and what --test evaluates by default:
# the original had no test split for these two (iNaturalist 2018 publishes none).
FINAL_SPLIT = {'iNaturalist18': 'val', 'ImageNet': 'val'}


def final_split(dataset):
    return FINAL_SPLIT.get(dataset, 'test')


def load_phase(cfg, phase, data_root, split_dir, val_as_train=False):
    """The data set of `phase`; every listed image and label is checked here, before training."""
    split = {'train': 'val' if val_as_train else 'train', 'train_plain': 'train'}.get(phase, phase)
    transform = build_transform(cfg.dataset, phase == 'train', cfg.crop_size, cfg.resize_size)
    return SplitFileDataset(data_root, split_file(split_dir, cfg.dataset, split), transform,
                            num_classes=cfg.num_classes, flags=('--split_dir', '--data_root'))


class RankBatches(Sampler):
    """This process's part of every training batch, as DataParallel scattered it (layout.py).

    An epoch is the first steps x batch_size indices of `sampler`'s order (the original stopped
    every epoch after floor(N_train / batch_size) steps, whatever the sampler's length), cut into
    batches; with `shuffle` each batch is permuted (the original's `shuffle: true` permuted the
    loaded batch before DataParallel's scatter; permuting indices draws the same distribution);
    then `torch.chunk` cuts it into `world` contiguous pieces and process `rank` takes its own.
    The permutations are drawn from (seed, epoch), so every rank cuts the same batches and a
    resumed epoch repeats them.
    """

    def __init__(self, sampler, batch_size, steps, shuffle, seed, rank=0, world=1):
        self.sampler, self.batch_size, self.steps, self.shuffle, self.seed = sampler, batch_size, steps, shuffle, seed
        self.positions = torch.arange(batch_size).chunk(world)[rank]
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)
        self.epoch, self._skip = epoch, 0

    def skip(self, steps):
        """Leave out the first `steps` batches of the current epoch (to resume)."""
        self._skip = steps

    @property
    def skipped(self):
        """How many of the current epoch's batches are left out (dataset.step_seeds numbers the rest)."""
        return self._skip

    def __iter__(self):
        total = self.steps * self.batch_size
        order = torch.tensor(list(itertools.islice(iter(self.sampler), total)), dtype=torch.int64)
        batches = order.view(self.steps, self.batch_size)
        if self.shuffle:
            # -1 is never a rank: this stream differs from every loader's (seed, epoch, rank) one
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, -1))
            batches = batches.gather(1, torch.rand(batches.shape, generator=generator).argsort(1))
        return iter(batches[self._skip:, self.positions].tolist())

    def __len__(self):
        return max(self.steps - self._skip, 0)


def train_loader(cfg, train_set, seed, rank, world, workers):
    """(loader, batch sampler, steps per epoch). `cfg.batch_size` is the total over `world` processes."""
    steps = len(train_set) // cfg.batch_size
    if cfg.sampler is None:
        order = ShuffleSampler(len(train_set), shuffle=True, seed=seed)
    else:
        # the class-aware cycles advance by the draws an epoch uses, as the original's
        order = SAMPLERS[cfg.sampler](train_set, num_samples_cls=cfg.num_samples_cls, seed=seed,
                                      num_samples=steps * cfg.batch_size)
    batches = RankBatches(order, cfg.batch_size, steps, cfg.shuffle, seed, rank, world)
    # Own generator, re-seeded every epoch by the driver: loader worker seeds then depend on
    # (seed, epoch, rank) only, not on the global RNG, and each step's augmentations on the step too
    # (dataset.step_seeds), so a run resumed mid-epoch sees the same augmentations.
    loader = DataLoader(StepSeeded(train_set), batch_sampler=StepNumberedBatches(batches), num_workers=workers,
                        pin_memory=torch.cuda.is_available(), generator=torch.Generator())
    return loader, batches, steps


def shard(data, rank, world):
    """Every rank evaluates a disjoint slice (rank, rank + world, ...), unpadded, so that counts
    summed over ranks are exact."""
    return data if world == 1 else Subset(data, range(rank, len(data), world))


def eval_loader(data, batch_size, workers, rank=0, world=1):
    return DataLoader(shard(data, rank, world), batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(0))
