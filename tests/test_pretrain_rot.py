"""Rotation pre-training: balanced rotation labels, images rotated as labelled."""
import torch

from pretrain_rot import all_rotations_batch, random_rotation_batch, rotate, rotation_labels


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


def test_training_and_evaluation_batches():
    images = torch.randn(8, 3, 6, 6)
    rotated, labels = random_rotation_batch(images, torch.zeros(8, dtype=torch.long))
    assert torch.equal(rotated, rotate(images, labels)) and torch.bincount(labels, minlength=4).tolist() == [2] * 4
    every, labels = all_rotations_batch(images, None)
    assert every.shape == (32, 3, 6, 6) and labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8 + [3] * 8
    assert torch.equal(every[8:16], torch.rot90(images, 1, dims=(2, 3)))
