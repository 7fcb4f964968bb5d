"""Model zoo: CIFAR ResNets (resnet20..resnet1202), weight balancing's CIFAR ResNet-34 (resnet34_cifar),
ImageNet ResNets (resnet18..resnet152) and the Wide ResNets of semi-supervised learning (wrn28_2, wrn28_8).

Every builder has the signature `fn(num_classes, use_norm=False, return_features=False)`, and
every model exposes its classifier as `model.fc` (with `.in_features`), so callers can swap the
head, e.g. for a 4-way rotation head or a MoCo projection MLP.
"""
from errors import UserError
from models.resnet import resnet18, resnet34, resnet50, resnet101, resnet152
from models.resnet34_cifar import resnet34_cifar
from models.resnet_cifar import (
    NormedLinear, resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202,
)
from models.wrn import wrn28_2, wrn28_8

__all__ = [
    'MODELS', 'NormedLinear', 'build_model',
    'resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110', 'resnet1202', 'resnet34_cifar',
    'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'wrn28_2', 'wrn28_8',
]

MODELS = {
    'resnet20': resnet20,
    'resnet32': resnet32,
    'resnet44': resnet44,
    'resnet56': resnet56,
    'resnet110': resnet110,
    'resnet1202': resnet1202,
    'resnet34_cifar': resnet34_cifar,
    'resnet18': resnet18,
    'resnet34': resnet34,
    'resnet50': resnet50,
    'resnet101': resnet101,
    'resnet152': resnet152,
    'wrn28_2': wrn28_2,
    'wrn28_8': wrn28_8,
}


def build_model(arch, num_classes, use_norm=False, return_features=False):
    """Build `arch` with a `num_classes`-way head (cosine head if use_norm, for LDAM)."""
    if arch not in MODELS:
        raise UserError(f"unknown architecture {arch!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[arch](num_classes=num_classes, use_norm=use_norm, return_features=return_features)
