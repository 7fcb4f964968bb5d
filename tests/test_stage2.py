"""train_stage2.py (cRT, LWS, tau-norm, NCM, weight balancing) on a digits subset, with the commands of
docs/baselines.md: what each stage keeps, what it changes, the lr each epoch trained at, and the formulas
written out here (Kang et al. 2020; Alshammari et al. 2022). The bad inputs are in tests/test_bad_input.py's
catalogue, and the stage-specific refusals below."""
import os
import re
import signal

import numpy as np
import pytest
import torch
import torch.nn as nn

import fixtures
import train
import train_stage2
import trainer
from checkpoint import load_checkpoint
from errors import UserError
from losses import ClassBalancedSoftmaxBCELoss, MaxNorm
from models import build_model
from test_docs_commands import script_commands

DOC = 'docs/baselines.md'
STAGE1 = 'checkpoint/digits_resnet32_CE_None_exp_0.01_ss_pretrained/ckpt.pth.tar'
SHORT = ['--epochs', '2']  # argparse takes the last value


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """A folder holding the README's digits stage 1 (one epoch) on 130 images per digit (120 to train)."""
    root = tmp_path_factory.mktemp('stage2')
    with pytest.MonkeyPatch.context() as mp, fixtures.one_thread():
        fixtures.shrink_digits(mp.setattr, per_class=130)
        mp.chdir(root)
        (stage1,) = [c for c in script_commands(DOC, 'train.py', ['digits', '--seed'])
                     if '--exp_str' not in c and '--mixup' not in c]
        assert train.main(stage1 + ['--epochs', '1']) == 0
    return root


@pytest.fixture
def cwd(world, monkeypatch, one_thread):
    fixtures.shrink_digits(monkeypatch.setattr, per_class=130)
    monkeypatch.chdir(world)
    return world


def readme_stage2(stage):
    (argv,) = script_commands(DOC, 'train_stage2.py', ['digits', stage])
    return argv


def stage2_sets(stage):
    """(training set, test set) of the documented command of `stage`."""
    args = train_stage2.parse(readme_stage2(stage))[0]
    args.arch = 'resnet32'  # what train_stage2.py takes from the stage-1 checkpoint before the data
    return train.load_data(args)[1:]


def stage2_train_set(stage):
    return stage2_sets(stage)[0]


def run_stage(stage, *extra):
    """The README's command of `stage`; the tests share one folder, so a new run replaces an earlier one's."""
    again = [] if '--resume' in extra else ['--overwrite']
    assert train_stage2.main(readme_stage2(stage) + SHORT + list(extra) + again) == 0
    name = f'digits_resnet32_CE_None_exp_0.01_ss_pretrained_{stage}'
    return load_checkpoint(f'checkpoint/{name}/ckpt.pth.tar'), f'log/{name}'


def stage1():
    return load_checkpoint(STAGE1)['state_dict']


def spy_epochs(monkeypatch):
    """Every call of trainer.train_one_epoch: the classifier's state before its first step and after its last, the
    criterion, the lr of its optimizer and its after_step hook."""
    seen = []
    real = trainer.train_one_epoch

    def spy(model, criterion, loader, optimizer, *args, **kwargs):
        bare = trainer.unwrap(model)
        seen.append({k: v.detach().clone() for k, v in bare.fc.state_dict().items()} | {
            'criterion': criterion, 'lr': [g['lr'] for g in optimizer.param_groups],
            'after_step': kwargs.get('after_step')})
        out = real(model, criterion, loader, optimizer, *args, **kwargs)
        seen[-1]['end'] = {k: v.detach().clone() for k, v in bare.fc.state_dict().items()}
        return out
    monkeypatch.setattr(trainer, 'train_one_epoch', spy)
    return seen


