"""The stage driver: the original's run_networks.py logic on the project's shared engine.

One stage = two networks (feat_model, classifier) with their own optimizer settings, trained
together by `engine.train_one_epoch` as one `DecoupledModel`:
- every epoch is floor(N_train / batch_size) steps, whatever the sampler;
- the learning rate is set at the start of each epoch (StageConfig.lr_factor_at);
- `fix: true` freezes a network's parameters, but it stays in train mode (BatchNorm statistics
  keep updating, as the original), unless --freeze_bn;
- after every epoch the model is evaluated on val; the best val top-1 is kept, and after the
  last epoch those weights are saved (final_model_checkpoint.pth) and evaluated on test
  (ImageNet-LT) or val (iNaturalist 2018).
A `tau_norm` stage trains nothing: it searches tau on val features and evaluates the best.
"""
import dataclasses
import json
import os
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import dist
import rerun
import trainer
from checkpoint import load_checkpoint, load_optimizer, save_checkpoint, strip_prefix
from engine import evaluate, predict as predict_batches, train_one_epoch
from errors import UserError
from fileio import atomic_path, atomic_write_text
from imagenet_inat import data as data_mod
from imagenet_inat import layout
from imagenet_inat import weights as weights_mod
from imagenet_inat.networks import LOSSES, DecoupledModel, tau_normalized
from trainer.run_folder import LogFolder
from utils import shot_accuracy

LOG = 'log.txt'  # the original's log file of a stage, in its log folder
FEATURE_FILES = {'train_plain': 'trainfeat_all.npz', 'val': 'valfeat_all.npz', 'test': 'testfeat_all.npz'}


@dataclasses.dataclass
class Run:
    """Everything a stage needs, built and checked before any file is written."""
    args: object
    cfg: object
    ctx: object
    model: DecoupledModel
    train_counts: np.ndarray             # training images per class: shot groups
    sets: dict                           # phase -> data set
    pieces: int                          # BatchNorm pieces of a training batch (layout.py)
    resume_path: Optional[str] = None
    ckpt: Optional[dict] = None          # the --resume checkpoint

    @property
    def main(self):
        return self.ctx.rank == 0


def build(args, cfg, ctx, log):
    """Data sets, networks and weights. Every problem is a UserError raised here, on every rank."""
    pieces = 1
    if not args.test and cfg.taus is None:
        pieces, what = layout.plan_pieces(cfg.batch_size, ctx.world_size, args.bn_pieces, args.gpu)
        if pieces > 1:
            log(f"=> BatchNorm batches of {', '.join(map(str, layout.piece_sizes(cfg.batch_size, pieces)))} "
                f"(batch {cfg.batch_size} over {pieces} {what})")
    kw = dict(data_root=args.data_root, split_dir=args.split_dir)
    sets = {'train': data_mod.load_phase(cfg, 'train', val_as_train=args.val_as_train, **kw)}
    phases = ['val', data_mod.final_split(cfg.dataset)]
    if args.save_feat:
        phases.append(args.save_feat)
    for phase in phases:
        if phase not in sets:
            sets[phase] = data_mod.load_phase(cfg, phase, **kw)
    if not args.test and cfg.taus is None and len(sets['train']) < cfg.batch_size:
        raise UserError(f"training_opt.batch_size ({cfg.batch_size}) exceeds the {len(sets['train'])} training "
                        f"images: an epoch of floor(N / batch_size) steps would be empty")
    nets = {key: net.spec.build(net.params) for key, net in cfg.networks.items()}
    for key, net in cfg.networks.items():
        if net.fix:
            # The original's rule: freeze every parameter but self-attention and `fc` ones.
            for name, p in nets[key].named_parameters():
                if 'selfatt' not in name and 'fc' not in name:
                    p.requires_grad = False
    model = DecoupledModel(nets['feat_model'], nets['classifier'], freeze_bn=args.freeze_bn)
    run = Run(args, cfg, ctx, model, np.bincount(sets['train'].targets, minlength=cfg.num_classes), sets, pieces)
    if args.resume:
        if cfg.model_dir:
            log(f"=> --resume wins: not loading model_dir {cfg.model_dir}")
        run.resume_path, run.ckpt = weights_mod.read_resume(args.resume)
        trainer.check_resume_layout(run.ckpt, run.resume_path, ctx.world_size)
        for key in cfg.networks:
            _load(getattr(model, key), strip_prefix(run.ckpt['state_dict'][key], 'module.'), key,
                  cfg.networks[key].name, f"--resume {run.resume_path}", log, strict=True)
    else:
        _load_model_dir(args, cfg, model, log)
    return run


