"""Self-supervised pre-training with MoCo (He et al. 2020; MoCo v2 defaults of Chen et al. 2020).

    python pretrain_moco.py --dataset imagenet --data <ImageNet root>   # the paper's command: one process per GPU
    torchrun --nproc_per_node 8 pretrain_moco.py --dataset inat --data <iNat root>  # the same with torchrun
    python pretrain_moco.py --dataset imagenet --data <root> --world-size 2 --rank 0 \\
        --dist-url tcp://<node 0>:10001                                       # node 0 of 2, MoCo's own launcher
    python pretrain_moco.py --dataset cifar10 --data ./data --imb_factor 0.01 --moco-k 4096
    python pretrain_moco.py --dataset digits --epochs 20 --moco-k 256 -b 64 -j 0      # offline, CPU
    python pretrain_moco.py --dataset folder --data <ROOT with train/<class>/>                  # own images

Writes <root_path>/<dataset>/checkpoint/moco_ckpt_XXXX.pth.tar (XXXX = epochs done; a user's folder ROOT:
<root_path>/folder-<ROOT's name>/checkpoint/) every --save-freq epochs and after the last one. The same
command again resumes an unfinished run of the same flags there (--overwrite starts over). Fine-tune with
`python train.py --dataset cifar10 --pretrained_model data/cifar10/checkpoint/moco_ckpt_0200.pth.tar`.
-b is the batch of all GPUs of one node, as in MoCo. --mlp, --aug-plus and --cos default to on
(the original script's defaults; MoCo v2); `--mlp false` etc. turn them off.
"""
import contextlib
import datetime
import functools
import math
import os
import shutil
import signal
from dataclasses import dataclass
from typing import Callable

import torch
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import DataLoader

import cli
import dist
import rerun
import signals
import trainer
from checkpoint import (load_checkpoint, load_optimizer, load_weights, save_checkpoint, state_dict_of,
                        strip_prefix, unwrap)
from dataset import resolve_dataset
from dataset.folder import MAX_SIDE, check_model
from dataset.moco_augment import AUGMENTATIONS, TwoCropsTransform
from dataset.samplers import ShuffleSampler
from dataset.splitfile import SplitFileDataset
from dataset.step_seeds import StepNumbered, StepSeeded
from dataset.statistics import IMAGENET_MEAN, IMAGENET_STD, INAT_MEAN, INAT_STD
from engine import train_one_epoch
from errors import UserError
from models import MODELS, build_model
from moco.builder import MoCo


@dataclass(frozen=True)
class PretrainData:
    arch: str            # default -a
    crop_size: int       # default --crop-size
    split_file: str      # default --split_file ('' where the data set has none)
    build: Callable      # (args) -> training set yielding ([query view, key view], label)


def _split_file_data(split_file, mean, std):
    """ImageNet-LT / iNaturalist 2018: images listed in a split file, MoCo v1 or v2 augmentation."""
    def build(args):
        augmentation = AUGMENTATIONS['v2' if args.aug_plus else 'v1'](args.crop_size, mean, std)
        return SplitFileDataset(args.data, args.split_file, TwoCropsTransform(augmentation))
    return PretrainData('resnet50', 224, split_file, build)


def _long_tailed_data(name, crop_size=32):
    """CIFAR-10/100-LT, digits-LT, a user's folder: the long-tailed training split of dataset.DATASETS (labels
    unused) with the 32x32 recipe; a folder's images above 64 px stream from their files with MoCo's ImageNet
    augmentation (v2, or v1 with `--aug-plus false`) at --image_size, as imagenet/inat's at 224 px.
    `crop_size` None: the folder's image side."""
    def build(args):
        info = resolve_dataset(name, args.data, args.image_size, cache_dir=args.cache_dir, flip=args.flip)
        check_model(info, args.arch)
        args.crop_size = args.crop_size or info.image_size
        recipe = 'cifar' if info.transform is None else 'v2' if args.aug_plus else 'v1'
        augmentation = AUGMENTATIONS[recipe](args.crop_size, info.mean, info.std, flip=info.flip)
        return info.build_train(args.data, args.imb_type, args.imb_factor, args.rand_number,
                                TwoCropsTransform(augmentation), download=args.download)
    return PretrainData('resnet32', crop_size, '', build)


