"""Pseudo-label an unlabeled pool with a trained base classifier (step 2 of the semi-supervised recipe).

    python gen_pseudolabels.py --resume <base ckpt> --data_dir ./data --output_dir ./data
    python gen_pseudolabels.py --dataset svhn --resume <base ckpt> --data_dir ./data
    python gen_pseudolabels.py --dataset digits --imb_factor 0.01 --resume <digits ckpt>   # offline
    python gen_pseudolabels.py --dataset folder --resume <folder ckpt> --data_dir ROOT --output_dir ROOT  # ROOT/unlabeled

The pool, in the order train_semi.py expects:
  cifar10  the authors' TinyImages selection, --data_filename (ti_80M_selected.pickle) in --data_dir
  svhn     SVHN's extra split, --data_filename (extra_32x32.mat) in --data_dir
  digits   the training images the long-tailed draw leaves out; pass the --imb_type, --imb_factor and
           --rand_number of the base model's train.py run
  folder   the images under --data_filename (unlabeled) in --data_dir, any nesting, sorted by path;
           classes, image size and normalisation come from the --resume checkpoint
The output pickle (--output_dir/--output_filename) holds one entry per pool image:
  extrapolated_targets  int64 predicted labels        prediction_model  the --resume path
  confidence            float32 max softmax prob (for train_semi.py --pseudo_threshold)
  ground_truth          the true labels (svhn, digits)
  pool_args             the flags that fix the pool (digits), so train_semi.py can refuse another pool
  paths                 folder: each image's path relative to the pool folder, in pool order
"""
import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import cli
import dist
from checkpoint import load_weights, read_weights
from dataset import PoolImages, build_transform, load_unlabeled_pool, resolve_dataset
from dataset.device_loader import HostBatches
from engine import predict
from errors import UserError
from fileio import atomic_pickle_dump, user_write_errors, write_error
from losses import LOSSES, build_criterion, uses_norm
from models import MODELS, build_model


@dataclass(frozen=True)
class Pool:
    data_filename: Optional[str]  # the pool file inside --data_dir; None: the pool needs no file
    output_filename: str          # where train_semi.py looks for the pseudo-labels by default
    pool_flags: tuple = ()        # flags that decide which images form the pool


POOLS = {
    'cifar10': Pool('ti_80M_selected.pickle', 'pseudo_labeled_cifar.pickle'),
    'svhn': Pool('extra_32x32.mat', 'pseudo_labeled_svhn.pickle'),
    'digits': Pool(None, 'pseudo_labeled_digits.pickle', ('imb_type', 'imb_factor', 'rand_number')),
    'folder': Pool('unlabeled', 'pseudo_labeled_folder.pickle'),  # a folder of images, not a file
}


def build_parser():
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument('--dataset', default='cifar10', choices=list(POOLS))
    parser.add_argument('-a', '--arch', metavar='ARCH', default='resnet32', choices=list(MODELS),
                        help='architecture of the base model: ' + ' | '.join(MODELS) + ' (default: resnet32)')
    parser.add_argument('--loss_type', default='CE', choices=list(LOSSES),
                        help='loss the base model was trained with (LDAM: cosine head)')
    parser.add_argument('--gpu', default=None, type=cli.nonneg_int, help='GPU id to use (default: first GPU, else CPU)')
    parser.add_argument('--resume', required=True, metavar='PATH',
                        help='checkpoint of the base classifier (from train.py, ours or the original)')
    parser.add_argument('--data_dir', default='./data', help='folder holding the unlabeled pool file')
    parser.add_argument('--data_filename', default=None,
                        help='pool file in --data_dir (default: ti_80M_selected.pickle for cifar10, '
                             'extra_32x32.mat for svhn; digits have no pool file); folder: the pool\'s '
                             'folder of images (default: unlabeled)')
    cli.add_download_arg(parser)  # svhn: extra_32x32.mat is downloaded when missing
    cli.add_cache_dir_arg(parser)
    parser.add_argument('--output_dir', default='./data', help='folder for the pseudo-labels and prediction.log')
    parser.add_argument('--output_filename', default=None,
                        help='default: pseudo_labeled_<cifar, svhn, digits or folder>.pickle, the names '
                             'train_semi.py looks for')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output file')
    parser.add_argument('-b', '--batch-size', default=1000, type=cli.positive_int, metavar='N',
                        help='images scored per forward pass (default: 1000; the original: 200; the labels '
                             'do not depend on it beyond float rounding)')
    parser.add_argument('-j', '--workers', default=4, type=cli.nonneg_int, metavar='N', help='data loading workers')
    cli.add_speed_args(parser, training=False)
    group = parser.add_argument_group('digits pool (the same values as the base model\'s train.py run)')
    group.add_argument('--imb_type', default='exp')
    group.add_argument('--imb_factor', default=0.01, type=cli.imb_factor)
    group.add_argument('--rand_number', default=0, type=int)
    return parser


