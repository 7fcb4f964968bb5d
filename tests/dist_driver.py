"""Run one of the project's scripts under torchrun with test probes, so tests can see every rank.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_driver.py SCRIPT [args...]

Probes, switched on by environment variables (each writes into PROBE_DIR, one file per rank):
  PROBE_STATES=1        every checkpoint state a rank builds -> rank<R>_epoch<E>_step<S>.pt (its weights)
  PROBE_INDICES=1       the sample indices each rank's sampler yields -> rank<R>_indices.txt
  PROBE_AUGMENT=1       one torch.rand() drawn in the training transform per image -> rank<R>_augment.txt
  PROBE_NAN_AT=R:S      rank R's training loss becomes NaN at its S-th training step
  PROBE_FULL_DISK=F:N:B on rank 0, writes of file F fail with ENOSPC after B bytes from its N-th opening on
  SMALL_DIGITS=1        `--dataset digits` is fixtures.shrink_digits' 40 images per digit (10 for testing):
                        less compute where a test needs ranks that agree, not a full data set
"""
import os
import runpy
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import fixtures  # noqa: E402  (tests/, this script's folder, is on sys.path)
import trainer  # noqa: E402
from dataset import samplers  # noqa: E402

RANK = int(os.environ.get('RANK', 0))
PROBE_DIR = os.environ.get('PROBE_DIR', '')


def _path(name):
    return os.path.join(PROBE_DIR, f'rank{RANK}_{name}')


if os.environ.get('PROBE_STATES'):
    real_state = trainer._state

    def _state(*args, **kwargs):
        state = real_state(*args, **kwargs)
        torch.save(state['state_dict'], _path(f"epoch{state['epoch']}_step{state['step']}.pt"))
        return state

    trainer._state = _state

if os.environ.get('PROBE_INDICES'):
    real_iter = samplers.EpochSampler.__iter__

    def _iter(self):
        order = list(real_iter(self))
        with open(_path('indices.txt'), 'a') as f:
            f.write(f"{self.epoch} {' '.join(map(str, order))}\n")
        return iter(order)

    samplers.EpochSampler.__iter__ = _iter

if os.environ.get('PROBE_AUGMENT'):
    real_loaders = trainer._loaders

    class _Recorded:
        """Wraps the training transform: records a draw from the RNG stream that augments this image."""

        def __init__(self, transform):
            self.transform = transform

        def __call__(self, img):
            with open(_path('augment.txt'), 'a') as f:
                f.write(f"{torch.rand(1).item():.8f}\n")
            return self.transform(img)

    def _loaders(args, exp, *rest):
        exp.train_set.transform = _Recorded(exp.train_set.transform)
        return real_loaders(args, exp, *rest)

    trainer._loaders = _loaders

if os.environ.get('PROBE_NAN_AT'):
    nan_rank, nan_step = map(int, os.environ['PROBE_NAN_AT'].split(':'))
    real_build = trainer.build_criterion
    calls = {'n': 0}

    def build_criterion(*args, **kwargs):
        criterion = real_build(*args, **kwargs)
        real_forward = criterion.forward

        def forward(logits, target):
            calls['n'] += 1
            loss = real_forward(logits, target)
            return loss * float('nan') if RANK == nan_rank and calls['n'] == nan_step else loss

        criterion.forward = forward
        return criterion

    trainer.build_criterion = build_criterion

if os.environ.get('PROBE_FULL_DISK') and RANK == 0:
    name, nth, after = os.environ['PROBE_FULL_DISK'].split(':')
    fixtures.full_disk(setattr, name, int(after), int(nth))

if os.environ.get('SMALL_DIGITS'):
    fixtures.shrink_digits(setattr)

script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(os.path.join(REPO, script), run_name='__main__')
