"""Tiny data sets written in the real on-disk formats, so tests run the real loading code offline.

Every image is its class's colour plus noise, so even a small model can learn them, and the
TinyImages pool uses the same colours, so a model trained on the CIFAR fixture pseudo-labels
it sensibly. Checksums cannot match: use the `no_checksum` fixture of conftest.py to bypass them.
Also the helpers several test files share.
"""
import builtins
import contextlib
import errno
import fnmatch
import os
import pickle
import re
import struct
import sys

import numpy as np
import scipy.io
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
CIFAR10_NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


def class_images(labels, seed):
    """N x 32 x 32 x 3 uint8 images: a fixed colour per class (same for every seed) plus noise."""
    palette = np.random.RandomState(1234).randint(30, 226, size=(100, 3))
    noise = np.random.RandomState(seed).normal(0, 20, size=(len(labels), 32, 32, 3))
    return np.clip(palette[np.asarray(labels, dtype=np.int64)][:, None, None, :] + noise, 0, 255).astype(np.uint8)


def shuffled_labels(per_class, num_classes, seed):
    """Labels with `per_class` images per class (an int, or one count per class), mixed up as in
    the real files."""
    counts = [per_class] * num_classes if np.isscalar(per_class) else list(per_class)
    labels = np.repeat(np.arange(num_classes), counts)
    return labels[np.random.RandomState(seed).permutation(len(labels))]


