"""A run's folders: `LogFolder` (lock, text logs cut back on resume, tensorboard) and `RunFolder`, train.py's
root_log/store_name and root_model/store_name with args.txt and the checkpoints.

Separate from the run loop because imagenet_inat/ keeps its logs in a LogFolder too, without the loop.
"""
import contextlib
import os
import sys

import numpy as np

import dist
from checkpoint import save_checkpoint
from errors import UserError
from fileio import RunLock, user_write_errors
from trainer.events import _EventFiles
from trainer.stop import console


def warn(line):
    """A problem that does not end the run (a plot or tensorboard file that cannot be written)."""
    print(f"warning: {line}", file=sys.stderr, flush=True)


class LogFolder:
    """A run's log folder, written by rank 0 alone: the lock (held in `lock_dir`), text logs opened for
    appending (cut back on resume to the sizes a checkpoint recorded) and a tensorboard writer.

    A log that cannot be written (full disk, ...) is a UserError: raised at once by a single process;
    under DDP held back (`error`) until the next checkpoint save, which every rank makes together, so
    that every rank stops with it. A tensorboard file that cannot be written is a warning only."""

    def __init__(self, log_dir, lock_dir, logs, folders=(), outputs=()):
        self.log_dir, self.logs, self.folders = log_dir, logs, (log_dir, *folders)
        self.outputs = outputs  # the files a run leaves besides its logs (checkpoints): a new run removes them
        self.main = dist.is_main_process()
        self.lock = RunLock(lock_dir)
        self.files = {}
        self.writer = None
        self.error = None
        self.tensorboard_error = None

    def open(self, truncate_to=None, fresh=False):
        """Create the folders, take the lock, open the logs. `truncate_to`: {log name: size} of a resumed
        run; `fresh`: a new run, whose logs start anew, as the original's open(..., 'w'). Otherwise (a run
        resumed from another run's or the original's checkpoint) they are appended to."""
        if not self.main:
            return self
        for d in self.folders:
            try:
                os.makedirs(d, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create folder {d}: {e.strerror}") from None
        self.lock.acquire()
        if fresh:
            self.clear()
        for name in self.logs:
            path = os.path.join(self.log_dir, name)
            # A resumed run drops what the killed run logged after its last checkpoint, so the
            # logs read as if it had never stopped.
            with user_write_errors(path):
                if truncate_to and name in truncate_to and os.path.exists(path):
                    with open(path, 'r+b') as f:
                        f.truncate(min(truncate_to[name], os.path.getsize(path)))
                if fresh and os.path.exists(path) and os.path.getsize(path):
                    console(f"=> starting {path} anew (it held an earlier run's log)")
                self.files[name] = open(path, 'w' if fresh else 'a')
        self.tensorboard(lambda: None, start=True)
        return self

    def clear(self):
        """A new run here (nothing to resume, or --overwrite), with the lock held: the checkpoints and
        tensorboard events of an earlier one go, so that no file mixes two runs (the text logs start anew)."""
        old = [p for p in self.outputs if os.path.isfile(p)]
        old += [os.path.join(self.log_dir, n) for n in os.listdir(self.log_dir) if n.startswith('events.out.')]
        if old:
            console(f"=> a new run: removing the earlier run's "
                    f"{', '.join(sorted({os.path.basename(p).split('.tfevents')[0] for p in old}))}")
        for path in old:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def write(self, name, line):
        if name not in self.files or self.error is not None:
            return
        try:
            with user_write_errors(os.path.join(self.log_dir, name)):
                self.files[name].write(line + '\n')
                self.files[name].flush()
        except UserError as e:
            self.error = e
            if not dist.is_dist():
                raise

    def save_checkpoint(self, state, path, copies=()):
        """Collective: every rank calls it, rank 0 writes; a write error, or a log's held back (no
        checkpoint records more than the logs hold), stops every rank with its message."""
        def write():
            if self.error is not None:
                error, self.error = self.error, None  # raised here: close() need not warn of it
                raise error
            save_checkpoint(state, path, copies)
        dist.on_rank0(write)

    def log_sizes(self):
        return {name: f.tell() for name, f in self.files.items()}

    def tensorboard(self, add, start=False):
        """Call `add` (e.g. writer.add_scalar) while tensorboard logging is on; `start` turns it on. A
        write error is one warning and turns it off, never the end of the run."""
        try:
            if start:
                from tensorboardX import SummaryWriter
                self.writer = SummaryWriter(log_dir=_EventFiles(self._tensorboard_failed).logdir(self.log_dir))
            if self.tensorboard_error is not None and self.writer is not None:
                self.writer.close()
                self.writer = None
            if self.writer is not None:
                add()
        except OSError as e:  # an event file that cannot be created, in this thread: closed at the next call
            self._tensorboard_failed(e)

    def _tensorboard_failed(self, error):
        if self.tensorboard_error is None:
            self.tensorboard_error = error
            warn(f"cannot write tensorboard events into {self.log_dir}: {error.strerror or error}; "
                 f"training goes on without them")

    def scalar(self, tag, value, step):
        self.tensorboard(lambda: self.writer.add_scalar(tag, value, step))

    def close(self):
        for f in self.files.values():
            # Every line was flushed when written: only a write that failed has anything left to lose.
            with contextlib.suppress(OSError):
                f.close()
        self.files = {}
        if self.error is not None and dist.is_dist():
            warn(f"{self.error} (after the last checkpoint)")  # a held error that no save raised
        self.tensorboard(lambda: None)
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.lock.release()


class RunFolder(LogFolder):
    """root_log/store_name (logs, args.txt, tensorboard, plot) and root_model/store_name (checkpoints)."""

    def __init__(self, args, logs=()):
        self.model_dir = os.path.join(args.root_model, args.store_name)
        self.ckpt_path = os.path.join(self.model_dir, 'ckpt.pth.tar')
        self.best_path = os.path.join(self.model_dir, 'ckpt.best.pth.tar')
        super().__init__(os.path.join(args.root_log, args.store_name), self.model_dir,
                         ('log_train.csv', 'log_test.csv', *logs), folders=(self.model_dir,),
                         outputs=(self.ckpt_path, self.best_path))

    def open(self, args, truncate_to=None, fresh=False):
        super().open(truncate_to, fresh)
        if self.main:
            path = os.path.join(self.log_dir, 'args.txt')
            with user_write_errors(path), open(path, 'w' if fresh else 'a') as f:
                f.write(str(args) + '\n')
        return self

    def scalars(self, tag, values, step):
        self.tensorboard(lambda: self.writer.add_scalars(tag, values, step))

    def image(self, tag, matrix, step):
        """A matrix with values in [0, 1] as a grayscale image (e.g. the row-normalised confusion matrix)."""
        self.tensorboard(lambda: self.writer.add_image(tag, np.asarray(matrix, dtype=np.float32)[None], step))

    def save(self, state, is_best):
        """Collective, as save_checkpoint."""
        # Also when the first epoch scores 0 % (the original then wrote no best file at all).
        best = is_best or (not os.path.exists(self.best_path) and state.get('step', 0) == 0)
        self.save_checkpoint(state, self.ckpt_path, copies=[self.best_path] if best else [])
