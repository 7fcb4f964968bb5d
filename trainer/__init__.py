"""The run loop behind train.py, train_semi.py, train_stage2.py, train_ssl.py and pretrain_rot.py.

A script builds an `Experiment` (model, data, class counts) and calls `run(args, experiment)`.
This file is the story of one run, top to bottom: device and model, optimizer, resume or pre-trained
weights, loaders, then per epoch train, evaluate, log and save, stopping cleanly on SIGTERM. What a step
does differently (stage 2, LT-SSL) comes in as Experiment fields, not as branches here. The rooms it calls:

    schedules.py          lr schedules and train rules (Resample / Reweight / DRW / DRS), part of the ground
    trainer/loaders.py    samplers, loaders and the per-epoch data order
    trainer/resume.py     checkpoint entries for exact resume, loading --resume, which run to continue
    trainer/run_folder.py the run folder: lock, logs, tensorboard, checkpoints
    trainer/events.py     tensorboard event files that never raise
    trainer/reports.py    the log-line format, its reader and the per-class plot
    trainer/stop.py       console notices and SIGTERM handling

Exact resume: checkpoints hold the RNG states and the sampler seed; the data order of an epoch is
a function of (seed, epoch) only, so a run resumed from the end of epoch k replays epoch k+1 the
way the uninterrupted run did.
"""
import dataclasses
import os
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

import dist
from checkpoint import load_pretrained, unwrap
from dataset import DatasetInfo
from dataset.folder import checkpoint_entries
from engine import Mixup, evaluate, train_one_epoch
from errors import UserError
from losses import PosthocLogitAdjustment, build_criterion
from schedules import LR_SCHEDULES, TRAIN_RULES
from trainer.loaders import _loaders, begin_epoch
from trainer.reports import _log_eval, report_lines
from trainer.resume import (_resume, check_resume_layout, check_resume_target, previous_run, restore_rng,
                            resume_entries, resumed_meters, run_flags, step_meters_entry, training_hooks)
from trainer.run_folder import RunFolder
from trainer.stop import GracefulStop, console, stop_notice
from utils import seed_everything


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
    hooks = training_hooks(args, device, None if args.evaluate else ckpt, log)
    # Evaluations are what users compare with the paper: float32 unless --amp-eval asks for bf16.
    eval_hooks = {**hooks, 'amp': args.amp_eval}

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

    def snapshot(epoch, step, meters=None):
        return _state(args, exp, model, optimizer, epoch, step, best_acc1, seed, folder, world, hooks['amp'],
                      best_epoch, meters)

    metrics = {}
    try:
        with GracefulStop(console) as stop:
            for epoch in range(start_epoch, args.epochs):
                if exp.trains:
                    step0 = start_step if epoch == start_epoch else 0
                    stats = _train_epoch(args, exp, model, optimizer, train_loader, sampler, seed, epoch, step0,
                                         rank, device, folder, log, stop, hooks, mixup, resumed_meters(ckpt, step0))
                    if stats['stopped']:
                        folder.save(snapshot(epoch, stats['steps'], stats['meters']), is_best=False)
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
                 stop, hooks, mixup, start_meters=None):
    """One training epoch of `run` from step `step0` (`start_meters`: the meters of the steps before it): its lr
    and loss, the data order, the steps."""
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
                            after_step=exp.after_step, step_fn=exp.step_fn, before_step=set_lr,
                            start_meters=start_meters, **hooks)
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


def _state(args, exp, model, optimizer, epoch, step, best_acc1, seed, folder, world, amp, best_epoch=None,
           meters=None):
    """The checkpoint: the original's keys first (best_acc1 as a 0-d tensor, which the original's
    `best_acc1.to(gpu)` needs), then what exact resume needs (`amp`: whether the steps ran in bf16; a
    mid-epoch one also the step meters of the epoch so far, `meters`: rank 0's, whose lines the log holds),
    the run's flags (rerun.py) and the 1-based epoch of the best top-1. Every rank must call it (RNG gather)."""
    return {
        'epoch': epoch, 'arch': args.arch, 'state_dict': unwrap(model).state_dict(),
        'best_acc1': torch.tensor(best_acc1), 'optimizer': optimizer.state_dict(),
        'step': step, 'seed': seed, **step_meters_entry(step, meters), **resume_entries(world, amp),
        'script': exp.script, 'task': exp.task,
        'num_classes': exp.num_classes, 'store_name': args.store_name, 'log_sizes': folder.log_sizes(),
        'flags': run_flags(args), 'best_epoch': best_epoch, **checkpoint_entries(exp.info),
        **(exp.state.state_dict() if exp.state is not None else {}),
    }
