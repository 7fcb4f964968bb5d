"""Recipe options (issue 20, item 4), all opt-in: --autoaugment, --cutout N, --mixup ALPHA,
--lr_schedule step|cosine. With none of them every transform, learning rate and run folder name is
what it was; each one computes what its authors' code does."""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import fixtures
import pretrain_rot
import train
import train_semi
import trainer
from checkpoint import load_checkpoint
from dataset import build_transform
from dataset.augment import Cutout
from dataset.digits import ImbalanceDigits
from dataset.device_loader import DeviceLoader
from engine import Mixup, train_one_epoch
from errors import UserError
from losses import LOSSES, build_criterion
from test_docs_commands import script_commands
from test_reliability import NAME, STEPS, TRAIN_ARGV, _exact_resume_in_process
from torchvision import transforms

CIFAR_TRAIN = ("Compose(\n    RandomCrop(size=(32, 32), padding=4)\n    RandomHorizontalFlip(p=0.5)\n    ToTensor()\n"
               "    Normalize(mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.201))\n)")
DIGITS_TRAIN = ("Compose(\n    RandomCrop(size=(32, 32), padding=4)\n    ToTensor()\n"
                "    Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))\n)")


def _args(*argv):
    return train.build_parser().parse_args(list(argv))


# ------------------------------------------------------------------------------------ defaults

def test_default_flags_keep_the_pipeline_the_schedule_and_the_run_name():
    for dataset, expected in (('cifar10', CIFAR_TRAIN), ('digits', DIGITS_TRAIN)):
        args = _args('--dataset', dataset)
        assert (args.autoaugment, args.cutout, args.mixup, args.lr_schedule) == (False, None, None, 'step')
        assert repr(train.train_transform(args)) == expected == repr(build_transform(dataset, train=True))
        assert train.supervised_store_name(args) == f'{dataset}_resnet32_CE_None_exp_0.01_ss_pretrained'
        assert trainer.uses_device_loader(args)
    # LDAM-DRW's schedule at the paper's defaults (--lr 0.1, 200 epochs, steps after 160 and 180).
    args = _args()
    expected = [0.02, 0.04, 0.06, 0.08, 0.1] + [0.1] * 155 + [0.001] * 20 + [0.00001] * 20
    assert [trainer.LR_SCHEDULES[args.lr_schedule](e, args) for e in range(200)] == pytest.approx(expected, rel=1e-12)


def test_each_option_adds_its_suffix_to_the_run_name():
    base = 'digits_resnet32_CE_None_exp_0.01_ss_pretrained'
    for flags, suffix in ((['--autoaugment'], '_aa'), (['--cutout', '16'], '_cutout16'),
                          (['--mixup', '0.2'], '_mixup0.2'), (['--lr_schedule', 'cosine'], '_cosine'),
                          (['--lr_schedule', 'cosine', '--mixup', '1', '--autoaugment'], '_aa_mixup1_cosine')):
        assert train.supervised_store_name(_args('--dataset', 'digits', *flags)) == base + suffix


def test_train_semi_takes_the_options(tmp_path, monkeypatch):
    fixtures.shrink_digits(monkeypatch.setattr)
    pool = ImbalanceDigits(None, 'exp', 0.1, 0).unused_targets
    fixtures.write_pseudo_labels(str(tmp_path / 'pseudo_labeled_digits.pickle'), pool)
    argv = ['--dataset', 'digits', '--data_path', str(tmp_path), '--imb_factor', '0.1', '--imb_factor_unlabel', '0.1']
    parse = train_semi.build_parser().parse_args
    plain, recipe = parse(argv), parse(argv + ['--autoaugment', '--cutout', '4'])
    assert train_semi.semi_store_name(plain) == 'digits_resnet32_CE_None_exp_0.1_0.1_semi'
    assert train_semi.semi_store_name(recipe) == 'digits_resnet32_CE_None_exp_0.1_0.1_semi_aa_cutout4'
    assert repr(train_semi.load_data(plain)[1].transform) == DIGITS_TRAIN
    assert [type(t) for t in train_semi.load_data(recipe)[1].transform.transforms] == [
        transforms.RandomCrop, transforms.AutoAugment, transforms.ToTensor, transforms.Normalize, Cutout]


# ------------------------------------------------------------------------------------ schedule

