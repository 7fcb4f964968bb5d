"""imagenet_inat/: configs, stage 1 from MoCo weights, cRT / tau-norm / LWS, --test, the LR
schedule and epoch length, torchrun (gloo), kill-and-resume, and one-sentence bad input.

All runs use a tiny long-tailed JPEG data set (tests/fixtures_jpeg.py: 110 / 30 / 5 training
images, 48-64 px) with ResNet-10 features at 32 px crops, batch 16: 9 steps per epoch.
"""
import contextlib
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import cli
import fixtures
import fixtures_jpeg as fx
from errors import UserError
from fixtures import REPO
from imagenet_inat import main as ii_main
from imagenet_inat.config import load_config
from imagenet_inat.networks import NETWORKS, ResNetFeature, tau_normalized
from models import build_model

CONFIGS = os.path.join(REPO, 'imagenet_inat', 'config')
BATCH = 16
STEPS = sum(fx.TRAIN_COUNTS) // BATCH  # 145 // 16 = 9


pytestmark = pytest.mark.usefixtures('one_thread')  # see conftest.py


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """The data set, a MoCo checkpoint and a finished stage-1 run from it (2 epochs, uniform sampling)."""
    root = tmp_path_factory.mktemp('imagenet_inat')
    images, splits = fx.write_jpeg_dataset(str(root))
    moco_feats = fx.write_moco_checkpoint(str(root / 'moco_ckpt_0200.pth.tar'))
    w = {'root': root, 'images': images, 'splits': splits, 'moco': str(root / 'moco_ckpt_0200.pth.tar'),
         'moco_feats': moco_feats, 'stage1': root / 'stage1'}
    cfg = fx.write_config(root / 'stage1.yaml', fx.stage_config(w['stage1'], sampler=False, epochs=2, batch=BATCH))
    w['stage1_cfg'] = cfg
    with fixtures.one_thread():
        assert ii_main.main(argv(w, cfg, '--model_dir', w['moco'])) == 0
    return w


def argv(w, cfg, *extra):
    return ['--cfg', str(cfg), '--data_root', w['images'], '--split_dir', w['splits'], '--seed', '0', *extra]


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def strip(sd):
    return {k[len('module.'):]: v for k, v in sd.items()}


def log_text(folder):
    return (folder / 'log.txt').read_text()


# ---------------------------------------------------------------- configs

TABLE = {  # file: (batch, epochs, lr, weight decay, sampler, feature model fixed, classifier)
    'ImageNet_LT/feat_uniform.yaml': (128, 90, 0.2, 5e-4, None, False, 'DotProductClassifier'),
    'ImageNet_LT/feat_balance.yaml': (128, 90, 0.2, 5e-4, 'ClassAwareSampler', False, 'DotProductClassifier'),
    'ImageNet_LT/cls_crt.yaml': (512, 10, 0.2, 5e-4, 'ClassAwareSampler', True, 'DotProductClassifier'),
    'iNaturalist18/feat_uniform.yaml': (100, 90, 0.2, 1e-4, None, False, 'DotProductClassifier'),
    'iNaturalist18/feat_unifrom.yaml': (100, 90, 0.2, 1e-4, None, False, 'DotProductClassifier'),  # alias
    'iNaturalist18/feat_balance.yaml': (100, 90, 0.2, 1e-4, 'ClassAwareSampler', False, 'DotProductClassifier'),
    'iNaturalist18/cls_crt.yaml': (512, 30, 0.2, 1e-4, 'ClassAwareSampler', True, 'DotProductClassifier'),
    'ImageNet_LT/cls_lws.yaml': (512, 5, 0.2, 5e-4, 'ClassAwareSampler', True, 'LWSClassifier'),
    'iNaturalist18/cls_lws.yaml': (512, 5, 0.2, 1e-4, 'ClassAwareSampler', True, 'LWSClassifier'),
}


@pytest.mark.parametrize('name', sorted(TABLE))
def test_shipped_configs_carry_the_papers_values(name):
    batch, epochs, lr, wd, sampler, fixed, classifier = TABLE[name]
    cfg = load_config(os.path.join(CONFIGS, name))
    feat, clf = cfg.networks['feat_model'], cfg.networks['classifier']
    assert (cfg.batch_size, cfg.num_epochs, cfg.sampler) == (batch, epochs, sampler)
    assert cfg.num_samples_cls == (4 if sampler else 0)
    assert (feat.name, feat.fix, clf.name, clf.fix) == ('ResNet50Feature', fixed, classifier, False)
    for net in (feat, clf):
        assert (net.lr, net.momentum, net.weight_decay) == (lr, 0.9, wd)
    assert cfg.coslr and cfg.endlr == 0.0 and cfg.loss == 'SoftmaxLoss' and cfg.taus is None
    assert cfg.num_classes == {'ImageNet_LT': 1000, 'iNaturalist18': 8142}[cfg.dataset]
    assert clf.params['feat_dim'] == 2048 and cfg.crop_size == 224 and cfg.model_dir is None
    assert cfg.log_dir == f'./logs/{cfg.dataset}/' + cfg.raw['training_opt']['stage']


# Kang et al.'s classifier-balancing tau_norm.py: `for p in np.linspace(0, 2, 21)`
KANG_TAUS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
             1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0]


def test_tau_norm_configs_search_zero_to_two_as_kang(tmp_path):
    for ds in ('ImageNet_LT', 'iNaturalist18'):
        cfg = load_config(os.path.join(CONFIGS, ds, 'cls_tau_norm.yaml'))
        assert cfg.taus == KANG_TAUS
        assert cfg.networks['classifier'].name == 'DotProductClassifier'
    raw = fx.stage_config(tmp_path / 'logs', tau=True, epochs=0)
    raw['tau_norm'] = {}  # every key left to its default
    assert load_config(fx.write_config(tmp_path / 'c.yaml', raw)).taus == KANG_TAUS


ORIGINAL_CLS_CRT = """coslr: true
criterions:
  PerformanceLoss:
    def_file: ./imagenet_inat/loss/SoftmaxLoss.py
    loss_params: {}
    optim_params: null
    weight: 1.0
endlr: 0.0
last: false
memory: {centroids: false, init_centroids: false}
model_dir: ./data
networks:
  classifier:
    def_file: ./imagenet_inat/models/DotProductClassifier.py
    optim_params: {lr: 0.2, momentum: 0.9, weight_decay: 0.0005}
    params: {dataset: ImageNet_LT, feat_dim: 2048, log_dir: ./data,
      num_classes: 1000, stage1_weights: false}
  feat_model:
    def_file: ./imagenet_inat/models/ResNet50Feature.py
    fix: true
    optim_params: {lr: 0.2, momentum: 0.9, weight_decay: 0.0005}
    params: {dataset: ImageNet_LT, dropout: null, log_dir: ./data,
      stage1_weights: false, use_fc: false, use_selfatt: false}
shuffle: true
training_opt:
  backbone: resnet50
  batch_size: 512
  dataset: ImageNet_LT
  display_step: 10
  feature_dim: 2048
  log_dir: ./data
  log_root: ./data
  num_classes: 1000
  num_epochs: 10
  num_workers: 12
  open_threshold: 0.1
  sampler: {def_file: ./imagenet_inat/data/ClassAwareSampler.py, num_samples_cls: 4, type: ClassAwareSampler}
  scheduler_params: {gamma: 0.1, step_size: 3}
  stage: resnet50_crt_uni2ban_ssp_moco
  sub_dir: clslearn
"""


def test_the_original_config_file_parses_and_command_line_overrides(tmp_path):
    path = tmp_path / 'cls_crt.yaml'
    path.write_text(ORIGINAL_CLS_CRT)
    cfg = load_config(str(path), batch_size=256, model_dir='m.pth', log_dir='out', workers=2)
    assert (cfg.batch_size, cfg.model_dir, cfg.log_dir, cfg.num_workers) == (256, 'm.pth', 'out', 2)
    assert cfg.networks['feat_model'].fix and cfg.sampler == 'ClassAwareSampler' and cfg.num_epochs == 10


