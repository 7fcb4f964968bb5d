"""All checkpoint I/O: atomic saves, safe loads, and the key surgery that makes old files fit.

Known formats it reads:
- train.py / train_semi.py / pretrain_rot.py checkpoints, ours and the original's:
  {'epoch', 'arch', 'state_dict', 'best_acc1' (float or tensor), 'optimizer'}; keys may carry
  `module.` (saved from DataParallel) and LDAM-DRW's head may be named `linear.` instead of `fc.`.
- MoCo checkpoints: {'epoch', 'arch', 'state_dict': {'module.encoder_q.*', 'module.encoder_k.*',
  'module.queue', ...}, 'optimizer'}.
- a bare state dict.
Loading never runs code: `torch.load(weights_only=True)` admits tensors and plain containers only.
"""
import errno
import os
import pickle

import torch

from errors import UserError
from fileio import atomic_copy, atomic_path

HEAD_PREFIXES = ('fc.', 'linear.')


def save_checkpoint(state, path, copies=()):
    """torch.save to a temporary file, fsync, rename: a kill leaves the old or the new file.

    `copies` (the best checkpoint) get the same bytes, each written before `path` is replaced: a
    failed copy leaves `path` at the previous state, so a resumed run redoes the epoch and the copy.
    A full disk or another write error is one UserError (fileio.write_error), with the bytes needed."""
    with atomic_path(path, size=lambda: _serialized_size(state)) as tmp:
        with open(tmp, 'wb') as f:
            sink = _KeepWriteError(f)
            try:
                torch.save(state, sink)
            except RuntimeError:
                if sink.error is None:
                    raise
                raise sink.error from None
        for copy in copies:
            atomic_copy(tmp, copy)


