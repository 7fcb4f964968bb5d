"""Stage 2 on a train.py / train_semi.py checkpoint (added; not in the original): decoupled classifier learning
(Kang et al., ICLR 2020: cRT, LWS, tau-normalisation) and weight balancing (Alshammari et al., CVPR 2022) for
the 32x32 data sets and a user's image folder (--dataset folder: its classes and image size come with the
stage-1 checkpoint), on the shared trainer.

    python train_stage2.py --dataset cifar10 --imb_factor 0.01 --stage cRT --stage1 <stage-1 ckpt.pth.tar>
    python train_stage2.py --dataset cifar10 --imb_factor 0.01 --stage LWS --stage1 <stage-1 ckpt.pth.tar>
    python train_stage2.py --dataset cifar10 --imb_factor 0.01 --stage tau_norm --stage1 <stage-1 ckpt.pth.tar>
    python train.py --dataset cifar10 --imb_factor 0.01 --wd 5e-3 --exp_str wd5e-3               # WB stage 1
    python train_stage2.py --dataset cifar10 --imb_factor 0.01 --stage WB --stage1 <that run's ckpt.pth.tar>
    python train_stage2.py --dataset cifar10 --stage cRT --resume <stage-2 ckpt.pth.tar> -e      # evaluate

Every stage starts from the stage-1 model and changes its classifier only: the feature extractor's
parameters are frozen and, unless --train_bn, its BatchNorm layers stay in eval mode (running statistics
fixed). --epochs, -b, --lr and --wd default to the stage's authors' values (STAGES). The run folder is
the name of the folder holding --stage1 plus the stage; logs and checkpoints are train.py's.
"""
import dataclasses
import os
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

import cli
import train
import trainer
from checkpoint import HEAD_PREFIXES, load_weights, read_weights
from dataset import DATASETS
from dataset.folder import checked_against_checkpoint
from dataset.device_loader import DeviceLoader
from dataset.samplers import ClassAwareSampler, get_targets
from engine import evaluate, predict
from errors import UserError
from imagenet_inat.networks import LWSClassifier, tau_grid, tau_normalized
from losses import ClassBalancedSoftmaxBCELoss, MaxNorm
from models import build_model

TAUS = tuple(tau_grid())  # Kang et al.'s tau_norm.py grid: 0, 0.1, ..., 2
VAL_SPLIT_SEED = 0  # the carved validation split depends on nothing the user passes
SAMPLES_PER_CLASS = 4  # Kang et al.'s ClassAwareSampler num_samples_cls


class FrozenFeatures(nn.Module):
    """`module` whose layers other than the classifier `fc` stay in eval mode when it trains, so their
    BatchNorm running statistics stay those of stage 1. Named `module` like DDP's wrapper, so that
    checkpoint.unwrap finds the bare model: checkpoints keep train.py's keys."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def train(self, mode=True):
        super().train(mode)
        for name, child in self.module.named_children():
            if name != 'fc':
                child.eval()
        return self

    def forward(self, x):
        return self.module(x)


def freeze_all_but(model, trained):
    """requires_grad only for the parameters named in `trained`: the optimizer skips the others."""
    for name, p in model.named_parameters():
        p.requires_grad = name in trained


def class_aware(train_set, batch_size):
    """Kang et al.'s class-balanced sampling with their epoch of floor(N / batch) steps; at least one step,
    so that a training set smaller than one batch (theirs would train nothing) trains on one batch of
    class-balanced draws."""
    steps = max(1, len(train_set) // batch_size)
    return lambda seed, world, rank: ClassAwareSampler(train_set, SAMPLES_PER_CLASS, seed=seed, num_replicas=world,
                                                       rank=rank, num_samples=steps * batch_size)


def cosine(args):
    """Kang et al.'s and Alshammari et al.'s schedule: cosine from --lr to 0 over --epochs, stepped at each
    epoch's start (the last epoch trains at lr 0, as theirs)."""
    return lambda epoch: trainer.cosine_at_epoch_start(epoch + 1, args.lr, args.epochs)


def crt(model, args, train_set, _info):
    """Classifier re-training: features frozen, the classifier re-initialised as nn.Linear's default (Kang et
    al.'s DotProductClassifier), cross-entropy with class-balanced sampling."""
    freeze_all_but(model, {'fc.weight', 'fc.bias'})
    model.fc.reset_parameters()
    return dict(criterion=nn.CrossEntropyLoss(), sampler=class_aware(train_set, args.batch_size),
                notes=('=> cRT: features frozen, classifier re-initialised, class-balanced sampling',))


