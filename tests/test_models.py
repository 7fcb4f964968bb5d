"""Model zoo: parameter counts, checkpoint-compatible names, output shapes, registry errors."""
import pickle

import pytest
import torch
import torch.nn as nn
import torchvision

from errors import UserError
from models import MODELS, NormedLinear, build_model, resnet32, resnet50, resnet1202
from models.layout import global_avg_pool

BN_KEYS = ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']


def original_cifar_keys(blocks_per_stage, use_norm=False):
    """state_dict keys of LDAM-DRW / imbalanced-semi-self's ResNet_s, in their order."""
    keys = ['conv1.weight'] + [f'bn1.{k}' for k in BN_KEYS]
    for stage in (1, 2, 3):
        for i in range(blocks_per_stage):
            prefix = f'layer{stage}.{i}'
            keys += [f'{prefix}.conv1.weight'] + [f'{prefix}.bn1.{k}' for k in BN_KEYS]
            keys += [f'{prefix}.conv2.weight'] + [f'{prefix}.bn2.{k}' for k in BN_KEYS]
    keys += ['fc.weight'] if use_norm else ['fc.weight', 'fc.bias']
    return keys


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_resnet32_parameter_count_matches_paper():
    assert n_params(resnet32(num_classes=10)) == 464_154


def test_resnet1202_builds_with_about_19_4m_params():
    # He et al. report 19.4M; its forward pass is too slow for a unit test.
    assert round(n_params(resnet1202(num_classes=10)) / 1e6, 1) == 19.4


@pytest.mark.parametrize('use_norm', [False, True])
def test_resnet32_state_dict_keys_match_original_in_order(use_norm):
    model = resnet32(num_classes=10, use_norm=use_norm)
    assert list(model.state_dict()) == original_cifar_keys(5, use_norm)


def original_cifar_checkpoint(blocks_per_stage, num_classes):
    """A random checkpoint built by hand from the original layout (names *and* shapes)."""
    def conv(cin, cout):
        return torch.randn(cout, cin, 3, 3)

    def bn(prefix, c):
        return {f'{prefix}.weight': torch.rand(c), f'{prefix}.bias': torch.randn(c),
                f'{prefix}.running_mean': torch.randn(c), f'{prefix}.running_var': torch.rand(c) + 0.5,
                f'{prefix}.num_batches_tracked': torch.tensor(123)}

    state = {'conv1.weight': conv(3, 16), **bn('bn1', 16)}
    in_planes = 16
    for stage, planes in zip((1, 2, 3), (16, 32, 64)):
        for i in range(blocks_per_stage):
            prefix = f'layer{stage}.{i}'
            state[f'{prefix}.conv1.weight'] = conv(in_planes, planes)
            state.update(bn(f'{prefix}.bn1', planes))
            state[f'{prefix}.conv2.weight'] = conv(planes, planes)
            state.update(bn(f'{prefix}.bn2', planes))
            in_planes = planes
    state['fc.weight'] = torch.randn(num_classes, 64)
    state['fc.bias'] = torch.randn(num_classes)
    return state


def test_checkpoint_with_original_layout_loads_strict():
    checkpoint = original_cifar_checkpoint(5, num_classes=100)
    assert list(checkpoint) == original_cifar_keys(5)
    model = resnet32(num_classes=100)
    model.load_state_dict(checkpoint, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, checkpoint[k]), k


@pytest.mark.parametrize('use_norm', [False, True])
def test_cifar_output_shapes(use_norm):
    x = torch.randn(4, 3, 32, 32)
    logits = resnet32(num_classes=7, use_norm=use_norm)(x)
    assert logits.shape == (4, 7)

    logits, features = resnet32(num_classes=7, use_norm=use_norm, return_features=True)(x)
    assert logits.shape == (4, 7) and features.shape == (4, 64)
    if use_norm:
        assert logits.abs().max() <= 1 + 1e-5


def test_features_feed_the_head():
    model = resnet32(num_classes=5, return_features=True).eval()
    logits, features = model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(logits, model.fc(features))


def test_normed_linear_shape_and_cosine_range():
    head = NormedLinear(64, 10)
    assert head.weight.shape == (64, 10)
    assert (head.in_features, head.out_features) == (64, 10)
    out = head(torch.randn(8, 64) * 100)
    assert out.shape == (8, 10)
    assert out.abs().max() <= 1 + 1e-5
    # Identical direction -> cosine exactly 1.
    torch.testing.assert_close(head(head.weight[:, 3:4].T * 7)[0, 3], torch.tensor(1.0))


@pytest.mark.parametrize('arch,blocks', [
    ('resnet20', 3), ('resnet32', 5), ('resnet44', 7), ('resnet56', 9), ('resnet110', 18),
])
def test_all_cifar_depths_build_and_run(arch, blocks):
    model = build_model(arch, num_classes=10)
    assert list(model.state_dict()) == original_cifar_keys(blocks)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_model_pickles():
    # The option-A shortcut is a module, not a lambda, so the whole model pickles (DDP, workers).
    model = resnet32(num_classes=10)
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), clone.eval()(x))


