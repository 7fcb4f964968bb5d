"""The CIFAR ResNet-34 of weight balancing's released code (Alshammari et al., CVPR 2022; LTR-weight-balancing
utils/network_arch_resnet.py ResnetEncoder(34, embDimension=C, poolSize=4)): torchvision's resnet34 whose first
convolution is 3x3 with stride 1, and whose forward pass skips the max-pool:

    input (N, 3, 32, 32)
    conv1 3x3 3->64, bn1, relu           -> (N, 64, 32, 32)
    layer1..layer4 (3, 4, 6, 3 blocks)   -> (N, 512, 4, 4)
    average pool                         -> (N, 512)   the "feature"
    fc                                   -> (N, C)

The paper's text says ResNet-32; the code behind its CIFAR-100-LT numbers uses this network (the authors in
LTR-weight-balancing issues #3 and #16). Parameter names are torchvision's (their `encoder.` prefix dropped).
"""
import torch.nn as nn
from torchvision.models.resnet import BasicBlock

from models.layout import global_avg_pool
from models.resnet import ResNet


class ResNet34Cifar(ResNet):
    """Returns logits (N, C), or (logits, features) with features (N, 512) if return_features."""

    def __init__(self, num_classes=10, use_norm=False, return_features=False):
        super().__init__(BasicBlock, [3, 4, 6, 3], num_classes, use_norm, return_features)
        # nn.Conv2d's own initialisation, as theirs: the layer replaces torchvision's after it initialised its own
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))  # no max-pool
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        features = global_avg_pool(x)  # adaptive: their avg_pool2d(4) at 32 px
        logits = self.fc(features)
        if self.return_features:
            return logits, features
        return logits


def resnet34_cifar(num_classes=10, use_norm=False, return_features=False):
    return ResNet34Cifar(num_classes, use_norm, return_features)
