"""Command-line plumbing shared by the entry scripts: argument groups, checked types, error exit.

Flags and defaults follow the original repository so that the paper's commands run unchanged;
flags added here never change the meaning of an original one.
"""
import argparse
import sys

from errors import UserError


def _typed(cast, check, what):
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {cast.__name__}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = what
    return parse


positive_int = _typed(int, lambda v: v > 0, 'a positive integer')
nonneg_int = _typed(int, lambda v: v >= 0, 'a non-negative integer')
positive_float = _typed(float, lambda v: v > 0, 'a positive number')
nonneg_float = _typed(float, lambda v: v >= 0, 'a non-negative number')
imb_factor = _typed(float, lambda v: 0 < v <= 1, 'in (0, 1] (the ratio of the smallest to the largest class)')
probability = _typed(float, lambda v: 0 <= v <= 1, 'in [0, 1]')


def str2bool(text):
    """'true'/'false' (also 1/0, yes/no): the original took `--mlp True`, MoCo takes a bare `--mlp`."""
    value = text.strip().lower()
    if value in ('true', '1', 'yes', 'y', 'on'):
        return True
    if value in ('false', '0', 'no', 'n', 'off'):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def add_switch(parser, flag, default, help):
    parser.add_argument(flag, nargs='?', const=True, default=default, type=str2bool, metavar='BOOL',
                        help=f"{help} (bare flag: on; default: {'on' if default else 'off'})")


def add_data_args(parser, datasets, default_exp_str):
    from dataset import DATASETS
    # Names outside DATASETS (pretrain_rot.py's imagenet / inat, read from split files) come last.
    parser.add_argument('--dataset', default='cifar10',
                        choices=[d for d in DATASETS if d in datasets] + [d for d in datasets if d not in DATASETS])
    parser.add_argument('--data_path', default='./data', type=str, help='folder holding the data set files')
    if 'folder' in datasets:
        add_image_size_arg(parser)
    add_download_arg(parser)
    parser.add_argument('--imb_type', default='exp', type=str, help="'exp' or 'step'; anything else is balanced")
    parser.add_argument('--imb_factor', default=0.01, type=imb_factor, help='smallest / largest class size')
    parser.add_argument('--rand_number', default=0, type=int, help='seed of the long-tailed subset selection')
    parser.add_argument('--exp_str', default=default_exp_str, type=str, help='(additional) name to indicate the experiment')


def add_image_size_arg(parser):
    parser.add_argument('--image_size', default=None, type=positive_int, metavar='S',
                        help='--dataset folder: S <= 64: every image resized to S x S px and cached (default: '
                             'the images\' own size, one square size <= 64); S > 64: images streamed from their '
                             'files with ResNet-50 transforms at S px (train.py, pretrain_rot.py, pretrain_moco.py; '
                             '-a resnet50)')


def add_download_arg(parser):
    parser.add_argument('--no-download', dest='download', action='store_false',
                        help='never download CIFAR-10/100 or SVHN files that are missing (default: download them '
                             'into the data folder, md5-checked, as the original did)')


def add_training_args(parser, batch_size=128):
    from losses import LOSSES
    from models import MODELS
    from trainer import LR_SCHEDULES, TRAIN_RULES
    parser.add_argument('-a', '--arch', metavar='ARCH', default='resnet32', choices=list(MODELS),
                        help='model architecture: ' + ' | '.join(MODELS) + ' (default: resnet32)')
    parser.add_argument('--loss_type', default='CE', type=str, choices=list(LOSSES))
    parser.add_argument('--la_tau', default=1.0, type=nonneg_float, metavar='TAU',
                        help='tau of --loss_type LogitAdjusted and LogitAdjustedAdaptive: cross-entropy on logits + '
                             'TAU * log(training class prior) (default: 1.0; the other losses ignore it)')
    parser.add_argument('--posthoc_la', default=None, type=nonneg_float, metavar='TAU',
                        help='post-hoc logit adjustment: the evaluations (after every epoch, and -e) score '
                             'logits - TAU * log(training class prior); training is unchanged (default: off)')
    parser.add_argument('--train_rule', default='None', type=str, choices=list(TRAIN_RULES))
    parser.add_argument('--pretrained_model', type=str, default='', help='self-supervised weights to start from')
    parser.add_argument('--lr_steps', default=[160, 180], type=positive_int, nargs=2, metavar=('E1', 'E2'),
                        help='lr x0.01 after epoch E1, x0.0001 after E2; DRW switches on at E1 (default: 160 180)')
    add_run_args(parser, batch_size)
    _add_recipe_args(parser, LR_SCHEDULES)


