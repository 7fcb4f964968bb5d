"""The device-resident loader: crops, flips and normalisation as torchvision's pipeline, batches a
function of (seed, epoch, step, rank), the project's samplers driving it (resample, DDP shards), and
the speed flags through train.py and gen_pseudolabels.py (the two loaders evaluate and label alike).
Kill-and-resume and SIGTERM with the device loader as the default: tests/test_reliability.py."""
import os
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import fixtures
import gen_pseudolabels
import train
import trainer
from dataset import DATASETS, build_transform
from dataset.device_loader import DeviceLoader, HostBatches, as_nhwc, normalize
from dataset.imbalance_cifar import ImbalanceCIFAR10
from dataset.imbalance_svhn import ImbalanceSVHN
from dataset.samplers import ImbalancedDatasetSampler, ShuffleSampler
from engine import default_amp
from losses import effective_num_weights

CPU = torch.device('cpu')
MEAN, STD = DATASETS['cifar10'].mean, DATASETS['cifar10'].std


def _images(n, seed=0, size=32):
    return np.random.RandomState(seed).randint(0, 256, size=(n, size, size, 3)).astype(np.uint8)


def _loader(images, targets, sampler, batch_size=8, **kw):
    kw.setdefault('train', True)
    return DeviceLoader(images, targets, sampler, batch_size, CPU, MEAN, STD, **kw)


def _epoch(loader, epoch, skip=0):
    loader.sampler.set_epoch(epoch)
    loader.sampler.skip(skip)
    return list(loader)


def _torchvision_windows(image):
    """All 81 windows of torchvision's zero-padded, normalised S x S image, unflipped and flipped: 162 x 3 x S x S."""
    padded = transforms.Compose([transforms.Pad(4), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])(
        Image.fromarray(image))
    size = image.shape[0]
    windows = torch.stack([padded[:, i:i + size, j:j + size] for i in range(9) for j in range(9)])
    return torch.cat([windows, windows.flip(3)])


@pytest.mark.parametrize('size', [32, 24])  # 24: a --dataset folder --image_size 24
def test_every_output_is_a_window_of_the_zero_padded_image_with_its_label(size):
    images = _images(24, size=size)
    sampler = ShuffleSampler(24, seed=3)
    loader = _loader(images, np.arange(24) % 5, sampler, flip=True)
    order = list(sampler)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    out = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    assert out.shape == (24, 3, size, size) and out.dtype == torch.float32
    assert targets.tolist() == [i % 5 for i in order]
    for k, i in enumerate(order):
        # normalisation within 1e-6 of torchvision's, for the one window and flip that was drawn
        assert (_torchvision_windows(images[i]) - out[k]).abs().amax(dim=(1, 2, 3)).min() <= 1e-6, k


def test_fed_torchvision_draws_it_makes_torchvision_batches():
    """With the global generator in the state torchvision's transforms start from, augment() draws the
    same numbers in the same order (per image: row offset, column offset; digits have no flip), so
    the batch is build_transform's, value for value: the same computation, only the stream differs."""
    info = DATASETS['digits']
    images = _images(16)
    loader = DeviceLoader(images, np.zeros(16), range(16), 16, CPU, info.mean, info.std, train=True, flip=info.flip)
    transform = build_transform('digits', train=True)
    torch.manual_seed(3)
    expected = torch.stack([transform(Image.fromarray(image)) for image in images])
    torch.manual_seed(3)
    got = normalize(loader.augment(torch.arange(16), torch.default_generator), loader.mean, loader.std)
    assert torch.equal(got, expected)


