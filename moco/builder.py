"""MoCo: a query encoder, a momentum (key) encoder and a queue of negative keys.

He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning" (MoCo,
https://arxiv.org/abs/1911.05722), with the MLP head of Chen et al. 2020, "Improved Baselines with
Momentum Contrastive Learning" (MoCo v2, https://arxiv.org/abs/2003.04297). Follows
facebookresearch/moco's moco/builder.py, so state_dict keys (encoder_q.*, encoder_k.*, queue,
queue_ptr) match its checkpoints. Differences: any world size works, including a single process
without torch.distributed (the gathers are then identities), and the queue write wraps around.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import dist


class MoCo(nn.Module):
    """Build a MoCo model with: a query encoder, a key encoder, and a queue."""

    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.07, mlp=False):
        """
        base_encoder: callable num_classes -> model with its head at `.fc` (a models.MODELS builder)
        dim: feature dimension (default: 128)
        K: queue size; number of negative keys (default: 65536)
        m: moco momentum of updating key encoder (default: 0.999)
        T: softmax temperature (default: 0.07)
        mlp: MoCo v2's 2-layer projection head instead of one linear layer
        """
        super().__init__()
        self.K = K
        self.m = m
        self.T = T

        # create the encoders; num_classes is the output fc dimension
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)

        if mlp:  # MoCo v2: fc (d -> dim) becomes Linear(d, d) - ReLU - fc, keys fc.0.* and fc.2.*
            dim_mlp = self.encoder_q.fc.in_features
            self.encoder_q.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_q.fc)
            self.encoder_k.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_k.fc)

        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)  # initialize
            param_k.requires_grad = False  # not updated by gradient

        # the queue: K unit-norm keys of dimension dim, stored as columns, (dim, K)
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        """Momentum update of the key encoder (MoCo Eq. 2): theta_k <- m theta_k + (1 - m) theta_q."""
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.mul_(self.m).add_(param_q.data, alpha=1. - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        """Replace the oldest keys by this step's keys (N, dim) from every rank, (world * N, dim)."""
        keys = dist.all_gather_cat(keys)
        batch_size = keys.shape[0]
        # columns ptr, ptr+1, ... modulo K: the queue is a ring buffer, so the write wraps around. The
        # pointer stays on the device (int(queue_ptr) would make the host wait for it every step).
        idx = (self.queue_ptr + torch.arange(batch_size, device=self.queue.device)) % self.K
        self.queue[:, idx] = keys.T.to(self.queue.dtype)  # bf16 keys under --amp; the queue stays float32
        self.queue_ptr.add_(batch_size).remainder_(self.K)  # move pointer

    @torch.no_grad()
    def _batch_shuffle_ddp(self, x):
        """Batch shuffle across ranks, for making use of BatchNorm (MoCo Sec. 3.3, "Shuffling BN").

        x: this rank's images (N, ...). Returns (N, ...) images drawn from the gathered
        (world * N, ...) batch by a permutation common to all ranks, and the inverse permutation
        (world * N,). With one process this is a local random permutation.
        """
        batch_size_this = x.shape[0]
        x_gather = dist.all_gather_cat(x)
        batch_size_all = x_gather.shape[0]
        num_ranks = batch_size_all // batch_size_this

        # rank 0's random permutation, shared with every rank: each rank draws one, all take the first
        idx_shuffle = dist.all_gather_cat(torch.randperm(batch_size_all, device=x.device).unsqueeze(0))[0]
        # index for restoring
        idx_unshuffle = torch.argsort(idx_shuffle)

        # shuffled index for this rank
        idx_this = idx_shuffle.view(num_ranks, -1)[dist.get_rank()]
        return x_gather[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x, idx_unshuffle):
        """Undo batch shuffle: x (N, ...) computed on shuffled images -> (N, ...) in this rank's order."""
        batch_size_this = x.shape[0]
        x_gather = dist.all_gather_cat(x)
        batch_size_all = x_gather.shape[0]
        num_ranks = batch_size_all // batch_size_this

        # restored index for this rank
        idx_this = idx_unshuffle.view(num_ranks, -1)[dist.get_rank()]
        return x_gather[idx_this]

    def forward(self, im_q, im_k):
        """
        Input:
            im_q: a batch of query images (N, 3, H, W)
            im_k: a batch of key images (N, 3, H, W), other augmentations of the same images
        Output:
            logits (N, 1 + K): column 0 the positive key, then the K queued negatives, over T
            labels (N,): zeros, the index of the positive (InfoNCE, MoCo Eq. 1, as cross-entropy)
        """
        # compute query features
        q = F.normalize(self.encoder_q(im_q), dim=1)  # queries: (N, dim)

        # compute key features
        with torch.no_grad():  # no gradient to keys
            self._momentum_update_key_encoder()  # update the key encoder

            # shuffle for making use of BN
            im_k, idx_unshuffle = self._batch_shuffle_ddp(im_k)

            k = F.normalize(self.encoder_k(im_k), dim=1)  # keys: (N, dim)

            # undo shuffle
            k = self._batch_unshuffle_ddp(k, idx_unshuffle)

        # positive logits: (N, 1)
        l_pos = torch.einsum('nc,nc->n', q, k).unsqueeze(-1)
        # negative logits: (N, K)
        l_neg = torch.einsum('nc,ck->nk', q, self.queue.clone().detach())

        # logits: (N, 1 + K), with temperature
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T

        # labels: positive key indicators
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)

        # dequeue and enqueue
        self._dequeue_and_enqueue(k)

        return logits, labels