def add_run_args(parser, batch_size=128, epochs=200, lr=0.1, weight_decay=2e-4):
    """The flags of a training run whatever it trains (train.py's, train_stage2.py's): device, data loading,
    optimizer, resume, logs, speed."""
    parser.add_argument('--gpu', default=None, type=nonneg_int, help='GPU id to use (default: first GPU, else CPU)')
    parser.add_argument('-j', '--workers', default=None, type=nonneg_int, metavar='N',
                        help='data loading workers of the per-image loader (default: 4; for images read from '
                             'their files (ImageNet, iNaturalist, a streamed folder) the CPU cores this process may '
                             'use less one where there are more, shared by torchrun\'s processes on a node; '
                             'docs/gpu.md)')
    parser.add_argument('--epochs', default=epochs, type=positive_int, metavar='N')
    parser.add_argument('--start-epoch', default=0, type=nonneg_int, metavar='N',
                        help='manual epoch number (useful on restarts)')
    parser.add_argument('-b', '--batch-size', default=batch_size, type=positive_int, metavar='N')
    parser.add_argument('--lr', '--learning-rate', default=lr, type=positive_float, metavar='LR', dest='lr')
    parser.add_argument('--momentum', default=0.9, type=nonneg_float, metavar='M')
    parser.add_argument('--wd', '--weight-decay', default=weight_decay, type=nonneg_float, metavar='W',
                        dest='weight_decay')
    parser.add_argument('-p', '--print-freq', default=10, type=positive_int, metavar='N')
    parser.add_argument('--resume', default='', type=str, metavar='PATH', help='checkpoint to resume from')
    parser.add_argument('-e', '--evaluate', dest='evaluate', action='store_true',
                        help='evaluate the --resume checkpoint on the test set and exit')
    parser.add_argument('--seed', default=None, type=int, help='seed for initializing training')
    parser.add_argument('--root_log', type=str, default='log')
    parser.add_argument('--root_model', type=str, default='./checkpoint')
    parser.add_argument('--sync-bn', default=True, action=argparse.BooleanOptionalAction,
                        help='under torchrun on GPUs, BatchNorm statistics over the batch of all processes '
                             "(SyncBatchNorm), as on the paper's single GPU (default: on; no effect on one "
                             'process or on CPUs)')
    add_speed_args(parser)


def _add_recipe_args(parser, schedules):
    group = parser.add_argument_group("recipe options (added, for modern baselines; all off by default: the "
                                      "paper's recipe)")
    group.add_argument('--autoaugment', action='store_true',
                       help="torchvision's AutoAugment, CIFAR-10 policy, after crop and flip (per image on the "
                            "host: uses --loader torchvision)")
    group.add_argument('--cutout', default=None, type=positive_int, metavar='N',
                       help='Cutout: zero one N x N square per training image after normalisation (DeVries & '
                            'Taylor 2017 used 16 on CIFAR)')
    group.add_argument('--mixup', default=None, type=positive_float, metavar='ALPHA',
                       help='mixup (Zhang et al. 2018): one lambda ~ Beta(ALPHA, ALPHA) per batch, images mixed '
                            'with a random permutation of the batch, loss lam * L(y) + (1 - lam) * L(y_perm)')
    group.add_argument('--lr_schedule', default='step', choices=list(schedules),
                       help='step: 5 warm-up epochs, then x0.01 after --lr_steps E1, x0.0001 after E2 (default); '
                            'cosine: the same warm-up, then lr * (1 + cos(pi * (e - 5) / (epochs - 5))) / 2 for '
                            '1-based epoch e (--lr_steps then only says when DRW switches on); cosine_nowarmup: '
                            'lr * (1 + cos(pi * e / epochs)) / 2 from the first epoch (weight balancing\'s stage 1)')


