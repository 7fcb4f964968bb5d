"""CIFAR ResNets (He et al. 2016, "Deep Residual Learning for Image Recognition", Sec. 4.2).

Same layout as LDAM-DRW and imbalanced-semi-self, so their checkpoints load with strict=True:

    input (N, 3, 32, 32)
    conv1 3x3 3->16, bn1, relu       -> (N, 16, 32, 32)
    layer1: n BasicBlocks, 16 ch     -> (N, 16, 32, 32)
    layer2: n BasicBlocks, 32 ch, /2 -> (N, 32, 16, 16)
    layer3: n BasicBlocks, 64 ch, /2 -> (N, 64,  8,  8)
    global average pool              -> (N, 64)   the "feature"
    fc                               -> (N, C)    the logits

Depth = 6n + 2, so resnet32 has n = 5 blocks per stage.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layout import global_avg_pool, memory_format_of


def _weights_init(m):
    # The original code re-initialises convs *and* the linear head with He init (fan_in, ReLU gain).
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(m.weight)


class NormedLinear(nn.Module):
    """Cosine-similarity head: logit_j = <x/|x|, w_j/|w_j|>, so every output lies in [-1, 1].

    Used with LDAM (Cao et al. 2019), whose loss multiplies these cosines by a scale s.
    The weight is stored as (in_features, out_features), transposed w.r.t. nn.Linear,
    because that is how the original code stores it (its checkpoints must keep loading).
    """

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        # Original init: uniform, then every column rescaled to norm 1e-5 * 1e5 = 1.
        self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x):
        # (N, in) @ (in, out) -> (N, out), both sides unit-normalised.
        return F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0))


class _SubsamplePad(torch.autograd.Function):
    """pad(x[:, :, ::2, ::2]) on the channel axis: (N, C, H, W) -> (N, C + 2 pad, H/2, W/2), with a gradient in
    x's memory format (models/layout.py): autograd's own writes an NCHW one, 3 % of a channels_last bf16
    ResNet-32 step on the 2-core EPYC (a ReLU backward of (128, 16, 32, 32) mixing layouts: 5.5 against 0.45 ms)."""

    @staticmethod
    def forward(ctx, x, pad):
        ctx.pad, ctx.shape, ctx.memory_format = pad, x.shape, memory_format_of(x)
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad))

    @staticmethod
    def backward(ctx, grad):
        # The kept pixels' gradients, zeros elsewhere.
        grad_x = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.memory_format)
        grad_x.zero_()[:, :, ::2, ::2] = grad[:, ctx.pad:grad.size(1) - ctx.pad]
        return grad_x, None


class PadShortcut(nn.Module):
    """He et al.'s shortcut "option A": subsample by 2 and zero-pad the new channels.

    Parameter-free, so the CIFAR ResNets keep their paper parameter counts. A module rather
    than a lambda so the model pickles (torch.save of the whole model, DDP, multiprocessing).
    """

    def __init__(self, planes):
        super().__init__()
        self.pad = planes // 4  # in_planes = planes / 2, so add planes/4 channels on each side

    def forward(self, x):
        # (N, planes/2, H, W) -> (N, planes, H/2, W/2)
        return _SubsamplePad.apply(x, self.pad)


class BasicBlock(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn, plus shortcut, then relu."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        # In place on fresh intermediates: the same values without two new tensors per block to allocate
        # and fill (BatchNorm's backward needs its input, never its output; ReLU's needs only its result).
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out.add_(self.shortcut(x)), inplace=True)


class ResNetCifar(nn.Module):
    """Returns logits (N, C), or (logits, features) with features (N, 64) if return_features."""

    def __init__(self, num_blocks, num_classes=10, use_norm=False, return_features=False):
        super().__init__()
        self.return_features = return_features
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, 16, num_blocks, stride=1)
        self.layer2 = self._make_layer(16, 32, num_blocks, stride=2)
        self.layer3 = self._make_layer(32, 64, num_blocks, stride=2)
        self.fc = NormedLinear(64, num_classes) if use_norm else nn.Linear(64, num_classes)
        self.apply(_weights_init)  # NormedLinear is not an nn.Linear, so it keeps its own init

    @staticmethod
    def _make_layer(in_planes, planes, num_blocks, stride):
        # Only the first block of a stage changes resolution / width.
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.layer3(self.layer2(self.layer1(out)))
        features = global_avg_pool(out)  # (N, 64, 8, 8) -> (N, 64)
        logits = self.fc(features)
        if self.return_features:
            return logits, features
        return logits


def _builder(depth):
    """The builder of the CIFAR ResNet with `depth` = 6n + 2 layers: fn(num_classes, use_norm, return_features)."""
    def build(num_classes=10, use_norm=False, return_features=False):
        return ResNetCifar((depth - 2) // 6, num_classes, use_norm, return_features)
    build.__name__ = build.__qualname__ = f'resnet{depth}'
    return build


resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202 = map(_builder, (20, 32, 44, 56, 110, 1202))
