"""Users' own images as a data set of this project: `--dataset folder --data_path ROOT`.

ROOT holds `train/<class>/...` and `val/<class>/...` (torchvision's ImageFolder layout; a class
folder may nest sub-folders; names may hold spaces), or the split files `train.txt` and `val.txt`
of `<path relative to ROOT> <integer label>` lines as ImageNet-LT's (dataset/splitfile.py). Classes are
the sorted training folder names (split files: labels 0..max). The unlabeled pool of train_semi.py
and gen_pseudolabels.py is a folder of images, any nesting (default ROOT/unlabeled).

Images are decoded once into an N x S x S x 3 uint8 array (grayscale and palette images converted
to RGB, resized to S x S with --image_size S <= 64), cached in `.folder_cache/` beside the folder
or split file (or in --cache_dir) under a key of the sorted file list, sizes and modification times,
read back memory-mapped, and served exactly as CIFAR (the device loader, the CIFAR ResNets). Start-up
lists and stats every file once and decodes only on a cache miss; under torchrun rank 0 decodes while
the other ranks wait, then they read its cache (MoCo's per-GPU launcher decodes before it starts its
workers). The normalisation mean/std are the training folder's pixel statistics; they, the class names
and S go into every checkpoint, so -e and gen_pseudolabels.py need nothing else. Larger images
(--image_size S > 64) are not cached: they stream from their files through ImageNet-LT's ResNet-50
transforms (dataset/splitfile.py) at S px (train.py, pretrain_rot.py, tools/tsne.py; pretrain_moco.py with
MoCo's ImageNet augmentation).

The training set is the training folder as it is unless --imb_factor is given: then it is made
long-tailed with CIFAR's rule and seed (`--imb_type`, `--imb_factor`, `--rand_number`). Fewer than
two classes, or a class left without a training image, are refused.
"""
import contextlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, UnidentifiedImageError

import dist
from dataset.imbalance_cifar import add_pseudo_labeled, check_fraction, img_num_per_cls, select_per_class
from dataset.splitfile import SplitFileDataset, build_transform
from dataset.statistics import IMAGENET_MEAN, IMAGENET_STD
from errors import UserError
from fileio import atomic_path, safe_pickle_load

MAX_SIDE = 64  # up to this, one cached array served as CIFAR; above, files streamed as ImageNet's
IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.pgm', '.png', '.ppm', '.tif', '.tiff', '.webp')
CACHE_FOLDER = '.folder_cache'
POOL_FOLDER = 'unlabeled'


@dataclass
class Listing:
    """The images of one split, listed once: paths (absolute, in order), labels (None: a pool),
    and the (relative path, size, mtime) triples the cache key is made of."""
    source: str       # the split's folder or split file (messages, cache location)
    paths: list
    labels: object
    classes: list
    stamps: list


def _stamp(path, root, entry_stat):
    return os.path.relpath(path, root), entry_stat.st_size, entry_stat.st_mtime_ns


def _walk_images(folder, what):
    """(paths, stamps) of every image under `folder`, sorted by relative path, each stat-ed once; hidden
    files (.DS_Store, the cache) are skipped, any other non-image file is refused."""
    found, stack = [], [folder]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.name.startswith('.'):
                    continue
                if e.is_dir():
                    stack.append(e.path)
                elif not e.name.lower().endswith(IMAGE_EXTENSIONS):
                    raise UserError(f"{e.path} in {what} is not an image (expected {' '.join(IMAGE_EXTENSIONS)}); "
                                    f"move it out of {folder}")
                else:
                    found.append((_stamp(e.path, folder, e.stat()), e.path))
    found.sort()
    return [path for _, path in found], [stamp for stamp, _ in found]


