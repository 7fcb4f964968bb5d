"""The maths of train_ssl.py's steps against values worked out by hand: FixMatch's masked loss on fixed logits,
ABC's masks and loss, DARP's refinement on a problem solved in closed form, its secant method against scipy's,
the weight average, the per-step lr and the optimizer groups, the presets."""
import math
import types

import numpy as np
import pytest
import scipy.optimize
import torch

from ltssl import check_combination
from ltssl.abc_head import ABC, keep_probabilities, unlabeled_keep
from ltssl.darp import DARP, opt_solver, refine, secant, selection_sizes
from ltssl.ema import EMA
from ltssl.fixmatch import FixMatchStep, SupervisedStep
from ltssl.method import SSLMethod
from ltssl.net import SSLNet
from errors import UserError
import train_ssl


def _batch(y_lb, n_u, epoch=0, step=0, seed=0, idx=None):
    return types.SimpleNamespace(x_lb=torch.zeros(len(y_lb), 1), y_lb=torch.tensor(y_lb), x_ulb_w=torch.zeros(n_u, 1),
                                 x_ulb_s=torch.zeros(n_u, 1), idx_ulb=torch.arange(n_u) if idx is None else idx,
                                 epoch=epoch, step=step, seed=seed)


def _fixed(**outputs):
    """A stand-in network: whatever it is given, these outputs (labeled rows, then weak, then strong)."""
    tensors = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in outputs.items()}
    return (lambda x: tensors), tensors


# labeled logits and labels; unlabeled weak and strong logits (3 classes)
LB, Y = [[2., 0., 0.], [0., 1., 0.]], [0, 2]
WEAK = [[10., 0., 0.], [0., 0., 0.], [0., 10., 0.], [0., 0., 1.]]
STRONG = [[0., 0., 0.], [5., 5., 5.], [1., 2., 3.], [9., 9., 9.]]
# CE of the labeled rows: log(1 + 2 e^-2) and log(e + 2)
SUP = (math.log(1 + 2 * math.exp(-2)) + math.log(math.e + 2)) / 2
# weak rows 0 and 2 are confident (1 / (1 + 2 e^-10) >= 0.95) with labels 0 and 1; rows 1 and 3 are not
# (1/3, e / (e + 2))
# strong row 0 against class 0: log 3; strong row 2 against class 1: log(e^-1 + 1 + e); the mean is over all 4 rows
UNSUP = (math.log(3) + math.log(math.exp(-1) + 1 + math.e)) / 4


def test_fixmatch_loss_on_hand_made_logits():
    run, out = _fixed(logits=LB + WEAK + STRONG)
    loss, logits, targets = FixMatchStep(0.95, 2.0)(run, _batch(Y, 4), 0, 0)
    assert loss.item() == pytest.approx(SUP + 2.0 * UNSUP, rel=1e-6)
    assert torch.equal(logits, out['logits'][:2].detach()) and targets.tolist() == Y
    loss.backward()
    # the weak view gets no gradient (its probabilities are detached), the strong rows of masked-out images none either
    grad = out['logits'].grad
    assert torch.all(grad[2:6] == 0) and torch.all(grad[7] == 0) and torch.all(grad[9] == 0)
    assert grad[6].abs().sum() > 0 and grad[8].abs().sum() > 0


def test_threshold_is_inclusive_and_observed():
    """Two classes, equal logits: the top probability is exactly 0.5, which a threshold of 0.5 keeps."""
    seen = []
    run, _ = _fixed(logits=[[0., 0.]] + [[0., 0.]] + [[3., 1.]])
    step = FixMatchStep(0.5, 1.0, observe=lambda raw, used, mask, batch: seen.append(mask))
    loss, _, _ = step(run, _batch([0], 1), 0, 0)
    assert seen[0].tolist() == [1.0]
    # pseudo-label argmax of (0.5, 0.5) is class 0: CE([3, 1], 0) = log(1 + e^-2)
    assert loss.item() == pytest.approx(math.log(2) + math.log(1 + math.exp(-2)), rel=1e-6)


def test_supervised_step_is_labeled_cross_entropy():
    run, _ = _fixed(logits=LB)
    loss, _, _ = SupervisedStep()(run, _batch(Y, 0), 0, 0)
    assert loss.item() == pytest.approx(SUP, rel=1e-6)


# ---------------------------------------------------------------- ABC

