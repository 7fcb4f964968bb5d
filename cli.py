"""Command-line plumbing shared by the entry scripts: the parser (one-line errors, every default in
--help, flags in groups), checked types, run folder names, error exit.

Flags and defaults follow the original repository so that the paper's commands run unchanged;
flags added here never change the meaning of an original one.
"""
import argparse
import difflib
import gc
import os
import re
import sys

from errors import UserError

# --help's groups, in this order (a script adds its own after them).
DATA, METHOD, SCHEDULE, RUN, DISTRIBUTED = 'data', 'model and method', 'schedule', 'run and output', 'distributed'
SPEED = 'speed (results change only by float rounding and the random stream)'


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default after its help (unless the help says it)."""

    def _get_help_string(self, action):
        text = action.help or ''
        shown = default_text(action)
        if shown is None or 'default' in text:
            return text
        return f"{text} (default: {shown})".lstrip()


def default_text(action):
    """A flag's default as --help shows it ('%'-escaped), or None where there is nothing to show."""
    value = action.default
    if not action.option_strings or value is None or value is False or value == '' or value is argparse.SUPPRESS \
            or isinstance(action, argparse._HelpAction):
        return None
    if isinstance(action, argparse.BooleanOptionalAction):
        value = 'on' if value else 'off'
    elif isinstance(value, (list, tuple)):
        value = ' '.join(map(str, value))
    return str(value).replace('%', '%%')


