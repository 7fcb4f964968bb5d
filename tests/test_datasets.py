"""The long-tailed data sets: counts, the exact draw of the original, the real loading code on
tiny files in the real formats, and one-line errors for everything a user can get wrong."""
import os
import pickle
import re
import urllib.error

import numpy as np
import pytest
import torch
from torchvision import transforms

import dataset.digits as digits_module
import dataset.download
import fixtures
from conftest import SVHN_TRAIN_PER_CLASS
from dataset import DATASETS, build_transform, dataset_info, load_unlabeled_pool
from dataset.digits import (TEST_PER_CLASS, ImbalanceDigits, SemiSupervisedImbalanceDigits, balanced_test_mask,
                            load_digit_images)
from dataset.imbalance_cifar import (ImbalanceCIFAR10, ImbalanceCIFAR100, SemiSupervisedImbalanceCIFAR10,
                                     img_num_per_cls, img_num_per_cls_unlabeled)
from dataset.imbalance_svhn import ImbalanceSVHN, SemiSupervisedImbalanceSVHN, svhn_class_order
from errors import UserError
from fileio import safe_pickle_load

SVHN_ORDER = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]


def original_draw(labels, classes, counts):
    """The original's loop, written out independently: per class in turn, shuffle its indices
    (ascending) with numpy's global stream and keep the first n."""
    picked = []
    for c, n in zip(classes, counts):
        idx = np.where(np.asarray(labels) == c)[0]
        np.random.shuffle(idx)
        picked.extend(idx[:n])
    return np.array(picked, dtype=np.int64)