def recipe_suffix(args):
    """What the recipe options add to a run folder's name: '' with none on, so default names stay the
    original's; e.g. '_aa_cutout16_mixup0.2_cosine'."""
    parts = (['aa'] if args.autoaugment else []) + ([f'cutout{args.cutout}'] if args.cutout else [])
    parts += ([f'mixup{args.mixup:g}'] if args.mixup else [])
    parts += [args.lr_schedule] if args.lr_schedule != 'step' else []
    return ''.join('_' + p for p in parts)


SPEED = 'speed (results change only by float rounding and the random stream)'


def add_speed_args(parser, training=True):
    """How batches are made and run (issue 11); the measurements behind the defaults: bench/README.md.
    `training`: a training script (bf16 for its steps by default); else a prediction script (float32 by default)."""
    group = parser.add_argument_group(SPEED)
    group.add_argument('--loader', default='device', choices=['device', 'torchvision'],
                       help='device: the whole uint8 data set on the training device, each batch cropped, '
                            'flipped and normalised there in one operation (default for the 32x32 data sets; '
                            '-j is then unused); '
                            "torchvision: the original's per-image transforms in -j worker processes")
    _add_layout_and_amp(group, training)
    if training:
        group.add_argument('--amp-eval', default=False, action=argparse.BooleanOptionalAction,
                           help='bf16 autocast in the evaluations too (default: off: the numbers compared with '
                                'the paper are float32)')
    group.add_argument('--compile', default=False, action=argparse.BooleanOptionalAction,
                       help='torch.compile the model (default: off; the first steps compile, minutes on a small CPU)')


def add_step_speed_args(parser):
    """--channels-last and --amp alone, as train.py's: for the training scripts with neither the device
    loader (ImageNet-size images come from worker processes) nor an opt-in bf16 evaluation (every
    evaluation and prediction of pretrain_moco.py and imagenet_inat stays float32)."""
    _add_layout_and_amp(parser.add_argument_group(SPEED), training=True)


def _add_layout_and_amp(group, training):
    group.add_argument('--channels-last', default=True, action=argparse.BooleanOptionalAction,
                       help='NHWC memory layout for model and images (default: on)')
    if training:
        group.add_argument('--amp', default=None, action=argparse.BooleanOptionalAction,
                           help='bf16 autocast in the training steps (default: on with a GPU of compute '
                                'capability 8.0 or later, and on a CPU with native bf16 instructions, '
                                'AVX512-BF16 or AMX)')
        group.add_argument('--cudnn-benchmark', default=None, action=argparse.BooleanOptionalAction,
                           help="cuDNN's search for the fastest convolution algorithms (default: on without "
                                '--seed; off with it, for deterministic algorithms, so that a resumed GPU run is '
                                'bit-exact; reproduce.py turns it on for its ResNet-50 stages)')
    else:
        group.add_argument('--amp', default=False, action=argparse.BooleanOptionalAction,
                           help='bf16 autocast for the prediction (default: off: float32, as the original)')


def store_name(*parts):
    # The original joins with '_' and prints imb_factor as Python prints the float (0.01, 0.02).
    return '_'.join(str(p) for p in parts)


def run_main(main, argv=None):
    """Call `main(argv)`; a UserError becomes one line on stderr and exit status 2."""
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(code or 0)
