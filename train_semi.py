"""Semi-supervised long-tailed training (step 3): the labeled long-tailed set plus unlabeled images
trained with the pseudo-labels gen_pseudolabels.py made.

    python train_semi.py --dataset cifar10 --imb_factor 0.02 --imb_factor_unlabel 0.02
    python train_semi.py --dataset svhn --imb_factor 0.02 --imb_factor_unlabel 0.02
    python train_semi.py --dataset cifar10 --resume <ckpt.pth.tar> -e                 # evaluate
    python train_semi.py --dataset digits --imb_factor 0.01 --epochs 30 --lr_steps 20 25 -j 0   # offline
    python train_semi.py --dataset folder --data_path ROOT --imb_factor 1   # own images, ROOT/unlabeled

The unlabeled set is `--unlabel_size_factor` times the labeled set, long-tailed by
`--imb_factor_unlabel` (1/rho_U), drawn per class by the pool's own labels (TinyImages: the
authors' sourcing labels; SVHN extra, digits: the true labels; a user's folder, which has none: the
pseudo-labels) and trained with the pseudo-labels.
Everything else (losses, train rules, logs, checkpoints, resume, -e) is train.py's.
"""
import os

import cli
import train
import trainer
from dataset import build_transform, resolve_dataset
from errors import UserError
from fileio import safe_pickle_load
from gen_pseudolabels import POOLS


def build_parser():
    parser = train.build_parser(__doc__, datasets=tuple(POOLS), exp_str='semi', batch_size=256)
    group = parser.add_argument_group('unlabeled data')
    group.add_argument('--imb_factor_unlabel', default=0.01, type=cli.imb_factor,
                       help='imbalance factor of the unlabeled data (1/rho_U)')
    group.add_argument('--unlabeled_data', default=None, metavar='PATH',
                       help='the pool file (default: ti_80M_selected.pickle for cifar10, extra_32x32.mat for '
                            'svhn, in --data_path; digits have no pool file); folder: a folder of images '
                            '(default: --data_path/unlabeled)')
    group.add_argument('--pseudo_labels', default=None, metavar='PATH',
                       help="gen_pseudolabels.py's output (default: pseudo_labeled_<cifar, svhn, digits or "
                            "folder>.pickle in --data_path)")
    group.add_argument('--unlabel_size_factor', default=5, type=cli.positive_int,
                       help='unlabeled images per labeled image (default: 5)')
    group.add_argument('--pseudo_threshold', default=None, type=cli.probability,
                       help='drop drawn unlabeled images whose pseudo-label confidence is below this')
    return parser


def semi_store_name(args):
    return cli.store_name(cli.data_name(args.dataset, args.data_path), args.arch, args.loss_type, args.train_rule,
                          args.imb_type, args.imb_factor, args.imb_factor_unlabel,
                          args.exp_str) + cli.recipe_suffix(args) + cli.flip_suffix(args)


def check_pool_args(path, args):
    """Refuse pseudo-labels made for another pool. A digits pool depends on --imb_type/--imb_factor/
    --rand_number; labels made with another --rand_number fit a pool of the same size and would
    silently land on other images. (A missing or malformed file is left to the dataset to explain.)"""
    if not os.path.isfile(path):
        return
    entry = safe_pickle_load(path, what='pseudo-label file', hint='make it with gen_pseudolabels.py')
    recorded = entry.get('pool_args') if isinstance(entry, dict) else None
    recorded = recorded if isinstance(recorded, dict) else {}
    differing = [f"--{k} {v} (this run: {getattr(args, k)})" for k, v in recorded.items()
                 if getattr(args, k, v) != v]
    if differing:
        raise UserError(f"pseudo-label file {path} was made for another unlabeled pool ({', '.join(differing)}); "
                        f"run gen_pseudolabels.py again with this run's flags")


def load_data(args):
    """The semi-supervised training set and the balanced test set (errors before any file is written)."""
    info = resolve_dataset(args.dataset, args.data_path, args.image_size, cache_dir=args.cache_dir, flip=args.flip)
    pseudo_labels = args.pseudo_labels or os.path.join(args.data_path, POOLS[args.dataset].output_filename)
    check_pool_args(pseudo_labels, args)
    train_set = info.build_semi(args.data_path, args.imb_type, args.imb_factor, args.imb_factor_unlabel,
                                args.rand_number, train.train_transform(args, info),
                                unlabeled_data=args.unlabeled_data, pseudo_labels=pseudo_labels,
                                unlabel_size_factor=args.unlabel_size_factor, pseudo_threshold=args.pseudo_threshold,
                                download=args.download)
    val_set = info.build_val(args.data_path, build_transform(args.dataset, train=False, info=info),
                             download=args.download)
    return info, train_set, val_set


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.store_name = semi_store_name(args)
    trainer.seed(args)
    info, train_set, val_set = load_data(args)
    print(f"training set: {train_set.num_labeled} labeled + {len(train_set) - train_set.num_labeled} "
          f"pseudo-labeled images")
    return train.train_classifier(args, 'train_semi', info, train_set, val_set)


if __name__ == '__main__':
    cli.run_main(main)