def test_crt_freezes_features_and_reinitialises_the_classifier(cwd, monkeypatch):
    seen = spy_epochs(monkeypatch)
    ckpt, _ = run_stage('cRT')
    before, after = stage1(), ckpt['state_dict']
    assert set(before) == set(after)
    features = [k for k, _ in build_model('resnet32', 10).named_parameters() if not k.startswith('fc.')]
    assert len(features) == 93  # conv1, bn1 and 15 blocks of two convolutions and two BatchNorms
    fixtures.assert_same_tensors({k: after[k] for k in features}, {k: before[k] for k in features})
    # before the first step: nn.Linear's default init (Kang et al.'s DotProductClassifier), drawn after the
    # model's own initialisation from --seed 0, not stage 1's classifier
    torch.manual_seed(0)
    fresh = build_model('resnet32', 10).fc
    nn.Linear.reset_parameters(fresh)
    fixtures.assert_same_tensors(seen[0]['weight'], fresh.weight.detach())
    assert seen[0]['weight'].abs().max() <= 1 / 64 ** 0.5  # kaiming_uniform(a=sqrt(5)) bound, fan_in 64
    assert not torch.equal(seen[0]['weight'], before['fc.weight'])
    assert not torch.equal(after['fc.weight'], seen[0]['weight'])  # and it trained
    assert isinstance(seen[0]['criterion'], nn.CrossEntropyLoss)


def test_crt_samples_class_balanced(cwd, monkeypatch):
    seen = []
    real = train_stage2.ClassAwareSampler

    def sampler(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]
    monkeypatch.setattr(train_stage2, 'ClassAwareSampler', sampler)
    run_stage('cRT', '--epochs', '1')
    (s,) = seen
    labels = np.empty(sum(map(len, s.per_class)), dtype=np.int64)
    for c, idx in enumerate(s.per_class):
        labels[idx] = c
    assert len(s.per_class) == 10 and s.num_samples == len(labels) // 64 * 64  # floor(N / batch) steps of -b 64
    drawn = np.bincount(labels[list(s)], minlength=10)
    assert drawn.max() - drawn.min() <= 4  # runs of 4 images per class, the classes in turn


def test_lws_is_the_scaled_stage1_classifier(cwd):
    ckpt, _ = run_stage('LWS', '--epochs', '3')  # epoch 3 of 3 trains at lr 0: two that learn
    sd, before = ckpt['state_dict'], stage1()
    w, b, s = sd['fc.fc.weight'], sd['fc.fc.bias'], sd['fc.scales']
    fixtures.assert_same_tensors(w, before['fc.weight'])
    fixtures.assert_same_tensors(b, before['fc.bias'])
    assert not torch.equal(s, torch.ones(10))
    model = train_stage2.STAGES['LWS'].head(build_model('resnet32', 10))
    model.load_state_dict(sd)
    x = torch.randn(5, 64)
    torch.testing.assert_close(model.fc(x), (x @ w.T + b) * s)
    # the whole network: stage 1's feature extractor (its BatchNorm statistics updated in stage 2), then (W f + b) * s
    images = torch.randn(4, 3, 32, 32)
    base = build_model('resnet32', 10, return_features=True).eval()
    base.load_state_dict({k: v for k, v in sd.items() if not k.startswith('fc.')} | {'fc.weight': w, 'fc.bias': b})
    _, f = base(images)
    torch.testing.assert_close(model.eval()(images), (f @ w.T + b) * s)


@pytest.mark.parametrize('tau', [None, '0.5', '1.0'])
def test_tau_norm_divides_rows_by_their_norm_to_tau(cwd, tau):
    """Without --tau: tau = 1 (the published tau-norm rows': Menon et al.'s Table 3, Bag of Tricks' TAU: 1.0)."""
    ckpt, log = run_stage('tau_norm', *(['--tau', tau] if tau else []))
    w = stage1()['fc.weight']
    power = float(tau) if tau else 1.0
    expected = torch.stack([row / row.norm() ** power for row in w])
    torch.testing.assert_close(ckpt['state_dict']['fc.weight'], expected)
    assert torch.count_nonzero(ckpt['state_dict']['fc.bias']) == 0  # Kang et al.'s: no bias
    if power == 1.0:
        torch.testing.assert_close(ckpt['state_dict']['fc.weight'].norm(dim=1), torch.ones(10))
    text = open(f'{log}/log_train.csv').read()
    assert (f'tau {power:g}, given by --tau; no search' if tau else 'tau 1, the default (--tau); no search') in text
    assert 'chosen' not in text and 'BatchNorm' not in text  # nothing searched, nothing trained
    assert len(trainer.reports.read_test_log(f'{log}/log_test.csv')) == 1


