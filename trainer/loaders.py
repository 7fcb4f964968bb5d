"""The run's data loaders: the training sampler of a --train_rule, the device loader or torchvision's
DataLoader with its workers, the evaluation slices of each rank, and the per-epoch seeding and skipping that
make an epoch's data order a function of (seed, epoch) only.

Separate from the run loop because pretrain_moco.py, imagenet_inat/ and ltssl/ set up their epochs with the
same `begin_epoch` and worker counts.
"""
import torch
from torch.utils.data import DataLoader, Subset

import dist
from dataset import DATASETS
from dataset.device_loader import DeviceLoader, eval_batch_size
from dataset.samplers import DeferredSampler, ImbalancedDatasetSampler, ShuffleSampler
from dataset.step_seeds import StepNumbered, StepSeeded
from errors import UserError
from schedules import TRAIN_RULES
from trainer.stop import console
from utils import derive_seed


def loader_seed(seed, epoch, rank):
    """Seed of an epoch's loader generator (worker seeds, hence augmentations): a function of
    (seed, epoch) for exact resume, and of the rank, so ranks do not crop and flip their shards alike."""
    return derive_seed(seed, epoch, rank)


def begin_epoch(sampler, loader, seed, epoch, rank, first_step=0):
    """Set up an epoch's data: the sampler's order for `epoch`, the loader's worker seeds (the device
    loader seeds every step itself), and the `first_step` batches a mid-epoch resume already did
    skipped, so a resumed epoch goes on exactly as the interrupted one would have."""
    sampler.set_epoch(epoch)
    if isinstance(loader, DataLoader):
        loader.generator.manual_seed(loader_seed(seed, epoch, rank))
    # a batch sampler (the loader's batch_size is then None) skips whole batches
    sampler.skip(first_step * (loader.batch_size or 1))


def uses_device_loader(args, info=None):
    """--loader device for images held in an array (`info`, default the registry's of --dataset; images
    streamed from their files stay per image), unless --autoaugment asks for per-image host work (PIL
    operations): then the classic loader, with a notice."""
    info = info or DATASETS.get(args.dataset)
    if args.loader != 'device' or info is None or info.transform is not None:
        return False
    if args.autoaugment:
        console(f"=> --autoaugment transforms each image on the host: using --loader torchvision "
                f"(-j {loader_workers(args, info)} workers) instead of the device loader")
        return False
    return True


def loader_workers(args, info):
    """-j, else its default: the original's 4 for images held in memory (`info` of a registered data set),
    and for images read from their files (ImageNet / iNaturalist split files, a streamed folder), whose
    decoding feeds a GPU too slowly with 4, at least one per CPU core of this process (dist.loader_workers)."""
    if args.workers is not None:
        return args.workers
    return dist.loader_workers(4) if info is None or info.transform is not None else 4


def _loaders(args, exp, seed, rank, world, device):
    if args.batch_size % world and not args.evaluate:  # -b 128 on 3 ranks would train 3 x 42 = 126
        raise UserError(f"-b {args.batch_size} is the batch of all {world} processes and must divide evenly over "
                        f"them (as in pretrain_moco.py), e.g. -b {args.batch_size - args.batch_size % world or world}")
    if exp.train_loader is not None:  # its own order: the loader is its sampler
        train_loader = exp.train_loader(seed, rank, world, device)
        return train_loader, train_loader, _val_loader(args, exp, seed, rank, world, device, args.loader == 'device')
    per_rank_batch = max(1, args.batch_size // world)
    if exp.sampler is not None:
        sampler = exp.sampler(seed, world, rank)
    else:
        sampler = ShuffleSampler(len(exp.train_set), shuffle=True, seed=seed, num_replicas=world, rank=rank)
        resample_from = TRAIN_RULES[args.train_rule].resample(args.lr_steps[0])
        if resample_from is not None:
            balanced = ImbalancedDatasetSampler(exp.train_set, seed=seed, num_replicas=world, rank=rank)
            sampler = balanced if resample_from == 0 else DeferredSampler(sampler, balanced, resample_from)
    info = exp.info or DATASETS.get(args.dataset)
    if uses_device_loader(args, info):
        # Crops, flips and Cutout drawn per step from (seed, epoch, step, rank): exact resume needs no
        # generator here.
        train_loader = DeviceLoader.from_dataset(exp.train_set, sampler, per_rank_batch, device, info, train=True,
                                                 flip=info.flip, cutout=args.cutout, seed=seed, rank=rank,
                                                 channels_last=args.channels_last)
        return train_loader, sampler, _val_loader(args, exp, seed, rank, world, device, True)
    pin = device.type == 'cuda'  # a copy from unpinned memory makes the host wait for it
    # Own generators: the loaders draw their worker seeds from these, not from the global RNG,
    # so the global stream (augmentations with -j 0, rotations) is the same whether or not a run
    # was resumed mid-epoch. `run` re-seeds the training one per epoch; the workers re-seed per step
    # (dataset.step_seeds), so a resumed epoch's augmentations are the uninterrupted one's with -j N too.
    workers = loader_workers(args, info)
    train_loader = DataLoader(StepSeeded(exp.train_set), batch_size=per_rank_batch,
                              sampler=StepNumbered(sampler, per_rank_batch), num_workers=workers, pin_memory=pin,
                              drop_last=False, generator=torch.Generator())
    return train_loader, sampler, _val_loader(args, exp, seed, rank, world, device, False)


def _val_loader(args, exp, seed, rank, world, device, on_device):
    """The evaluation loader (`on_device`: a DeviceLoader): every rank evaluates a disjoint slice, without padding,
    so summed counts are exact."""
    if on_device:
        return DeviceLoader.from_dataset(exp.val_set, range(rank, len(exp.val_set), world), eval_batch_size(device),
                                         device, exp.info or DATASETS.get(args.dataset), train=False,
                                         channels_last=args.channels_last)
    val_set = exp.val_set if world == 1 else Subset(exp.val_set, range(rank, len(exp.val_set), world))
    return DataLoader(val_set, batch_size=100, shuffle=False,
                      num_workers=loader_workers(args, exp.info or DATASETS.get(args.dataset)),
                      pin_memory=device.type == 'cuda', generator=torch.Generator().manual_seed(seed))