def test_option_a_shortcut_has_no_parameters():
    block = resnet32().layer2[0]
    assert list(block.shortcut.parameters()) == []
    assert block.shortcut(torch.randn(1, 16, 32, 32)).shape == (1, 32, 16, 16)


def test_resnet50_keys_equal_torchvision():
    ours = resnet50(num_classes=1000).state_dict()
    theirs = torchvision.models.resnet50().state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_resnet50_loads_torchvision_weights_and_matches():
    reference = torchvision.models.resnet50().eval()
    model = resnet50(num_classes=1000).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


@pytest.mark.parametrize('use_norm', [False, True])
def test_resnet50_heads_and_features(use_norm):
    model = resnet50(num_classes=12, use_norm=use_norm, return_features=True).eval()
    assert model.fc.in_features == 2048
    assert isinstance(model.fc, NormedLinear if use_norm else nn.Linear)
    with torch.no_grad():
        logits, features = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 12) and features.shape == (2, 2048)


def test_every_model_exposes_replaceable_fc():
    for arch in ('resnet32', 'resnet18'):
        model = build_model(arch, num_classes=10)
        model.fc = nn.Linear(model.fc.in_features, 4)  # e.g. the rotation-prediction head
        x = torch.randn(2, 3, 32, 32)
        assert model(x).shape == (2, 4)


def test_registry_covers_cifar_and_imagenet_models():
    assert {'resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110', 'resnet1202',
            'resnet50'} <= set(MODELS)


def test_unknown_arch_raises_user_error_listing_choices():
    with pytest.raises(UserError, match="unknown architecture 'resnet33'") as info:
        build_model('resnet33', num_classes=10)
    for name in MODELS:
        assert name in str(info.value)


