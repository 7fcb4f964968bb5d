"""gen_pseudolabels.py and train_semi.py on tiny fixtures (in-process, CPU, resnet20, one epoch).

Pools and splits are kept to a few hundred images so that every forward pass is cheap; the
code paths are the real ones.
"""
import os
import pickle

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10

import cli
import fixtures
import gen_pseudolabels
import train
import train_semi
import trainer
from checkpoint import load_checkpoint
from dataset import digits
from dataset.imbalance_cifar import img_num_per_cls, img_num_per_cls_unlabeled
from errors import UserError
from models import build_model

ARCH = ['-a', 'resnet20']
POOL_PER_CLASS = 20  # TinyImages fixture images per class


def _train_args(root, tmp_path, *extra):
    return ['--data_path', str(root), '--epochs', '1', '-b', '256', '-j', '0', '--seed', '0',
            '--root_log', str(tmp_path / 'log'), '--root_model', str(tmp_path / 'ckpt'), *ARCH, *extra]


def _gen(resume, data_dir, out_dir, *extra):
    return gen_pseudolabels.main(['--resume', str(resume), '--data_dir', str(data_dir),
                                  '--output_dir', str(out_dir), '-j', '0', *ARCH, *extra])


def _load(path):
    with open(path, 'rb') as f:
        return pickle.load(f)


@pytest.fixture(scope='module')
def base_ckpt(tmp_path_factory):
    """A one-epoch train.py checkpoint on the CIFAR-10 fixture (10 classes, linear head)."""
    tmp = tmp_path_factory.mktemp('base')
    fixtures.write_cifar10(tmp, per_class=20, test_per_class=10)
    with pytest.MonkeyPatch.context() as mp:  # conftest's no_checksum is per test; this is per module
        mp.setattr(CIFAR10, '_check_integrity', lambda self: True)
        assert train.main(_train_args(tmp, tmp, '--dataset', 'cifar10', '--imb_factor', '0.1')) == 0
    return tmp / 'ckpt' / 'cifar10_resnet20_CE_None_exp_0.1_ss_pretrained' / 'ckpt.pth.tar'


@pytest.fixture
def semi_root(cifar10_root):
    """cifar10_root plus a small TinyImages selection; returns (root, its sourcing labels)."""
    sourcing = fixtures.write_tinyimages(os.path.join(cifar10_root, 'ti_80M_selected.pickle'),
                                         n_per_class=POOL_PER_CLASS)
    return cifar10_root, sourcing


@pytest.fixture
def small_svhn_root(svhn_root):
    """svhn_root with its train split cut to 8 and its extra split to 10 images per digit."""
    fixtures.write_svhn(svhn_root, 'train', per_class=8, seed=0)
    fixtures.write_svhn(svhn_root, 'extra', per_class=10, seed=2)
    return svhn_root


# ---------------------------------------------------------------- gen_pseudolabels.py

def test_gen_cifar10_writes_one_label_per_pool_image(semi_root, base_ckpt, tmp_path, capsys):
    root, sourcing = semi_root
    out = tmp_path / 'out'
    assert _gen(base_ckpt, root, out) == 0
    path = out / 'pseudo_labeled_cifar.pickle'
    entry = _load(path)
    assert {'extrapolated_targets', 'prediction_model', 'confidence'} <= set(entry)
    assert 'ground_truth' not in entry  # TinyImages has sourcing labels only
    labels, conf = entry['extrapolated_targets'], entry['confidence']
    assert labels.dtype == np.int64 and labels.shape == (len(sourcing),)
    assert conf.dtype == np.float32 and conf.shape == labels.shape
    assert labels.min() >= 0 and labels.max() < 10 and ((conf > 0) & (conf <= 1)).all()
    assert entry['prediction_model'] == str(base_ckpt)
    log = (out / 'prediction.log').read_text()
    assert 'Pseudo-labels per class' in log and 'Agreement with the sourcing labels' in log
    assert 'Pseudo-labels per class' in capsys.readouterr().out

    before = path.read_bytes()
    with pytest.raises(UserError, match='already exists.*--overwrite'):
        _gen(base_ckpt, root, out)
    assert path.read_bytes() == before
    with pytest.raises(SystemExit) as e:  # the shell sees one line and status 2
        cli.run_main(lambda argv: _gen(base_ckpt, root, out))
    assert e.value.code == 2 and capsys.readouterr().err.startswith('error: ')
    assert _gen(base_ckpt, root, out, '--overwrite') == 0
    np.testing.assert_array_equal(_load(path)['extrapolated_targets'], labels)