@pytest.mark.parametrize('key,value,message', [
    (('networks', 'feat_model', 'def_file'), '/tmp/evil/Backdoor.py',
     r"networks.feat_model.def_file: unknown def_file '/tmp/evil/Backdoor.py'; "
     r"known: ResNet10Feature, ResNet50Feature"),
    (('criterions', 'PerformanceLoss', 'def_file'), './loss/FocalLoss.py', r"known: SoftmaxLoss"),
    (('training_opt', 'sampler', 'def_file'), './data/MixedPrioritizedSampler.py', r"known: ClassAwareSampler"),
    (('networks', 'classifier', 'def_file'), './models/ResNet50Feature.py', r"is a feat_model, not a classifier"),
])
def test_unknown_def_files_are_refused_with_the_known_names(tmp_path, key, value, message):
    cfg = fx.stage_config(tmp_path / 'logs')
    node = cfg
    for k in key[:-1]:
        node = node[k]
    node[key[-1]] = value
    with pytest.raises(UserError, match=message):
        load_config(fx.write_config(tmp_path / 'c.yaml', cfg))


def test_learning_rate_of_the_first_and_last_epoch_follows_the_cosine_formula():
    cfg = load_config(os.path.join(CONFIGS, 'ImageNet_LT', 'feat_uniform.yaml'))
    lr, end, epochs = 0.2, 0.0, 90
    for e in (1, 45, 90):
        assert cfg.lr_factor_at(e, lr) == end + (lr - end) * (1 + math.cos(math.pi * e / epochs)) / 2
    assert cfg.lr_factor_at(90, lr) == 0.0 and cfg.lr_factor_at(1, 0.0) == 0.0
    cfg.endlr = 0.01
    assert cfg.lr_factor_at(90, lr) == pytest.approx(0.01) and cfg.lr_factor_at(1, 0.0) == 0.0
    # torch's scheduler stepped at every epoch start agrees
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0.01)
    opt.step()  # (no gradient: only silences the scheduler-before-optimizer warning)
    for e in range(1, epochs + 1):
        sched.step()
        assert opt.param_groups[0]['lr'] == pytest.approx(cfg.lr_factor_at(e, lr), abs=1e-12)


# ---------------------------------------------------------------- stage 1

def test_stage1_loads_every_moco_feature_tensor_and_writes_the_original_layout(world):
    text = log_text(world['stage1'])
    assert 'feat_model (ResNet10Feature): loaded 72 of its 72 tensors' in text
    assert 'classifier (DotProductClassifier): starts fresh' in text
    # lr 0.05: epoch 1 of 2 trains at 0.025, epoch 2 at endlr = 0; floor(145 / 16) = 9 steps each
    assert f'Epoch: [0][{STEPS}/{STEPS}], lr: 0.02500' in text and f'Epoch: [1][{STEPS}/{STEPS}], lr: 0.00000' in text
    final = load(world['stage1'] / 'final_model_checkpoint.pth')
    assert set(final) == {'epoch', 'best_epoch', 'state_dict_best', 'best_acc', 'centroids'}
    assert final['epoch'] == 2 and final['best_epoch'] in (1, 2) and 0 < final['best_acc'] <= 1
    assert set(final['state_dict_best']) == {'feat_model', 'classifier'}
    # loadable by the original: its load_model keeps the keys its DataParallel networks have
    feat = nn.DataParallel(ResNetFeature(*fx._resnet10()))
    kept = {k: v for k, v in final['state_dict_best']['feat_model'].items() if k in feat.state_dict()}
    assert len(kept) == len(feat.state_dict()) == 72
    assert set(final['state_dict_best']['classifier']) == {'module.fc.weight', 'module.fc.bias'}
    # trained away from MoCo's weights
    assert not torch.equal(strip(final['state_dict_best']['feat_model'])['conv1.weight'],
                           world['moco_feats']['conv1.weight'])
    latest = load(world['stage1'] / 'latest_model_checkpoint.pth')
    assert latest['epoch'] == 2 and set(latest['state_dict']) == {'feat_model', 'classifier'}
    results = json.loads((world['stage1'] / 'results_test.json').read_text())
    assert results['phase'] == 'test' and results['count'] == 18 and results['train_class_counts'] == [110, 30, 5]


def test_a_network_with_lr_0_stays_exactly_as_loaded(world, tmp_path):
    cfg = fx.write_config(tmp_path / 'c.yaml', fx.stage_config(tmp_path / 'run', sampler=False, epochs=2,
                                                                batch=BATCH, feat_lr=0))
    assert ii_main.main(argv(world, cfg, '--model_dir', world['moco'], '--freeze_bn')) == 0
    latest = load(tmp_path / 'run' / 'latest_model_checkpoint.pth')['state_dict']
    feats = strip(latest['feat_model'])
    fixtures.assert_same_tensors(feats, world['moco_feats'])  # parameters and (with --freeze_bn) BatchNorm statistics


# ---------------------------------------------------------------- stage 2

def test_crt_keeps_every_feature_parameter_and_retrains_the_classifier(world, tmp_path):
    cfg = fx.write_config(tmp_path / 'c.yaml', fx.stage_config(tmp_path / 'crt', fix=True, epochs=2, batch=BATCH))
    assert ii_main.main(argv(world, cfg, '--model_dir', str(world['stage1']))) == 0
    text = log_text(tmp_path / 'crt')
    assert 'classifier (DotProductClassifier): starts fresh' in text
    # the class-aware sampler's own epoch is 3 x 110 samples; an epoch still stops at floor(145 / 16) steps
    assert f'Epoch: [0][{STEPS}/{STEPS}]' in text and f'Epoch: [0][{STEPS + 3}/' not in text  # display_step 3
    s1 = load(world['stage1'] / 'final_model_checkpoint.pth')['state_dict_best']
    crt = load(tmp_path / 'crt' / 'latest_model_checkpoint.pth')['state_dict']
    names = dict(ResNetFeature(*fx._resnet10()).named_parameters())
    for k, v in strip(s1['feat_model']).items():
        if k in names:
            assert torch.equal(strip(crt['feat_model'])[k], v), k
    # fix: true leaves BatchNorm in train mode, as the original: its statistics move
    assert not torch.equal(strip(crt['feat_model'])['bn1.running_mean'], strip(s1['feat_model'])['bn1.running_mean'])
    assert not torch.equal(crt['classifier']['module.fc.weight'], s1['classifier']['module.fc.weight'])


def test_crt_starts_the_classifier_fresh(world, tmp_path):
    # one epoch trains at endlr = 0, so the saved classifier is its initialisation
    cfg = fx.write_config(tmp_path / 'c.yaml', fx.stage_config(tmp_path / 'crt', fix=True, epochs=1, batch=BATCH))
    assert ii_main.main(argv(world, cfg, '--model_dir', str(world['stage1']))) == 0
    s1 = load(world['stage1'] / 'final_model_checkpoint.pth')['state_dict_best']['classifier']['module.fc.weight']
    crt = load(tmp_path / 'crt' / 'final_model_checkpoint.pth')['state_dict_best']['classifier']['module.fc.weight']
    bound = 1 / math.sqrt(512)  # nn.Linear's initialisation: U(-1/sqrt(in), 1/sqrt(in))
    assert crt.abs().max() <= bound < s1.abs().max()


# Two classes whose classifier rows have norms 4 and 1: a feature x with W_0.x = 4 ** 0.55 and
# W_1.x = 1 goes to class 0 while 4 ** 0.55 / 4 ** tau > 1, i.e. for tau < 0.55, and to class 1
# from tau = 0.6 on (class 2 scores -100). Val images are labelled 1, test images 0: val is best
# from tau 0.6 on, test up to 0.5.
TAU_FLIP = 0.55


def _tau_features(n, label):
    x = torch.zeros(n, 512)
    x[:, 0], x[:, 1], x[:, 2] = 4 ** TAU_FLIP / 4, 1.0, -100.0
    return x, torch.full((n,), label)


