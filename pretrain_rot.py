"""Self-supervised pre-training by rotation prediction (Gidaris et al. 2018) on CIFAR-LT / digits-LT,
a user's image folder (--dataset folder), ImageNet-LT and iNaturalist 2018.

    python pretrain_rot.py --dataset cifar10 --imb_factor 0.01
    python train.py --dataset cifar10 --imb_factor 0.01 --exp_str ssp \\
        --pretrained_model checkpoint/cifar10_resnet32_CE_None_exp_0.01_pretrain_rot/ckpt.best.pth.tar
    python pretrain_rot.py --dataset imagenet --data_path <ImageNet root>     # ResNet-50, 224 px
    python -m imagenet_inat.main --cfg imagenet_inat/config/ImageNet_LT/feat_uniform.yaml --data_root <ImageNet root> \\
        --model_dir checkpoint/imagenet_resnet50_CE_None_pretrain_rot/ckpt.best.pth.tar

The network gets a 4-way head and learns which of 0/90/180/270 degrees each image was rotated by;
class labels are never used. Accuracies it reports are *rotation* accuracies: every test image scored
once, at a rotation fixed for it (`dataset.rotation.eval_rotations`), as cheap as the original's single random
rotation per test image and the same in every epoch and run.
"""
import argparse
import functools
import os

import torch

import cli
import trainer
from dataset.rotation import NUM_ROTATIONS, RotationTargets, rotation_labels
from dataset.splitfile import SplitFileDataset, build_transform as split_file_transform, split_file
from errors import UserError
from losses import uses_norm
from models import build_model
from train import build_parser, exit_code, load_data, supervised_store_name

# --dataset imagenet / inat: the train and val split files of imagenet_inat/ (long-tailed already, so
# the --imb_* flags do not apply), with its 224 px transforms, as the original's dataset/imagenet.py
# and dataset/inat.py.
SPLIT_FILE_DATASETS = {'imagenet': 'ImageNet_LT', 'inat': 'iNaturalist18'}


def rotate(images, labels):
    """Rotate square images (N, C, H, H) by labels[i] * 90 degrees counter-clockwise over (H, W).

    One gather of every image's pixels through the index map of its rotation (a permutation of the H*H
    positions), in channels-last order, so that the C values of a pixel move together and the result is
    channels_last like the device loader's batches: three full-batch rot90 copies blended by torch.where
    cost about four times as much. No `nonzero`, so the host never waits for the device."""
    n, c, h, w = images.shape
    pixels = images.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view for channels_last images
    rows = torch.arange(n, device=images.device)[:, None]
    return pixels[rows, _rotation_maps(h, images.device)[labels]].view(n, h, w, c).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=None)
def _rotation_maps(size, device):
    """(4, size * size): for each rotation, the flat position in the source of every output position."""
    positions = torch.arange(size * size, device=device).view(size, size)
    return torch.stack([torch.rot90(positions, k, dims=(0, 1)).reshape(-1) for k in range(NUM_ROTATIONS)])


def random_rotation_batch(images, targets):
    """Training: each image once, at a random (but batch-balanced) rotation. The labels are drawn on the
    CPU (the global stream, as before) and copied from pinned memory, which the host need not wait for."""
    labels = rotation_labels(images.size(0))
    if images.is_cuda:
        labels = labels.pin_memory()
    labels = labels.to(images.device, non_blocking=True)
    return rotate(images, labels), labels


def rotated_as_labelled(images, labels):
    """Evaluation: each test image once, at the rotation its label (RotationTargets) names."""
    return rotate(images, labels), labels


def build_rot_parser():
    parser = build_parser(__doc__, datasets=('cifar10', 'cifar100', 'digits', 'folder', *SPLIT_FILE_DATASETS),
                          exp_str='pretrain_rot')
    data = cli.group(parser, cli.DATA)
    data.add_argument('--split_dir', default=None, type=str,
                        help='imagenet/inat: folder of <name>_{train,val}.txt, paths relative to --data_path '
                             '(default: imagenet_inat/data/ImageNet_LT/ or imagenet_inat/data/iNaturalist18/)')
    data.add_argument('--crop-size', default=224, type=cli.positive_int, metavar='PX',
                        help='imagenet/inat: side of the crops (evaluation resizes to 256/224 of it first)')
    parser.set_defaults(arch=None)  # resnet50 for imagenet/inat (the original's default), else resnet32
    return parser


def load_split_file_data(args):
    """(train, val) of ImageNet-LT / iNaturalist 2018, as listed in imagenet_inat's split files."""
    name = SPLIT_FILE_DATASETS[args.dataset]
    split_dir = args.split_dir or os.path.join('imagenet_inat', 'data', name)
    return [SplitFileDataset(args.data_path, split_file(split_dir, name, split),
                             split_file_transform(name, split == 'train', args.crop_size, args.crop_size * 256 // 224),
                             flags=('--split_dir', '--data_path'))
            for split in ('train', 'val')]


def resolve_arch(args):
    """`-a` left out: resnet50 for imagenet/inat (the original's default), else resnet32."""
    args.arch = args.arch or ('resnet50' if args.dataset in SPLIT_FILE_DATASETS else 'resnet32')
    return args


def rot_store_name(args):
    """The run folder's name, from the parsed flags alone (reproduce.py names its stages with it)."""
    args = resolve_arch(argparse.Namespace(**vars(args)))
    if args.dataset in SPLIT_FILE_DATASETS:
        # The original's run folder names leave the imbalance out for these two.
        return cli.store_name(args.dataset, args.arch, args.loss_type, args.train_rule, args.exp_str)
    return supervised_store_name(args)


def main(argv=None):
    args = resolve_arch(build_rot_parser().parse_args(argv))
    if cli.recipe_suffix(args):
        raise UserError("--autoaugment, --cutout, --mixup and --lr_schedule cosine are train.py's and train_semi.py's "
                        "recipe options; rotation pre-training keeps the paper's recipe")
    split_files = args.dataset in SPLIT_FILE_DATASETS
    args.store_name = rot_store_name(args)
    trainer.seed(args)
    info = None  # split files: no DatasetInfo (their images stream through the JPEG loader)
    if split_files:
        train_set, val_set = load_split_file_data(args)
        print(f"{len(train_set)} training and {len(val_set)} validation images (labels unused)")
    else:
        info, train_set, val_set = load_data(args)
        print(f"cls num list (labels unused): {train_set.get_cls_num_list()}")
    experiment = trainer.Experiment(
        script='pretrain_rot', task='rotation', model=build_model(args.arch, NUM_ROTATIONS, use_norm=uses_norm(args.loss_type)),
        train_set=train_set, val_set=RotationTargets(val_set), num_classes=NUM_ROTATIONS,
        # every training image appears under each rotation: the rotation classes are balanced
        cls_num_list=[len(train_set)] * NUM_ROTATIONS,
        batch_fn=random_rotation_batch, eval_batch_fn=rotated_as_labelled, info=info)
    return exit_code(trainer.run(args, experiment))


if __name__ == '__main__':
    cli.run_main(main)
