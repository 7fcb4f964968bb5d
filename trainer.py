"""The run loop behind train.py, train_semi.py, train_stage2.py and pretrain_rot.py.

A script builds an `Experiment` (model, data, class counts) and calls `run(args, experiment)`.
Everything else is here, once: device, optimizer, LR schedule, train rules (Resample / Reweight /
DRW), resume and pre-trained weights, the run folder with its logs and checkpoints, evaluation
reports, SIGTERM handling and exact resume.

Exact resume: checkpoints hold the RNG states and the sampler seed; the data order of an epoch is
a function of (seed, epoch) only, so a run resumed from the end of epoch k replays epoch k+1 the
way the uninterrupted run did.
"""
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import sys
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

import dist
import rerun
from checkpoint import (load_checkpoint, load_optimizer, load_pretrained, load_weights, read_weights,
                        save_checkpoint, unwrap)
from dataset import DATASETS, DatasetInfo
from dataset.device_loader import DeviceLoader, eval_batch_size
from dataset.folder import checked_against_checkpoint, checkpoint_entries
from dataset.samplers import ImbalancedDatasetSampler, ShuffleSampler
from engine import Mixup, evaluate, step_hooks, train_one_epoch
from errors import UserError
from fileio import RunLock, atomic_write_bytes, user_write_errors
from losses import PosthocLogitAdjustment, build_criterion, effective_num_weights
from signals import FORWARDED_STOP, STOP_SIGNALS, Repeats  # FORWARDED_STOP: also read as trainer's
from utils import derive_seed, figure_png, new_figure, rng_state, seed_everything, set_rng_state, shot_accuracy

WARMUP_EPOCHS = 5
BETA = 0.9999  # effective-number beta of Cui et al. 2019, as in LDAM-DRW


@dataclasses.dataclass
class Experiment:
    script: str                  # 'train', 'train_semi', 'pretrain_rot': recorded in checkpoints
    task: str                    # 'classification' or 'rotation': a resume must match it
    model: nn.Module
    train_set: object
    val_set: object
    num_classes: int
    cls_num_list: list           # training images per class: losses, samplers, shot groups
    batch_fn: Optional[Callable] = None        # (images, targets) -> (images, targets), training
    eval_batch_fn: Optional[Callable] = None   # the same for evaluation (defaults to batch_fn)
    info: Optional[DatasetInfo] = None         # the resolved data set (a folder's); None: DATASETS[args.dataset]
    # Stage 2 (train_stage2.py) sets these; the defaults are train.py's behaviour.
    criterion: Optional[nn.Module] = None      # a fixed training loss instead of --loss_type / --train_rule's
    sampler: Optional[Callable] = None         # (seed, num_replicas, rank) -> sampler, instead of --train_rule's
    schedule: Optional[Callable] = None        # 0-based epoch -> lr, instead of lr_at(epoch, --lr, --lr_steps)
    after_step: Optional[Callable] = None      # called after every optimizer step
    after_epoch: Optional[Callable] = None     # called after an epoch's last step, before its evaluation (MaxNorm)
    trains: bool = True                        # False: every epoch only evaluates and saves (tau-normalisation)
    notes: tuple = ()                          # lines for log_train.csv at the start of a run
    # A semi-supervised step (train_ssl.py, ltssl.method) sets these; None keeps the behaviour above.
    optimizer: Optional[Callable] = None       # model -> optimizer, instead of SGD(--lr, --momentum, --wd)
    step_fn: Optional[Callable] = None         # engine.train_one_epoch's step over the loader's batches
    step_lr: Optional[Callable] = None         # 0-based global step -> lr, set before every step
    train_loader: Optional[Callable] = None    # (seed, rank, world, device) -> loader with set_epoch / skip
    eval_model: Optional[nn.Module] = None     # what evaluations score (weight average, its head), not the model
    state: Optional[object] = None            # state_dict() -> checkpoint entries; load_state_dict(ckpt, source)
    logs: tuple = ()                           # more text logs of the run folder (cut back on resume like the others)
    epoch_lines: Optional[Callable] = None     # 0-based epoch -> {log: [lines]} after its evaluation (collective)

    def __post_init__(self):
        self.eval_batch_fn = self.eval_batch_fn or self.batch_fn


def cosine_at_epoch_start(epoch, base_lr, num_epochs, end_lr=0.0):
    """CosineAnnealingLR(T_max=num_epochs, eta_min=end_lr) stepped at the *start* of every epoch, as Kang et
    al.'s and Alshammari et al.'s code did: 1-based `epoch` e trains at end_lr + (lr - end_lr)(1 + cos(pi e / E)) / 2
    (end_lr at the last epoch)."""
    return end_lr + (base_lr - end_lr) * (1 + math.cos(math.pi * epoch / num_epochs)) / 2


def lr_at(epoch, base_lr, lr_steps=(160, 180)):
    """LDAM-DRW's schedule for 0-based `epoch`: 5 warm-up epochs, then x0.01 and x0.0001 steps."""
    e = epoch + 1
    if e <= WARMUP_EPOCHS:
        return base_lr * e / WARMUP_EPOCHS
    if e > lr_steps[1]:
        return base_lr * 1e-4
    if e > lr_steps[0]:
        return base_lr * 1e-2
    return base_lr