class ArgumentParser(argparse.ArgumentParser):
    """argparse as the scripts use it: a bad argument is one `error:` line, with a "did you mean" where a
    flag or choice is close (the usage block only with --help); --help shows every default; `finish`
    registers what fills in defaults that depend on other flags, run after every parse (so whoever parses a
    script's flags, the script or reproduce.py naming its run folders, sees the same values)."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
        self._finishers = []

    def finish(self, fn):
        self._finishers.append(fn)

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        for fn in self._finishers:
            fn(parsed)
        return parsed, rest

    def format_help(self):
        for action in self._actions:
            # argparse prints no help line at all (so no default) for a flag without help
            if not action.help and default_text(action) is not None:
                action.help = f"(default: {default_text(action)})"
        return super().format_help()

    def error(self, message):
        print(f"error: {message}{self.suggestion(message)}", file=sys.stderr, flush=True)
        sys.exit(2)

    def suggestion(self, message):
        """'; did you mean X?' for an unknown flag or an invalid choice close to a known one, else ''."""
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice:
            candidates, word = re.findall(r"'([^']*)'", choice[2]), choice[1]
        elif message.startswith('unrecognized arguments: '):
            flags = [w.split('=')[0] for w in message.split(': ', 1)[1].split() if w.startswith('-')]
            candidates = [s for a in self._actions for s in a.option_strings]
            word = flags[0] if flags else ''
        else:
            return ''
        close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6) if word else []
        return f"; did you mean {close[0]}?" if close else ''


def group(parser, title):
    """The argument group `title` of `parser`, created (after the existing ones) if it has none yet."""
    for g in parser._action_groups:
        if g.title == title:
            return g
    return parser.add_argument_group(title)


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
    g = group(parser, DATA)
    # Names outside DATASETS (pretrain_rot.py's imagenet / inat, read from split files) come last.
    g.add_argument('--dataset', default='cifar10',
                   choices=[d for d in DATASETS if d in datasets] + [d for d in datasets if d not in DATASETS])
    g.add_argument('--data_path', default='./data', type=str, metavar='DIR', help='folder holding the data set files')
    if 'folder' in datasets:
        add_image_size_arg(g)
        add_cache_dir_arg(g)
    add_download_arg(g)
    add_imbalance_args(g)
    add_flip_arg(g)
    g.add_argument('--exp_str', default=default_exp_str, type=str,
                   help='(additional) name to indicate the experiment, part of the run folder\'s name')
    parser.finish(default_imb_factor)


def add_imbalance_args(g, which='the long-tailed subset'):
    g.add_argument('--imb_type', default='exp', type=str, help="'exp' or 'step'; anything else is balanced")
    g.add_argument('--imb_factor', default=None, type=imb_factor,
                   help=f'smallest / largest class size of {which} (default: 0.01; --dataset folder: 1, the '
                        f'training folder as it is)')
    g.add_argument('--rand_number', default=0, type=int, help='seed of the long-tailed subset selection')


def default_imb_factor(args):
    """--imb_factor left out: 0.01 (the original's), for a user's folder 1: the folder as it is."""
    if args.imb_factor is None:
        args.imb_factor = 1.0 if args.dataset == 'folder' else 0.01


def add_flip_arg(g):
    g.add_argument('--flip', default=None, action=argparse.BooleanOptionalAction,
                   help='random horizontal flips in the training augmentation (default: the data set\'s: on, '
                        'off for digits; --no-flip for images whose orientation carries the class: text, '
                        'digits, some defects)')


def add_image_size_arg(g):
    g.add_argument('--image_size', default=None, type=positive_int, metavar='S',
                   help='--dataset folder: S <= 64: every image resized to S x S px and cached (default: '
                        'the images\' own size, one square size <= 64); S > 64: images streamed from their '
                        'files with ResNet-50 transforms at S px (train.py, pretrain_rot.py, pretrain_moco.py; '
                        '-a resnet50)')


def add_cache_dir_arg(g):
    g.add_argument('--cache_dir', default=None, metavar='DIR',
                   help='--dataset folder: where the decoded images are cached (default: .folder_cache beside '
                        'the folder); a read-only data folder needs one')


def add_download_arg(g):
    g.add_argument('--no-download', dest='download', action='store_false',
                   help='never download CIFAR-10/100 or SVHN files that are missing (default: download them '
                        'into the data folder, md5-checked, as the original did)')


def add_training_args(parser, batch_size=128):
    from losses import LOSSES
    from models import MODELS
    from schedules import LR_SCHEDULES, TRAIN_RULES
    g = group(parser, METHOD)
    g.add_argument('-a', '--arch', metavar='ARCH', default='resnet32', choices=list(MODELS),
                   help='model architecture: ' + ' | '.join(MODELS))
    g.add_argument('--loss_type', default='CE', type=str, choices=list(LOSSES))
    g.add_argument('--la_tau', default=1.0, type=nonneg_float, metavar='TAU',
                   help='tau of --loss_type LogitAdjusted and LogitAdjustedAdaptive: cross-entropy on logits + '
                        'TAU * log(training class prior) (default: 1.0; the other losses ignore it)')
    g.add_argument('--posthoc_la', default=None, type=nonneg_float, metavar='TAU',
                   help='post-hoc logit adjustment: the evaluations (after every epoch, and -e) score '
                        'logits - TAU * log(training class prior); training is unchanged (default: off)')
    g.add_argument('--train_rule', default='None', type=str, choices=list(TRAIN_RULES),
                   help='Resample: class-balanced sampling; Reweight / DRW: class weights (DRW from --lr_steps E1); '
                        'DRS: class-balanced sampling from --lr_steps E1')
    g.add_argument('--pretrained_model', type=str, default='', metavar='PATH',
                   help='self-supervised weights to start from')
    group(parser, SCHEDULE).add_argument(
        '--lr_steps', default=[160, 180], type=positive_int, nargs=2, metavar=('E1', 'E2'),
        help='lr x0.01 after epoch E1, x0.0001 after E2; DRW and DRS switch on at E1 (default: 160 180)')
    add_run_args(parser, batch_size)
    _add_recipe_args(parser, LR_SCHEDULES)


def add_run_args(parser, batch_size=128, epochs=200, lr=0.1, weight_decay=2e-4):
    """The flags of a training run whatever it trains (train.py's, train_stage2.py's): schedule, optimizer,
    resume, logs, device, data loading, speed. None defaults are the script's to fill in."""
    g = group(parser, SCHEDULE)
    g.add_argument('--epochs', default=epochs, type=positive_int, metavar='N')
    g.add_argument('--start-epoch', default=0, type=nonneg_int, metavar='N',
                   help='manual epoch number (useful on restarts)')
    g.add_argument('-b', '--batch-size', default=batch_size, type=positive_int, metavar='N',
                   help='images per step, over all processes')
    g.add_argument('--lr', '--learning-rate', default=lr, type=positive_float, metavar='LR', dest='lr')
    g.add_argument('--momentum', default=0.9, type=nonneg_float, metavar='M')
    g.add_argument('--wd', '--weight-decay', default=weight_decay, type=nonneg_float, metavar='W',
                   dest='weight_decay')
    g = group(parser, RUN)
    g.add_argument('--resume', default='', type=str, metavar='PATH', help='checkpoint to resume from')
    g.add_argument('-e', '--evaluate', dest='evaluate', action='store_true',
                   help='evaluate the --resume checkpoint on the test set and exit')
    add_overwrite_arg(g, 'run folder')
    g.add_argument('--seed', default=None, type=int, help='seed for initializing training (default: drawn once, '
                                                          'kept in the checkpoint)')
    g.add_argument('--root_log', type=str, default='log', metavar='DIR', help='logs go to DIR/<run>/')
    g.add_argument('--root_model', type=str, default='./checkpoint', metavar='DIR',
                   help='checkpoints go to DIR/<run>/')
    g.add_argument('-p', '--print-freq', default=10, type=positive_int, metavar='N', help='print every N steps')
    g.add_argument('--confusion', action='store_true',
                   help='print the confusion matrix after every evaluation and with -e (it is always in '
                        'log_test.csv and tensorboard)')
    g.add_argument('--gpu', default=None, type=nonneg_int, help='GPU id to use (default: first GPU, else CPU)')
    add_speed_args(parser)
    group(parser, SPEED).add_argument(
        '-j', '--workers', default=None, type=nonneg_int, metavar='N',
        help='data loading workers of the per-image loader, unused by --loader device (default: 4; for images '
             "read from their files (ImageNet, iNaturalist, a streamed folder) the CPU cores this process may use "
             "less one where there are more, shared by torchrun's processes on a node; docs/gpu.md)")
    group(parser, DISTRIBUTED).add_argument(
        '--sync-bn', default=True, action=argparse.BooleanOptionalAction,
        help='under torchrun on GPUs, BatchNorm statistics over the batch of all processes '
             "(SyncBatchNorm), as on the paper's single GPU (default: on; no effect on one "
             'process or on CPUs)')


def add_overwrite_arg(g, what):
    g.add_argument('--overwrite', action='store_true',
                   help=f'start a new run even if the {what} holds one (the same command again resumes an '
                        f'unfinished run of the same flags and refuses to replace a finished one)')


def _add_recipe_args(parser, schedules):
    g = group(parser, "recipe options (added, for modern baselines; all off by default: the paper's recipe)")
    g.add_argument('--autoaugment', action='store_true',
                   help="torchvision's AutoAugment, CIFAR-10 policy, after crop and flip (per image on the "
                        "host: uses --loader torchvision)")
    g.add_argument('--cutout', default=None, type=positive_int, metavar='N',
                   help='Cutout: zero one N x N square per training image after normalisation (DeVries & '
                        'Taylor 2017 used 16 on CIFAR)')
    g.add_argument('--mixup', default=None, type=positive_float, metavar='ALPHA',
                   help='mixup (Zhang et al. 2018): one lambda ~ Beta(ALPHA, ALPHA) per batch, images mixed '
                        'with a random permutation of the batch, loss lam * L(y) + (1 - lam) * L(y_perm)')
    g.add_argument('--lr_schedule', default='step', choices=list(schedules),
                   help='step: 5 warm-up epochs, then x0.01 after --lr_steps E1, x0.0001 after E2 (default); '
                        'cosine: the same warm-up, then lr * (1 + cos(pi * (e - 5) / (epochs - 5))) / 2 for '
                        '1-based epoch e (--lr_steps E1 then only says when DRW / DRS switch on); cosine_nowarmup: '
                        'lr * (1 + cos(pi * e / epochs)) / 2 from the first epoch (weight balancing\'s stage 1)')


def recipe_suffix(args):
    """What the recipe options add to a run folder's name: '' with none on, so default names stay the
    original's; e.g. '_aa_cutout16_mixup0.2_cosine'."""
    parts = (['aa'] if args.autoaugment else []) + ([f'cutout{args.cutout}'] if args.cutout else [])
    parts += ([f'mixup{args.mixup:g}'] if args.mixup else [])
    parts += [args.lr_schedule] if args.lr_schedule != 'step' else []
    return ''.join('_' + p for p in parts)


def flip_suffix(args):
    """'_noflip' or '_flip' where --flip / --no-flip changes the data set's own choice, else ''."""
    from dataset import DATASETS
    flip = getattr(args, 'flip', None)
    own = DATASETS[args.dataset].flip if args.dataset in DATASETS else True
    return '' if flip is None or flip == own else ('_flip' if flip else '_noflip')


def add_speed_args(parser, training=True):
    """How batches are made and run (issue 11); the measurements behind the defaults: bench/README.md.
    `training`: a training script (bf16 for its steps by default); else a prediction script (float32 by default)."""
    g = group(parser, SPEED)
    g.add_argument('--loader', default='device', choices=['device', 'torchvision'],
                   help='device: the whole uint8 data set on the training device, each batch cropped, '
                        'flipped and normalised there in one operation (default for the 32x32 data sets; '
                        '-j is then unused); '
                        "torchvision: the original's per-image transforms in -j worker processes")
    _add_layout_and_amp(g, training)
    if training:
        g.add_argument('--amp-eval', default=False, action=argparse.BooleanOptionalAction,
                       help='bf16 autocast in the evaluations too (default: off: the numbers compared with '
                            'the paper are float32)')
    g.add_argument('--compile', default=False, action=argparse.BooleanOptionalAction,
                   help='torch.compile the model (default: off; the first steps compile, minutes on a small CPU)')


def add_step_speed_args(parser):
    """--channels-last and --amp alone, as train.py's: for the training scripts with neither the device
    loader (ImageNet-size images come from worker processes) nor an opt-in bf16 evaluation (every
    evaluation and prediction of pretrain_moco.py and imagenet_inat stays float32)."""
    _add_layout_and_amp(group(parser, SPEED), training=True)


def _add_layout_and_amp(g, training):
    g.add_argument('--channels-last', default=True, action=argparse.BooleanOptionalAction,
                   help='NHWC memory layout for model and images (default: on)')
    if training:
        g.add_argument('--amp', default=None, action=argparse.BooleanOptionalAction,
                       help='bf16 autocast in the training steps (default: on with a GPU of compute '
                            'capability 8.0 or later, and on a CPU where bf16 trains faster: AMX, or '
                            'AVX512-BF16 on a CPU not made by Intel)')
        g.add_argument('--cudnn-benchmark', default=None, action=argparse.BooleanOptionalAction,
                       help="cuDNN's search for the fastest convolution algorithms (default: on without "
                            '--seed; off with it, for deterministic algorithms, so that a resumed GPU run is '
                            'bit-exact; reproduce.py turns it on for its ResNet-50 stages)')
    else:
        g.add_argument('--amp', default=False, action=argparse.BooleanOptionalAction,
                       help='bf16 autocast for the prediction (default: off: float32, as the original)')


def data_name(dataset, data_path):
    """The data set's part of a run folder's name: the data set, or for a user's folder `folder-` and the
    folder's own name ('_' and odd characters made '-'), so that runs on two folders get two run folders."""
    if dataset != 'folder':
        return dataset
    base = os.path.basename(os.path.abspath(data_path))
    return 'folder-' + (re.sub(r'[^A-Za-z0-9.+-]+', '-', base).strip('-') or 'root')


def store_name(*parts):
    # The original joins with '_' and prints imb_factor as Python prints the float (0.01, 0.02).
    return '_'.join(str(p) for p in parts)


def run_main(main, argv=None):
    """Call `main(argv)`; a UserError becomes one line on stderr and exit status 2.

    As a script (argv None: main reads sys.argv), the objects imported so far (torch, torchvision, the
    scripts' modules) are moved out of the garbage collector's reach first (gc.freeze): they live until
    the exit anyway, and the collections at the interpreter's exit would otherwise traverse them all,
    about 1 CPU-second of every run on the 2-core CPU (bench/README.md)."""
    if argv is None:
        gc.freeze()
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(code or 0)
