"""Behaviour that a planted one-character bug used to get past the whole suite (issue 17, item 4).

Every expected value here is written out from the paper, the original code
(YyzHarry/imbalanced-semi-self) or the README, never read from the code under test:

- the Resample sampler draws class c with probability n_c * w_c / sum_j n_j * w_j, where
  w_c = (1 - beta) / (1 - beta^n_c) and beta = 0.9999 (Cui et al. 2019; the original's utils.py);
- D_U's per-class sizes: the original's get_img_num_per_cls_unlabeled (total = 5 x the labeled
  total, class i first gets int(total // C * rho_U^(-i / (C - 1))), then all are rescaled by
  total / their sum and truncated);
- train_semi.py refuses a pseudo-label outside 0..C-1 and --pseudo_threshold T keeps confidence == T;
- reproduce.py's plans: CE (Balanced) = --train_rule Resample, cRT / tau-norm / LWS on the uniform
  stage 1, mean and sample std (ddof = 1) over seeds; and the documented flags
  gen_pseudolabels.py --data_filename, reproduce.py --rand_number and --stage-args "SCRIPT: FLAGS".
"""
import csv
import math
import os
import pickle
import shlex
import sys

import numpy as np
import pytest
import torch

import cli
import fixtures
import gen_pseudolabels
import reproduce
import train
import train_semi
import trainer
from dataset import DATASETS
from dataset.samplers import ImbalancedDatasetSampler
from models import build_model

# CIFAR-10-LT, rho = 100: int(5000 * 0.01^(i/9)) (README "Data preparation").
CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


class Labels:
    """A data set as the sampler sees it: a length and `.targets`."""

    def __init__(self, targets):
        self.targets = targets

    def __len__(self):
        return len(self.targets)


# ------------------------------------------------------------------ Resample: beta = 0.9999

def _class_probabilities(counts, beta):
    """Cui et al. 2019: per-sample weight (1 - beta) / (1 - beta^n_c), so class c is drawn with
    probability proportional to n_c times it."""
    mass = [n * (1 - beta) / (1 - beta ** n) for n in counts]
    return np.array(mass) / sum(mass)


def test_resample_draws_classes_by_inverse_effective_numbers():
    labels = np.repeat(np.arange(10), CIFAR10_LT_100)
    sampler = ImbalancedDatasetSampler(Labels(labels.tolist()), seed=0)
    expected = _class_probabilities(CIFAR10_LT_100, 0.9999)
    # the numbers: the head class about 12 % with beta = 0.9999, 27 % with 0.999
    assert expected[0] == pytest.approx(0.1193, abs=1e-4)
    assert _class_probabilities(CIFAR10_LT_100, 0.999)[0] == pytest.approx(0.2679, abs=1e-4)
    weights = sampler.weights.double()
    exact = np.array([weights[labels == c].sum().item() for c in range(10)]) / weights.sum().item()
    np.testing.assert_allclose(exact, expected, rtol=1e-6)  # the weights are float32 (losses.effective_num_weights)
    # and what it really draws: two epochs (24,812 draws); the binomial sd of the head share is 0.2 points
    drawn = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        drawn += list(sampler)
    share = np.bincount(labels[drawn], minlength=10) / len(drawn)
    np.testing.assert_allclose(share, expected, atol=0.01)
    assert len(drawn) == 2 * sum(CIFAR10_LT_100)


# ------------------------------------------------------------------ D_U's per-class sizes

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

def _load(path):
    with open(path, 'rb') as f:
        return pickle.load(f)


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


# ------------------------------------------------------------------ reproduce.py: plans

def _dry_run(capsys, *argv):
    """[(script, flags)] of the commands `reproduce.py ... --dry-run` prints, in order."""
    capsys.readouterr()
    assert reproduce.main([*argv, '--dry-run']) == 0
    commands = []
    for line in capsys.readouterr().out.splitlines():
        if not line or line.startswith('#'):
            continue
        cmd = shlex.split(line)
        assert cmd[0] == sys.executable
        if cmd[1:3] == ['-m', 'imagenet_inat.main']:
            commands.append(('imagenet_inat', cmd[3:]))
        else:
            commands.append((os.path.basename(cmd[1]), cmd[2:]))
    return commands


def _flag(argv, name):
    """The value of the last `name`, as argparse reads it."""
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]