def load_classifier(args):
    """(the base classifier with the weights of --resume (any format checkpoint.py knows), the checkpoint,
    the DatasetInfo: a folder's classes, statistics and image size are the checkpoint's)."""
    ckpt, sd = read_weights(args.resume, 'classification', 'pass a classifier checkpoint from train.py')
    try:
        info = resolve_dataset(args.dataset, args.data_dir, ckpt=ckpt, cache_dir=args.cache_dir)
    except UserError as e:
        raise UserError(f"--resume {args.resume}: {e}") from None
    # A cosine head stores its weight transposed and has no bias; without this check the
    # transposed shape would read as "another number of classes".
    cosine_head = 'fc.weight' in sd and 'fc.bias' not in sd
    if cosine_head != uses_norm(args.loss_type):
        hint = 'pass --loss_type LDAM' if cosine_head else f'--loss_type {args.loss_type} needs one; leave it out'
        raise UserError(f"--resume {args.resume} has a {'cosine (LDAM)' if cosine_head else 'linear'} "
                        f"classifier head ({hint})")
    model = build_model(args.arch, info.num_classes, use_norm=uses_norm(args.loss_type))
    load_weights(model, sd, f"--resume {args.resume}")
    return model, ckpt, info


def pseudo_label(logits, scale=1.0):
    """(labels int64, confidence float32) of float32 logits: the argmax, as the original, and the max
    softmax probability of scale * logits."""
    confidence = torch.softmax(scale * logits, dim=1).max(dim=1).values
    return logits.argmax(dim=1).numpy().astype(np.int64), confidence.numpy().astype(np.float32)


def logit_scale(loss_type, num_classes):
    """The factor the training loss applied to the logits before its softmax (LDAM's s on cosine
    logits in [-1, 1]; 1 otherwise), so that `confidence` is the probability the model was trained to give."""
    return float(getattr(build_criterion(loss_type, [1] * num_classes), 's', 1.0))


