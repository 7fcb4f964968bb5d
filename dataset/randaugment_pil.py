"""The weak and strong views of FixMatch with PIL itself, one image at a time, at GIVEN parameters (one row of
`dataset.randaugment.Views`): the reference the device version is tested against, and the per-image
pipeline of `train_ssl.py --loader torchvision`. The ops are FixMatch's code's (kekmodel/FixMatch-pytorch
dataset/randaugment.py), called the way it calls PIL; only the random draws come from outside.
"""
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from dataset.randaugment import (CUTOUT, CUTOUT_FILL, NUM_OPS, OPS, PAD, enhance_factor, posterize_bits,
                                 rotate_degrees, shear, solarize_threshold, translate_pixels)


def weak(image, row):
    """PIL image -> PIL image: RandomHorizontalFlip, then RandomCrop(S, padding=4, padding_mode='reflect') at
    the drawn window (torchvision pads 'reflect' with numpy's np.pad)."""
    if row['flip']:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    padded = np.pad(np.asarray(image), ((PAD, PAD), (PAD, PAD), (0, 0)), mode='reflect')
    top, left = row['offset']
    size = image.size[0]
    return Image.fromarray(padded[top:top + size, left:left + size])


def apply_op(image, name, v, negate):
    """One RandAugment op at level v (1..9)."""
    size = image.size[0]
    if name == 'AutoContrast':
        return ImageOps.autocontrast(image)
    if name == 'Equalize':
        return ImageOps.equalize(image)
    if name == 'Identity':
        return image
    if name in ('Brightness', 'Color', 'Contrast', 'Sharpness'):
        return getattr(ImageEnhance, name)(image).enhance(enhance_factor(v))
    if name == 'Posterize':
        return ImageOps.posterize(image, posterize_bits(v))
    if name == 'Solarize':
        return ImageOps.solarize(image, solarize_threshold(v))
    if name == 'Rotate':
        return image.rotate(rotate_degrees(v, negate))
    if name == 'ShearX':
        return image.transform(image.size, Image.Transform.AFFINE, (1, shear(v, negate), 0, 0, 1, 0))
    if name == 'ShearY':
        return image.transform(image.size, Image.Transform.AFFINE, (1, 0, 0, shear(v, negate), 1, 0))
    if name == 'TranslateX':
        return image.transform(image.size, Image.Transform.AFFINE, (1, 0, translate_pixels(v, negate, size), 0, 1, 0))
    return image.transform(image.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, translate_pixels(v, negate, size)))


def cutout(image, row_col):
    """CutoutAbs(16) with the drawn floor(u) of its row and column."""
    size = image.size[0]
    y0, x0 = (max(0, c - CUTOUT // 2) for c in row_col)
    x1, y1 = min(size, x0 + CUTOUT), min(size, y0 + CUTOUT)
    image = image.copy()
    ImageDraw.Draw(image).rectangle((x0, y0, x1, y1), (CUTOUT_FILL,) * 3)
    return image


def strong(image, row):
    """PIL image -> PIL image: the weak view, the two drawn ops (where applied), Cutout."""
    image = weak(image, row)
    for slot in range(NUM_OPS):
        if row['apply'][slot]:
            image = apply_op(image, OPS[row['op'][slot]], row['level'][slot], row['negate'][slot])
    return cutout(image, row['cutout'])