def test_gen_reads_original_format_checkpoint(semi_root, base_ckpt, tmp_path):
    """`module.` keys (DataParallel) and a `linear.` head (LDAM-DRW naming) give the same labels."""
    root, _ = semi_root
    sd = load_checkpoint(str(base_ckpt))['state_dict']
    original = {'module.' + ('linear.' + k[3:] if k.startswith('fc.') else k): v for k, v in sd.items()}
    orig_path = tmp_path / 'orig.pth.tar'
    torch.save({'epoch': 200, 'arch': 'resnet20', 'state_dict': original, 'best_acc1': torch.tensor(50.0)},
               orig_path)
    _gen(base_ckpt, root, tmp_path, '--output_filename', 'ours.pickle')
    _gen(orig_path, root, tmp_path, '--output_filename', 'orig.pickle')
    np.testing.assert_array_equal(_load(tmp_path / 'ours.pickle')['extrapolated_targets'],
                                  _load(tmp_path / 'orig.pickle')['extrapolated_targets'])


def test_gen_refuses_wrong_checkpoints_and_writes_nothing(semi_root, base_ckpt, tmp_path):
    root, _ = semi_root
    out = tmp_path / 'out'
    c100 = tmp_path / 'c100.pth.tar'
    torch.save({'epoch': 1, 'state_dict': build_model('resnet20', 100).state_dict()}, c100)
    with pytest.raises(UserError, match='another number of classes'):
        _gen(c100, root, out)
    with pytest.raises(UserError, match='does not fit the architecture'):
        gen_pseudolabels.main(['--resume', str(base_ckpt), '--data_dir', root, '--output_dir', str(out),
                               '-a', 'resnet32'])
    with pytest.raises(UserError, match='linear classifier head'):
        _gen(base_ckpt, root, out, '--loss_type', 'LDAM')
    ldam = tmp_path / 'ldam.pth.tar'
    torch.save({'state_dict': build_model('resnet20', 10, use_norm=True).state_dict()}, ldam)
    with pytest.raises(UserError, match=r'cosine \(LDAM\) classifier head \(pass --loss_type LDAM\)'):
        _gen(ldam, root, out)
    with pytest.raises(UserError, match='not found'):
        _gen(tmp_path / 'missing.pth.tar', root, out)
    with pytest.raises(UserError, match='ti_80M_selected.pickle'):
        _gen(base_ckpt, tmp_path / 'empty', out)
    with pytest.raises(UserError, match='would overwrite the input'):
        _gen(base_ckpt, root, root, '--output_filename', 'ti_80M_selected.pickle', '--overwrite')
    assert not out.exists()


def test_confidence_uses_the_scale_the_loss_trained_with():
    # LDAM trains softmax(30 * cosine); CE and Focal train softmax(logits).
    assert [gen_pseudolabels.logit_scale(t, 10) for t in ('CE', 'Focal', 'LDAM')] == [1.0, 1.0, 30.0]


def test_gen_svhn_extra_records_ground_truth(small_svhn_root, base_ckpt, tmp_path):
    # The CIFAR base model has the right head (10 classes); the labels' quality does not matter here.
    assert _gen(base_ckpt, small_svhn_root, tmp_path, '--dataset', 'svhn') == 0
    entry = _load(tmp_path / 'pseudo_labeled_svhn.pickle')
    truth = _load_svhn_labels(os.path.join(small_svhn_root, 'extra_32x32.mat'))
    assert entry['extrapolated_targets'].shape == (len(truth),) == (100,)
    np.testing.assert_array_equal(entry['ground_truth'], truth)
    assert 'Agreement with the ground truth' in (tmp_path / 'prediction.log').read_text()
    with pytest.raises(UserError, match='extra_32x32.mat'):
        _gen(base_ckpt, tmp_path / 'empty', tmp_path / 'o', '--dataset', 'svhn')