def test_tau_norm_picks_tau_on_val_never_on_test_and_keeps_every_taus_accuracy(world, tmp_path, monkeypatch):
    from imagenet_inat import stages
    s1 = load(world['stage1'] / 'final_model_checkpoint.pth')
    weight = torch.zeros(3, 512)
    weight[0, 0], weight[1, 1], weight[2, 2] = 4.0, 1.0, 1.0
    s1['state_dict_best']['classifier'] = {'module.fc.weight': weight,
                                           'module.fc.bias': torch.tensor([50., 0., 0.])}  # dropped by tau-norm
    torch.save(s1, tmp_path / 'final_model_checkpoint.pth')
    features = {'val': _tau_features(18, 1), 'test': _tau_features(18, 0)}
    monkeypatch.setattr(stages, 'predict', lambda run, module, phase: features[phase])
    raw = fx.stage_config(tmp_path / 'tau', fix=True, epochs=0, sampler=False, batch=BATCH, tau=True)
    raw['tau_norm'] = {}  # Kang et al.'s grid, the default
    cfg = fx.write_config(tmp_path / 'c.yaml', raw)
    assert ii_main.main(argv(world, cfg, '--model_dir', str(tmp_path))) == 0
    final = load(tmp_path / 'tau' / 'final_model_checkpoint.pth')
    results = json.loads((tmp_path / 'tau' / 'results_test.json').read_text())
    assert final['tau'] == results['tau'] == 0.6  # the first tau of the best val top-1
    assert results['top1'] == 0.0 and final['best_acc'] == 1.0  # test images are class 0; val 100 %
    expected = {str(t): {'val_top1': 0.0 if t < TAU_FLIP else 100.0, 'test_top1': 100.0 if t < TAU_FLIP else 0.0}
                for t in KANG_TAUS}
    assert results['tau_search'] == expected and final['tau_search'] == expected
    assert torch.allclose(final['state_dict_best']['classifier']['module.fc.weight'],
                          weight / torch.tensor([[4.0], [1.0], [1.0]]) ** 0.6)
    assert torch.equal(final['state_dict_best']['classifier']['module.fc.bias'], torch.zeros(3))
    for k, v in s1['state_dict_best']['feat_model'].items():
        assert torch.equal(final['state_dict_best']['feat_model'][k], v), k


def test_tau_normalisation_divides_rows_by_their_norm_to_the_power_tau():
    w = torch.tensor([[3., 4.], [0., 2.]])
    assert torch.allclose(tau_normalized(w, 1.0), torch.tensor([[.6, .8], [0., 1.]]))
    assert torch.equal(tau_normalized(w, 0.0), w)
    assert torch.allclose(tau_normalized(w, 0.5), w / torch.tensor([[5 ** .5], [2 ** .5]]))


def test_lws_learns_only_the_class_scales(world, tmp_path):
    cfg = fx.write_config(tmp_path / 'c.yaml', fx.stage_config(tmp_path / 'lws', classifier='LWSClassifier', fix=True,
                                                                epochs=2, batch=BATCH))
    assert ii_main.main(argv(world, cfg, '--model_dir', str(world['stage1']), '--freeze_bn')) == 0
    s1 = load(world['stage1'] / 'final_model_checkpoint.pth')['state_dict_best']
    lws = load(tmp_path / 'lws' / 'latest_model_checkpoint.pth')['state_dict']
    for key in ('module.fc.weight', 'module.fc.bias'):
        assert torch.equal(lws['classifier'][key], s1['classifier'][key])
    assert lws['classifier']['module.scales'].shape == (3,)
    assert not torch.equal(lws['classifier']['module.scales'], torch.ones(3))
    for k, v in s1['feat_model'].items():  # with --freeze_bn, statistics included
        assert torch.equal(lws['feat_model'][k], v), k


def test_test_mode_shot_accuracy_matches_a_hand_count(world, capsys):
    out = world['root'] / 'eval'
    assert ii_main.main(argv(world, world['stage1_cfg'], '--test', '--model_dir', str(world['stage1']),
                             '--log_dir', str(out), '--output_logits')) == 0
    printed = capsys.readouterr().out
    saved = np.load(out / 'logits_close.npz')
    preds, labels = saved['logits'].argmax(1), saved['labels']
    assert len(saved['paths']) == 18 and all(p.startswith(world['images']) for p in saved['paths'])
    per_class = [np.mean(preds[labels == c] == c) for c in range(3)]  # classes 0, 1, 2: many, medium, few
    results = json.loads((out / 'results_test.json').read_text())
    assert results['many_shot'] == pytest.approx(100 * per_class[0])
    assert results['medium_shot'] == pytest.approx(100 * per_class[1])
    assert results['few_shot'] == pytest.approx(100 * per_class[2])
    assert results['top1'] == pytest.approx(100 * np.mean(preds == labels))
    assert results['cls_accs'] == pytest.approx(per_class)
    row = ' '.join(f'{v:7.2f}' for v in [results['top1'], results['top5']] + [100 * a for a in per_class])
    assert row in printed
    # the same numbers as the stage-1 run's own final evaluation of its best weights
    assert results['cls_accs'] == json.loads((world['stage1'] / 'results_test.json').read_text())['cls_accs']


def test_save_feat_writes_features_labels_and_indices(world):
    out = world['root'] / 'feats'
    assert ii_main.main(argv(world, world['stage1_cfg'], '--test', '--model_dir', str(world['stage1']),
                             '--log_dir', str(out), '--save_feat', 'val')) == 0
    saved = np.load(out / 'valfeat_all.npz')
    assert saved['feats'].shape == (18, 512) and saved['idxs'].tolist() == list(range(18))
    split = open(os.path.join(world['splits'], f'{fx.DATASET}_val.txt')).read().split('\n')
    assert saved['labels'].tolist() == [int(line.split()[1]) for line in split if line]


def _spy_on_features(monkeypatch):
    """Every call of the feature model: (training, bf16 autocast on, NHWC images, NHWC weights, output dtype)."""
    calls, real = [], ResNetFeature.forward

    def forward(self, x):
        out = real(self, x)
        calls.append((self.training, torch.is_autocast_enabled('cpu'),
                      x.is_contiguous(memory_format=torch.channels_last),
                      self.conv1.weight.is_contiguous(memory_format=torch.channels_last), out.dtype))
        return out
    monkeypatch.setattr(ResNetFeature, 'forward', forward)
    return calls


@pytest.mark.parametrize('flags,amp,nhwc', [(('--amp',), True, True),
                                              (('--no-amp', '--no-channels-last'), False, False)])
def test_amp_reaches_the_training_steps_and_every_evaluation_stays_float32(world, tmp_path, monkeypatch, flags,
                                                                          amp, nhwc):
    calls = _spy_on_features(monkeypatch)
    cfg = fx.write_config(tmp_path / 'c.yaml', fx.stage_config(tmp_path / 'run', sampler=False, epochs=1, batch=BATCH))
    assert ii_main.main(argv(world, cfg, '--model_dir', world['moco'], *flags)) == 0
    # 9 training steps, then the val and the test evaluation, 2 batches of 16 and 2 images each
    assert calls == [(True, amp, nhwc, nhwc, torch.bfloat16 if amp else torch.float32)] * STEPS + \
        [(False, False, nhwc, nhwc, torch.float32)] * 4
    # --test and its --save_feat / --output_logits passes, and tau-norm's: float32 under --amp too
    calls.clear()
    for extra in (('--output_logits',), ('--save_feat', 'val')):
        assert ii_main.main(argv(world, cfg, '--test', '--model_dir', str(tmp_path / 'run'), '--log_dir',
                                 str(tmp_path / extra[0]), *extra, *flags)) == 0
    tau = fx.write_config(tmp_path / 't.yaml', fx.stage_config(tmp_path / 'tau', fix=True, epochs=0, sampler=False,
                                                               batch=BATCH, tau=True))
    assert ii_main.main(argv(world, tau, '--model_dir', str(tmp_path / 'run'), *flags)) == 0
    assert calls == [(False, False, nhwc, nhwc, torch.float32)] * 8