def report(pred, confidence, reference, reference_name, num_classes):
    """Lines: predicted class histogram, and per-class precision/recall against `reference` if any."""
    hist = np.bincount(pred, minlength=num_classes)
    lines = [f"Pseudo-labels per class: {hist.tolist()}",
             f"Confidence: mean {confidence.mean():.3f}, >= 0.5: {100 * np.mean(confidence >= 0.5):.1f}%, "
             f">= 0.9: {100 * np.mean(confidence >= 0.9):.1f}%"]
    if reference is None:
        return lines
    known = (reference >= 0) & (reference < num_classes)
    ref, hat = reference[known], pred[known]
    cm = np.bincount(ref * num_classes + hat, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    hits = np.diag(cm)
    with np.errstate(invalid='ignore', divide='ignore'):
        precision, recall = hits / cm.sum(axis=0), hits / cm.sum(axis=1)
    lines.append(f"Agreement with the {reference_name}: {100 * hits.sum() / max(len(ref), 1):.2f}% "
                 f"of {len(ref)} images")
    lines.append(f"{'class':>5} {'reference':>9} {'predicted':>9} {'precision':>9} {'recall':>7}")
    for c in range(num_classes):
        lines.append(f"{c:>5} {cm[c].sum():>9} {cm[:, c].sum():>9} "
                     f"{_percent(precision[c]):>9} {_percent(recall[c]):>7}")
    return lines


def _percent(x):
    return '-' if np.isnan(x) else f'{100 * x:.2f}%'  # '-': no image predicted as / labeled with the class


class _LogFile(logging.FileHandler):
    """A write error the user can fix (full disk, ...) ends the run with one line, where logging's
    own handling would print a traceback and go on without the log."""

    def handleError(self, record):
        error = write_error(self.baseFilename, sys.exc_info()[1])
        if error is None:
            super().handleError(record)
        else:
            raise error


@contextlib.contextmanager
def prediction_log(output_dir):
    """log(line) to <output_dir>/prediction.log (appended, as the original) and the console."""
    logger = logging.getLogger('gen_pseudolabels')
    logger.setLevel(logging.INFO)
    logger.propagate = False
    path = os.path.join(output_dir, 'prediction.log')
    with user_write_errors(path):
        log_file = _LogFile(path)
    handlers = [log_file, logging.StreamHandler(sys.stdout)]
    for h in handlers:
        h.setFormatter(logging.Formatter('%(asctime)s | %(message)s'))
        logger.addHandler(h)
    try:
        yield logger.info
    finally:
        # Detached, so a second run in the same process does not log twice.
        for h in handlers:
            logger.removeHandler(h)
            h.close()


def output_path(args):
    """Where the pseudo-labels go (reproduce.py finds a stage's output with it too)."""
    return os.path.join(args.output_dir, args.output_filename or POOLS[args.dataset].output_filename)


def resolve_paths(args, pool):
    """(output path, pool file or None), refusing before any work what would overwrite a file."""
    out_path = output_path(args)
    if os.path.exists(out_path) and not args.overwrite:
        raise UserError(f"{out_path} already exists; pass --overwrite to replace it or choose another "
                        f"--output_filename")
    if pool.data_filename is None and args.data_filename:
        raise UserError(f"--data_filename does not apply to {args.dataset}: its pool is the training images "
                        f"the long-tailed draw leaves out")
    pool_path = os.path.join(args.data_dir, args.data_filename or pool.data_filename) if pool.data_filename else None
    for source in (args.resume, pool_path):
        if source and os.path.realpath(out_path) == os.path.realpath(source):
            raise UserError(f"the output {out_path} would overwrite the input {source}; choose another "
                            f"--output_filename")
    return out_path, pool_path


def main(argv=None):
    args = build_parser().parse_args(argv)
    pool = POOLS[args.dataset]
    out_path, pool_path = resolve_paths(args, pool)
    device = dist.setup(args.gpu).device
    model, ckpt, info = load_classifier(args)
    pool_args = {flag: getattr(args, flag) for flag in pool.pool_flags}
    images, sourcing, truth, paths = load_unlabeled_pool(args.dataset, args.data_dir, pool_path, args.download,
                                                         info=info, **pool_args)
    if len(images) == 0:
        raise UserError(f"the unlabeled pool of {args.dataset} is empty; nothing to pseudo-label")
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create folder {args.output_dir}: {e.strerror}") from None

    with prediction_log(args.output_dir) as log:
        log('Prediction on unlabeled data')
        log(f'Args: {args}')
        log(f"=> loaded checkpoint '{args.resume}' ({args.arch}, epoch {ckpt.get('epoch', '?')}) on {device}")
        log(f"=> unlabeled pool: {len(images)} images from {pool_path or f'{args.dataset} {pool_args}'}")
        if args.loader == 'device':  # the pool stays in host memory; each batch is normalised on the device
            loader = HostBatches(images, args.batch_size, device, info.mean, info.std, args.channels_last)
        else:
            loader = DataLoader(PoolImages(images, build_transform(args.dataset, train=False, info=info)),
                                batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                                pin_memory=device.type == 'cuda')
        model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
        if args.compile:
            model.compile()
        logits, _ = predict(model, tqdm(loader, desc='pseudo-labeling', unit='batch', file=sys.stderr), device,
                            amp=args.amp, channels_last=args.channels_last)
        labels, confidence = pseudo_label(logits, logit_scale(args.loss_type, info.num_classes))
        entry = {'extrapolated_targets': labels, 'prediction_model': args.resume, 'confidence': confidence,
                 'pool_args': pool_args}
        if truth is not None:
            entry['ground_truth'] = np.asarray(truth, dtype=np.int64)
        if paths is not None:
            entry['paths'] = paths
        reference, reference_name = ((truth, 'ground truth') if truth is not None
                                     else (sourcing, 'sourcing labels'))
        for line in report(labels, confidence, reference, reference_name, info.num_classes):
            log(line)
        atomic_pickle_dump(entry, out_path)
        log(f"=> wrote {len(labels)} pseudo-labels to {out_path}")
    return 0


if __name__ == '__main__':
    cli.run_main(main)