def write_image_folder(root, images, labels):
    """images (N, 32, 32, 3) uint8 as root/<label>/<n>.png (lossless: decoded back to the same arrays)."""
    from PIL import Image
    for n, (image, label) in enumerate(zip(images, labels)):
        os.makedirs(f'{root}/{label}', exist_ok=True)
        Image.fromarray(image).save(f'{root}/{label}/{n}.png')


def crafted_stage1(name, weight):
    """The README's stage 1 with its classifier weight replaced: crafted/<name>/ckpt.pth.tar."""
    crafted = load_checkpoint(STAGE1)
    crafted['state_dict']['fc.weight'] = weight
    os.makedirs(f'crafted_{name}', exist_ok=True)
    torch.save(crafted, f'crafted_{name}/ckpt.pth.tar')
    return f'crafted_{name}/ckpt.pth.tar'


def test_tau_search_scores_the_given_images(cwd, monkeypatch):
    """--tau_search DIR: every tau of 0, 0.1, ..., 2 scored by the mean per-class accuracy of W_i / ||W_i||^tau
    (no bias) on DIR's images (here 3 test images of each digit, which stage 1 never saw), the best kept."""
    scored = []
    real = train_stage2.predict

    def spy(model, loader, device, **kwargs):
        out = real(model, loader, device, **kwargs)
        scored.append((loader, out))
        return out
    monkeypatch.setattr(train_stage2, 'predict', spy)
    test_set = stage2_sets('tau_norm')[1]
    pick = np.concatenate([np.flatnonzero(np.asarray(test_set.targets) == c)[:3] for c in range(10)])
    write_image_folder('held_out', test_set.data[pick], np.asarray(test_set.targets)[pick])
    # a stage-1 classifier of random rows with very unequal norms, so that tau changes the predictions
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(10, 64, generator=gen) * torch.logspace(1, -1, 10)[:, None]
    path = crafted_stage1('unequal', w)
    assert train_stage2.main(readme_stage2('tau_norm') + ['--stage1', path, '--tau_search', 'held_out']) == 0
    log, ckpt = 'log/crafted_unequal_tau_norm', load_checkpoint('checkpoint/crafted_unequal_tau_norm/ckpt.pth.tar')
    ((loader, (features, labels)),) = scored
    assert labels.tolist() == np.repeat(np.arange(10), 3).tolist()
    assert sorted(bytes(x) for x in loader.images.cpu().numpy()) == sorted(bytes(x) for x in test_set.data[pick])
    accs = {}
    for tau in np.round(np.linspace(0, 2, 21), 2):
        pred = (features @ (w / w.norm(dim=1, keepdim=True) ** tau).T).argmax(1)
        accs[tau] = np.mean([(pred[labels == c] == c).float().mean().item() for c in range(10)])
    assert len(set(accs.values())) > 1
    best = min((t for t in accs if accs[t] == max(accs.values())), key=lambda t: abs(t - 1))  # ties: nearest 1
    text = open(f'{log}/log_train.csv').read()
    assert re.search(rf'tau {best:.2f} chosen on the 30 images of 10 classes in --tau_search held_out', text)
    assert f'tau 0.00: --tau_search mean per-class accuracy {100 * accs[0.0]:.3f}' in text
    torch.testing.assert_close(ckpt['state_dict']['fc.weight'], w / w.norm(dim=1, keepdim=True) ** best)