def _decode(batch):
    """(row offset, column offset, flipped) of every window of the marker images below."""
    pixels = torch.round((batch * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255)
    row, col = pixels[:, 0, 16, 16] - 1, pixels[:, 1, 16, 16] - 1  # image row/col shown at window (16, 16)
    flipped = pixels[:, 1, 16, 17] < pixels[:, 1, 16, 16]
    # unflipped: window column x shows image column ox - 4 + x; flipped: ox - 4 + 31 - x
    return row - 12, torch.where(flipped, col - 11, col - 12), flipped


def _marker_images(n):
    """Channel 0 holds the row + 1, channel 1 the column + 1: a window reveals where it was cut."""
    grid = np.indices((32, 32)) + 1
    one = np.stack([grid[0], grid[1], np.full((32, 32), 255)], axis=-1).astype(np.uint8)
    return np.repeat(one[None], n, axis=0)


@pytest.mark.parametrize('dataset', ['cifar10', 'digits'])
def test_offsets_are_uniform_and_flips_happen_half_the_time_except_for_digits(dataset):
    n = 1800
    loader = _loader(_marker_images(n), np.zeros(n), ShuffleSampler(n, seed=1), batch_size=128,
                     flip=DATASETS[dataset].flip)
    rows, cols, flips = map(torch.cat, zip(*(_decode(images) for images, _ in loader)))
    for offsets in (rows, cols):
        counts = Counter(offsets.long().tolist())
        assert set(counts) == set(range(9))  # 0..8, as RandomCrop(32, padding=4)
        assert all(140 < c < 260 for c in counts.values()), counts  # n / 9 = 200 each
    if DATASETS[dataset].flip:
        assert 0.45 < flips.float().mean() < 0.55
    else:
        assert not flips.any()


@pytest.mark.parametrize('channels_last', [False, True])
def test_evaluation_batches_equal_torchvision_on_the_real_data_sets(cifar10_root, svhn_root, channels_last):
    for name, dataset in (('cifar10', ImbalanceCIFAR10(cifar10_root, train=False)),
                          ('svhn', ImbalanceSVHN(svhn_root, split='test'))):  # N x 32 x 32 x 3 and N x 3 x 32 x 32
        dataset.transform = build_transform(name, train=False)
        loader = DeviceLoader.from_dataset(dataset, range(len(dataset)), 1000, CPU, DATASETS[name], train=False,
                                           channels_last=channels_last)
        (images, targets), = list(loader)
        expected = torch.stack([dataset[i][0] for i in range(len(dataset))])
        assert torch.equal(targets, torch.tensor([dataset[i][1] for i in range(len(dataset))]))
        assert (images - expected).abs().max() <= 1e-6
        assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        # gen_pseudolabels.py's path: batches copied from host memory one at a time, the same values
        streamed = HostBatches(dataset.data, 7, CPU, DATASETS[name].mean, DATASETS[name].std, channels_last)
        assert len(streamed) == len(list(streamed)) == -(-len(dataset) // 7)
        assert torch.equal(torch.cat(list(streamed)), images)


def test_layouts():
    hwc = _images(3)
    assert np.array_equal(as_nhwc(hwc.transpose(0, 3, 1, 2)), hwc) and as_nhwc(hwc) is hwc
    for bad in (hwc.astype(np.float32), hwc[:, :16]):
        with pytest.raises(ValueError):
            as_nhwc(bad)


def test_a_batch_is_a_function_of_seed_epoch_and_step_also_after_a_mid_epoch_resume():
    images, targets = _images(40), np.arange(40)

    def make(seed=7, rank=0):
        return _loader(images, targets, ShuffleSampler(40, seed=seed), seed=seed, rank=rank, flip=True)

    full = _epoch(make(), 2)
    again = _epoch(make(), 2)
    resumed = _epoch(make(), 2, skip=2 * 8)  # the trainer skips the steps already done
    assert len(full) == 5 and len(resumed) == 3
    for a, b in zip(full + full[2:], again + resumed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # Another epoch, seed or rank gives other augmentations of the same images.
    same_order = [make(), make(rank=1)]
    for loader in same_order:
        loader.sampler.set_epoch(2)
    other_rank = list(same_order[1])
    assert not torch.equal(other_rank[0][0], full[0][0]) and torch.equal(other_rank[0][1], full[0][1])
    assert not torch.equal(_epoch(make(), 3)[0][0], full[0][0])
    assert not torch.equal(_epoch(make(seed=8), 2)[0][0], full[0][0])


class _LongTailed:
    def __init__(self, counts):
        self.targets = np.repeat(np.arange(len(counts)), counts)
        self.data = _images(len(self.targets))

    def __len__(self):
        return len(self.targets)


def test_resample_draws_tail_classes_at_the_expected_rate():
    counts = [200, 40, 8]
    data = _LongTailed(counts)
    sampler = ImbalancedDatasetSampler(data, num_samples=6000, seed=2)
    loader = DeviceLoader.from_dataset(data, sampler, 256, CPU, DATASETS['cifar10'], train=True, flip=True)
    drawn = torch.cat([t for _, t in _epoch(loader, 0)])
    w = effective_num_weights(counts, ImbalancedDatasetSampler.beta).double() * torch.tensor(counts)
    expected = (w / w.sum()).numpy()  # P(class c) = n_c w_c / sum_k n_k w_k
    observed = np.bincount(drawn.numpy(), minlength=3) / len(drawn)
    sd = np.sqrt(expected * (1 - expected) / len(drawn))
    assert len(drawn) == 6000 and np.all(np.abs(observed - expected) < 4 * sd), (observed, expected)
    assert observed[2] > 0.3  # 8 of 248 images, drawn about a third of the time


def test_distributed_shares_are_disjoint_and_cover_the_data():
    n, world = 36, 3
    images = _images(n)
    shares = []
    for rank in range(world):
        loader = _loader(images, np.arange(n), ShuffleSampler(n, seed=4, num_replicas=world, rank=rank),
                         seed=4, rank=rank)
        shares.append(torch.cat([t for _, t in _epoch(loader, 1)]).tolist())
    assert all(len(s) == n // world for s in shares)
    assert sorted(sum(shares, [])) == list(range(n))
    # evaluation shards, as the trainer takes them: every rank a disjoint slice
    evaluated = [torch.cat([t for _, t in _loader(images, np.arange(n), range(r, n, world), train=False)]).tolist()
                 for r in range(world)]
    assert sorted(sum(evaluated, [])) == list(range(n)) and evaluated[1][:2] == [1, 4]


# ---------------------------------------------------------------- through the scripts

def _train_args(root, tmp_path, *extra):
    return ['--dataset', 'cifar10', '--data_path', str(root), '--imb_factor', '0.1', '--epochs', '1', '-b', '16',
            '-j', '0', '--seed', '0', '-a', 'resnet20', '-p', '100', '--root_log', str(tmp_path / 'log'),
            '--root_model', str(tmp_path / 'ckpt'), *extra]


def test_flags_reach_the_loader_the_model_and_the_engine(cifar10_root, tmp_path, monkeypatch):
    seen, compiled = {}, []
    real = trainer.train_one_epoch

    def spy(model, criterion, loader, *args, **kwargs):
        conv = next(p for p in model.parameters() if p.dim() == 4)
        seen.update(loader=type(loader).__name__, amp=kwargs['amp'], channels_last=kwargs['channels_last'],
                    nhwc=conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous())
        return real(model, criterion, loader, *args, **kwargs)

    monkeypatch.setattr(trainer, 'train_one_epoch', spy)
    monkeypatch.setattr(torch.nn.Module, 'compile', lambda self, *a, **kw: compiled.append(self))
    assert train.main(_train_args(cifar10_root, tmp_path)) == 0
    assert seen == {'loader': 'DeviceLoader', 'amp': default_amp(CPU), 'channels_last': True, 'nhwc': True}
    assert not compiled
    # the other way round; bf16 autocast forced on runs the CPU autocast path on any machine
    assert train.main(_train_args(cifar10_root, tmp_path, '--loader', 'torchvision', '--no-channels-last',
                                  '--amp', '--compile', '--exp_str', 'other')) == 0
    assert seen == {'loader': 'DataLoader', 'amp': True, 'channels_last': False, 'nhwc': False}
    assert len(compiled) == 1


def test_both_loaders_evaluate_a_checkpoint_alike(cifar10_root, tmp_path, monkeypatch):
    assert train.main(_train_args(cifar10_root, tmp_path, '--no-amp')) == 0
    ckpt = tmp_path / 'ckpt' / 'cifar10_resnet20_CE_None_exp_0.1_ss_pretrained' / 'ckpt.pth.tar'
    results = []
    real = trainer.evaluate
    monkeypatch.setattr(trainer, 'evaluate', lambda *a, **kw: results.append(real(*a, **kw)) or results[-1])
    for loader in ('device', 'torchvision'):
        train.main(_train_args(cifar10_root, tmp_path, '--resume', str(ckpt), '-e', '--no-amp', '--loader', loader))
    device, classic = results
    assert device['count'] == classic['count'] == 100
    assert np.array_equal(device['confusion'], classic['confusion'])
    assert abs(device['loss'] - classic['loss']) < 1e-5  # batches of 1000 and 100: float rounding only


def test_gen_pseudolabels_labels_alike_through_both_loaders(cifar10_root, tmp_path):
    assert train.main(_train_args(cifar10_root, tmp_path, '--no-amp')) == 0
    ckpt = tmp_path / 'ckpt' / 'cifar10_resnet20_CE_None_exp_0.1_ss_pretrained' / 'ckpt.pth.tar'
    fixtures.write_tinyimages(os.path.join(cifar10_root, 'ti_80M_selected.pickle'), n_per_class=30)
    out = {}
    for loader in ('device', 'torchvision'):
        assert gen_pseudolabels.main(['--resume', str(ckpt), '--data_dir', cifar10_root, '-a', 'resnet20', '-j', '0',
                                      '--output_dir', str(tmp_path / loader), '--no-amp', '--loader', loader]) == 0
        with open(tmp_path / loader / 'pseudo_labeled_cifar.pickle', 'rb') as f:
            out[loader] = pickle.load(f)
    assert len(out['device']['extrapolated_targets']) == 300
    assert np.array_equal(out['device']['extrapolated_targets'], out['torchvision']['extrapolated_targets'])
    assert np.allclose(out['device']['confidence'], out['torchvision']['confidence'], atol=1e-5)
