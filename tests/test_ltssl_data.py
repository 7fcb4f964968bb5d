"""train_ssl.py's data side: the protocols' splits (counts written out from USB's and DASO's tables and rules),
FixMatch's weak and strong views on the device against PIL at the same parameters, their sampling
distribution, and the step batches (streams, DDP shards, the torchvision path equal to the device path)."""
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision import transforms

from dataset import randaugment as ra
from dataset import randaugment_pil as rp
from dataset.ltssl_split import daso_counts, draw_split, usb_counts
from dataset.ssl_loader import SSLLoader, SSLSource
from errors import UserError

# ---------------------------------------------------------------- splits

# design.md §1 (counts checked there against the published totals: 3,720 / 7,443 / 1,236 / 9,922)
C10 = {(1500, 100): [1500, 899, 539, 323, 193, 116, 69, 41, 25, 15],
       (3000, 100): [3000, 1798, 1078, 646, 387, 232, 139, 83, 50, 30],
       (500, 100): [500, 299, 179, 107, 64, 38, 23, 13, 8, 5],
       (4000, 100): [4000, 2397, 1437, 861, 516, 309, 185, 111, 66, 40]}


@pytest.mark.parametrize('counts', [usb_counts, daso_counts])
def test_counts_of_the_standard_settings(counts):
    for (n_max, gamma), expected in C10.items():
        assert counts(n_max, 10, 1 / gamma) == expected
    assert sum(counts(1500, 10, 0.01)) == 3720 and sum(counts(3000, 10, 0.01)) == 7443
    assert sum(counts(150, 100, 0.1)) == 5835 and sum(counts(300, 100, 0.1)) == 11720
    assert sum(counts(50, 100, 0.1)) == 1911 and sum(counts(400, 100, 0.1)) == 15651
    assert counts(3000, 10, 0.01, reverse=True) == C10[(3000, 100)][::-1]
    # the digits miniature (docs/ltssl.md)
    assert counts(40, 10, 0.1) == [40, 30, 23, 18, 14, 11, 8, 6, 5, 4]
    assert counts(100, 10, 0.1) == [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]


def test_uniform_unlabeled_counts_differ_between_protocols():
    """USB reads M1 as the total when the unlabeled set is balanced, DASO per class (design.md finding 3)."""
    assert usb_counts(3000, 10, 1) == [300] * 10
    assert daso_counts(3000, 10, 1) == [3000] * 10
    with pytest.raises(UserError, match='divide'):
        usb_counts(3001, 10, 1)


def test_usb_split_is_np_random_seed_then_per_class_shuffle():
    """USB's sample_labeled_unlabeled_data, written out: np.random.seed(seed), then for each class in order
    shuffle its indices, the first N_c labeled, the next M_c unlabeled."""
    labels = np.random.RandomState(7).permutation(np.repeat(np.arange(3), 12))
    np.random.seed(5)
    expected_l, expected_u = [], []
    for c, (n, m) in enumerate(zip([6, 3, 2], [4, 2, 1])):  # int(6 / sqrt(3)) = 3, int(6 / 3) = 2; 4, 4 / 2, 4 / 4
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        expected_l += list(idx[:n])
        expected_u += list(idx[n:n + m])
    state = np.random.get_state()
    split = draw_split('usb', labels, 6, 4, 1 / 3, 1 / 4, 5)
    assert split.counts_l == [6, 3, 2] and split.counts_u == [4, 2, 1]
    assert split.labeled.tolist() == expected_l and split.unlabeled.tolist() == expected_u
    assert np.array_equal(np.random.get_state()[1], state[1])  # the global stream is left alone


@pytest.mark.parametrize('protocol', ['usb', 'daso'])
@pytest.mark.parametrize('order', ['same', 'reversed'])
def test_splits_are_disjoint_have_their_counts_and_depend_on_the_seed(protocol, order):
    labels = np.random.RandomState(0).permutation(np.repeat(np.arange(10), 600))
    reverse = order == 'reversed'
    split = draw_split(protocol, labels, 150, 300, 0.01, 0.01, 3, reverse=reverse, num_valid=1000)
    assert not set(split.labeled) & set(split.unlabeled)
    assert np.bincount(labels[split.labeled], minlength=10).tolist() == split.counts_l
    assert np.bincount(labels[split.unlabeled], minlength=10).tolist() == split.counts_u
    assert split.counts_u == (usb_counts if protocol == 'usb' else daso_counts)(300, 10, 0.01, reverse)
    again = draw_split(protocol, labels, 150, 300, 0.01, 0.01, 3, reverse=reverse, num_valid=1000)
    other = draw_split(protocol, labels, 150, 300, 0.01, 0.01, 4, reverse=reverse, num_valid=1000)
    assert np.array_equal(split.labeled, again.labeled) and not np.array_equal(split.labeled, other.labeled)


