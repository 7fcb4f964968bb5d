"""The rotation pre-training task's labels (pretrain_rot.py): balanced random rotations for training batches,
and the one rotation, fixed for good, at which each test image is scored."""
import torch

NUM_ROTATIONS = 4  # 0, 90, 180 and 270 degrees counter-clockwise
# Not the run's --seed: every run and every epoch scores a test image at the same rotation.
EVAL_ROTATION_SEED = 0


def rotation_labels(batch_size, generator=None):
    """[0, 1, 2, 3] repeated to `batch_size`, randomly permuted: balanced over the 4 rotations."""
    labels = torch.arange(NUM_ROTATIONS).repeat(-(-batch_size // NUM_ROTATIONS))[:batch_size]
    return labels[torch.randperm(batch_size, generator=generator)]


def eval_rotations(n):
    """The rotation each of `n` test images is scored at: rotation_labels over the whole set from a fixed
    seed, so a quarter of the images (+-1) at each angle, whatever the batch size, loader or ranks."""
    return rotation_labels(n, torch.Generator().manual_seed(EVAL_ROTATION_SEED))


class RotationTargets(torch.utils.data.Dataset):
    """`dataset` (its images, `.data` if it has them, for the device loader) with its class labels
    replaced by each image's evaluation rotation (`eval_rotations`): any loader delivers them as the
    targets, which pretrain_rot.rotated_as_labelled applies."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.targets = eval_rotations(len(dataset)).numpy()

    @property
    def data(self):
        return self.dataset.data

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index][0], int(self.targets[index])