def _load_svhn_labels(path):
    import scipy.io
    y = scipy.io.loadmat(path)['y'].reshape(-1).astype(np.int64)
    return np.where(y == 10, 0, y)


# ---------------------------------------------------------------- train_semi.py

@pytest.fixture
def captured(monkeypatch):
    """The Experiment train_semi.py hands to trainer.run."""
    seen = {}
    real = trainer.run
    monkeypatch.setattr(trainer, 'run', lambda args, exp: seen.update(exp=exp, args=args) or real(args, exp))
    return seen


def _unlabeled_counts(labeled_requested, imb_u, size_factor, available):
    return np.minimum(img_num_per_cls_unlabeled(labeled_requested, imb_u, size_factor), available)


def test_train_semi_cifar10_one_epoch(semi_root, tmp_path, captured, capsys):
    root, sourcing = semi_root
    # Every pseudo-label says "class 9", so the class counts show exactly where they went.
    fixtures.write_pseudo_labels(os.path.join(root, 'pseudo_labeled_cifar.pickle'), np.full(len(sourcing), 9))
    assert train_semi.main(_train_args(root, tmp_path, '--dataset', 'cifar10', '--imb_factor', '0.1',
                                       '--imb_factor_unlabel', '0.1', '--unlabel_size_factor', '1')) == 0
    labeled = img_num_per_cls(20, 10, 'exp', 0.1)
    unlabeled = _unlabeled_counts(labeled, 0.1, 1, POOL_PER_CLASS)
    exp = captured['exp']
    assert len(exp.train_set) == sum(labeled) + unlabeled.sum()
    assert exp.cls_num_list == labeled[:9] + [labeled[9] + int(unlabeled.sum())]
    assert exp.script == 'train_semi'
    name = 'cifar10_resnet20_CE_None_exp_0.1_0.1_semi'
    assert 'Results: Prec@1' in (tmp_path / 'log' / name / 'log_test.csv').read_text()
    ckpt_path = tmp_path / 'ckpt' / name / 'ckpt.pth.tar'
    ckpt = load_checkpoint(str(ckpt_path))
    assert ckpt['epoch'] == 1 and ckpt['script'] == 'train_semi'
    capsys.readouterr()
    # -e with the run's flags: the shot groups come from the training set they describe
    assert train_semi.main(_train_args(root, tmp_path, '--imb_factor', '0.1', '--imb_factor_unlabel', '0.1',
                                       '--unlabel_size_factor', '1', '--resume', str(ckpt_path), '-e')) == 0
    assert 'Results: Prec@1' in capsys.readouterr().out
    with pytest.raises(UserError, match=r'was trained with --imb_factor_unlabel 0\.1, this command says 0\.01: pass '
                                        r'--imb_factor_unlabel 0\.1'):
        train_semi.main(_train_args(root, tmp_path, '--imb_factor', '0.1', '--resume', str(ckpt_path), '-e'))


def test_train_semi_svhn_one_epoch(small_svhn_root, tmp_path, captured):
    fixtures.write_pseudo_labels(os.path.join(small_svhn_root, 'pseudo_labeled_svhn.pickle'), np.zeros(100))
    assert train_semi.main(_train_args(small_svhn_root, tmp_path, '--dataset', 'svhn', '--imb_factor', '0.01')) == 0
    # SVHN asks for up to 1000 per class: the fixture's 8 labeled and 10 extra images per digit are all taken.
    exp = captured['exp']
    assert len(exp.train_set) == 80 + 100
    assert exp.cls_num_list == [8 + 100] + [8] * 9
    assert (tmp_path / 'ckpt' / 'svhn_resnet20_CE_None_exp_0.01_0.01_semi' / 'ckpt.pth.tar').is_file()


