"""A run's flags as its checkpoints record them, and what they decide when the same command runs again
(after Ctrl-C, a crash, a time limit) or `-e` evaluates a checkpoint.

Every script that writes a run folder asks `resume_or_refuse` before it writes anything: trainer.run (train.py,
train_semi.py, train_stage2.py, pretrain_rot.py and any script built on it), pretrain_moco.py and imagenet_inat.
What it finds there:
- nothing, or `--overwrite` given: a new run (the caller removes the old run's checkpoints first);
- an unfinished run of the same flags: resumed from its furthest checkpoint, as `--resume` would, with a
  one-line notice;
- a finished run, a run of other flags, or one whose flags were not recorded (an older version's, the
  original's): refused in one line naming what differs and the ways on (`--resume`, `--overwrite`, a new run
  folder). The original started over and overwrote the checkpoints and logs.
Flags that only say where files are, how fast or how verbosely (OPERATIONAL) are not compared.
"""
from errors import UserError

OPERATIONAL = frozenset({
    'resume', 'evaluate', 'overwrite', 'store_name', 'start_epoch', 'workers', 'print_freq', 'confusion', 'gpu',
    'download', 'compile', 'cache_dir', 'root_log', 'root_model', 'root_path', 'data_path', 'data', 'data_root',
    'split_dir', 'log_dir', 'save_freq', 'dist_url', 'dist_backend', 'dist_timeout', 'world_size', 'rank',
    'multiprocessing_distributed', 'test', 'save_feat', 'output_logits',
})

# What -e compares: the flags that decide the model's head and the training set whose class counts make the
# shot groups (and the --posthoc_la prior). Others (the schedule, the train rule) do not change an evaluation.
EVALUATION_FLAGS = ('dataset', 'imb_type', 'imb_factor', 'rand_number', 'imb_factor_unlabel', 'unlabel_size_factor',
                    'pseudo_threshold', 'loss_type', 'arch', 'stage')
# How a flag is spelt where its name is not '--' + its key.
FLAG_NAMES = {'arch': '-a', 'batch_size': '-b', 'weight_decay': '--wd', 'data_folder': 'data folder',
              **{k: '--' + k.replace('_', '-') for k in ('moco_dim', 'moco_k', 'moco_m', 'moco_t', 'aug_plus',
                                                          'crop_size', 'channels_last', 'amp_eval', 'sync_bn')}}


def _plain(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def run_flags(args, **extra):
    """The flags of a run as its checkpoints record them (`flags`): plain values, none of OPERATIONAL, plus
    `extra` (what a flag does not say by itself, e.g. which folder a relative --data_path named)."""
    flags = {k: _plain(v) for k, v in vars(args).items() if k not in OPERATIONAL and not k.startswith('_')}
    flags.update({k: _plain(v) for k, v in extra.items()})
    return flags


def flag_name(key):
    return FLAG_NAMES.get(key, '--' + key)


def _shown(value):
    return ' '.join(map(str, value)) if isinstance(value, list) else str(value)


def differences(recorded, flags):
    """'--lr 0.1 there, 0.05 here; ...' for the flags both record with other values ('' if none)."""
    keys = [k for k in flags if k in recorded and recorded[k] != flags[k]]
    text = '; '.join(f"{flag_name(k)} {_shown(recorded[k])} there, {_shown(flags[k])} here" for k in keys[:3])
    return text + ('; ...' if len(keys) > 3 else '')


def progress(epoch, step, epochs):
    """Where a checkpoint stands, in the one numbering of every message: 1-based epochs, `epoch` of a checkpoint
    being the epochs done (the original's meaning) and `step` the steps done of the next one."""
    if step:
        return f"stopped in epoch {epoch + 1} of {epochs} after step {step}"
    return f"{epoch} of {epochs} epochs done"


def resume_or_refuse(path, recorded, flags, epoch, step, epochs, folder, new_folder, overwrite, finished=None):
    """What the same command run again does with the checkpoint at `path` (None: none there): the path to resume
    (an unfinished run of these flags), or None (a new run: nothing there, or `overwrite`); a UserError where
    neither is safe. `recorded`: the checkpoint's `flags` (None: not recorded); `flags`: this command's
    (run_flags); `finished` (default: all `epochs` done) for a script with its own sign of a finished run;
    `new_folder`: how to name another run folder (e.g. '--exp_str NAME')."""
    if path is None or overwrite:
        return None
    if recorded is not None and isinstance(recorded.get('epochs'), int):
        epochs = recorded['epochs']  # the run's own length says whether it finished (this command may ask more)
    finished = epoch >= epochs and not step if finished is None else finished
    where = f"{folder} holds {'a finished' if finished else 'an unfinished'} run ({progress(epoch, step, epochs)})"
    ways = f"--overwrite to start over (it removes that run's checkpoints), or {new_folder} for a new run folder"
    if recorded is None:
        raise UserError(f"{where} whose flags were not recorded (an older version's); pass --resume {path} to "
                        f"continue it, {ways}")
    diff = differences(recorded, flags)
    if diff:
        raise UserError(f"{where} of other flags ({diff}); pass --resume {path} to continue it with this "
                        f"command's flags, {ways}")
    if finished:
        raise UserError(f"{where} of these flags; pass {ways}")
    return path


def resume_notice(folder, epoch, step, epochs, path):
    return (f"=> {folder} holds an unfinished run of these flags ({progress(epoch, step, epochs)}): resuming it "
            f"from {path} (--overwrite starts over)")


def store_name_flags(ckpt):
    """The flags an older checkpoint's run folder name says (train.py, train_semi.py, pretrain_rot.py:
    dataset_arch_loss_rule_imbtype_imbfactor_...), for checkpoints made before `flags` was recorded."""
    parts = str(ckpt.get('store_name', '')).split('_')
    if ckpt.get('script') not in ('train', 'train_semi', 'pretrain_rot') or len(parts) < 6:
        return {}
    dataset = 'folder' if parts[0].startswith('folder') else parts[0]
    flags = {'dataset': dataset, 'arch': parts[1], 'loss_type': parts[2]}
    if parts[4] in ('exp', 'step'):
        try:
            flags.update(imb_type=parts[4], imb_factor=float(parts[5]))
        except ValueError:
            pass
    return flags


def check_evaluation(ckpt, args, source):
    """-e: refuse a checkpoint whose recorded flags (else what its run folder name says; the original's record
    neither) differ from this command's where that changes the numbers, naming both values."""
    recorded = ckpt.get('flags')
    recorded = recorded if isinstance(recorded, dict) else store_name_flags(ckpt)
    for key in EVALUATION_FLAGS:
        if key in recorded and hasattr(args, key) and recorded[key] != _plain(getattr(args, key)):
            why = ('its classifier head is another one' if key in ('loss_type', 'arch', 'stage') else
                   'the shot groups and the training prior come from the training set the flags describe')
            raise UserError(f"{source} was trained with {flag_name(key)} {_shown(recorded[key])}, this command "
                            f"says {_shown(_plain(getattr(args, key)))}: pass {flag_name(key)} "
                            f"{_shown(recorded[key])} ({why})")
