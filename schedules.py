"""Learning-rate schedules and train rules: what lr an epoch trains at (--lr_schedule) and how a --train_rule
weighs or samples the classes.

Part of the ground, beside engine.py: plain functions of (epoch, flags) that the run loop (trainer), the
stage-2 script, the ImageNet-LT / iNat configs and the flag parser (cli.py) all read, so none of them needs
the run loop to know a schedule.
"""
import dataclasses
import math
from typing import Callable

from losses import effective_num_weights


WARMUP_EPOCHS = 5
BETA = 0.9999  # effective-number beta of Cui et al. 2019, as in LDAM-DRW


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
    resample: Callable           # drw_epoch -> the first 0-based epoch drawn by class-balanced re-sampling, or None
    weights: Callable            # (epoch, cls_num_list, drw_epoch) -> per-class weights or None


TRAIN_RULES = {
    'None': TrainRule(lambda drw: None, lambda epoch, cls, drw: None),
    'Resample': TrainRule(lambda drw: 0, lambda epoch, cls, drw: None),
    'Reweight': TrainRule(lambda drw: None, lambda epoch, cls, drw: effective_num_weights(cls, BETA)),
    # Deferred re-weighting (Cao et al. 2019): plain (beta=0 -> all ones) until the first LR step.
    'DRW': TrainRule(lambda drw: None,
                     lambda epoch, cls, drw: effective_num_weights(cls, BETA if epoch >= drw else 0.0)),
    # Deferred re-sampling (Cao et al. 2019, Sec. 3.3 and Table 2's DRS; their public code has no DRS rule):
    # plain shuffled epochs until the first LR step, then Resample's sampler.
    'DRS': TrainRule(lambda drw: drw, lambda epoch, cls, drw: None),
}
