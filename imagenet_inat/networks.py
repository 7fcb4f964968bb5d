"""The networks, losses and samplers a config's `def_file` may name, as registries.

The original imported whatever Python file `def_file` pointed to; here the file name only selects
a known builder (`./imagenet_inat/models/ResNet50Feature.py`, `ResNet50Feature.py` and
`ResNet50Feature` all mean the same), so a config can never run code.

Shapes: feature model (N, 3, H, W) -> (N, D) with D = 2048 (ResNet-50) or 512 (ResNet-10);
classifier (N, D) -> (N, C) logits.
"""
import dataclasses
import math
import os
from typing import Callable

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from dataset.samplers import ClassAwareSampler
from errors import UserError


class ResNetFeature(nn.Module):
    """OLTR's / Kang et al.'s ResNet trunk without a head (imagenet_inat/models/ResNetFeature.py).

    Parameter names equal torchvision's resnet (conv1, bn1, layer1..4), so MoCo's `encoder_q.*`
    loads as is. Global average pooling is adaptive: the original's AvgPool2d(7) is the same at
    224 px and would fail on smaller crops.
    """

    def __init__(self, block, layers):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # The original's initialisation: He normal over fan-out, BatchNorm scale 1 and shift 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2. / n))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class DotProductClassifier(nn.Module):
    """A linear layer on the features (Kang et al. 2020's joint / cRT classifier)."""

    def __init__(self, feat_dim, num_classes):
        super().__init__()
        self.fc = nn.Linear(feat_dim, num_classes)

    def forward(self, x):
        return self.fc(x)


class LWSClassifier(nn.Module):
    """Learnable weight scaling (Kang et al. 2020): the stage-1 linear layer, frozen, times one
    learned scale per class (bias included), as their `TauNormClassifier.py`."""

    def __init__(self, feat_dim, num_classes):
        super().__init__()
        self.fc = nn.Linear(feat_dim, num_classes)
        self.scales = nn.Parameter(torch.ones(num_classes))
        for p in self.fc.parameters():
            p.requires_grad = False

    def forward(self, x):
        return self.fc(x) * self.scales


class NCMClassifier(nn.Module):
    """Kang et al.'s nearest-class-mean classifier with their defaults (models/KNNClassifier.py, feat_type 'cl2n',
    dist_type 'l2'; the centroids of run_networks.py get_knncentroids): a feature x (N, D) is centred on the mean
    training feature and L2-normalised, and logit_c = -||x_hat - centroid_c||^2, centroid_c being the mean of class
    c's centred, normalised training features (not normalised again). State: `feat_mean` (D,), `centroids` (C, D)."""

    def __init__(self, feat_dim, num_classes):
        super().__init__()
        self.register_buffer('feat_mean', torch.zeros(feat_dim))
        self.register_buffer('centroids', torch.zeros(num_classes, feat_dim))

    @torch.no_grad()
    def fit(self, features, labels):
        """Set the mean and centroids from the training features (N, D) and labels (N,); every class needs one."""
        counts = torch.bincount(labels, minlength=self.centroids.shape[0])
        if (counts == 0).any():
            raise UserError(f"the nearest-class-mean classifier needs a training image of every class; class "
                            f"{int(torch.nonzero(counts == 0)[0])} has none")
        features = features.to(self.centroids.dtype)
        self.feat_mean.copy_(features.mean(dim=0))
        normed = self._normalized(features)
        self.centroids.copy_(torch.zeros_like(self.centroids).index_add_(0, labels, normed) / counts[:, None])
        return self

    def _normalized(self, x):
        x = x - self.feat_mean
        return x / x.norm(p=2, dim=1, keepdim=True)

    def forward(self, x):
        x = self._normalized(x)
        # Their l2_similarity: -(|a|^2 + |b|^2 - 2 a.b)
        return -((x * x).sum(1, keepdim=True) + (self.centroids ** 2).sum(1)[None, :] - 2 * x @ self.centroids.T)


