"""Supervised long-tailed training: CE / Focal / LDAM (and, added, Balanced Softmax / logit-adjusted)
with Resample / Reweight / DRW.

    python train.py --dataset cifar10 --imb_factor 0.01 --loss_type CE --train_rule None
    python train.py --dataset cifar10 --imb_factor 0.01 --pretrained_model <ssp.pth.tar> --exp_str ssp  # SSP
    python train.py --dataset cifar10 --resume <ckpt.pth.tar> -e                            # evaluate
    python train.py --dataset digits --imb_factor 0.01 --epochs 30 --lr_steps 20 25 -j 0   # offline
    python train.py --dataset folder --data_path <ROOT with train/<class>/ and val/<class>/>  # own images
"""
import cli
import trainer
from dataset import build_transform, resolve_dataset
from dataset.folder import check_model
from losses import uses_norm
from models import build_model


def build_parser(description=__doc__, datasets=('cifar10', 'cifar100', 'svhn', 'digits', 'folder'),
                 exp_str='ss_pretrained', batch_size=128):
    parser = cli.ArgumentParser(description=description)
    cli.add_data_args(parser, datasets, exp_str)
    cli.add_training_args(parser, batch_size=batch_size)
    return parser


def supervised_store_name(args):
    name = cli.store_name(cli.data_name(args.dataset, args.data_path), args.arch, args.loss_type, args.train_rule,
                          args.imb_type, args.imb_factor, args.exp_str)
    return name + cli.recipe_suffix(args) + cli.flip_suffix(args)


def load_data(args):
    """The long-tailed training set and the balanced test set (errors before any file is written)."""
    info = resolve_dataset(args.dataset, args.data_path, getattr(args, 'image_size', None),
                           cache_dir=getattr(args, 'cache_dir', None), flip=args.flip)
    check_model(info, args.arch)
    train_set = info.build_train(args.data_path, args.imb_type, args.imb_factor, args.rand_number,
                                 train_transform(args, info), download=args.download)
    val_set = info.build_val(args.data_path, build_transform(args.dataset, train=False, info=info),
                             download=args.download)
    return info, train_set, val_set


def train_transform(args, info=None):
    """The per-image training transform (the classic loader's), with --autoaugment / --cutout if asked;
    `info` as build_transform's."""
    return build_transform(args.dataset, train=True, info=info, autoaugment=args.autoaugment, cutout=args.cutout)


def exit_code(result):
    """128 + signal number after a SIGTERM/SIGINT stop (the shell's convention), else 0."""
    return 128 + result['stopped_by'] if 'stopped_by' in result else 0


def train_classifier(args, script, info, train_set, val_set):
    """Build the classifier for `args` and run it through the trainer (train.py, train_semi.py)."""
    model = build_model(args.arch, info.num_classes, use_norm=uses_norm(args.loss_type))
    # The class counts of the training set (pseudo-labels included) drive losses, samplers, shot groups.
    experiment = trainer.Experiment(script=script, task='classification', model=model, train_set=train_set,
                                    val_set=val_set, num_classes=info.num_classes,
                                    cls_num_list=train_set.get_cls_num_list(), info=info)
    print(f"cls num list: {experiment.cls_num_list}")
    return exit_code(trainer.run(args, experiment))


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.store_name = supervised_store_name(args)
    trainer.seed(args)
    return train_classifier(args, 'train', *load_data(args))


if __name__ == '__main__':
    cli.run_main(main)