# Split files where the original pretrain_moco.py reads them (relative to the working directory).
PRETRAIN_DATA = {
    'imagenet': _split_file_data('imagenet_inat/data/ImageNet_LT/ImageNet_LT_train.txt', IMAGENET_MEAN, IMAGENET_STD),
    'inat': _split_file_data('imagenet_inat/data/iNaturalist18/iNaturalist18_train.txt', INAT_MEAN, INAT_STD),
    'cifar10': _long_tailed_data('cifar10'),
    'cifar100': _long_tailed_data('cifar100'),
    'digits': _long_tailed_data('digits'),
    'folder': _long_tailed_data('folder', crop_size=None),  # the user's train/ (dataset/folder.py)
}


def build_parser():
    parser = cli.ArgumentParser(description=__doc__)
    g = cli.group(parser, cli.DATA)
    g.add_argument('--dataset', default='imagenet', choices=list(PRETRAIN_DATA))
    g.add_argument('--data', '--data_path', dest='data', metavar='DIR', default='./data',
                   help='image root of the split file (imagenet, inat), folder of the CIFAR files, or a '
                        'user\'s image folder ROOT holding train/<class>/ (folder)')
    cli.add_image_size_arg(g)
    cli.add_cache_dir_arg(g)
    cli.add_download_arg(g)  # cifar10/cifar100 only: ImageNet-LT and iNaturalist are never downloaded
    g.add_argument('--split_file', default=None, metavar='TXT',
                   help="'<path relative to --data> <label>' per line (default: the original's "
                        "imagenet_inat/data/ImageNet_LT/ImageNet_LT_train.txt or "
                        "imagenet_inat/data/iNaturalist18/iNaturalist18_train.txt)")
    cli.add_imbalance_args(g, 'the long-tailed subset (cifar*, digits, folder)')
    cli.add_flip_arg(g)
    parser.finish(cli.default_imb_factor)

    g = cli.group(parser, cli.METHOD)
    g.add_argument('-a', '--arch', metavar='ARCH', default=None, choices=list(MODELS),
                   help='model architecture: ' + ' | '.join(MODELS) +
                        ' (default: resnet50 for imagenet/inat, resnet32 for cifar*/digits/folder)')
    g.add_argument('--crop-size', default=None, type=cli.positive_int, metavar='PX',
                   help='side of the random crops (default: 224 for imagenet/inat, 32 for cifar*/digits, the '
                        'image side for folder)')
    g.add_argument('--moco-dim', default=128, type=cli.positive_int, help='feature dimension (default: 128)')
    g.add_argument('--moco-k', default=65536, type=cli.positive_int,
                   help='queue size; number of negative keys (default: 65536)')
    g.add_argument('--moco-m', default=0.999, type=cli.probability,
                   help='moco momentum of updating key encoder (default: 0.999)')
    g.add_argument('--moco-t', default=0.2, type=cli.positive_float,
                   help='softmax temperature (default: 0.2, MoCo v2; MoCo v1 used 0.07)')
    cli.add_switch(g, '--mlp', True, 'MoCo v2 MLP projection head')
    cli.add_switch(g, '--aug-plus', True, 'MoCo v2 data augmentation (imagenet/inat)')

    g = cli.group(parser, cli.SCHEDULE)
    g.add_argument('--epochs', default=200, type=cli.positive_int, metavar='N', help='number of total epochs to run')
    g.add_argument('--start-epoch', default=0, type=cli.nonneg_int, metavar='N',
                   help='manual epoch number (useful on restarts; --resume sets it)')
    g.add_argument('-b', '--batch-size', default=128, type=cli.positive_int, metavar='N',
                   help='total batch size over all processes (default: 128)')
    g.add_argument('--lr', '--learning-rate', default=0.015, type=cli.positive_float, metavar='LR', dest='lr')
    cli.add_switch(g, '--cos', True, 'cosine lr schedule instead of --schedule')
    g.add_argument('--schedule', default=[120, 160], nargs='*', type=cli.positive_int, metavar='EPOCH',
                   help='without --cos: lr x0.1 from each of these epochs on (default: 120 160)')
    g.add_argument('--momentum', default=0.9, type=cli.nonneg_float, metavar='M', help='momentum of SGD solver')
    g.add_argument('--wd', '--weight-decay', default=1e-4, type=cli.nonneg_float, metavar='W', dest='weight_decay')

    g = cli.group(parser, cli.RUN)
    g.add_argument('--root_path', type=str, default='./data', metavar='DIR',
                   help='checkpoints go to DIR/<dataset>/checkpoint/ (a folder: DIR/folder-<its name>/checkpoint/)')
    g.add_argument('--resume', default='', type=str, metavar='PATH', help='moco_ckpt_XXXX.pth.tar to continue')
    cli.add_overwrite_arg(g, 'checkpoint folder')
    g.add_argument('--seed', default=None, type=int, help='seed for initializing training')
    g.add_argument('-p', '--print-freq', default=10, type=cli.positive_int, metavar='N',
                   help='print every N steps (default: 10)')
    g.add_argument('--save-freq', default=10, type=cli.positive_int, metavar='N',
                   help='save a checkpoint every N epochs, and after the last one (default: 10)')
    g.add_argument('--gpu', default=None, type=cli.nonneg_int, help='GPU id of a single-process run')

    cli.add_step_speed_args(parser)
    cli.group(parser, cli.SPEED).add_argument(
        '-j', '--workers', default=None, type=cli.nonneg_int, metavar='N',
        help='data loading workers per node, shared by its processes (default: 32, or the CPU cores '
             'this process may use less one where there are more; docs/gpu.md)')

    g = cli.group(parser, cli.DISTRIBUTED)
    g.description = "torchrun sets RANK / WORLD_SIZE itself; these are MoCo's own"
    g.add_argument('--world-size', default=1, type=cli.positive_int,
                   help='number of nodes with --multiprocessing-distributed, else number of processes '
                        '(default: 1)')
    g.add_argument('--rank', default=0, type=cli.nonneg_int,
                   help='node rank with --multiprocessing-distributed, else process rank (default: 0)')
    g.add_argument('--dist-url', default='tcp://localhost:10001', type=str,
                   help='url used to set up distributed training (default: tcp://localhost:10001)')
    g.add_argument('--dist-backend', default='nccl', type=str,
                   help='distributed backend (gloo on CPU-only machines)')
    g.add_argument('--dist-timeout', default=dist.DEFAULT_TIMEOUT.total_seconds(), type=cli.positive_float,
                   metavar='SEC', help='give up joining the group, or waiting for a peer, after this long '
                                       f'(default: {dist.DEFAULT_TIMEOUT.total_seconds():.0f})')
    cli.add_switch(g, '--multiprocessing-distributed', True,
                   "spawn one process per visible GPU of this node, with --world-size nodes and this node's --rank, "
                   "as the original; no effect without GPUs or under torchrun; 'False' turns it off")
    return parser


