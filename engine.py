"""One training epoch and one evaluation pass, shared by every script.

Both take any iterable of (images, targets) batches (a DataLoader today, a device-resident loader
later), explicit arguments instead of globals, and return plain metric dicts. `batch_fn` turns a
loaded batch into what the model trains on (identity for classification, random rotations for
pretrain_rot.py).
"""
import time

import numpy as np
import torch

import dist
from errors import UserError
from utils import AverageMeter, accuracy


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


def _print(line, console_extra=''):
    print(line + console_extra, flush=True)


def train_one_epoch(model, criterion, loader, optimizer, device, epoch, *, batch_fn=None, forward=classify,
                    print_freq=10, log=_print, should_stop=None, start_step=0, num_steps=None):
    """Train for one pass over `loader`. Returns {'loss', 'top1', 'top5', 'steps', 'stopped'}.

    `forward(model, images, targets) -> (logits, targets)` is one step's prediction: the default
    classifies; MoCo returns its (1+K)-way contrastive logits with the positive key as target.
    `start_step` is where a mid-epoch resume picks up (the loader already skips those batches);
    `should_stop()` is polled after every step so SIGTERM ends the epoch at a step boundary.
    """
    batch_fn = batch_fn or _identity
    num_steps = num_steps if num_steps is not None else start_step + len(loader)
    losses, top1, top5 = AverageMeter('Loss', ':.4f'), AverageMeter('Prec@1', ':.3f'), AverageMeter('Prec@5', ':.3f')
    lr = optimizer.param_groups[-1]['lr']
    model.train()
    step, stopped = start_step, False
    end = time.time()
    for images, targets in loader:
        images, targets = batch_fn(to_device(images, device), to_device(targets, device))
        output, targets = forward(model, images, targets)
        loss = criterion(output, targets)
        if not torch.isfinite(loss):
            raise DivergenceError(f"the training loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                                  f"stopped without saving (the last good checkpoint is intact); "
                                  f"try a lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        n = targets.size(0)
        acc1, acc5 = accuracy(output.detach(), targets, topk=(1, 5))
        losses.update(loss.item(), n)
        top1.update(acc1.item(), n)
        top5.update(acc5.item(), n)
        step += 1
        if step % print_freq == 0 or step == num_steps:
            log(f"Epoch: [{epoch}][{step}/{num_steps}], lr: {lr:.5f}\t{losses}\t{top1}\t{top5}",
                console_extra=f"\tTime {time.time() - end:.3f}")
            end = time.time()
        if should_stop is not None and should_stop():
            stopped = step < num_steps
            break
    return {'loss': losses.avg, 'top1': top1.avg, 'top5': top5.avg, 'lr': lr, 'steps': step, 'stopped': stopped}


@torch.no_grad()
def evaluate(model, criterion, loader, device, num_classes, *, batch_fn=None):
    """Loss, top-1/top-5 and the confusion matrix over `loader` (summed over ranks under DDP).

    Returns {'loss', 'top1', 'top5', 'confusion' (C x C numpy, rows = true class), 'per_class'
    (accuracy per true class, 0..1; NaN for a class absent from the data), 'count'}.
    """
    batch_fn = batch_fn or _identity
    model.eval()
    # Sums, not averages, so that shards of different sizes combine exactly across ranks.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    hits = torch.zeros(2, dtype=torch.float64, device=device)  # top-1, top-5 correct counts
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    for images, targets in loader:
        images, targets = batch_fn(images.to(device, non_blocking=True), targets.to(device, non_blocking=True))
        output = model(images)
        n = targets.size(0)
        loss_sum += criterion(output, targets).double() * n
        acc1, acc5 = accuracy(output, targets, topk=(1, 5))
        hits += torch.stack([acc1[0], acc5[0]]).double() * n / 100.0
        pred = output.argmax(dim=1)
        confusion += torch.bincount(targets * num_classes + pred, minlength=num_classes ** 2
                                    ).reshape(num_classes, num_classes).double()
    for t in (loss_sum, hits, confusion):
        dist.all_reduce_sum(t)
    count = confusion.sum().item()
    cm = confusion.cpu().numpy()
    support = cm.sum(axis=1)
    with np.errstate(invalid='ignore', divide='ignore'):
        per_class = np.diag(cm) / support
    if count == 0:
        raise UserError("the evaluation set is empty")
    return {'loss': loss_sum.item() / count, 'top1': 100.0 * hits[0].item() / count,
            'top5': 100.0 * hits[1].item() / count, 'confusion': cm.astype(np.int64),
            'per_class': per_class, 'count': int(count)}
