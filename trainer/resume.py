"""Exact resume: the checkpoint entries it needs (RNG states of every rank, the world size), restoring them,
loading --resume, and deciding which checkpoint a run continues (--resume, or the unfinished run of the same
flags in its run folder, rerun.py).

Separate from the run loop because pretrain_moco.py and imagenet_inat/ save and restore the same entries.
"""
import os

import dist
import rerun
from checkpoint import load_checkpoint, load_optimizer, load_weights, read_weights
from dataset.folder import checked_against_checkpoint
from engine import step_hooks
from errors import UserError
from trainer.stop import console
from utils import derive_seed, rng_state, seed_everything, set_rng_state


def restore_rng(ckpt, seed, rank, world):
    """Set this rank's global RNG streams (augmentations with -j 0, rotations, MoCo's shuffle) for a
    run that starts now. A checkpoint restores each rank's own saved state when the number of
    processes matches; otherwise rank 0 takes the saved one (the single-process and original case)
    and the other ranks derive theirs from (seed, rank)."""
    states = (ckpt or {}).get('rng_ranks')
    if states is not None and len(states) == world:
        set_rng_state(states[rank])
    elif rank == 0 and ckpt is not None and 'rng' in ckpt:
        set_rng_state(ckpt['rng'])
    elif rank > 0:
        seed_everything(derive_seed(seed, rank) % 2 ** 32)


def check_resume_layout(ckpt, path, world):
    """A mid-epoch checkpoint counts its step in this rank's batches, which depend on the number of
    processes; resuming it with another number would skip the wrong samples, so refuse."""
    saved = int(ckpt.get('world_size', 1))
    if int(ckpt.get('step', 0)) and saved != world:
        raise UserError(f"--resume {path} was saved in the middle of an epoch by {saved} process(es); resume "
                        f"it with {saved} (this run has {world}), or from a checkpoint saved at an epoch end")


def resume_entries(world, amp):
    """The checkpoint entries exact resume needs besides the step: rank 0's RNG state as `rng` (the
    single-process and original layout), `world_size`, `amp` (whether the training steps ran in bf16: --amp
    as resolved, read back by training_hooks), and with several ranks every rank's state as `rng_ranks`
    (read back by restore_rng). Collective under DDP (the states are gathered), so every rank must build
    the checkpoint state, even though only rank 0 writes it."""
    states = dist.all_gather_object(rng_state())
    entries = {'rng': states[0], 'world_size': world, 'amp': bool(amp)}
    if world > 1:
        entries['rng_ranks'] = states
    return entries


def training_hooks(args, device, ckpt, log):
    """train_one_epoch's `amp` and `channels_last` (engine.step_hooks) for a run that starts from `ckpt` (None: a
    new run). Without --amp / --no-amp a resumed run goes on in the precision its steps ran in (the checkpoint's
    `amp`), saying so where this machine's default differs: the default depends on the machine (bf16 only where
    it trains faster) and has changed between versions, and a run that switched precision half-way would not
    be the run it continues. Checkpoints without the entry (older ones) take the default."""
    hooks = step_hooks(args, device)
    saved = (ckpt or {}).get('amp')
    if args.amp is None and isinstance(saved, bool) and saved != hooks['amp']:
        hooks['amp'] = saved
        precision = {True: 'bf16', False: 'float32'}
        log(f"=> the training steps go on in {precision[saved]}, as the resumed run's did (this machine's default: "
            f"{precision[not saved]}; --amp or --no-amp chooses)")
    return hooks


def step_meters_entry(step, meters):
    """The checkpoint entry of a stop after `step` steps of an epoch: that epoch's step meters so far
    (engine.train_one_epoch's 'meters'), from which the resumed epoch's running averages go on; none at an
    epoch's end."""
    return {'step_meters': meters} if step else {}


def resumed_meters(ckpt, step):
    """train_one_epoch's `start_meters` for a resume at `step` of its epoch: the checkpoint's step meters
    (None from step 0, or from a checkpoint written before they were kept)."""
    return ckpt.get('step_meters') if step else None


def _resume(args, exp, model, optimizer, log):
    """Load --resume into model (and optimizer unless evaluating). Returns the checkpoint dict."""
    ckpt, sd = read_weights(args.resume, exp.task, 'use --pretrained_model to start from it')
    if args.evaluate:
        rerun.check_evaluation(ckpt, args, f"--resume {args.resume}")
    exp.info = checked_against_checkpoint(exp.info, ckpt, f"--resume {args.resume}")  # before the shapes
    load_weights(model, sd, f"--resume {args.resume}")
    if exp.state is not None:
        exp.state.load_state_dict(ckpt, f"--resume {args.resume}")
    if not args.evaluate:
        load_optimizer(optimizer, ckpt, args.resume)
    recorded = ckpt.get('flags') if isinstance(ckpt.get('flags'), dict) else {}
    epochs = recorded.get('epochs', args.epochs) if args.evaluate else args.epochs  # -e: the run's own length
    where = rerun.progress(int(ckpt.get('epoch', 0)), int(ckpt.get('step', 0)), epochs)
    log(f"=> loaded checkpoint '{args.resume}' ({where})")
    return ckpt


def check_resume_target(args, folder):
    """A training --resume writes into this command's run folder: refused where that folder holds another run
    (without --overwrite), or where --overwrite would remove the very checkpoint it continues."""
    if args.evaluate or not os.path.isfile(folder.ckpt_path):
        return
    own = os.path.abspath(args.resume) == os.path.abspath(folder.ckpt_path)
    if own and args.overwrite:
        raise UserError(f"--overwrite starts {folder.model_dir} anew, so it cannot also --resume its checkpoint: "
                        f"pass one of them")
    if not own and not args.overwrite:
        raise UserError(f"{folder.model_dir} holds another run than --resume {args.resume}; pass --overwrite to "
                        f"replace it with the run that checkpoint continues, or --exp_str NAME for a new run folder")


def run_flags(args):
    """The flags a checkpoint records (rerun.py), and for a user's folder the folder itself: two folders of one
    name (hence one run folder) are two runs."""
    folder = {'data_folder': os.path.abspath(args.data_path)} if getattr(args, 'dataset', None) == 'folder' else {}
    return rerun.run_flags(args, **folder)


def previous_run(args, folder):
    """The checkpoint to start from: --resume, or the unfinished run of the same flags that the same command,
    run again, continues (rerun.py); a run folder holding a finished run or a run of other flags is refused
    without --overwrite. Every rank decides alike (they read one file)."""
    existing = folder.ckpt_path if os.path.isfile(folder.ckpt_path) else None
    if args.evaluate or args.resume or existing is None:
        return args.resume
    ckpt = load_checkpoint(existing)
    epoch, step = int(ckpt.get('epoch', 0)), int(ckpt.get('step', 0))
    recorded = ckpt.get('flags') if isinstance(ckpt.get('flags'), dict) else None
    path = rerun.resume_or_refuse(existing, recorded, run_flags(args), epoch, step, args.epochs, folder.model_dir,
                                  '--exp_str NAME', args.overwrite)
    if path:
        console(rerun.resume_notice(folder.model_dir, epoch, step, args.epochs, path))
    return path or ''
