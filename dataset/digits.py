"""A small real data set that needs no download: scikit-learn's bundled 8x8 handwritten digits.

The 1797 images are scaled from 0..16 to 0..255 and blown up 4x (nearest neighbour) to the
32x32x3 uint8 layout of CIFAR, so every model and transform here works on them unchanged.
A fixed 30 images per class form a balanced test set; it depends on nothing the user passes,
so runs with different --rand_number values are scored on the same images. The rest is the
training pool, made long-tailed with CIFAR's rule; the pool images it leaves out are the unlabeled
pool of the semi-supervised set (their true labels play the part of the sourcing labels).
"""
import gzip
import importlib.util
import os

import numpy as np
from PIL import Image
from torchvision.datasets.vision import VisionDataset

from dataset.imbalance_cifar import add_pseudo_labeled, check_fraction, img_num_per_cls, select_per_class

TEST_PER_CLASS = 30
TEST_SPLIT_SEED = 0


def bundled_digits():
    """(images 1797 x 8 x 8 float64 in 0..16, labels): scikit-learn's `load_digits()`, read from the
    file it reads, sklearn/datasets/data/digits.csv.gz, as it reads it (np.loadtxt, last column the
    label). Why not call it: importing scikit-learn costs more than reading the file, and every
    process of a torchrun or reproduce.py run would pay it. Where a scikit-learn release keeps the
    file elsewhere, `load_digits()` itself."""
    spec = importlib.util.find_spec('sklearn')
    folders = spec.submodule_search_locations if spec is not None else None
    path = os.path.join(folders[0], 'datasets', 'data', 'digits.csv.gz') if folders else None
    if path is None or not os.path.isfile(path):
        from sklearn.datasets import load_digits
        digits = load_digits()
        return digits.images, digits.target
    with gzip.open(path, 'rt') as f:
        data = np.loadtxt(f, delimiter=',')
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def load_digit_images():
    """(images 1797 x 32 x 32 x 3 uint8, labels int64)."""
    images, labels = bundled_digits()
    images = np.rint(images * (255 / 16)).astype(np.uint8)
    images = images.repeat(4, axis=1).repeat(4, axis=2)
    return np.repeat(images[..., None], 3, axis=3), labels.astype(np.int64)


def balanced_test_mask(labels):
    """The fixed balanced test set, drawn from its own generator so the global stream is untouched."""
    rng = np.random.RandomState(TEST_SPLIT_SEED)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        mask[rng.permutation(np.where(labels == c)[0])[:TEST_PER_CLASS]] = True
    return mask


class ImbalanceDigits(VisionDataset):
    """Digits whose training split is long-tailed. `root` is only where pseudo-labels live; the
    images come with scikit-learn, so `download` has nothing to do."""
    cls_num = 10

    def __init__(self, root=None, imb_type='exp', imb_factor=0.01, rand_number=0, train=True,
                 transform=None, target_transform=None, download=False):
        if imb_factor is not None:  # None: the whole training pool (train_ssl.py's)
            check_fraction(imb_factor, '--imb_factor')
        super().__init__(root, transform=transform, target_transform=target_transform)
        self.train = train
        self.classes = [str(c) for c in range(self.cls_num)]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        images, labels = load_digit_images()
        in_test = balanced_test_mask(labels)
        if not train:
            self.data, self.targets = images[in_test], labels[in_test].tolist()
            return
        self.data, pool_labels = images[~in_test], labels[~in_test]
        if imb_factor is None:
            self.targets = pool_labels.tolist()
            return
        np.random.seed(rand_number)
        self.img_num_list = self.get_img_num_per_cls(self.cls_num, imb_type, imb_factor)
        self.class_order = np.unique(pool_labels)
        keep = select_per_class(pool_labels, self.class_order, self.img_num_list)
        unused = np.ones(len(pool_labels), dtype=bool)
        unused[keep] = False
        self.unused_data, self.unused_targets = self.data[unused], pool_labels[unused]
        self.data, self.targets = self.data[keep], pool_labels[keep].tolist()

    def get_img_num_per_cls(self, cls_num, imb_type, imb_factor):
        return img_num_per_cls(len(self.data) / cls_num, cls_num, imb_type, imb_factor)

    def get_cls_num_list(self):
        return np.bincount(self.targets, minlength=self.cls_num).tolist()

    def __getitem__(self, index):
        img, target = Image.fromarray(self.data[index]), self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def __len__(self):
        return len(self.data)


class SemiSupervisedImbalanceDigits(ImbalanceDigits):
    """Long-tailed digits plus up to `unlabel_size_factor` times as many of the left-out pool
    images (fewer where a class runs out), trained with their pseudo-labels."""

    def __init__(self, root=None, imb_type='exp', imb_factor=0.01, unlabel_imb_factor=1, rand_number=0,
                 train=True, transform=None, target_transform=None, download=False,
                 pseudo_labels=None, unlabel_size_factor=5, pseudo_threshold=None):
        if not train:
            raise ValueError("a training set only; the test split is ImbalanceDigits(train=False)")
        super().__init__(root, imb_type, imb_factor, rand_number, True, transform, target_transform, download)
        pseudo = add_pseudo_labeled(self, self.unused_data, self.unused_targets,
                                    pseudo_labels or os.path.join(root or '.', 'pseudo_labeled_digits.pickle'),
                                    unlabel_imb_factor, unlabel_size_factor, pseudo_threshold)
        self.targets = self.targets + pseudo.tolist()