def test_tau_search_on_images_that_tie_warns_and_keeps_tau_1(cwd, capsys):
    """A search on a fitted split (here stage 1's own training images, and a classifier whose rows all have one
    norm, so that every tau predicts the same): every tau scores the same, the search cannot choose: one
    warning line, tau 1 (the default), not the grid's first (0, which keeps the raw weights)."""
    train_set = stage2_train_set('tau_norm')
    write_image_folder('fitted', train_set.data, train_set.targets)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(10, 64, generator=gen)
    w = 3 * w / w.norm(dim=1, keepdim=True)  # every row of norm 3
    path = crafted_stage1('equal', w)
    capsys.readouterr()
    assert train_stage2.main(readme_stage2('tau_norm') + ['--stage1', path, '--tau_search', 'fitted']) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith('warning: every tau')]
    assert len(warning) == 1 and 'the search cannot choose; using tau 1, the default' in warning[0]
    assert f'on the {len(train_set)} images of 10 classes in --tau_search fitted' in warning[0]
    ckpt = load_checkpoint('checkpoint/crafted_equal_tau_norm/ckpt.pth.tar')
    torch.testing.assert_close(ckpt['state_dict']['fc.weight'], w / 3)
    assert 'the search cannot choose; using tau 1' in open('log/crafted_equal_tau_norm/log_train.csv').read()


def test_tau_search_refusals(cwd, tmp_path):
    """--tau with --tau_search; a missing folder; a class folder the stage-1 classes lack: one line each."""
    argv = readme_stage2('tau_norm')
    with pytest.raises(UserError, match=r'--tau fixes tau and --tau_search searches it: pass one of them'):
        train_stage2.main(argv + ['--tau', '1', '--tau_search', 'held_out'])
    with pytest.raises(UserError, match=r'--tau_search nowhere: no such folder'):
        train_stage2.main(argv + ['--tau_search', 'nowhere'])
    os.makedirs(tmp_path / 'odd' / 'cat')
    with pytest.raises(UserError, match=r'class folder .*cat has no counterpart in the training folder '
                                        r'\(training classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9\)'):
        train_stage2.main(argv + ['--tau_search', str(tmp_path / 'odd')])
    with pytest.raises(UserError, match=r'--tau_search applies to --stage tau_norm only, not cRT'):
        train_stage2.main(readme_stage2('cRT') + ['--tau_search', str(tmp_path / 'odd')])


def test_maxnorm_projects_rows_outside_the_ball_only():
    w = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 2.0]])
    MaxNorm(1.0)(w)
    torch.testing.assert_close(w[0], torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(w[2], torch.tensor([0.0, 1.0]))
    fixtures.assert_same_tensors(w[1], torch.tensor([0.3, 0.4]))  # inside: untouched
    # the authors' radius: min + thresh (max - min) of the row norms (norms 5, 1, 2): 1 + 0.1 * 4
    assert MaxNorm.from_weight(torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0]]), 0.1).radius == pytest.approx(1.4)
    assert MaxNorm.from_weight(torch.tensor([[3.0, 4.0], [0.0, 1.0]]), 0.5).radius == pytest.approx(3.0)


