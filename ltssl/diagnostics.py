"""Pseudo-label diagnostics of a semi-supervised run: one line per evaluation period in log_pseudo.csv.

Over the period's steps (all ranks), of every unlabeled image a step saw:
- mask_rate: the share whose pseudo-label passed the threshold;
- raw / used counts: images per class by the argmax of the weak-view softmax, and of the probabilities
  the pseudo-labels were taken from (DARP's refined rows; the same as raw for FixMatch);
- kl_raw / kl_used: KL(counts / total || true unlabeled class distribution) of those two histograms, in nats;
- precision / recall per class of the pseudo-labels that passed the threshold, against the hidden true labels.
The hidden labels are read here only; training never sees them (tests/test_ssl.py permutes them).
The sums are kept on the device and read once per period (a collective under DDP); a mid-period checkpoint
holds their sum over the ranks, which rank 0 takes back on resume, so the period's line comes out the same.
"""
import json
import re

import numpy as np
import torch

import dist
from errors import UserError

LOG = 'log_pseudo.csv'


class PseudoLabelStats:
    """Call with (raw probs, used probs, mask, SSLBatch) at every step; `lines(epoch)` at the period's end."""

    def __init__(self, truth, true_counts):
        self.truth = torch.as_tensor(np.asarray(truth, dtype=np.int64))
        self.num_classes = len(true_counts)
        true = np.asarray(true_counts, dtype=np.float64)
        self.true_dist = true / true.sum()
        self._zero(torch.device('cpu'))

    def _zero(self, device):
        c = self.num_classes
        # seen, passed, raw counts (C), used counts (C), true counts seen (C), confusion of passed (C x C)
        self.sums = torch.zeros(2 + 3 * c + c * c, dtype=torch.float64, device=device)

    def __call__(self, raw, used, mask, batch):
        device = raw.device
        if self.sums.device != device:
            self.truth = self.truth.to(device)
            self.sums = self.sums.to(device)
        c = self.num_classes
        true = self.truth[batch.idx_ulb]
        ones = torch.ones_like(mask, dtype=torch.float64)
        used_label = used.argmax(dim=1)
        self.sums[0] += mask.numel()
        self.sums[1] += mask.double().sum()
        self.sums[2:].index_add_(0, raw.argmax(dim=1), ones)
        self.sums[2 + c:].index_add_(0, used_label, ones)
        self.sums[2 + 2 * c:].index_add_(0, true, ones)
        self.sums[2 + 3 * c:].index_add_(0, true * c + used_label, mask.double())

    def state_dict(self):
        """The sums over the ranks so far (collective under DDP)."""
        return {'sums': dist.all_reduce_sum(self.sums.clone()).cpu()}

    def load_state_dict(self, state):
        sums = state['sums'].to(self.sums.device, torch.float64)
        self.sums = sums if dist.is_main_process() else torch.zeros_like(sums)

    def _kl(self, counts):
        p = counts / max(counts.sum(), 1)
        nz = p > 0
        return float(np.sum(p[nz] * np.log(p[nz] / self.true_dist[nz])))

    def lines(self, epoch):
        """[the log line of 0-based period `epoch`]; the sums start again. Collective under DDP."""
        sums = dist.all_reduce_sum(self.sums.clone()).cpu().numpy()
        self.sums.zero_()
        c = self.num_classes
        seen, passed = sums[0], sums[1]
        raw, used, true = sums[2:2 + c], sums[2 + c:2 + 2 * c], sums[2 + 2 * c:2 + 3 * c]
        confusion = sums[2 + 3 * c:].reshape(c, c)
        with np.errstate(invalid='ignore', divide='ignore'):
            precision = np.diag(confusion) / confusion.sum(axis=0)
            recall = np.diag(confusion) / true
        record = {'mask_rate': passed / max(seen, 1), 'kl_raw': self._kl(raw), 'kl_used': self._kl(used),
                  'raw_counts': raw.astype(int).tolist(), 'used_counts': used.astype(int).tolist(),
                  'precision': [None if np.isnan(v) else round(float(v), 4) for v in precision],
                  'recall': [None if np.isnan(v) else round(float(v), 4) for v in recall]}
        return [f"Epoch: [{epoch}] " + json.dumps(record, separators=(',', ':'))]


_LINE = re.compile(r'Epoch: \[(\d+)\] (\{.*\})$')


def read_pseudo_log(path):
    """Every period's record of a log_pseudo.csv, in order (dicts of the fields above plus 'epoch')."""
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            m = _LINE.match(line.strip())
            if not m:
                raise UserError(f"{path} line {n}: expected 'Epoch: [E] {{...}}', found {line.strip()[:60]!r}")
            records.append({'epoch': int(m[1]), **json.loads(m[2])})
    return records