def test_daso_split_holds_out_its_validation_images():
    """DASO draws its 5,000 validation images (here 100 per class) first: none of them is labeled or unlabeled,
    and the draw differs from USB's for the same seed."""
    labels = np.repeat(np.arange(10), 200)
    rng = np.random.RandomState(3)
    held = np.concatenate([rng.permutation(np.where(labels == c)[0])[:100] for c in range(10)])
    split = draw_split('daso', labels, 50, 50, 0.1, 0.1, 3, num_valid=1000)
    assert not set(held) & (set(split.labeled) | set(split.unlabeled))
    assert not np.array_equal(np.sort(split.labeled), np.sort(draw_split('usb', labels, 50, 50, 0.1, 0.1, 3).labeled))


def test_a_class_too_small_for_the_split_is_refused():
    labels = np.repeat(np.arange(10), 100)
    with pytest.raises(UserError, match=r"class 0 \(airplane\) has 100 training images, but the split asks for 60 "
                                        r"labeled \+ 50 unlabeled"):
        draw_split('usb', labels, 60, 50, 0.1, 0.1, 0, names=['airplane'] + ['x'] * 9)


# ---------------------------------------------------------------- weak and strong views against PIL

def _images(n, seed=0):
    rng = np.random.RandomState(seed)
    images = rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8)
    images[n // 2:] = (np.cumsum(rng.randint(-8, 9, (n - n // 2, 32, 32, 3)), axis=2) % 256).astype(np.uint8)
    images[:4] = images[:4] // 64 * 64  # few distinct values: Equalize's and AutoContrast's edge cases
    images[4] = 77  # one value: both leave it alone
    return images


def _one_op(n, name, level, negate):
    views = ra.Views(torch.zeros(n, dtype=torch.bool), torch.full((n, 2), ra.PAD))
    views.op = torch.tensor([[ra.OP[name], ra.OP['Identity']]] * n)
    views.apply = torch.tensor([[True, False]] * n)
    views.level = torch.full((n, 2), level)
    views.negate = torch.full((n, 2), negate)
    return views


def test_magnitudes_are_fixmatchs():
    """kekmodel's RandAugmentMC(2, 10) at levels v = 1..9: float(v) * max / 10 + bias, int(v * max / 10) + bias."""
    levels = range(1, 10)
    assert [ra.enhance_factor(v) for v in levels] == pytest.approx([0.05 + 0.09 * v for v in levels])
    assert [ra.posterize_bits(v) for v in levels] == [4, 4, 5, 5, 6, 6, 6, 7, 7]
    assert [ra.rotate_degrees(v, False) for v in levels] == [3, 6, 9, 12, 15, 18, 21, 24, 27]
    assert [ra.rotate_degrees(v, True) for v in levels] == [-3, -6, -9, -12, -15, -18, -21, -24, -27]
    assert [ra.shear(v, True) for v in levels] == pytest.approx([-0.03 * v for v in levels])
    assert [ra.solarize_threshold(v) for v in levels] == [231, 205, 180, 154, 128, 103, 77, 52, 26]
    assert [ra.translate_pixels(v, False, 32) for v in levels] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert [ra.translate_pixels(v, True, 32) for v in levels] == [0, -1, -2, -3, -4, -5, -6, -7, -8]
    assert (ra.NUM_OPS, ra.LEVELS, ra.CUTOUT, ra.CUTOUT_FILL, len(ra.OPS)) == (2, 10, 16, 127, 14)


def test_every_op_at_every_level_and_sign_equals_pil():
    """Bit for bit, all 14 ops x levels 1..9 x both signs, against Pillow itself (Pillow 13 here; the module
    docstring says where a different Pillow might round Sharpness otherwise)."""
    images = _images(12)
    aug = ra.RandAugment(32, 'cpu')
    for name in ra.OPS:
        for level in range(1, 10):
            for negate in (False, True):
                views = _one_op(len(images), name, level, negate)
                op = views.op[:, 0]
                moved = aug._geometric(torch.from_numpy(images), aug.geometry[op, level, int(negate)])
                out = aug._blend(aug._lookup(moved, op, views.level[:, 0]), op, aug.factor[op, level])
                ref = np.stack([np.asarray(rp.apply_op(Image.fromarray(im), name, level, negate)) for im in images])
                assert np.array_equal(out.numpy(), ref), (name, level, negate)


def test_whole_strong_views_equal_pil_at_the_drawn_parameters():
    images = _images(300, seed=1)
    views = ra.draw(len(images), torch.Generator().manual_seed(3), strong=True)
    weak = ra.weak_pixels(torch.from_numpy(images), torch.arange(len(images)), views)
    pixels = ra.RandAugment(32, 'cpu')(weak, views)
    for i in range(len(images)):
        assert np.array_equal(pixels[i].numpy(), np.asarray(rp.strong(Image.fromarray(images[i]), views.row(i)))), i


def test_weak_view_is_torchvisions_flip_then_reflect_padded_crop():
    """torchvision's RandomHorizontalFlip then RandomCrop(32, padding=4, padding_mode='reflect') at the same window."""
    images = _images(20, seed=2)
    views = ra.draw(len(images), torch.Generator().manual_seed(0), strong=False)
    pixels = ra.weak_pixels(torch.from_numpy(images), torch.arange(len(images)), views)
    pad = transforms.Pad(4, padding_mode='reflect')
    for i, image in enumerate(images):
        img = Image.fromarray(image)
        if views.flip[i]:
            img = transforms.functional.hflip(img)
        top, left = views.offset[i].tolist()
        assert np.array_equal(pixels[i].numpy(), np.asarray(pad(img))[top:top + 32, left:left + 32])
    assert views.flip.any() and not views.flip.all()


def test_cutout_is_their_inclusive_17_pixel_square_clipped_at_the_border():
    aug = ra.RandAugment(32, 'cpu')
    pixels = torch.zeros(3, 32, 32, 3, dtype=torch.uint8)
    out = aug._cutout(pixels, torch.tensor([[20, 10], [3, 31], [31, 0]]))
    grey = (out[..., 0] == 127)
    # u = 20 -> rows 12..28 (17); u = 10 -> columns 2..18
    assert grey[0].nonzero()[:, 0].unique().tolist() == list(range(12, 29))
    assert grey[0].nonzero()[:, 1].unique().tolist() == list(range(2, 19))
    # u = 3 -> rows 0..16 (max(0, -5) = 0, then 0 + 16 inclusive); u = 31 -> columns 23..31 (min(32, 39), clipped)
    assert grey[1].sum() == 17 * 9
    assert grey[2].sum() == 9 * 17


def test_drawn_parameters_follow_their_distribution():
    """Over 100,000 draws (chi-square p > 1e-3): ops uniform over 14, applied with p 0.5, levels uniform on 1..9,
    Cutout's drawn row uniform over 0..31; the sign and the flip with p 0.5."""
    views = ra.draw(100_000, torch.Generator().manual_seed(11), strong=True)
    for values, k in ((views.op.flatten(), 14), (views.level.flatten() - 1, 9), (views.cutout[:, 0], 32),
                      (views.apply.flatten().long(), 2), (views.negate.flatten().long(), 2),
                      (views.flip.long(), 2), (views.offset.flatten(), 9)):
        counts = np.bincount(values.numpy(), minlength=k)
        assert len(counts) == k and stats.chisquare(counts).pvalue > 1e-3


# ---------------------------------------------------------------- step batches

def _source(world=1, rank=0, pil=False, seed=0, n_l=10, n_u=23):
    return SSLSource(_images(n_l, 3), np.arange(n_l) % 5, _images(n_u, 4), 4, 2, (0.5,) * 3, (0.25,) * 3, flip=True,
                     seed=seed, rank=rank, world=world, pil=pil)


def test_streams_are_permutation_passes_and_ranks_split_each_global_batch():
    """Labeled: 10 images, B = 4: steps 0..4 read positions 0..19 = two whole passes, each a permutation. The two
    ranks of a torchrun run take positions r::2 of the same global batches."""
    one = _source()
    labeled = torch.cat([one.streams.indices(0x6c62, 10, 4 * t, 4 * t + 4) for t in range(5)])
    assert sorted(labeled[:10].tolist()) == list(range(10)) and sorted(labeled[10:].tolist()) == list(range(10))
    ranks = [_source(world=2, rank=r) for r in (0, 1)]
    for t in range(6):
        whole, parts = one.batch(t, 0), [s.batch(t, 0) for s in ranks]
        for name in ('idx_ulb', 'y_lb'):
            a, b = getattr(parts[0], name), getattr(parts[1], name)
            assert torch.equal(getattr(whole, name)[0::2], a) and torch.equal(getattr(whole, name)[1::2], b)


def test_torchvision_path_equals_the_device_path_and_a_resumed_epoch_replays_it():
    device, host = _source(), _source(pil=True)
    loader = SSLLoader(host, steps=3, device='cpu')
    loader.set_epoch(1)
    batches = list(loader)
    for k, batch in enumerate(batches):
        expected = device.batch(3 + k, 1)
        for name in ('x_lb', 'y_lb', 'x_ulb_w', 'x_ulb_s', 'idx_ulb'):
            assert torch.equal(getattr(batch, name), getattr(expected, name)), name
        assert (batch.step, batch.epoch, batch.seed) == (expected.step, expected.epoch, expected.seed)
    loader.set_epoch(1)
    loader.skip(2)
    assert len(loader) == 1 and torch.equal(next(iter(loader)).x_ulb_s, batches[2].x_ulb_s)
