"""Wide ResNets for semi-supervised learning: WRN-28-2 and WRN-28-8 (Zagoruyko & Komodakis 2016) in the
layout FixMatch's PyTorch code uses (kekmodel/FixMatch-pytorch models/wideresnet.py; DASO, ACR and SimPro
use the same file), so the parameter names and counts are theirs:

    input (N, 3, 32, 32)
    conv1 3x3 3->16, no bias                     -> (N, 16, 32, 32)
    block1: 4 pre-activation blocks, 16k ch       -> (N, 16k, 32, 32)
    block2: 4 blocks, 32k ch, /2                  -> (N, 32k, 16, 16)
    block3: 4 blocks, 64k ch, /2                  -> (N, 64k,  8,  8)
    bn1, leaky ReLU, global average pool          -> (N, 64k)   the "feature"
    fc                                            -> (N, C)     the logits

with k the width (2 or 8) and depth 28 = 6 * 4 + 4. BatchNorm momentum 0.001 (TensorFlow's decay 0.999,
FixMatch's) and LeakyReLU slope 0.1, as theirs. WRN-28-2 with 10 classes has 1,467,610 parameters.

One difference, which changes no output: in the first block of block2 and block3 their code computes
bn1(x) and leaky ReLU and then discards the result (the convolution and the shortcut read x itself), so
that BatchNorm layer's parameters never receive a gradient and only its running statistics move, unused.
Here it is not computed and its parameters are frozen (requires_grad False): DistributedDataParallel
would otherwise wait for gradients that never come. Its tensors stay in the state dict, so the names and
the parameter count are theirs.
"""
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError
from models.layout import global_avg_pool

BN_MOMENTUM = 0.001
LEAKY_SLOPE = 0.1


def _bn(channels):
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)


class WideBasic(nn.Module):
    """Pre-activation block: bn1-lrelu-conv1(stride)-bn2-lrelu-conv2, plus the shortcut (1x1 conv where
    the width or the resolution changes)."""

    def __init__(self, in_planes, out_planes, stride, activate_before_residual=False):
        super().__init__()
        self.bn1 = _bn(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _bn(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride,
                                                                     bias=False)
        # Where the width changes, the block activates its input first only in block1 (FixMatch's
        # activate_before_residual); elsewhere bn1 is the unused layer of the module docstring.
        self.activate_first = self.equal_in_out or activate_before_residual
        if not self.activate_first:
            self.bn1.requires_grad_(False)

    def forward(self, x):
        if self.activate_first:
            x_act = F.leaky_relu(self.bn1(x), LEAKY_SLOPE)
        else:
            x_act = x
        if not self.equal_in_out:
            # block1's first block: the activated input feeds both paths; block2/3's: the raw input
            x = x_act
        out = self.conv1(x_act)
        out = self.conv2(F.leaky_relu(self.bn2(out), LEAKY_SLOPE))
        return out + (x if self.equal_in_out else self.convShortcut(x))


class _Group(nn.Module):
    """A group of blocks, its Sequential named `layer` as FixMatch's NetworkBlock, so the keys match."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """Returns logits (N, C), or (logits, features) with features (N, 64 * width) if return_features."""

    def __init__(self, num_classes=10, depth=28, width=2, return_features=False):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.return_features = return_features
        self.conv1 = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._group(n, channels[0], channels[1], 1, activate_before_residual=True)
        self.block2 = self._group(n, channels[1], channels[2], 2)
        self.block3 = self._group(n, channels[2], channels[3], 2)
        self.bn1 = _bn(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        # FixMatch's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='leaky_relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _group(n, in_planes, out_planes, stride, activate_before_residual=False):
        blocks = [WideBasic(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1,
                            activate_before_residual) for i in range(n)]
        return _Group(nn.Sequential(*blocks))

    def forward(self, x):
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = F.leaky_relu(self.bn1(out), LEAKY_SLOPE)
        features = global_avg_pool(out)  # (N, 64k, 8, 8) -> (N, 64k)
        logits = self.fc(features)
        if self.return_features:
            return logits, features
        return logits


def _builder(width):
    def build(num_classes=10, use_norm=False, return_features=False):
        if use_norm:
            raise UserError(f"-a wrn28_{width} has no cosine (NormedLinear) head, which --loss_type LDAM needs; "
                            f"use a ResNet")
        return WideResNet(num_classes, 28, width, return_features)
    build.__name__ = build.__qualname__ = f'wrn28_{width}'
    return build


wrn28_2, wrn28_8 = _builder(2), _builder(8)