def lws(model, args, train_set, _info):
    """Learnable weight scaling: the stage-1 classifier frozen, logits (W x + b) * s with one learned s per
    class, cross-entropy with class-balanced sampling."""
    freeze_all_but(model, {'fc.scales'})
    return dict(criterion=nn.CrossEntropyLoss(), sampler=class_aware(train_set, args.batch_size),
                notes=('=> LWS: features and classifier frozen, one scale per class learned, class-balanced '
                       'sampling',))


def lws_head(model):
    """The stage-1 linear classifier inside Kang et al.'s LWSClassifier (scales 1)."""
    head = LWSClassifier(model.fc.in_features, model.fc.out_features)
    head.fc.load_state_dict(model.fc.state_dict())
    model.fc = head
    return model


def weight_balancing(model, args, train_set, _info):
    """Alshammari et al.'s stage 2: the classifier (weight and bias) fine-tuned with their class-balanced
    loss and weight decay, MaxNorm after every step with the radius set from the stage-1 weights."""
    freeze_all_but(model, {'fc.weight', 'fc.bias'})
    maxnorm = MaxNorm.from_weight(model.fc.weight, args.maxnorm_thresh)
    return dict(criterion=ClassBalancedSoftmaxBCELoss(train_set.get_cls_num_list()),
                after_step=lambda: maxnorm(model.fc.weight),
                notes=(f"=> WB: features frozen, classifier fine-tuned with the class-balanced loss (beta 0.9999), "
                       f"MaxNorm radius {maxnorm.radius:.6g} (thresh {args.maxnorm_thresh:g} of the stage-1 row "
                       f"norms' range) after every step",))


def carve_val(train_set, per_class):
    """Up to `per_class` training images of each class (all of a smaller class), drawn by a fixed seed."""
    targets = get_targets(train_set)
    rng = np.random.RandomState(VAL_SPLIT_SEED)
    return np.concatenate([rng.permutation(np.flatnonzero(targets == c))[:per_class] for c in np.unique(targets)])


def choose_tau(model, args, train_set, info):
    """(tau, log lines): the grid's tau with the best mean per-class accuracy on the carved validation
    split (Kang et al. printed that mean), the first of equal ones. On the CPU, in float32."""
    index = carve_val(train_set, args.val_per_class)
    loader = DeviceLoader.from_dataset(train_set, index.tolist(), 250, 'cpu', info, train=False,
                                       channels_last=False)
    features, labels = predict(model, loader, torch.device('cpu'), forward=lambda x: features_of(model, x))
    weight = model.fc.weight.detach().cpu()
    head = nn.Linear(weight.size(1), weight.size(0), bias=False)
    scores, lines = {}, []
    for tau in TAUS:
        head.weight.data.copy_(tau_normalized(weight, tau))
        per_class = evaluate(head, nn.CrossEntropyLoss(), [(features, labels)], torch.device('cpu'),
                             info.num_classes)['per_class']
        scores[tau] = float(np.nanmean(per_class))
        lines.append(f"tau {tau:.2f}: carved-val mean per-class accuracy {100 * scores[tau]:.3f}")
    best = max(TAUS, key=lambda t: scores[t])
    lines.append(f"=> tau-norm: tau {best:.2f} chosen on the validation split carved from the training set "
                 f"({len(index)} images, up to {args.val_per_class} per class, seed {VAL_SPLIT_SEED}), "
                 f"never on the test set")
    return best, lines


def features_of(model, images):
    """The penultimate-layer features (N, D) of a models/ network."""
    model.return_features = True
    try:
        return model(images)[1]
    finally:
        model.return_features = False


def tau_norm(model, args, train_set, info):
    """tau-normalisation (no training): row i of W divided by ||W_i||^tau and no bias, as Kang et al.'s
    tau_norm.py; tau from --tau, else chosen on a validation split carved from the training set."""
    if args.tau is not None:
        tau, lines = args.tau, [f"=> tau-norm: tau {args.tau:g} given by --tau (no search)"]
    elif info.transform is not None:
        raise UserError("--stage tau_norm searches tau on images held in an array; images streamed from their files "
                        "(--image_size above 64) have none: pass --tau")
    else:
        tau, lines = choose_tau(model, args, train_set, info)
    with torch.no_grad():
        model.fc.weight.copy_(tau_normalized(model.fc.weight, tau))
        model.fc.bias.zero_()
    freeze_all_but(model, set())
    return dict(trains=False, notes=tuple(lines))