@pytest.mark.parametrize('table', ['cifar10-ssp', 'cifar100-ssp'])
def test_ce_balanced_is_resample(table, tmp_path, capsys):
    """README: CE (Balanced) is class-balanced sampling (--train_rule Resample); Uniform is plain CE."""
    for rho in (10, 50, 100):
        for key, rule in (('Uniform', 'None'), ('Balanced', 'Resample')):
            (script, argv), = _dry_run(capsys, '--table', table, '--seeds', '0', '--out', str(tmp_path),
                                       '--cells', f'{key}_rho{rho}')
            args = train.build_parser().parse_args(argv)
            assert (script, args.train_rule, args.loss_type, args.imb_factor) == ('train.py', rule, 'CE', 1 / rho)
            assert not args.pretrained_model
            (rot, _), (script, argv) = _dry_run(capsys, '--table', table, '--seeds', '0', '--out', str(tmp_path),
                                                '--cells', f'{key}+SSP_rho{rho}')
            args = train.build_parser().parse_args(argv)
            assert (rot, script, args.train_rule) == ('pretrain_rot.py', 'train.py', rule) and args.pretrained_model


def test_digits_mini_balanced_is_resample(tmp_path, capsys):
    for key, rule in (('CE', 'None'), ('CE+SSP', 'None'), ('Balanced', 'Resample'), ('Balanced+SSP', 'Resample')):
        script, argv = _dry_run(capsys, '--table', 'digits-mini', '--seeds', '0', '--out', str(tmp_path),
                                '--cells', key)[-1]
        assert script == 'train.py' and train.build_parser().parse_args(argv).train_rule == rule


@pytest.mark.parametrize('table, config_dir', [('imagenet-lt', 'ImageNet_LT'), ('inat', 'iNaturalist18')])
def test_decoupled_stage_2_starts_from_the_uniform_stage_1(table, config_dir, tmp_path, capsys):
    """cRT, tau-norm and LWS re-balance the classifier of the instance-balanced (feat_uniform) stage 1,
    which runs once per seed for all three; CE (Balanced) is the feat_balance stage 1."""
    def cfg(argv):
        path = _flag(argv, '--cfg')
        assert os.path.dirname(os.path.abspath(path)) == os.path.join(fixtures.REPO, 'imagenet_inat', 'config',
                                                                       config_dir)
        return os.path.basename(path)

    moco, *stages = _dry_run(capsys, '--table', table, '--seeds', '0', '--out', str(tmp_path))
    assert moco[0] == 'pretrain_moco.py' and all(s == 'imagenet_inat' for s, _ in stages)
    by_cfg = {cfg(argv): argv for _, argv in stages}
    assert sorted(by_cfg) == sorted(['feat_uniform.yaml', 'feat_balance.yaml', 'cls_crt.yaml',
                                     'cls_tau_norm.yaml', 'cls_lws.yaml']) and len(stages) == 5
    uniform_dir = os.path.abspath(_flag(by_cfg['feat_uniform.yaml'], '--log_dir'))
    balance_dir = os.path.abspath(_flag(by_cfg['feat_balance.yaml'], '--log_dir'))
    assert uniform_dir != balance_dir
    for stage2 in ('cls_crt.yaml', 'cls_tau_norm.yaml', 'cls_lws.yaml'):
        source = os.path.abspath(_flag(by_cfg[stage2], '--model_dir'))
        assert source in (uniform_dir, os.path.join(uniform_dir, 'final_model_checkpoint.pth')), (stage2, source)
    # and the stage 1 of each cell, alone
    for key, first in (('cRT+SSP', 'feat_uniform.yaml'), ('tau-norm+SSP', 'feat_uniform.yaml'),
                       ('LWS+SSP', 'feat_uniform.yaml'), ('Uniform+SSP', 'feat_uniform.yaml'),
                       ('Balanced+SSP', 'feat_balance.yaml')):
        cell = _dry_run(capsys, '--table', table, '--seeds', '0', '--out', str(tmp_path), '--cells', key)
        assert cfg(cell[1][1]) == first


def _write_finished_run(stage_argv, best, top1, per_class):
    """A finished train.py run folder as the trainer writes it: ckpt.pth.tar with all its epochs and a
    log_test.csv of one evaluation (report_lines) plus its Best Prec@1."""
    args = train.build_parser().parse_args(stage_argv)
    name = train.supervised_store_name(args)
    os.makedirs(os.path.join(args.root_model, name))
    torch.save({'epoch': args.epochs, 'step': 0}, os.path.join(args.root_model, name, 'ckpt.pth.tar'))
    os.makedirs(os.path.join(args.root_log, name))
    counts = DATASETS[args.dataset].build_train(args.data_path, args.imb_type, args.imb_factor,
                                                args.rand_number, None).get_cls_num_list()
    metrics = {'top1': top1, 'top5': 100.0, 'loss': 1.0, 'per_class': np.asarray(per_class)}
    lines = trainer.report_lines(metrics, counts) + [f'Best Prec@1: {best:.3f}']
    with open(os.path.join(args.root_log, name, 'log_test.csv'), 'w') as f:
        f.write('\n'.join(lines) + '\n')


