"""Labeled and unlabeled splits for long-tailed semi-supervised learning (train_ssl.py), drawn from a data
set's training images exactly as each protocol's code draws them, so that the same --rand_number picks the
same images as their code for the same seed.

Counts per class. N1 (M1) is the head class's labeled (unlabeled) count and gamma = 1 / --imb_factor:
- usb:  USB's make_imbalance_data (semilearn/datasets/utils.py): mu = (1/gamma)^(1/(C-1)); class c < C-1
        keeps int(N1 * mu^c), the last int(N1 / gamma). With gamma = 1 USB reads N1 (M1) as the TOTAL over
        the classes (its "balanced setting"), N1 / C each.
- daso: DASO's make_imbalance (lib/dataset/utils.py): class of rank r keeps int(N1 * (1/gamma)^(r/(C-1)));
        gamma = 1 keeps N1 (M1) per class.
A reversed unlabeled order gives class c the count of class C-1-c.

Images. `labels` are the pool's labels in its files' order (CIFAR's data_batch_1..5; digits: its pool).
- usb:  np.random.seed(seed); then for c = 0..C-1: shuffle class c's indices, the first N_c are labeled,
        the next M_c unlabeled (sample_labeled_unlabeled_data). Disjoint.
- daso: each step with a fresh RandomState(seed): 500 images per class (CIFAR, NUM_VALID 5000 / 10 classes;
        none on digits) are held out as their validation set; for every class, shuffle, N1 labeled and the next
        M1 unlabeled (x_u_split); then the labeled set made long-tailed (shuffle each class, keep N_c:
        make_imbalance), then the unlabeled set likewise, in reversed class order if asked. Disjoint.
The hidden labels of the unlabeled images are kept for the diagnostics only (log_pseudo.csv).
"""
from dataclasses import dataclass

import numpy as np

from errors import UserError

DASO_NUM_VALID = 5000  # DASO's DATASET.NUM_VALID for CIFAR-10/100


@dataclass(frozen=True)
class Split:
    labeled: np.ndarray     # pool indices of the labeled images
    unlabeled: np.ndarray   # pool indices of the unlabeled images
    counts_l: list          # labeled images per class
    counts_u: list          # unlabeled images per class


def _gamma(imb_factor):
    """gamma = 1 / imb_factor, exact where it is a whole number (0.01 -> 100, 1/150 -> 150)."""
    gamma = 1.0 / imb_factor
    return float(round(gamma)) if abs(gamma - round(gamma)) < 1e-9 else gamma


def usb_counts(n_max, num_classes, imb_factor, reverse=False):
    """USB's per-class counts (module docstring)."""
    gamma = _gamma(imb_factor)
    if gamma == 1:
        if n_max % num_classes:
            raise UserError(f"--protocol usb with a balanced set reads {n_max} as the total over {num_classes} classes "
                            f"(USB's rule), which must divide evenly")
        counts = [n_max // num_classes] * num_classes
    else:
        mu = np.power(1 / gamma, 1 / (num_classes - 1))
        counts = [int(n_max * np.power(mu, c)) for c in range(num_classes - 1)] + [int(n_max / gamma)]
    return counts[::-1] if reverse else counts


def daso_counts(n_max, num_classes, imb_factor, reverse=False):
    """DASO's per-class counts (module docstring)."""
    gamma = _gamma(imb_factor)
    if gamma == 1:
        return [n_max] * num_classes
    counts = [int(n_max * ((1. / gamma) ** (r / (num_classes - 1.0)))) for r in range(num_classes)]
    return counts[::-1] if reverse else counts


COUNTS = {'usb': usb_counts, 'daso': daso_counts}


def check_counts(labels, counts_l, counts_u, held_out=0, names=None):
    """One sentence for the first class that has fewer images than the split asks of it."""
    have = np.bincount(labels, minlength=len(counts_l))
    for c, (n, m) in enumerate(zip(counts_l, counts_u)):
        if n + m + held_out > have[c]:
            name = f"class {c}" + (f" ({names[c]})" if names else '')
            extra = f" + {held_out} held out" if held_out else ''
            raise UserError(f"{name} has {have[c]} training images, but the split asks for {n} labeled + {m} "
                            f"unlabeled{extra}; lower --num_max / --num_max_u")


def split_usb(labels, counts_l, counts_u, seed):
    """USB's draw (module docstring): (labeled, unlabeled) pool indices."""
    rng = np.random.RandomState(seed)  # the stream of np.random.seed(seed), without touching the global one
    labeled, unlabeled = [], []
    for c in range(len(counts_l)):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        labeled.extend(idx[:counts_l[c]])
        unlabeled.extend(idx[counts_l[c]:counts_l[c] + counts_u[c]])
    return np.asarray(labeled, dtype=np.int64), np.asarray(unlabeled, dtype=np.int64)


def _per_class_first(labels, keep, seed, classes):
    """Positions of the first keep[k] images of class classes[k] after a shuffle by RandomState(seed)."""
    rng = np.random.RandomState(seed)
    picked = []
    for k, c in enumerate(classes):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        picked.extend(idx[:keep[k]])
    return np.asarray(picked, dtype=np.int64)


def split_daso(labels, n_l, n_u, counts_l, counts_u, seed, num_valid, reverse=False):
    """DASO's draw (module docstring): (labeled, unlabeled) pool indices. `n_l`, `n_u`: the head counts of
    its balanced x_u_split; `counts_l`, `counts_u`: the final per-class counts (class order)."""
    num_classes = len(counts_l)
    pool = np.arange(len(labels))
    if num_valid:
        rng = np.random.RandomState(seed)
        train = []
        for c in range(num_classes):
            idx = np.where(labels == c)[0]
            rng.shuffle(idx)
            train.extend(idx[num_valid // num_classes:])
        pool = np.asarray(train, dtype=np.int64)
    rng = np.random.RandomState(seed)
    lab, unl = [], []
    for c in range(num_classes):
        idx = np.where(labels[pool] == c)[0]
        rng.shuffle(idx)
        lab.extend(idx[:n_l])
        unl.extend(idx[n_l:n_l + n_u])
    lab, unl = pool[np.asarray(lab, dtype=np.int64)], pool[np.asarray(unl, dtype=np.int64)]
    classes = list(range(num_classes))
    if counts_l != [n_l] * num_classes:
        lab = lab[_per_class_first(labels[lab], counts_l, seed, classes)]
    if counts_u != [n_u] * num_classes:
        order = classes[::-1] if reverse else classes
        unl = unl[_per_class_first(labels[unl], [counts_u[c] for c in order], seed, order)]
    return lab, unl


def draw_split(protocol, labels, n_l, n_u, imb_factor, imb_factor_u, seed, reverse=False, num_valid=0, names=None):
    """The protocol's Split of a pool with `labels` (its files' order); refuses counts a class cannot fill."""
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = int(labels.max()) + 1
    counts_l = COUNTS[protocol](n_l, num_classes, imb_factor)
    counts_u = COUNTS[protocol](n_u, num_classes, imb_factor_u, reverse)
    if protocol == 'usb':
        check_counts(labels, counts_l, counts_u, names=names)
        lab, unl = split_usb(labels, counts_l, counts_u, seed)
    else:
        held = num_valid // num_classes
        check_counts(labels, [n_l] * num_classes, [n_u] * num_classes, held, names)
        lab, unl = split_daso(labels, n_l, n_u, counts_l, counts_u, seed, num_valid, reverse)
    return Split(lab, unl, counts_l, counts_u)
