"""One training epoch and one evaluation pass, shared by every script.

Both take any iterable of (images, targets) batches (a DataLoader today, a device-resident loader
later), explicit arguments instead of globals, and return plain metric dicts. `batch_fn` turns a
loaded batch into what the model trains on (identity for classification, random rotations for
pretrain_rot.py).
"""
import contextlib
import platform
import time

import numpy as np
import torch

import dist
from errors import UserError
from utils import accuracy, derive_seed


class DivergenceError(UserError):
    """The loss stopped being finite; carries where it happened."""


def _identity(images, targets):
    return images, targets


def classify(model, images, targets):
    """The default step: logits of `images`, trained against `targets`."""
    return model(images), targets


def to_device(x, device):
    """A tensor or a list of tensors (MoCo's two views) onto `device`."""
    if isinstance(x, (list, tuple)):
        return [to_device(t, device) for t in x]
    return x.to(device, non_blocking=True)


def _print(line, console=None):
    print(console or line, flush=True)


def clock(seconds):
    """A duration as h:mm:ss."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def default_amp(device):
    """Whether bf16 autocast is on by default: on a GPU with native bf16 (compute capability 8.0 and
    later: A100, RTX 30xx, H100), and on a CPU whose bf16 instructions outrun its float32 ones: AMX, or
    AVX512-BF16 on a CPU not made by Intel. bench/README.md measured ResNet-32's training step 1.6x
    faster in bf16 than in float32 on an AMD EPYC with AVX512-BF16, but 1.29x *slower* on an Intel Xeon
    with AVX512-BF16 and no AMX (the same oneDNN bf16 kernels ran on both).
    Not torch.cuda.is_bf16_supported(), which also counts emulation (sm_75: T4, RTX 20xx, where cuDNN
    has no bf16 convolutions)."""
    if device.type == 'cuda':
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != 'cpu':
        return False
    caps = torch.cpu.get_capabilities()
    return bool(caps.get('amx_bf16') or (caps.get('avx512_bf16') and 'GenuineIntel' not in cpu_vendor()))


def cpu_vendor(cpuinfo='/proc/cpuinfo'):
    """The CPU's vendor as Linux's /proc/cpuinfo names it ('GenuineIntel', 'AuthenticAMD'); elsewhere
    platform.processor(), which on Windows ends with it ('Intel64 Family 6 ..., GenuineIntel')."""
    try:
        with open(cpuinfo) as f:
            vendor = next((line.split(':', 1)[1].strip() for line in f if line.startswith('vendor_id')), '')
    except OSError:
        vendor = ''
    return vendor or platform.processor()


def step_hooks(args, device):
    """train_one_epoch's `amp` and `channels_last` from a training script's --amp / --channels-last
    (cli.add_speed_args, cli.add_step_speed_args): --amp's default is default_amp(device)."""
    return {'amp': default_amp(device) if args.amp is None else args.amp, 'channels_last': args.channels_last}


def _nhwc(images):
    """4-D image batches (a tensor, or MoCo's list of two views) in channels_last memory format."""
    if isinstance(images, (list, tuple)):
        return [_nhwc(t) for t in images]
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images


def autocast_forward(run, images, device, amp=False, channels_last=False):
    """`run(images)` under bf16 autocast if `amp` (convolutions and matmuls in bfloat16, which needs no
    loss scaling, unlike float16), on channels_last images if asked; the logits come back in float32."""
    if channels_last:
        images = _nhwc(images)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        return run(images)


# Images per forward pass of an evaluation batch on a CPU: about 40 % more images per CPU-second than
# one pass over the 250-image batch, whose activations outgrow the caches (bench/README.md).
CPU_EVAL_PIECE = 64
# Pieces only for images up to this side (CIFAR, SVHN, digits, small folders: the CIFAR ResNets, where the
# gain and the equality were measured); ImageNet-sized images, whose convolutions may pick other
# algorithms for other batch sizes, keep one pass.
CPU_EVAL_PIECE_MAX_SIDE = 64