def test_std_over_seeds_is_the_sample_std(tmp_path, capsys):
    """Three seeds with best top-1 80, 82, 87 (errors 20, 18, 13): mean 17, sample std sqrt(13) = 3.606
    (the population std would be 2.944); last top-1 70, 75, 77 (errors 30, 25, 23): mean 26, std sqrt(13)."""
    out = str(tmp_path / 'out')
    argv = ['--table', 'digits-mini', '--seeds', '0', '1', '2', '--out', out, '--cells', 'CE']
    commands = _dry_run(capsys, *argv)
    assert [s for s, _ in commands] == ['train.py'] * 3
    # class 0 is digits-LT's only many-shot class (148 images): its accuracy is the many column
    for (_, stage_argv), best, top1, many in zip(commands, (80, 82, 87), (70, 75, 77), (0.9, 0.6, 0.3)):
        _write_finished_run(stage_argv, best, top1, [many] + [0.5] * 9)
    assert reproduce.main([*argv, '--collect']) == 0
    with open(os.path.join(out, 'digits-mini.csv')) as f:
        row, = csv.DictReader(f)
    assert (row['n'], row['status']) == ('3', 'done')
    assert float(row['best_err']) == pytest.approx(17, abs=1e-4)
    assert float(row['best_err_std']) == pytest.approx(math.sqrt(13), abs=1e-4)
    assert float(row['last_err']) == pytest.approx(26, abs=1e-4)
    assert float(row['last_err_std']) == pytest.approx(math.sqrt(13), abs=1e-4)
    assert float(row['many']) == pytest.approx(60, abs=1e-3) and float(row['many_std']) == pytest.approx(30, abs=1e-3)
    with open(os.path.join(out, 'digits-mini.md')) as f:
        assert '| CE (Uniform) | 3 | 17.00 ± 3.61 | 26.00 ± 3.61 |' in f.read()


# ------------------------------------------------------------------ reproduce.py: documented flags

def test_rand_number_fixes_the_subset_of_every_seed(tmp_path, capsys):
    """README: each seed draws its own subset (--rand_number = seed); --rand_number N fixes one for all,
    in every stage that draws one (train.py, gen_pseudolabels.py, train_semi.py)."""
    base = ['--table', 'cifar10-semi', '--seeds', '0', '1', '--out', str(tmp_path)]
    own = _dry_run(capsys, *base)
    fixed = _dry_run(capsys, *base, '--rand_number', '7')
    assert len(own) == len(fixed) == 12
    # seed 0's six stages, then seed 1's
    assert [_flag(a, '--rand_number') for _, a in own] == ['0'] * 6 + ['1'] * 6
    assert [_flag(b, '--rand_number') for _, b in fixed] == ['7'] * 12
    # the runs with the fixed subset go to other folders than seed 1's own-subset runs
    assert {_flag(a, '--exp_str') for s, a in fixed if '--exp_str' in a}.isdisjoint(
        {_flag(a, '--exp_str') for s, a in own if '--exp_str' in a and _flag(a, '--seed') == '1'})
    semi = [train_semi.build_parser().parse_args(a) for s, a in fixed if s == 'train_semi.py']
    assert {(x.seed, x.rand_number) for x in semi} == {(0, 7), (1, 7)}


@pytest.mark.parametrize('words', [
    ['--stage-args', 'gen_pseudolabels.py: -b 1000 --overwrite'],    # as reproduce.py --help writes it
    ['--stage-args=gen_pseudolabels.py: -b 1000 --overwrite'],
])
def test_stage_args_for_one_script(words, tmp_path, capsys):
    """README: --stage-args "FLAGS" goes to every stage, --stage-args "SCRIPT: FLAGS" to that script's."""
    commands = _dry_run(capsys, '--table', 'cifar10-semi', '--seeds', '0', '--out', str(tmp_path),
                        '--stage-args', '-j 0', *words)
    assert [s for s, _ in commands] == ['train.py', 'gen_pseudolabels.py'] + ['train_semi.py'] * 4
    for script, argv in commands:
        module = {'train.py': train, 'gen_pseudolabels.py': gen_pseudolabels, 'train_semi.py': train_semi}[script]
        args = module.build_parser().parse_args(argv)
        assert args.workers == 0
        if script == 'gen_pseudolabels.py':
            assert (args.batch_size, args.overwrite) == (1000, True) and argv[-3:] == ['-b', '1000', '--overwrite']
        else:
            assert '--overwrite' not in argv and args.batch_size == {'train.py': 128, 'train_semi.py': 256}[script]


# ------------------------------------------------------------------ files a run writes

def test_atomic_writes_get_the_mode_of_any_new_file(tmp_path):
    from fileio import atomic_write_bytes
    umask = os.umask(0)
    os.umask(umask)
    atomic_write_bytes(str(tmp_path / 'ckpt.pth.tar'), b'x')
    with open(tmp_path / 'plain', 'wb') as f:  # what the original's torch.save(state, filename) gets
        f.write(b'x')
    assert os.stat(tmp_path / 'ckpt.pth.tar').st_mode == os.stat(tmp_path / 'plain').st_mode