def _load(module, sd, key, name, source, log, strict=False):
    matched, missing = weights_mod.load_network(module, sd, key, name, source, log)
    if strict and missing:
        raise UserError(f"{source} lacks {len(missing)} tensors of the {key} ({name}), e.g. {missing[0]}")


def _load_model_dir(args, cfg, model, log):
    """--model_dir (or the config's model_dir): which networks come from it depends on the stage.

    Training (the original's load_model): the feature model always; the classifier unless it is a
    DotProductClassifier, which stage 1 and cRT start fresh. --test and tau-norm: both.
    """
    path = cfg.model_dir
    if args.test and not path:
        path = cfg.log_dir
        if not os.path.exists(os.path.join(path, weights_mod.FINAL)):
            raise UserError(f"--test evaluates --model_dir, or else the config's log folder, which holds no "
                            f"{weights_mod.FINAL} ({path})")
    if not path:
        if cfg.taus is not None:
            raise UserError("a tau_norm stage needs the stage-1 result: pass --model_dir")
        log("=> no --model_dir: both networks start from random weights")
        return
    if not os.path.exists(path):
        raise UserError(f"--model_dir not found: {path} (the config's model_dir unless given on the command line)")
    file, kind, nets = weights_mod.read_model_dir(path)
    log(f"=> --model_dir {file}: {kind}")
    for key, net in cfg.networks.items():
        wanted = args.test or cfg.taus is not None or not net.spec.fresh_in_training
        if not wanted:
            log(f"=> {key} ({net.name}): starts fresh (not loaded, as the original's training runs)")
            continue
        if nets.get(key) is None:
            raise UserError(f"--model_dir {file} ({kind}) holds no {key}, which this stage loads "
                            f"({'--test' if args.test else net.name}); pass a stage-1 result "
                            f"({weights_mod.FINAL})")
        _load(getattr(model, key), nets[key], key, net.name, f"--model_dir {file}", log)


# ---------------------------------------------------------------- evaluation

def report(metrics, phase, train_counts, log):
    """The evaluation table (percent), one row; returns the JSON-ready summary."""
    shots = shot_accuracy(metrics['per_class'], train_counts)
    row = [metrics['top1'], metrics['top5']] + [100 * shots[g] for g in ('many', 'medium', 'few')]
    log(f"Phase: {phase} ({metrics['count']} images)")
    log(f"  {'top-1':>7} {'top-5':>7} {'many':>7} {'medium':>7} {'few':>7}")
    log('  ' + ' '.join(f"{v:7.2f}" for v in row))
    return {'phase': phase, 'count': metrics['count'], 'loss': metrics['loss'], 'top1': metrics['top1'],
            'top5': metrics['top5'], **{f'{g}_shot': _finite(100 * shots[g]) for g in ('many', 'medium', 'few')},
            'cls_accs': [_finite(a) for a in metrics['per_class'].tolist()],
            'train_class_counts': np.asarray(train_counts).tolist()}


def _finite(x):
    return float(x) if np.isfinite(x) else None


def write_results(run, summary, name, **extra):
    dist.on_rank0(atomic_write_text, os.path.join(run.cfg.log_dir, name),
                  json.dumps({**summary, **extra}, indent=1) + '\n')


def _progress(iterable, run, desc, total=None):
    # Bars on rank 0 in a terminal only (disable=None), so logs and tests stay clean.
    return tqdm(iterable, desc=desc, total=total, disable=None if run.main else True, leave=False)