def cosine_lr_at(epoch, base_lr, epochs):
    """--lr_schedule cosine for 0-based `epoch`: lr_at's 5 warm-up epochs, then per epoch
    base_lr * (1 + cos(pi * (e - 5) / (epochs - 5))) / 2 for 1-based e, down to 0 in the last epoch.
    The cosine phase is BALMS's CIFAR-LT schedule (BalancedMetaSoftmax-Classification, utils.py
    CosineAnnealingLRWarmup, stepped at the start of each 1-based epoch in run_networks.py), which
    also trains its last epoch at lr 0; its warm-up (from base_lr to warmup_lr) is replaced by ours."""
    e = epoch + 1
    if e <= WARMUP_EPOCHS:
        return lr_at(epoch, base_lr)
    return cosine_at_epoch_start(e - WARMUP_EPOCHS, base_lr, epochs - WARMUP_EPOCHS)


# --lr_schedule NAME -> (0-based epoch, args) -> the learning rate of that epoch.
LR_SCHEDULES = {
    'step': lambda epoch, args: lr_at(epoch, args.lr, args.lr_steps),
    'cosine': lambda epoch, args: cosine_lr_at(epoch, args.lr, args.epochs),
    # weight balancing's stage 1 (Alshammari et al.'s demo1 / utils/trainval.py): CosineAnnealingLR stepped at
    # each epoch's start, no warm-up
    'cosine_nowarmup': lambda epoch, args: cosine_at_epoch_start(epoch + 1, args.lr, args.epochs),
}


@dataclasses.dataclass
class TrainRule:
    resample: bool
    weights: Callable            # (epoch, cls_num_list, drw_epoch) -> per-class weights or None


TRAIN_RULES = {
    'None': TrainRule(False, lambda epoch, cls, drw: None),
    'Resample': TrainRule(True, lambda epoch, cls, drw: None),
    'Reweight': TrainRule(False, lambda epoch, cls, drw: effective_num_weights(cls, BETA)),
    # Deferred re-weighting (Cao et al. 2019): plain (beta=0 -> all ones) until the first LR step.
    'DRW': TrainRule(False, lambda epoch, cls, drw: effective_num_weights(cls, BETA if epoch >= drw else 0.0)),
}


def console(line):
    """Rank 0's console alone: for notices (GracefulStop's) that a resumed run's logs must not show."""
    if dist.is_main_process():
        print(line, flush=True)


class GracefulStop:
    """First SIGTERM/SIGINT: finish the step, save, exit. Second: stop at once. FORWARDED_STOP (from
    MoCo's per-GPU launcher, or SLURM's --signal=USR1) asks like a SIGTERM if nothing asked yet, and
    the one SIGTERM/SIGINT that may follow it (the same request, sent to the whole group) is not a second.
    Nor is the same signal again within a moment (signals.Repeats): a group signal and a launcher's copy."""

    SIGNALS = STOP_SIGNALS

    def __init__(self, log):
        self.log = log  # for the notice only: a console, not a run log (a resumed run's logs must not show it)
        self.signum = None
        self._forwarded = False
        self._repeats = Repeats()
        self._previous = {}
        self._pid = os.getpid()

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            # A data-loading worker forked during the run inherits this handler, and Ctrl-C signals
            # the whole process group: only the process that trains decides when to stop.
            return
        if self._repeats.repeat(signum):
            return
        if signum == FORWARDED_STOP:
            if self.signum is not None:
                return
            self._forwarded, signum = True, signal.SIGTERM
        elif self._forwarded:
            # The launcher's forward may overtake the group's own SIGTERM: that one asks nothing new.
            self._forwarded = False
            return
        elif self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        self.log(f"=> received {signal.Signals(signum).name}: finishing this step, then saving a resumable "
                 f"checkpoint (send it again to stop at once)")

    def __call__(self, sync=True):
        """Whether to stop now. `sync` marks a point every rank reaches together (a print point, an
        epoch end): only there does a distributed run agree, with one collective, whether a signal
        reached any rank, so all ranks stop after the same step. A single process checks every time."""
        if not dist.is_dist():
            return self.signum is not None
        if not sync:
            return False
        agreed = dist.max_over_ranks(self.signum or 0)
        # Not `self.signum = max_over_ranks(...)`: a signal handled during the collective would be
        # overwritten by the value read before it, and lost. One that came too late for this
        # agreement stays pending for the next.
        if agreed:
            self.signum = agreed
        return bool(agreed)

    def __enter__(self):
        if hasattr(signal, 'SIGTERM') and _in_main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _in_main_thread():
    import threading
    return threading.current_thread() is threading.main_thread()


def warn(line):
    """A problem that does not end the run (a plot or tensorboard file that cannot be written)."""
    print(f"warning: {line}", file=sys.stderr, flush=True)


class _EventFile:
    """A tensorboard event file that never raises. tensorboardX writes it from a background thread,
    where an error (a full disk) would end the thread and, once its event queue is full, block the
    training loop for good: the first error is handed to `failed` and the events after it dropped."""

    def __init__(self, f, failed):
        self.f, self.failed, self.ok = f, failed, True

    def _guard(self, op, *args):
        if self.ok:
            try:
                op(*args)
            except OSError as e:
                self.ok = False
                self.failed(e)

    def write(self, data):
        self._guard(self.f.write, data)

    def flush(self):
        self._guard(self._flush)

    def _flush(self):
        self.f.flush()
        os.fsync(self.f.fileno())  # as tensorboardX's own flush does

    def close(self):
        self._guard(self.f.close)
        with contextlib.suppress(OSError):  # after a failure: what is still buffered cannot be written
            self.f.close()


class _EventFiles:
    """Opens the event files of one tensorboard folder as _EventFile, through tensorboardX's hook for
    other storage (`register_writer_factory`, as for s3://): also the files that add_scalars creates
    later, one per curve, which are opened before their writer thread starts."""

    def __init__(self, failed):
        from tensorboardX.record_writer import register_writer_factory
        self.prefix, self.failed = f'guarded{id(self)}', failed
        register_writer_factory(self.prefix, self)

    def logdir(self, folder):
        return f'{self.prefix}:{folder}'

    def _path(self, path):
        return path[len(self.prefix) + 1:]

    def open(self, path):
        return _EventFile(open(self._path(path), 'wb'), self.failed)

    def directory_check(self, path):
        os.makedirs(self._path(path), exist_ok=True)