def test_abc_keep_probabilities_and_their_schedule():
    """p_c = min N / N_c; the unlabeled parameter 1 - (e / E)(1 - p_c): 1 at the start, p_c at the end."""
    p = keep_probabilities([40, 20, 10, 4])
    assert p.tolist() == [0.1, 0.2, 0.4, 1.0]
    assert unlabeled_keep(p, 0, 10).tolist() == [1.0, 1.0, 1.0, 1.0]
    assert unlabeled_keep(p, 5, 10).tolist() == pytest.approx([0.55, 0.6, 0.7, 1.0])
    assert unlabeled_keep(p, 10, 10).tolist() == pytest.approx([0.1, 0.2, 0.4, 1.0])


def test_abc_masks_are_bernoulli_at_their_rates():
    """20,000 labeled images of class 0 (p = 0.1) and 20,000 confident unlabeled ones predicted 0 at e = 5 of 10
    (p = 0.55): the kept shares within 1 % of the rates; each masked image adds its CE to the mean."""
    abc = ABC([40, 20, 10, 4], epochs=10)
    n = 20_000
    logits_lb = torch.zeros(n, 4)  # CE = log 4 for every image
    weak = torch.tensor([[20., 0., 0., 0.]]).repeat(n, 1)
    strong = torch.zeros(n, 4)
    loss = abc.extra_loss({'abc': (logits_lb, weak, strong)}, _batch([0] * n, n, epoch=5, seed=1), n, 5)
    share = loss.item() / math.log(4)  # (kept labeled + kept unlabeled) / n
    assert share == pytest.approx(0.1 + 0.55, abs=0.02)
    lb_only = abc.extra_loss({'abc': (logits_lb, torch.zeros(n, 4), strong)}, _batch([0] * n, n, epoch=5, seed=1), n, 5)
    assert lb_only.item() / math.log(4) == pytest.approx(0.1, abs=0.01)  # no unlabeled image is confident
    again = abc.extra_loss({'abc': (logits_lb, weak, strong)}, _batch([0] * n, n, epoch=5, seed=1), n, 5)
    assert again.item() == loss.item()  # the masks are a function of the step's seed


def test_abc_loss_on_hand_made_logits_with_every_image_kept():
    """Balanced labeled counts and epoch 0: every Bernoulli parameter is 1. Labeled CE as SUP; the ABC head's own
    pseudo-labels: weak rows 0 and 2 confident (classes 0, 1), as UNSUP; weight 0.5."""
    abc = ABC([5, 5, 5], epochs=4, weight=0.5)
    assert abc.heads(8, 3)['abc'].out_features == 3 and abc.eval_head == 'abc'
    out = {'abc': (torch.tensor(LB), torch.tensor(WEAK), torch.tensor(STRONG))}
    assert abc.extra_loss(out, _batch(Y, 4), 2, 0).item() == pytest.approx(0.5 * (SUP + UNSUP), rel=1e-6)


# ---------------------------------------------------------------- DARP

def test_darp_solver_on_a_problem_solved_by_hand():
    """Rows (0.8, 0.2) and (0.2, 0.8) have the same entropy, so the solver's X_ik = A_ik / e x_i exp(-nu_k H_i) is a
    scaling diag(x) A diag(y): the cross ratio (p / (1 - p)) / (q / (1 - q)) stays 16. With column totals
    (1.2, 0.8): p + q = 1.2, so 15 p^2 - 35 p + 19.2 = 0 and p = (35 - sqrt 73) / 30."""
    p = (35 - math.sqrt(73)) / 30
    refined = opt_solver(torch.tensor([[0.8, 0.2], [0.2, 0.8]], dtype=torch.float64),
                         torch.tensor([1.2, 0.8], dtype=torch.float64), num_iter=60, tol=1e-12)
    assert refined.tolist() == [pytest.approx([p, 1 - p], abs=1e-9), pytest.approx([1.2 - p, p - 0.2], abs=1e-9)]


