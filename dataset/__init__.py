"""The data sets by name: `DATASETS[name]` says how to build each split and how to normalise it.

Every builder returns a torch Dataset of 32x32 RGB images (a folder's: S x S) whose labels are in
`.targets` (CIFAR, digits, folder) or `.labels` (SVHN); `dataset.samplers.get_targets` reads either.
dataset/ holds all the project's data: ImageNet-LT / iNaturalist split files and their transforms are in
splitfile.py, every normalisation statistic in statistics.py, MoCo's views in moco_augment.py.
"""
import os
from dataclasses import dataclass, replace
from typing import Callable, Optional

from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from dataset import folder
from dataset.augment import Cutout
from dataset.digits import ImbalanceDigits, SemiSupervisedImbalanceDigits
from dataset.imbalance_cifar import (ImbalanceCIFAR10, ImbalanceCIFAR100, SemiSupervisedImbalanceCIFAR10,
                                     load_tinyimages)
from dataset.imbalance_svhn import ImbalanceSVHN, SemiSupervisedImbalanceSVHN, load_svhn_extra
from dataset.statistics import CIFAR_MEAN, CIFAR_STD, HALF
from errors import UserError


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    mean: tuple
    std: tuple
    flip: bool  # whether a mirrored image is still an image of its class
    # (root, imb_type, imb_factor, rand_number, transform, download=False) -> long-tailed train split
    build_train: Callable
    # (root, transform, download=False) -> the whole, balanced test split
    build_val: Callable
    # (root, imb_type, imb_factor, unlabel_imb_factor, rand_number, transform, unlabeled_data=None,
    #  pseudo_labels=None, unlabel_size_factor=5, pseudo_threshold=None, download=False); None: no semi setting
    build_semi: Optional[Callable]
    # (root, path, download=False, imb_type=..., imb_factor=..., rand_number=...) -> see load_unlabeled_pool
    load_pool: Optional[Callable]
    image_size: int = 32
    classes: Optional[tuple] = None  # the class names a user's folder defines (written into checkpoints)
    # (info, root, image_size, ckpt=None, cache_dir=None) -> the DatasetInfo of the files at root (or of a
    # checkpoint's data): a data set whose classes and statistics are only known once its files are read
    configure: Optional[Callable] = None
    # (train) -> the transform of images streamed from their files (a folder's above 64 px: no device
    # loader); None: the 32x32 transforms below
    transform: Optional[Callable] = None


def _split_builders(cls, test_split):
    """build_train and build_val for a class whose constructor starts (root, imb_type, imb_factor,
    rand_number) and whose defaults pick the training split; `test_split` picks the test split."""
    def build_train(root, imb_type, imb_factor, rand_number, transform, download=False):
        return cls(root, imb_type, imb_factor, rand_number, transform=transform, download=download)

    def build_val(root, transform, download=False):
        return cls(root, transform=transform, download=download, **test_split)

    return build_train, build_val


def _semi_builder(cls, has_pool_file=True):
    def build_semi(root, imb_type, imb_factor, unlabel_imb_factor, rand_number, transform, unlabeled_data=None,
                   pseudo_labels=None, unlabel_size_factor=5, pseudo_threshold=None, download=False):
        pool = {'unlabeled_data': unlabeled_data} if has_pool_file else _no_pool_file(unlabeled_data)
        return cls(root, imb_type, imb_factor, unlabel_imb_factor, rand_number, transform=transform,
                   download=download, pseudo_labels=pseudo_labels, unlabel_size_factor=unlabel_size_factor,
                   pseudo_threshold=pseudo_threshold, **pool)
    return build_semi


def _no_pool_file(path):
    if path is not None:
        raise UserError("--unlabeled_data does not apply to digits: its unlabeled pool is the training "
                        "images left out of the long-tailed subset")
    return {}


# Pool loaders for gen_pseudolabels.py: (images N x 32 x 32 x 3 uint8, sourcing labels, ground truth).
# The imbalance arguments only matter for digits, whose pool is what the long-tailed draw leaves out;
# `download` only for SVHN (TinyImages is never downloaded, digits need nothing).

def _tinyimages_pool(root, path, download=False, **_imbalance):
    data, sourcing = load_tinyimages(path or os.path.join(root, 'ti_80M_selected.pickle'))
    return data, sourcing, None, None  # TinyImages has no ground truth, only the authors' sourcing labels


def _svhn_extra_pool(root, path, download=False, **_imbalance):
    data, truth = load_svhn_extra(path or os.path.join(root, 'extra_32x32.mat'), download)
    return data.transpose(0, 2, 3, 1), truth, truth, None  # the semi set picks extra images by their true labels


