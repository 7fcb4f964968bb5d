"""How a training batch is split over GPUs: the original's per-GPU BatchNorm batches.

The original wrapped both networks in `nn.DataParallel` over every visible GPU of one process:
each batch (after `shuffle: true` permuted it) was cut with `torch.chunk` into contiguous pieces,
one per GPU (100 on 8 GPUs: seven of 13 and one of 9), every BatchNorm layer normalised each piece
with that piece's own statistics, the running statistics kept were GPU 0's (the first piece's:
replica 0 updates the module's own buffers, the other replicas' copies are dropped), and the loss
was the mean over the whole gathered batch. Three launches give that layout here:

- one process, G > 1 visible GPUs (no --gpu): `nn.DataParallel` over them, as the original (its
  replicas under the caller's bf16 autocast and in channels_last, `DataParallel` below);
- one process, `--bn_pieces G`: `SequentialPieces` runs the G pieces one after another on one
  device, the same BatchNorm batches as G GPUs (e.g. an 8-GPU run's numbers on one GPU, or a CPU);
- torchrun, W processes: process r loads and trains piece r of every batch (data.RankBatches),
  its loss scaled by (piece size x W / batch) so that DDP's gradient average is the mean over the
  whole batch, and DDP's buffer broadcast keeps rank 0's (the first piece's) running statistics.
"""
import torch
import torch.nn as nn

import dist
from errors import UserError


def piece_sizes(batch, pieces):
    """The sizes `torch.chunk` (DataParallel's scatter) cuts `batch` samples into over `pieces`."""
    return [len(p) for p in torch.arange(batch).chunk(pieces)]


def plan_pieces(batch, world, bn_pieces, gpu, num_gpus=None):
    """(pieces, what they are) of a launch, refused in one line where a piece would be empty.

    `world` processes (torchrun), else `--bn_pieces`, else the visible GPUs of a one-process run
    without --gpu (DataParallel; `num_gpus` defaults to this machine's), else one piece."""
    if num_gpus is None:
        num_gpus = dist.visible_gpus()
    if world > 1:
        if bn_pieces is not None:
            raise UserError("--bn_pieces splits the batch of one process; under torchrun each process already "
                            "trains one piece of the batch (leave --bn_pieces out)")
        pieces, what = world, 'processes'
    elif bn_pieces is not None:
        pieces, what = bn_pieces, '--bn_pieces'
    elif gpu is None and num_gpus > 1:
        pieces, what = num_gpus, 'GPUs (DataParallel; --gpu N or --bn_pieces 1 trains on one)'
    else:
        pieces, what = 1, 'device'
    sizes = piece_sizes(batch, pieces)
    if len(sizes) < pieces:
        raise UserError(f"training_opt.batch_size {batch} over {pieces} {what}: torch.chunk (DataParallel's split) "
                        f"makes {len(sizes)} piece(s) of at most {sizes[0]}, so {pieces - len(sizes)} would get "
                        f"no images; use a larger --batch_size or fewer pieces")
    return pieces, what


_STATS = ('running_mean', 'running_var', 'num_batches_tracked')


def rank_loss_weight(piece, world, batch):
    """The weight of a torchrun process's mean loss over its `piece` of a `batch`: DDP averages the
    `world` processes' gradients, so sum_r mean_r x piece_r x world / batch / world is the mean
    over the whole batch, DataParallel's loss, also for uneven pieces (1 for even ones)."""
    return piece * world / batch


def _batchnorms(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


class SequentialPieces(nn.Module):
    """DataParallel's training forward over `pieces` GPUs, run piece after piece on one device:
    each BatchNorm call sees one `torch.chunk` piece, the running statistics kept are the first
    piece's, and the outputs are concatenated (the loss is then the mean over the whole batch,
    and the gradients the sum over pieces, as DataParallel's). Evaluation passes straight through
    (BatchNorm then uses its running statistics, whatever the split)."""

    def __init__(self, module, pieces):
        super().__init__()
        self.module, self.pieces = module, pieces

    def forward(self, x):
        if not self.training or self.pieces == 1:
            return self.module(x)
        first, *rest = x.chunk(self.pieces)
        outputs = [self.module(first)]
        # The other pieces update copies, dropped afterwards, as DataParallel's other replicas. (Not a
        # copy back into the module's buffers: autograd saved them and would see them modified.)
        layers = _batchnorms(self.module)
        kept = [[getattr(m, name) for name in _STATS] for m in layers]
        for m in layers:
            for name in _STATS:
                setattr(m, name, getattr(m, name).clone())
        outputs += [self.module(piece) for piece in rest]
        for m, buffers in zip(layers, kept):
            for name, buf in zip(_STATS, buffers):
                setattr(m, name, buf)
        return torch.cat(outputs)


class _CallersAutocast:
    """A replica run under the autocast state of the thread that made this wrapper. DataParallel's
    parallel_apply runs each replica in a thread of its own and enters autocast there without a
    dtype, so the thread's default applies: float16 on CUDA, not the caller's bfloat16 (and no loss
    scaler). Autocast state is thread-local, so it is taken here, in the caller's thread."""

    def __init__(self, replica, device_type):
        self.replica, self.device_type = replica, device_type
        self.enabled = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type)

    def __call__(self, *inputs, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled):
            return self.replica(*inputs, **kwargs)


class DataParallel(nn.DataParallel):
    """nn.DataParallel whose replicas compute as the module does: under the caller's autocast dtype
    (--amp's bf16), and with channels_last weights where the module's are (replicate's coalesced
    broadcast hands the replicas on GPUs 1..G-1 contiguous NCHW copies, which cuDNN would convert
    at every convolution of every step; converted here once per step, a differentiable copy)."""

    def replicate(self, module, device_ids):
        replicas = super().replicate(module, device_ids)
        nhwc = torch.channels_last
        for replica in replicas:
            for source, copy in zip(module.modules(), replica.modules()):
                for key, param in source._parameters.items():
                    weight = getattr(copy, key, None)
                    if param is not None and param.dim() == 4 and param.is_contiguous(memory_format=nhwc) \
                            and not weight.is_contiguous(memory_format=nhwc):
                        setattr(copy, key, weight.contiguous(memory_format=nhwc))
        return replicas

    def parallel_apply(self, replicas, inputs, kwargs):
        return super().parallel_apply([_CallersAutocast(r, self.src_device_obj.type) for r in replicas],
                                      inputs, kwargs)


def wrap(model, pieces, device):
    """The module one process trains: DataParallel over `pieces` GPUs, SequentialPieces on one
    device, or the model itself for one piece (torchrun wraps its own in DDP)."""
    if pieces == 1:
        return model
    if device.type == 'cuda' and pieces == torch.cuda.device_count() and device.index == 0:
        return DataParallel(model, device_ids=list(range(pieces)))
    return SequentialPieces(model, pieces)
