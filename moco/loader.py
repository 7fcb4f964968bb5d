"""Old home of MoCo's data side, which now lives in dataset/ (moco_augment.py, splitfile.py, statistics.py).

Kept only while pretrain_rot.py and bench/jpeg_loader.py still import these names from here (both are being
changed on other branches); once they import them from dataset/, this file goes.
"""
from dataset.splitfile import SplitFileDataset  # noqa: F401
from dataset.statistics import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401