class LogFolder:
    """A run's log folder, written by rank 0 alone: the lock (held in `lock_dir`), text logs opened for
    appending (cut back on resume to the sizes a checkpoint recorded) and a tensorboard writer.

    A log that cannot be written (full disk, ...) is a UserError: raised at once by a single process;
    under DDP held back (`error`) until the next checkpoint save, which every rank makes together, so
    that every rank stops with it. A tensorboard file that cannot be written is a warning only."""

    def __init__(self, log_dir, lock_dir, logs, folders=(), outputs=()):
        self.log_dir, self.logs, self.folders = log_dir, logs, (log_dir, *folders)
        self.outputs = outputs  # the files a run leaves besides its logs (checkpoints): a new run removes them
        self.main = dist.is_main_process()
        self.lock = RunLock(lock_dir)
        self.files = {}
        self.writer = None
        self.error = None
        self.tensorboard_error = None

    def open(self, truncate_to=None, fresh=False):
        """Create the folders, take the lock, open the logs. `truncate_to`: {log name: size} of a resumed
        run; `fresh`: a new run, whose logs start anew, as the original's open(..., 'w'). Otherwise (a run
        resumed from another run's or the original's checkpoint) they are appended to."""
        if not self.main:
            return self
        for d in self.folders:
            try:
                os.makedirs(d, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create folder {d}: {e.strerror}") from None
        self.lock.acquire()
        if fresh:
            self.clear()
        for name in self.logs:
            path = os.path.join(self.log_dir, name)
            # A resumed run drops what the killed run logged after its last checkpoint, so the
            # logs read as if it had never stopped.
            with user_write_errors(path):
                if truncate_to and name in truncate_to and os.path.exists(path):
                    with open(path, 'r+b') as f:
                        f.truncate(min(truncate_to[name], os.path.getsize(path)))
                if fresh and os.path.exists(path) and os.path.getsize(path):
                    console(f"=> starting {path} anew (it held an earlier run's log)")
                self.files[name] = open(path, 'w' if fresh else 'a')
        self.tensorboard(lambda: None, start=True)
        return self

    def clear(self):
        """A new run here (nothing to resume, or --overwrite), with the lock held: the checkpoints and
        tensorboard events of an earlier one go, so that no file mixes two runs (the text logs start anew)."""
        old = [p for p in self.outputs if os.path.isfile(p)]
        old += [os.path.join(self.log_dir, n) for n in os.listdir(self.log_dir) if n.startswith('events.out.')]
        if old:
            console(f"=> a new run: removing the earlier run's "
                    f"{', '.join(sorted({os.path.basename(p).split('.tfevents')[0] for p in old}))}")
        for path in old:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def write(self, name, line):
        if name not in self.files or self.error is not None:
            return
        try:
            with user_write_errors(os.path.join(self.log_dir, name)):
                self.files[name].write(line + '\n')
                self.files[name].flush()
        except UserError as e:
            self.error = e
            if not dist.is_dist():
                raise

    def save_checkpoint(self, state, path, copies=()):
        """Collective: every rank calls it, rank 0 writes; a write error, or a log's held back (no
        checkpoint records more than the logs hold), stops every rank with its message."""
        def write():
            if self.error is not None:
                error, self.error = self.error, None  # raised here: close() need not warn of it
                raise error
            save_checkpoint(state, path, copies)
        dist.on_rank0(write)

    def log_sizes(self):
        return {name: f.tell() for name, f in self.files.items()}

    def tensorboard(self, add, start=False):
        """Call `add` (e.g. writer.add_scalar) while tensorboard logging is on; `start` turns it on. A
        write error is one warning and turns it off, never the end of the run."""
        try:
            if start:
                from tensorboardX import SummaryWriter
                self.writer = SummaryWriter(log_dir=_EventFiles(self._tensorboard_failed).logdir(self.log_dir))
            if self.tensorboard_error is not None and self.writer is not None:
                self.writer.close()
                self.writer = None
            if self.writer is not None:
                add()
        except OSError as e:  # an event file that cannot be created, in this thread: closed at the next call
            self._tensorboard_failed(e)

    def _tensorboard_failed(self, error):
        if self.tensorboard_error is None:
            self.tensorboard_error = error
            warn(f"cannot write tensorboard events into {self.log_dir}: {error.strerror or error}; "
                 f"training goes on without them")

    def scalar(self, tag, value, step):
        self.tensorboard(lambda: self.writer.add_scalar(tag, value, step))

    def close(self):
        for f in self.files.values():
            # Every line was flushed when written: only a write that failed has anything left to lose.
            with contextlib.suppress(OSError):
                f.close()
        self.files = {}
        if self.error is not None and dist.is_dist():
            warn(f"{self.error} (after the last checkpoint)")  # a held error that no save raised
        self.tensorboard(lambda: None)
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.lock.release()


class RunFolder(LogFolder):
    """root_log/store_name (logs, args.txt, tensorboard, plot) and root_model/store_name (checkpoints)."""

    def __init__(self, args, logs=()):
        self.model_dir = os.path.join(args.root_model, args.store_name)
        self.ckpt_path = os.path.join(self.model_dir, 'ckpt.pth.tar')
        self.best_path = os.path.join(self.model_dir, 'ckpt.best.pth.tar')
        super().__init__(os.path.join(args.root_log, args.store_name), self.model_dir,
                         ('log_train.csv', 'log_test.csv', *logs), folders=(self.model_dir,),
                         outputs=(self.ckpt_path, self.best_path))

    def open(self, args, truncate_to=None, fresh=False):
        super().open(truncate_to, fresh)
        if self.main:
            path = os.path.join(self.log_dir, 'args.txt')
            with user_write_errors(path), open(path, 'w' if fresh else 'a') as f:
                f.write(str(args) + '\n')
        return self

    def scalars(self, tag, values, step):
        self.tensorboard(lambda: self.writer.add_scalars(tag, values, step))

    def image(self, tag, matrix, step):
        """A matrix with values in [0, 1] as a grayscale image (e.g. the row-normalised confusion matrix)."""
        self.tensorboard(lambda: self.writer.add_image(tag, np.asarray(matrix, dtype=np.float32)[None], step))

    def save(self, state, is_best):
        """Collective, as save_checkpoint."""
        # Also when the first epoch scores 0 % (the original then wrote no best file at all).
        best = is_best or (not os.path.exists(self.best_path) and state.get('step', 0) == 0)
        self.save_checkpoint(state, self.ckpt_path, copies=[self.best_path] if best else [])


def report_lines(metrics, cls_num_list=None, flag='val', task='classification'):
    """The original's two log lines (results, per-class accuracy) plus shot-group accuracy."""
    name = 'Rotation Prec' if task == 'rotation' else 'Prec'
    lines = [f"{flag} Results: {name}@1 {metrics['top1']:.3f} {name}@5 {metrics['top5']:.3f} "
             f"Loss {metrics['loss']:.5f}",
             # every class, also above numpy's 1,000-element summary threshold ('...'), which no reader can parse
             f"{flag} Class Accuracy: " + np.array2string(
                 metrics['per_class'], separator=',', formatter={'float_kind': lambda x: '%.3f' % x},
                 threshold=sys.maxsize)]
    if cls_num_list is not None and task == 'classification':
        shots = shot_accuracy(metrics['per_class'], cls_num_list)
        metrics.update({f'{k}_shot': v for k, v in shots.items()})
        lines.append(f"{flag} Shot Accuracy: Many {100 * shots['many']:.3f} Medium {100 * shots['medium']:.3f} "
                     f"Few {100 * shots['few']:.3f}")
    return lines


_RESULTS = re.compile(r'(\w+) Results: (?:Rotation )?Prec@1 (\S+) (?:Rotation )?Prec@5 (\S+) Loss (\S+)$')
_SHOTS = re.compile(r'\w+ Shot Accuracy: Many (\S+) Medium (\S+) Few (\S+)$')
_BEST = re.compile(r'Best (?:Rotation )?Prec@1: (\S+)$')


def read_test_log(path):
    """Every evaluation in a `log_test.csv` written by `_log_eval` (or by the original's train.py), in
    order: dicts of 'top1', 'top5', 'loss', 'per_class' (fractions; NaN for a class absent from the test
    set), 'shots' ((many, medium, few) in %, or None) and 'best' (the best top-1 so far, or None).

    np.array2string wraps the per-class line every 75 characters (more than 12 classes), in the
    original's logs too: its continuation lines are joined back. Anything else unexpected is a
    UserError naming the file, the line and what was expected."""
    with open(path) as f:
        lines = f.read().splitlines()
    records, i = [], 0

    def fail(what):
        raise UserError(f"{path} line {i + 1}: expected {what}, found {lines[i][:60]!r}; "
                        f"is it a log_test.csv of train.py / train_semi.py?")

    def number(text, what):
        try:
            return float(text)
        except ValueError:
            fail(what)

    while i < len(lines):
        line = lines[i]
        m = _RESULTS.match(line)
        if m:
            records.append({'top1': number(m[2], 'a Prec@1 number'), 'top5': number(m[3], 'a Prec@5 number'),
                            'loss': number(m[4], 'a loss'), 'per_class': None, 'shots': None, 'best': None})
        elif ' Class Accuracy: [' in line:
            start, text = i, line.split(': ', 1)[1]
            while not text.rstrip().endswith(']') and i + 1 < len(lines):
                i += 1
                text += lines[i].strip()
            if not records or not text.rstrip().endswith(']'):
                i = start
                fail("a 'Class Accuracy: [...]' list after a 'Results:' line")
            records[-1]['per_class'] = np.array([number(v, 'per-class accuracies') for v in
                                                 text.strip().strip('[]').split(',') if v.strip()])
        elif _SHOTS.match(line) and records:
            records[-1]['shots'] = tuple(number(v, 'shot accuracies') for v in _SHOTS.match(line).groups())
        elif _BEST.match(line) and records:
            records[-1]['best'] = number(_BEST.match(line)[1], 'a best Prec@1')
        elif line.strip() and not line.startswith(('val Confusion Matrix:', 'test Confusion Matrix:')):
            fail("'Results:', 'Class Accuracy:', 'Shot Accuracy:', 'Best Prec@1:' or 'Confusion Matrix:'")
        i += 1
    return records


def per_class_plot(per_class, cls_num_list, title):
    """PNG bytes: per-class accuracy (bars) against training images per class (line). Redrawn every
    epoch, so kept cheap: fixed margins (tight_layout cost as much as the drawing), the bars as one
    outline (`stairs`, not an artist per class), at most 24 inches wide (at 0.12 in per class, 8,142
    classes made a 78,163 px wide image that took 6 s to draw)."""
    n = len(per_class)
    width, height = min(24.0, max(6.0, n * 0.12)), 3.5
    fig = new_figure((width, height))
    ax = fig.add_axes((0.8 / width, 0.5 / height, 1 - 1.6 / width, 1 - 0.85 / height))
    ax.stairs(100 * np.nan_to_num(per_class), np.arange(n + 1) - 0.5, fill=True, color='tab:blue')
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_xlabel('class (sorted by training images)' if n > 20 else 'class')
    ax.set_ylabel('test accuracy (%)', color='tab:blue')
    ax.set_ylim(0, 100)
    ax2 = ax.twinx()
    ax2.plot(np.arange(n), cls_num_list, color='tab:red', marker='.' if n <= 100 else None)
    ax2.set_ylabel('training images', color='tab:red')
    ax.set_title(title)
    return figure_png(fig, dpi=80)


def seed(args):
    """Call first thing after parsing: model initialisation must already be reproducible. cuDNN: with
    --seed, deterministic algorithms and no benchmark search (which may pick other algorithms in a
    resumed or repeated run, so exact resume would no longer be exact); without it, the original's
    benchmark search, the fastest kernels. --cudnn-benchmark / --no-cudnn-benchmark choose either way."""
    if args.seed is not None:
        seed_everything(args.seed)
    benchmark = args.seed is None if args.cudnn_benchmark is None else args.cudnn_benchmark
    torch.backends.cudnn.deterministic = not benchmark
    torch.backends.cudnn.benchmark = benchmark


def run_seed(args, ckpt):
    """The seed of the run's data order and augmentation streams: the checkpoint's, else --seed,
    else drawn once. Broadcast from rank 0 (collective: every rank calls it once, at the start),
    because ranks that drew their own would shard different permutations of the data."""
    if ckpt is not None and 'seed' in ckpt:
        seed = int(ckpt['seed'])
    elif args.seed is not None:
        seed = args.seed
    else:
        seed = int.from_bytes(os.urandom(4), 'little') & 0x7fffffff
    return dist.broadcast_int(seed)


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


def stop_notice(stop, epoch, resume_from, step=None, epochs=None):
    """The log line of a run stopped by a signal during 0-based `epoch` (after `step`) or at its end; with
    `epochs` (a script that resumes when run again, rerun.py) it also says so."""
    where = f"during epoch {epoch + 1} after step {step}" if step is not None else f"at the end of epoch {epoch + 1}"
    total = f" ({epochs} epochs in all)" if epochs else ''
    again = ' or run the same command again' if epochs else ''
    return f"=> stopped by {signal.Signals(stop.signum).name} {where}{total}; resume with --resume {resume_from}{again}"


def restore_rng(ckpt, seed, rank, world):
    """Set this rank's global RNG streams (augmentations with -j 0, rotations, MoCo's shuffle) for a
    run that starts now. A checkpoint restores each rank's own saved state when the number of
    processes matches; otherwise rank 0 takes the saved one (the single-process and original case)
    and the other ranks derive theirs from (seed, rank)."""
    states = (ckpt or {}).get('rng_ranks')
    if states is not None and len(states) == world:
        set_rng_state(states[rank])
    elif rank == 0 and ckpt is not None and 'rng' in ckpt:
        set_rng_state(ckpt['rng'])
    elif rank > 0:
        seed_everything(derive_seed(seed, rank) % 2 ** 32)


def check_resume_layout(ckpt, path, world):
    """A mid-epoch checkpoint counts its step in this rank's batches, which depend on the number of
    processes; resuming it with another number would skip the wrong samples, so refuse."""
    saved = int(ckpt.get('world_size', 1))
    if int(ckpt.get('step', 0)) and saved != world:
        raise UserError(f"--resume {path} was saved in the middle of an epoch by {saved} process(es); resume "
                        f"it with {saved} (this run has {world}), or from a checkpoint saved at an epoch end")


def resume_entries(world):
    """The checkpoint entries exact resume needs besides the step: rank 0's RNG state as `rng` (the
    single-process and original layout), `world_size`, and with several ranks every rank's state as
    `rng_ranks` (read back by restore_rng). Collective under DDP (the states are gathered), so every
    rank must build the checkpoint state, even though only rank 0 writes it."""
    states = dist.all_gather_object(rng_state())
    entries = {'rng': states[0], 'world_size': world}
    if world > 1:
        entries['rng_ranks'] = states
    return entries


def _resume(args, exp, model, optimizer, log):
    """Load --resume into model (and optimizer unless evaluating). Returns the checkpoint dict."""
    ckpt, sd = read_weights(args.resume, exp.task, 'use --pretrained_model to start from it')
    if args.evaluate:
        rerun.check_evaluation(ckpt, args, f"--resume {args.resume}")
    exp.info = checked_against_checkpoint(exp.info, ckpt, f"--resume {args.resume}")  # before the shapes
    load_weights(model, sd, f"--resume {args.resume}")
    if exp.state is not None:
        exp.state.load_state_dict(ckpt, f"--resume {args.resume}")
    if not args.evaluate:
        load_optimizer(optimizer, ckpt, args.resume)
    recorded = ckpt.get('flags') if isinstance(ckpt.get('flags'), dict) else {}
    epochs = recorded.get('epochs', args.epochs) if args.evaluate else args.epochs  # -e: the run's own length
    where = rerun.progress(int(ckpt.get('epoch', 0)), int(ckpt.get('step', 0)), epochs)
    log(f"=> loaded checkpoint '{args.resume}' ({where})")
    return ckpt


def check_resume_target(args, folder):
    """A training --resume writes into this command's run folder: refused where that folder holds another run
    (without --overwrite), or where --overwrite would remove the very checkpoint it continues."""
    if args.evaluate or not os.path.isfile(folder.ckpt_path):
        return
    own = os.path.abspath(args.resume) == os.path.abspath(folder.ckpt_path)
    if own and args.overwrite:
        raise UserError(f"--overwrite starts {folder.model_dir} anew, so it cannot also --resume its checkpoint: "
                        f"pass one of them")
    if not own and not args.overwrite:
        raise UserError(f"{folder.model_dir} holds another run than --resume {args.resume}; pass --overwrite to "
                        f"replace it with the run that checkpoint continues, or --exp_str NAME for a new run folder")


def run_flags(args):
    """The flags a checkpoint records (rerun.py), and for a user's folder the folder itself: two folders of one
    name (hence one run folder) are two runs."""
    folder = {'data_folder': os.path.abspath(args.data_path)} if getattr(args, 'dataset', None) == 'folder' else {}
    return rerun.run_flags(args, **folder)


def previous_run(args, folder):
    """The checkpoint to start from: --resume, or the unfinished run of the same flags that the same command,
    run again, continues (rerun.py); a run folder holding a finished run or a run of other flags is refused
    without --overwrite. Every rank decides alike (they read one file)."""
    existing = folder.ckpt_path if os.path.isfile(folder.ckpt_path) else None
    if args.evaluate or args.resume or existing is None:
        return args.resume
    ckpt = load_checkpoint(existing)
    epoch, step = int(ckpt.get('epoch', 0)), int(ckpt.get('step', 0))
    recorded = ckpt.get('flags') if isinstance(ckpt.get('flags'), dict) else None
    path = rerun.resume_or_refuse(existing, recorded, run_flags(args), epoch, step, args.epochs, folder.model_dir,
                                  '--exp_str NAME', args.overwrite)
    if path:
        console(rerun.resume_notice(folder.model_dir, epoch, step, args.epochs, path))
    return path or ''


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
    elif TRAIN_RULES[args.train_rule].resample:
        sampler = ImbalancedDatasetSampler(exp.train_set, seed=seed, num_replicas=world, rank=rank)
    else:
        sampler = ShuffleSampler(len(exp.train_set), shuffle=True, seed=seed, num_replicas=world, rank=rank)
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
    # was resumed mid-epoch. `run` re-seeds the training one per epoch.
    workers = loader_workers(args, info)
    train_loader = DataLoader(exp.train_set, batch_size=per_rank_batch, sampler=sampler,
                              num_workers=workers, pin_memory=pin, drop_last=False,
                              generator=torch.Generator())
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


def place_model(model, args, device, world):
    """The model on `device`: SyncBatchNorm in a distributed run on GPUs unless --no-sync-bn, so that
    BatchNorm normalises over the batch of all processes, as on the paper's one GPU (8 GPUs x 16 images
    would otherwise normalise by 16; SyncBatchNorm has no CPU kernels); channels_last if asked. Same
    parameters and buffers either way: checkpoints keep plain BatchNorm keys."""
    model = model.to(device)
    if world > 1 and device.type == 'cuda' and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def compile_in_place(model):
    """--compile: torch.compile `model` in place, after DDP, as PyTorch's DDP + torch.compile notes ask
    (DDPOptimizer then splits the graph at gradient buckets); state_dict keys stay the bare model's. Not
    with SyncBatchNorm (torchrun on GPUs): its statistics come from an op with no FakeTensor kernel
    (batch_norm_stats) and a data-dependent mask, so the graph breaks at its layers (TORCH_LOGS=graph_breaks,
    2 gloo ranks, ResNet-32: 22 graphs and 13 recompilations per rank instead of one graph, steps no faster
    than eager; docs/gpu.md). Returns whether it compiled."""
    synced = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    if synced:
        console(f"=> --compile skipped: torch.compile would break the graph at the {synced} SyncBatchNorm "
                f"layers, no faster than without it; --no-sync-bn compiles (BatchNorm then normalises each "
                f"process's batch alone)")
        return False
    model.compile()
    return True


def run(args, exp):
    """Train (or with -e only evaluate) `exp` as configured by `args`. Returns the last metrics dict."""
    ctx = dist.setup(args.gpu)
    try:
        return _run(args, exp, ctx)
    finally:
        dist.cleanup()


def _run(args, exp, ctx):
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    main = rank == 0
    folder = RunFolder(args, exp.logs)

    def log(line, console=None):
        if main:
            print(console or line, flush=True)
            folder.write('log_train.csv', line)

    model = place_model(exp.model, args, device, world)
    hooks = step_hooks(args, device)
    # Evaluations are what users compare with the paper: float32 unless --amp-eval asks for bf16.
    eval_hooks = {**hooks, 'amp': args.amp_eval}
    optimizer = (exp.optimizer(model) if exp.optimizer is not None else
                 torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay))

    ckpt, error = None, None
    start_epoch, start_step, best_acc1, best_epoch = args.start_epoch, 0, 0.0, None
    try:
        args.resume = previous_run(args, folder)
    except UserError as e:
        error = e
    dist.raise_if_any(error)  # collective: no rank goes on alone
    if args.resume:
        ckpt = _resume(args, exp, model, optimizer, log)
        check_resume_target(args, folder)
        start_epoch = int(ckpt.get('epoch', 0))
        start_step = int(ckpt.get('step', 0))
        best_acc1 = float(ckpt.get('best_acc1', 0.0))  # a 0-d tensor (the original's and ours) or a float
        best_epoch = ckpt.get('best_epoch')  # 1-based; None in older checkpoints
        if not args.evaluate:
            check_resume_layout(ckpt, args.resume, world)
        if args.pretrained_model:
            log(f"=> --resume wins: not loading --pretrained_model {args.pretrained_model}")
    elif args.pretrained_model:
        load_pretrained(model, args.pretrained_model, log=log)
    elif args.evaluate:
        raise UserError("-e/--evaluate needs a checkpoint: pass --resume PATH")

    seed = run_seed(args, ckpt)
    train_loader, sampler, val_loader = _loaders(args, exp, seed, rank, world, device)
    eval_criterion = nn.CrossEntropyLoss().to(device)
    # The same parameters: what training updates, the evaluations see (before any file is written:
    # an empty class is refused here).
    eval_model, posthoc = scored_model(model, args, exp, device)
    if args.evaluate:
        if posthoc:
            log(posthoc)
        metrics = evaluate(eval_model, eval_criterion, val_loader, device, exp.num_classes, batch_fn=exp.eval_batch_fn,
                           **eval_hooks)
        if main:
            for line in report_lines(metrics, exp.cls_num_list, 'val', exp.task):
                print(line)
            if args.confusion and metrics['confusion'] is not None:
                print('Confusion matrix (rows: true class, columns: prediction):')
                print(np.array2string(metrics['confusion'], max_line_width=200, threshold=10 ** 6))
        return metrics

    if world > 1 and exp.trains:  # DDP refuses a model with nothing to train
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    if args.compile:
        compile_in_place(model)
    same_run = ckpt is not None and ckpt.get('store_name') == args.store_name
    error = None
    try:
        folder.open(args, truncate_to=ckpt.get('log_sizes') if same_run else None,
                    fresh=ckpt is None or args.overwrite)
    except UserError as e:
        error = e
    dist.raise_if_any(error)  # collective: rank 0 alone opens the folder, every rank must stop if it fails
    if posthoc:
        log(posthoc)
    for line in () if same_run else exp.notes:  # a resumed run's log already has them
        log(line)
    restore_rng(ckpt, seed, rank, world)
    mixup = Mixup(args.mixup, seed, rank, device) if args.mixup else None

    def snapshot(epoch, step):
        return _state(args, exp, model, optimizer, epoch, step, best_acc1, seed, folder, world, best_epoch)

    metrics = {}
    try:
        with GracefulStop(console) as stop:
            for epoch in range(start_epoch, args.epochs):
                if exp.trains:
                    stats = _train_epoch(args, exp, model, optimizer, train_loader, sampler, seed, epoch,
                                         start_step if epoch == start_epoch else 0, rank, device, folder, log,
                                         stop, hooks, mixup)
                    if stats['stopped']:
                        folder.save(snapshot(epoch, stats['steps']), is_best=False)
                        log(stop_notice(stop, epoch, folder.ckpt_path, stats['steps'], args.epochs))
                        return {'stopped_by': stop.signum, **stats}
                    if exp.after_epoch is not None:
                        exp.after_epoch()
                dist.broadcast_buffers(unwrap(model))  # collective, every epoch: evaluate what rank 0 saves
                if exp.eval_model is not None:
                    dist.broadcast_buffers(eval_model)
                metrics = evaluate(eval_model, eval_criterion, val_loader, device, exp.num_classes,
                                   batch_fn=exp.eval_batch_fn, **eval_hooks)
                is_best = metrics['top1'] > best_acc1
                best_acc1 = max(best_acc1, metrics['top1'])
                best_epoch = epoch + 1 if is_best else best_epoch
                _log_eval(folder, metrics, exp, epoch, best_acc1, main, confusion=args.confusion)
                for name, lines in (exp.epoch_lines(epoch) if exp.epoch_lines is not None else {}).items():
                    for line in lines:
                        folder.write(name, line)
                folder.save(snapshot(epoch + 1, 0), is_best)
                # Collective, at every epoch end; after the save, so a resumed run's logs hold no trace of the stop.
                if stop():
                    log(stop_notice(stop, epoch, folder.ckpt_path, epochs=args.epochs))
                    return {'stopped_by': stop.signum, **metrics}
    finally:
        folder.close()
    metrics['best_acc1'] = best_acc1
    if main and metrics.get('top1') is not None:
        for line in closing_summary(metrics, best_acc1, best_epoch, args.epochs, folder, exp.task):
            print(line, flush=True)
    return metrics