class _KeepWriteError:
    """A file for torch.save that keeps the OSError of a failed write: torch's writer reports it as a
    RuntimeError without errno ('unexpected pos'), which could not tell a full disk from a bug. Writes
    whole buffers: a short write (the disk filling up) goes on until the OSError comes."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        view = memoryview(data).cast('B')
        done = 0
        try:
            while done < len(view):
                n = self.f.write(view[done:])
                if not n:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += n
        except OSError as e:
            self.error = self.error or e
            raise
        return done

    def flush(self):
        self.f.flush()


class _ByteCount:
    """A file that only counts what is written to it."""

    def __init__(self):
        self.n = 0

    def write(self, data):
        self.n += memoryview(data).nbytes
        return memoryview(data).nbytes

    def flush(self):
        pass


def _serialized_size(state):
    count = _ByteCount()
    torch.save(state, count)
    return count.n


# A checkpoint a run folder or log folder holds, for a folder passed where a file is wanted.
CHECKPOINT_NAMES = ('ckpt.pth.tar', 'latest_model_checkpoint.pth', 'final_model_checkpoint.pth')
# The first bytes of files people pass by mistake, to say what the file is instead.
FILE_KINDS = ((b'\x89PNG', 'a PNG image'), (b'\xff\xd8\xff', 'a JPEG image'), (b'\x1f\x8b', 'a gzip archive'),
              (b'%PDF', 'a PDF document'), (b'\x93NUMPY', 'a numpy array'))


def first_sentence(text):
    """The first line of a library's message, cut after its first sentence (PyTorch's run on for a paragraph)."""
    line = text.strip().splitlines()[0] if text.strip() else ''
    return line.split('. ')[0].rstrip('.')


def not_a_checkpoint(path):
    """Why the file at `path` is no PyTorch checkpoint (empty, an image, text), or None if it may be one: torch.save
    writes a zip archive, or (before PyTorch 1.6, and the original's released files) a pickle."""
    with open(path, 'rb') as f:
        head = f.read(512)
    if not head:
        return 'it is empty'
    if head.startswith(b'PK\x03\x04') or head.startswith(b'\x80'):
        return None
    kind = next((what for magic, what in FILE_KINDS if head.startswith(magic)), None)
    if kind is None:
        try:
            head.decode('utf-8')
            kind = 'text'
        except UnicodeDecodeError:
            kind = 'another kind of file'
    return f"it holds {kind}"


def load_checkpoint(path, flag='--resume'):
    """Read a checkpoint onto the CPU without executing anything inside it."""
    if path and os.path.isdir(path):
        inside = [os.path.join(path, n) for n in CHECKPOINT_NAMES if os.path.isfile(os.path.join(path, n))]
        hint = f"; did you mean {inside[0]}?" if inside else ', not a checkpoint file'
        raise UserError(f"{flag} {path} is a folder{hint}")
    if not path or not os.path.isfile(path):
        raise UserError(f"{flag} file not found: {path}")
    why = not_a_checkpoint(path)
    if why:
        raise UserError(f"{flag} file {path} is not a PyTorch checkpoint ({why})")
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'Weights only load failed' in str(e) or 'Unsupported global' in str(e):
            raise UserError(f"{flag} file {path} holds objects other than tensors and plain containers "
                            f"(possibly code); refusing to load it") from None
        reason = first_sentence(str(e))
        raise UserError(f"{flag} file {path} is corrupt or not a PyTorch checkpoint ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError) as e:
        reason = first_sentence(str(e)) if str(e).strip() and not isinstance(e, KeyError) else type(e).__name__
        raise UserError(f"{flag} file {path} is corrupt or truncated ({reason})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{flag} file {path} is not a checkpoint (it holds a {type(obj).__name__}, not a dict)")
    return obj


def state_dict_of(ckpt):
    """The model weights of a loaded checkpoint, whichever of the known formats it is."""
    sd = ckpt.get('state_dict', ckpt)
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError("the file holds no model weights (expected a 'state_dict' of tensors)")
    return sd


def strip_prefix(sd, prefix):
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def canonical_state_dict(sd):
    """Drop DataParallel/DDP's `module.` and rename LDAM-DRW's `linear.` head to our `fc.`."""
    sd = strip_prefix(sd, 'module.')
    return {('fc.' + k[len('linear.'):]) if k.startswith('linear.') else k: v for k, v in sd.items()}


def unwrap(model):
    """The bare model inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, 'module'):
            model = model.module
        elif hasattr(model, '_orig_mod'):
            model = model._orig_mod
        else:
            return model


def load_weights(model, sd, source, allow_missing=()):
    """Load `sd` into `model`; refuse with one sentence naming exactly what does not fit.

    `allow_missing` lists key prefixes that may stay freshly initialised (the classifier head when
    loading a pre-trained backbone). Nothing else may be missing, unexpected or of another shape.
    """
    model = unwrap(model)
    own = model.state_dict()
    head = _other_head(sd, own)
    if head:
        raise UserError(f"{source} {head}")
    shape_errors = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
                    if k in own and v.shape != own[k].shape]
    if shape_errors:
        head = [e for e in shape_errors if e.startswith(HEAD_PREFIXES)]
        if head and len(head) == len(shape_errors):
            raise UserError(f"{source} was trained for another number of classes "
                            f"({'; '.join(head)} in file vs model)")
        raise UserError(f"{source} does not fit the architecture: shapes differ for "
                        f"{', '.join(shape_errors[:3])}{' ...' if len(shape_errors) > 3 else ''}")
    missing = [k for k in own if k not in sd and not k.startswith(tuple(allow_missing))]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise UserError(f"{source} does not fit the architecture: {'; '.join(detail)} tensors")
    model.load_state_dict(sd, strict=False)
    fresh = [k for k in own if k not in sd]
    return len(sd), fresh


def _other_head(sd, own):
    """What to say when a cosine classifier head (LDAM's NormedLinear: weight D x C, no bias) meets a linear one
    (weight C x D and a bias), or the reverse; None otherwise."""
    if 'fc.weight' not in sd or 'fc.weight' not in own or ('fc.bias' in sd) == ('fc.bias' in own):
        return None
    if 'fc.bias' in own:
        return "has a cosine (LDAM) classifier head: pass --loss_type LDAM"
    return "has a linear classifier head, and --loss_type LDAM builds a cosine one: leave --loss_type LDAM out"


def read_weights(path, task, use_hint, flag='--resume'):
    """A checkpoint of `task` ('classification', 'rotation') and its canonical state dict.

    A checkpoint recorded for another task (ours carry `task` and `script`) is refused before its
    weights are looked at; `use_hint` tells the user what to do instead.
    """
    ckpt = load_checkpoint(path, flag=flag)
    if ckpt.get('task', task) != task:
        raise UserError(f"{flag} {path} was written by {ckpt.get('script', 'another script')}.py "
                        f"({ckpt['task']}), not for {task}; {use_hint}")
    try:
        return ckpt, canonical_state_dict(state_dict_of(ckpt))
    except UserError as e:
        raise UserError(f"{flag} {path}: {e}") from None


def load_optimizer(optimizer, ckpt, path):
    """Restore the optimizer state of a resumed run, if the checkpoint has one."""
    if 'optimizer' not in ckpt:
        return
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError) as e:
        raise UserError(f"--resume {path}: its optimizer state does not fit this model ({e})") from None


def backbone_weights(ckpt):
    """Pick the backbone tensors out of a self-supervised (or supervised) checkpoint.

    Recognised by content, not file name: any `encoder_q.` key means MoCo (keep the query encoder),
    otherwise a rotation / supervised checkpoint or a bare state dict. The head is dropped either way,
    since its classes (4 rotations, 128-d MoCo projections, other labels) are not ours.
    """
    sd = strip_prefix(state_dict_of(ckpt), 'module.')
    if any(k.startswith('encoder_q.') for k in sd):
        kind = 'MoCo'
        sd = {k[len('encoder_q.'):]: v for k, v in sd.items() if k.startswith('encoder_q.')}
    else:
        kind = 'rotation/supervised' if 'state_dict' in ckpt else 'bare state dict'
    sd = canonical_state_dict(sd)
    return kind, {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIXES)}


def load_pretrained(model, path, log=print):
    """`--pretrained_model`: every backbone tensor must load; only the head stays fresh."""
    ckpt = load_checkpoint(path, flag='--pretrained_model')
    try:
        kind, sd = backbone_weights(ckpt)
    except UserError as e:
        raise UserError(f"--pretrained_model {path}: {e}") from None
    n, fresh = load_weights(model, sd, f"--pretrained_model {path}", allow_missing=HEAD_PREFIXES)
    log(f"=> loaded {n} backbone tensors from {kind} checkpoint {path}; fresh: {', '.join(fresh)}")
    return kind