def list_class_folders(split_dir, classes=None):
    """The images of `split_dir/<class>/...`; `classes` (the training set's) fixes the label order."""
    names = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith('.'))
    if not names:
        raise UserError(f"{split_dir} holds no class folders (expected {split_dir}/<class>/<images>)")
    if classes is None:
        classes = names
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise UserError(f"class folder {os.path.join(split_dir, unknown[0])} has no counterpart in the training "
                        f"folder (training classes: {', '.join(classes)})")
    paths, labels, stamps = [], [], []
    for name in names:
        class_paths, class_stamps = _walk_images(os.path.join(split_dir, name), split_dir)
        if not class_paths:
            raise UserError(f"class folder {os.path.join(split_dir, name)} holds no images")
        paths += class_paths
        stamps += [(os.path.join(name, rel), size, mtime) for rel, size, mtime in class_stamps]
        labels += [classes.index(name)] * len(class_paths)
    return Listing(split_dir, paths, np.asarray(labels, dtype=np.int64), list(classes), stamps)


def list_split_file(root, split_file, num_classes=None):
    """The images a `<path> <label>` split file lists (SplitFileDataset checks lines and files)."""
    listed = SplitFileDataset(root, split_file, num_classes=num_classes, flags=('--data_path', '--data_path'))
    stamps = [_stamp(p, root, os.stat(p)) for p in listed.img_path]
    labels = np.asarray(listed.targets, dtype=np.int64)
    classes = [str(c) for c in range(num_classes or labels.max() + 1)]
    return Listing(split_file, listed.img_path, labels, classes, stamps)


def list_pool(folder):
    if not os.path.isdir(folder):
        raise UserError(f"unlabeled image folder {folder} not found (pass --unlabeled_data / --data_dir)")
    paths, stamps = _walk_images(folder, folder)
    return Listing(folder, paths, None, [], stamps)


def list_splits(root):
    """(train, val) listings of ROOT: class folders, else split files; at least two classes."""
    if os.path.isdir(os.path.join(root, 'train')):
        train = _two_classes(list_class_folders(os.path.join(root, 'train')))
        val_dir = os.path.join(root, 'val')
        if not os.path.isdir(val_dir):
            raise UserError(f"{root} has train/ but no val/ (expected {val_dir}/<class>/<images>)")
        return train, list_class_folders(val_dir, train.classes)
    if os.path.isfile(os.path.join(root, 'train.txt')):
        if not os.path.isfile(os.path.join(root, 'val.txt')):
            raise UserError(f"{root} has train.txt but no val.txt (lines '<path relative to {root}> <label>')")
        train = _two_classes(list_split_file(root, os.path.join(root, 'train.txt')))
        return train, list_split_file(root, os.path.join(root, 'val.txt'), len(train.classes))
    raise UserError(f"{root} has no train/ folder (expected {root}/train/<class>/<images> and "
                    f"{root}/val/<class>/<images>, or train.txt and val.txt split files; pass --data_path)")


def _two_classes(train):
    if len(train.classes) < 2:
        raise UserError(f"{train.source} holds {len(train.classes)} class ({', '.join(train.classes)}); a classifier "
                        f"needs at least two")
    return train


def _cache_path(listing, image_size, cache_dir=None):
    """`.folder_cache/<split>-<S or native>-<key>.npy` beside the split's folder or file, the key a hash of the
    file list with sizes and times; in `cache_dir` the split's name also carries a hash of its folder's path."""
    key = hashlib.sha256(json.dumps([image_size, listing.stamps]).encode()).hexdigest()[:16]
    folder, base = os.path.split(os.path.abspath(listing.source))
    if cache_dir is None:
        cache_dir = os.path.join(folder, CACHE_FOLDER)
    else:
        base += '-' + hashlib.sha256(os.path.abspath(listing.source).encode()).hexdigest()[:8]
    return os.path.join(cache_dir, f"{base}-{image_size or 'native'}-{key}.npy")


