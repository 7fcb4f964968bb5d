"""Long-tailed SVHN and the semi-supervised SVHN set (unlabeled pool: SVHN's own 'extra' split).

Same selection rule as CIFAR (see imbalance_cifar.py) with two differences kept from the original:
at most 1000 images per class, and classes visited as 1, 2, ..., 9, 0 (SVHN's own label order,
where 0 is 10) so that digit 0, not the most frequent in SVHN, gets the smallest count.
"""
import os
from functools import partial

import numpy as np
from torchvision.datasets import SVHN
from torchvision.datasets.utils import verify_str_arg
from torchvision.datasets.vision import VisionDataset

from dataset.download import fetch
from dataset.imbalance_cifar import (add_pseudo_labeled, check_fraction, img_num_per_cls, require_intact,
                                     select_per_class)
from errors import UserError

SVHN_URL = 'http://ufldl.stanford.edu/housenumbers/'
N_MAX = 1000


def load_svhn_mat(path, what, hint):
    """(images N x 3 x 32 x 32 uint8, labels int64 with digit 0 as 0) from an SVHN .mat file."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path} ({hint})")
    import scipy.io  # here, not at the top: 0.25 s of every script's start-up, needed by SVHN runs only
    try:
        mat = scipy.io.loadmat(path)  # MAT files hold arrays only: loading cannot run code
        images, labels = mat['X'], mat['y'].astype(np.int64).reshape(-1)
    except (ValueError, TypeError, KeyError, OSError, NotImplementedError) as e:
        raise UserError(f"{what} {path} is corrupt or not an SVHN .mat file ({type(e).__name__}: {e})") from None
    if images.shape[:3] != (32, 32, 3) or images.ndim != 4 or images.shape[3] != len(labels):
        raise UserError(f"{what} {path} is corrupt (X {images.shape}, {len(labels)} labels; "
                        f"expected 32 x 32 x 3 x N and N labels)")
    labels[labels == 10] = 0  # SVHN writes digit 0 as 10
    return images.transpose(3, 2, 0, 1), labels


def load_svhn_extra(path, download=False):
    """SVHN's extra split, the unlabeled pool: (images N x 3 x 32 x 32 uint8, true labels).

    With `download`, a `path` named extra_32x32.mat is downloaded there when missing or corrupt,
    as the original's SVHN(split='extra', download=True); a file by any other name is the user's own.
    """
    url, filename, md5 = SVHN.split_list['extra']
    if download and os.path.basename(path) == filename:
        fetch(url, os.path.dirname(path) or '.', filename, md5)
    return load_svhn_mat(path, "SVHN extra split (the unlabeled pool)",
                         f'download extra_32x32.mat from {SVHN_URL}, or point to it with --unlabeled_data '
                         f'(train_semi.py) or --data_filename (gen_pseudolabels.py)')


def svhn_class_order(labels):
    classes = np.unique(labels)
    return np.concatenate([classes[1:], classes[:1]])


class ImbalanceSVHN(SVHN):
    """SVHN whose 'train' split is long-tailed; other splits stay whole."""
    cls_num = 10

    def __init__(self, root, imb_type='exp', imb_factor=0.01, rand_number=0, split='train',
                 transform=None, target_transform=None, download=False):
        check_fraction(imb_factor, '--imb_factor')
        VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)
        self.split = verify_str_arg(split, 'split', tuple(self.split_list))
        self.url, self.filename, self.file_md5 = self.split_list[split]
        name = f"SVHN {split} split"
        path = os.path.join(self.root, self.filename)
        require_intact(self, name, [path], SVHN_URL,
                       partial(fetch, self.url, self.root, self.filename, self.file_md5) if download else None)
        self.data, self.labels = load_svhn_mat(path, name, f'download it again from {SVHN_URL}')
        if split == 'train':
            np.random.seed(rand_number)
            self.img_num_list = self.get_img_num_per_cls(self.cls_num, imb_type, imb_factor)
            self.class_order = svhn_class_order(self.labels)
            keep = select_per_class(self.labels, self.class_order, self.img_num_list)
            self.data, self.labels = self.data[keep], self.labels[keep]

    def get_img_num_per_cls(self, cls_num, imb_type, imb_factor):
        return img_num_per_cls(N_MAX, cls_num, imb_type, imb_factor)

    def get_cls_num_list(self):
        return np.bincount(self.labels, minlength=self.cls_num).tolist()


class SemiSupervisedImbalanceSVHN(ImbalanceSVHN):
    """Long-tailed SVHN plus `unlabel_size_factor` times as many 'extra' images, picked per class
    by their true labels and trained with their pseudo-labels."""

    def __init__(self, root, imb_type='exp', imb_factor=0.01, unlabel_imb_factor=1, rand_number=0,
                 split='train', transform=None, target_transform=None, download=False,
                 unlabeled_data=None, pseudo_labels=None, unlabel_size_factor=5, pseudo_threshold=None):
        if split != 'train':
            raise ValueError("a training set only; the test split is ImbalanceSVHN(split='test')")
        super().__init__(root, imb_type, imb_factor, rand_number, split, transform, target_transform, download)
        self.unlabeled_data = unlabeled_data or os.path.join(root, 'extra_32x32.mat')
        # the extra images are drawn per class by their true labels, then trained with pseudo-labels
        pseudo = add_pseudo_labeled(self, *load_svhn_extra(self.unlabeled_data, download),
                                    pseudo_labels or os.path.join(root, 'pseudo_labeled_svhn.pickle'),
                                    unlabel_imb_factor, unlabel_size_factor, pseudo_threshold)
        self.labels = np.concatenate([self.labels, pseudo])