def test_cosine_schedule_values():
    """5 warm-up epochs (lr * e / 5), then lr * (1 + cos(pi * (e - 5) / (epochs - 5))) / 2 for 1-based
    epoch e, as BALMS's CosineAnnealingLRWarmup stepped at the start of each epoch: 0 in the last one."""
    args = _args('--lr_schedule', 'cosine', '--epochs', '10', '--lr', '0.1')
    expected = [0.02, 0.04, 0.06, 0.08, 0.1, 0.0904508497187, 0.0654508497187, 0.0345491502813,
                0.0095491502813, 0.0]
    got = [trainer.LR_SCHEDULES['cosine'](e, args) for e in range(10)]
    assert got == pytest.approx(expected, abs=1e-12)
    # --lr_steps leaves the cosine alone
    with_steps = _args('--lr_schedule', 'cosine', '--epochs', '10', '--lr_steps', '6', '7')
    assert [trainer.LR_SCHEDULES['cosine'](e, with_steps) for e in range(10)] == got


# ------------------------------------------------------------------------------------ Cutout

def _square(y, x, top, bottom, left, right):
    """The authors' mask: ones, 0 on rows y-top .. y+bottom (exclusive), columns likewise, clipped."""
    mask = np.ones((32, 32), np.float32)
    mask[np.clip(y - top, 0, 32):np.clip(y + bottom, 0, 32), np.clip(x - left, 0, 32):np.clip(x + right, 0, 32)] = 0
    return mask


@pytest.mark.parametrize('length, before, after', [(16, 8, 8), (5, 2, 3)])
def test_cutout_zeroes_one_square_per_image_and_nothing_else(length, before, after):
    """The classic transform: rows/columns y - N//2 .. y - N//2 + N - 1 around a centre drawn uniformly
    (row first): for N = 16 exactly DeVries & Taylor's y - 8 .. y + 8 (exclusive)."""
    image = torch.rand(3, 32, 32) + 0.5  # no pixel is 0 already
    clipped = set()
    for seed in range(200):
        torch.manual_seed(seed)
        out = Cutout(length)(image)
        torch.manual_seed(seed)
        y, x = torch.randint(32, (1,)).item(), torch.randint(32, (1,)).item()
        mask = torch.from_numpy(_square(y, x, before, after, before, after))
        assert torch.equal(out, image * mask)
        rows = int((mask == 0).any(1).sum())
        assert rows == length or y - before < 0 or y + after > 32
        clipped.add((y - before < 0, y + after > 32))
    assert clipped == {(False, False), (True, False), (False, True)}  # both borders clip somewhere


def _device_batches(cutout, seed=3):
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    loader = DeviceLoader(images, np.arange(64) % 10, range(64), 64, 'cpu', (0.4914, 0.4822, 0.4465),
                          (0.2023, 0.1994, 0.2010), train=True, flip=True, cutout=cutout, seed=seed)
    return [b for b, _ in loader]


