"""train_stage2.py (cRT, LWS, tau-norm, weight balancing) on a digits subset, with the README's commands:
what each stage keeps, what it changes, and the formulas written out here (Kang et al. 2020; Alshammari et
al. 2022). The bad inputs are in tests/test_bad_input.py's catalogue."""
import os
import re
import signal

import numpy as np
import pytest
import torch
import torch.nn as nn

import engine
import fixtures
import train
import train_stage2
import trainer
from checkpoint import load_checkpoint
from losses import ClassBalancedSoftmaxBCELoss, MaxNorm
from models import build_model
from test_docs_commands import script_commands

STAGE1 = 'checkpoint/digits_resnet32_CE_None_exp_0.01_ss_pretrained/ckpt.pth.tar'
SHORT = ['--epochs', '2']  # argparse takes the last value


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """A folder holding the README's digits stage 1 (one epoch) on 130 images per digit (120 to train)."""
    root = tmp_path_factory.mktemp('stage2')
    with pytest.MonkeyPatch.context() as mp, fixtures.one_thread():
        fixtures.shrink_digits(mp.setattr, per_class=130)
        mp.chdir(root)
        (stage1,) = [c for c in script_commands('README.md', 'train.py', ['digits', '--seed'])
                     if '--exp_str' not in c and '--mixup' not in c]
        assert train.main(stage1 + ['--epochs', '1']) == 0
    return root


@pytest.fixture
def cwd(world, monkeypatch, one_thread):
    fixtures.shrink_digits(monkeypatch.setattr, per_class=130)
    monkeypatch.chdir(world)
    return world


def readme_stage2(stage):
    (argv,) = script_commands('README.md', 'train_stage2.py', ['digits', stage])
    return argv


def stage2_train_set(stage):
    """The training set the README's command of `stage` trains on."""
    args = train_stage2.parse(readme_stage2(stage))[0]
    args.arch = 'resnet32'  # what train_stage2.py takes from the stage-1 checkpoint before the data
    return train.load_data(args)[1]


def run_stage(stage, *extra):
    """The README's command of `stage`; the tests share one folder, so a new run replaces an earlier one's."""
    again = [] if '--resume' in extra else ['--overwrite']
    assert train_stage2.main(readme_stage2(stage) + SHORT + list(extra) + again) == 0
    name = f'digits_resnet32_CE_None_exp_0.01_ss_pretrained_{stage}'
    return load_checkpoint(f'checkpoint/{name}/ckpt.pth.tar'), f'log/{name}'


def stage1():
    return load_checkpoint(STAGE1)['state_dict']


def spy_epochs(monkeypatch):
    """Every call of trainer.train_one_epoch: (classifier weight before its first step, criterion)."""
    seen = []
    real = trainer.train_one_epoch

    def spy(model, criterion, *args, **kwargs):
        bare = trainer.unwrap(model)
        seen.append({k: v.detach().clone() for k, v in bare.fc.state_dict().items()} | {'criterion': criterion})
        return real(model, criterion, *args, **kwargs)
    monkeypatch.setattr(trainer, 'train_one_epoch', spy)
    return seen


def test_crt_freezes_features_and_reinitialises_the_classifier(cwd, monkeypatch):
    seen = spy_epochs(monkeypatch)
    ckpt, _ = run_stage('cRT')
    before, after = stage1(), ckpt['state_dict']
    assert set(before) == set(after)
    features = [k for k in before if not k.startswith('fc.')]
    assert any('running_mean' in k for k in features) and any('num_batches_tracked' in k for k in features)
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
    # the whole network: stage 1's features, then (W f + b) * s
    images = torch.randn(4, 3, 32, 32)
    base = build_model('resnet32', 10, return_features=True).eval()
    base.load_state_dict(before)
    _, f = base(images)
    torch.testing.assert_close(model.eval()(images), (f @ w.T + b) * s)


@pytest.mark.parametrize('tau', ['0.5', '1.0'])
def test_tau_norm_given_tau_divides_rows(cwd, tau):
    ckpt, log = run_stage('tau_norm', '--tau', tau)
    w = stage1()['fc.weight']
    expected = torch.stack([row / row.norm() ** float(tau) for row in w])
    torch.testing.assert_close(ckpt['state_dict']['fc.weight'], expected)
    assert torch.count_nonzero(ckpt['state_dict']['fc.bias']) == 0  # Kang et al.'s: no bias
    if tau == '1.0':
        torch.testing.assert_close(ckpt['state_dict']['fc.weight'].norm(dim=1), torch.ones(10))
    assert f'tau {float(tau):g} given by --tau' in open(f'{log}/log_train.csv').read()
    assert len(trainer.read_test_log(f'{log}/log_test.csv')) == 1