def _eval_loader(run, phase):
    per_rank = max(1, run.cfg.batch_size // run.ctx.world_size)
    return data_mod.eval_loader(run.sets[phase], per_rank, run.cfg.num_workers, run.ctx.rank, run.ctx.world_size)


def placed(run):
    """The model on the run's device, in channels_last memory format unless --no-channels-last."""
    return run.model.to(run.ctx.device, memory_format=torch.channels_last if run.args.channels_last
                        else torch.preserve_format)


def evaluate_phase(run, module, phase):
    """engine.evaluate over `phase`: float32, whatever --amp (which is for the training steps)."""
    return evaluate(module, nn.CrossEntropyLoss(), _progress(_eval_loader(run, phase), run, phase),
                    run.ctx.device, run.cfg.num_classes, channels_last=run.args.channels_last)


def predict(run, module, phase):
    """(outputs, labels) of this rank's shard of `phase`, float32 on the host, in the shard's order."""
    return predict_batches(module, _progress(_eval_loader(run, phase), run, phase), run.ctx.device,
                           channels_last=run.args.channels_last)


def gather_in_order(tensor, run, n):
    """Rank-sharded rows (rank, rank + world, ...) back into data set order on rank 0, None on the others
    (collective)."""
    parts = dist.gather_object(tensor.numpy())
    if parts is None:
        return None
    out = np.empty((n,) + tensor.shape[1:], dtype=parts[0].dtype)
    for rank, part in enumerate(parts):
        out[rank::run.ctx.world_size] = part
    return out


OUTPUT_BATCH = 1024  # rows of precomputed features or logits per batch of evaluate_outputs


def on_device(run, outputs, labels):
    """Predicted rows and their labels moved to the run's device once (a copy the host waits for)."""
    return outputs.to(run.ctx.device), labels.to(run.ctx.device)


def evaluate_outputs(run, head, outputs, labels):
    """engine.evaluate over precomputed features or logits (`head` maps them to logits), batches sliced
    where the rows are: held on the device (on_device), no batch is copied to it from unpinned memory,
    which the host would wait for at every batch."""
    batches = list(zip(outputs.split(OUTPUT_BATCH), labels.split(OUTPUT_BATCH)))
    return evaluate(head, nn.CrossEntropyLoss(), batches, run.ctx.device, run.cfg.num_classes)


def test(run, log):
    """--test: evaluate the loaded model on the final split (or --save_feat's features only)."""
    model = placed(run)
    if run.main:
        os.makedirs(run.cfg.log_dir, exist_ok=True)
    if run.args.save_feat:
        phase = run.args.save_feat
        feats, labels = predict(run, model.feat_model, phase)
        n = len(run.sets[phase])
        feats, labels = gather_in_order(feats, run, n), gather_in_order(labels, run, n)
        if run.main:
            path = os.path.join(run.cfg.log_dir, FEATURE_FILES[phase])
            with atomic_path(path) as tmp, open(tmp, 'wb') as f:
                np.savez(f, feats=feats, labels=labels, idxs=np.arange(n))
            log(f"===> Saving feats to {path}")
        return 0
    phase = data_mod.final_split(run.cfg.dataset)
    if run.args.output_logits:
        logits, labels = predict(run, model, phase)
        metrics = evaluate_outputs(run, nn.Identity(), *on_device(run, logits, labels))
        n = len(run.sets[phase])
        logits, labels = gather_in_order(logits, run, n), gather_in_order(labels, run, n)
        if run.main:
            path = os.path.join(run.cfg.log_dir, 'logits_close.npz')
            with atomic_path(path) as tmp, open(tmp, 'wb') as f:
                np.savez(f, logits=logits, labels=labels, paths=np.asarray(run.sets[phase].img_path))
            log(f"Saving total logits to: {path}")
    else:
        metrics = evaluate_phase(run, model, phase)
    write_results(run, report(metrics, phase, run.train_counts, log), f'results_{phase}.json')
    return 0


# ---------------------------------------------------------------- tau-normalisation

def tau_norm(run, log):
    """Kang et al.'s tau-normalised classifier: logits = f(x) . (W_i / ||W_i||^tau), no bias, tau
    chosen by val top-1 over the config's grid, then evaluated on the final split. Every tau's val
    and final-split top-1 is kept (`tau_search`), as Kang et al.'s tau_norm.py printed them all."""
    cfg, model = run.cfg, placed(run)
    weight = model.classifier.fc.weight.detach()
    phase = data_mod.final_split(cfg.dataset)
    # On the device once: every tau of the grid evaluates them again.
    feats = {p: on_device(run, *predict(run, model.feat_model, p)) for p in dict.fromkeys(('val', phase))}
    head = nn.Linear(weight.size(1), weight.size(0), device=run.ctx.device)
    nn.init.zeros_(head.bias)
    search = {}
    for tau in cfg.taus:
        head.weight.data.copy_(tau_normalized(weight, tau))
        scores = {p: evaluate_outputs(run, head, *feats[p]) for p in feats}
        search[tau] = {f'{p}_top1': m['top1'] for p, m in scores.items()}
        shots = shot_accuracy(scores['val']['per_class'], run.train_counts)
        log(f"tau {tau:.2f}: val top-1 {scores['val']['top1']:.2f}  many {100 * shots['many']:.2f}  "
            f"medium {100 * shots['medium']:.2f}  few {100 * shots['few']:.2f}"
            + (f"  ({phase} top-1 {scores[phase]['top1']:.2f})" if phase != 'val' else ''))
    # chosen on val only; of equal maxima, max keeps the first listed
    best_tau = max(cfg.taus, key=lambda t: search[t]['val_top1'])
    log(f"=> best tau {best_tau:.2f} (val top-1 {search[best_tau]['val_top1']:.2f})")
    head.weight.data.copy_(tau_normalized(weight, best_tau))
    summary = report(evaluate_outputs(run, head, *feats[phase]), phase, run.train_counts, log)
    classifier = {'module.fc.weight': head.weight.detach().cpu().clone(),
                  'module.fc.bias': head.bias.detach().cpu().clone()}
    best = {'feat_model': weights_mod.original_layout(model.feat_model), 'classifier': classifier}
    tau_search = {str(t): a for t, a in search.items()}
    final = weights_mod.final_state(0, 0, best, search[best_tau]['val_top1'] / 100, tau=best_tau,
                                    tau_search=tau_search)
    dist.on_rank0(save_checkpoint, final, os.path.join(cfg.log_dir, weights_mod.FINAL))
    write_results(run, summary, f'results_{phase}.json', tau=best_tau, tau_search=tau_search)
    return 0


# ---------------------------------------------------------------- training

def train(run, folder, log):
    cfg, ctx, model = run.cfg, run.ctx, placed(run)
    nets = list(cfg.networks.values())  # the config's order, as the original's param groups
    optimizer = torch.optim.SGD([{'params': getattr(model, n.key).parameters(), 'lr': n.lr,
                                  'momentum': n.momentum, 'weight_decay': n.weight_decay} for n in nets])
    ckpt = run.ckpt
    hooks = trainer.training_hooks(run.args, ctx.device, ckpt, log)  # bf16 autocast (--amp) in the training steps only
    start_epoch, start_step, best_epoch, best_acc = 0, 0, 0, 0.0
    best = {n.key: weights_mod.original_layout(getattr(model, n.key)) for n in nets}
    if ckpt is not None:
        load_optimizer(optimizer, ckpt, run.resume_path)
        start_epoch, start_step = int(ckpt['epoch']), int(ckpt.get('step', 0))
        best_epoch, best_acc, best = int(ckpt['best_epoch']), float(ckpt['best_acc']), ckpt['state_dict_best']
        log(f"=> resumed {run.resume_path} (epoch {start_epoch}, step {start_step})")
    seed = trainer.run_seed(run.args, ckpt)
    loader, sampler, steps = data_mod.train_loader(cfg, run.sets['train'], seed, ctx.rank, ctx.world_size,
                                                   cfg.num_workers)
    log(f"=> {len(run.sets['train'])} training images, batch {cfg.batch_size}: {steps} steps per epoch"
        + (f" ({cfg.sampler}, {cfg.num_samples_cls} per class)" if cfg.sampler else ''))
    loss = LOSSES[cfg.loss]()
    # Under torchrun a rank's piece may be smaller than the others' (100 on 8: 13 x 7 and 9); its
    # logged loss carries the same weight.
    weight = cfg.loss_weight * layout.rank_loss_weight(len(sampler.positions), ctx.world_size, cfg.batch_size)
    criterion = loss if weight == 1.0 else (lambda out, y: weight * loss(out, y))
    trained = layout.wrap(model, run.pieces, ctx.device) if ctx.world_size == 1 else \
        nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == 'cuda' else None)
    # DataParallel also spreads the evaluation over the GPUs; otherwise the bare model evaluates
    scorer = trained if isinstance(trained, nn.DataParallel) else model
    trainer.restore_rng(ckpt, seed, ctx.rank, ctx.world_size)

    def latest(epoch, step, meters=None):
        state = {'epoch': epoch, 'state_dict': {n.key: weights_mod.original_layout(getattr(model, n.key))
                                                 for n in nets},
                 'best_epoch': best_epoch, 'best_acc': best_acc, 'state_dict_best': best,
                 'optimizer': optimizer.state_dict(), 'step': step, 'seed': seed,
                 **trainer.step_meters_entry(step, meters),
                 **trainer.resume_entries(ctx.world_size, hooks['amp']),  # collective: every rank builds it
                 'script': weights_mod.SCRIPT, 'config': cfg.path, 'flags': rerun.run_flags(run.args),
                 'log_size': folder.log_sizes().get(LOG, 0)}  # 0 on the ranks that write no log
        folder.save_checkpoint(state, os.path.join(cfg.log_dir, weights_mod.LATEST))

    with trainer.GracefulStop(trainer.console) as stop:
        for epoch in range(start_epoch, cfg.num_epochs):
            for group, net in zip(optimizer.param_groups, nets):
                group['lr'] = cfg.lr_factor_at(epoch + 1, net.lr)
            step0 = start_step if epoch == start_epoch else 0
            trainer.begin_epoch(sampler, loader, seed, epoch, ctx.rank, step0)
            stats = train_one_epoch(trained, criterion, _progress(loader, run, f'epoch {epoch + 1}', len(loader)),
                                    optimizer, ctx.device, epoch, epochs=cfg.num_epochs, print_freq=cfg.display_step,
                                    log=log, should_stop=stop, start_step=step0, num_steps=steps,
                                    start_meters=trainer.resumed_meters(ckpt, step0), **hooks)
            for group, net in zip(optimizer.param_groups, nets):
                folder.scalar(f'lr/{net.key}', group['lr'], epoch + 1)
            folder.scalar('loss/train', stats['loss'], epoch + 1)
            if stats['stopped']:
                latest(epoch, stats['steps'], stats['meters'])
                log(trainer.stop_notice(stop, epoch, cfg.log_dir, stats['steps'], cfg.num_epochs))
                return 128 + stop.signum
            dist.broadcast_buffers(model)  # collective: every rank evaluates rank 0's BatchNorm statistics
            metrics = evaluate_phase(run, scorer, 'val')
            log(f"Epoch [{epoch + 1}/{cfg.num_epochs}] training top-1 {stats['top1']:.3f}")
            summary = report(metrics, 'val', run.train_counts, log)
            for key in ('top1', 'many_shot', 'medium_shot', 'few_shot'):
                if summary[key] is not None:
                    folder.scalar(f'val/{key}', summary[key], epoch + 1)
            if metrics['top1'] / 100 > best_acc:  # the original kept a fraction
                best_epoch, best_acc = epoch + 1, metrics['top1'] / 100
                best = {n.key: weights_mod.original_layout(getattr(model, n.key)) for n in nets}
            latest(epoch + 1, 0)
            if stop(True):
                log(trainer.stop_notice(stop, epoch, cfg.log_dir, epochs=cfg.num_epochs))
                return 128 + stop.signum
    log(f"Best validation accuracy is {100 * best_acc:.3f} at epoch {best_epoch}")
    folder.save_checkpoint(weights_mod.final_state(cfg.num_epochs, best_epoch, best, best_acc),
                           os.path.join(cfg.log_dir, weights_mod.FINAL))
    for n in nets:
        getattr(model, n.key).load_state_dict(strip_prefix(best[n.key], 'module.'))
    phase = data_mod.final_split(cfg.dataset)
    summary = report(evaluate_phase(run, scorer, phase), phase, run.train_counts, log)
    write_results(run, summary, f'results_{phase}.json', best_epoch=best_epoch, best_val_top1=100 * best_acc)
    return 0


