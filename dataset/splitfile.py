"""ImageNet-LT and iNaturalist 2018 as the split files of Liu et al. 2019 (OLTR) list them, and their transforms.

SplitFileDataset reads a list of `<relative path> <label>` lines, as the original's dataset/imagenet.py and
dataset/inat.py do (imagenet_inat's stages, pretrain_moco.py, pretrain_rot.py, a user's split files in
dataset/folder.py); `split_file` names the list of a split as the original lays them out.
Transforms (the original's imagenet_inat/data/dataloader.py): RandomResizedCrop(224) + flip
(+ ColorJitter(0.4, 0.4, 0.4, 0) except for iNaturalist18) for training; Resize(256) + CenterCrop(224)
for evaluation; a user's folder above 64 px streams through them at its own size.
"""
import os

from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from dataset.statistics import IMAGENET_MEAN, IMAGENET_STD, INAT_MEAN, INAT_STD
from errors import UserError


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


def statistics(dataset):
    return (INAT_MEAN, INAT_STD) if dataset == 'iNaturalist18' else (IMAGENET_MEAN, IMAGENET_STD)


def build_transform(dataset, train, crop_size=224, resize_size=256):
    mean, std = statistics(dataset)
    if train:
        jitter = [] if dataset == 'iNaturalist18' else [
            transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0)]
        head = [transforms.RandomResizedCrop(crop_size), transforms.RandomHorizontalFlip(), *jitter]
    else:
        head = [transforms.Resize(resize_size), transforms.CenterCrop(crop_size)]
    return transforms.Compose(head + [transforms.ToTensor(), transforms.Normalize(mean, std)])


def split_file(split_dir, dataset, split):
    return os.path.join(split_dir, f'{dataset}_{split}.txt')