def pieced_forward(model, images, device, amp=False, channels_last=False):
    """The logits of a batch of `images` (eval mode), on a CPU computed in pieces of about CPU_EVAL_PIECE
    images and concatenated: the same numbers, bit for bit, as one pass (an image's logits do not depend
    on its batch neighbours, and the CPU kernels compute each image alike in batches of a few dozen and
    more: tests/test_speed.py), so the loss and metrics are still those of the whole batch. Pieces are
    near-equal (tensor_split), so a batch above CPU_EVAL_PIECE never leaves a small remainder: below
    about 12 rows the matrix product of a 100-class head takes other kernels and differs in the last
    bit (measured on the 2-core AMD EPYC, 2 threads). Other devices and images above
    CPU_EVAL_PIECE_MAX_SIDE px: one pass."""
    n = images.size(0)
    if device.type != 'cpu' or n <= CPU_EVAL_PIECE or images.size(-1) > CPU_EVAL_PIECE_MAX_SIDE:
        return autocast_forward(model, images, device, amp, channels_last)
    return torch.cat([autocast_forward(model, piece, device, amp, channels_last)
                      for piece in images.tensor_split(-(-n // CPU_EVAL_PIECE))])


@contextlib.contextmanager
def exact_float32():
    """float32 convolutions and matrix products computed in float32 ('ieee'), for the numbers users compare
    with the paper: on Ampere and newer GPUs cuDNN otherwise runs float32 convolutions in TF32 (a 10-bit
    mantissa). Also a decorator. No effect on a CPU. cuDNN's RNN precision and its legacy flag
    (`torch.backends.cudnn.allow_tf32`, whose getter raises unless convolutions, RNNs and the flag all
    agree: "a mix of the legacy and new APIs") are set along, so that the state stays readable."""
    cudnn = torch.backends.cudnn
    knobs = cudnn.conv, cudnn.rnn, torch.backends.cuda.matmul
    saved = [k.fp32_precision for k in knobs]
    try:
        legacy = cudnn.allow_tf32
    except RuntimeError:  # mixed up before (not by this project): restored as far as it can be read
        legacy = None
    cudnn.allow_tf32 = False  # the flag first: its setter also resets convolutions and RNNs
    for k in knobs:
        k.fp32_precision = 'ieee'
    try:
        yield
    finally:
        if legacy is not None:
            cudnn.allow_tf32 = legacy
        for k, precision in zip(knobs, saved):
            k.fp32_precision = precision


class _StepMeters:
    """Loss and top-1/top-5 of the latest step and their sample-weighted means, kept on the device:
    reading them (`line`, `averages`) is the only host synchronisation, done at print points."""

    def __init__(self, device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, top-1 hits, top-5 hits
        self.last = torch.zeros(3, dtype=torch.float64, device=device)  # the same, per sample, latest step
        # Made once: a tensor built from Python numbers every step would be a copy the host waits for.
        self.per_sample = torch.tensor([1.0, 100.0, 100.0], dtype=torch.float64, device=device)
        self.count = 0

    @torch.no_grad()
    def update(self, loss, output, targets, mixed=None):
        """`mixed`: (second targets, lam) of a mixup step, whose hits count lam-weighted."""
        n = targets.size(0)
        acc1, acc5 = accuracy(output, targets, topk=(1, 5))
        if mixed is not None:
            targets_b, lam = mixed
            acc1, acc5 = (lam * a + (1 - lam) * b
                          for a, b in zip((acc1, acc5), accuracy(output, targets_b, topk=(1, 5))))
        self.last = torch.cat([loss.detach().reshape(1), acc1, acc5]).double()
        self.sums += self.last * n / self.per_sample
        self.count += n

    def state(self):
        """The sums and count, for a mid-epoch checkpoint (a host synchronisation: at a stop only)."""
        return {'sums': self.sums.tolist(), 'count': self.count}

    def load(self, state):
        """Go on from `state()` of the steps a resumed epoch already did: its running averages then equal the
        uninterrupted epoch's (float64 sums, saved exactly)."""
        self.sums = torch.tensor(state['sums'], dtype=torch.float64, device=self.sums.device)
        self.count = int(state['count'])

    def averages(self):
        loss, hits1, hits5 = (self.sums / max(self.count, 1)).tolist()
        return loss, 100.0 * hits1, 100.0 * hits5

    def line(self):
        (loss, top1, top5), (avg_loss, avg1, avg5) = self.last.tolist(), self.averages()
        return f"Loss {loss:.4f} ({avg_loss:.4f})\tPrec@1 {top1:.3f} ({avg1:.3f})\tPrec@5 {top5:.3f} ({avg5:.3f})"


NO_BAD_STEP = 2 ** 62


def _check_finite(first_bad, epoch):
    """Raise DivergenceError on every rank if any rank saw a non-finite loss (collective under DDP:
    called by all ranks at the same print points, so one rank's NaN stops them all together)."""
    bad = dist.min_over_ranks(int(first_bad))
    if bad != NO_BAD_STEP:
        raise DivergenceError(f"the training loss became non-finite at epoch {epoch + 1}, step {bad}; "
                              f"stopped without saving (the last good checkpoint is intact); try a lower --lr")


class Mixup:
    """mixup (Zhang et al., ICLR 2018), as their facebookresearch/mixup-cifar10 code does it: one
    lam ~ Beta(alpha, alpha) per batch, a random permutation `index` of the batch, images
    lam * x + (1 - lam) * x[index], loss lam * L(out, y) + (1 - lam) * L(out, y[index]).

    Both draws are seeded by (run seed, epoch, step, rank), so a run resumed mid-epoch draws for its
    remaining steps what the uninterrupted run drew: lam on the host (numpy's Beta; torch has none that
    takes a generator), the permutation on the device. Nothing waits for the device."""

    STREAM = 0x6d6978  # keeps these seeds apart from the device loader's (seed, epoch, step, rank)

    def __init__(self, alpha, seed, rank, device):
        self.alpha, self.seed, self.rank = alpha, seed, rank
        self.generator = torch.Generator(device=device)

    def __call__(self, images, targets, epoch, step):
        """(mixed images, the second targets y[index], lam) for 0-based `step` of `epoch`."""
        seed = derive_seed(self.seed, self.STREAM, epoch, step, self.rank)
        lam = float(np.random.default_rng(seed).beta(self.alpha, self.alpha))
        self.generator.manual_seed(seed)
        index = torch.randperm(targets.size(0), generator=self.generator, device=targets.device)
        return lam * images + (1 - lam) * images[index], targets[index], lam


def train_one_epoch(model, criterion, loader, optimizer, device, epoch, *, epochs=None, batch_fn=None,
                    forward=classify, print_freq=10, log=_print, should_stop=None, start_step=0, num_steps=None,
                    amp=False, channels_last=False, mixup=None, after_step=None, step_fn=None, before_step=None,
                    start_meters=None):
    """Train for one pass over `loader`. Returns {'loss', 'top1', 'top5', 'lr', 'steps', 'stopped', 'meters'}.

    `forward(model, images, targets) -> (logits, targets)` is one step's prediction: the default
    classifies; MoCo returns its (1+K)-way contrastive logits with the positive key as target.
    `start_step` is where a mid-epoch resume picks up (the loader already skips those batches), and
    `start_meters` the returned 'meters' of the steps before it, so that the printed running averages and the
    epoch's loss and top-1 are the uninterrupted epoch's.
    Print points (every `print_freq` steps and the last step) are the only places that wait for the
    device or talk to other ranks: there the loss is checked for NaN/inf (DivergenceError) and the
    stop request polled; `should_stop(sync)` is also asked after every other step with sync=False
    (a single process may stop there; under DDP the stop is only agreed on at print points).
    Every rank must run the same number of steps (the samplers pad shards to equal length).
    `amp`: bf16 autocast for the forward pass; `channels_last`: NHWC images (for a channels_last model).
    `mixup`: a Mixup, applied after `batch_fn`; the training top-1/top-5 then count each image's hits
    against y and y[index] weighted lam and 1 - lam, as mixup-cifar10's training accuracy does.
    `after_step()`: called after every optimizer step (a projection such as losses.MaxNorm).
    `step_fn(run, batch, epoch, step) -> (loss, logits, targets)`: a step over whatever the loader yields (a
    semi-supervised batch of labeled and unlabeled images), instead of batch_fn / mixup / forward / criterion;
    `run(x)` is the model's forward pass with `amp` and `channels_last`; the meters count `logits` against
    `targets`. `before_step(step)`: called before every step with its 0-based index (a per-step lr).
    At a print point `log(line, console=...)` gets the log line (the original's format, 0-based epoch) and the
    console's: the 1-based epoch of `epochs` (the run's total, if given), the time since the last print and an
    estimate of the training time left (this epoch's pace over the rest of the run's steps).
    """
    batch_fn = batch_fn or _identity
    num_steps = num_steps if num_steps is not None else start_step + len(loader)
    meters = _StepMeters(device)
    if start_meters is not None:
        meters.load(start_meters)
    # First step (1-based) whose loss was not finite, on the device: testing it every step would be
    # a host synchronisation per step.
    first_bad = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=device)
    lr = optimizer.param_groups[-1]['lr']
    model.train()
    step, stopped = start_step, False
    start = end = time.time()
    for batch in loader:
        if before_step is not None:
            before_step(step)
        mixed = None
        if step_fn is not None:
            loss, output, targets = step_fn(lambda x: autocast_forward(model, x, device, amp, channels_last), batch,
                                            epoch, step)
        else:
            images, targets = batch_fn(to_device(batch[0], device), to_device(batch[1], device))
            if mixup is not None:
                images, targets_b, lam = mixup(images, targets, epoch, step)
                mixed = targets_b, lam
            output, targets = autocast_forward(lambda x: forward(model, x, targets), images, device, amp,
                                               channels_last)
            output = output.float()
            if mixed is None:
                loss = criterion(output, targets)
            else:
                loss = lam * criterion(output, targets) + (1 - lam) * criterion(output, targets_b)
        step += 1
        first_bad = torch.where(torch.isfinite(loss.detach()) | (first_bad < NO_BAD_STEP), first_bad,
                                torch.full_like(first_bad, step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        meters.update(loss, output, targets, mixed)

        sync = step % print_freq == 0 or step == num_steps
        if sync:
            _check_finite(first_bad, epoch)
            lr = optimizer.param_groups[-1]['lr']  # the latest step's (constant over an epoch but with before_step)
            now, line = time.time(), meters.line()
            of = f"/{epochs}" if epochs else ''
            steps_left = num_steps - step + num_steps * (epochs - epoch - 1 if epochs else 0)
            left = steps_left * (now - start) / (step - start_step)
            log(f"Epoch: [{epoch}][{step}/{num_steps}], lr: {lr:.5f}\t{line}",
                console=f"Epoch: [{epoch + 1}{of}][{step}/{num_steps}], lr: {lr:.5f}\t{line}\t"
                        f"Time {now - end:.3f} s\tETA {clock(left)}")
            end = now
        if should_stop is not None and should_stop(sync):
            if not sync:
                _check_finite(first_bad, epoch)  # nothing non-finite may be saved by the stop
            stopped = step < num_steps
            break
    loss_avg, top1, top5 = meters.averages()
    return {'loss': loss_avg, 'top1': top1, 'top5': top5, 'lr': lr, 'steps': step, 'stopped': stopped,
            'meters': meters.state()}


# Above this many classes evaluate() keeps no confusion matrix: iNaturalist's 8,142 would make it 530 MB
# per process, all-reduced at every evaluation (1,000 classes: 8 MB).
CONFUSION_MAX_CLASSES = 1000


@exact_float32()
@torch.inference_mode()
def evaluate(model, criterion, loader, device, num_classes, *, batch_fn=None, amp=False, channels_last=False):
    """Loss, top-1/top-5 and the confusion matrix over `loader` (summed over ranks under DDP), in
    float32 unless `amp` (bf16 autocast, an opt-in for evaluation); `channels_last` as in train_one_epoch.

    Returns {'loss', 'top1', 'top5', 'confusion' (C x C numpy, rows = true class; None above
    CONFUSION_MAX_CLASSES classes), 'per_class' (accuracy per true class, 0..1; NaN for a class absent
    from the data), 'count'}.
    """
    batch_fn = batch_fn or _identity
    model.eval()
    # Sums, not averages, so that shards of different sizes combine exactly across ranks.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    hits = torch.zeros(2, dtype=torch.float64, device=device)  # top-1, top-5 correct counts
    support = torch.zeros(num_classes, dtype=torch.float64, device=device)  # images per true class
    correct = torch.zeros(num_classes, dtype=torch.float64, device=device)  # of them, predicted right
    confusion = (torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
                 if num_classes <= CONFUSION_MAX_CLASSES else None)
    for images, targets in loader:
        images, targets = batch_fn(images.to(device, non_blocking=True), targets.to(device, non_blocking=True))
        output = pieced_forward(model, images, device, amp, channels_last).float()
        n = targets.size(0)
        loss_sum += criterion(output, targets).double() * n
        acc1, acc5 = accuracy(output, targets, topk=(1, 5))
        hits += torch.stack([acc1[0], acc5[0]]).double() * n / 100.0
        pred = output.argmax(dim=1)
        # index_add_, not bincount: bincount reads its input's range back to the host on every batch.
        ones = torch.ones_like(pred, dtype=torch.float64)
        support.index_add_(0, targets, ones)
        correct.index_add_(0, targets, (pred == targets).double())
        if confusion is not None:
            confusion.view(-1).index_add_(0, targets * num_classes + pred, ones)
    # Collective: every rank evaluates its disjoint slice, once per call, and the sums combine exactly.
    for t in (loss_sum, hits, support, correct) + ((confusion,) if confusion is not None else ()):
        dist.all_reduce_sum(t)
    count = support.sum().item()
    if count == 0:
        raise UserError("the evaluation set is empty")
    with np.errstate(invalid='ignore', divide='ignore'):
        per_class = correct.cpu().numpy() / support.cpu().numpy()
    return {'loss': loss_sum.item() / count, 'top1': 100.0 * hits[0].item() / count,
            'top5': 100.0 * hits[1].item() / count,
            'confusion': None if confusion is None else confusion.cpu().numpy().astype(np.int64),
            'per_class': per_class, 'count': int(count)}


def _to_host(t):
    """A device tensor copied to pinned host memory without waiting for it (read after a synchronize)."""
    if t.device.type == 'cpu':
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


@exact_float32()
@torch.inference_mode()
def predict(model, loader, device, *, forward=None, amp=False, channels_last=False):
    """(outputs, targets): `forward(images)` (default: `model`) for every batch of `loader`, in order, as one
    float32 host tensor (N, ...), and the batches' targets (N,) (None for batches of bare images).

    In eval mode and float32 unless `amp` (an opt-in); the host never waits for the device inside the
    loop: each batch's output is copied to pinned memory asynchronously and read after one synchronize."""
    forward = forward or model
    model.eval()
    outputs, targets = [], []
    for batch in loader:
        images, target = batch if isinstance(batch, (list, tuple)) else (batch, None)
        out = autocast_forward(forward, images.to(device, non_blocking=True), device, amp, channels_last)
        outputs.append(_to_host(out.float()))
        if target is not None:
            targets.append(torch.as_tensor(target))
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    outputs = torch.cat(outputs) if outputs else torch.empty(0)
    return outputs, (torch.cat(targets) if targets else None)
