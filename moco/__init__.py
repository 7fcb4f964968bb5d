"""Momentum Contrast (He et al. 2020; MoCo v2: Chen et al. 2020) for self-supervised pre-training.

builder: the MoCo module (encoders, queue, momentum update, shuffle-BN).
loader: two-crop transform, augmentations, and the split-file data set of ImageNet-LT / iNaturalist.
"""
from moco.builder import MoCo
from moco.loader import AUGMENTATIONS, GaussianBlur, SplitFileDataset, TwoCropsTransform

__all__ = ['AUGMENTATIONS', 'GaussianBlur', 'MoCo', 'SplitFileDataset', 'TwoCropsTransform']