def _decode(listing, image_size):
    """(N x S x S x 3 uint8 images, whether any was resized). Without `image_size` every image must have one
    square size <= 64."""
    images, first, resized = None, None, False
    for n, path in enumerate(listing.paths):
        try:
            with Image.open(path) as im:
                im.load()  # a truncated file fails here, not later in a worker
                rgb = im.convert('RGB')
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise UserError(f"cannot read image {path}: {e}") from None
        if image_size is None:
            first = first or (path, rgb.size)
            if rgb.size != first[1]:
                raise UserError(f"images of mixed sizes in {listing.source}: {first[0]} is {first[1][0]}x{first[1][1]}, "
                                f"{path} is {rgb.size[0]}x{rgb.size[1]}; pass --image_size S to resize all to S x S")
            if rgb.size[0] != rgb.size[1] or rgb.size[0] > MAX_SIDE:
                raise UserError(f"{path} is {rgb.size[0]}x{rgb.size[1]}: pass --image_size S (S <= {MAX_SIDE}: resized "
                                f"to S x S and cached; larger: streamed from the files)")
        elif rgb.size != (image_size, image_size):
            rgb, resized = rgb.resize((image_size, image_size), Image.BILINEAR), True
        if images is None:  # one array, filled in place: 100k images are not held twice
            images = np.empty((len(listing.paths), rgb.size[1], rgb.size[0], 3), dtype=np.uint8)
        images[n] = np.asarray(rgb, dtype=np.uint8)
    return images, resized


def pixel_statistics(images):
    """Per-channel mean and std of all pixels in [0, 1], from exact 256-bin histograms (no float copy)."""
    mean, std = [], []
    for c in range(3):
        counts = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
        values = np.arange(256) / 255.0
        m = (counts * values).sum() / counts.sum()
        mean.append(float(m))
        std.append(float(np.sqrt((counts * (values - m) ** 2).sum() / counts.sum())))
    return tuple(mean), tuple(std)


class CachedImages:
    """A listing's images from the cache, or decoded; `save()` writes a decoded array (atomically) once
    every split has decoded cleanly, so a bad image anywhere leaves no cache behind.

    A cache is read memory-mapped (copy-on-write, never written): processes that read it share its pages
    (torchrun's ranks, MoCo's per-GPU workers, loader workers) instead of each holding a copy. Images that
    `image_size` S leaves as they were (all S x S already) are cached as the folder's native size, so scripts
    that ask for S and for the native size (train_stage2.py from a train.py run) share one file."""

    def __init__(self, listing, image_size, cache_dir=None):
        self.path = _cache_path(listing, image_size, cache_dir)
        self.native = _cache_path(listing, None, cache_dir)
        for path in dict.fromkeys((self.path, self.native)):
            if os.path.isfile(path):
                images = np.load(path, mmap_mode='c', allow_pickle=False)
                if len(images) != len(listing.paths):
                    raise UserError(f"image cache {path} is corrupt; delete it")
                if image_size is None or images.shape[1] == image_size:
                    self.images, self.fresh = images, False
                    return
        print(f"decoding the {len(listing.paths)} images of {listing.source} (cached for later runs)", flush=True)
        self.images, resized = _decode(listing, image_size)
        self.fresh = True
        self.path = self.path if resized else self.native

    def save(self):
        """Write the cache of a decoded array; an OSError or UserError where it cannot be written."""
        if not self.fresh:
            return
        folder = os.path.dirname(self.path)
        os.makedirs(folder, exist_ok=True)
        with atomic_path(self.path, size=self.images.nbytes + 128) as tmp, open(tmp, 'wb') as f:
            np.save(f, self.images)
        self.fresh = False
        stale = os.path.basename(self.path).rsplit('-', 1)[0] + '-'
        for name in os.listdir(folder):  # the caches of the files as they were before (.npz: older versions')
            if name.startswith(stale) and name.endswith(('.npy', '.npz')) and name != os.path.basename(self.path):
                with contextlib.suppress(FileNotFoundError):  # another process may have removed it first
                    os.unlink(os.path.join(folder, name))