def test_wb_class_balanced_loss_and_maxnorm_after_each_epoch(cwd, monkeypatch):
    """Weight balancing's stage 2 with its defaults (their demo2: 10 epochs, lr 0.01, cosine stepped at epoch
    start, MaxNorm thresh 0.1): no projection between steps (after_step None), every epoch's weights
    projected once after its last step (utils/trainval.py line 142), before it is evaluated."""
    seen = spy_epochs(monkeypatch)
    evaluated = []
    real = trainer.evaluate

    def spy(model, *args, **kwargs):
        evaluated.append(trainer.unwrap(model).fc.weight.detach().clone())
        return real(model, *args, **kwargs)
    monkeypatch.setattr(trainer, 'evaluate', spy)
    ckpt, log = run_stage('WB', '--stage1', STAGE1, '--epochs', '10')
    before, after = stage1(), ckpt['state_dict']
    params = [k for k, _ in build_model('resnet32', 10).named_parameters() if not k.startswith('fc.')]
    fixtures.assert_same_tensors({k: after[k] for k in params}, {k: before[k] for k in params})
    norms = before['fc.weight'].norm(dim=1)
    radius = (norms.min() + 0.1 * (norms.max() - norms.min())).item()
    assert f'MaxNorm radius {radius:.6g} (thresh 0.1 of the stage-1 row norms\' range) after each epoch\'s last step' \
        in open(f'{log}/log_train.csv').read()
    assert len(seen) == len(evaluated) == 10 and all(e['after_step'] is None for e in seen)
    # the lr each epoch trained at: 0.01 (1 + cos(pi e / 10)) / 2, e = 1..10 (the last epoch at 0)
    assert [e['lr'][0] for e in seen] == pytest.approx(
        [0.0097553, 0.0090451, 0.0079389, 0.0065451, 0.005, 0.0034549, 0.0020611, 0.0009549, 0.0002447, 0.0], abs=1e-7)
    for e, w in zip(seen, evaluated):
        end = e['end']['weight']  # after the epoch's last step, before MaxNorm: some rows outside the ball
        projected = torch.where(end.norm(dim=1, keepdim=True) > radius, end * radius / end.norm(dim=1, keepdim=True), end)
        torch.testing.assert_close(w, projected)
    assert seen[0]['end']['weight'].norm(dim=1).max() > radius + 1e-3
    assert evaluated[-1].norm(dim=1).max() <= radius + 1e-5
    torch.testing.assert_close(after['fc.weight'], evaluated[-1])
    # Cui et al.'s weights, as written: (1 - beta) / (1 - beta^n_c), scaled to sum to C
    criterion = seen[0]['criterion']
    assert isinstance(criterion, ClassBalancedSoftmaxBCELoss)
    train_set = stage2_train_set('WB')
    n = np.bincount(train_set.targets, minlength=10).astype(np.float64)
    w = np.where(n > 0, (1 - 0.9999) / (1 - 0.9999 ** n), 0)
    w = w / w.sum() * 10
    torch.testing.assert_close(criterion.weight, torch.tensor(w, dtype=torch.float32))
    # their CB_loss "softmax": BCE of softmax against one-hot, each image's C terms weighted w[y], mean over N x C
    logits, y = torch.randn(6, 10), torch.tensor([0, 1, 2, 3, 9, 9])
    p = logits.softmax(1)
    t = torch.eye(10)[y]
    expected = (torch.tensor(w, dtype=torch.float32)[y][:, None] * -(t * p.log() + (1 - t) * (1 - p).log())).mean()
    torch.testing.assert_close(criterion(logits, y), expected)


