import math

import numpy as np
import pytest
import torch

from trainer import TRAIN_RULES, lr_at
from utils import AverageMeter, accuracy, rng_state, set_rng_state, shot_accuracy


def test_accuracy_top1_top5_and_noncontiguous():
    output = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.3, 0.4, 0.3]])
    target = torch.tensor([1, 2, 2, 0])
    top1, top5 = accuracy(output, target, topk=(1, 5))
    assert top1.item() == pytest.approx(50.0)
    assert top5.item() == pytest.approx(100.0)  # k > C counts as k = C
    top1_t, = accuracy(output.t().contiguous().t(), target[::1], topk=(1,))
    assert top1_t.item() == pytest.approx(50.0)
    top2, = accuracy(output.t().contiguous().t()[:, :3], target, topk=(2,))
    assert top2.item() == pytest.approx(75.0)


def test_average_meter_weighted():
    m = AverageMeter()
    m.update(1.0, n=1)
    m.update(4.0, n=3)
    assert m.avg == pytest.approx(13 / 4) and m.val == 4.0 and m.count == 4


def test_shot_accuracy_hand_made():
    # classes with 500, 101 (many), 100, 20 (medium), 19, 1 (few) training images
    counts = [500, 101, 100, 20, 19, 1]
    per_class = [0.9, 0.7, 0.6, 0.4, 0.2, 0.0]
    shots = shot_accuracy(per_class, counts)
    assert shots['many'] == pytest.approx(0.8)
    assert shots['medium'] == pytest.approx(0.5)
    assert shots['few'] == pytest.approx(0.1)
    assert math.isnan(shot_accuracy([0.5, 0.5], [500, 300])['few'])


def test_shot_accuracy_leaves_out_a_class_absent_from_the_evaluated_split():
    """A folder's val/ without any image of one class: that class's accuracy is 0/0 (NaN); its group is the mean
    of the classes that were evaluated, not NaN (and the NaN never counts as 0)."""
    counts = [500, 300, 50, 30, 10, 5]
    per_class = [0.9, float('nan'), 0.6, 0.4, float('nan'), float('nan')]
    shots = shot_accuracy(np.array(per_class), counts)
    assert shots['many'] == pytest.approx(0.9)
    assert shots['medium'] == pytest.approx(0.5)
    assert math.isnan(shots['few'])  # no few-shot class was evaluated


@pytest.mark.parametrize('epoch1,expected', [(1, 0.02), (5, 0.1), (6, 0.1), (160, 0.1), (161, 1e-3),
                                             (180, 1e-3), (181, 1e-5), (200, 1e-5)])
def test_lr_schedule(epoch1, expected):
    assert lr_at(epoch1 - 1, 0.1) == pytest.approx(expected)


def test_drw_switches_at_epoch_160():
    cls = [5000, 500, 50]
    before = TRAIN_RULES['DRW'].weights(159, cls, 160)
    after = TRAIN_RULES['DRW'].weights(160, cls, 160)
    assert torch.allclose(before, torch.ones(3))
    assert after[2] > after[1] > after[0] and after.sum().item() == pytest.approx(3.0)
    assert torch.allclose(TRAIN_RULES['Reweight'].weights(0, cls, 160), after)
    assert TRAIN_RULES['None'].weights(170, cls, 160) is None


def test_rng_state_round_trip():
    state = rng_state()
    a = (np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (np.random.rand(), torch.rand(1).item()) == a