def test_speed_flags_offered_are_those_that_apply():
    helps = ii_main.build_parser().format_help()
    assert '--amp' in helps and '--channels-last' in helps
    for flag in ('--loader', '--amp-eval', '--compile'):  # no device loader; evaluations stay float32
        assert flag not in helps


# ---------------------------------------------------------------- scale and reliability

@pytest.mark.slow
def test_torchrun_two_processes_match_a_single_process_evaluation(world, tmp_path):
    cfg = fx.write_config(tmp_path / 'c.yaml', fx.stage_config(tmp_path / 'ddp', epochs=1, batch=BATCH))
    cmd = fixtures.torchrun_cmd('-m', 'imagenet_inat.main', *argv(world, cfg, '--model_dir', world['moco']))
    proc = subprocess.run(cmd, cwd=REPO, env=fixtures.script_env(PYTHONPATH=REPO), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 9 global steps of 16 = 2 ranks x 8, printed by rank 0 only
    assert proc.stdout.count(f'Epoch: [1/1][{STEPS}/{STEPS}]') == 1  # the console's epochs count from 1
    sharded = json.loads((tmp_path / 'ddp' / 'results_test.json').read_text())
    assert ii_main.main(argv(world, cfg, '--test', '--model_dir', str(tmp_path / 'ddp'),
                             '--log_dir', str(tmp_path / 'single'))) == 0
    single = json.loads((tmp_path / 'single' / 'results_test.json').read_text())
    for key in ('count', 'top1', 'top5', 'many_shot', 'medium_shot', 'few_shot', 'cls_accs'):
        assert sharded[key] == single[key], key
    assert sharded['loss'] == pytest.approx(single['loss'], rel=1e-5)
    # features of both ranks gathered on rank 0 alone, in data set order, as one process writes them
    proc = subprocess.run(fixtures.torchrun_cmd('-m', 'imagenet_inat.main', *argv(
        world, cfg, '--test', '--model_dir', str(tmp_path / 'ddp'), '--log_dir', str(tmp_path / 'feats2'),
        '--save_feat', 'val')), cwd=REPO, env=fixtures.script_env(PYTHONPATH=REPO), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ii_main.main(argv(world, cfg, '--test', '--model_dir', str(tmp_path / 'ddp'),
                             '--log_dir', str(tmp_path / 'feats1'), '--save_feat', 'val')) == 0
    two, one = (np.load(tmp_path / d / 'valfeat_all.npz') for d in ('feats2', 'feats1'))
    assert two['labels'].tolist() == one['labels'].tolist() and two['idxs'].tolist() == list(range(18))
    np.testing.assert_allclose(two['feats'], one['feats'], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('cores, local, flag, workers', [
    (2, '1', (), 12), (2, '8', (), 2), (2, '5', (), 3), (2, '8', ('-j', '7'), 7),
    # a GPU node: every core decodes (~300 JPEGs/s each; docs/gpu.md), one left to each process
    (64, '8', (), 7), (64, '1', (), 63), (96, '8', (), 11), (96, '8', ('-j', '3'), 3), (16, '8', (), 2)])
def test_config_workers_are_shared_by_a_nodes_processes(world, monkeypatch, cores, local, flag, workers):
    """The shipped configs' 12 workers fed the original's one process; 8 torchrun processes get 2 each, or
    their share of the node's cores less one where that is more."""
    monkeypatch.setenv('LOCAL_WORLD_SIZE', local)
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(cores)))
    args = ii_main.build_parser().parse_args(['--cfg', 'imagenet_inat/config/ImageNet_LT/cls_crt.yaml',
                                              '--data_root', world['images'], *flag])
    assert ii_main.load_stage(args).num_workers == workers


def _wait_for(proc, path, marker, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and marker in path.read_text():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended early:\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f'timed out waiting for {marker!r}')


def test_sigkill_then_resume_ends_with_bit_identical_weights(world, tmp_path):
    cfg = fx.write_config(tmp_path / 'c.yaml', fx.stage_config(tmp_path / 'run', sampler=False, epochs=2, batch=BATCH))
    cmd = [sys.executable, '-m', 'imagenet_inat.main', *argv(world, cfg, '--model_dir', world['moco'])]
    proc = subprocess.Popen(cmd, cwd=REPO, env=fixtures.script_env(PYTHONPATH=REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for(proc, tmp_path / 'run' / 'log.txt', 'Epoch: [1][3/')  # step 3 of epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load(tmp_path / 'run' / 'latest_model_checkpoint.pth')['epoch'] == 1
    assert not (tmp_path / 'run' / 'final_model_checkpoint.pth').exists()
    assert ii_main.main(argv(world, cfg, '--resume', str(tmp_path / 'run'))) == 0
    # the same stage as the module's uninterrupted stage-1 run: the same weights, to the bit
    resumed = load(tmp_path / 'run' / 'final_model_checkpoint.pth')
    whole = load(world['stage1'] / 'final_model_checkpoint.pth')
    assert resumed['best_epoch'] == whole['best_epoch'] and resumed['best_acc'] == whole['best_acc']
    for net in ('feat_model', 'classifier'):
        for k, v in whole['state_dict_best'][net].items():
            assert torch.equal(resumed['state_dict_best'][net][k], v), (net, k)
        last = load(tmp_path / 'run' / 'latest_model_checkpoint.pth')['state_dict'][net]
        for k, v in load(world['stage1'] / 'latest_model_checkpoint.pth')['state_dict'][net].items():
            assert torch.equal(last[k], v), (net, k)


@contextlib.contextmanager
def _signal_in_step(step, signum=signal.SIGTERM):
    """The process signals itself in its `step`-th training step (counted over the stage's epochs), a real
    signal taken by the stage's handler: the stop lands after exactly that step."""
    import engine
    real, calls = engine.classify, []

    def classify_then_signal(model, images, targets):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return real(model, images, targets)
    kwdefaults = engine.train_one_epoch.__kwdefaults__
    engine.train_one_epoch.__kwdefaults__ = {**kwdefaults, 'forward': classify_then_signal}
    try:
        yield
    finally:
        engine.train_one_epoch.__kwdefaults__ = kwdefaults


def _assert_ends_as_stage1(world, run):
    """The stage in folder `run`, stopped in epoch 2 and resumed, ended as the module's uninterrupted stage 1."""
    for name, key in (('final_model_checkpoint.pth', 'state_dict_best'), ('latest_model_checkpoint.pth', 'state_dict')):
        # epoch 2 trains at lr 0 and the best epoch is the first: the last BatchNorm statistics tell epoch 2's data
        resumed, whole = (load(folder / name)[key] for folder in (run, world['stage1']))
        for net in ('feat_model', 'classifier'):
            fixtures.assert_same_tensors(resumed[net], whole[net])
    # the stopped epoch's training top-1 is over all its steps, those before the stop included
    line = [ln for ln in log_text(world['stage1']).splitlines() if ln.startswith('Epoch [2/2] training top-1')]
    assert len(line) == 1 and line[0] in log_text(run).splitlines()


def test_sigterm_saves_mid_epoch_and_the_resumed_run_is_exact(world, tmp_path):
    cfg = fx.write_config(tmp_path / 'c.yaml', fx.stage_config(tmp_path / 'run', sampler=False, epochs=2, batch=BATCH))
    with _signal_in_step(STEPS + 4):  # step 4 of epoch 2
        assert ii_main.main(argv(world, cfg, '--model_dir', world['moco'])) == 128 + signal.SIGTERM
    stopped = load(tmp_path / 'run' / 'latest_model_checkpoint.pth')
    assert (stopped['epoch'], stopped['step']) == (1, 4)
    assert ii_main.main(argv(world, cfg, '--resume', str(tmp_path / 'run'))) == 0
    _assert_ends_as_stage1(world, tmp_path / 'run')



def test_a_stage_stopped_mid_epoch_with_loader_workers_resumes_exactly(world, tmp_path):
    """Two loader workers: each step's crops, flips and jitter come from (seed, epoch, step, rank) (dataset.step_seeds),
    so the rest of the stopped epoch and the epoch after it are the uninterrupted run's, weights, momentum,
    BatchNorm statistics and log lines alike."""
    config = {name: fx.write_config(tmp_path / f'{name}.yaml', fx.stage_config(tmp_path / name, sampler=False, epochs=3,
                                                                             batch=BATCH))
              for name in ('whole', 'stopped')}
    assert ii_main.main(argv(world, config['whole'], '--model_dir', world['moco'], '-j', '2')) == 0
    stopped = argv(world, config['stopped'], '--model_dir', world['moco'], '-j', '2')
    with _signal_in_step(STEPS + 4):  # step 4 of epoch 2
        assert ii_main.main(stopped) == 128 + signal.SIGTERM
    assert load(tmp_path / 'stopped' / 'latest_model_checkpoint.pth')['step'] == 4
    assert ii_main.main(argv(world, config['stopped'], '--resume', str(tmp_path / 'stopped'), '-j', '2')) == 0
    whole, resumed = (load(tmp_path / name / 'latest_model_checkpoint.pth') for name in ('whole', 'stopped'))
    assert whole['epoch'] == resumed['epoch'] == 3
    for net in ('feat_model', 'classifier'):
        fixtures.assert_same_tensors(resumed['state_dict'][net], whole['state_dict'][net])
    for a, b in zip(whole['optimizer']['state'].values(), resumed['optimizer']['state'].values()):
        assert torch.equal(a['momentum_buffer'], b['momentum_buffer'])
    lines = {name: [ln for ln in log_text(tmp_path / name).splitlines() if ln.startswith('Epoch')]
             for name in ('whole', 'stopped')}
    assert lines['stopped'] == lines['whole'] and len(lines['whole']) == 3 * (3 + 1)  # 3 print points, the top-1


def test_a_resumed_stage_keeps_the_precision_its_steps_ran_in(world, tmp_path, monkeypatch, capsys):
    import engine
    cfg = fx.write_config(tmp_path / 'c.yaml', fx.stage_config(tmp_path / 'run', sampler=False, epochs=2, batch=BATCH))
    monkeypatch.setattr(torch.cpu, 'get_capabilities', lambda: {'avx512_bf16': True, 'amx_bf16': False})
    monkeypatch.setattr(engine, 'cpu_vendor', lambda: 'AuthenticAMD')  # --amp's default: bf16
    with _signal_in_step(STEPS + 4):  # step 4 of epoch 2
        assert ii_main.main(argv(world, cfg, '--model_dir', world['moco'])) == 128 + signal.SIGTERM
    assert load(tmp_path / 'run' / 'latest_model_checkpoint.pth')['amp'] is True
    monkeypatch.setattr(engine, 'cpu_vendor', lambda: 'GenuineIntel')  # resumed where the default is float32
    features = _spy_on_features(monkeypatch)
    capsys.readouterr()
    assert ii_main.main(argv(world, cfg, '--resume', str(tmp_path / 'run'))) == 0
    # the 5 steps left of epoch 2 in bf16, then val and test (2 batches each) in float32
    assert [(c[0], c[4]) for c in features] == [(True, torch.bfloat16)] * (STEPS - 4) + [(False, torch.float32)] * 4
    assert "=> the training steps go on in bf16, as the resumed run's did" in capsys.readouterr().out
    assert load(tmp_path / 'run' / 'latest_model_checkpoint.pth')['amp'] is True

def test_pretrain_rot_on_imagenet_split_files_feeds_stage_1(world, tmp_path):
    import pretrain_rot
    from imagenet_inat import weights
    from imagenet_inat.networks import NETWORKS
    splits = tmp_path / 'splits'
    splits.mkdir()
    for split in ('train', 'val'):  # the fixture's images under ImageNet-LT's split file names
        (splits / f'ImageNet_LT_{split}.txt').write_text(
            open(os.path.join(world['splits'], f'{fx.DATASET}_{split}.txt')).read())
    assert pretrain_rot.main(['--dataset', 'imagenet', '--data_path', world['images'], '--split_dir', str(splits),
                              '--crop-size', '32', '-b', '29', '-j', '0', '--epochs', '1', '--seed', '0',
                              '--root_log', str(tmp_path / 'log'), '--root_model', str(tmp_path / 'ckpt')]) == 0
    path = tmp_path / 'ckpt' / 'imagenet_resnet50_CE_None_pretrain_rot' / 'ckpt.pth.tar'  # the original's name
    ckpt = load(path)
    assert ckpt['arch'] == 'resnet50' and ckpt['state_dict']['fc.weight'].shape == (4, 2048)
    file, kind, nets = weights.read_model_dir(str(path))
    assert kind == 'rotation/supervised checkpoint' and nets['classifier'] is None
    feat = NETWORKS['ResNet50Feature'].build({})
    matched, missing = weights.load_network(feat, nets['feat_model'], 'feat_model', 'ResNet50Feature', file, print)
    assert len(matched) == len(feat.state_dict()) == 318 and missing == []  # every tensor but the head
    assert torch.equal(feat.state_dict()['layer4.2.conv3.weight'], ckpt['state_dict']['layer4.2.conv3.weight'])


# ---------------------------------------------------------------- bad input

def _bad(world, tmp_path, cfg_dict=None, *extra, cfg_path=None):
    cfg = cfg_path or fx.write_config(tmp_path / 'c.yaml', cfg_dict or fx.stage_config(tmp_path / 'run', batch=BATCH))
    with pytest.raises(UserError) as info:
        ii_main.main(argv(world, cfg, *extra))
    assert not (tmp_path / 'run').exists()  # refused before the log folder is touched
    return str(info.value)


def test_missing_files_and_keys_are_named(world, tmp_path):
    assert 'split file not found' in _bad(world, tmp_path, None, '--split_dir', str(tmp_path))
    assert '--split_dir' in _bad(world, tmp_path, None, '--split_dir', str(tmp_path))
    assert _bad(world, tmp_path, None, '--model_dir', str(tmp_path / 'nope.pth')).startswith(
        f"--model_dir not found: {tmp_path / 'nope.pth'}")
    missing = tmp_path / 'none.yaml'
    assert _bad(world, tmp_path, None, cfg_path=str(missing)) == f"--cfg file not found: {missing}"
    cfg = fx.stage_config(tmp_path / 'run')
    del cfg['networks']['feat_model']['optim_params']['lr']
    assert _bad(world, tmp_path, cfg).endswith('key networks.feat_model.optim_params.lr is missing')
    cfg = fx.stage_config(tmp_path / 'run', tau=True, epochs=0)
    assert 'needs the stage-1 result: pass --model_dir' in _bad(world, tmp_path, cfg)


def test_missing_image_and_out_of_range_label_are_refused(world, tmp_path):
    splits = tmp_path / 'splits'
    splits.mkdir()
    for split in ('train', 'val', 'test'):
        text = open(os.path.join(world['splits'], f'{fx.DATASET}_{split}.txt')).read()
        (splits / f'{fx.DATASET}_{split}.txt').write_text(text)
    train = splits / f'{fx.DATASET}_train.txt'
    train.write_text(train.read_text() + 'train/class0/0.jpg 3\n')
    message = _bad(world, tmp_path, None, '--split_dir', str(splits))
    assert message == f"{train} line 146: label 3 is outside 0..2 (num_classes is 3)"
    train.write_text(train.read_text().replace('train/class0/0.jpg 3\n', 'train/class0/missing.jpg 0\n'))
    message = _bad(world, tmp_path, None, '--split_dir', str(splits))
    assert 'missing.jpg' in message and 'check --data_root' in message


def test_checkpoints_of_another_architecture_are_refused(world, tmp_path):
    cifar = build_model('resnet32', 10).state_dict()
    torch.save({'state_dict': cifar}, tmp_path / 'cifar.pth.tar')
    message = _bad(world, tmp_path, None, '--model_dir', str(tmp_path / 'cifar.pth.tar'))
    assert 'does not fit the feat_model (ResNet10Feature): shapes differ for conv1.weight (16, 3, 3, 3)' in message
    torch.save({'state_dict': {'encoder.w': torch.zeros(2)}}, tmp_path / 'other.pth')
    message = _bad(world, tmp_path, None, '--model_dir', str(tmp_path / 'other.pth'))
    assert 'holds no tensor of the feat_model (ResNet10Feature)' in message
    # --test needs a classifier; a MoCo checkpoint has none
    message = _bad(world, tmp_path, None, '--test', '--model_dir', world['moco'])
    assert 'holds no classifier' in message


def test_command_line_exits_with_status_2_and_one_line(world, tmp_path, capsys):
    cfg = fx.write_config(tmp_path / 'c.yaml', fx.stage_config(tmp_path / 'run', batch=BATCH))
    with pytest.raises(SystemExit) as info:
        cli.run_main(ii_main.main, argv(world, cfg, '--model_dir', 'nowhere'))
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count('\n') == 1
    assert err.startswith('error: --model_dir not found: nowhere')
    assert glob.glob(str(tmp_path / 'run*')) == []


# ---------------------------------------------------------------- the original's choices, pinned down

def _run_scored(world, tmp_path, monkeypatch, scores, epochs):
    """A cRT stage whose evaluations return `scores[phase]` in turn (top-1 %): (final checkpoint, results_test.json,
    the classifier weights at each val evaluation, evaluations per phase)."""
    from imagenet_inat import stages
    seen, classifiers = {'val': 0, 'test': 0}, []

    def fake_evaluate(run, module, phase):
        top1 = scores[phase][seen[phase]]
        seen[phase] += 1
        if phase == 'val':
            classifiers.append(module.classifier.fc.weight.detach().clone())
        return {'top1': top1, 'top5': 100.0, 'loss': 1.0, 'count': 18, 'per_class': np.full(3, top1 / 100)}
    monkeypatch.setattr(stages, 'evaluate_phase', fake_evaluate)
    cfg = fx.write_config(tmp_path / 'c.yaml', fx.stage_config(tmp_path / 'run', sampler=False, epochs=epochs,
                                                                batch=BATCH))
    assert ii_main.main(argv(world, cfg, '--model_dir', world['moco'])) == 0
    final = load(tmp_path / 'run' / 'final_model_checkpoint.pth')
    return final, json.loads((tmp_path / 'run' / 'results_test.json').read_text()), classifiers, seen


def test_the_best_epoch_is_chosen_on_val_never_on_test(world, tmp_path, monkeypatch):
    scores = {'val': [50.0, 80.0, 60.0], 'test': [90.0, 10.0, 95.0, 42.0]}  # test would pick epoch 3
    final, results, classifiers, seen = _run_scored(world, tmp_path, monkeypatch, scores, epochs=3)
    assert final['best_epoch'] == results['best_epoch'] == 2 and final['best_acc'] == 0.8
    assert seen == {'val': 3, 'test': 1}  # test is evaluated once, after training, with the best weights
    assert results['top1'] == 90.0 and results['best_val_top1'] == 80.0
    assert torch.equal(final['state_dict_best']['classifier']['module.fc.weight'], classifiers[1])
    assert not torch.equal(classifiers[0], classifiers[1])


def test_lws_logits_are_wx_plus_b_times_the_class_scale():
    # Kang et al.'s TauNormClassifier.py (LWS): x = self.fc(x); x *= self.scales
    lws = NETWORKS['LWSClassifier'].build({'feat_dim': 2, 'num_classes': 2})
    with torch.no_grad():
        lws.fc.weight.copy_(torch.tensor([[1., 2.], [0., 1.]]))
        lws.fc.bias.copy_(torch.tensor([1., -1.]))
        lws.scales.copy_(torch.tensor([2., 3.]))
    # W x + b = (1 + 2 + 1, 0 + 1 - 1) = (4, 0); times (2, 3): (8, 0)
    assert lws(torch.tensor([[1., 1.]])).tolist() == [[8., 0.]]
    assert [n for n, p in lws.named_parameters() if p.requires_grad] == ['scales']


def _rename_splits(world, folder, dataset, splits):
    folder.mkdir()
    for split in splits:
        text = open(os.path.join(world['splits'], f'{fx.DATASET}_{split}.txt')).read()
        (folder / f'{dataset}_{split}.txt').write_text(text)
    return str(folder)


@pytest.mark.parametrize('dataset,final', [('iNaturalist18', 'val'), ('ImageNet_LT', 'test')])
def test_the_final_evaluation_split_is_val_for_inaturalist_and_test_for_imagenet_lt(world, tmp_path, dataset, final):
    # the original's main.py: test_split = 'val' for iNaturalist (it has no test split), else 'test'
    splits = ('train', 'val') if dataset == 'iNaturalist18' else ('train', 'val', 'test')
    split_dir = _rename_splits(world, tmp_path / 'splits', dataset, splits)
    cfg = fx.write_config(tmp_path / 'c.yaml', fx.stage_config(tmp_path / 'run', dataset=dataset, batch=BATCH))
    assert ii_main.main(argv(world, cfg, '--split_dir', split_dir, '--test', '--model_dir', str(world['stage1']))) == 0
    assert sorted(os.listdir(tmp_path / 'run')) == [f'results_{final}.json']
    assert json.loads((tmp_path / 'run' / f'results_{final}.json').read_text())['phase'] == final


def test_step_lr_epoch_e_trains_at_lr_times_gamma_to_the_e_over_step_size(tmp_path):
    path = tmp_path / 'cls_crt.yaml'
    path.write_text(ORIGINAL_CLS_CRT.replace('coslr: true', 'coslr: false'))  # step_size 3, gamma 0.1
    cfg = load_config(str(path))
    # the original stepped StepLR at the start of every epoch: epoch e runs at 0.2 * 0.1 ** (e // 3)
    expected = [0.2, 0.2, 0.02, 0.02, 0.02, 0.002, 0.002, 0.002, 0.0002, 0.0002]
    assert [cfg.lr_factor_at(e, 0.2) for e in range(1, 11)] == pytest.approx(expected, rel=1e-12)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1)
    opt.step()
    for e in range(1, 11):
        sched.step()
        assert opt.param_groups[0]['lr'] == pytest.approx(expected[e - 1], rel=1e-12)


def _class_aware_epochs(world, cfg, epochs, seed=3):
    from imagenet_inat import data as data_mod
    train = data_mod.load_phase(cfg, 'train', world['images'], world['splits'])
    _, batches, steps = data_mod.train_loader(cfg, train, seed, 0, 1, 0)
    orders = []
    for e in epochs:
        batches.set_epoch(e)
        orders.append([i for batch in batches for i in batch])
    return orders, np.asarray(train.targets), batches


def test_class_aware_cycles_continue_across_epochs_and_resume_at_any_epoch(world, tmp_path):
    raw = fx.stage_config(tmp_path / 'run', batch=BATCH)
    raw['shuffle'] = False  # the loader's order is then the sampler's
    cfg = load_config(fx.write_config(tmp_path / 'c.yaml', raw))
    orders, labels, _ = _class_aware_epochs(world, cfg, range(12))
    stream = sum(orders, [])
    assert [len(o) for o in orders] == [STEPS * BATCH] * 12  # 9 steps of 16 per epoch
    # runs of 4 (num_samples_cls) from one class, the classes cycled in turn: 12 runs each per epoch
    runs = labels[stream].reshape(-1, 4)
    assert (runs == runs[:, :1]).all() and np.bincount(runs[:, 0]).tolist() == [144, 144, 144]
    for c, n in enumerate(fx.TRAIN_COUNTS):  # 110, 30, 5 images: 576 draws each over the 12 epochs
        draws = [i for i in stream if labels[i] == c]
        members = set(np.flatnonzero(labels == c).tolist())
        passes = [draws[k:k + n] for k in range(0, len(draws) - n + 1, n)]
        assert len(draws) == 576 and len(passes) == 576 // n
        # every image once per pass before any is reused, across the epoch boundaries (RandomCycleIter)
        assert all(sorted(p) == sorted(members) for p in passes), c
        assert len({tuple(p) for p in passes}) > len(passes) // 2  # reshuffled every pass (5 images: 120 orders)
    # the largest class: every image within the first 3 epochs (144 of its draws), as the original
    assert set(stream[:3 * STEPS * BATCH]) >= set(np.flatnonzero(labels == 0).tolist())
    for e in (0, 5, 11):  # a resumed run builds a new sampler: it continues the same order
        fresh, _, batches = _class_aware_epochs(world, cfg, [e])
        assert fresh[0] == orders[e]
        batches.set_epoch(e)
        batches.skip(4)
        assert [i for batch in batches for i in batch] == orders[e][4 * BATCH:]


def test_val_as_train_trains_on_the_val_split(world, tmp_path):
    cfg = fx.write_config(tmp_path / 'c.yaml', fx.stage_config(tmp_path / 'run', sampler=False, batch=6))
    assert ii_main.main(argv(world, cfg, '--model_dir', world['moco'], '--val_as_train', '--overwrite')) == 0
    assert '=> 18 training images, batch 6: 3 steps per epoch' in log_text(tmp_path / 'run')
    results = json.loads((tmp_path / 'run' / 'results_test.json').read_text())
    # the original's shot groups count the training phase's images: 6 per class, all few-shot
    assert results['train_class_counts'] == [6, 6, 6]
    assert results['many_shot'] is None and results['medium_shot'] is None and results['few_shot'] is not None


def test_the_same_command_again_resumes_a_stopped_stage_and_keeps_a_finished_one(world, tmp_path, capsys):
    """rerun.py for imagenet_inat: after a stop, the same command resumes the stage (and ends as the
    uninterrupted stage 1); once the stage is finished it is refused, and --overwrite runs it anew."""
    cfg = fx.write_config(tmp_path / 'c.yaml', fx.stage_config(tmp_path / 'run', sampler=False, epochs=2, batch=BATCH))
    command = argv(world, cfg, '--model_dir', world['moco'])
    with _signal_in_step(STEPS + 4, signal.SIGINT):  # step 4 of epoch 2
        assert ii_main.main(command) == 128 + signal.SIGINT
    capsys.readouterr()
    assert ii_main.main(command) == 0
    assert (f"=> {tmp_path / 'run'} holds an unfinished run of these flags (stopped in epoch 2 of 2 after step 4): "
            f"resuming it") in capsys.readouterr().out
    _assert_ends_as_stage1(world, tmp_path / 'run')
    before = {p: p.read_bytes() for p in (tmp_path / 'run').iterdir() if p.is_file()}
    with pytest.raises(UserError, match=r'run holds a finished stage \(final_model_checkpoint.pth\); pass --overwrite'):
        ii_main.main(command)
    assert {p: p.read_bytes() for p in (tmp_path / 'run').iterdir() if p.is_file()} == before
    assert ii_main.main(command + ['--overwrite']) == 0
    assert log_text(tmp_path / 'run').count('Best validation accuracy') == 1


def test_resume_cuts_log_txt_back_to_the_checkpoint(world, tmp_path):
    cfg = fx.write_config(tmp_path / 'c.yaml', fx.stage_config(tmp_path / 'run', sampler=False, batch=BATCH))
    assert ii_main.main(argv(world, cfg, '--model_dir', world['moco'])) == 0
    size = load(tmp_path / 'run' / 'latest_model_checkpoint.pth')['log_size']
    before = (tmp_path / 'run' / 'log.txt').read_bytes()
    assert 0 < size < len(before)  # the final evaluation was logged after the checkpoint
    with open(tmp_path / 'run' / 'log.txt', 'a') as f:
        f.write('a line written after the checkpoint, before a kill\n')
    assert ii_main.main(argv(world, cfg, '--resume', str(tmp_path / 'run'))) == 0
    after = (tmp_path / 'run' / 'log.txt').read_bytes()
    assert after[:size] == before[:size] and b'before a kill' not in after
    assert after.count(b'Best validation accuracy') == 1 and b'=> resumed' in after[size:]


# ---------------------------------------------------------------- per-GPU BatchNorm batches

def _bn_batch_sizes(world, tmp_path, batch, *extra):
    sizes = {}

    def record(module, inputs):
        if isinstance(module, nn.BatchNorm2d) and module.training:
            sizes.setdefault(id(module), []).append(inputs[0].shape[0])
    cfg = fx.write_config(tmp_path / f'c{batch}.yaml', fx.stage_config(tmp_path / f'run{batch}', batch=batch))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        assert ii_main.main(argv(world, cfg, '--model_dir', world['moco'], *extra)) == 0
    finally:
        handle.remove()
    assert len(sizes) == 12  # every BatchNorm layer of the ResNet-10
    return sizes


@pytest.mark.parametrize('batch,pieces,expected', [
    (128, 8, [16] * 8),          # ImageNet-LT stage 1 on 8 GPUs: 128 / 8
    (100, 8, [13] * 7 + [9]),    # iNaturalist stage 1: torch.chunk's uneven pieces, as DataParallel's scatter
    (100, 1, [100]),
])
def test_bn_pieces_give_each_batchnorm_call_dataparallels_piece(world, tmp_path, batch, pieces, expected):
    # 145 images: one step of `batch`
    sizes = _bn_batch_sizes(world, tmp_path, batch, '--bn_pieces', str(pieces))
    assert all(s == expected for s in sizes.values())


def test_sequential_pieces_keep_the_first_pieces_running_statistics():
    from imagenet_inat.layout import SequentialPieces
    torch.manual_seed(0)
    x = torch.randn(100, 3, 2, 2) * 3 + 1
    bn = nn.BatchNorm2d(3)
    out = SequentialPieces(bn, 8).train()(x)
    pieces = x.split([13] * 7 + [9])
    # each piece normalised by its own statistics (eps 1e-5, weight 1, bias 0)
    for piece, got in zip(pieces, out.split([13] * 7 + [9])):
        mean, var = piece.mean((0, 2, 3), keepdim=True), piece.var((0, 2, 3), unbiased=False, keepdim=True)
        assert torch.allclose(got, (piece - mean) / torch.sqrt(var + 1e-5), atol=1e-5)
    # running statistics: momentum 0.1 from (0, 1), GPU 0's piece only; one batch tracked
    first = pieces[0]
    assert torch.allclose(bn.running_mean, 0.1 * first.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * first.var((0, 2, 3), unbiased=True), atol=1e-6)
    assert bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize('batch,world_size,sizes', [(128, 8, [16] * 8), (100, 8, [13] * 7 + [9]), (512, 8, [64] * 8)])
def test_torchrun_ranks_take_contiguous_pieces_of_the_global_batch(batch, world_size, sizes):
    from dataset.samplers import ShuffleSampler
    from imagenet_inat.data import RankBatches

    def steps(rank, world):
        batches = RankBatches(ShuffleSampler(3 * batch + 7, seed=5), batch, 3, True, seed=5, rank=rank, world=world)
        batches.set_epoch(2)
        return list(batches)
    whole = steps(0, 1)
    ranks = [steps(r, world_size) for r in range(world_size)]
    for step, batch_indices in enumerate(whole):
        assert [len(r[step]) for r in ranks] == sizes
        assert sum((r[step] for r in ranks), []) == batch_indices  # rank 0 first, as GPU 0's piece


def test_shuffle_permutes_each_batch_before_the_pieces_are_cut():
    from dataset.samplers import ShuffleSampler
    from imagenet_inat.data import RankBatches

    def batches(shuffle):
        b = RankBatches(ShuffleSampler(300, seed=5), 100, 3, shuffle, seed=5)
        b.set_epoch(1)
        return list(b)
    plain, shuffled = batches(False), batches(True)
    assert all(sorted(a) == sorted(b) and a != b for a, b in zip(plain, shuffled))


def test_torchrun_loss_weights_make_the_mean_over_the_whole_batch():
    from imagenet_inat.layout import rank_loss_weight
    losses = torch.rand(100, dtype=torch.float64)
    pieces = losses.split([13] * 7 + [9])  # 100 over 8 processes
    # DDP averages the 8 processes' gradients (hence their weighted losses)
    ddp = sum(rank_loss_weight(len(p), 8, 100) * p.mean() for p in pieces) / 8
    assert ddp.item() == pytest.approx(losses.mean().item(), rel=1e-12)
    assert rank_loss_weight(16, 8, 128) == 1.0


def test_bad_layouts_and_tau_grids_are_one_line(world, tmp_path):
    assert _bad(world, tmp_path, None, '--bn_pieces', '8', '--batch_size', '4') == (
        "training_opt.batch_size 4 over 8 --bn_pieces: torch.chunk (DataParallel's split) makes 4 piece(s) of at "
        "most 1, so 4 would get no images; use a larger --batch_size or fewer pieces")
    assert 'makes 5 piece(s) of at most 2' in _bad(world, tmp_path, None, '--bn_pieces', '8', '--batch_size', '10')
    for grid, message in (({'min': 1.0, 'max': 0.5}, 'tau_norm.max (0.5) is below tau_norm.min (1.0)'),
                          ({'step': -0.1}, 'key tau_norm.step must be a positive number, got -0.1')):
        cfg = fx.stage_config(tmp_path / 'run', tau=True, epochs=0)
        cfg['tau_norm'] = grid
        assert _bad(world, tmp_path, cfg, '--model_dir', str(world['stage1'])).endswith(message)
    from imagenet_inat.layout import plan_pieces
    with pytest.raises(UserError, match='under torchrun each process already trains one piece'):
        plan_pieces(128, 8, 2, None)
    # a one-process run over this machine's GPUs, as DataParallel: 100 on 3 GPUs is 34, 34, 32
    assert plan_pieces(100, 1, None, None, num_gpus=3)[0] == 3 and plan_pieces(100, 1, None, 0, num_gpus=3)[0] == 1


def test_reproduce_checks_every_stage_of_the_inat_table_before_the_first_starts(tmp_path, monkeypatch):
    import reproduce
    from repro import scheduler
    monkeypatch.chdir(tmp_path)
    splits = tmp_path / 'imagenet_inat' / 'data' / 'iNaturalist18'
    splits.mkdir(parents=True)
    for split in ('train', 'val'):
        (splits / f'iNaturalist18_{split}.txt').write_text('a.jpg 0\n')
    (tmp_path / 'inat').mkdir()
    started = []
    monkeypatch.setattr(scheduler, 'execute', lambda cmd, *env_log_echo_children: started.append(cmd) or 1)

    def table(processes):
        return reproduce.main(['--table', 'inat', '--seeds', '0', '--data_path', str(tmp_path / 'inat'),
                               '--out', str(tmp_path / 'out'), '--launcher', f'torchrun --nproc_per_node={processes}'])
    # stage 1's batch of 100 over 16 processes: torch.chunk makes 15 pieces of 7, one process would idle
    with pytest.raises(UserError, match=r'training_opt.batch_size 100 over 16 processes: .* makes 15 piece'):
        table(16)
    assert started == []  # refused before MoCo's 200 epochs
    # on 8: seven pieces of 13 and one of 9, as DataParallel split it: the table starts with MoCo
    assert table(8) == 1
    assert len(started) == 1 and 'pretrain_moco.py' in started[0][4] and started[0][:4] == [
        'torchrun', '--nproc_per_node=8', '--shutdown_timeout', '300']  # reproduce.py's torchrun grace (B3)


# ---------------------------------------------------------------- per-data-set transforms, as the original's

def _steps(transform):
    """Each step of a Compose as (name, its parameters), lists made tuples."""
    def params(t):
        keys = {'RandomResizedCrop': ('size', 'scale', 'ratio', 'interpolation'), 'RandomHorizontalFlip': ('p',),
                'ColorJitter': ('brightness', 'contrast', 'saturation', 'hue'), 'Resize': ('size', 'interpolation'),
                'CenterCrop': ('size',), 'ToTensor': (), 'Normalize': ('mean', 'std')}[type(t).__name__]
        return tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in (getattr(t, k) for k in keys))
    return [(type(t).__name__, params(t)) for t in transform.transforms]


def _original_transform(phase, mean, std, jitter):
    """The original's imagenet_inat/data/dataloader.py get_data_transform, its values written out:
    train RandomResizedCrop(224), RandomHorizontalFlip(), ColorJitter(brightness=0.4, contrast=0.4,
    saturation=0.4, hue=0) except for iNaturalist18; val / test Resize(256), CenterCrop(224); then
    ToTensor() and Normalize(mean, std)."""
    from torchvision import transforms as T
    head = ([T.RandomResizedCrop(224), T.RandomHorizontalFlip()] +
            ([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0)] if jitter else [])
            if phase == 'train' else [T.Resize(256), T.CenterCrop(224)])
    return T.Compose(head + [T.ToTensor(), T.Normalize(mean, std)])


