"""Cutout (DeVries & Taylor 2017, "Improved Regularization of Convolutional Neural Networks with
Cutout"), an opt-in recipe option (`--cutout N`), for both data paths: per image in the classic
torchvision pipeline (`Cutout`) and per batch on the device loader (`cutout_mask`), from the same
distribution.

As the authors' code (uoguelph-mlrg/Cutout, util/cutout.py with n_holes=1), applied after
normalisation: the centre (y, x) is uniform over the image's pixels, the square spans rows
y - N//2 .. y - N//2 + N - 1 (columns likewise), clipped at the border, and its pixels become 0.
For even N (16 on CIFAR in their paper) that is their y - N//2 .. y + N//2 exactly; for odd N their
square is N - 1 wide and this one N.
"""
import torch


def cutout_mask(centres, length, height, width):
    """B x height x width bool, True inside each image's square; `centres` is B x 2 (row, column)."""
    top_left = centres - length // 2
    rows = torch.arange(height, device=centres.device)
    cols = torch.arange(width, device=centres.device)
    in_rows = (rows >= top_left[:, :1]) & (rows < top_left[:, :1] + length)  # B x height
    in_cols = (cols >= top_left[:, 1:]) & (cols < top_left[:, 1:] + length)  # B x width
    return in_rows[:, :, None] & in_cols[:, None, :]


class Cutout:
    """Zero one `length` x `length` square of a normalised C x H x W image. The centre is drawn from
    torch's global stream (a data-loading worker's own, seeded by the loader), as the torchvision
    transforms before it draw theirs: the authors drew it with np.random, row first, then column."""

    def __init__(self, length):
        self.length = length

    def __call__(self, img):
        height, width = img.shape[-2:]
        centre = torch.cat([torch.randint(height, (1,)), torch.randint(width, (1,))])[None]
        return img.masked_fill(cutout_mask(centre, self.length, height, width)[0], 0)

    def __repr__(self):
        return f'{type(self).__name__}(length={self.length})'