def test_pseudo_threshold_drops_unconfident_images(semi_root, tmp_path):
    root, sourcing = semi_root
    pseudo = os.path.join(root, 'pseudo_labeled_cifar.pickle')
    # Confident on even source classes only, so the kept count is known without replaying the draw.
    fixtures.write_pseudo_labels(pseudo, sourcing, confidence=np.where(sourcing % 2 == 0, 0.9, 0.2))

    def train_size(*extra):
        args = train_semi.build_parser().parse_args(_train_args(root, tmp_path, '--imb_factor', '0.1', *extra))
        return len(train_semi.load_data(args)[1])

    labeled = img_num_per_cls(20, 10, 'exp', 0.1)
    unlabeled = _unlabeled_counts(labeled, 0.01, 5, POOL_PER_CLASS)
    assert train_size() == train_size('--pseudo_threshold', '0') == sum(labeled) + unlabeled.sum()
    assert train_size('--pseudo_threshold', '0.5') == sum(labeled) + unlabeled[::2].sum()
    assert not (tmp_path / 'log').exists()


def test_train_semi_bad_inputs_name_the_file(semi_root, small_svhn_root, tmp_path):
    root, sourcing = semi_root
    args = _train_args(root, tmp_path, '--imb_factor', '0.1')
    with pytest.raises(UserError, match='pseudo_labeled_cifar.pickle.*gen_pseudolabels.py'):
        train_semi.main(args)
    fixtures.write_pseudo_labels(os.path.join(root, 'pseudo_labeled_cifar.pickle'), sourcing[:-1])
    with pytest.raises(UserError, match=f'pseudo_labeled_cifar.pickle has {len(sourcing) - 1} labels but the '
                                        f'unlabeled pool has {len(sourcing)}'):
        train_semi.main(args)
    os.remove(os.path.join(root, 'ti_80M_selected.pickle'))
    with pytest.raises(UserError, match='ti_80M_selected.pickle'):
        train_semi.main(args)
    with pytest.raises(UserError, match='extra_32x32.mat'):
        os.remove(os.path.join(small_svhn_root, 'extra_32x32.mat'))
        train_semi.main(_train_args(small_svhn_root, tmp_path, '--dataset', 'svhn'))
    with pytest.raises(UserError, match='--unlabeled_data does not apply to digits'):
        train_semi.main(_train_args(root, tmp_path, '--dataset', 'digits', '--unlabeled_data', 'x.pickle'))
    assert not (tmp_path / 'log').exists() and not (tmp_path / 'ckpt').exists()


@pytest.mark.parametrize('flag,value', [('--imb_factor_unlabel', '0'), ('--unlabel_size_factor', '0'),
                                        ('--pseudo_threshold', '1.5'), ('--dataset', 'cifar100')])
