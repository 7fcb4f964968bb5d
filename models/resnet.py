"""ImageNet-style ResNets (He et al. 2016) for ImageNet-LT and iNaturalist 2018.

Built on torchvision's ResNet so parameter names match `torchvision.models.resnet50()` exactly;
that is what lets self-supervised MoCo checkpoints (trained on torchvision's resnet50) load.
Nothing is downloaded: weights start from torchvision's random init.

    input (N, 3, 224, 224) -> ... -> layer4 (N, D, 7, 7) -> avgpool -> features (N, D) -> fc (N, C)

with D = 512 for resnet18/34 and D = 2048 for resnet50/101/152.
"""
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet as _TorchvisionResNet

from models.layout import global_avg_pool
from models.resnet_cifar import NormedLinear


class ResNet(_TorchvisionResNet):
    """torchvision ResNet plus `use_norm` (cosine head for LDAM) and `return_features`.

    Returns logits (N, C), or (logits, features) with features (N, D) if return_features.
    """

    def __init__(self, block, layers, num_classes=1000, use_norm=False, return_features=False):
        super().__init__(block, layers, num_classes=num_classes)
        self.return_features = return_features
        if use_norm:
            self.fc = NormedLinear(self.fc.in_features, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        features = global_avg_pool(x)  # self.avgpool's, with a gradient in x's layout
        logits = self.fc(features)
        if self.return_features:
            return logits, features
        return logits


def resnet18(num_classes=1000, use_norm=False, return_features=False):
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, use_norm, return_features)


def resnet34(num_classes=1000, use_norm=False, return_features=False):
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, use_norm, return_features)


def resnet50(num_classes=1000, use_norm=False, return_features=False):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, use_norm, return_features)


def resnet101(num_classes=1000, use_norm=False, return_features=False):
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes, use_norm, return_features)


def resnet152(num_classes=1000, use_norm=False, return_features=False):
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes, use_norm, return_features)
