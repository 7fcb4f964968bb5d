"""All process-group logic lives here, so scripts only ask "am I rank 0?" and "sum this over ranks".

A run is distributed when launched by `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment)
or by the original MoCo flags (`--multiprocessing-distributed --dist-url --world-size --rank`, which
spawn one process per GPU and join through `setup`). A plain `python script.py` is world size 1
and never touches torch.distributed.

Every collective here must be called by every rank at the same point of the program, or the ranks
that called it wait for the others until the timeout: call sites say why each one is collective.
"""
import atexit
import contextlib
import dataclasses
import datetime
import os
import re
import sys
import tempfile
from typing import Optional

import torch
import torch.distributed as torch_dist

from errors import UserError

# Bounded, so an unreachable --dist-url or a dead peer ends in a message instead of a hang.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=int(os.environ.get('IMB_DIST_TIMEOUT_MIN', '30')))


def loader_workers(per_node):
    """This process's data-loading workers when -j is left out: the larger of `per_node` (the script's own
    default, the workers of a node) and the CPU cores this process may use (os.sched_getaffinity: SLURM's
    --cpus-per-task, taskset) less one for itself, each shared by the processes of its node (LOCAL_WORLD_SIZE,
    torchrun's or MoCo's launcher's). JPEG decoding plus the ResNet-50 training transform runs at about 300
    images/s per core (bench/README.md), while one H100 trains ResNet-50 on thousands per second
    (docs/gpu.md): every core decoding is still the bottleneck there."""
    procs = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return max(-(-per_node // procs), cores // procs - 1)


def launched_by_torchrun():
    return 'RANK' in os.environ and 'WORLD_SIZE' in os.environ


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    device: str              # 'cpu' or 'cuda:N'
    backend: Optional[str]   # process-group backend; None for a single process


def plan_device(gpu, local_rank, world_size, num_gpus, local_world_size=1, backend=None):
    """Which device this process trains on, and the group's backend: a pure function of what it is given.

    One decision per process, the same rule on every rank: NCCL if and only if CUDA is used, unless
    `backend` (IMB_DIST_BACKEND) says otherwise. Under a launcher, process `local_rank` of a node
    takes visible GPU `local_rank`; with one GPU visible per process (SLURM --gpus-per-task=1, where
    nothing tells the process how many share its node) that is GPU 0 of each. `local_world_size`
    (processes on this node, torchrun's LOCAL_WORLD_SIZE) larger than the visible GPUs means
    processes would share a GPU, which NCCL refuses only at its first collective ("Duplicate GPU"):
    refused here unless gloo was chosen. `--gpu` only picks the GPU of a single-process run.
    """
    if world_size > 1 and gpu is not None:
        raise UserError("--gpu picks the GPU of a single-process run; in a distributed run process i uses "
                        "GPU LOCAL_RANK (choose the GPUs with CUDA_VISIBLE_DEVICES instead)")
    if gpu is not None:
        if num_gpus == 0:
            raise UserError(f"--gpu {gpu} was given but no CUDA GPU is available; leave --gpu out to run on the CPU")
        if gpu >= num_gpus:
            raise UserError(f"--gpu {gpu} does not exist: this machine shows {num_gpus} GPU(s), "
                            f"--gpu 0 to {num_gpus - 1} (CUDA_VISIBLE_DEVICES renumbers them from 0)")
        return DevicePlan(f'cuda:{gpu}', None)
    if world_size == 1:
        return DevicePlan('cuda:0' if num_gpus else 'cpu', None)
    if num_gpus == 0:
        return DevicePlan('cpu', 'gloo')  # NCCL moves CUDA tensors only
    backend = backend or 'nccl'
    procs = max(local_world_size, local_rank + 1)
    # One visible GPU and no LOCAL_WORLD_SIZE: the per-task GPU binding above, not a shared GPU.
    if backend == 'nccl' and procs > num_gpus and (num_gpus > 1 or local_world_size > 1):
        raise UserError(f"{procs} processes on this node but {num_gpus} visible "
                        f"GPU(s): NCCL needs a GPU per process; start at most {num_gpus} per node "
                        f"(torchrun --nproc_per_node {num_gpus}), or set IMB_DIST_BACKEND=gloo to share the GPUs "
                        f"(slower; for testing)")
    return DevicePlan(f'cuda:{local_rank % num_gpus}', backend)


def check_arch(capability, arch_list, name='this GPU'):
    """Refuse a GPU this torch build has no kernels for, which otherwise fails at its first kernel
    ("no kernel image is available"). `capability`: (major, minor); `arch_list`: torch.cuda.get_arch_list().
    A cubin for sm_XY runs on X.Z with Z >= Y (same major; 'a'/'f' variants only on their own
    major.minor); PTX (compute_XY) is compiled by the driver for any XY and later."""
    cc = 10 * capability[0] + capability[1]

    def runs(arch):
        kind, _, version = arch.partition('_')
        exact = version[-1:] in ('a', 'f')
        v = int(version.rstrip('af'))
        if kind == 'compute':
            return v <= cc
        return v == cc if exact else (v // 10 == cc // 10 and v <= cc)

    if not arch_list or any(runs(a) for a in arch_list):
        return
    raise UserError(f"{name} is sm_{cc}, but this PyTorch ({torch.__version__}) has CUDA kernels for "
                    f"{' '.join(arch_list)} only; install a PyTorch build that lists sm_{cc} in "
                    f"torch.cuda.get_arch_list() (README: Installation), or run on the CPU with CUDA_VISIBLE_DEVICES=")


# Where an installed NVIDIA driver shows itself, GPUs usable or not: its version, and its control device.
NVIDIA_VERSION_FILE = '/proc/driver/nvidia/version'
NVIDIA_CONTROL_DEVICE = '/dev/nvidiactl'
# The oldest Linux driver branch each CUDA major version runs on (NVIDIA's CUDA minor version compatibility:
# 450.80.02 for 11.x, 525.60.13 for 12.x, 580.65.06 for 13.x).
MIN_DRIVER = {11: 450, 12: 525, 13: 580}


def visible_gpus():
    """The GPUs this process can use (0: the CPU). Where torch cannot use the GPUs of a machine that has
    them (a driver older than this wheel's CUDA, a CPU-only wheel, GPUs not granted to this job), torch
    says only False, and a run would train on the CPU for days without a word: refused in one line, unless
    the GPUs are hidden on purpose (CUDA_VISIBLE_DEVICES= or -1)."""
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    hidden = os.environ.get('CUDA_VISIBLE_DEVICES')
    if hidden is None or hidden.strip() not in ('', '-1'):
        message = unusable_gpu(hidden)
        if message:
            raise UserError(message)
    return 0


def unusable_gpu(visible=None):
    """Why torch cannot use this machine's NVIDIA GPU, in one line, or None where no NVIDIA driver is
    installed. `visible`: CUDA_VISIBLE_DEVICES, if set."""
    try:
        with open(NVIDIA_VERSION_FILE) as f:
            found = re.search(r'Kernel Module.*?\s(\d+)((?:\.\d+)+)\s', f.read())
        driver, branch = (found.group(1) + found.group(2), int(found.group(1))) if found else ('(version unknown)', None)
    except OSError:
        if not os.path.exists(NVIDIA_CONTROL_DEVICE):
            return None
        driver, branch = '(version unknown)', None
    on_purpose = "or set CUDA_VISIBLE_DEVICES= to train on the CPU on purpose"
    wheel = f"this PyTorch ({torch.__version__}"
    cuda = torch.version.cuda
    if cuda is None:
        return (f"this machine has an NVIDIA driver {driver} but {wheel}) is a CPU-only build: install a CUDA "
                f"build (docs/gpu.md), {on_purpose}")
    need = MIN_DRIVER.get(int(cuda.split('.')[0]))
    if branch is not None and need is not None and branch < need:
        fits = max((v for v, b in MIN_DRIVER.items() if b <= branch), default=None)
        way = f"install a cu{fits}x wheel of PyTorch (docs/gpu.md) or a newer driver" if fits else \
            "install a newer driver"
        return (f"the NVIDIA driver {driver} is older than {wheel}) needs for its CUDA {cuda} (driver {need} or "
                f"later), so torch cannot use the GPU: {way}, {on_purpose}")
    shown = f" with CUDA_VISIBLE_DEVICES={visible}" if visible is not None else ''
    return (f"this machine has an NVIDIA driver {driver} but torch ({torch.__version__}, CUDA {cuda}) sees no "
            f"usable GPU{shown} (none granted to this job, or /dev/nvidia* not accessible?): ask for a GPU, "
            f"{on_purpose}")


@dataclasses.dataclass(frozen=True)
class ProcessContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def setup(gpu=None, rank=None, world_size=None, init_method='env://', timeout=DEFAULT_TIMEOUT, backend=None):
    """Pick this process's device and join the process group. Returns a ProcessContext.

    Without `rank`, the layout comes from torchrun's RANK / WORLD_SIZE / LOCAL_RANK (none: one
    process, no torch.distributed at all). `backend` overrides NCCL on GPUs (MoCo's --dist-backend;
    the environment's IMB_DIST_BACKEND wins over both); CPU processes always use gloo. A GPU this torch
    build has no kernels for, or cannot use at all (visible_gpus), is refused here, before the script
    writes anything.
    """
    if rank is None:
        rank, world_size = ((int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if launched_by_torchrun()
                            else (0, 1))
    # Not the global rank: on node 2 of a multi-node run, global rank 8 is local rank 0.
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    num_gpus = visible_gpus()
    plan = plan_device(gpu, local_rank, world_size, num_gpus, int(os.environ.get('LOCAL_WORLD_SIZE', 1)),
                       os.environ.get('IMB_DIST_BACKEND') or backend)
    device = torch.device(plan.device)
    if device.type == 'cuda':
        # Before any CUDA work, so no context opens on GPU 0 for a process that uses another GPU.
        torch.cuda.set_device(device)
        check_arch(torch.cuda.get_device_capability(device), torch.cuda.get_arch_list(),
                   torch.cuda.get_device_name(device))
    if world_size > 1 and not is_dist():  # joined already by join_launched_group: one group per run
        _join(plan.backend, init_method, rank, world_size, timeout)
    return ProcessContext(rank, world_size, local_rank, device)


def join_launched_group():
    """Under torchrun with more than one process, join the process group now, before the script's setup()
    (which then finds it joined and keeps it), so that start-up work can be shared: rank 0 decodes an image
    folder while the others wait for its cache (dataset/folder.py). Its backend and timeout are setup()'s
    defaults (IMB_DIST_BACKEND, IMB_DIST_TIMEOUT_MIN), which the later setup() keeps whatever it is passed
    (pretrain_moco.py's --dist-backend / --dist-timeout). Returns whether a group is joined."""
    if launched_by_torchrun() and int(os.environ['WORLD_SIZE']) > 1 and not is_dist():
        setup()
        atexit.register(cleanup)  # a run refused before its script's setup() leaves no group behind
    return is_dist()


def _join(backend, init_method, rank, world_size, timeout):
    try:
        with _c10d_logs_held_back():
            torch_dist.init_process_group(backend, init_method=init_method, rank=rank,
                                          world_size=world_size, timeout=timeout)
    except (RuntimeError, ValueError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not join the process group at {init_method} "
                        f"(rank {rank} of {world_size}): {first_line}") from None


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


def _reduce_int(value, op):
    t = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device())
    torch_dist.all_reduce(t, op=op)
    return int(t.item())


def _collective_device():
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    return torch.device('cuda', torch.cuda.current_device()) if torch_dist.get_backend() == 'nccl' else 'cpu'


def max_over_ranks(value):
    """The largest of an int over all ranks; every rank must call it at the same point."""
    return _reduce_int(value, torch_dist.ReduceOp.MAX) if is_dist() else int(value)


def min_over_ranks(value):
    """The smallest of an int over all ranks; every rank must call it at the same point."""
    return _reduce_int(value, torch_dist.ReduceOp.MIN) if is_dist() else int(value)


def broadcast_int(value):
    """Rank 0's int on every rank (e.g. the run seed, which ranks must share)."""
    if not is_dist():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device())
    torch_dist.broadcast(t, src=0)
    return int(t.item())


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] (picklable objects; e.g. every rank's RNG state)."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None on the others: for what rank 0 alone writes
    (iNaturalist's training features are 3.6 GB; all_gather_object would hold them on every rank)."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size() if is_main_process() else None
    torch_dist.gather_object(obj, out, dst=0)
    return out


def broadcast_buffers(module):
    """Give every rank rank 0's buffers (BatchNorm running statistics). DDP syncs them only at the start
    of a training forward, so after the last step each rank holds statistics of its own shard; call
    before evaluating or saving, so every rank evaluates the model rank 0 saves. Collective."""
    if is_dist():
        for buf in module.buffers():
            torch_dist.broadcast(buf, src=0)


def raise_if_any(error):
    """Every rank calls this at the same point with its own UserError (or None). If any rank failed,
    every rank raises it, so no rank goes on into a collective that the failed one never joins."""
    if not is_dist():
        if error is not None:
            raise error
        return
    failed = [m for m in all_gather_object(None if error is None else str(error)) if m is not None]
    if error is not None:
        raise error
    if failed:
        raise UserError(failed[0])


def on_rank0(fn, *args):
    """`fn(*args)` on rank 0 alone (a save); a UserError it raises stops every rank with its message.
    Collective: every rank calls it at the same point."""
    error = None
    if is_main_process():
        try:
            fn(*args)
        except UserError as e:
            error = e
    raise_if_any(error)


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
