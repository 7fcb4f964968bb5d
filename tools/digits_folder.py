"""Write scikit-learn's bundled digits as an image folder for `--dataset folder` (the README's worked example).

    python tools/digits_folder.py data/digits_folder
    python tools/digits_folder.py data/digits_folder --unlabeled 30   # also ROOT/unlabeled/ for train_semi.py

ROOT/train/<digit>/<n>.png: the training pool of `--dataset digits` (balanced, about 150 per class),
ROOT/val/<digit>/<n>.png: its fixed balanced test set (30 per class), 32 x 32 grayscale PNGs, the
very pixels `--dataset digits` trains on. With --unlabeled N, the last N training images of each
digit go to ROOT/unlabeled/<n>.png instead, without their labels.
"""
import os
import sys

import numpy as np
from PIL import Image

# `python tools/digits_folder.py` puts tools/ on the path, not the repository root that holds the project's modules.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402
from dataset import digits  # noqa: E402
from errors import UserError  # noqa: E402


def write_digits_folder(root, per_class=None, val_per_class=None, unlabeled=0):
    """Write the folder; `per_class` / `val_per_class` keep only the first images of each digit (tests)."""
    images, labels = digits.load_digit_images()
    in_val = digits.balanced_test_mask(labels)
    unlabeled_index = 0
    for split, mask, keep in (('train', ~in_val, per_class), ('val', in_val, val_per_class)):
        for c in range(10):
            index = np.where(mask & (labels == c))[0][:keep]
            cut = len(index) - unlabeled if split == 'train' else len(index)
            if cut < 1:
                raise UserError(f"--unlabeled {unlabeled} leaves digit {c} no training image")
            os.makedirs(os.path.join(root, split, str(c)), exist_ok=True)
            for n, i in enumerate(index[:cut]):
                Image.fromarray(images[i, :, :, 0]).save(os.path.join(root, split, str(c), f'{n}.png'))
            if split == 'train' and unlabeled:
                os.makedirs(os.path.join(root, 'unlabeled'), exist_ok=True)
                for i in index[cut:]:
                    Image.fromarray(images[i, :, :, 0]).save(os.path.join(root, 'unlabeled', f'{unlabeled_index}.png'))
                    unlabeled_index += 1


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument('root', help='folder to write (train/, val/ and with --unlabeled unlabeled/)')
    parser.add_argument('--unlabeled', default=0, type=cli.nonneg_int, metavar='N',
                        help='training images per digit moved to ROOT/unlabeled/ without labels (default: 0)')
    args = parser.parse_args(argv)
    if os.path.exists(os.path.join(args.root, 'train')):
        raise UserError(f"{args.root}/train already exists; choose an empty folder")
    try:
        write_digits_folder(args.root, unlabeled=args.unlabeled)
    except OSError as e:
        raise UserError(f"cannot write {args.root}: {e}") from None
    print(f"wrote {args.root}/train, {args.root}/val" + (f" and {args.root}/unlabeled" if args.unlabeled else ''))
    return 0


if __name__ == '__main__':
    cli.run_main(main)
