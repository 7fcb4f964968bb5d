"""Long-tailed CIFAR-10/100 and the semi-supervised CIFAR-10 set of the paper (Sec. 3).

The selection rule below is the original's, step for step, so that `rand_number=0` picks the
same images as the paper: seed numpy's global generator once, then for each class shuffle that
class's indices and keep the first n_i. The semi-supervised set continues the *same* stream to
pick the unlabeled images. The helpers are shared by SVHN and digits, which use the same rule.
"""
import os
from functools import partial

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.vision import VisionDataset

from dataset.download import fetch_and_extract
from errors import UserError
from fileio import safe_pickle_load

CIFAR_URL = 'https://www.cs.toronto.edu/~kriz/cifar.html'


def check_fraction(value, flag):
    if not 0 < value <= 1:
        raise UserError(f"{flag} must be in (0, 1], got {value}")


def img_num_per_cls(n_max, cls_num, imb_type, imb_factor):
    """Images per class: 'exp' decays from n_max to n_max*imb_factor, 'step' halves; else balanced."""
    if imb_type == 'exp':
        return [int(n_max * imb_factor ** (i / (cls_num - 1.0))) for i in range(cls_num)]
    if imb_type == 'step':
        # The original appended cls_num//2 of each, leaving the last class out for odd cls_num.
        return [int(n_max)] * (cls_num // 2) + [int(n_max * imb_factor)] * (cls_num - cls_num // 2)
    return [int(n_max)] * cls_num


def img_num_per_cls_unlabeled(labeled_counts, unlabel_imb_factor, unlabel_size_factor):
    """Unlabeled images per class: `unlabel_size_factor` times the labeled total, decaying by
    `unlabel_imb_factor`, then rescaled so the total is close to that target again."""
    cls_num = len(labeled_counts)
    total = np.sum(labeled_counts) * unlabel_size_factor
    counts = [int((total // cls_num) * unlabel_imb_factor ** (i / (cls_num - 1.0))) for i in range(cls_num)]
    # max(.., 1): a pool target below one image per class would divide by zero.
    factor = total / max(np.sum(counts), 1)
    return [int(n * factor) for n in counts]


def select_per_class(labels, classes, counts):
    """Indices of the first counts[k] images of class classes[k] after a shuffle, drawn from
    numpy's global stream in the order given.

    A class with fewer images than asked gives what it has. (The original then appended
    counts[k] labels anyway, so data and labels went out of step; here labels follow the data.)
    """
    labels = np.asarray(labels)
    picked = []
    for c, n in zip(classes, counts):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        picked.append(idx[:n])
    return np.concatenate(picked)


def require_intact(dataset, name, paths, url, download=None):
    """Turn torchvision's md5 check into a one-line UserError that says what is wrong.
    `download()`, if given, is tried first when the files are missing or fail the check."""
    if dataset._check_integrity():
        return
    if download is not None:
        download()
        if dataset._check_integrity():
            return
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{name} not found in {dataset.root} (expected {missing[0]} ...; "
                        f"download it from {url} or pass --data_path)")
    raise UserError(f"{name} in {dataset.root} fails its md5 check (a corrupt or partial download); "
                    f"delete it and download it again from {url}")


def load_pseudo_labels(path, pool_size, num_classes):
    """(labels, confidence or None) from a file made by gen_pseudolabels.py, checked against the pool."""
    what, hint = 'pseudo-label file', 'make it with gen_pseudolabels.py or pass --pseudo_labels'
    entry = safe_pickle_load(path, what=what, hint=hint)
    if not isinstance(entry, dict) or 'extrapolated_targets' not in entry:
        raise UserError(f"{what} {path} has no 'extrapolated_targets' array ({hint})")
    labels = np.asarray(entry['extrapolated_targets']).astype(np.int64).reshape(-1)
    if len(labels) != pool_size:
        raise UserError(f"{what} {path} has {len(labels)} labels but the unlabeled pool has {pool_size} "
                        f"images; it was made for another pool ({hint})")
    if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        raise UserError(f"{what} {path} holds labels outside 0..{num_classes - 1}")
    confidence = entry.get('confidence')
    return labels, None if confidence is None else np.asarray(confidence, dtype=np.float64).reshape(-1)


def select_pseudo_labeled(sourcing, classes, counts, pseudo_path, pseudo_threshold, num_classes):
    """Pool indices picked per class by their *sourcing* labels (continuing numpy's stream), and
    the *pseudo*-labels they are trained with. The threshold drops images after the draw, so it
    never changes which images are drawn."""
    pseudo, confidence = load_pseudo_labels(pseudo_path, len(sourcing), num_classes)
    picked = select_per_class(sourcing, classes, counts)
    if pseudo_threshold is not None:
        if confidence is None:
            print(f"Note: {pseudo_path} has no 'confidence'; --pseudo_threshold is ignored and all "
                  f"pseudo-labels are used")
        else:
            picked = picked[confidence[picked] >= pseudo_threshold]
    return picked, pseudo[picked]


def add_pseudo_labeled(dataset, pool, sourcing, pseudo_labels, unlabel_imb_factor, unlabel_size_factor,
                       pseudo_threshold):
    """Append to a semi-supervised `dataset` the `pool` images it draws; return their pseudo-labels
    (the caller appends them to its labels).

    `dataset` has just drawn its labeled subset (its `img_num_list`, `class_order` and `cls_num` are
    set); numpy's stream continues from that draw, as in the original. The labeled images stay
    first (`num_labeled` of them); `pseudo_labels` is the file gen_pseudolabels.py wrote.
    """
    check_fraction(unlabel_imb_factor, '--imb_factor_unlabel')
    dataset.unlabeled_pseudo = pseudo_labels
    dataset.num_labeled = len(dataset.data)
    counts = img_num_per_cls_unlabeled(dataset.img_num_list, unlabel_imb_factor, unlabel_size_factor)
    picked, pseudo = select_pseudo_labeled(sourcing, dataset.class_order, counts, pseudo_labels,
                                           pseudo_threshold, dataset.cls_num)
    dataset.data = np.concatenate([dataset.data, pool[picked]])
    return pseudo


def load_tinyimages(path):
    """(images N x 32 x 32 x 3 uint8, sourcing labels) of the authors' TinyImages selection."""
    what = "unlabeled pool (the original authors' prepared selection from 80M TinyImages, ti_80M_selected.pickle)"
    hint = ('80M TinyImages itself was withdrawn, so get this prepared file from the imbalanced-semi-self '
            'repository and point to it with --unlabeled_data (train_semi.py) or --data_filename (gen_pseudolabels.py)')
    entry = safe_pickle_load(path, what=what, hint=hint)
    try:
        data = np.asarray(entry['data'], dtype=np.uint8)
        sourcing = np.asarray(entry['extrapolated_targets']).astype(np.int64).reshape(-1)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{what} {path} is corrupt ({type(e).__name__}: {e})") from None
    if data.shape[1:] != (32, 32, 3) or len(data) != len(sourcing):
        raise UserError(f"{what} {path} is corrupt (data {data.shape}, {len(sourcing)} labels; "
                        f"expected N x 32 x 32 x 3 and N labels)")
    return data, sourcing


class ImbalanceCIFAR10(CIFAR10):
    """CIFAR-10 whose training split is long-tailed; the test split stays whole and balanced.

    The batches are read by `safe_pickle_load` rather than torchvision's plain `pickle.load`, so
    reading them can never run code; the attributes are the ones torchvision sets.
    """
    cls_num = 10
    name = 'CIFAR-10'

    def __init__(self, root, imb_type='exp', imb_factor=0.01, rand_number=0, train=True,
                 transform=None, target_transform=None, download=False):
        if imb_factor is not None:  # None: the whole training split, in the files' order (train_ssl.py's pool)
            check_fraction(imb_factor, '--imb_factor')
        VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)
        self.train = train
        folder = os.path.join(self.root, self.base_folder)
        fetch = partial(fetch_and_extract, self.url, self.root, self.filename, self.tgz_md5) if download else None
        require_intact(self, self.name, [os.path.join(folder, f) for f, _ in self.train_list + self.test_list],
                       CIFAR_URL, fetch)
        batches = [self._load_batch(os.path.join(folder, f))
                   for f, _ in (self.train_list if train else self.test_list)]
        self.data = np.concatenate([d for d, _ in batches])
        self.targets = [t for _, labels in batches for t in labels]
        self._load_meta()
        if train and imb_factor is not None:
            np.random.seed(rand_number)
            self.img_num_list = self.get_img_num_per_cls(self.cls_num, imb_type, imb_factor)
            self.class_order = np.unique(self.targets)
            keep = select_per_class(self.targets, self.class_order, self.img_num_list)
            self.data = self.data[keep]
            self.targets = [self.targets[i] for i in keep]

    def _load_batch(self, path):
        entry = safe_pickle_load(path, what=f'{self.name} batch', hint=f'download it again from {CIFAR_URL}')
        try:
            data = np.asarray(entry['data'], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = [int(t) for t in entry['labels' if 'labels' in entry else 'fine_labels']]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{self.name} batch {path} is corrupt ({type(e).__name__}: {e}); "
                            f"download it again from {CIFAR_URL}") from None
        if len(labels) != len(data):
            raise UserError(f"{self.name} batch {path} is corrupt ({len(data)} images, {len(labels)} labels)")
        return data.transpose(0, 2, 3, 1), labels  # stored as planes; torchvision keeps HWC

    def _load_meta(self):
        # Only the class names; the md5 of the batches already vouches for the download.
        path = os.path.join(self.root, self.base_folder, self.meta['filename'])
        entry = safe_pickle_load(path, what=f'{self.name} meta file', hint=f'download it again from {CIFAR_URL}')
        if not isinstance(entry, dict) or self.meta['key'] not in entry:
            raise UserError(f"{self.name} meta file {path} is corrupt (no '{self.meta['key']}')")
        self.classes = list(entry[self.meta['key']])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def get_img_num_per_cls(self, cls_num, imb_type, imb_factor):
        return img_num_per_cls(len(self.data) / cls_num, cls_num, imb_type, imb_factor)

    def get_cls_num_list(self):
        return np.bincount(self.targets, minlength=self.cls_num).tolist()


class ImbalanceCIFAR100(ImbalanceCIFAR10, CIFAR100):
    # torchvision's CIFAR100 only changes the file names and checksums, which it provides here.
    cls_num = 100
    name = 'CIFAR-100'


class SemiSupervisedImbalanceCIFAR10(ImbalanceCIFAR10):
    """Long-tailed CIFAR-10 plus `unlabel_size_factor` times as many 80M TinyImages images,
    picked per class by their sourcing labels and trained with their pseudo-labels."""

    def __init__(self, root, imb_type='exp', imb_factor=0.01, unlabel_imb_factor=1, rand_number=0,
                 train=True, transform=None, target_transform=None, download=False,
                 unlabeled_data=None, pseudo_labels=None, unlabel_size_factor=5, pseudo_threshold=None):
        if not train:
            raise ValueError("a training set only; the test split is ImbalanceCIFAR10(train=False)")
        super().__init__(root, imb_type, imb_factor, rand_number, True, transform, target_transform, download)
        self.unlabeled_data = unlabeled_data or os.path.join(root, 'ti_80M_selected.pickle')
        pseudo = add_pseudo_labeled(self, *load_tinyimages(self.unlabeled_data),
                                    pseudo_labels or os.path.join(root, 'pseudo_labeled_cifar.pickle'),
                                    unlabel_imb_factor, unlabel_size_factor, pseudo_threshold)
        self.targets = self.targets + pseudo.tolist()