def _out_of_place_resnet20(model, x):
    """He et al.'s CIFAR ResNet forward written out with new tensors everywhere (no in-place op) and autograd's
    own backward: the shortcut as the original's lambda, the pooling as a plain global mean."""
    F = nn.functional
    out = F.relu(model.bn1(model.conv1(x)))
    for stage in (model.layer1, model.layer2, model.layer3):
        for block in stage:
            y = F.relu(block.bn1(block.conv1(out)))
            if isinstance(block.shortcut, nn.Identity):
                shortcut = out
            else:
                planes = block.conv1.out_channels
                shortcut = F.pad(out[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0)
            out = F.relu(block.bn2(block.conv2(y)) + shortcut)
    return model.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@pytest.mark.parametrize('amp,channels_last,side', [(False, True, 32), (True, True, 32), (True, False, 32),
                                                    (False, True, 28), (True, True, 28)])
def test_in_place_forward_equals_the_out_of_place_one_in_training_and_evaluation(amp, channels_last, side):
    """The CIFAR ResNets' in-place ReLU and residual add, and the shortcut's and pooling's own backward (which
    keeps channels_last): the same logits and gradients, bit for bit; side 28 pools 7 x 7 pixels, whose mean's
    gradient is not a division by a power of two."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(6, 3, side, side).contiguous(memory_format=fmt)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    model = build_model('resnet20', 10).to(memory_format=fmt)
    grads = []
    for forward in (model, lambda images: _out_of_place_resnet20(model, images)):
        model.train()
        model.zero_grad()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            logits = forward(x)
        nn.functional.cross_entropy(logits.float(), y).backward()
        grads.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
        model.load_state_dict(state)  # BatchNorm's running statistics as before
        model.eval()
        with torch.inference_mode():
            grads[-1] += (forward(x),)
    (logits_a, grads_a, eval_a), (logits_b, grads_b, eval_b) = grads
    assert torch.equal(logits_a, logits_b) and torch.equal(eval_a, eval_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


@pytest.mark.parametrize('arch,side,amp', [('resnet32', 32, False), ('resnet32', 32, True), ('resnet34_cifar', 32, True),
                                           ('resnet18', 64, True), ('wrn28_2', 32, True)])
def test_a_channels_last_models_backward_keeps_one_layout(arch, side, amp):
    """Every 4-D image-sized tensor the backward of a channels_last model computes with is channels_last: a
    gradient that arrives NCHW (autograd's own backward of the CIFAR ResNets' strided-slice shortcut and of
    every model's global mean) makes the next activation's backward mix layouts, 10-20 times slower than one
    layout on a CPU (bench/README.md)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    def nchw(t):
        return isinstance(t, torch.Tensor) and t.dim() == 4 and min(t.shape[1:]) > 1 and t.is_contiguous()

    class Layouts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(nchw(t) for t in (*args, *(out if isinstance(out, (tuple, list)) else (out,)))):
                seen.append(str(func))
            return out

    torch.manual_seed(0)
    model = build_model(arch, 10).to(memory_format=torch.channels_last).train()
    x = torch.randn(4, 3, side, side).contiguous(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
        loss = nn.functional.cross_entropy(model(x).float(), torch.arange(4))
    seen = []
    with Layouts():
        loss.backward()
    assert seen == []
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('shape', [(5, 64, 8, 8), (3, 32, 7, 7), (2, 16, 3, 5)])
@pytest.mark.parametrize('memory_format', [torch.channels_last, torch.contiguous_format])
def test_global_avg_pool_equals_the_adaptive_pool_forward_and_backward(dtype, shape, memory_format):
    """models.layout.global_avg_pool: adaptive_avg_pool2d(x, 1).flatten(1)'s values and gradient, bit for bit
    (7 x 7 and 3 x 5 pixels: divisions by 49 and 15), the gradient in x's layout."""
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype).contiguous(memory_format=memory_format).requires_grad_()
    g = torch.randn(shape[:2]).to(dtype)
    ours = global_avg_pool(x)
    (grad,) = torch.autograd.grad(ours, x, g)
    theirs = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
    (expected,) = torch.autograd.grad(theirs, x, g)
    assert torch.equal(ours, theirs) and torch.equal(grad, expected)
    assert grad.is_contiguous(memory_format=memory_format)


# ---------------------------------------------------------------- Wide ResNets (train_ssl.py)

def fixmatch_wrn_keys(width_groups=4):
    """state_dict keys of FixMatch's WideResNet (kekmodel/FixMatch-pytorch models/wideresnet.py), in order."""
    keys = ['conv1.weight']
    for group in (1, 2, 3):
        for i in range(width_groups):
            prefix = f'block{group}.layer.{i}'
            keys += [f'{prefix}.bn1.{k}' for k in BN_KEYS] + [f'{prefix}.conv1.weight']
            keys += [f'{prefix}.bn2.{k}' for k in BN_KEYS] + [f'{prefix}.conv2.weight']
            if i == 0:
                keys.append(f'{prefix}.convShortcut.weight')
    return keys + [f'bn1.{k}' for k in BN_KEYS] + ['fc.weight', 'fc.bias']


@pytest.mark.parametrize('arch,classes,count', [('wrn28_2', 10, 1_467_610), ('wrn28_2', 100, 1_479_220)])
def test_wrn_parameter_counts_and_keys_are_fixmatch_codes(arch, classes, count):
    """Counted by hand for the kekmodel layout (conv1 without bias): 1,467,610 with 10 classes, 1,479,220 with
    100 (design §3.8)."""
    model = build_model(arch, classes, return_features=True)
    assert n_params(model) == count
    assert list(model.state_dict()) == fixmatch_wrn_keys()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {m.momentum for m in bns} == {0.001}
    with torch.no_grad():
        logits, features = model.eval()(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, classes) and features.shape == (2, 128)
    assert build_model('wrn28_8', 10).fc.in_features == 512


def test_wrn_leaky_slope_and_unused_bn_are_frozen():
    """The slope is 0.1 (a negative pre-activation passes at a tenth); the one BatchNorm whose output
    FixMatch's code discards gets no gradient and is frozen, every other parameter trains."""
    model = build_model('wrn28_2', 10).train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f'block{g}.layer.0.bn1.{k}' for g in (2, 3) for k in ('weight', 'bias')}
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    from models.wrn import WideBasic
    block = WideBasic(4, 4, 1).eval()  # BatchNorm in eval mode at its initial statistics: x / sqrt(1 + eps)
    x = torch.randn(2, 4, 6, 6)

    def lrelu(t):
        return torch.where(t > 0, t, 0.1 * t)

    scale = (1 + 1e-5) ** -0.5
    with torch.no_grad():
        expected = x + block.conv2(lrelu(block.conv1(lrelu(x * scale)) * scale))
        torch.testing.assert_close(block(x), expected)
    with pytest.raises(UserError, match='no cosine'):
        build_model('wrn28_2', 10, use_norm=True)


def test_resnet34_cifar_is_weight_balancings_network():
    """LTR-weight-balancing utils/network_arch_resnet.py ResnetEncoder(34, embDimension=100, poolSize=4): torchvision's
    resnet34 (its parameter names, their `encoder.` prefix dropped), conv1 3x3 stride 1, no max-pool, 512-d features
    pooled from 4x4 at 32 px; 21,328,292 parameters with 100 classes (theirs, counted beside this one)."""
    model = build_model('resnet34_cifar', 100, return_features=True).eval()
    assert n_params(model) == 21_328_292
    assert list(model.state_dict()) == list(torchvision.models.resnet34(num_classes=100).state_dict())
    conv1 = model.conv1
    assert (conv1.kernel_size, conv1.stride, conv1.padding, conv1.bias) == ((3, 3), (1, 1), (1, 1), None)
    sizes = []
    model.layer4.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape)))
    logits, features = model(torch.randn(2, 3, 32, 32))
    assert sizes == [(2, 512, 4, 4)] and logits.shape == (2, 100) and features.shape == (2, 512)
    # without the max-pool: layer1 sees 32 x 32
    seen = []
    model.layer1.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[2:])))
    model(torch.randn(1, 3, 32, 32))
    assert seen == [(32, 32)]
    assert isinstance(build_model('resnet34_cifar', 10, use_norm=True).fc, NormedLinear)