def test_tau_norm_chooses_tau_on_training_images(cwd, monkeypatch):
    scored = []
    real = train_stage2.predict

    def spy(model, loader, device, **kwargs):
        out = real(model, loader, device, **kwargs)
        scored.append((loader, out))
        return out
    monkeypatch.setattr(train_stage2, 'predict', spy)
    # a stage-1 classifier of random rows with very unequal norms, so that tau changes the predictions
    crafted = load_checkpoint(STAGE1)
    gen = torch.Generator().manual_seed(0)
    crafted['state_dict']['fc.weight'] = torch.randn(10, 64, generator=gen) * torch.logspace(1, -1, 10)[:, None]
    os.makedirs('crafted', exist_ok=True)
    torch.save(crafted, 'crafted/ckpt.pth.tar')
    assert train_stage2.main(readme_stage2('tau_norm') + SHORT + ['--stage1', 'crafted/ckpt.pth.tar']) == 0
    # the run is named after the folder holding --stage1
    log, ckpt = 'log/crafted_tau_norm', load_checkpoint('checkpoint/crafted_tau_norm/ckpt.pth.tar')
    ((loader, (features, labels)),) = scored
    train_set = stage2_train_set('tau_norm')
    counts = np.bincount(train_set.targets, minlength=10)
    assert np.bincount(labels.numpy(), minlength=10).tolist() == np.minimum(counts, 20).tolist()
    # every scored image is a training image (none from the test set)
    train_rows = {bytes(img) for img in train_set.data}
    assert all(bytes(img) in train_rows for img in loader.images.cpu().numpy())
    # the chosen tau: best mean per-class accuracy of W_i / ||W_i||^tau (no bias) on those images
    w = crafted['state_dict']['fc.weight']
    accs = {}
    for tau in np.round(np.linspace(0, 2, 21), 2):
        pred = (features @ (w / w.norm(dim=1, keepdim=True) ** tau).T).argmax(1)
        accs[tau] = np.mean([(pred[labels == c] == c).float().mean().item() for c in range(10)])
    best = max(accs, key=accs.get)  # the first of equal ones
    assert len(set(accs.values())) > 1
    text = open(f'{log}/log_train.csv').read()
    assert re.search(rf'tau {best:.2f} chosen on the validation split carved from the training set', text)
    torch.testing.assert_close(ckpt['state_dict']['fc.weight'], w / w.norm(dim=1, keepdim=True) ** best)


