"""Stage 2 on a train.py / train_semi.py checkpoint (added; not in the original): decoupled classifier learning
(Kang et al., ICLR 2020: cRT, LWS, tau-normalisation, the nearest-class-mean classifier NCM) and weight
balancing (Alshammari et al., CVPR 2022) for the 32x32 data sets and a user's image folder (--dataset folder:
its classes and image size come with the stage-1 checkpoint), on the shared trainer.

    python train_stage2.py --dataset cifar10 --imb_factor 0.01 --stage cRT --stage1 <stage-1 ckpt.pth.tar>
    python train_stage2.py --dataset cifar10 --imb_factor 0.01 --stage LWS --stage1 <stage-1 ckpt.pth.tar>
    python train_stage2.py --dataset cifar10 --imb_factor 0.01 --stage tau_norm --stage1 <stage-1 ckpt.pth.tar>
    python train_stage2.py --dataset cifar10 --imb_factor 0.01 --stage NCM --stage1 <stage-1 ckpt.pth.tar>
    python train_stage2.py --dataset cifar10 --imb_factor 0.01 --stage WB --stage1 <a WB stage 1 (docs/baselines.md)>
    python train_stage2.py --dataset cifar10 --stage cRT --resume <stage-2 ckpt.pth.tar> -e      # evaluate

Every stage starts from the stage-1 model and changes its classifier only: the feature extractor's
parameters are frozen; its BatchNorm layers train as the authors' code ran them (running statistics
update on stage 2's batches) unless --freeze_bn. --epochs, -b, --lr and --wd default to the stage's
authors' values (STAGES). The run folder is the name of the folder holding --stage1 plus the stage; logs
and checkpoints are train.py's. docs/baselines.md has the recipes and where they come from.
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
from dataset.folder import list_class_folders, load_images
from dataset.samplers import ClassAwareSampler
from engine import evaluate, predict
from errors import UserError
from imagenet_inat.networks import LWSClassifier, NCMClassifier, tau_grid, tau_normalized
from losses import ClassBalancedSoftmaxBCELoss, MaxNorm
from models import build_model

TAUS = tuple(tau_grid())  # Kang et al.'s tau_norm.py grid: 0, 0.1, ..., 2
DEFAULT_TAU = 1.0  # the published tau-norm rows' (Menon et al.'s Table 3, Bag of Tricks' TAU: 1.0)
SAMPLES_PER_CLASS = 4  # Kang et al.'s ClassAwareSampler num_samples_cls


class FrozenFeatures(nn.Module):
    """`module` whose layers other than the classifier `fc` stay in eval mode when it trains, so their
    BatchNorm running statistics stay those of stage 1 (--freeze_bn; the authors' code let them update).
    Named `module` like DDP's wrapper, so that checkpoint.unwrap finds the bare model: checkpoints keep
    train.py's keys."""

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
    loss and weight decay, MaxNorm with the radius set from the stage-1 weights, applied where their code
    applies it: once per epoch, after its last step (LTR-weight-balancing utils/trainval.py, `pgdFunc.PGD(model)`
    at the end of the training phase, line 142), before the epoch's evaluation."""
    freeze_all_but(model, {'fc.weight', 'fc.bias'})
    maxnorm = MaxNorm.from_weight(model.fc.weight, args.maxnorm_thresh)
    when = 'after_step' if args.maxnorm_per_step else 'after_epoch'
    return dict(criterion=ClassBalancedSoftmaxBCELoss(train_set.get_cls_num_list()),
                **{when: lambda: maxnorm(model.fc.weight)},
                notes=(f"=> WB: features frozen, classifier fine-tuned with the class-balanced loss (beta 0.9999), "
                       f"MaxNorm radius {maxnorm.radius:.6g} (thresh {args.maxnorm_thresh:g} of the stage-1 row "
                       f"norms' range) " + ("after every step (--maxnorm_per_step)" if args.maxnorm_per_step else
                                            "after each epoch's last step"),))


def training_features(model, train_set, info):
    """(features (N, D), labels (N,)) of the training images without augmentation (Kang et al.'s `train_plain`),
    the model in eval mode; on the CPU, in float32."""
    loader = DeviceLoader.from_dataset(train_set, range(len(train_set)), 250, 'cpu', info, train=False,
                                       channels_last=False)
    return predict(model, loader, torch.device('cpu'), forward=lambda x: features_of(model, x))


def held_out_features(model, args, info):
    """(features (N, D), labels (N,), how many classes have images) of --tau_search DIR (DIR/<class>/...), decoded
    at the stage-1 image size and normalised as its data; class folders are named after the stage-1 classes (a
    folder's names; 0, 1, ... for the built-in data sets)."""
    root = args.tau_search
    if not os.path.isdir(root):
        raise UserError(f"--tau_search {root}: no such folder (expected {root}/<class>/<images>)")
    evaluated = os.path.join(args.data_path, 'val')
    if args.dataset == 'folder' and os.path.isdir(evaluated) and os.path.samefile(root, evaluated):
        raise UserError(f"--tau_search {root} is the folder the test results are measured on; tau is never chosen "
                        f"on the test set: pass a folder of other images")
    classes = list(info.classes) if info.classes else [str(c) for c in range(info.num_classes)]
    listing = list_class_folders(root, classes)
    (images,) = load_images(listing, image_size=info.image_size)
    loader = DeviceLoader(images, listing.labels, range(len(images)), 250, 'cpu', info.mean, info.std, train=False,
                          channels_last=False)
    features, labels = predict(model, loader, torch.device('cpu'), forward=lambda x: features_of(model, x))
    return features, labels, len(set(listing.labels.tolist()))


def choose_tau(model, args, info):
    """(tau, log lines): the grid's tau with the best mean per-class accuracy (the number Kang et al.'s
    tau_norm.py printed) on --tau_search's images, which stage 1 never trained on; of equal best ones, the one
    nearest DEFAULT_TAU. When every tau scores the same the search carries no information: a warning, and
    DEFAULT_TAU."""
    features, labels, present = held_out_features(model, args, info)
    weight = model.fc.weight.detach().cpu()
    head = nn.Linear(weight.size(1), weight.size(0), bias=False)
    scores, lines = {}, []
    for tau in TAUS:
        head.weight.data.copy_(tau_normalized(weight, tau))
        per_class = evaluate(head, nn.CrossEntropyLoss(), [(features, labels)], torch.device('cpu'),
                             info.num_classes)['per_class']
        scores[tau] = float(np.nanmean(per_class))
        lines.append(f"tau {tau:.2f}: --tau_search mean per-class accuracy {100 * scores[tau]:.3f}")
    where = f"the {len(labels)} images of {present} classes in --tau_search {args.tau_search}"
    if len(set(scores.values())) == 1:
        line = (f"every tau of 0, 0.1, ..., 2 scores {100 * scores[TAUS[0]]:.3f} on {where}: the search cannot "
                f"choose; using tau {DEFAULT_TAU:g}, the default")
        trainer.warn(line)
        return DEFAULT_TAU, lines + [f"=> tau-norm: {line}"]
    top = max(scores.values())
    best = min((t for t in TAUS if scores[t] == top), key=lambda t: abs(t - DEFAULT_TAU))
    return best, lines + [f"=> tau-norm: tau {best:.2f} chosen on {where} (best mean per-class accuracy), never on "
                          f"the test set"]


def features_of(model, images):
    """The penultimate-layer features (N, D) of a models/ network."""
    model.return_features = True
    try:
        return model(images)[1]
    finally:
        model.return_features = False


def refuse_streamed(info, what):
    if info.transform is not None:
        raise UserError(f"{what} reads images held in an array; images streamed from their files (--image_size "
                        f"above 64) have none")


def tau_norm(model, args, _train_set, info):
    """tau-normalisation (no training): row i of W divided by ||W_i||^tau and no bias, as Kang et al.'s
    tau_norm.py; tau from --tau (default 1), or searched on --tau_search's images."""
    if args.tau_search is None:
        given = 'given by --tau' if args.tau is not None else 'the default (--tau)'
        tau = DEFAULT_TAU if args.tau is None else args.tau
        lines = [f"=> tau-norm: tau {tau:g}, {given}; no search"]
    else:
        refuse_streamed(info, '--tau_search')
        tau, lines = choose_tau(model, args, info)
    with torch.no_grad():
        model.fc.weight.copy_(tau_normalized(model.fc.weight, tau))
        model.fc.bias.zero_()
    freeze_all_but(model, set())
    return dict(trains=False, notes=tuple(lines))


def ncm_head(model):
    """Kang et al.'s nearest-class-mean classifier in place of the linear one (its centroids set by `ncm`)."""
    model.fc = NCMClassifier(model.fc.in_features, model.fc.out_features)
    return model


def ncm(model, _args, train_set, info):
    """NCM (no training): the classifier is the nearest class mean of stage 1's features of the training images
    (Kang et al.'s `--knn` test: cl2n features, squared L2 distance)."""
    refuse_streamed(info, '--stage NCM')
    features, labels = training_features(model, train_set, info)
    model.fc.fit(features, labels)
    freeze_all_but(model, set())
    return dict(trains=False, notes=(f"=> NCM: class means of the stage-1 features of the {len(labels)} training "
                                     f"images (no augmentation), centred on their mean and L2-normalised; logits "
                                     f"-||x - mean_c||^2",))


@dataclasses.dataclass(frozen=True)
class Stage:
    prepare: Callable            # (stage-1 model, args, train set, resolved data set) -> trainer.Experiment fields
    epochs: int                  # the authors' defaults
    lr: float
    batch_size: int
    weight_decay: float
    head: Callable = staticmethod(lambda model: model)  # the stage's classifier on a plain model
    loads_head: bool = True      # whether the stage-1 classifier is used (cRT re-initialises it)
    trains: bool = True          # False: one "epoch" of no steps evaluates and saves


STAGES = {
    # Kang et al.'s ImageNet-LT cls_crt.yaml / cls_lws.yaml (they published no CIFAR configuration).
    'cRT': Stage(crt, epochs=10, lr=0.2, batch_size=512, weight_decay=5e-4, loads_head=False),
    'LWS': Stage(lws, epochs=5, lr=0.2, batch_size=512, weight_decay=5e-4, head=lws_head),
    'tau_norm': Stage(tau_norm, epochs=1, lr=0.1, batch_size=128, weight_decay=0.0, trains=False),
    'NCM': Stage(ncm, epochs=1, lr=0.1, batch_size=128, weight_decay=0.0, head=ncm_head, loads_head=False,
                 trains=False),
    # Alshammari et al.'s demo2_second-stage-training (CIFAR-100-LT).
    'WB': Stage(weight_balancing, epochs=10, lr=0.01, batch_size=64, weight_decay=0.1),
}


# a stage's own flag -> (the stage, its default); --tau stays None when not given (tau_norm then uses DEFAULT_TAU
# and says so in its log)
STAGE_FLAGS = {'tau': ('tau_norm', None), 'tau_search': ('tau_norm', None), 'maxnorm_thresh': ('WB', 0.1),
               'maxnorm_per_step': ('WB', False)}


def build_parser():
    parser = _Parser(description=__doc__)
    cli.add_data_args(parser, tuple(DATASETS), '')
    group = parser.add_argument_group('stage 2')
    group.add_argument('--stage', required=True, choices=list(STAGES))
    group.add_argument('--stage1', default='', metavar='PATH',
                       help='the train.py / train_semi.py checkpoint to start from (required unless -e)')
    group.add_argument('--freeze_bn', action='store_true',
                       help="BatchNorm layers of the frozen features in eval mode (their running statistics stay "
                            "stage 1's); default: train mode, the statistics update, as Kang et al.'s and "
                            "Alshammari et al.'s code ran stage 2")
    group.add_argument('--tau', default=None, type=cli.nonneg_float,
                       help=f'tau_norm: rows of W divided by their norm to this power (default {DEFAULT_TAU:g})')
    group.add_argument('--tau_search', default=None, metavar='DIR',
                       help='tau_norm: choose tau from 0, 0.1, ..., 2 by the mean per-class accuracy on the images '
                            'of DIR/<class>/..., images stage 1 never trained on (class folders named as the stage-1 '
                            'classes: a folder\'s names, 0, 1, ... for the built-in data sets)')
    group.add_argument('--maxnorm_thresh', default=None, type=cli.probability, metavar='T',
                       help='WB: MaxNorm radius min + T * (max - min) of the stage-1 classifier row norms '
                            '(default 0.1, the authors\')')
    group.add_argument('--maxnorm_per_step', default=None, action='store_const', const=True,
                       help="WB: MaxNorm after every optimizer step, as the paper's text says, instead of once per "
                            "epoch after its last step, as the authors' code does (default)")
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
        if not STAGES[parsed.stage].trains:
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
    if args.tau is not None and args.tau_search is not None:
        raise UserError("--tau fixes tau and --tau_search searches it: pass one of them")
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
    notes = fields.pop('notes', ()) + (() if not stage.trains else
                                       ("=> BatchNorm of the frozen features in eval mode (--freeze_bn): running "
                                        "statistics fixed",) if args.freeze_bn else
                                       ("=> BatchNorm of the frozen features in train mode: running statistics "
                                        "update on stage 2's batches (--freeze_bn keeps stage 1's)",))
    experiment = trainer.Experiment(script='train_stage2', task='classification',
                                    model=FrozenFeatures(model) if args.freeze_bn else model, train_set=train_set,
                                    val_set=val_set, num_classes=info.num_classes,
                                    cls_num_list=train_set.get_cls_num_list(), notes=notes, info=info, **fields)
    return train.exit_code(trainer.run(args, experiment))


if __name__ == '__main__':
    cli.run_main(main)
