"""Long-tailed semi-supervised learning, the FixMatch family (added; not in the original): FixMatch with the
imbalance add-ons ABC and DARP, or the labeled data alone, on the shared trainer (docs/ltssl.md).

    python train_ssl.py --dataset cifar10 --protocol usb --imb_alg abc --num_max 1500 --num_max_u 3000 \\
        --imb_factor 0.01 --imb_factor_unlabel 0.01 --seed 0
    python train_ssl.py --dataset cifar10 --protocol daso --imb_alg darp --num_max 500 --num_max_u 4000
    python train_ssl.py --dataset cifar10 --imb_alg abc --resume <ckpt.pth.tar> -e   # the EMA weights, ABC's head
    python train_ssl.py --dataset digits --num_max 40 --num_max_u 100 --imb_factor 0.1 -a resnet20 \\
        --epochs 10 --eval_step 50 -b 8 --ema_decay 0.99                            # offline miniature, CPU

An "epoch" is one evaluation period of --eval_step steps; --epochs of them make the run. Each step trains on
-b labeled images and --mu times as many unlabeled ones. --protocol fills every recipe knob left unset with
the values of one codebase (ltssl/protocols.py; printed at the start); the flags given win. Run folders,
logs (plus log_pseudo.csv), checkpoints, --resume, -e, torchrun and SIGTERM are train.py's.
"""
import cli
import trainer
from errors import UserError
from ltssl import IMB_ALGS, SSL_ALGS
from ltssl.ema import STYLES
from ltssl.protocols import PRESETS, apply
from models import MODELS


def resolve(args):
    """What the flags leave open, filled in after every parse (cli.ArgumentParser.finish): --imb_factor_unlabel,
    the --protocol preset (its lines in args.preset_notes) and the run folder's name, so every reader of the flags
    (reproduce.py) sees the run's."""
    if args.imb_factor_unlabel is None:
        args.imb_factor_unlabel = args.imb_factor
    args.preset_notes = apply(args)
    args.store_name = ssl_store_name(args)


def build_parser():
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_data_args(parser, ('cifar10', 'cifar100', 'digits'), 'ssl')
    g = cli.group(parser, cli.METHOD)
    g.add_argument('-a', '--arch', metavar='ARCH', default='wrn28_2', choices=list(MODELS),
                   help='model architecture: ' + ' | '.join(MODELS))
    g.add_argument('--pretrained_model', type=str, default='', metavar='PATH',
                   help='self-supervised weights to start from')
    cli.add_run_args(parser)
    # the recipe knobs: None means "the --protocol preset's"
    parser.set_defaults(epochs=None, batch_size=None, lr=None, momentum=None, weight_decay=None, mixup=None,
                        posthoc_la=None)

    data = parser.add_argument_group('unlabeled data')
    data.add_argument('--num_max', default=1500, type=cli.positive_int, metavar='N1',
                      help='labeled images of the largest class (default: 1500)')
    data.add_argument('--num_max_u', default=3000, type=cli.positive_int, metavar='M1',
                      help='unlabeled images of the largest class (default: 3000)')
    data.add_argument('--imb_factor_unlabel', default=None, type=cli.imb_factor,
                      help='1 / imbalance ratio of the unlabeled data (default: --imb_factor)')
    data.add_argument('--unlabel_order', default='same', choices=['same', 'reversed'],
                      help="reversed: the unlabeled counts run the other way, the labeled tail is the unlabeled head")

    method = parser.add_argument_group('semi-supervised method (unset: --protocol\'s value)')
    method.add_argument('--ssl_alg', default='fixmatch', choices=SSL_ALGS)
    method.add_argument('--imb_alg', default='none', choices=IMB_ALGS)
    method.add_argument('--protocol', default='usb', choices=list(PRESETS),
                        help='recipe preset: usb (USB classic_cv_imb) or daso (DASO\'s code)')
    method.add_argument('--eval_step', default=None, type=cli.positive_int, help='steps per evaluation ("epoch")')
    method.add_argument('--mu', default=None, type=cli.positive_int, help='unlabeled images per labeled image')
    method.add_argument('--threshold', default=None, type=cli.probability, help='pseudo-label confidence threshold')
    method.add_argument('--lambda_u', default=None, type=cli.nonneg_float, help='weight of the unlabeled loss')
    method.add_argument('--ema_decay', default=None, type=cli.probability,
                        help='decay of the evaluated weight average (0: the model itself)')
    method.add_argument('--ema_style', default=None, choices=STYLES,
                        help="copy: buffers copied (kekmodel, USB); daso: decay warm-up, buffers averaged")
    method.add_argument('--lr_schedule', default=None, choices=['constant', 'cosine'],
                        help='per step: constant, or lr * cos(7 pi t / 16 T) (FixMatch)')
    for flag, what in (('--nesterov', 'Nesterov momentum'),
                       ('--wd_bn_bias', 'weight decay on BatchNorm weights and biases too')):
        method.add_argument(flag, nargs='?', const=True, default=None, type=cli.str2bool, metavar='BOOL',
                            help=f"{what} (true / false; bare flag: true)")

    abc = parser.add_argument_group('ABC (--imb_alg abc)')
    abc.add_argument('--abc_threshold', default=None, type=cli.probability, help='the ABC head\'s threshold')
    abc.add_argument('--abc_weight', default=None, type=cli.nonneg_float, help='weight of the ABC loss')
    darp = parser.add_argument_group('DARP (--imb_alg darp)')
    darp.add_argument('--darp_warmup', default=None, type=cli.probability,
                      help='share of the epochs before the first refinement')
    darp.add_argument('--darp_target', default=None, metavar='labeled|configured|PATH',
                      help='target class distribution: the labeled one scaled (USB), the configured unlabeled counts '
                           '(DASO), or a .npy of per-class weights (an estimate)')
    darp.add_argument('--darp_mask', default=None, choices=['raw', 'refined'],
                      help='which probabilities the confidence threshold reads')
    darp.add_argument('--darp_alpha', default=None, type=cli.positive_float)
    darp.add_argument('--darp_iter_T', default=None, type=cli.positive_int, help='solver iterations')
    darp.add_argument('--darp_every', default=None, type=cli.positive_int, help='steps between refinements')
    darp.add_argument('--darp_tol', default=None, type=cli.positive_float, help='secant tolerance of the solver')
    parser.finish(resolve)
    return parser


def ssl_store_name(args):
    order = '_rev' if args.unlabel_order == 'reversed' else ''
    return cli.store_name(args.dataset, args.arch, args.ssl_alg, args.imb_alg, f'N{args.num_max}', f'M{args.num_max_u}',
                          args.imb_factor, f'{args.imb_factor_unlabel}{order}', args.protocol, args.exp_str)


def main(argv=None):
    from ltssl.experiment import build
    from train import exit_code
    args = build_parser().parse_args(argv)
    if args.imb_type != 'exp':
        raise UserError(f"--imb_type {args.imb_type}: the LT-SSL splits are exponential (their protocols' rule)")
    trainer.seed(args)
    experiment, split = build(args)
    for line in args.preset_notes:
        print(line)
    unused = ', unused by --ssl_alg supervised' if args.ssl_alg == 'supervised' else ''
    print(f"labeled per class: {split.counts_l} ({sum(split.counts_l)} images)")
    print(f"unlabeled per class: {split.counts_u} ({sum(split.counts_u)} images{unused})")
    return exit_code(trainer.run(args, experiment))


if __name__ == '__main__':
    cli.run_main(main)