def closing_summary(metrics, best_acc1, best_epoch, epochs, folder, task):
    """The console's last lines of a finished run (not in the logs, which keep the original's lines)."""
    name = 'rotation top-1' if task == 'rotation' else 'top-1'
    at = f" (epoch {best_epoch})" if best_epoch else ''
    shots = (f"; last epoch many / medium / few-shot {100 * metrics['many_shot']:.3f} / "
             f"{100 * metrics['medium_shot']:.3f} / {100 * metrics['few_shot']:.3f}"
             if task == 'classification' and 'many_shot' in metrics else '')
    return [f"=> done, {epochs} epochs: last {name} {metrics['top1']:.3f}, best {best_acc1:.3f}{at}{shots}",
            f"=> checkpoints: {folder.ckpt_path} (last), {folder.best_path} (best); logs and tensorboard: "
            f"{folder.log_dir}"]


def _train_epoch(args, exp, model, optimizer, train_loader, sampler, seed, epoch, step0, rank, device, folder, log,
                 stop, hooks, mixup):
    """One training epoch of `run` from step `step0`: its lr and loss, the data order, the steps."""
    begin_epoch(sampler, train_loader, seed, epoch, rank, step0)
    num_steps = step0 + len(train_loader)
    set_lr = per_step_lr(exp, optimizer, epoch * num_steps)
    if exp.schedule is not None:
        lr = exp.schedule(epoch)
    elif exp.step_lr is not None:  # the epoch's first step's, for the log; set again before every step
        lr = exp.step_lr(epoch * num_steps + step0)
    else:
        lr = LR_SCHEDULES[args.lr_schedule](epoch, args)
    for group in optimizer.param_groups:
        group['lr'] = lr
    criterion = exp.criterion
    if criterion is None and exp.step_fn is None:
        weights = TRAIN_RULES[args.train_rule].weights(epoch, exp.cls_num_list, args.lr_steps[0])
        criterion = build_criterion(args.loss_type, exp.cls_num_list, None if weights is None else weights.to(device),
                                    args.la_tau)
    stats = train_one_epoch(model, criterion and criterion.to(device), train_loader, optimizer, device, epoch,
                            epochs=args.epochs, batch_fn=exp.batch_fn, print_freq=args.print_freq, log=log,
                            should_stop=stop, start_step=step0, num_steps=num_steps, mixup=mixup,
                            after_step=exp.after_step, step_fn=exp.step_fn, before_step=set_lr, **hooks)
    folder.scalar('loss/train', stats['loss'], epoch)
    folder.scalar('acc/train_top1', stats['top1'], epoch)
    folder.scalar('lr', lr, epoch)
    return stats