class _Python2Pickler(pickle._Pickler):
    """Writes pickles as Python 2 with numpy 1.x did (the real CIFAR files): byte strings as
    Python 2 `str` opcodes, which Python 3 only reads with encoding='latin1', and numpy's
    `numpy.core` module names."""
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack('<i', len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        module = getattr(obj, '__module__', '')
        if not module.startswith('numpy._core'):
            return super().save_global(obj, name)
        self.write(pickle.GLOBAL + f"{module.replace('numpy._core', 'numpy.core')}\n{obj.__name__}\n".encode())
        self.memoize(obj)


def write_python2_pickle(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        _Python2Pickler(f, protocol=2).dump(obj)


def _cifar_batch(labels, seed, label_key, name):
    # The real layout: N x 3072 uint8 rows holding the R, G and B planes one after another.
    planes = class_images(labels, seed).transpose(0, 3, 1, 2).reshape(len(labels), -1)
    return {b'batch_label': name.encode(), label_key: [int(t) for t in labels], b'data': planes,
            b'filenames': [f'{name}_{i}.png'.encode() for i in range(len(labels))]}


def write_cifar10(root, per_class=20, test_per_class=10, seed=0):
    """<root>/cifar-10-batches-py/: data_batch_1..5 (the training images split over five),
    test_batch and batches.meta."""
    folder = os.path.join(root, 'cifar-10-batches-py')
    labels = shuffled_labels(per_class, 10, seed)
    for i, part in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
        write_python2_pickle(os.path.join(folder, f'data_batch_{i}'),
                             _cifar_batch(labels[part], seed + i, b'labels', f'training batch {i} of 5'))
    write_python2_pickle(os.path.join(folder, 'test_batch'),
                         _cifar_batch(shuffled_labels(test_per_class, 10, seed + 100), seed + 100,
                                      b'labels', 'testing batch 1 of 1'))
    write_python2_pickle(os.path.join(folder, 'batches.meta'),
                         {b'num_cases_per_batch': len(labels) // 5,
                          b'label_names': [n.encode() for n in CIFAR10_NAMES], b'num_vis': 3072})
    return folder


def write_cifar100(root, per_class=5, test_per_class=2, seed=0):
    """<root>/cifar-100-python/: train, test and meta (coarse labels are all 0 here)."""
    folder = os.path.join(root, 'cifar-100-python')
    for split, n, split_seed in (('train', per_class, seed), ('test', test_per_class, seed + 100)):
        labels = shuffled_labels(n, 100, split_seed)
        batch = _cifar_batch(labels, split_seed, b'fine_labels', split)
        batch[b'coarse_labels'] = [0] * len(labels)
        write_python2_pickle(os.path.join(folder, split), batch)
    write_python2_pickle(os.path.join(folder, 'meta'),
                         {b'fine_label_names': [f'class{i}'.encode() for i in range(100)],
                          b'coarse_label_names': [f'super{i}'.encode() for i in range(20)]})
    return folder


def write_svhn(root, split, per_class=30, seed=0):
    """<root>/<split>_32x32.mat: X 32 x 32 x 3 x N uint8 and y N x 1 with 10 for digit 0.
    `per_class` may be one count per digit 0..9, to mimic SVHN's own imbalance."""
    labels = shuffled_labels(per_class, 10, seed)
    x = class_images(labels, seed).transpose(1, 2, 3, 0)
    y = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, f'{split}_32x32.mat')
    scipy.io.savemat(path, {'X': x, 'y': y})
    return path


def write_tinyimages(path, n_per_class=100, num_classes=10, seed=0):
    """The authors' TinyImages selection: {'data': N x 32 x 32 x 3 uint8, 'extrapolated_targets'}."""
    labels = shuffled_labels(n_per_class, num_classes, seed)
    with open(path, 'wb') as f:
        pickle.dump({'data': class_images(labels, seed + 7), 'extrapolated_targets': labels}, f)
    return labels


def write_pseudo_labels(path, labels, confidence=None, extra=None):
    """What gen_pseudolabels.py writes: {'extrapolated_targets', optional 'confidence', ...extra}."""
    entry = {'extrapolated_targets': np.asarray(labels, dtype=np.int64)}
    if confidence is not None:
        entry['confidence'] = np.asarray(confidence, dtype=np.float32)
    entry.update(extra or {})
    with open(path, 'wb') as f:
        pickle.dump(entry, f)


def shrink_digits(setattr, per_class=40, test_per_class=10):
    """Make `--dataset digits` small for a test: the first `per_class` images of each digit, of
    which `test_per_class` form the test set. `setattr` is monkeypatch.setattr, or the builtin in
    a subprocess that needs no undoing."""
    from dataset import digits
    images, labels = digits.load_digit_images()
    keep = np.concatenate([np.where(labels == c)[0][:per_class] for c in range(10)])
    setattr(digits, 'load_digit_images', lambda: (images[keep], labels[keep]))
    setattr(digits, 'TEST_PER_CLASS', test_per_class)


class FillingFile:
    """A file whose writes fail with ENOSPC once `after` bytes (characters of a text file) went through,
    as on a disk that fills up. No fileno(), so that shutil.copyfile writes through write(), not sendfile."""

    def __init__(self, f, after):
        self.f, self.left = f, after

    def write(self, data):
        data = data if isinstance(data, str) else memoryview(data).cast('B')
        if len(data) > self.left:
            self.f.write(data[:self.left])
            self.left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        if name == 'fileno':
            raise AttributeError(name)
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def full_disk(setattr, name, after, nth=1):
    """Writes of the file `name` (a glob pattern; also its atomic temporaries `.name.*`) fail with ENOSPC
    after `after` bytes, from its `nth` opening for writing on. `setattr`: as in shrink_digits."""
    real_open, count = builtins.open, [0]

    def open_(file, mode='r', *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        base = os.path.basename(str(file))
        if any(m in mode for m in 'wa') and (fnmatch.fnmatch(base, name) or fnmatch.fnmatch(base, f'.{name}.*')):
            count[0] += 1
            if count[0] >= nth:
                return FillingFile(f, after)
        return f

    setattr(builtins, 'open', open_)


@contextlib.contextmanager
def one_thread():
    """One torch thread inside, the previous count restored after: bit-reproducible CPU kernels need a
    fixed thread count, and tiny convolutions gain nothing from threads (on a busy machine OpenMP
    spinning slows them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def script_env(gpu=False, **extra):
    """os.environ plus `extra` for a script run as a subprocess: one OpenMP thread (see one_thread)
    and, unless `gpu`, no visible GPU, so that it computes on the CPU as the in-process tests do."""
    return {**os.environ, 'OMP_NUM_THREADS': '1', **({} if gpu else {'CUDA_VISIBLE_DEVICES': ''}), **extra}


def project_traceback(text):
    """Whether `text` holds a traceback frame in the project's own code (torchrun's own traceback, from a
    .venv inside the checkout, does not count)."""
    return re.search(rf'File "{re.escape(REPO)}/(?!\.venv/)', text) is not None


def torchrun_cmd(*argv, nproc=2):
    """The command line of torchrun running `argv` in `nproc` processes; --standalone picks a free
    port itself: no fixed port to race for."""
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc), *argv]


def assert_same_tensors(a, b):
    """Equal to the bit: tensors, or dicts of them with the same keys (the message names the key)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0)
