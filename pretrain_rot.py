"""Self-supervised pre-training by rotation prediction (Gidaris et al. 2018) on CIFAR-LT / digits-LT.

    python pretrain_rot.py --dataset cifar10 --imb_factor 0.01
    python train.py --dataset cifar10 --imb_factor 0.01 \
        --pretrained_model checkpoint/cifar10_resnet32_CE_None_exp_0.01_pretrain_rot/ckpt.best.pth.tar

The network gets a 4-way head and learns which of 0/90/180/270 degrees each image was rotated by;
class labels are never used. Accuracies it reports are *rotation* accuracies.
"""
import torch

import cli
import trainer
from losses import uses_norm
from models import build_model
from train import build_parser, exit_code, load_data, supervised_store_name

NUM_ROTATIONS = 4


def rotation_labels(batch_size, generator=None):
    """[0, 1, 2, 3] repeated to `batch_size`, randomly permuted: balanced over the 4 rotations."""
    labels = torch.arange(NUM_ROTATIONS).repeat(-(-batch_size // NUM_ROTATIONS))[:batch_size]
    return labels[torch.randperm(batch_size, generator=generator)]


def rotate(images, labels):
    """Rotate images (N, C, H, W) by labels[i] * 90 degrees counter-clockwise over (H, W)."""
    out = torch.empty_like(images)
    for k in range(NUM_ROTATIONS):
        idx = (labels == k).nonzero(as_tuple=True)[0]
        out[idx] = torch.rot90(images[idx], k, dims=(2, 3))
    return out


def random_rotation_batch(images, targets):
    """Training: each image once, at a random (but batch-balanced) rotation."""
    labels = rotation_labels(images.size(0)).to(images.device)
    return rotate(images, labels), labels


def all_rotations_batch(images, targets):
    """Evaluation: every image at all four rotations, so the test score is deterministic."""
    n = images.size(0)
    labels = torch.arange(NUM_ROTATIONS, device=images.device).repeat_interleave(n)
    return rotate(images.repeat(NUM_ROTATIONS, 1, 1, 1), labels), labels


def main(argv=None):
    parser = build_parser(__doc__, datasets=('cifar10', 'cifar100', 'digits'), exp_str='pretrain_rot')
    args = parser.parse_args(argv)
    args.store_name = supervised_store_name(args)
    trainer.seed(args)
    _, train_set, val_set = load_data(args)
    print(f"cls num list (labels unused): {train_set.get_cls_num_list()}")
    experiment = trainer.Experiment(
        script='pretrain_rot', task='rotation', model=build_model(args.arch, NUM_ROTATIONS, use_norm=uses_norm(args.loss_type)),
        train_set=train_set, val_set=val_set, num_classes=NUM_ROTATIONS,
        # every training image appears under each rotation: the rotation classes are balanced
        cls_num_list=[len(train_set)] * NUM_ROTATIONS,
        batch_fn=random_rotation_batch, eval_batch_fn=all_rotations_batch)
    return exit_code(trainer.run(args, experiment))


if __name__ == '__main__':
    cli.run_main(main)