def test_wb_maxnorm_per_step_projects_after_every_step(cwd, monkeypatch):
    """--maxnorm_per_step (the paper's "after each batch update"): every step's weights within the radius."""
    norms_after = []
    real = trainer.train_one_epoch

    def spy(model, criterion, loader, optimizer, *args, after_step=None, **kwargs):
        fc = trainer.unwrap(model).fc

        def hook():
            after_step()
            norms_after.append(fc.weight.detach().norm(dim=1).max().item())
        return real(model, criterion, loader, optimizer, *args, after_step=hook, **kwargs)
    monkeypatch.setattr(trainer, 'train_one_epoch', spy)
    _, log = run_stage('WB', '--stage1', STAGE1, '--maxnorm_per_step')
    norms = stage1()['fc.weight'].norm(dim=1)
    radius = (norms.min() + 0.1 * (norms.max() - norms.min())).item()
    steps = -(-len(stage2_train_set('WB')) // 64)
    assert len(norms_after) == 2 * steps and max(norms_after) <= radius + 1e-5
    assert 'after every step (--maxnorm_per_step)' in open(f'{log}/log_train.csv').read()
    with pytest.raises(UserError, match=r'--maxnorm_per_step applies to --stage WB only, not cRT'):
        train_stage2.main(readme_stage2('cRT') + ['--maxnorm_per_step'])


@pytest.mark.parametrize('stage, epochs, lrs', [
    # Kang et al.'s cls_crt.yaml: lr 0.2, coslr to 0, stepped at each epoch's start; 4 epochs here
    ('cRT', 4, [0.1707107, 0.1, 0.0292893, 0.0]),
    # cls_lws.yaml: lr 0.2, 5 epochs (its default)
    ('LWS', None, [0.1809017, 0.1309017, 0.0690983, 0.0190983, 0.0])])
def test_the_lr_each_stage2_epoch_trained_at(cwd, monkeypatch, stage, epochs, lrs):
    args = train_stage2.parse(readme_stage2(stage))[0]
    assert (args.lr, args.weight_decay, args.epochs) == (0.2, 5e-4, {'cRT': 10, 'LWS': 5}[stage])
    seen = spy_epochs(monkeypatch)
    run_stage(stage, '--epochs', str(epochs or args.epochs))  # after SHORT's
    assert [e['lr'] for e in seen] == [pytest.approx([lr], abs=1e-7) for lr in lrs]


@pytest.mark.parametrize('stage', ['cRT', 'LWS', 'WB'])
def test_batchnorm_statistics_update_by_default_and_not_with_freeze_bn(cwd, stage):
    """As Kang et al.'s run_networks.py (model.train() on the frozen feature model, cRT and LWS alike) and
    Alshammari et al.'s trainval.py (model.train()) ran stage 2; --freeze_bn keeps stage 1's statistics."""
    name = f'digits_resnet32_CE_None_exp_0.01_ss_pretrained_{stage}'
    stats = [k for k in stage1() if 'running_' in k or 'num_batches_tracked' in k]
    assert len(stats) == 3 * 31  # bn1 and the 30 of its 15 blocks
    ckpt, log = run_stage(stage, '--epochs', '1', '--stage1', STAGE1)
    before, after = stage1(), ckpt['state_dict']
    changed = [k for k in stats if not torch.equal(after[k], before[k])]
    assert changed == stats  # every running mean, variance and count moved
    n = len(stage2_train_set(stage))
    steps = n // 64 if stage != 'WB' else -(-n // 64)  # class-aware: floor(N / B) steps; WB: every image once
    assert after['bn1.num_batches_tracked'] - before['bn1.num_batches_tracked'] == steps
    fixtures.assert_same_tensors(after['conv1.weight'], before['conv1.weight'])  # parameters still frozen
    assert 'BatchNorm of the frozen features in train mode' in open(f'{log}/log_train.csv').read()
    run_stage(stage, '--epochs', '1', '--stage1', STAGE1, '--freeze_bn', '--exp_str', 'frozen')
    frozen = load_checkpoint(f'checkpoint/{name}_frozen/ckpt.pth.tar')['state_dict']
    fixtures.assert_same_tensors({k: frozen[k] for k in stats}, {k: before[k] for k in stats})
    assert 'running statistics fixed' in open(f'log/{name}_frozen/log_train.csv').read()


def test_ncm_is_the_nearest_class_mean_of_stage1_features(cwd):
    """Kang et al.'s NCM with their defaults (KNNClassifier feat_type 'cl2n', dist_type 'l2'): the training
    features without augmentation, centred on their mean and L2-normalised; centroids their class means;
    logits the negative squared distances. Recomputed here from the stage-1 model."""
    ckpt, log = run_stage('NCM')
    train_set, test_set = stage2_sets('NCM')
    base = build_model('resnet32', 10, return_features=True).eval()
    base.load_state_dict(stage1())

    def features(images):
        mean, std = torch.tensor([0.5] * 3)[:, None, None], torch.tensor([0.5] * 3)[:, None, None]
        x = (torch.tensor(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
        with torch.no_grad():
            return base(x)[1]
    f, y = features(train_set.data), torch.tensor(train_set.targets)
    mu = f.mean(0)
    unit = (f - mu) / (f - mu).norm(dim=1, keepdim=True)
    centroids = torch.stack([unit[y == c].mean(0) for c in range(10)])
    torch.testing.assert_close(ckpt['state_dict']['fc.feat_mean'], mu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ckpt['state_dict']['fc.centroids'], centroids, atol=1e-5, rtol=1e-5)
    g = features(test_set.data)
    g = (g - mu) / (g - mu).norm(dim=1, keepdim=True)
    pred = torch.cdist(g, centroids).argmin(1)
    top1 = 100 * (pred == torch.tensor(test_set.targets)).float().mean().item()
    assert trainer.reports.read_test_log(f'{log}/log_test.csv')[-1]['top1'] == pytest.approx(top1, abs=0.34)  # 1 of 300
    assert '=> NCM: class means of the stage-1 features of' in open(f'{log}/log_train.csv').read()


def test_evaluate_a_stage2_checkpoint_gives_its_top1(cwd, capsys):
    _, log = run_stage('LWS', '--epochs', '1')
    last = trainer.reports.read_test_log(f'{log}/log_test.csv')[-1]['top1']
    capsys.readouterr()
    name = 'digits_resnet32_CE_None_exp_0.01_ss_pretrained_LWS'
    assert train_stage2.main(['--dataset', 'digits', '--imb_factor', '0.01', '--stage', 'LWS', '-j', '0',
                              '--resume', f'checkpoint/{name}/ckpt.pth.tar', '-e']) == 0
    assert f'val Results: Prec@1 {last:.3f}' in capsys.readouterr().out


def test_readme_cifar10_commands(tmp_path, monkeypatch, no_checksum, one_thread, capsys):
    """The documented CIFAR-10-LT commands as written, on a 100-per-class CIFAR-10 fixture (one image of the last
    class after the long-tailed draw: NCM needs one of every class; one epoch, -b 16: the stage defaults' batch of
    512 exceeds it): docs/train.md's CE stage 1 (the README's CE baseline), weight balancing's stage 1 (their
    CIFAR ResNet-34, batch 64, lr 0.01, cosine without warm-up, wd 5e-3), the five stages, then -e of cRT."""
    monkeypatch.chdir(tmp_path)
    fixtures.write_cifar10(tmp_path / 'data', per_class=100, test_per_class=2)
    (ce,) = script_commands('docs/train.md', 'train.py', ['cifar10', 'CE', 'None'])
    (wd,) = script_commands(DOC, 'train.py', ['cifar10', 'wd5e-3'])
    args = train.build_parser().parse_args(wd)
    assert (args.arch, args.batch_size, args.lr, args.lr_schedule, args.weight_decay, args.epochs) == (
        'resnet34_cifar', 64, 0.01, 'cosine_nowarmup', 5e-3, 200)
    # their CosineAnnealingLR(T_max=200) stepped before each epoch: epoch e trains at 0.01 (1 + cos(pi e / 200)) / 2
    assert [trainer.LR_SCHEDULES[args.lr_schedule](e, args) for e in (0, 1, 99, 198, 199)] == pytest.approx(
        [0.0099994, 0.0099975, 0.005, 0.0000006, 0.0], abs=1e-7)
    for argv in (ce, wd):
        assert train.main(argv + ['--epochs', '1', '-b', '16', '-j', '0']) == 0
    commands = script_commands(DOC, 'train_stage2.py', ['cifar10'])
    assert [c[c.index('--stage') + 1] for c in commands] == ['cRT', 'LWS', 'tau_norm', 'NCM', 'WB', 'cRT']
    for argv in commands[:-1]:
        assert train_stage2.main(argv + ['--epochs', '1', '-b', '16']) == 0
    wb = load_checkpoint('checkpoint/cifar10_resnet34_cifar_CE_None_exp_0.01_wd5e-3_cosine_nowarmup_WB/ckpt.pth.tar')
    assert wb['arch'] == 'resnet34_cifar' and wb['state_dict']['fc.weight'].shape == (10, 512)
    capsys.readouterr()
    assert train_stage2.main(commands[-1]) == 0
    log = 'log/cifar10_resnet32_CE_None_exp_0.01_ss_pretrained_cRT/log_test.csv'
    assert f"val Results: Prec@1 {trainer.reports.read_test_log(log)[-1]['top1']:.3f}" in capsys.readouterr().out


def _sigterm_at_first_sync(self, sync=True):
    """GracefulStop.__call__ as if SIGTERM arrived just before the run's first print point."""
    if sync:
        self.signum = signal.SIGTERM
    return sync


def test_resumed_stage2_equals_an_uninterrupted_one(cwd, monkeypatch):
    """A 3-epoch LWS run stopped by SIGTERM at the end of epoch 1 and resumed (--stage1 again, which names the
    run folder): the weights and logs of the uninterrupted run (class-aware sampler, cosine schedule)."""
    whole, log = run_stage('LWS', '--epochs', '3')
    logs = {n: open(f'{log}/{n}').read() for n in ('log_train.csv', 'log_test.csv')}
    with monkeypatch.context() as m:
        m.setattr(trainer.GracefulStop, '__call__', _sigterm_at_first_sync)
        assert train_stage2.main(readme_stage2('LWS') + ['--epochs', '3', '--overwrite']) == 128 + signal.SIGTERM
    name = 'digits_resnet32_CE_None_exp_0.01_ss_pretrained_LWS'
    assert load_checkpoint(f'checkpoint/{name}/ckpt.pth.tar')['epoch'] == 1
    resumed, _ = run_stage('LWS', '--epochs', '3', '--resume', f'checkpoint/{name}/ckpt.pth.tar')
    fixtures.assert_same_tensors(resumed['state_dict'], whole['state_dict'])
    for n, text in logs.items():
        assert open(f'{log}/{n}').read() == text, n


def test_wb_resumed_mid_epoch_equals_an_uninterrupted_one(cwd, monkeypatch):
    """Weight balancing stopped by SIGTERM after step 2 of epoch 1 (-p 2: a print point there) and resumed: the
    rest of the epoch, then its MaxNorm, then the others: the weights and logs of the uninterrupted run (the running
    averages of the stopped epoch's progress lines included)."""
    argv = ['--stage1', STAGE1, '--epochs', '3', '-p', '2']
    whole, log = run_stage('WB', *argv)
    logs = {n: open(f'{log}/{n}').read() for n in ('log_train.csv', 'log_test.csv')}
    with monkeypatch.context() as m:
        m.setattr(trainer.GracefulStop, '__call__', _sigterm_at_first_sync)
        assert train_stage2.main(readme_stage2('WB') + argv + ['--overwrite']) == 128 + signal.SIGTERM
    name = 'digits_resnet32_CE_None_exp_0.01_ss_pretrained_WB'
    stopped = load_checkpoint(f'checkpoint/{name}/ckpt.pth.tar')
    assert (stopped['epoch'], stopped['step']) == (0, 2)
    resumed, _ = run_stage('WB', *argv, '--resume', f'checkpoint/{name}/ckpt.pth.tar')
    fixtures.assert_same_tensors(resumed['state_dict'], whole['state_dict'])
    for n, text in logs.items():
        assert open(f'{log}/{n}').read() == text, n


def test_ncm_refuses_a_class_without_training_images():
    from imagenet_inat.networks import NCMClassifier
    with pytest.raises(UserError, match=r'the nearest-class-mean classifier needs a training image of every class; '
                                        r'class 2 has none'):
        NCMClassifier(4, 3).fit(torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1]))


def test_tau_search_refuses_the_evaluation_split(tmp_path):
    """A folder's val/ is what the test results are measured on: tau is never chosen there."""
    os.makedirs(tmp_path / 'val' / 'a')
    args = train_stage2.parse(['--dataset', 'folder', '--data_path', str(tmp_path), '--stage', 'tau_norm',
                               '--tau_search', str(tmp_path / 'val' / '..' / 'val')])[0]
    with pytest.raises(UserError, match=r'--tau_search .* is the folder the test results are measured on; tau is '
                                        r'never chosen on the test set'):
        train_stage2.held_out_features(None, args, None)