@pytest.mark.parametrize('length', [16, 5])
def test_device_loader_cutout_zeroes_one_clipped_square_after_the_same_crops(length):
    (plain,), (cut,) = _device_batches(None), _device_batches(length)
    zero = cut == 0
    assert torch.equal(zero[:, 0], zero[:, 1]) and torch.equal(zero[:, 0], zero[:, 2])  # every channel
    assert not (plain == 0).any()
    assert torch.equal(cut, plain.masked_fill(zero, 0))  # elsewhere the crops and flips of the plain run
    sides = set()
    for square in zero[:, 0]:
        rows, cols = square.any(1).nonzero()[:, 0], square.any(0).nonzero()[:, 0]
        top, bottom, left, right = rows[0].item(), rows[-1].item() + 1, cols[0].item(), cols[-1].item() + 1
        assert square.sum() == (bottom - top) * (right - left)  # one filled rectangle
        for lo, hi in ((top, bottom), (left, right)):
            # N wide, or cut off by the border: a centre c in 0..31 spans c - N//2 .. c - N//2 + N - 1
            assert hi - lo == length or (lo == 0 and length - length // 2 <= hi < length) or \
                (hi == 32 and 32 - length < lo <= 31 - length // 2)
            sides.add(hi - lo)
    assert length in sides and len(sides) > 1


def test_autoaugment_uses_the_cifar10_policy_between_flip_and_totensor(capsys):
    pipeline = train.train_transform(_args('--dataset', 'cifar10', '--autoaugment', '--cutout', '16')).transforms
    assert [type(t) for t in pipeline] == [transforms.RandomCrop, transforms.RandomHorizontalFlip,
                                           transforms.AutoAugment, transforms.ToTensor, transforms.Normalize, Cutout]
    assert pipeline[2].policy == transforms.AutoAugmentPolicy.CIFAR10 and pipeline[-1].length == 16
    # --autoaugment needs per-image host work: the classic loader, with a notice; Cutout alone stays on the device
    assert not trainer.uses_device_loader(_args('--autoaugment'))
    assert '--autoaugment transforms each image on the host: using --loader torchvision (-j 4 workers)' \
        in capsys.readouterr().out
    assert trainer.uses_device_loader(_args('--cutout', '16'))


# ------------------------------------------------------------------------------------ mixup

@pytest.mark.parametrize('loss_type', list(LOSSES))
def test_mixup_loss_is_the_lam_weighted_loss_of_both_targets(loss_type):
    torch.manual_seed(0)
    n, classes = 16, 4
    images, targets = torch.randn(n, 6), torch.arange(n) % classes
    model = nn.Linear(6, classes)
    criterion = build_criterion(loss_type, [8, 4, 3, 1], torch.tensor([0.5, 1.0, 1.5, 2.0]), 1.5)
    mixup = Mixup(0.4, seed=7, rank=0, device=torch.device('cpu'))

    # the draws of epoch 3, step 0 (the first step); unique targets show the permutation
    mixed, targets_b, lam = mixup(images, targets, 3, 0)
    _, index, lam_again = mixup(images, torch.arange(n), 3, 0)
    assert lam_again == lam and 0 < lam < 1
    assert sorted(index.tolist()) == list(range(n)) and not torch.equal(index, torch.arange(n))
    assert torch.equal(mixed, lam * images + (1 - lam) * images[index])
    assert torch.equal(targets_b, targets[index])

    with torch.no_grad():
        out = model(mixed)
        expected = lam * criterion(out, targets) + (1 - lam) * criterion(out, targets_b)
        hits = lam * (out.argmax(1) == targets).float().mean() + (1 - lam) * (out.argmax(1) == targets_b).float().mean()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_one_epoch(model, criterion, [(images, targets)], optimizer, torch.device('cpu'), 3,
                            log=lambda *a, **k: None, mixup=mixup)
    assert stats['loss'] == pytest.approx(expected.item(), rel=1e-6)
    assert stats['top1'] == pytest.approx(100 * hits.item(), rel=1e-6)
    plain = F.cross_entropy(out, targets).item()
    assert loss_type != 'CE' or abs(stats['loss'] - plain) > 1e-3  # it is not the unmixed loss


def test_mixup_draws_depend_on_seed_epoch_and_step_only():
    images, targets = torch.randn(32, 5), torch.arange(32)
    a, b = Mixup(0.2, 1, 0, torch.device('cpu')), Mixup(0.2, 1, 0, torch.device('cpu'))
    b(images, targets, 0, 0)  # another step drawn first changes nothing
    for x, y in zip(a(images, targets, 2, 5), b(images, targets, 2, 5)):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert a(images, targets, 2, 5)[2] != a(images, targets, 2, 6)[2]
    assert a(images, targets, 2, 5)[2] != Mixup(0.2, 2, 0, torch.device('cpu'))(images, targets, 2, 5)[2]


@pytest.mark.parametrize('flags', [['--mixup', '0.2', '--cutout', '8', '--lr_schedule', 'cosine'],
                                   ['--autoaugment', '--cutout', '8', '--mixup', '1']],
                         ids=['device-loader', 'classic-loader'])
def test_a_run_with_the_options_resumed_mid_epoch_matches_an_uninterrupted_one(tmp_path, monkeypatch, one_thread,
                                                                               flags):
    fixtures.shrink_digits(monkeypatch.setattr)
    name = NAME + cli.recipe_suffix(_args(*flags))
    _exact_resume_in_process(tmp_path, monkeypatch, train.main, TRAIN_ARGV + flags, name, STEPS + 2,
                             stopped_at=(1, 2))


# ------------------------------------------------------------------------------------ real runs, bad input

def test_readme_recipe_command_runs(tmp_path, monkeypatch, one_thread, capsys):
    """docs/train.md's digits command with every recipe option, for 2 epochs."""
    fixtures.shrink_digits(monkeypatch.setattr)
    monkeypatch.chdir(tmp_path)
    (argv,) = script_commands('docs/train.md', 'train.py', ['digits', '--autoaugment'])
    assert {'--cutout', '--mixup', '--lr_schedule'} <= set(argv)
    assert train.main([*argv, '--epochs', '2']) == 0
    out = capsys.readouterr().out
    assert 'using --loader torchvision' in out
    name = 'digits_resnet32_CE_None_exp_0.01_ss_pretrained_aa_cutout16_mixup0.2_cosine'
    ckpt = load_checkpoint(str(tmp_path / 'checkpoint' / name / 'ckpt.pth.tar'))
    assert ckpt['epoch'] == 2 and ckpt['store_name'] == name
    log = (tmp_path / 'log' / name / 'log_train.csv').read_text()
    assert 'Epoch: [0][' in log and 'lr: 0.02000' in log and 'lr: 0.04000' in log
    assert math.isfinite(trainer.read_test_log(str(tmp_path / 'log' / name / 'log_test.csv'))[-1]['loss'])


def test_bad_recipe_input_is_one_line():
    for argv in (['--cutout', '0'], ['--mixup', '0'], ['--mixup', '-1'], ['--lr_schedule', 'linear']):
        with pytest.raises(SystemExit) as e:
            _args(*argv)
        assert e.value.code == 2
    with pytest.raises(UserError, match='rotation pre-training keeps the paper'):
        pretrain_rot.main(['--dataset', 'digits', '--mixup', '0.2'])


# ------------------------------------------------------------------------------------ the flags where they take effect

def _record_training_batches(monkeypatch):
    """What trainer.run hands the engine, step by step: the loader's batches (before mixup) and, with
    --mixup, each step's (lam, permutation) as the engine drew them; and the Mixup objects passed."""
    seen = {'batches': [], 'draws': [], 'mixup': []}
    real = trainer.train_one_epoch

    class Recorded:
        def __init__(self, loader):
            self.loader = loader

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for images, targets in self.loader:
                seen['batches'].append((images.clone(), targets.clone()))
                yield images, targets

    class RecordedMixup:
        def __init__(self, mixup):
            self.mixup = mixup

        def __call__(self, images, targets, epoch, step):
            mixed, targets_b, lam = self.mixup(images, targets, epoch, step)
            seen['draws'].append((epoch, step, lam))
            return mixed, targets_b, lam

    def spy(model, criterion, loader, *args, mixup=None, **kwargs):
        seen['mixup'].append(mixup)
        return real(model, criterion, Recorded(loader), *args, mixup=mixup and RecordedMixup(mixup), **kwargs)

    monkeypatch.setattr(trainer, 'train_one_epoch', spy)
    return seen


def _authors_square(centre, length, size):
    """DeVries & Taylor's util/cutout.py mask for even `length`: 0 on rows y - length/2 .. y + length/2
    (exclusive), columns likewise, each clipped to the image; True where zeroed."""
    y, x = centre
    mask = np.zeros((size, size), bool)
    mask[np.clip(y - length // 2, 0, size):np.clip(y + length // 2, 0, size),
         np.clip(x - length // 2, 0, size):np.clip(x + length // 2, 0, size)] = True
    return mask


def test_cutout_and_mixup_flags_reach_the_default_loader_s_batches(cifar10_root, tmp_path, monkeypatch, one_thread):
    """`train.py --cutout 16 --mixup 0.4` on the default (device) loader: the run folder is named
    `_cutout16_mixup0.4`, and every training image the model got is zero exactly on a 16 x 16 square
    (clipped) around the centre drawn for it: row and column uniform over the 32 x 32 pixels, drawn
    after the step's crop offsets (0..8) and flips in the step's stream (seed, epoch, step, rank), as
    DeviceLoader documents; each step's mixup lam is drawn from Beta(0.4, 0.4), the flag's alpha."""
    from utils import derive_seed
    seen = _record_training_batches(monkeypatch)
    argv = ['--dataset', 'cifar10', '--data_path', cifar10_root, '--imb_factor', '0.1', '-a', 'resnet20', '-b', '32',
            '--epochs', '1', '-j', '0', '--seed', '0', '--root_log', str(tmp_path / 'log'),
            '--root_model', str(tmp_path / 'ckpt'), '--cutout', '16', '--mixup', '0.4']
    assert train.main(argv) == 0
    name = 'cifar10_resnet20_CE_None_exp_0.1_ss_pretrained_cutout16_mixup0.4'
    assert load_checkpoint(str(tmp_path / 'ckpt' / name / 'ckpt.pth.tar'))['epoch'] == 1
    # int(20 * 0.1 ** (i / 9)) = 20, 15, 11, 9, 7, 5, 4, 3, 2, 2 images: 78, three steps of 32, 32, 14
    assert [len(t) for _, t in seen['batches']] == [32, 32, 14]
    squares = 0
    for step, (images, _) in enumerate(seen['batches']):
        n = len(images)
        generator = torch.Generator().manual_seed(derive_seed(0, 0, step, 0))
        torch.randint(0, 9, (n, 2), generator=generator)  # crop offsets
        torch.rand(n, generator=generator)                # flips (CIFAR flips)
        centres = torch.randint(0, 32, (n, 2), generator=generator).tolist()
        for image, centre in zip(images, centres):
            expected = _authors_square(centre, 16, 32)
            assert np.array_equal((image == 0).numpy(), np.broadcast_to(expected, (3, 32, 32))), (step, centre)
            squares += expected.sum() == 256
    assert squares > 10  # many squares lie wholly inside the image
    # mixup: one Mixup with the flag's alpha; its lam at each step is the Beta(0.4, 0.4) draw of that step
    (mixup,) = seen['mixup']
    assert mixup.alpha == 0.4
    reference = Mixup(0.4, 0, 0, torch.device('cpu'))
    assert [(e, s) for e, s, _ in seen['draws']] == [(0, 0), (0, 1), (0, 2)]
    images, targets = seen['batches'][0]
    assert [lam for _, _, lam in seen['draws']] == [reference(images, targets, 0, s)[2] for s in range(3)]


@pytest.mark.parametrize('alpha', [0.2, 1.0])
def test_mixup_lam_follows_beta_alpha_alpha(alpha):
    """Zhang et al.: lam ~ Beta(alpha, alpha), one draw per batch. 3,000 steps' draws against scipy's
    Beta(alpha, alpha) (Kolmogorov-Smirnov) and the Beta's variance 1 / (4 (2 alpha + 1)): 0.1786 for
    alpha 0.2, 0.0833 (the uniform's) for alpha 1."""
    from scipy import stats
    mixup = Mixup(alpha, seed=5, rank=0, device=torch.device('cpu'))
    images, targets = torch.zeros(2, 1), torch.arange(2)
    lams = np.array([mixup(images, targets, step // 100, step % 100)[2] for step in range(3000)])
    assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    other = 1.0 if alpha != 1.0 else 0.2
    assert stats.kstest(lams, stats.beta(other, other).cdf).pvalue < 1e-6
    assert lams.var() == pytest.approx({0.2: 0.1786, 1.0: 0.0833}[alpha], abs=0.012)


def test_lr_schedule_cosine_sets_the_lr_each_epoch_trains_at(cifar10_root, tmp_path, one_thread):
    """`--lr_schedule cosine --lr 0.1 --epochs 7`, epochs 6 and 7 run (--start-epoch 5): after the 5 warm-up
    epochs BALMS's cosine, 0.1 * (1 + cos(pi * (e - 5) / 2)) / 2 for 1-based e: 0.05, then 0 in the last epoch
    (the step schedule would train both at 0.1); every logged step of an epoch shows its lr."""
    argv = ['--dataset', 'cifar10', '--data_path', cifar10_root, '--imb_factor', '0.1', '-a', 'resnet20', '-b', '32',
            '-j', '0', '--seed', '0', '-p', '1', '--root_log', str(tmp_path / 'log'),
            '--root_model', str(tmp_path / 'ckpt'), '--lr_schedule', 'cosine', '--lr', '0.1', '--epochs', '7',
            '--start-epoch', '5']
    assert train.main(argv) == 0
    log = (tmp_path / 'log' / 'cifar10_resnet20_CE_None_exp_0.1_ss_pretrained_cosine' / 'log_train.csv').read_text()
    lrs = re.findall(r'^Epoch: \[(\d+)\]\[\d+/3\], lr: (\S+)\t', log, re.M)
    assert lrs == [('5', '0.05000')] * 3 + [('6', '0.00000')] * 3