def resolve_args(args):
    """Fill the per-data-set defaults and refuse what cannot run, before any process starts."""
    data = PRETRAIN_DATA[args.dataset]
    args.arch = args.arch or data.arch
    args.crop_size = args.crop_size or data.crop_size
    if args.split_file is not None and not data.split_file:
        raise UserError(f"--split_file does not apply to --dataset {args.dataset}, which is read from --data")
    args.split_file = args.split_file or data.split_file
    return args


def lr_at(epoch, args):
    """Learning rate of 0-based `epoch`: half-cosine from --lr to 0 (--cos), else x0.1 per milestone."""
    if args.cos:
        return args.lr * 0.5 * (1. + math.cos(math.pi * epoch / args.epochs))
    return args.lr * 0.1 ** sum(epoch >= milestone for milestone in args.schedule)


def checkpoint_path(args, epoch):
    """<root_path>/<dataset>/checkpoint/moco_ckpt_<epoch>.pth.tar, as the original; a user's folder ROOT:
    <root_path>/folder-<ROOT's name>/..., so that two folders never share one."""
    return os.path.join(args.root_path, cli.data_name(args.dataset, args.data), 'checkpoint',
                        f'moco_ckpt_{epoch:04d}.pth.tar')


INTERRUPTED = 'moco_ckpt_interrupted.pth.tar'  # a mid-epoch checkpoint, written by a stop


