"""What `--model_dir` and `--resume` read, and the two checkpoint files a stage writes.

`--model_dir` takes (recognised by content, not by name):
- a stage result, `final_model_checkpoint.pth`: {'epoch', 'best_epoch', 'state_dict_best':
  {'feat_model': ..., 'classifier': ...}, 'best_acc', 'centroids'} (keys with or without `module.`),
  or a folder holding one; a `latest_model_checkpoint.pth` ({'epoch', 'state_dict': {...}}) too;
- a MoCo checkpoint (`moco_ckpt_*.pth.tar`: the query encoder `module.encoder_q.*` without `fc`),
  or a rotation / supervised ResNet checkpoint (its head dropped): feature model only.
Files are written the way the original wrote them (networks saved from DataParallel, so every
key starts with `module.`), so the original code and Kang et al.'s tau_norm.py read them.
"""
import os

import torch

from checkpoint import backbone_weights, load_checkpoint, strip_prefix
from errors import UserError

FINAL = 'final_model_checkpoint.pth'
LATEST = 'latest_model_checkpoint.pth'
SCRIPT = 'imagenet_inat'


def checkpoint_file(path, flag, name):
    """`path` itself, or `path`/`name` when it is a folder."""
    if path and os.path.isdir(path):
        path = os.path.join(path, name)
        if not os.path.isfile(path):
            raise UserError(f"{flag}: the folder holds no {name} ({path})")
    return path


def _tensors(sd, source, key):
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"{source}: its {key} entry holds no weights")
    return strip_prefix(sd, 'module.')


def read_model_dir(path):
    """(file, kind, {'feat_model': state dict, 'classifier': state dict or None})."""
    path = checkpoint_file(path, '--model_dir', FINAL)
    ckpt = load_checkpoint(path, flag='--model_dir')
    source = f"--model_dir {path}"
    nets = ckpt.get('state_dict_best')
    kind = 'stage result'
    if nets is None and isinstance(ckpt.get('state_dict'), dict) and 'feat_model' in ckpt['state_dict']:
        nets, kind = ckpt['state_dict'], 'latest stage checkpoint'
    if nets is None:
        try:
            kind, feat = backbone_weights(ckpt)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
        return path, f'{kind} checkpoint', {'feat_model': feat, 'classifier': None}
    if not isinstance(nets, dict) or 'feat_model' not in nets:
        raise UserError(f"{source}: its state_dict_best has no feat_model entry")
    return path, kind, {'feat_model': _tensors(nets['feat_model'], source, 'feat_model'),
                        'classifier': _tensors(nets['classifier'], source, 'classifier')
                        if nets.get('classifier') is not None else None}


def load_network(module, sd, key, name, source, log):
    """Load what fits of `sd` into `module`; report it; refuse other architectures.

    Refused: a tensor of another shape (another architecture), or a file matching no tensor of
    the network at all. Tensors missing from the file keep their initial values and are listed.
    """
    own = module.state_dict()
    shapes = [f"{k} {tuple(v.shape)} in file vs {tuple(own[k].shape)}" for k, v in sd.items()
              if k in own and v.shape != own[k].shape]
    if shapes:
        raise UserError(f"{source} does not fit the {key} ({name}): shapes differ for "
                        f"{'; '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''}")
    matched = [k for k in own if k in sd]
    if not matched:
        raise UserError(f"{source} holds no tensor of the {key} ({name}): another architecture? "
                        f"(file keys e.g. {', '.join(list(sd)[:3])}; expected e.g. {', '.join(list(own)[:3])})")
    missing = [k for k in own if k not in sd]
    unused = [k for k in sd if k not in own]
    module.load_state_dict({**own, **{k: sd[k] for k in matched}})
    log(f"=> {key} ({name}): loaded {len(matched)} of its {len(own)} tensors from {source}"
        + (f"; {len(missing)} missing, left as initialised: {', '.join(missing[:5])}"
           f"{' ...' if len(missing) > 5 else ''}" if missing else '')
        + (f"; {len(unused)} tensors of the file unused" if unused else ''))
    return matched, missing


def original_layout(module):
    """A network's weights as the original saved them: on the CPU, keys prefixed `module.`."""
    return {'module.' + k: v.detach().to('cpu', copy=True) for k, v in module.state_dict().items()}


def final_state(epoch, best_epoch, best_weights, best_acc, **extra):
    """final_model_checkpoint.pth: the original's keys (best_acc a fraction, centroids None)."""
    return {'epoch': epoch, 'best_epoch': best_epoch, 'state_dict_best': best_weights,
            'best_acc': best_acc, 'centroids': None, **extra}


def read_resume(path):
    """A latest_model_checkpoint.pth of this package (a file, or the log folder holding it)."""
    path = checkpoint_file(path, '--resume', LATEST)
    ckpt = load_checkpoint(path, flag='--resume')
    if ckpt.get('script') != SCRIPT or 'optimizer' not in ckpt:
        raise UserError(f"--resume {path} is not a {LATEST} written by imagenet_inat.main; "
                        f"to start from its weights, pass it as --model_dir")
    return path, ckpt
