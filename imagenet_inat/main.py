"""Decoupled long-tailed training on ImageNet-LT / iNaturalist 2018 (Kang et al. 2020), from SSP weights.

    # stage 1 from MoCo weights (instance-balanced; feat_balance.yaml: class-balanced)
    python -m imagenet_inat.main --cfg imagenet_inat/config/ImageNet_LT/feat_uniform.yaml \\
        --model_dir data/imagenet/checkpoint/moco_ckpt_0200.pth.tar --data_root <ImageNet root>
    # stage 2: classifier re-training (cRT), tau-normalisation or learnable weight scaling
    python -m imagenet_inat.main --cfg imagenet_inat/config/ImageNet_LT/cls_crt.yaml \\
        --model_dir logs/ImageNet_LT/resnet50_uniform_e90_ssp_moco --data_root <ImageNet root>
    # evaluate a result (test split; val for iNaturalist18)
    python -m imagenet_inat.main --cfg imagenet_inat/config/ImageNet_LT/cls_crt.yaml --test \\
        --model_dir logs/ImageNet_LT/resnet50_crt_uni2ban_ssp_moco --data_root <ImageNet root>
    torchrun --nproc_per_node 8 -m imagenet_inat.main --cfg ...      # one process per GPU
The plain command trains on every visible GPU (DataParallel, as the original); BatchNorm's
per-GPU batches in each launch: imagenet_inat/layout.py.

The split files <split_dir>/<dataset>_{train,val,test}.txt list `<path relative to --data_root> <label>`.
"""
import os

import cli
import dist
import trainer
from dataset.splitfile import split_file
from errors import UserError
from imagenet_inat import layout
from imagenet_inat.config import load_config
from imagenet_inat.data import final_split
from imagenet_inat.stages import FEATURE_FILES, run_stage


def build_parser():
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument('--cfg', default=None, type=str, help='stage config (YAML)')
    parser.add_argument('--test', default=False, action='store_true',
                        help='only evaluate --model_dir (default: the config log folder) on test (iNat: val)')
    parser.add_argument('--batch_size', type=cli.positive_int, default=None,
                        help="overrides training_opt.batch_size (the total over all processes)")
    parser.add_argument('--model_dir', type=str, default=None,
                        help='weights to start from: a MoCo / rotation checkpoint, a stage result '
                             '(final_model_checkpoint.pth) or its folder; overrides the config model_dir')
    parser.add_argument('--save_feat', type=str, default='', choices=['', *FEATURE_FILES],
                        help='with --test: write features, labels and indices of this split (npz)')
    parser.add_argument('--output_logits', nargs='?', const=True, default=False, type=cli.str2bool, metavar='BOOL',
                        help='with --test: write logits, labels and image paths to logits_close.npz')
    parser.add_argument('--val_as_train', default=False, action='store_true', help='train on the val split')
    parser.add_argument('--data_root', default='./data', type=str, help='image root the split files are relative to')
    parser.add_argument('--split_dir', default=None, type=str,
                        help='folder of <dataset>_{train,val,test}.txt (default: imagenet_inat/data/<dataset>/)')
    parser.add_argument('--log_dir', default=None, type=str, help='overrides training_opt.log_dir')
    parser.add_argument('--resume', default='', type=str, metavar='PATH',
                        help='latest_model_checkpoint.pth of an interrupted run (or its log folder)')
    cli.add_overwrite_arg(parser, 'log folder')
    parser.add_argument('--freeze_bn', default=False, action='store_true',
                        help="keep the feature model's BatchNorm statistics fixed while training")
    parser.add_argument('--seed', default=None, type=int, help='seed for initialisation, data order and augmentation')
    parser.add_argument('--gpu', default=None, type=cli.nonneg_int,
                        help='train on this GPU only (default: every visible GPU, as the original\'s DataParallel; '
                             'else the CPU)')
    parser.add_argument('--bn_pieces', default=None, type=cli.positive_int, metavar='G',
                        help='one process: split each training batch into G BatchNorm batches as DataParallel over '
                             'G GPUs did, run one after another on one device (default: the visible GPUs)')
    parser.add_argument('-j', '--workers', default=None, type=cli.nonneg_int, metavar='N',
                        help='data loading workers per process (default: training_opt.num_workers, or the CPU cores '
                             'this process may use less one where there are more, either shared by the processes '
                             'torchrun starts on a node; docs/gpu.md)')
    cli.add_step_speed_args(parser)  # training steps only: evaluations, --test and tau-norm stay float32
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if (args.save_feat or args.output_logits) and not args.test:
        raise UserError("--save_feat and --output_logits only apply with --test")
    if args.test and args.resume:
        raise UserError("--test evaluates --model_dir; --resume continues a training run: pass one of them")
    cfg = load_stage(args)
    trainer.seed(args)
    return run_stage(args, cfg)


def load_stage(args):
    """The stage config with the command line's overrides; fills in --split_dir's default."""
    cfg = load_config(args.cfg, batch_size=args.batch_size, model_dir=args.model_dir, log_dir=args.log_dir,
                      workers=args.workers)
    if args.workers is None:
        # The config's num_workers fed the original's one process, on slower GPUs: a node's processes share
        # them, or its CPU cores where it has more.
        cfg.num_workers = dist.loader_workers(cfg.num_workers)
    args.split_dir = args.split_dir or os.path.join('imagenet_inat', 'data', cfg.dataset)
    if not os.path.isdir(args.data_root):
        raise UserError(f"--data_root folder not found: {args.data_root}")
    return cfg


def preflight(args, processes):
    """What reproduce.py checks of a stage before a table's first stage starts (its --model_dir
    comes from an earlier stage, so it is checked when the stage runs): the config, the batch's
    split over `processes` (1: this machine's GPUs) and the split files it reads."""
    cfg = load_stage(args)
    if not args.test and cfg.taus is None:
        layout.plan_pieces(cfg.batch_size, processes, args.bn_pieces, args.gpu)
    for split in dict.fromkeys(('val' if args.val_as_train else 'train', 'val', final_split(cfg.dataset))):
        path = split_file(args.split_dir, cfg.dataset, split)
        if not os.path.isfile(path):
            raise UserError(f"split file not found: {path} (--split_dir)")


if __name__ == '__main__':
    cli.run_main(main)