def test_darp_refinement_on_a_synthetic_problem():
    """N = 200, C = 5 with the default tolerance: rows sum to 1, the column totals reach the target within what
    the secant tolerance on nu leaves, and the refined labels move towards the target."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(200, 5, generator=g) * 2 + torch.tensor([2., 1., 0., 0., 0.]), dim=1)
    target = torch.tensor([60., 50., 40., 30., 20.], dtype=torch.float64)
    refined = refine(probs, target, selection_sizes(target, 2.0), 10, 0.1).double()
    assert torch.allclose(refined.sum(dim=1), torch.ones(200, dtype=torch.float64), atol=1e-6)
    assert (refined.sum(dim=0) - target).abs().max() < 2.0
    before = np.bincount(probs.argmax(1).numpy(), minlength=5)
    after = np.bincount(refined.argmax(1).numpy(), minlength=5)
    assert np.abs(after - target.numpy()).sum() < np.abs(before - target.numpy()).sum()


def test_secant_is_scipys_step_for_step():
    def f(x, a):
        return np.exp(-x) * a - 0.3

    starts, params = [0.0, 2.0, -1.5, 0.7], [1.0, 2.5, 0.4, 7.0]
    for tol in (0.1, 1e-6):
        ours = secant(lambda v: torch.exp(-v) * torch.tensor(params, dtype=torch.float64) - 0.3,
                      torch.tensor(starts, dtype=torch.float64), tol)
        theirs = [scipy.optimize.newton(f, x0, args=(a,), tol=tol, maxiter=30) for x0, a in zip(starts, params)]
        assert ours.tolist() == pytest.approx(theirs, rel=1e-12, abs=1e-12)


def test_darp_warm_up_and_period(monkeypatch):
    """Refines first at the start step, then every `every` steps, reading the stored rows in between; stores every
    step's weak probabilities, also during warm-up; masks on the raw or refined probabilities as asked."""
    solves = []
    darp = DARP(6, 3, [2., 2., 2.], start_step=4, every=3)
    monkeypatch.setattr('ltssl.darp.refine', lambda *a: solves.append(a) or torch.eye(3).repeat(2, 1))
    for t in range(12):
        probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
        label, mask = darp.pseudo_probs(probs, _batch([], 2, step=t, idx=torch.tensor([t % 6, (t + 1) % 6])))
        if t < 4:
            assert label is probs
        else:
            assert torch.equal(label, torch.eye(3).repeat(2, 1)[[t % 6, (t + 1) % 6]]) and mask is probs
    assert len(solves) == 3  # steps 4, 7, 10
    assert torch.equal(darp.pseudo_orig[5], torch.tensor([0.6, 0.3, 0.1]))  # written at step 11
    refined_mask = DARP(6, 3, [2., 2., 2.], start_step=0, mask_refined=True)
    label, mask = refined_mask.pseudo_probs(torch.full((2, 3), 1 / 3), _batch([], 2))
    assert mask is label


# ---------------------------------------------------------------- the weight average, recipe, presets

def test_ema_styles():
    net = torch.nn.BatchNorm1d(2)
    ema = EMA(net, 0.9)
    with torch.no_grad():
        net.weight.fill_(2.0)
        net.running_mean.fill_(5.0)
    ema.update(net)  # 0.9 * 1 + 0.1 * 2; buffers copied
    assert ema.module.weight.tolist() == pytest.approx([1.1, 1.1]) and ema.module.running_mean.tolist() == [5.0, 5.0]
    daso = EMA(torch.nn.BatchNorm1d(2), 0.9, 'daso')
    daso.update(net)  # t = 0: decay min(0, 0.9): a copy
    assert daso.module.weight.tolist() == [2.0, 2.0]
    with torch.no_grad():
        net.running_mean.fill_(1.0)
    daso.update(net)  # t = 1: decay 0.5, buffers averaged too
    assert daso.module.running_mean.tolist() == [3.0, 3.0] and daso.module.num_batches_tracked == 0


def test_lr_schedule_and_optimizer_groups():
    from models import build_model
    net = SSLNet(build_model('resnet20', 10), {'abc': torch.nn.Linear(64, 10)})
    recipe = dict(lr=0.03, momentum=0.9, weight_decay=5e-4, nesterov=True, wd_bn_bias=False, lr_schedule='cosine',
                  total_steps=1000)
    method = SSLMethod(net, None, (), EMA(net, 0.999), None, 'fixmatch+none', recipe)
    assert method.step_lr(0) == 0.03 and method.step_lr(1000) == pytest.approx(0.03 * math.cos(7 * math.pi / 16))
    assert method.step_lr(500) == pytest.approx(0.03 * math.cos(7 * math.pi / 32))
    opt = method.optimizer(net)
    decayed, free = opt.param_groups
    names = {id(p): n for n, p in net.named_parameters()}
    assert all('bn' not in names[id(p)] and 'bias' not in names[id(p)] for p in decayed['params'])
    assert {names[id(p)] for p in free['params']} >= {'module.bn1.weight', 'module.fc.bias', 'heads.abc.bias'}
    assert free['weight_decay'] == 0 and decayed['weight_decay'] == 5e-4 and opt.defaults['nesterov']
    constant = SSLMethod(net, None, (), EMA(net, 0.999), None, 'x', {**recipe, 'lr_schedule': 'constant',
                                                                        'wd_bn_bias': True})
    assert constant.step_lr(999) == 0.03 and len(constant.optimizer(net).param_groups) == 1