def _read_or_decode(listings, image_size, cache_dir=None):
    cached = [CachedImages(listing, image_size, cache_dir) for listing in listings]
    failed = {}
    for c in cached:
        try:
            c.save()
        except (OSError, UserError) as e:
            failed.setdefault(os.path.dirname(c.path), e)
    for folder, e in failed.items():  # one line per cache folder, not per split
        print(f"warning: cannot cache the decoded images in {folder} ({e}); they are decoded again next time "
              f"(--cache_dir puts the cache elsewhere)", file=sys.stderr, flush=True)
    return [c.images for c in cached]


def load_images(*listings, image_size, cache_dir=None):
    """The arrays of `listings`, all decoded (or read) before any cache is written. Under torchrun rank 0
    decodes and caches them while the other ranks wait, then those read its caches: a folder is decoded
    once, not once per process; a bad image stops every rank with rank 0's one line."""
    dist.join_launched_group()
    images = []
    dist.on_rank0(lambda: images.extend(_read_or_decode(listings, image_size, cache_dir)))  # collective
    return images if dist.is_main_process() else _read_or_decode(listings, image_size, cache_dir)


class FolderImages:
    """uint8 images with their labels, served as CIFAR's (PIL image -> transform)."""

    def __init__(self, data, targets, classes, transform=None):
        self.data, self.targets, self.classes, self.transform = data, list(targets), classes, transform
        self.cls_num = len(classes)

    def get_cls_num_list(self):
        return np.bincount(self.targets, minlength=self.cls_num).tolist()

    def image(self, index):
        return Image.fromarray(self.data[index])

    def __getitem__(self, index):
        img = self.image(index)
        return (self.transform(img) if self.transform is not None else img), self.targets[index]

    def __len__(self):
        return len(self.data)


class FolderFiles(FolderImages):
    """Images above 64 px, read from their files at every step (`data`: their paths, a numpy array of str)."""

    def image(self, index):
        try:
            with Image.open(self.data[index]) as im:
                return im.convert('RGB')
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise UserError(f"cannot read image {self.data[index]}: {e}") from None


def long_tailed(labels, num_classes, imb_type, imb_factor, rand_number):
    """(indices kept, images per class asked) by CIFAR's rule and seed: n_i = N/C * imb_factor^(i/(C-1))
    of class i, drawn from numpy's stream seeded with `rand_number`. `imb_factor` 1: the folder as it is."""
    check_fraction(imb_factor, '--imb_factor')
    np.random.seed(rand_number)
    counts = np.bincount(labels, minlength=num_classes).tolist()
    if imb_factor == 1:
        return np.arange(len(labels)), counts
    if len(set(counts)) > 1:
        print(f"note: the training folder is not balanced ({min(counts)} to {max(counts)} images per class); "
              f"--imb_factor {imb_factor} draws from it as from a balanced one; without --imb_factor it is taken "
              f"as it is")
    asked = img_num_per_cls(len(labels) / num_classes, num_classes, imb_type, imb_factor)
    return select_per_class(labels, np.arange(num_classes), asked), asked