@dataclasses.dataclass(frozen=True)
class Stage:
    prepare: Callable            # (stage-1 model, args, train set, resolved data set) -> trainer.Experiment fields
    epochs: int                  # the authors' defaults
    lr: float
    batch_size: int
    weight_decay: float
    head: Callable = staticmethod(lambda model: model)  # the stage's classifier on a plain model
    loads_head: bool = True      # whether the stage-1 classifier is used (cRT re-initialises it)


STAGES = {
    # Kang et al.'s ImageNet-LT cls_crt.yaml / cls_lws.yaml (they published no CIFAR configuration).
    'cRT': Stage(crt, epochs=10, lr=0.2, batch_size=512, weight_decay=5e-4, loads_head=False),
    'LWS': Stage(lws, epochs=5, lr=0.2, batch_size=512, weight_decay=5e-4, head=lws_head),
    # Nothing is trained: one "epoch" of no steps evaluates and saves.
    'tau_norm': Stage(tau_norm, epochs=1, lr=0.1, batch_size=128, weight_decay=0.0),
    # Alshammari et al.'s demo2_second-stage-training (CIFAR-100-LT).
    'WB': Stage(weight_balancing, epochs=10, lr=0.01, batch_size=64, weight_decay=0.1),
}


# a stage's own flag -> (the stage, its default); --tau has none: without it, tau_norm searches
STAGE_FLAGS = {'tau': ('tau_norm', None), 'val_per_class': ('tau_norm', 20), 'maxnorm_thresh': ('WB', 0.1)}


def build_parser():
    parser = _Parser(description=__doc__)
    cli.add_data_args(parser, tuple(DATASETS), '')
    group = parser.add_argument_group('stage 2')
    group.add_argument('--stage', required=True, choices=list(STAGES))
    group.add_argument('--stage1', default='', metavar='PATH',
                       help='the train.py / train_semi.py checkpoint to start from (required unless -e)')
    group.add_argument('--train_bn', action='store_true',
                       help="BatchNorm layers of the frozen features in train mode (their running statistics "
                            "update, as Kang et al.'s and Alshammari et al.'s code did); default: eval mode")
    group.add_argument('--tau', default=None, type=cli.nonneg_float,
                       help='tau_norm: this tau instead of the search over 0, 0.1, ..., 2')
    group.add_argument('--val_per_class', default=None, type=cli.positive_int, metavar='K',
                       help='tau_norm: the tau search scores K training images per class (all of a smaller '
                            'class; default 20, as ImageNet-LT\'s validation split)')
    group.add_argument('--maxnorm_thresh', default=None, type=cli.probability, metavar='T',
                       help='WB: MaxNorm radius min + T * (max - min) of the stage-1 classifier row norms '
                            '(default 0.1, the authors\')')
    cli.add_run_args(parser, batch_size=None, epochs=None, lr=None, weight_decay=None)
    return parser


class _Parser(cli.ArgumentParser):
    """Fills in the stage's own epochs, lr, batch size and weight decay where the flags give none, so that
    whoever parses the flags (this script, reproduce.py deciding whether a run is finished) sees the same."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        for key in ('epochs', 'lr', 'batch_size', 'weight_decay'):
            if getattr(parsed, key) is None:
                setattr(parsed, key, getattr(STAGES[parsed.stage], key))
        if parsed.stage == 'tau_norm':
            parsed.epochs = 1
        return parsed


def parse(argv):
    """The arguments, the stage's defaults filled in, and what the trainer reads that stage 2 fixes."""
    args = build_parser().parse_args(argv)
    stage = STAGES[args.stage]
    for flag, (owner, default) in STAGE_FLAGS.items():
        if getattr(args, flag) is not None and args.stage != owner:
            raise UserError(f"--{flag} applies to --stage {owner} only, not {args.stage}")
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    # train.py's method flags: stage 2 brings its own loss, sampler and schedule (trainer.Experiment).
    args.loss_type, args.train_rule, args.la_tau, args.lr_steps = 'CE', 'None', 1.0, [160, 180]
    args.pretrained_model, args.posthoc_la = '', None
    args.arch = None  # the stage-1 checkpoint's (read_start, before the data)
    # train.py's recipe options: stage 2 trains on the paper's augmentation
    args.autoaugment, args.cutout, args.mixup, args.lr_schedule = False, None, None, 'step'
    return args, stage