def colour_class(images_hwc):
    """The fixture class each image's colour belongs to (fixtures give every class a colour)."""
    palette = np.random.RandomState(1234).randint(30, 226, size=(100, 3))
    means = images_hwc.reshape(len(images_hwc), -1, 3).mean(axis=1)
    return np.argmin(((means[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)


def raw_cifar10_train(root):
    folder = os.path.join(root, 'cifar-10-batches-py')
    batches = [safe_pickle_load(os.path.join(folder, f'data_batch_{i}')) for i in range(1, 6)]
    data = np.concatenate([b['data'] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return data, np.concatenate([b['labels'] for b in batches])


class Evil:
    """A pickle that makes a folder when plainly unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


# ---- the counts ---------------------------------------------------------------------------

def test_cifar10_counts_match_the_paper():
    counts = img_num_per_cls(50000 / 10, 10, 'exp', 0.01)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(counts) == 12406


def test_cifar100_counts_match_the_paper():
    counts = img_num_per_cls(50000 / 100, 100, 'exp', 0.01)
    assert sum(counts) == 10847 and counts[0] == 500 and counts[-1] == 5


def test_step_and_balanced_counts():
    assert img_num_per_cls(5000.0, 10, 'step', 0.1) == [5000] * 5 + [500] * 5
    assert img_num_per_cls(5000.0, 10, 'none', 0.1) == [5000] * 10


def test_svhn_counts_give_digit_0_the_fewest():
    counts = ImbalanceSVHN.get_img_num_per_cls(None, 10, 'exp', 0.01)
    assert counts[0] == 1000 and counts[-1] == 10
    assert svhn_class_order(np.arange(10)).tolist() == SVHN_ORDER
    per_digit = dict(zip(SVHN_ORDER, counts))
    assert per_digit[1] == 1000 and per_digit[0] == 10


def test_unlabeled_counts():
    labeled = img_num_per_cls(5000.0, 10, 'exp', 0.01)
    assert img_num_per_cls_unlabeled(labeled, 1, 5) == [6203] * 10
    tail = img_num_per_cls_unlabeled(labeled, 0.01, 5)
    assert tail == sorted(tail, reverse=True) and abs(sum(tail) - 62030) < 10


@pytest.mark.parametrize('bad', [0, -0.1, 1.5])
def test_imb_factor_outside_0_1_is_a_user_error(bad):
    with pytest.raises(UserError, match=rf"--imb_factor must be in \(0, 1\], got {bad}"):
        ImbalanceCIFAR10('/nonexistent', imb_factor=bad)
    with pytest.raises(UserError, match='--imb_factor'):
        ImbalanceDigits(imb_factor=bad)


# ---- CIFAR --------------------------------------------------------------------------------

def test_cifar10_train_is_long_tailed_and_drawn_like_the_original(cifar10_root):
    ds = ImbalanceCIFAR10(cifar10_root, imb_factor=0.1, rand_number=3)
    counts = img_num_per_cls(20.0, 10, 'exp', 0.1)
    assert ds.get_cls_num_list() == counts and ds.cls_num == 10
    assert ds.data.shape == (sum(counts), 32, 32, 3) and ds.data.dtype == np.uint8
    assert all(type(t) is int for t in ds.targets)
    assert ds.classes[0] == 'airplane' and ds.class_to_idx['truck'] == 9

    data, labels = raw_cifar10_train(cifar10_root)
    np.random.seed(3)
    picked = original_draw(labels, range(10), counts)
    assert np.array_equal(ds.data, data[picked]) and ds.targets == labels[picked].tolist()


def test_cifar10_test_split_is_whole_and_exact(cifar10_root):
    ds = ImbalanceCIFAR10(cifar10_root, imb_factor=0.1, rand_number=5, train=False)
    labels = fixtures.shuffled_labels(10, 10, 100)
    assert ds.get_cls_num_list() == [10] * 10
    assert ds.targets == labels.tolist()
    assert np.array_equal(ds.data, fixtures.class_images(labels, 100))  # planes -> HWC done right


def test_rand_number_fixes_the_draw(cifar10_root):
    a, b, c = (ImbalanceCIFAR10(cifar10_root, imb_factor=0.1, rand_number=r) for r in (0, 0, 1))
    assert np.array_equal(a.data, b.data) and a.targets == b.targets
    assert not np.array_equal(a.data, c.data)


def test_items_go_through_transforms(cifar10_root):
    ds = ImbalanceCIFAR10(cifar10_root, imb_factor=0.1, transform=build_transform('cifar10', train=True),
                          target_transform=lambda t: t + 100)
    img, target = ds[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and target == ds.targets[0] + 100


def test_cifar100_loads_fine_labels(cifar100_root):
    ds = ImbalanceCIFAR100(cifar100_root, imb_factor=0.5)
    assert ds.get_cls_num_list() == img_num_per_cls(5.0, 100, 'exp', 0.5)
    assert ds.classes[3] == 'class3' and ds.cls_num == 100
    assert np.array_equal(colour_class(ds.data), ds.targets)
    assert ImbalanceCIFAR100(cifar100_root, train=False).get_cls_num_list() == [2] * 100


def test_missing_cifar_says_where_to_get_it(tmp_path):
    with pytest.raises(UserError, match=r"CIFAR-10 not found in .*data_batch_1.*cs\.toronto\.edu.*--data_path"):
        ImbalanceCIFAR10(str(tmp_path))


def test_wrong_checksum_is_reported_as_corrupt(tmp_path):
    fixtures.write_cifar10(tmp_path)  # without no_checksum: fixture files cannot match the md5
    with pytest.raises(UserError, match='fails its md5 check'):
        ImbalanceCIFAR10(str(tmp_path))


def test_failed_download_is_a_user_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(dataset.download.urllib.request, 'urlopen', offline)
    with pytest.raises(UserError, match=r'could not download cifar-10-python\.tar\.gz from https://\S+ '
                                        r'\(no network\); .* put it into ' + re.escape(str(tmp_path))):
        ImbalanceCIFAR10(str(tmp_path), download=True)
    assert os.listdir(tmp_path) == []


def test_truncated_batch_is_a_user_error(cifar10_root):
    path = os.path.join(cifar10_root, 'cifar-10-batches-py', 'data_batch_2')
    with open(path, 'rb') as f:
        head = f.read(300)
    with open(path, 'wb') as f:
        f.write(head)
    with pytest.raises(UserError, match='data_batch_2'):
        ImbalanceCIFAR10(cifar10_root)


@pytest.mark.parametrize('victim', ['batch', 'tinyimages', 'pseudo'])
def test_malicious_pickle_is_refused_without_running(cifar10_semi_root, tmp_path, victim):
    marker = str(tmp_path / 'pwned')
    pseudo = os.path.join(cifar10_semi_root, 'pseudo_labeled_cifar.pickle')
    fixtures.write_pseudo_labels(pseudo, np.zeros(1000, dtype=np.int64))
    path = {'batch': os.path.join(cifar10_semi_root, 'cifar-10-batches-py', 'data_batch_3'),
            'tinyimages': os.path.join(cifar10_semi_root, 'ti_80M_selected.pickle'),
            'pseudo': pseudo}[victim]
    with open(path, 'wb') as f:
        pickle.dump({'data': Evil(marker)}, f)
    with pytest.raises(UserError, match='refusing to load'):
        SemiSupervisedImbalanceCIFAR10(cifar10_semi_root, imb_factor=0.1)
    assert not os.path.exists(marker)


# ---- semi-supervised CIFAR-10 -------------------------------------------------------------

def semi_cifar(root, **kwargs):
    return SemiSupervisedImbalanceCIFAR10(root, imb_factor=0.1, unlabel_imb_factor=0.5, rand_number=2,
                                          unlabel_size_factor=2, **kwargs)


def test_semi_cifar_appends_pseudo_labels_drawn_like_the_original(cifar10_semi_root):
    sourcing = safe_pickle_load(os.path.join(cifar10_semi_root, 'ti_80M_selected.pickle'))['extrapolated_targets']
    pseudo = (sourcing + 1) % 10  # differ from the sourcing labels everywhere
    fixtures.write_pseudo_labels(os.path.join(cifar10_semi_root, 'pseudo_labeled_cifar.pickle'), pseudo)
    ds = semi_cifar(cifar10_semi_root)

    labeled = img_num_per_cls(20.0, 10, 'exp', 0.1)
    unlabeled = img_num_per_cls_unlabeled(labeled, 0.5, 2)
    assert ds.get_cls_num_list() == (np.array(labeled) + np.roll(unlabeled, 1)).tolist()

    data, labels = raw_cifar10_train(cifar10_semi_root)
    pool = safe_pickle_load(os.path.join(cifar10_semi_root, 'ti_80M_selected.pickle'))['data']
    np.random.seed(2)
    picked = original_draw(labels, range(10), labeled)
    picked_pool = original_draw(sourcing, range(10), unlabeled)  # the same stream, continued
    assert np.array_equal(ds.data, np.concatenate([data[picked], pool[picked_pool]]))
    assert ds.targets == labels[picked].tolist() + pseudo[picked_pool].tolist()
    assert ds.num_labeled == len(picked)


def test_pseudo_threshold_drops_after_the_draw(cifar10_semi_root, capsys):
    path = os.path.join(cifar10_semi_root, 'pseudo_labeled_cifar.pickle')
    pseudo = np.random.RandomState(0).randint(0, 10, 1000)
    confidence = np.random.RandomState(1).rand(1000)
    fixtures.write_pseudo_labels(path, pseudo, confidence=confidence, extra={'prediction_model': 'm.pth'})
    full, kept = semi_cifar(cifar10_semi_root), semi_cifar(cifar10_semi_root, pseudo_threshold=0.5)
    n = sum(img_num_per_cls(20.0, 10, 'exp', 0.1))
    # Confidences are not in the data set: find each pool image's by matching it in the pool.
    pool = safe_pickle_load(os.path.join(cifar10_semi_root, 'ti_80M_selected.pickle'))['data']
    where = {img.tobytes(): i for i, img in enumerate(pool)}
    conf = np.array([confidence[where[img.tobytes()]] for img in full.data[n:]])
    assert np.array_equal(kept.data, np.concatenate([full.data[:n], full.data[n:][conf >= 0.5]]))
    assert 0 < len(kept) - n < len(full) - n

    fixtures.write_pseudo_labels(path, pseudo)
    assert len(semi_cifar(cifar10_semi_root, pseudo_threshold=0.5)) == len(full)
    assert 'no \'confidence\'' in capsys.readouterr().out


def test_pseudo_label_length_must_match_the_pool(cifar10_semi_root):
    fixtures.write_pseudo_labels(os.path.join(cifar10_semi_root, 'pseudo_labeled_cifar.pickle'), np.zeros(999))
    with pytest.raises(UserError, match='999 labels but the unlabeled pool has 1000'):
        semi_cifar(cifar10_semi_root)


def test_semi_cifar_missing_files_name_their_source_and_flag(cifar10_semi_root):
    with pytest.raises(UserError, match='gen_pseudolabels.py.*--pseudo_labels'):
        semi_cifar(cifar10_semi_root)
    os.remove(os.path.join(cifar10_semi_root, 'ti_80M_selected.pickle'))
    with pytest.raises(UserError, match='80M TinyImages.*withdrawn.*--unlabeled_data'):
        semi_cifar(cifar10_semi_root)


def test_semi_cifar_paths_can_be_moved(cifar10_semi_root, tmp_path):
    os.rename(os.path.join(cifar10_semi_root, 'ti_80M_selected.pickle'), tmp_path / 'ti.pickle')
    fixtures.write_pseudo_labels(tmp_path / 'p.pickle', np.zeros(1000))
    ds = semi_cifar(cifar10_semi_root, unlabeled_data=str(tmp_path / 'ti.pickle'),
                    pseudo_labels=str(tmp_path / 'p.pickle'))
    assert ds.get_cls_num_list()[0] == 20 + sum(img_num_per_cls_unlabeled(img_num_per_cls(20.0, 10, 'exp', 0.1), 0.5, 2))


# ---- SVHN ---------------------------------------------------------------------------------

def test_svhn_train_visits_1_to_9_then_0(svhn_root):
    ds = ImbalanceSVHN(svhn_root, imb_factor=0.01)
    asked = dict(zip(SVHN_ORDER, img_num_per_cls(1000, 10, 'exp', 0.01)))
    # The fixture has fewer images than asked for most digits: each gets what it has.
    assert ds.get_cls_num_list() == [min(asked[d], SVHN_TRAIN_PER_CLASS[d]) for d in range(10)]
    assert ds.get_cls_num_list()[0] == 10
    assert isinstance(ds.labels, np.ndarray) and ds.data.shape[1:] == (3, 32, 32)
    assert np.array_equal(colour_class(ds.data.transpose(0, 2, 3, 1)), ds.labels)  # labels follow data

    labels = fixtures.shuffled_labels(SVHN_TRAIN_PER_CLASS, 10, 0)
    np.random.seed(0)
    picked = original_draw(labels, SVHN_ORDER, img_num_per_cls(1000, 10, 'exp', 0.01))
    assert np.array_equal(ds.labels, labels[picked])


def test_svhn_test_split_is_whole(svhn_root):
    ds = ImbalanceSVHN(svhn_root, split='test')
    labels = fixtures.shuffled_labels(10, 10, 1)
    assert ds.labels.tolist() == labels.tolist()
    assert np.array_equal(ds.data, fixtures.class_images(labels, 1).transpose(0, 3, 1, 2))
    img, target = ds[0]
    assert img.size == (32, 32) and target == labels[0]


def test_svhn_rand_number_fixes_the_draw(svhn_root):
    a, b, c = (ImbalanceSVHN(svhn_root, imb_factor=0.01, rand_number=r).data for r in (4, 4, 5))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_svhn_missing_file(tmp_path):
    with pytest.raises(UserError, match=r'SVHN train split not found .*train_32x32\.mat.*--data_path'):
        ImbalanceSVHN(str(tmp_path))


def test_semi_svhn_uses_extra_with_pseudo_labels(svhn_root):
    extra = fixtures.shuffled_labels(60, 10, 2)
    fixtures.write_pseudo_labels(os.path.join(svhn_root, 'pseudo_labeled_svhn.pickle'), (extra + 3) % 10)
    ds = SemiSupervisedImbalanceSVHN(svhn_root, imb_factor=0.1, unlabel_size_factor=1)
    labeled = ImbalanceSVHN(svhn_root, imb_factor=0.1)
    n = len(labeled)
    asked = img_num_per_cls_unlabeled(img_num_per_cls(1000, 10, 'exp', 0.1), 1, 1)
    got = [min(a, 60) for a in asked]  # the fixture's extra split has 60 per digit
    assert len(ds) == n + sum(got)
    assert np.array_equal(ds.data[:n], labeled.data)
    truth = colour_class(ds.data[n:].transpose(0, 2, 3, 1))
    assert np.array_equal(ds.labels[n:], (truth + 3) % 10)  # pseudo-labels, not the true ones

    os.remove(os.path.join(svhn_root, 'extra_32x32.mat'))
    with pytest.raises(UserError, match='extra_32x32.mat.*--unlabeled_data'):
        SemiSupervisedImbalanceSVHN(svhn_root, imb_factor=0.1)


# ---- digits -------------------------------------------------------------------------------

def sorted_rows(images):
    flat = images.reshape(len(images), -1)
    return flat[np.lexsort(flat.T[::-1])]


@pytest.mark.parametrize('file_found', [True, False])
def test_digits_are_scikit_learns_load_digits(file_found, monkeypatch):
    """Read from scikit-learn's CSV without importing it, or (file not found) through load_digits():
    either way its images and labels, scaled 0..16 -> 0..255 and blown up to 32x32x3."""
    from sklearn.datasets import load_digits
    if not file_found:
        monkeypatch.setattr(digits_module.importlib.util, 'find_spec', lambda name: None)
    expected = load_digits()
    images, labels = digits_module.bundled_digits()
    assert np.array_equal(images, expected.images) and np.array_equal(labels, expected.target)
    big, big_labels = load_digit_images()
    assert big.shape == (1797, 32, 32, 3) and big.dtype == np.uint8 and big_labels.dtype == np.int64
    assert np.array_equal(big[:, ::4, ::4, 1], np.rint(expected.images * 255 / 16))
    assert np.array_equal(big[:, 3::4, 3::4, 0], big[:, ::4, ::4, 2])


def test_digits_test_set_is_balanced_and_fixed():
    a, b = ImbalanceDigits(train=False, rand_number=0), ImbalanceDigits(train=False, rand_number=7)
    assert a.get_cls_num_list() == [TEST_PER_CLASS] * 10
    assert np.array_equal(a.data, b.data) and a.data.shape[1:] == (32, 32, 3) and a.data.dtype == np.uint8


def test_digits_train_is_long_tailed_and_splits_the_pool():
    ds = ImbalanceDigits(imb_factor=0.1, rand_number=1)
    images, labels = load_digit_images()
    n_max = (len(labels) - 10 * TEST_PER_CLASS) / 10
    pool_counts = np.bincount(labels) - TEST_PER_CLASS
    assert ds.get_cls_num_list() == np.minimum(img_num_per_cls(n_max, 10, 'exp', 0.1), pool_counts).tolist()
    # train subset + unused pool + test set is every image exactly once
    test = ImbalanceDigits(train=False)
    everything = np.concatenate([ds.data, ds.unused_data, test.data])
    assert np.array_equal(sorted_rows(everything), sorted_rows(images))
    assert np.bincount(ds.unused_targets).tolist() == (pool_counts - ds.get_cls_num_list()).tolist()
    assert not np.array_equal(ds.data, ImbalanceDigits(imb_factor=0.1, rand_number=2).data)


def test_semi_digits_draws_from_the_unused_pool(tmp_path):
    base = ImbalanceDigits(str(tmp_path), imb_factor=0.1, rand_number=0)
    pseudo = (base.unused_targets + 1) % 10
    fixtures.write_pseudo_labels(tmp_path / 'pseudo_labeled_digits.pickle', pseudo)
    ds = SemiSupervisedImbalanceDigits(str(tmp_path), imb_factor=0.1, unlabel_size_factor=1)

    labels = load_digit_images()[1]
    pool_labels = labels[~balanced_test_mask(labels)]
    labeled = img_num_per_cls(len(pool_labels) / 10, 10, 'exp', 0.1)
    np.random.seed(0)
    original_draw(pool_labels, range(10), labeled)
    picked = original_draw(base.unused_targets, range(10), img_num_per_cls_unlabeled(labeled, 1, 1))
    assert len(picked) > 0
    assert np.array_equal(ds.data, np.concatenate([base.data, base.unused_data[picked]]))
    assert ds.targets == base.targets + pseudo[picked].tolist()

    fixtures.write_pseudo_labels(tmp_path / 'pseudo_labeled_digits.pickle', pseudo[:-1])
    with pytest.raises(UserError, match=f'{len(pseudo) - 1} labels but the unlabeled pool has {len(pseudo)}'):
        SemiSupervisedImbalanceDigits(str(tmp_path), imb_factor=0.1)


# ---- the registry -------------------------------------------------------------------------

def test_registry_and_transforms():
    assert set(DATASETS) == {'cifar10', 'cifar100', 'svhn', 'digits', 'folder'}  # folder: tests/test_folder.py
    assert DATASETS['cifar100'].build_semi is None and DATASETS['cifar100'].num_classes == 100
    assert DATASETS['cifar10'].mean == (0.4914, 0.4822, 0.4465) and DATASETS['svhn'].std == (0.5, 0.5, 0.5)
    has_flip = {name: any(isinstance(t, transforms.RandomHorizontalFlip) for t in build_transform(name, True).transforms)
                for name in ('cifar10', 'cifar100', 'svhn', 'digits')}
    assert has_flip == {'cifar10': True, 'cifar100': True, 'svhn': True, 'digits': False}
    assert [type(t) for t in build_transform('svhn', False).transforms] == [transforms.ToTensor, transforms.Normalize]
    with pytest.raises(UserError, match="unknown dataset 'mnist'; choose one of cifar10, cifar100, svhn, digits, folder"):
        dataset_info('mnist')


def test_builders(cifar10_root, svhn_root):
    info = dataset_info('cifar10')
    train = info.build_train(cifar10_root, 'exp', 0.1, 0, build_transform('cifar10', True))
    assert train.get_cls_num_list() == img_num_per_cls(20.0, 10, 'exp', 0.1)
    assert len(info.build_val(cifar10_root, build_transform('cifar10', False))) == 100
    assert len(dataset_info('svhn').build_val(svhn_root, None)) == 100
    digits = dataset_info('digits')
    assert len(digits.build_val(None, None)) == 10 * TEST_PER_CLASS
    with pytest.raises(UserError, match='--unlabeled_data does not apply to digits'):
        digits.build_semi(None, 'exp', 0.1, 1, 0, None, unlabeled_data='x.pickle')


def test_load_unlabeled_pool(cifar10_semi_root, svhn_root):
    data, sourcing, truth, _ = load_unlabeled_pool('cifar10', cifar10_semi_root)
    assert data.shape == (1000, 32, 32, 3) and len(sourcing) == 1000 and truth is None
    data, sourcing, truth, _ = load_unlabeled_pool('svhn', svhn_root, imb_factor=0.1)
    assert data.shape == (600, 32, 32, 3) and np.array_equal(colour_class(data), truth)
    assert np.array_equal(sourcing, truth) and 10 not in truth
    data, sourcing, truth, _ = load_unlabeled_pool('digits', None, imb_type='exp', imb_factor=0.1, rand_number=3)
    pool = ImbalanceDigits(imb_factor=0.1, rand_number=3)
    assert np.array_equal(data, pool.unused_data) and np.array_equal(sourcing, pool.unused_targets)
    with pytest.raises(UserError, match='cifar100 has no unlabeled pool'):
        load_unlabeled_pool('cifar100', cifar10_semi_root)
