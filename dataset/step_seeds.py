"""Random augmentations in DataLoader workers drawn per step, so that a run resumed in the middle of an epoch
draws for its remaining steps what the uninterrupted run drew.

PyTorch seeds each loader worker once per epoch (from a base seed the loader's generator draws, which
trainer.begin_epoch seeds from (seed, epoch, rank)), and the worker draws every batch's crops, flips and colour
jitter from where its stream stands. Which batches a worker loads, and so what it drew before each, depends on
the step the epoch started at: a resumed epoch starts after the stop, so its remaining batches drew other
augmentations than the uninterrupted run's did. Here the first item of every step re-seeds the worker's torch,
random and NumPy streams from (base seed, step), which fixes each step's draws whatever worker loads it and
wherever the epoch started. With -j 0 (no worker) nothing is re-seeded: the main process's streams, saved in
the checkpoint, already continue exactly.

The loader's sampler yields (step, index) pairs (StepNumbered for a sampler of indices, StepNumberedBatches for a
sampler of batches) and its dataset is wrapped in StepSeeded, which takes them apart.
"""
from torch.utils.data import Dataset, Sampler, get_worker_info

from utils import derive_seed, seed_everything


class StepSeeded(Dataset):
    """`dataset` indexed by (step, index) pairs: in a loader worker, the first item of each step re-seeds the
    worker's torch, random and NumPy streams from (the worker's base seed, step)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self._step = None  # the step this worker last seeded for (each worker has its own copy)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        step, index = item
        worker = get_worker_info()
        if worker is not None and step != self._step:
            self._step = step
            # worker.seed is the epoch's base seed plus the worker's id; the base seed alone is the workers' common part
            seed_everything(derive_seed(worker.seed - worker.id, step) % 2 ** 32)
        return self.dataset[index]


class StepNumbered(Sampler):
    """The indices of `sampler` (a dataset.samplers.EpochSampler) as (step, index) for batches of `batch_size`,
    the steps counted from the epoch's start, also where a resume skipped the first ones."""

    def __init__(self, sampler, batch_size):
        self.sampler, self.batch_size = sampler, batch_size

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        for position, index in enumerate(self.sampler, self.sampler.skipped):
            yield position // self.batch_size, index


class StepNumberedBatches(Sampler):
    """The batches of `batches` (a sampler of index lists with a `skipped` count of steps) as lists of (step,
    index), the steps counted from the epoch's start."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for step, batch in enumerate(self.batches, self.batches.skipped):
            yield [(step, index) for index in batch]
