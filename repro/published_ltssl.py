"""Published top-1 accuracies of long-tailed semi-supervised learning for the rows of `ltssl-cifar10-usb`, and how
reproduce.py reads a train_ssl.py run (best / last top-1, shots, tail-class recall, the pseudo-label distance).

PUBLISHED maps (protocol, dataset, N1, M1, gamma_l, gamma_u, method) -> Published(accuracy, std, seeds, metric,
source). Only numbers of the protocol a table runs are listed (docs/ltssl.md, "Protocols": the same setting under
DASO's or ACR's code gives other numbers). Read from the source named, never estimated:

- [USB] microsoft/Semi-supervised-learning results/classic_cv_imb.csv (file commit 4499503), best top-1 accuracy over
  training, mean ± std of 3 seeds, WRN-28-2, 2^18 steps. Its `supervised` and `fixmatch` rows ran with the cosine
  schedule and no weight decay on BatchNorm and biases; the `fixmatch_*` add-on rows with a constant lr and decay on
  every parameter (core/algorithmbase.py): the usb preset of train_ssl.py does the same.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    accuracy: float   # top-1 accuracy (%), balanced test set
    std: float
    seeds: int
    metric: str       # best: the best evaluation of the run
    source: str

    @property
    def error(self):
        return 100 - self.accuracy


_USB = ('USB classic_cv_imb.csv (microsoft/Semi-supervised-learning, results/, file commit 4499503), best '
        'top-1 over 2^18 steps, 3 seeds; error = 100 - accuracy')
# (N1, M1, gamma) -> {method: (accuracy, std)}; gamma_u = gamma_l (the "consistent" columns)
_USB_C10 = {
    (1500, 3000, 100): {'supervised': (63.83, 0.33), 'fixmatch': (76.69, 0.78), 'fixmatch+darp': (78.49, 0.49),
                        'fixmatch+abc': (83.88, 0.27)},
    (1500, 3000, 150): {'supervised': (59.79, 0.5), 'fixmatch': (73.01, 0.57), 'fixmatch+darp': (74.73, 0.3),
                        'fixmatch+abc': (81.73, 0.25)},
    (500, 4000, 100): {'supervised': (46.63, 0.88), 'fixmatch': (72.41, 1.71), 'fixmatch+darp': (74.67, 0.76),
                       'fixmatch+abc': (82.02, 0.58)},
    (500, 4000, 150): {'supervised': (43.39, 1.94), 'fixmatch': (65.37, 0.97), 'fixmatch+darp': (68.97, 0.81),
                       'fixmatch+abc': (77.15, 1.26)},
}
PUBLISHED = {('usb', 'cifar10', n, m, g, g, method): Published(acc, std, 3, 'best', _USB)
             for (n, m, g), rows in _USB_C10.items() for method, (acc, std) in rows.items()}


def tail_classes(counts):
    """The ceil(3 C / 10) classes with the fewest labeled images, the later of equal ones first: CIFAR-10's and
    the digits' 7, 8, 9."""
    order = sorted(range(len(counts)), key=lambda c: (counts[c], -c))
    return sorted(order[:-(-3 * len(counts) // 10)])


def read_ssl_result(args, log_dir):
    """A finished train_ssl.py run's numbers, or None: train.py's (best, last, shots by the labeled counts, per-class
    accuracy) plus 'extra': 'tail' (mean last-evaluation accuracy of tail_classes, %) and 'kl' (the last
    period's KL(pseudo-label histogram || true unlabeled distribution), log_pseudo.csv; None for supervised)."""
    import os

    import numpy as np

    from dataset.ltssl_split import COUNTS
    from ltssl.diagnostics import read_pseudo_log
    from repro.results import read_trainer_log, with_labeled_shots
    counts = COUNTS[args.protocol](args.num_max, {'cifar10': 10, 'digits': 10}.get(args.dataset, 100), args.imb_factor)
    result = with_labeled_shots(read_trainer_log(os.path.join(log_dir, 'log_test.csv')), np.asarray(counts))
    if result is None:
        return None
    pseudo = os.path.join(log_dir, 'log_pseudo.csv')
    records = read_pseudo_log(pseudo) if os.path.isfile(pseudo) else []
    tail = float(np.mean(result['per_class'][tail_classes(counts)]))
    return {**result, 'extra': {'tail': tail, 'kl': records[-1]['kl_used'] if records else None,
                                'kl_raw': records[-1]['kl_raw'] if records else None}}
