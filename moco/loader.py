"""MoCo's data side: two augmented views per image, the augmentations, and split-file data sets.

Augmentations (https://github.com/facebookresearch/moco, main_moco.py):
- 'v1': MoCo v1 (He et al. 2020), the same as InstDisc (Wu et al. 2018);
- 'v2': MoCo v2's `--aug-plus` (Chen et al. 2020), similar to SimCLR: adds blur, jitter with p=0.8;
- 'cifar': a 32x32 SimCLR-style recipe for CIFAR-size images (no blur: it destroys 32x32 images).
Each is `(crop_size, mean, std, flip=True) -> transform` of a PIL image to a normalised tensor.

SplitFileDataset reads the ImageNet-LT / iNaturalist 2018 file lists of Liu et al. 2019 (OLTR),
one `<relative path> <label>` per line, as the original's dataset/imagenet.py and dataset/inat.py do.
"""
import os
import random

from PIL import Image, ImageFilter
from torch.utils.data import Dataset
from torchvision import transforms

from errors import UserError

# Normalisation of the original pretrain_moco.py: ImageNet statistics, and iNaturalist's own.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INAT_MEAN, INAT_STD = (0.466, 0.471, 0.380), (0.195, 0.194, 0.192)


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


class SplitFileDataset(Dataset):
    """Images listed in `split_file` as `<path relative to root> <integer label>`, one per line.

    Everything is checked here, before training: a missing list, a malformed line or a listed image
    that does not exist ends the run with one sentence instead of a crash in the middle of an epoch.
    Paths may contain spaces (the label is the last field); blank lines are skipped.
    """

    def __init__(self, root, split_file, transform=None, num_classes=None, flags=('--split_file', '--data')):
        """`num_classes`: labels must lie in 0..num_classes-1 (checked line by line). `flags` name the
        options that point to the split file and to `root`, for the error messages."""
        self.root = root
        self.split_file = split_file
        self.transform = transform
        self.img_path, self.targets = [], []
        if not os.path.isfile(split_file):
            raise UserError(f"split file not found: {split_file} (pass {flags[0]} to point elsewhere)")
        with open(split_file, encoding='utf-8') as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                fields = line.rsplit(None, 1)
                if len(fields) != 2 or not fields[1].isdecimal():
                    raise UserError(f"{split_file} line {line_no}: expected '<relative image path> <label>', "
                                    f"got {line.strip()!r}")
                if num_classes is not None and int(fields[1]) >= num_classes:
                    raise UserError(f"{split_file} line {line_no}: label {fields[1]} is outside 0..{num_classes - 1} "
                                    f"(num_classes is {num_classes})")
                self.img_path.append(os.path.join(root, fields[0].strip()))
                self.targets.append(int(fields[1]))
        if not self.targets:
            raise UserError(f"split file {split_file} lists no images")
        missing = [p for p in self.img_path if not os.path.isfile(p)]
        if missing:
            raise UserError(f"{len(missing)} of the {len(self.img_path)} images listed in {split_file} "
                            f"are missing under {root} (e.g. {missing[0]}); check {flags[1]}")

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        path = self.img_path[index]
        try:
            with open(path, 'rb') as f:
                sample = Image.open(f).convert('RGB')
        except OSError as e:
            raise UserError(f"cannot read image {path} listed in {self.split_file}: {e}") from None
        if self.transform is not None:
            sample = self.transform(sample)
        return sample, self.targets[index]