def per_step_lr(exp, optimizer, first):
    """engine.train_one_epoch's before_step for exp.step_lr (None without one): the lr of global step
    `first` + the epoch's 0-based step, on every parameter group."""
    if exp.step_lr is None:
        return None

    def set_lr(step):
        lr = exp.step_lr(first + step)
        for group in optimizer.param_groups:
            group['lr'] = lr
    return set_lr


def scored_model(model, args, exp, device):
    """(what the evaluations score, a notice or ''): exp.eval_model placed as the model is; the bare
    `model`; or with --posthoc_la TAU the model whose logits are logits - TAU * log(training class prior), the
    prior from exp.cls_num_list (for train_semi.py, pseudo-labels included). The evaluation loss is then CE on
    those logits."""
    if exp.eval_model is not None:
        return place_model(exp.eval_model, args, device, 1), ''
    if args.posthoc_la is None:
        return unwrap(model), ''
    adjusted = PosthocLogitAdjustment(unwrap(model), exp.cls_num_list, args.posthoc_la).to(device)
    return adjusted, (f"=> post-hoc logit adjustment on: every evaluation scores logits - {args.posthoc_la:g} * "
                      f"log(prior), prior = training images per class / {sum(exp.cls_num_list)} (--posthoc_la)")


def _log_eval(folder, metrics, exp, epoch, best_acc1, main, confusion=False):
    """An evaluation into log_test.csv (the original's lines, the confusion matrix as one JSON line),
    tensorboard and the console; `confusion`: the matrix on the console too. Above
    engine.CONFUSION_MAX_CLASSES classes there is no matrix."""
    lines = report_lines(metrics, exp.cls_num_list, 'val', exp.task)
    lines.append(f"Best Prec@1: {best_acc1:.3f}" if exp.task == 'classification'
                 else f"Best Rotation Prec@1: {best_acc1:.3f}")
    if not main:
        return
    for line in lines:
        print(line, flush=True)
        folder.write('log_test.csv', line)
    cm = metrics['confusion']
    if cm is not None:
        # One line in the log (rows: true class), however many classes.
        folder.write('log_test.csv', 'val Confusion Matrix: ' + json.dumps(cm.tolist(), separators=(',', ':')))
        if confusion:
            print('val Confusion Matrix (rows: true class, columns: prediction):\n' +
                  np.array2string(cm, max_line_width=200, threshold=10 ** 6), flush=True)
        folder.image('confusion_matrix', cm / np.maximum(cm.sum(axis=1, keepdims=True), 1), epoch)
    tag = 'rot_acc' if exp.task == 'rotation' else 'acc'
    per_class = np.nan_to_num(metrics['per_class'])
    folder.scalars(f'{tag}/test_val_cls_acc', {str(i): float(a) for i, a in enumerate(per_class)}, epoch)
    folder.scalar('loss/test', metrics['loss'], epoch)
    folder.scalar(f'{tag}/test_top1', metrics['top1'], epoch)
    folder.scalar(f'{tag}/test_top5', metrics['top5'], epoch)
    folder.scalar(f'{tag}/test_top1_best', best_acc1, epoch)
    for group in ('many', 'medium', 'few'):
        if f'{group}_shot' in metrics and np.isfinite(metrics[f'{group}_shot']):
            folder.scalar(f'{tag}/test_{group}_shot', 100 * metrics[f'{group}_shot'], epoch)
    counts = exp.cls_num_list if exp.task == 'classification' else [0] * exp.num_classes
    png = per_class_plot(metrics['per_class'], counts, f'epoch {epoch + 1}: top-1 {metrics["top1"]:.2f}%')
    try:
        atomic_write_bytes(os.path.join(folder.log_dir, 'per_class_acc.png'), png)
    except UserError as e:
        warn(f"{e}; training goes on")


def _state(args, exp, model, optimizer, epoch, step, best_acc1, seed, folder, world, best_epoch=None):
    """The checkpoint: the original's keys first (best_acc1 as a 0-d tensor, which the original's
    `best_acc1.to(gpu)` needs), then what exact resume needs, the run's flags (rerun.py) and the 1-based epoch
    of the best top-1. Every rank must call it (RNG gather)."""
    return {
        'epoch': epoch, 'arch': args.arch, 'state_dict': unwrap(model).state_dict(),
        'best_acc1': torch.tensor(best_acc1), 'optimizer': optimizer.state_dict(),
        'step': step, 'seed': seed, **resume_entries(world), 'script': exp.script, 'task': exp.task,
        'num_classes': exp.num_classes, 'store_name': args.store_name, 'log_sizes': folder.log_sizes(),
        'flags': run_flags(args), 'best_epoch': best_epoch, **checkpoint_entries(exp.info),
        **(exp.state.state_dict() if exp.state is not None else {}),
    }