def previous_run(args, cfg):
    """--resume, or the latest checkpoint of an unfinished stage of the same flags in the config's log folder,
    which the same command run again continues (rerun.py); a finished stage (its final checkpoint there) is
    refused without --overwrite. Every rank decides alike (they read the same files)."""
    if args.resume and args.overwrite:
        raise UserError("--overwrite starts the stage anew; --resume continues it: pass one of them")
    if args.test or args.resume or args.overwrite:
        return args.resume
    final, latest = (os.path.join(cfg.log_dir, name) for name in (weights_mod.FINAL, weights_mod.LATEST))
    if os.path.isfile(final):
        raise UserError(f"{cfg.log_dir} holds a finished stage ({weights_mod.FINAL}); pass --overwrite to run it "
                        f"again (it removes that stage's checkpoints and results), or --log_dir DIR for a new one")
    if not os.path.isfile(latest):
        return ''
    ckpt = load_checkpoint(latest)
    epoch, step = int(ckpt.get('epoch', 0)), int(ckpt.get('step', 0))
    recorded = ckpt.get('flags') if isinstance(ckpt.get('flags'), dict) else None
    path = rerun.resume_or_refuse(latest, recorded, rerun.run_flags(args), epoch, step, cfg.num_epochs,
                                  cfg.log_dir, '--log_dir DIR', False, finished=False)
    trainer.console(rerun.resume_notice(cfg.log_dir, epoch, step, cfg.num_epochs, path))
    return path