def furthest_checkpoint(folder):
    """(path, checkpoint) of the furthest of `folder`'s checkpoints by (epoch, step): the highest numbered one
    (at an epoch end) or the interrupted one, whichever is further; (None, None) if there is none."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    numbered = sorted(n for n in names if n.startswith('moco_ckpt_') and n[10:14].isdigit())
    candidates = [os.path.join(folder, n) for n in numbered[-1:] + ([INTERRUPTED] if INTERRUPTED in names else [])]
    found = [(path, load_checkpoint(path)) for path in candidates]
    if not found:
        return None, None
    return max(found, key=lambda f: (int(f[1].get('epoch', 0)), int(f[1].get('step', 0))))


def run_flags(args):
    folder = {'data_folder': os.path.abspath(args.data)} if args.dataset == 'folder' else {}
    return rerun.run_flags(args, **folder)


def previous_run(args, main_process, log):
    """--resume, or the furthest checkpoint of an unfinished run of the same flags in the checkpoint folder,
    which the same command run again continues (rerun.py); with --overwrite rank 0 removes that folder's
    checkpoints and the run starts anew."""
    folder = os.path.dirname(checkpoint_path(args, 0))
    if args.resume and args.overwrite:
        raise UserError("--overwrite starts a new run; --resume continues one: pass one of them")
    if args.resume:
        return args.resume
    if args.overwrite:
        old = [n for n in (os.listdir(folder) if os.path.isdir(folder) else []) if n.startswith('moco_ckpt_')]
        if main_process and old:
            log(f"=> --overwrite: removing the earlier run's checkpoints from {folder}")
            for name in old:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
        return ''
    path, ckpt = furthest_checkpoint(folder)
    if path is None:
        return ''
    epoch, step = int(ckpt.get('epoch', 0)), int(ckpt.get('step', 0))
    recorded = ckpt.get('flags') if isinstance(ckpt.get('flags'), dict) else None
    resume_from = rerun.resume_or_refuse(path, recorded, run_flags(args), epoch, step, args.epochs, folder,
                                         '--root_path DIR', False)
    log(rerun.resume_notice(folder, epoch, step, args.epochs, resume_from))
    return resume_from


@dataclass(frozen=True)
class Layout:
    spawn: int           # processes main() starts on this node (0: run in this process)
    world_size: int      # processes over all nodes
    per_process_batch: int
    how: str             # one line for the log


def launch_layout(num_gpus, torchrun_env, multiprocessing_distributed, nodes, batch_size):
    """How the original's launch maps onto this machine (a pure function, so it can be tested).

    The original always spawned one process per visible GPU (`--multiprocessing-distributed`, on by
    default), with world size GPUs x --world-size nodes, and split -b over the GPUs of a node. Here
    too; torchrun's processes are taken as they come (-b split over the processes of a node,
    LOCAL_WORLD_SIZE); without GPUs, or with the flag off, this process trains alone, or as process
    --rank of --world-size started by hand.
    """
    if torchrun_env is not None:
        world_size, per_node = torchrun_env
        return Layout(0, world_size, batch_size // per_node,
                      f"{world_size} processes started by torchrun, {per_node} per node")
    if multiprocessing_distributed and num_gpus > 0:
        return Layout(num_gpus if num_gpus * nodes > 1 else 0, num_gpus * nodes, batch_size // num_gpus,
                      f"one process per GPU: {num_gpus} on each of {nodes} node(s)")
    return Layout(0, nodes, batch_size, f"{nodes} process(es) started by hand (--world-size)" if nodes > 1
                  else "one process")


def main(argv=None):
    args = resolve_args(build_parser().parse_args(argv))
    torchrun_env = ((int(os.environ['WORLD_SIZE']), int(os.environ.get('LOCAL_WORLD_SIZE', os.environ['WORLD_SIZE'])))
                    if dist.launched_by_torchrun() else None)
    num_gpus = dist.visible_gpus()
    layout = launch_layout(num_gpus, torchrun_env, args.multiprocessing_distributed, args.world_size,
                           args.batch_size)
    check_layout(args, layout)
    if os.environ.get('RANK', '0') == '0':  # under torchrun every process gets here
        print(f"=> {layout.how}; {layout.per_process_batch} images per process and step, "
              f"{layout.per_process_batch * layout.world_size} in all", flush=True)
    if layout.spawn:
        return spawn_per_gpu(args, layout)
    if torchrun_env is not None:
        return worker(args, layout, int(os.environ['RANK']), 'env://')
    return worker(args, layout, args.rank if layout.world_size > 1 else 0, args.dist_url)


def check_layout(args, layout):
    """Refuse, before any process starts, what the layout cannot run."""
    if dist.launched_by_torchrun():
        procs_per_node = int(os.environ.get('LOCAL_WORLD_SIZE', os.environ['WORLD_SIZE']))
    else:
        procs_per_node = max(layout.spawn, 1) if layout.world_size > 1 else 1
    if args.batch_size % procs_per_node or layout.per_process_batch == 0:
        raise UserError(f"-b {args.batch_size} is the batch of one node and must divide evenly over its "
                        f"{procs_per_node} processes")
    total = layout.per_process_batch * layout.world_size
    if args.moco_k % total:
        raise UserError(f"--moco-k {args.moco_k} must be a multiple of the batch of one step over all processes "
                        f"({total}), so that every step replaces whole blocks of the queue")
    if not layout.spawn and layout.world_size > 1 and not dist.launched_by_torchrun() \
            and not args.rank < layout.world_size:
        raise UserError(f"--world-size {args.world_size} needs this process's --rank, "
                        f"0 to {args.world_size - 1} (got {args.rank})")
    if layout.world_size > 1 and args.gpu is not None:
        raise UserError("--gpu picks the GPU of a single-process run; in a distributed run process i "
                        "uses GPU LOCAL_RANK (torchrun) or i (--multiprocessing-distributed)")


def spawn_per_gpu(args, layout):
    """MoCo's launcher: one process per GPU of this node; --world-size nodes, this is node --rank.

    A SIGTERM, SIGINT or SIGUSR1 must leave the interrupted checkpoint whether it reaches the whole process
    group (SLURM scancel, preemption, Ctrl-C), this process alone or the workers alone. So this process does
    not die of the first one (its death would send each worker SIGINT, spawn's parent-death signal: a
    second signal, which stops at once): it forwards signals.FORWARDED_STOP, which the workers take as
    a stop request unless a signal reached them already, and waits. The same signal again within a
    moment (the group's and a parent's forwarded copy, as under reproduce.py) is that request again, as
    is a SIGUSR1 after it; a later SIGTERM or SIGINT ends all at once. A worker stopped by a signal exits 0 and leaves its exit status in
    `codes`, since spawn answers a non-zero exit by terminating the other workers, perhaps while rank 0
    writes the checkpoint.
    """
    if args.rank >= args.world_size:
        raise UserError(f"--rank {args.rank} is not a node of --world-size {args.world_size}")
    if args.dataset == 'folder' and not (args.image_size or 0) > MAX_SIDE:
        # Decoded and cached here, once: the workers read the cache (memory-mapped), as torchrun's ranks
        # read rank 0's, instead of each decoding the folder, and racing to replace a stale cache.
        resolve_dataset('folder', args.data, args.image_size, cache_dir=args.cache_dir)
    codes = mp.get_context('spawn').Array('i', layout.spawn)
    context = mp.spawn(_spawned_worker, nprocs=layout.spawn, args=(layout, args, codes), join=False)
    asked, repeats = [], signals.Repeats()

    def forward(signum, frame):
        if repeats.repeat(signum) or (asked and signum == signals.FORWARDED_STOP):
            return  # a copy of the request, or a forwarded one after it: nothing new asked
        for pid in context.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL if asked else signals.FORWARDED_STOP)
        if asked:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        asked.append(signum)

    previous = {s: signal.signal(s, forward) for s in signals.STOP_SIGNALS}
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as e:
        return e.exit_code  # the worker printed its own `error:` line
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return max(codes)


def _spawned_worker(gpu, layout, args, codes):
    os.environ['LOCAL_RANK'], os.environ['LOCAL_WORLD_SIZE'] = str(gpu), str(layout.spawn)

    def run(_):
        code = worker(args, layout, args.rank * layout.spawn + gpu, args.dist_url)
        codes[gpu] = code  # 128 + signal after a stop that saved its checkpoint: see spawn_per_gpu
        return 0

    cli.run_main(run)


def worker(args, layout, rank, init_method):
    """One training process; world size 1 runs without torch.distributed."""
    main_process = rank == 0

    def log(line, console=None):
        if main_process:
            print(console or line, flush=True)

    trainer.seed(args)  # the seed and the cuDNN policy, as every script

    # Data first: a wrong path ends the run before it waits for any peer.
    train_set = PRETRAIN_DATA[args.dataset].build(args)
    log(f"===> Training data length {len(train_set)}")
    args.resume = previous_run(args, main_process, log)
    created = None
    if main_process:
        folder = os.path.dirname(checkpoint_path(args, 0))
        created = topmost_missing(folder)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create folder {folder}: {e.strerror}") from None

    try:
        ctx = dist.setup(args.gpu, rank, layout.world_size, init_method,
                         datetime.timedelta(seconds=args.dist_timeout), backend=args.dist_backend)
        try:
            return _train(args, train_set, ctx, layout.per_process_batch, log)
        finally:
            dist.cleanup()
    except UserError:
        # A refused run (a --resume that does not fit, too few images) leaves no empty folder behind.
        if created and not any(files for _, _, files in os.walk(created)):
            shutil.rmtree(created, ignore_errors=True)
        raise


def topmost_missing(folder):
    """The outermost folder that os.makedirs(folder) would create, or None if `folder` exists."""
    missing, path = None, os.path.abspath(folder)
    while not os.path.isdir(path):
        missing, path = path, os.path.dirname(path)
    return missing


def _train(args, train_set, ctx, per_process_batch, log):
    device, rank, world_size = ctx.device, ctx.rank, ctx.world_size
    log(f"=> creating model '{args.arch}'")
    model = MoCo(functools.partial(build_model, args.arch), args.moco_dim, args.moco_k, args.moco_m,
                 args.moco_t, args.mlp).to(device, memory_format=torch.channels_last if args.channels_last
                                           else torch.preserve_format)
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)

    ckpt, start_epoch, start_step = None, args.start_epoch, 0
    if args.resume:
        ckpt = resume(args, model, optimizer)
        start_epoch, start_step = int(ckpt.get('epoch', 0)), int(ckpt.get('step', 0))
        trainer.check_resume_layout(ckpt, args.resume, world_size)
        log(f"=> loaded checkpoint '{args.resume}' ({rerun.progress(start_epoch, start_step, args.epochs)})")
    hooks = trainer.training_hooks(args, device, ckpt, log)
    if world_size > 1:
        model = wrap_ddp(model, device)

    # As in trainer/: the data order is a function of (seed, epoch), the loader draws its worker seeds
    # from its own generator and the workers re-seed per step (dataset.step_seeds), so a run resumed
    # from a checkpoint, even mid-epoch, replays what it would have done.
    seed = trainer.run_seed(args, ckpt)
    sampler = ShuffleSampler(len(train_set), shuffle=True, seed=seed, num_replicas=world_size, rank=rank)
    loader = DataLoader(StepSeeded(train_set), batch_size=per_process_batch,
                        sampler=StepNumbered(sampler, per_process_batch), num_workers=loader_workers(args),
                        pin_memory=device.type == 'cuda', drop_last=True, generator=torch.Generator())
    if len(loader) == 0:
        raise UserError(f"the training set has {len(train_set)} images, fewer than one step's "
                        f"{per_process_batch * world_size}")
    trainer.restore_rng(ckpt, seed, rank, world_size)

    flags = run_flags(args)

    def save(path, epoch, step, meters=None):
        """Collective (the RNG states of all ranks are gathered): every rank calls it, rank 0 writes. `meters`:
        a mid-epoch checkpoint's step meters (train_one_epoch's), so the resumed epoch's running averages go on."""
        state = {
            'epoch': epoch, 'arch': args.arch,
            # `module.` as in the DDP-saved files of the original, whatever the world size
            'state_dict': {'module.' + k: v for k, v in unwrap(model).state_dict().items()},
            'optimizer': optimizer.state_dict(),
            'step': step, 'seed': seed, **trainer.step_meters_entry(step, meters),
            **trainer.resume_entries(world_size, hooks['amp']), 'script': 'pretrain_moco',
            'task': 'moco', 'flags': flags,
        }
        dist.on_rank0(save_checkpoint, state, path)
        log(f"=> saved {path}")

    if start_epoch >= args.epochs:
        log(f"=> nothing to do: {start_epoch} of --epochs {args.epochs} are done")
    with trainer.GracefulStop(log) as stop:
        for epoch in range(start_epoch, args.epochs):
            step0 = start_step if epoch == start_epoch else 0
            trainer.begin_epoch(sampler, loader, seed, epoch, rank, step0)
            lr = lr_at(epoch, args)
            for group in optimizer.param_groups:
                group['lr'] = lr
            stats = train_one_epoch(model, criterion, loader, optimizer, device, epoch, epochs=args.epochs,
                                    forward=moco_forward,
                                    print_freq=args.print_freq, log=log, should_stop=stop, start_step=step0,
                                    num_steps=step0 + len(loader),
                                    start_meters=trainer.resumed_meters(ckpt, step0), **hooks)
            done = epoch + 1
            if stats['stopped']:
                path = os.path.join(os.path.dirname(checkpoint_path(args, 0)), INTERRUPTED)
                save(path, epoch, stats['steps'], stats['meters'])
                log(trainer.stop_notice(stop, epoch, path, stats['steps'], args.epochs))
                return 128 + stop.signum
            # stop() is collective: every rank asks it once per epoch end, before deciding to save.
            stopping = stop()
            if done % args.save_freq == 0 or done == args.epochs or stopping:
                save(checkpoint_path(args, done), done, 0)
            if stopping:
                log(trainer.stop_notice(stop, epoch, checkpoint_path(args, done), epochs=args.epochs))
                return 128 + stop.signum
    return 0