def read_start(args):
    """(checkpoint, its canonical weights) stage 2 starts from: --stage1's, or with -e the --resume stage-2
    checkpoint's, read before the data: its `arch` is the model's (the data check needs it), its image side a
    folder's default --image_size."""
    if args.evaluate:
        if not args.resume:
            raise UserError("-e/--evaluate needs a checkpoint: pass --resume PATH")
        ckpt, sd = read_weights(args.resume, 'classification', 'stage 2 evaluates a train_stage2.py checkpoint')
        args.store_name = str(ckpt.get('store_name', 'stage2'))
    elif not args.stage1:
        raise UserError("--stage1 PATH is required to train (also with --resume): the stage-1 checkpoint")
    else:
        ckpt, sd = read_stage1(args)
    args.arch = ckpt.get('arch', 'resnet32')  # the checkpoints' `arch`
    args.image_size = args.image_size or ckpt.get('image_size')
    return ckpt, sd


def load(args):
    """(checkpoint weights, data set info, training set, test set): read_start, then train.py's data, a
    folder's classes and image side checked against the checkpoint's (its statistics used)."""
    ckpt, sd = read_start(args)
    info, train_set, val_set = train.load_data(args)
    flag = f"--resume {args.resume}" if args.evaluate else f"--stage1 {args.stage1}"
    return sd, checked_against_checkpoint(info, ckpt, flag), train_set, val_set


def read_stage1(args):
    """(checkpoint, its canonical weights), refusing one of another data set or without a linear
    classifier, before anything is written."""
    ckpt, sd = read_weights(args.stage1, 'classification', 'stage 2 starts from a train.py or train_semi.py '
                            'checkpoint (a classifier)', flag='--stage1')
    if 'fc.weight' not in sd:
        raise UserError(f"--stage1 {args.stage1} holds no classifier (fc) (a self-supervised checkpoint?); stage 2 "
                        f"starts from a train.py or train_semi.py checkpoint")
    trained_on = str(ckpt.get('store_name', '')).split('_')[0]
    if trained_on in DATASETS and trained_on != args.dataset:
        raise UserError(f"--stage1 {args.stage1} was trained on {trained_on}, not --dataset {args.dataset}")
    if 'fc.bias' not in sd and STAGES[args.stage].loads_head:  # a cosine NormedLinear head (LDAM) has no bias
        raise UserError(f"--stage1 {args.stage1} has a cosine (NormedLinear, LDAM) classifier; --stage "
                        f"{args.stage} rescales a linear one: use cRT, or a CE / Focal stage 1")
    return ckpt, sd


def stage2_store_name(args):
    """The run folder's name: the name of the folder holding --stage1 (a train.py run folder is named after
    its run), the stage, and --exp_str if given; known from the flags alone, so reproduce.py names a
    stage-2 run before its stage 1 has run, and a stage-2 run never writes into its stage-1 run."""
    base = os.path.basename(os.path.dirname(os.path.abspath(args.stage1)))
    return cli.store_name(base, args.stage, *([args.exp_str] if args.exp_str else []))


def build(args, stage, sd, info, train_set):
    """The stage-2 model and the Experiment fields of its stage."""
    if args.evaluate:
        return stage.head(build_model(args.arch, info.num_classes)), {}
    linear = 'fc.bias' in sd  # a cosine NormedLinear head (LDAM) has none, and its weight is D x C
    classes = sd['fc.weight'].shape[0] if linear else sd['fc.weight'].shape[1]
    if classes != info.num_classes:
        raise UserError(f"--stage1 {args.stage1} was trained for another number of classes ({classes}; "
                        f"--dataset {args.dataset} has {info.num_classes})")
    model = build_model(args.arch, info.num_classes)
    if stage.loads_head:
        load_weights(model, sd, f"--stage1 {args.stage1}")
    else:
        load_weights(model, {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIXES)},
                     f"--stage1 {args.stage1}", allow_missing=HEAD_PREFIXES)
    args.store_name = stage2_store_name(args)
    model = stage.head(model)
    # tau_norm trains nothing, so its schedule is never asked
    return model, {'schedule': cosine(args), **stage.prepare(model, args, train_set, info)}


def main(argv=None):
    args, stage = parse(argv)
    trainer.seed(args)
    sd, info, train_set, val_set = load(args)
    model, fields = build(args, stage, sd, info, train_set)
    notes = fields.pop('notes', ()) + ((f"=> BatchNorm of the frozen features in "
                                        f"{'train' if args.train_bn else 'eval'} mode"),)
    experiment = trainer.Experiment(script='train_stage2', task='classification',
                                    model=model if args.train_bn else FrozenFeatures(model), train_set=train_set,
                                    val_set=val_set, num_classes=info.num_classes,
                                    cls_num_list=train_set.get_cls_num_list(), notes=notes, info=info, **fields)
    return train.exit_code(trainer.run(args, experiment))


if __name__ == '__main__':
    cli.run_main(main)