def test_train_semi_bad_flags(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        train_semi.main([flag, value])
    assert e.value.code == 2 and 'error' in capsys.readouterr().err


# ---------------------------------------------------------------- the offline digits pipeline

def test_digits_pipeline_end_to_end(tmp_path, monkeypatch, captured):
    """train.py -> gen_pseudolabels.py -> train_semi.py, on a 40-per-class subset of the digits."""
    fixtures.shrink_digits(monkeypatch.setattr)
    data = tmp_path / 'data'
    lt = ['--dataset', 'digits', '--imb_factor', '0.1']
    assert train.main(_train_args(data, tmp_path, *lt)) == 0
    base = tmp_path / 'ckpt' / 'digits_resnet20_CE_None_exp_0.1_ss_pretrained' / 'ckpt.pth.tar'
    assert _gen(base, data, data, *lt) == 0
    entry = _load(data / 'pseudo_labeled_digits.pickle')
    pool = digits.ImbalanceDigits(None, 'exp', 0.1, 0)
    assert len(entry['extrapolated_targets']) == len(pool.unused_targets) > 0
    np.testing.assert_array_equal(entry['ground_truth'], pool.unused_targets)
    assert train_semi.main(_train_args(data, tmp_path, *lt, '--imb_factor_unlabel', '0.1',
                                       '--unlabel_size_factor', '1')) == 0
    assert len(captured['exp'].train_set) > len(pool)
    assert (tmp_path / 'ckpt' / 'digits_resnet20_CE_None_exp_0.1_0.1_semi' / 'ckpt.pth.tar').is_file()
    # Labels made for another long-tailed draw would land on other images: refused.
    with pytest.raises(UserError, match='another unlabeled pool.*--rand_number 0'):
        train_semi.main(_train_args(data, tmp_path, *lt, '--rand_number', '1'))


# ------------------------------------------------------------------ D_U's per-class sizes (were in test_pinned.py)
# Expected values from the original's get_img_num_per_cls_unlabeled (total = 5 x the labeled total, class i
# first gets int(total // C * rho_U^(-i / (C - 1))), then all are rescaled by total / their sum and truncated);
# train_semi.py refuses a pseudo-label outside 0..C-1 and --pseudo_threshold T keeps confidence == T;
# gen_pseudolabels.py --data_filename (docs/semi.md).

def _fixture_semi_cifar(root, per_class, pool_per_class):
    fixtures.write_cifar10(root, per_class=per_class, test_per_class=1)
    sourcing = fixtures.write_tinyimages(os.path.join(root, 'ti_80M_selected.pickle'), n_per_class=pool_per_class)
    return sourcing


@pytest.mark.parametrize('n_max, rho_u, expected', [
    # the original's get_img_num_per_cls_unlabeled for the labeled CIFAR-10-LT, rho = 50 (13,996 images)
    (5000, 1, [6998] * 10),
    (5000, 25, [21651, 15138, 10587, 7403, 5176, 3619, 2530, 1769, 1237, 863]),
    (5000, 50, [24999, 16186, 10477, 6784, 4390, 2843, 1839, 1189, 771, 496]),
    (5000, 100, [28208, 16909, 10133, 6074, 3639, 2180, 1306, 781, 467, 278]),
    # SVHN-LT, rho = 50: at most 1000 per class, so 2,795 labeled images
    (1000, 25, [4327, 3023, 2115, 1477, 1034, 721, 504, 353, 244, 170]),
    (1000, 50, [4998, 3234, 2093, 1355, 876, 565, 364, 236, 153, 96]),
    (1000, 100, [5639, 3378, 2026, 1211, 726, 435, 258, 153, 92, 52]),
])
def test_unlabeled_sizes_decay_by_rho_u(n_max, rho_u, expected):
    from dataset.imbalance_cifar import img_num_per_cls, img_num_per_cls_unlabeled
    labeled = img_num_per_cls(n_max, 10, 'exp', 0.02)
    assert sum(labeled) == {5000: 13996, 1000: 2795}[n_max]
    assert img_num_per_cls_unlabeled(labeled, 1 / rho_u, 5) == expected


def test_train_semi_draws_those_sizes(tmp_path, no_checksum):
    """End to end, as train_semi.py builds it: CIFAR-10 fixture with 100 images per class (labeled,
    rho = 50: [100, 64, 41, 27, 17, 11, 7, 4, 3, 2], 276 images), a pool of 500 per class, rho_U = 50.
    Pseudo-labels = the pool's sourcing labels, so the appended labels count what was drawn per class."""
    root = str(tmp_path)
    sourcing = _fixture_semi_cifar(root, 100, 500)
    fixtures.write_pseudo_labels(os.path.join(root, 'pseudo_labeled_cifar.pickle'), sourcing)
    args = train_semi.build_parser().parse_args(['--data_path', root, '--imb_factor', '0.02',
                                                 '--imb_factor_unlabel', '0.02'])
    _, train_set, _ = train_semi.load_data(args)
    assert train_set.num_labeled == 276
    drawn = np.bincount(train_set.targets[train_set.num_labeled:], minlength=10).tolist()
    assert drawn == [498, 321, 205, 133, 86, 54, 36, 21, 14, 7]  # 5 x 276 = 1,380 asked, 1,375 after truncation


# ------------------------------------------------------------------ pseudo-labels: range and threshold

def _semi_cli(root, tmp_path, *extra):
    return ['--data_path', root, '--imb_factor', '0.1', '--root_log', str(tmp_path / 'log'),
            '--root_model', str(tmp_path / 'ckpt'), '--epochs', '1', '-a', 'resnet20', '-j', '0', *extra]


def test_pseudo_label_equal_to_the_class_count_is_refused(cifar10_semi_root, tmp_path, capsys):
    labels = np.zeros(1000, dtype=np.int64)  # the fixture's pool: 100 images per class
    labels[-1] = 10  # CIFAR-10 has classes 0..9
    path = os.path.join(cifar10_semi_root, 'pseudo_labeled_cifar.pickle')
    fixtures.write_pseudo_labels(path, labels)
    with pytest.raises(SystemExit) as e:
        cli.run_main(train_semi.main, _semi_cli(cifar10_semi_root, tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith('error: ') and path in err[0] and '0..9' in err[0]
    assert not (tmp_path / 'log').exists() and not (tmp_path / 'ckpt').exists()


def test_pseudo_threshold_keeps_confidence_equal_to_it(cifar10_root, tmp_path):
    root = cifar10_root
    sourcing = fixtures.write_tinyimages(os.path.join(root, 'ti_80M_selected.pickle'), n_per_class=100)
    # 0.75 and 0.5 are exact in float32: even source classes sit exactly on the threshold
    fixtures.write_pseudo_labels(os.path.join(root, 'pseudo_labeled_cifar.pickle'), sourcing,
                                 confidence=np.where(sourcing % 2 == 0, 0.75, 0.5))

    def unlabeled(*extra):
        args = train_semi.build_parser().parse_args(_semi_cli(root, tmp_path, *extra))
        train_set = train_semi.load_data(args)[1]
        return list(train_set.targets[train_set.num_labeled:])

    everything = unlabeled()
    kept = unlabeled('--pseudo_threshold', '0.75')
    assert kept == [c for c in everything if c % 2 == 0] and len(kept) > 0
    assert unlabeled('--pseudo_threshold', '0.7500001') == []


# ------------------------------------------------------------------ gen_pseudolabels.py --data_filename

def test_gen_pseudolabels_reads_the_pool_named_by_data_filename(tmp_path):
    """docs/semi.md: the TinyImages file may be passed to gen_pseudolabels.py by --data_filename (in
    --data_dir); no ti_80M_selected.pickle exists, and the labels are those of that file's images."""
    data = tmp_path / 'data'
    data.mkdir()
    fixtures.write_tinyimages(str(data / 'my_selection.pickle'), n_per_class=7)
    model = build_model('resnet20', 10)
    torch.save({'epoch': 1, 'arch': 'resnet20', 'state_dict': model.state_dict()}, tmp_path / 'base.pth.tar')
    common = ['--resume', str(tmp_path / 'base.pth.tar'), '-a', 'resnet20', '-j', '0', '--data_dir', str(data)]
    assert gen_pseudolabels.main([*common, '--data_filename', 'my_selection.pickle',
                                  '--output_dir', str(tmp_path / 'a')]) == 0
    got = _load(tmp_path / 'a' / 'pseudo_labeled_cifar.pickle')['extrapolated_targets']
    assert len(got) == 70
    # the same images under the default name give the same labels
    os.rename(data / 'my_selection.pickle', data / 'ti_80M_selected.pickle')
    assert gen_pseudolabels.main([*common, '--output_dir', str(tmp_path / 'b')]) == 0
    same = _load(tmp_path / 'b' / 'pseudo_labeled_cifar.pickle')['extrapolated_targets']
    np.testing.assert_array_equal(got, same)