def tau_grid(lo=0.0, hi=2.0, step=0.1):
    """The taus to search: lo, lo + step, ..., hi (Kang et al.'s tau_norm.py scanned np.linspace(0, 2, 21)),
    counted in steps so that 0.1-steps give exactly 0.0, 0.1, ..., 2.0 (no float drift)."""
    return [round(lo + i * step, 10) for i in range(int(round((hi - lo) / step)) + 1)]


def tau_normalized(weight, tau):
    """Kang et al.'s tau-normalisation: row i of W (C x D) divided by ||W_i||_2 ** tau."""
    return weight / weight.norm(p=2, dim=1, keepdim=True).pow(tau)


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    build: Callable              # (params dict) -> nn.Module
    params: tuple                # the keys its `params` may hold
    role: str                    # 'feat_model' or 'classifier'
    # Whether a training run starts it fresh instead of loading it from model_dir (the original
    # skipped DotProductClassifier when loading weights for training: stage 1 and cRT).
    fresh_in_training: bool = False
    out_dim: int = 0             # feature models: D of their (N, D) output


# Keys the original's create_model functions took; ignored ones are documented in docs/imagenet_inat.md.
_FEATURE_PARAMS = ('use_selfatt', 'use_fc', 'dropout', 'stage1_weights', 'dataset', 'log_dir')
_CLASSIFIER_PARAMS = ('feat_dim', 'num_classes', 'stage1_weights', 'dataset', 'log_dir')


def _feature(block, layers):
    def build(params):
        return ResNetFeature(block, layers)
    return build


def _classifier(cls):
    def build(params):
        return cls(params['feat_dim'], params['num_classes'])
    return build


NETWORKS = {
    'ResNet10Feature': NetworkSpec(_feature(BasicBlock, [1, 1, 1, 1]), _FEATURE_PARAMS, 'feat_model', out_dim=512),
    'ResNet50Feature': NetworkSpec(_feature(Bottleneck, [3, 4, 6, 3]), _FEATURE_PARAMS, 'feat_model', out_dim=2048),
    'ResNet101Feature': NetworkSpec(_feature(Bottleneck, [3, 4, 23, 3]), _FEATURE_PARAMS, 'feat_model', out_dim=2048),
    'ResNet152Feature': NetworkSpec(_feature(Bottleneck, [3, 8, 36, 3]), _FEATURE_PARAMS, 'feat_model', out_dim=2048),
    'DotProductClassifier': NetworkSpec(_classifier(DotProductClassifier), _CLASSIFIER_PARAMS, 'classifier',
                                        fresh_in_training=True),
    # Kang et al. named the LWS classifier's file TauNormClassifier.py; both names mean LWS here.
    'LWSClassifier': NetworkSpec(_classifier(LWSClassifier), _CLASSIFIER_PARAMS, 'classifier'),
    'TauNormClassifier': NetworkSpec(_classifier(LWSClassifier), _CLASSIFIER_PARAMS, 'classifier'),
}

LOSSES = {'SoftmaxLoss': nn.CrossEntropyLoss}

SAMPLERS = {'ClassAwareSampler': ClassAwareSampler}


def registry_name(def_file, registry, key):
    """The registry entry a `def_file` names; refuses unknown ones with the known names."""
    name = os.path.splitext(os.path.basename(str(def_file)))[0]
    if name not in registry:
        raise UserError(f"{key}: unknown def_file {def_file!r}; known: {', '.join(registry)}")
    return name


class DecoupledModel(nn.Module):
    """feat_model then classifier, as one module for the shared engine (N, 3, H, W) -> (N, C).

    `freeze_bn` keeps the feature model's BatchNorm statistics fixed (eval mode) while training;
    the original left them updating, even with `fix: true`.
    """

    def __init__(self, feat_model, classifier, freeze_bn=False):
        super().__init__()
        self.feat_model = feat_model
        self.classifier = classifier
        self.freeze_bn = freeze_bn

    def train(self, mode=True):
        super().train(mode)
        if self.freeze_bn:
            self.feat_model.eval()
        return self

    def forward(self, x):
        return self.classifier(self.feat_model(x))