# The original's RGB_statistics: iNaturalist18's own, ImageNet's ('default') for ImageNet_LT.
ORIGINAL_STATS = {'iNaturalist18': ([0.466, 0.471, 0.380], [0.195, 0.194, 0.192]),
                  'ImageNet_LT': ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}


@pytest.mark.parametrize('dataset', ['ImageNet_LT', 'iNaturalist18'])
def test_each_data_set_s_phases_get_the_original_s_transforms(dataset, tmp_path):
    """The shipped stage-1 config of each data set, its phases loaded as a stage loads them (load_phase):
    ImageNet-LT trains with colour jitter, iNaturalist 2018 without; each normalises with its own
    statistics; train_plain (features) and val / test use the evaluation transform."""
    from PIL import Image
    from imagenet_inat.data import load_phase
    Image.new('RGB', (8, 8)).save(tmp_path / 'a.jpg')
    for split in ('train', 'val', 'test'):
        (tmp_path / f'{dataset}_{split}.txt').write_text('a.jpg 0\n')
    cfg = load_config(os.path.join(CONFIGS, dataset, 'feat_uniform.yaml'))
    assert cfg.dataset == dataset and (cfg.crop_size, cfg.resize_size) == (224, 256)
    mean, std = ORIGINAL_STATS[dataset]
    for phase in ('train', 'train_plain', 'val', 'test'):
        got = load_phase(cfg, phase, str(tmp_path), str(tmp_path)).transform
        expected = _original_transform('train' if phase == 'train' else 'test', mean, std,
                                       jitter=dataset != 'iNaturalist18')
        assert _steps(got) == _steps(expected), phase


def test_of_equal_best_val_top1s_the_first_epoch_is_kept(world, tmp_path, monkeypatch):
    """The original's run_networks.py: `if self.eval_acc_mic_top1 > best_acc`: val top-1 50, 80, 80, 70 keeps
    epoch 2's weights (best_epoch 2), not epoch 3's (4 epochs: the cosine's last, at lr 0, would not move them)."""
    final, results, classifiers, _ = _run_scored(world, tmp_path, monkeypatch,
                                                 {'val': [50.0, 80.0, 80.0, 70.0], 'test': [42.0]}, epochs=4)
    assert final['best_epoch'] == results['best_epoch'] == 2 and final['best_acc'] == 0.8
    assert torch.equal(final['state_dict_best']['classifier']['module.fc.weight'], classifiers[1])
    assert not torch.equal(classifiers[1], classifiers[2])
    assert 'Best validation accuracy is 80.000 at epoch 2' in log_text(tmp_path / 'run')
