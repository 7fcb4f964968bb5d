"""MoCo's augmentations: two augmented views per image (query and key) for contrastive pre-training.

Augmentations (https://github.com/facebookresearch/moco, main_moco.py):
- 'v1': MoCo v1 (He et al. 2020), the same as InstDisc (Wu et al. 2018);
- 'v2': MoCo v2's `--aug-plus` (Chen et al. 2020), similar to SimCLR: adds blur, jitter with p=0.8;
- 'cifar': a 32x32 SimCLR-style recipe for CIFAR-size images (no blur: it destroys 32x32 images).
Each is `(crop_size, mean, std, flip=True) -> transform` of a PIL image to a normalised tensor.
They live with the data (MoCo's method state is moco/builder.py's module).
"""
import random

from PIL import ImageFilter
from torchvision import transforms


class TwoCropsTransform:
    """Take two random crops of one image as the query and key."""

    def __init__(self, base_transform):
        self.base_transform = base_transform

    def __call__(self, x):
        q = self.base_transform(x)
        k = self.base_transform(x)
        return [q, k]


class GaussianBlur:
    """Gaussian blur augmentation in SimCLR (Chen et al. 2020), radius ~ U(sigma[0], sigma[1])."""

    def __init__(self, sigma=(.1, 2.)):
        self.sigma = sigma

    def __call__(self, x):
        sigma = random.uniform(self.sigma[0], self.sigma[1])
        return x.filter(ImageFilter.GaussianBlur(radius=sigma))


def _flip(flip):
    # Off where a mirrored image is no longer of its class (digits: a flipped 2 is no 2).
    return [transforms.RandomHorizontalFlip()] if flip else []


def moco_v2_augmentation(crop_size, mean, std, flip=True):
    """MoCo v2's aug (`--aug-plus`): similar to SimCLR, https://arxiv.org/abs/2002.05709."""
    return transforms.Compose([
        transforms.RandomResizedCrop(crop_size, scale=(0.2, 1.)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),  # not strengthened
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([GaussianBlur([.1, 2.])], p=0.5),
        *_flip(flip),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def moco_v1_augmentation(crop_size, mean, std, flip=True):
    """MoCo v1's aug: the same as InstDisc, https://arxiv.org/abs/1805.01978."""
    return transforms.Compose([
        transforms.RandomResizedCrop(crop_size, scale=(0.2, 1.)),
        transforms.RandomGrayscale(p=0.2),
        transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
        *_flip(flip),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def cifar_augmentation(crop_size, mean, std, flip=True):
    """SimCLR's CIFAR-10 recipe (Chen et al. 2020) with MoCo's crop scale (0.2-1) and jitter strengths."""
    return transforms.Compose([
        transforms.RandomResizedCrop(crop_size, scale=(0.2, 1.)),
        *_flip(flip),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


AUGMENTATIONS = {
    'v1': moco_v1_augmentation,
    'v2': moco_v2_augmentation,
    'cifar': cifar_augmentation,
}
