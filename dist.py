"""All process-group logic lives here, so scripts only ask "am I rank 0?" and "sum this over ranks".

A run is distributed when launched by `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment)
or by the original MoCo flags (`--multiprocessing-distributed --dist-url --world-size --rank`, which
spawn one process per GPU and call `init_process_group` themselves through `init`). A plain
`python script.py` is world size 1 and never touches torch.distributed.
"""
import contextlib
import datetime
import os
import sys
import tempfile

import torch
import torch.distributed as torch_dist

from errors import UserError

# Bounded, so an unreachable --dist-url or a dead peer ends in a message instead of a hang.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=int(os.environ.get('IMB_DIST_TIMEOUT_MIN', '30')))


def launched_by_torchrun():
    return 'RANK' in os.environ and 'WORLD_SIZE' in os.environ


def init(rank=None, world_size=None, init_method='env://', backend=None, timeout=DEFAULT_TIMEOUT):
    """Join the process group (no-op for world size 1). Returns (rank, world_size, local_rank)."""
    if rank is None:
        if not launched_by_torchrun():
            return 0, 1, 0
        rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    local_rank = int(os.environ.get('LOCAL_RANK', rank))
    if world_size <= 1:
        return 0, 1, 0
    if backend is None:
        # NCCL needs one GPU per process; gloo runs anywhere, including CPU-only test machines.
        backend = 'nccl' if torch.cuda.is_available() and torch.cuda.device_count() > local_rank else 'gloo'
    if backend == 'nccl':
        torch.cuda.set_device(local_rank)
    try:
        with _c10d_logs_held_back():
            torch_dist.init_process_group(backend, init_method=init_method, rank=rank,
                                          world_size=world_size, timeout=timeout)
    except (RuntimeError, ValueError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not join the process group at {init_method} "
                        f"(rank {rank} of {world_size}): {first_line}") from None
    return rank, world_size, local_rank


@contextlib.contextmanager
def _c10d_logs_held_back():
    """c10d writes every failed connection attempt, with a C++ stack, straight to file descriptor 2.
    Hold that back while joining the group: written out if the join succeeds, replaced by
    `init`'s one-sentence UserError if it fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        joined = False
        try:
            yield
            joined = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if joined:
                held.seek(0)
                os.write(2, held.read())


def is_dist():
    return torch_dist.is_available() and torch_dist.is_initialized()


def get_rank():
    return torch_dist.get_rank() if is_dist() else 0


def get_world_size():
    return torch_dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_dist():
        torch_dist.barrier()


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (identity for one process) and return it."""
    if is_dist():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def max_over_ranks(value):
    """The largest of an int over all ranks; every rank must call it at the same point."""
    if not is_dist():
        return value
    nccl = torch_dist.get_backend() == 'nccl'
    t = torch.tensor([value], device=torch.device('cuda', torch.cuda.current_device()) if nccl else 'cpu')
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return int(t.item())


def all_gather_cat(tensor):
    """Concatenate equally shaped tensors from every rank along dim 0 (MoCo's shuffle-BN)."""
    if not is_dist():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    torch_dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def cleanup():
    if is_dist():
        torch_dist.destroy_process_group()


def select_device(gpu=None, local_rank=0):
    """`--gpu N` -> cuda:N; otherwise this process's GPU if there is one, else the CPU."""
    if gpu is not None:
        if not torch.cuda.is_available():
            raise UserError(f"--gpu {gpu} was given but no CUDA GPU is available; leave --gpu out to run on the CPU")
        if gpu >= torch.cuda.device_count():
            raise UserError(f"--gpu {gpu} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
        return torch.device('cuda', gpu)
    if torch.cuda.is_available():
        return torch.device('cuda', local_rank % torch.cuda.device_count())
    return torch.device('cpu')