def long_tailed_set(cls, data, labels, classes, imb_type, imb_factor, rand_number, transform):
    """A `cls` (FolderImages, FolderFiles) of the long-tailed subset; it keeps what add_pseudo_labeled reads.
    A class left without a training image is refused. The whole folder (--imb_factor 1) is not copied."""
    keep, asked = long_tailed(labels, len(classes), imb_type, imb_factor, rand_number)
    counts = np.bincount(labels[keep], minlength=len(classes))
    empty = [classes[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        which = f"class {empty[0]!r}" + (f" and {len(empty) - 1} more" if len(empty) > 1 else '')
        if imb_factor == 1:
            raise UserError(f"{which} of the training set has no image")
        whole = np.bincount(labels, minlength=len(classes))
        raise UserError(f"--imb_factor {imb_factor:g} leaves {which} with no training image (the training folder "
                        f"has {whole.min()} to {whole.max()} per class); pass a larger --imb_factor, or leave it "
                        f"out to take the folder as it is")
    whole_set = len(keep) == len(data) and np.array_equal(keep, np.arange(len(data)))
    dataset = cls(data if whole_set else data[keep], labels[keep], classes, transform)
    dataset.img_num_list, dataset.class_order = asked, np.arange(len(classes))
    return dataset


def load_pool(path, image_size, cache_dir=None):
    """(images, None, None, relative paths) of an unlabeled folder: no sourcing labels, no ground truth."""
    listing = list_pool(path)
    if not listing.paths:
        raise UserError(f"unlabeled image folder {path} holds no images")
    (images,) = load_images(listing, image_size=image_size, cache_dir=cache_dir)
    return images, None, None, [rel for rel, _, _ in listing.stamps]


def pool_pseudo_labels(pseudo_labels, paths):
    """The pseudo-labels of a pool, refused if gen_pseudolabels.py made them for another folder."""
    hint = 'run gen_pseudolabels.py --dataset folder on this pool again'
    entry = safe_pickle_load(pseudo_labels, what='pseudo-label file', hint=hint)
    if not isinstance(entry, dict) or list(entry.get('paths', [])) != paths:
        raise UserError(f"pseudo-label file {pseudo_labels} was not made for the {len(paths)} images of this "
                        f"unlabeled folder ({hint})")
    return np.asarray(entry['extrapolated_targets']).astype(np.int64).reshape(-1)


def configure(info, root, image_size, ckpt=None, cache_dir=None):
    """`info` (the registry's placeholder) filled in for the images at `root`: cached arrays (up to 64 px,
    in `cache_dir` if given) or files streamed (`image_size` above 64); with `ckpt` (a checkpoint of a folder
    run) only its classes, statistics and image size, and the unlabeled pool (gen_pseudolabels.py needs
    nothing else)."""
    if ckpt is not None:
        return _from_checkpoint(info, root, ckpt, cache_dir)
    if image_size is not None and image_size > MAX_SIDE:
        return streamed(info, root, image_size)
    train, val = list_splits(root)
    train_images, val_images = load_images(train, val, image_size=image_size, cache_dir=cache_dir)
    size, classes = train_images.shape[1], tuple(train.classes)
    if val_images.shape[1] != size:
        raise UserError(f"val images are {val_images.shape[1]} px, training images {size} px; pass --image_size")
    mean, std = pixel_statistics(train_images)
    print(f"folder {root}: {len(classes)} classes, {len(train.paths)} training and {len(val.paths)} val "
          f"images of {size}x{size} px; mean {np.round(mean, 4).tolist()}, std {np.round(std, 4).tolist()}")

    def build_train(_root, imb_type, imb_factor, rand_number, transform, download=False):
        return long_tailed_set(FolderImages, train_images, train.labels, classes, imb_type, imb_factor, rand_number,
                               transform)

    def build_val(_root, transform, download=False):
        return FolderImages(val_images, val.labels, classes, transform)

    def build_semi(_root, imb_type, imb_factor, unlabel_imb_factor, rand_number, transform, unlabeled_data=None,
                   pseudo_labels=None, unlabel_size_factor=5, pseudo_threshold=None, download=False):
        dataset = build_train(_root, imb_type, imb_factor, rand_number, transform)
        pool, _, _, paths = load_pool(unlabeled_data or os.path.join(root, POOL_FOLDER), size, cache_dir)
        # A user's pool has no labels of its own: the draw per class goes by the pseudo-labels.
        sourcing = pool_pseudo_labels(pseudo_labels, paths)
        pseudo = add_pseudo_labeled(dataset, pool, sourcing, pseudo_labels, unlabel_imb_factor,
                                    unlabel_size_factor, pseudo_threshold)
        dataset.targets = dataset.targets + pseudo.tolist()
        return dataset

    return replace(info, num_classes=len(classes), mean=mean, std=std, build_train=build_train, build_val=build_val,
                   build_semi=build_semi, load_pool=_pool_loader(root, size, cache_dir), image_size=size,
                   classes=classes)


def _pool_loader(root, size, cache_dir=None):
    def pool(_root, path, download=False, **_imbalance):
        return load_pool(path or os.path.join(root, POOL_FOLDER), size, cache_dir)
    return pool


def _from_checkpoint(info, root, ckpt, cache_dir=None):
    if 'classes' not in ckpt:
        raise UserError("the checkpoint has no 'classes': it was not trained with --dataset folder")
    size, classes = int(ckpt['image_size']), tuple(ckpt['classes'])
    if size > MAX_SIDE:
        raise UserError(f"it was trained on {size} px images, streamed from their files; only train.py and "
                        f"pretrain_rot.py take those (up to {MAX_SIDE} px: all scripts)")
    return replace(info, num_classes=len(classes), mean=tuple(ckpt['mean']), std=tuple(ckpt['std']),
                   load_pool=_pool_loader(root, size, cache_dir), image_size=size, classes=classes)


def checkpoint_entries(info):
    """What a checkpoint records of a folder: its class names in label order, the normalisation
    statistics and the image side, so -e, gen_pseudolabels.py and tools/tsne.py need nothing else."""
    if info is None or info.classes is None:
        return {}
    return {'classes': list(info.classes), 'mean': list(info.mean), 'std': list(info.std),
            'image_size': info.image_size}


def checked_against_checkpoint(info, ckpt, source):
    """`info` of a folder for a checkpoint trained on one (resumed, evaluated, embedded): the classes
    and image side must be the checkpoint's, and its statistics are used (the folder may have changed)."""
    if info is None or info.classes is None or 'classes' not in ckpt:
        return info
    if list(ckpt['classes']) != list(info.classes) or int(ckpt['image_size']) != info.image_size:
        raise UserError(f"{source} was trained on the classes {', '.join(ckpt['classes'])} at {ckpt['image_size']} "
                        f"px; --data_path has {', '.join(info.classes)} at {info.image_size} px")
    return replace(info, mean=tuple(ckpt['mean']), std=tuple(ckpt['std']))


def streamed(info, root, image_size):
    """`info` for images above 64 px: listed once, never cached, each read from its file at every step with
    ImageNet-LT's ResNet-50 transforms (RandomResizedCrop(S) + flip + colour jitter; Resize(S*256/224) +
    CenterCrop(S)) and ImageNet's statistics, for train.py, pretrain_rot.py (and pretrain_moco.py, which brings its own
    augmentation) with an ImageNet ResNet."""
    train, val = list_splits(root)
    classes = tuple(train.classes)
    print(f"folder {root}: {len(classes)} classes, {len(train.paths)} training and {len(val.paths)} val images, "
          f"streamed at {image_size} px")

    def build_train(_root, imb_type, imb_factor, rand_number, transform, download=False):
        return long_tailed_set(FolderFiles, np.asarray(train.paths), train.labels, classes, imb_type, imb_factor,
                               rand_number, transform)

    def build_val(_root, transform, download=False):
        return FolderFiles(np.asarray(val.paths), val.labels, classes, transform)

    def not_streamed(*args, **kwargs):
        raise UserError(f"--image_size {image_size}: images above {MAX_SIDE} px stream from their files, which only "
                        f"train.py, pretrain_rot.py and pretrain_moco.py take; pass --image_size {MAX_SIDE} or less")

    return replace(info, num_classes=len(classes), mean=IMAGENET_MEAN, std=IMAGENET_STD, build_train=build_train,
                   build_val=build_val, build_semi=not_streamed, load_pool=not_streamed, image_size=image_size,
                   classes=classes,
                   transform=lambda train_phase: build_transform('ImageNet_LT', train_phase, image_size,
                                                                 image_size * 256 // 224))


def check_model(info, arch):
    """Streamed images are ImageNet-sized: the CIFAR ResNets, which never downsample at their input, are refused."""
    from models import MODELS
    if info.transform is not None and MODELS[arch].__module__ == 'models.resnet_cifar':
        raise UserError(f"-a {arch} is a CIFAR ResNet, for images up to {MAX_SIDE} px; --image_size {info.image_size} "
                        f"needs an ImageNet ResNet: pass -a resnet50 (or resnet18, resnet34, resnet101, resnet152)")
