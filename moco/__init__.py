"""Momentum Contrast (He et al. 2020; MoCo v2: Chen et al. 2020) for self-supervised pre-training.

builder: the MoCo module (encoders, queue, momentum update, shuffle-BN). Its data side (two-crop transform,
augmentations, split-file data sets) is in dataset/ (moco_augment.py, splitfile.py).
"""
from moco.builder import MoCo

__all__ = ['MoCo']