def test_presets_fill_what_is_not_given_and_split_usbs_recipes():
    args = train_ssl.build_parser().parse_args(['--protocol', 'usb'])
    lines = args.preset_notes
    assert (args.epochs, args.eval_step, args.batch_size, args.mu, args.lr) == (256, 1024, 64, 2, 0.03)
    assert (args.lr_schedule, args.wd_bn_bias, args.ema_style, args.metric) == ('cosine', False, 'copy', 'best')
    assert args.imb_factor_unlabel == 0.01 and 'protocol usb' in lines[0]
    args = train_ssl.build_parser().parse_args(['--protocol', 'usb', '--imb_alg', 'abc', '-b', '16'])
    assert (args.lr_schedule, args.wd_bn_bias, args.batch_size) == ('constant', True, 16)
    args = train_ssl.build_parser().parse_args(['--protocol', 'daso', '--imb_alg', 'darp',
                                                '--lr_schedule', 'cosine'])
    lines = args.preset_notes
    assert (args.epochs, args.eval_step, args.darp_warmup, args.darp_mask, args.ema_style) == (500, 500, 0.4, 'refined',
                                                                                               'daso')
    assert args.lr_schedule == 'cosine' and 'lr_schedule cosine' in lines[1]
    assert args.store_name == 'cifar10_wrn28_2_fixmatch_darp_N1500_M3000_0.01_0.01_daso_ssl'


def test_unpublished_combinations_are_refused():
    for imb in ('none', 'abc', 'darp'):
        check_combination('fixmatch', imb)
    check_combination('supervised', 'none')
    for imb in ('abc', 'darp'):
        with pytest.raises(UserError, match=f'--ssl_alg supervised --imb_alg {imb} was never published'):
            check_combination('supervised', imb)


def test_darp_targets(tmp_path):
    """labeled: the labeled distribution scaled to the unlabeled images (USB); configured: the unlabeled counts (DASO,
    consistent settings); a file: a saved estimate (DASO's darp_estim/*.npyz hold a 10-vector), scaled likewise."""
    from dataset.ltssl_split import Split
    from ltssl.experiment import darp_target
    split = Split(None, None, [30, 10], [40, 20])
    args = types.SimpleNamespace(darp_target='labeled', unlabel_order='same')
    assert darp_target(args, split).tolist() == [45.0, 15.0]
    args.darp_target = 'configured'
    assert darp_target(args, split).tolist() == [40.0, 20.0]
    np.save(tmp_path / 'estimate.npy', np.array([1.0, 3.0]))
    args.darp_target = str(tmp_path / 'estimate.npy')
    assert darp_target(args, split).tolist() == [15.0, 45.0]
    np.save(tmp_path / 'bad.npy', np.array([1.0, 2.0, 3.0]))
    args.darp_target = str(tmp_path / 'bad.npy')
    with pytest.raises(UserError, match='expected 2 non-negative class weights'):
        darp_target(args, split)
    args.darp_target, args.unlabel_order = 'labeled', 'reversed'
    with pytest.raises(UserError, match='reversed turns around'):
        darp_target(args, split)


def test_darp_stores_every_ranks_rows(monkeypatch):
    """Under torchrun each rank gathers the others' weak probabilities and indices before writing its stored
    rows, so every rank refines the same matrix (USB's hook stores its own rank's rows only)."""
    other_idx, other_rows = torch.tensor([4, 5]), torch.tensor([[0.1, 0.1, 0.8], [0.3, 0.4, 0.3]])
    monkeypatch.setattr('dist.all_gather_cat', lambda t: torch.cat([t, other_idx if t.dtype == torch.int64
                                                                     else other_rows]))
    darp = DARP(6, 3, [2., 2., 2.], start_step=100)
    mine = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    darp.pseudo_probs(mine, _batch([], 2, idx=torch.tensor([0, 1])))
    assert torch.equal(darp.pseudo_orig[[0, 1]], mine) and torch.equal(darp.pseudo_orig[[4, 5]], other_rows)
    assert torch.equal(darp.pseudo_orig[[2, 3]], torch.full((2, 3), 1 / 3))