def test_maxnorm_projects_rows_outside_the_ball_only():
    w = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 2.0]])
    MaxNorm(1.0)(w)
    torch.testing.assert_close(w[0], torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(w[2], torch.tensor([0.0, 1.0]))
    fixtures.assert_same_tensors(w[1], torch.tensor([0.3, 0.4]))  # inside: untouched
    # the authors' radius: min + thresh (max - min) of the row norms
    assert MaxNorm.from_weight(torch.tensor([[3.0, 4.0], [0.0, 1.0]]), 0.1).radius == pytest.approx(1 + 0.1 * 4)


def test_maxnorm_holds_after_every_step():
    """engine.train_one_epoch's after_step runs after the optimizer step: every row within the bound."""
    torch.manual_seed(0)
    fc = nn.Linear(8, 4)
    maxnorm = MaxNorm(0.05)
    norms = []

    def after():
        maxnorm(fc.weight)
        norms.append(fc.weight.norm(dim=1).max().item())
    batches = [(torch.randn(16, 8), torch.randint(0, 4, (16,))) for _ in range(5)]
    engine.train_one_epoch(fc, nn.CrossEntropyLoss(), batches, torch.optim.SGD(fc.parameters(), lr=5.0),
                           torch.device('cpu'), 0, log=lambda *a, **k: None, after_step=after)
    assert len(norms) == 5 and max(norms) <= 0.05 + 1e-6
    assert fc.weight.norm(dim=1).max().item() <= 0.05 + 1e-6


def test_wb_class_balanced_loss_and_maxnorm(cwd, monkeypatch):
    seen = spy_epochs(monkeypatch)
    ckpt, _ = run_stage('WB', '--stage1', STAGE1)  # the README's WB stage 1 has --wd 5e-3
    before, after = stage1(), ckpt['state_dict']
    fixtures.assert_same_tensors({k: v for k, v in after.items() if not k.startswith('fc.')},
                                 {k: v for k, v in before.items() if not k.startswith('fc.')})
    # radius from stage 1's row norms; every row within it after the run
    norms = before['fc.weight'].norm(dim=1)
    radius = norms.min() + 0.1 * (norms.max() - norms.min())
    assert after['fc.weight'].norm(dim=1).max() <= radius + 1e-5
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


def test_evaluate_a_stage2_checkpoint_gives_its_top1(cwd, capsys):
    _, log = run_stage('LWS', '--epochs', '1')
    last = trainer.read_test_log(f'{log}/log_test.csv')[-1]['top1']
    capsys.readouterr()
    name = 'digits_resnet32_CE_None_exp_0.01_ss_pretrained_LWS'
    assert train_stage2.main(['--dataset', 'digits', '--imb_factor', '0.01', '--stage', 'LWS', '-j', '0',
                              '--resume', f'checkpoint/{name}/ckpt.pth.tar', '-e']) == 0
    assert f'val Results: Prec@1 {last:.3f}' in capsys.readouterr().out


def test_readme_cifar10_commands(tmp_path, monkeypatch, no_checksum, one_thread, capsys):
    """The README's CIFAR-10-LT commands as written, on a 40-per-class CIFAR-10 fixture (one epoch, -b 16:
    the stage defaults' batch of 512 exceeds it): the CE stage 1 of the train.py section, the WB stage 1,
    the four stages, then -e of the cRT checkpoint."""
    monkeypatch.chdir(tmp_path)
    fixtures.write_cifar10(tmp_path / 'data', per_class=40, test_per_class=2)
    (ce,) = script_commands('README.md', 'train.py', ['cifar10', 'CE', 'None'])
    (wd,) = script_commands('README.md', 'train.py', ['cifar10', 'wd5e-3'])
    for argv in (ce, wd):
        assert train.main(argv + ['--epochs', '1', '-b', '16', '-j', '0']) == 0
    commands = script_commands('README.md', 'train_stage2.py', ['cifar10'])
    assert [c[c.index('--stage') + 1] for c in commands] == ['cRT', 'LWS', 'tau_norm', 'WB', 'cRT']
    for argv in commands[:-1]:
        assert train_stage2.main(argv + ['--epochs', '1', '-b', '16']) == 0
    capsys.readouterr()
    assert train_stage2.main(commands[-1]) == 0
    log = 'log/cifar10_resnet32_CE_None_exp_0.01_ss_pretrained_cRT/log_test.csv'
    assert f"val Results: Prec@1 {trainer.read_test_log(log)[-1]['top1']:.3f}" in capsys.readouterr().out


def test_train_bn_lets_the_statistics_update(cwd):
    ckpt, log = run_stage('cRT', '--epochs', '1', '--train_bn')
    before, after = stage1(), ckpt['state_dict']
    assert not torch.equal(after['bn1.running_mean'], before['bn1.running_mean'])
    fixtures.assert_same_tensors(after['conv1.weight'], before['conv1.weight'])  # parameters still frozen
    assert 'BatchNorm of the frozen features in train mode' in open(f'{log}/log_train.csv').read()


def test_resumed_stage2_equals_an_uninterrupted_one(cwd, monkeypatch):
    """A 3-epoch LWS run stopped by SIGTERM at the end of epoch 1 and resumed (--stage1 again, which names the
    run folder): the weights and logs of the uninterrupted run (class-aware sampler, cosine schedule)."""
    whole, log = run_stage('LWS', '--epochs', '3')
    logs = {n: open(f'{log}/{n}').read() for n in ('log_train.csv', 'log_test.csv')}

    def sigterm_at_first_sync(self, sync=True):
        if sync:
            self.signum = signal.SIGTERM
        return sync
    with monkeypatch.context() as m:
        m.setattr(trainer.GracefulStop, '__call__', sigterm_at_first_sync)
        assert train_stage2.main(readme_stage2('LWS') + ['--epochs', '3', '--overwrite']) == 128 + signal.SIGTERM
    name = 'digits_resnet32_CE_None_exp_0.01_ss_pretrained_LWS'
    assert load_checkpoint(f'checkpoint/{name}/ckpt.pth.tar')['epoch'] == 1
    resumed, _ = run_stage('LWS', '--epochs', '3', '--resume', f'checkpoint/{name}/ckpt.pth.tar')
    fixtures.assert_same_tensors(resumed['state_dict'], whole['state_dict'])
    for n, text in logs.items():
        assert open(f'{log}/{n}').read() == text, n