def wrap_ddp(model, device):
    """DDP with rank 0's buffers broadcast once, when it wraps the model, instead of before every forward (the
    original's default: the 64k-key queue, 32 MB for ResNet-50's 128-d keys, and every BatchNorm statistic, each
    step). Rank 0's state, the one saved, is the same to the bit: the broadcast only copies rank 0's buffers to the
    others (the queue each rank drew: without --seed, another one per rank); the queue and its pointer then stay
    equal on every rank (the same all-gathered keys go in); and the other ranks' running statistics, which drift,
    are never read (both encoders normalise by batch statistics in training, and only rank 0's are saved).
    Collective. tests/test_moco.py checks all three. `forward_sync_buffers=False` (torch 2.13 and later) keeps
    DDP's start-up broadcast of the buffers, which the deprecated `broadcast_buffers=False` also turned off."""
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None,
                                               forward_sync_buffers=False)


def loader_workers(args):
    """This process's loader workers: -j is the node's (the original divided it over its GPUs), by default
    32 or more where the cores allow (dist.loader_workers)."""
    if args.workers is None:
        return dist.loader_workers(32)
    return -(-args.workers // int(os.environ.get('LOCAL_WORLD_SIZE', 1)))


def resume(args, model, optimizer):
    """Load --resume (ours or the original's) into the bare MoCo module; returns the checkpoint."""
    ckpt = load_checkpoint(args.resume, flag='--resume')
    if ckpt.get('arch', args.arch) != args.arch:
        raise UserError(f"--resume {args.resume} holds a {ckpt['arch']} MoCo model, not -a {args.arch}")
    try:
        sd = strip_prefix(state_dict_of(ckpt), 'module.')
    except UserError as e:
        raise UserError(f"--resume {args.resume}: {e}") from None
    load_weights(model, sd, f"--resume {args.resume}")
    load_optimizer(optimizer, ckpt, args.resume)
    return ckpt


def moco_forward(model, views, _labels):
    """engine.train_one_epoch's step for MoCo: (1+K)-way logits, the positive key at index 0."""
    return model(im_q=views[0], im_k=views[1])


if __name__ == '__main__':
    cli.run_main(main)