def run_stage(args, cfg):
    ctx = dist.setup(gpu=args.gpu)
    try:
        return _run_stage(args, cfg, ctx)
    finally:
        dist.cleanup()


def _run_stage(args, cfg, ctx):
    folder, pending = None, []

    def log(line, console=None):
        if ctx.rank == 0:
            print(console or line, flush=True)
            if folder is not None:
                folder.write(LOG, line)
            else:
                pending.append(line)  # written into log.txt once the folder is open

    error, run = None, None
    try:
        args.resume = previous_run(args, cfg)
        run = build(args, cfg, ctx, log)
    except UserError as e:
        error = e
    dist.raise_if_any(error)  # collective: a rank that failed must not leave the others waiting
    if args.test:
        return test(run, log)
    # The lock in the log folder: a stage has no model folder of its own.
    outputs = [os.path.join(cfg.log_dir, name) for name in (weights_mod.LATEST, weights_mod.FINAL,
                                                           'results_test.json', 'results_val.json')]
    folder = LogFolder(cfg.log_dir, cfg.log_dir, (LOG,), outputs=outputs)
    resumed_here = run.ckpt is not None and os.path.abspath(os.path.dirname(run.resume_path)) == \
        os.path.abspath(cfg.log_dir)
    try:
        folder.open(truncate_to={LOG: run.ckpt['log_size']} if resumed_here and 'log_size' in run.ckpt else None,
                    fresh=args.overwrite)
    except UserError as e:
        error = e
    dist.raise_if_any(error)  # collective: rank 0 alone opens the folder, every rank must stop if it fails
    for line in pending:
        folder.write(LOG, line)
    try:
        log(f"=> stage config {cfg.path}: {cfg.dataset}, {cfg.num_classes} classes, log folder {cfg.log_dir}")
        return tau_norm(run, log) if cfg.taus is not None else train(run, folder, log)
    finally:
        folder.close()