def _digits_pool(root, path, download=False, imb_type='exp', imb_factor=0.01, rand_number=0):
    _no_pool_file(path)
    pool = ImbalanceDigits(root, imb_type, imb_factor, rand_number)
    return pool.unused_data, pool.unused_targets, pool.unused_targets, None


def _configure_first(*args, **kwargs):
    raise RuntimeError("--dataset folder: call dataset.resolve_dataset(...) for the DatasetInfo of its files")


DATASETS = {
    'cifar10': DatasetInfo(10, CIFAR_MEAN, CIFAR_STD, True, *_split_builders(ImbalanceCIFAR10, {'train': False}),
                           _semi_builder(SemiSupervisedImbalanceCIFAR10), _tinyimages_pool),
    'cifar100': DatasetInfo(100, CIFAR_MEAN, CIFAR_STD, True, *_split_builders(ImbalanceCIFAR100, {'train': False}),
                            None, None),
    'svhn': DatasetInfo(10, HALF, HALF, True, *_split_builders(ImbalanceSVHN, {'split': 'test'}),
                        _semi_builder(SemiSupervisedImbalanceSVHN), _svhn_extra_pool),
    # Digits are not mirror-symmetric (a flipped 2 is no 2), so no flip.
    'digits': DatasetInfo(10, HALF, HALF, False, *_split_builders(ImbalanceDigits, {'train': False}),
                          _semi_builder(SemiSupervisedImbalanceDigits, has_pool_file=False), _digits_pool),
    # A user's images (dataset/folder.py): everything but the flip is filled in from the files.
    'folder': DatasetInfo(0, None, None, True, *[_configure_first] * 4, configure=folder.configure),
}


def dataset_info(name):
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def resolve_dataset(name, root=None, image_size=None, ckpt=None, cache_dir=None, flip=None):
    """The DatasetInfo of `name`; for a folder, of the files at `root` (or of checkpoint `ckpt`'s data), its
    decoded images cached in `cache_dir` if given. `flip` (--flip / --no-flip) overrides the data set's own
    choice of horizontal flips in training."""
    info = dataset_info(name)
    info = info if info.configure is None else info.configure(info, root, image_size, ckpt, cache_dir)
    return info if flip is None else replace(info, flip=flip)


def build_transform(name, train, info=None, autoaugment=False, cutout=None):
    """Training: random crop with 4 px padding and (where it keeps the class) a horizontal flip.
    `info`: a resolved DatasetInfo (a folder's), else the registry's of `name`.
    Opt-in recipe options (--autoaugment, --cutout N), placed as the strong long-tailed CIFAR code
    places them (e.g. PaCo's paco_cifar.py): torchvision's AutoAugment with the CIFAR-10 policy after
    crop and flip, on the PIL image; Cutout after normalisation, as its authors' code (dataset.augment)."""
    info = info or dataset_info(name)
    if info.transform is not None:
        if train and (autoaugment or cutout):
            raise UserError("--autoaugment and --cutout apply to images decoded into an array (the 32x32 data "
                            "sets, folders of images <= 64 px), not to images streamed from their files")
        return info.transform(train)
    normalize = [transforms.ToTensor(), transforms.Normalize(info.mean, info.std)]
    if not train:
        return transforms.Compose(normalize)
    flip = [transforms.RandomHorizontalFlip()] if info.flip else []
    policy = [transforms.AutoAugment(transforms.AutoAugmentPolicy.CIFAR10)] if autoaugment else []
    erase = [Cutout(cutout)] if cutout else []
    return transforms.Compose([transforms.RandomCrop(info.image_size, padding=4)] + flip + policy + normalize + erase)


def load_unlabeled_pool(name, root, path=None, download=False, info=None, **digits_kwargs):
    """(images N x 32 x 32 x 3 uint8, sourcing labels or None, ground truth or None, image paths or None)
    of the pool the semi-supervised set draws from, in the order pseudo-label files must follow. `path`
    overrides the pool file (cifar10, svhn) or folder (folder: paths relative to it); `download` fetches
    SVHN's extra split when missing; `digits_kwargs` (imb_type, imb_factor, rand_number) fix the digits
    pool. `info`: a resolved DatasetInfo (a folder's), else the registry's of `name`."""
    info = info or dataset_info(name)
    if info.load_pool is None:
        raise UserError(f"{name} has no unlabeled pool in the paper; choose one of "
                        f"{', '.join(n for n, i in DATASETS.items() if i.load_pool)}")
    return info.load_pool(root, path, download, **digits_kwargs)


class PoolImages(Dataset):
    """An unlabeled pool's images (N x 32 x 32 x 3 uint8, as load_unlabeled_pool returns them), transformed as
    at test time, without labels: what gen_pseudolabels.py predicts."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index]))

    def __len__(self):
        return len(self.images)
