"""train_ssl.py's flags -> the trainer.Experiment that runs them: the split, the network, the step with its
add-ons, the weight average, the loaders. Every refusal happens here, before anything is written."""
import dataclasses

import numpy as np

import trainer
from dataset import build_transform, dataset_info
from dataset.ltssl_split import draw_split
from dataset.samplers import get_targets
from dataset.ssl_loader import SSLLoader, SSLSource
from errors import UserError
from ltssl import check_combination
from ltssl.abc_head import ABC
from ltssl.darp import DARP
from ltssl.diagnostics import LOG, PseudoLabelStats
from ltssl.ema import EMA
from ltssl.fixmatch import FixMatchStep, SupervisedStep
from ltssl.method import SSLMethod
from ltssl.net import SSLNet
from ltssl.protocols import NORMALISATION, SPLIT_NUM_VALID
from models import build_model


def load_split(args):
    """(DatasetInfo with the protocol's mean / std, the pool's images, its labels, Split, test set)."""
    info = dataset_info(args.dataset)
    mean, std = NORMALISATION.get((args.protocol, args.dataset), (info.mean, info.std))
    info = dataclasses.replace(info, mean=mean, std=std)
    pool = info.build_train(args.data_path, 'exp', None, 0, None, download=args.download)
    labels = get_targets(pool)
    split = draw_split(args.protocol, labels, args.num_max, args.num_max_u, args.imb_factor, args.imb_factor_unlabel,
                       args.rand_number, reverse=args.unlabel_order == 'reversed',
                       num_valid=SPLIT_NUM_VALID.get((args.protocol, args.dataset), 0),
                       names=getattr(pool, 'classes', None))
    val_set = info.build_val(args.data_path, build_transform(args.dataset, train=False, info=info),
                             download=args.download)
    return info, pool.data, labels, split, val_set


def darp_target(args, split):
    """DARP's target class totals (sum: the unlabeled images): the labeled distribution scaled (USB), the
    configured unlabeled counts (DASO, consistent settings), or an estimate read from a file (DASO's
    darp_estim/*.npyz, mismatched settings)."""
    num_unlabeled = sum(split.counts_u)
    if args.darp_target == 'labeled':
        if args.unlabel_order == 'reversed':
            raise UserError("--darp_target labeled assumes the unlabeled data follow the labeled distribution, which "
                            "--unlabel_order reversed turns around; pass an estimate: --darp_target PATH (a .npy of "
                            "per-class weights, e.g. DASO's darp_estim files)")
        counts = np.asarray(split.counts_l, dtype=np.float64)
        return counts / counts.sum() * num_unlabeled
    if args.darp_target == 'configured':
        return np.asarray(split.counts_u, dtype=np.float64)
    try:
        estimate = np.asarray(np.load(args.darp_target, allow_pickle=False), dtype=np.float64).reshape(-1)
    except (OSError, ValueError) as e:
        raise UserError(f"--darp_target {args.darp_target}: cannot read a NumPy array from it ({e})") from None
    if len(estimate) != len(split.counts_u) or not np.all(estimate >= 0) or estimate.sum() <= 0:
        raise UserError(f"--darp_target {args.darp_target}: expected {len(split.counts_u)} non-negative class weights, "
                        f"found {estimate.tolist()[:12]}")
    return num_unlabeled * estimate / estimate.sum()


def build_addons(args, split):
    total = args.epochs * args.eval_step
    if args.imb_alg == 'abc':
        return [ABC(split.counts_l, args.epochs, args.abc_threshold, args.abc_weight)]
    if args.imb_alg == 'darp':
        start = round(args.darp_warmup * args.epochs) * args.eval_step
        if start >= total:
            print(f"Note: --darp_warmup {args.darp_warmup:g} of {args.epochs} epochs leaves no step to refine in")
        return [DARP(len(split.unlabeled), len(split.counts_l), darp_target(args, split), start, args.darp_every,
                     args.darp_alpha, args.darp_iter_T, args.darp_tol, args.darp_mask == 'refined')]
    return []


def build(args):
    """(the trainer.Experiment of train_ssl.py's `args` (presets applied), the Split)."""
    check_combination(args.ssl_alg, args.imb_alg)
    info, images, labels, split, val_set = load_split(args)
    num_classes = len(split.counts_l)
    addons = build_addons(args, split)
    classifier = build_model(args.arch, num_classes)
    heads = {name: head for a in addons for name, head in a.heads(classifier.fc.in_features, num_classes).items()}
    net = SSLNet(classifier, heads)
    semi = args.ssl_alg == 'fixmatch'
    stats = PseudoLabelStats(labels[split.unlabeled], split.counts_u) if semi else None
    step = FixMatchStep(args.threshold, args.lambda_u, addons, stats) if semi else SupervisedStep()
    recipe = {k: getattr(args, k) for k in ('lr', 'momentum', 'weight_decay', 'nesterov', 'wd_bn_bias',
                                            'lr_schedule')}
    recipe['total_steps'] = args.epochs * args.eval_step
    method = SSLMethod(net, step, addons, EMA(net, args.ema_decay, args.ema_style), stats,
                       f"{args.ssl_alg}+{args.imb_alg}", recipe)
    lb, ulb = images[split.labeled], images[split.unlabeled]

    def train_loader(seed, rank, world, device):
        if args.batch_size % world or (args.mu * args.batch_size) % world:
            raise UserError(f"-b {args.batch_size} and --mu {args.mu}: the labeled ({args.batch_size}) and unlabeled "
                            f"({args.mu * args.batch_size}) batches must divide among the {world} processes")
        pil = args.loader == 'torchvision'
        source = SSLSource(lb, labels[split.labeled], ulb, args.batch_size, args.mu, info.mean, info.std,
                           flip=info.flip, seed=seed, rank=rank, world=world, device='cpu' if pil else device,
                           pil=pil, unlabeled=semi)
        return SSLLoader(source, args.eval_step, device, trainer.loader_workers(args, info) if pil else 0)

    return trainer.Experiment(
        script='train_ssl', task='classification', model=net, train_set=None, val_set=val_set,
        num_classes=num_classes, cls_num_list=list(split.counts_l), info=info, after_step=method.after_step,
        optimizer=method.optimizer, step_fn=step, step_lr=method.step_lr, train_loader=train_loader,
        eval_model=method.eval_model, state=method, logs=(LOG,) if semi else (), epoch_lines=method.epoch_lines), split
