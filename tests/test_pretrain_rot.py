"""Rotation pre-training: balanced rotation labels, images rotated as labelled, and the test score: each
test image once, at a rotation fixed for it, whatever the loader, batch size or global seed."""
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from dataset.device_loader import DeviceLoader
from engine import evaluate
from dataset.rotation import RotationTargets, eval_rotations, rotation_labels
from pretrain_rot import random_rotation_batch, rotate, rotated_as_labelled


def test_labels_are_balanced_over_the_four_rotations():
    for batch in (4, 128, 130):
        labels = rotation_labels(batch)
        counts = torch.bincount(labels, minlength=4)
        assert labels.shape == (batch,) and counts.max() - counts.min() <= 1
    torch.manual_seed(0)
    assert not torch.equal(rotation_labels(128), rotation_labels(128))  # a fresh permutation per batch


def test_images_are_rotated_as_labelled():
    # an image with a single bright pixel in the top-left corner
    images = torch.zeros(4, 3, 5, 5)
    images[:, :, 0, 0] = 1
    out = rotate(images, torch.tensor([0, 1, 2, 3]))
    corners = [(0, 0), (4, 0), (4, 4), (0, 4)]  # where 0/90/180/270 degrees counter-clockwise put it
    for k, (row, col) in enumerate(corners):
        assert out[k, :, row, col].eq(1).all() and out[k].sum() == 3, k


def test_rotate_is_rot90_of_each_image_in_either_memory_format():
    images = torch.randn(9, 3, 6, 6)
    labels = torch.tensor([3, 0, 1, 2, 2, 1, 0, 3, 1])
    expected = torch.stack([torch.rot90(x, int(k), dims=(1, 2)) for x, k in zip(images, labels)])
    for memory_format in (torch.contiguous_format, torch.channels_last):
        out = rotate(images.contiguous(memory_format=memory_format), labels)
        assert torch.equal(out, expected) and out.is_contiguous(memory_format=torch.channels_last)


def test_training_batches():
    images = torch.randn(8, 3, 6, 6)
    rotated, labels = random_rotation_batch(images, torch.zeros(8, dtype=torch.long))
    assert torch.equal(rotated, rotate(images, labels)) and torch.bincount(labels, minlength=4).tolist() == [2] * 4


def test_eval_rotations_are_fixed_balanced_and_independent_of_the_global_seed():
    torch.manual_seed(1)
    first = eval_rotations(10000)
    torch.manual_seed(2)
    assert torch.equal(eval_rotations(10000), first)  # the same in every epoch and run
    assert torch.bincount(first, minlength=4).tolist() == [2500] * 4  # CIFAR's test set: a quarter per angle
    assert torch.equal(eval_rotations(300)[:4], eval_rotations(300)[:4])
    assert torch.bincount(eval_rotations(301), minlength=4).tolist() in ([76, 75, 75, 75], [75, 76, 75, 75],
                                                                          [75, 75, 76, 75], [75, 75, 75, 76])
    assert len(set(first[:40].tolist())) == 4  # mixed, not sorted by angle


def test_eval_rotations_are_pinned():
    """The rotation score's definition: changing the seed or the draw changes every logged rotation
    accuracy, so the first and last rotations of CIFAR's 10,000 test images are written out here (drawn
    once with torch.randperm(10000) from a Generator seeded 0 over [0, 1, 2, 3] * 2500)."""
    rotations = eval_rotations(10000).tolist()
    assert rotations[:16] == [0, 2, 3, 1, 3, 1, 1, 0, 1, 3, 1, 1, 0, 0, 0, 1] and rotations[-4:] == [1, 0, 2, 3]


def test_rotation_targets_replace_the_labels_and_keep_the_images():
    images = np.random.RandomState(0).randint(0, 256, size=(10, 8, 8, 3)).astype(np.uint8)

    class Images(torch.utils.data.Dataset):
        data, targets = images, [7] * 10

        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.from_numpy(self.data[i]), self.targets[i]

    wrapped = RotationTargets(Images())
    assert wrapped.data is images and len(wrapped) == 10
    assert wrapped.targets.tolist() == eval_rotations(10).tolist()
    image, label = wrapped[3]
    assert torch.equal(image, torch.from_numpy(images[3])) and label == eval_rotations(10)[3]
    assert not hasattr(RotationTargets(TensorDataset(torch.zeros(2, 3))), 'data')  # streamed images have none


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 4))


def test_the_test_score_is_one_fixed_rotation_per_image_for_any_loader_and_batch_size():
    images = np.random.RandomState(0).randint(0, 256, size=(23, 8, 8, 3)).astype(np.uint8)

    class Images:
        data, targets = images, np.zeros(23, dtype=np.int64)

        def __len__(self):
            return 23

    val_set = RotationTargets(Images())
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    labels = eval_rotations(23)
    loaders = [DeviceLoader(val_set.data, val_set.targets, range(23), batch, 'cpu', mean, std, train=False,
                            channels_last=channels_last) for batch, channels_last in ((5, False), (23, True), (1, False))]
    loaders.append(DataLoader(TensorDataset(x, labels), batch_size=4))  # the classic loader's way
    # By hand: every image rotated by its own fixed label, classified once.
    with torch.no_grad():
        model = _model().eval()
        logits = model(torch.stack([torch.rot90(img, int(k), dims=(1, 2)) for img, k in zip(x, labels)]))
    top1 = 100 * (logits.argmax(1) == labels).double().mean().item()
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    for loader in loaders:
        metrics = evaluate(_model(), torch.nn.CrossEntropyLoss(), loader, torch.device('cpu'), 4,
                           batch_fn=rotated_as_labelled)
        assert metrics['count'] == 23 and abs(metrics['top1'] - top1) < 1e-4 and abs(metrics['loss'] - loss) < 1e-5
        assert metrics['confusion'].sum(axis=1).tolist() == torch.bincount(labels, minlength=4).tolist()
