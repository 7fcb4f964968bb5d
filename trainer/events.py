"""Tensorboard event files that never raise: tensorboardX writes them from a background thread, where one
error (a full disk) would block the training loop for good.

Separate from the run folder because this is tensorboardX's storage hook, not a run's layout.
"""
import contextlib
import os


class _EventFile:
    """A tensorboard event file that never raises. tensorboardX writes it from a background thread,
    where an error (a full disk) would end the thread and, once its event queue is full, block the
    training loop for good: the first error is handed to `failed` and the events after it dropped."""

    def __init__(self, f, failed):
        self.f, self.failed, self.ok = f, failed, True

    def _guard(self, op, *args):
        if self.ok:
            try:
                op(*args)
            except OSError as e:
                self.ok = False
                self.failed(e)

    def write(self, data):
        self._guard(self.f.write, data)

    def flush(self):
        self._guard(self._flush)

    def _flush(self):
        self.f.flush()
        os.fsync(self.f.fileno())  # as tensorboardX's own flush does

    def close(self):
        self._guard(self.f.close)
        with contextlib.suppress(OSError):  # after a failure: what is still buffered cannot be written
            self.f.close()


class _EventFiles:
    """Opens the event files of one tensorboard folder as _EventFile, through tensorboardX's hook for
    other storage (`register_writer_factory`, as for s3://): also the files that add_scalars creates
    later, one per curve, which are opened before their writer thread starts."""

    def __init__(self, failed):
        from tensorboardX.record_writer import register_writer_factory
        self.prefix, self.failed = f'guarded{id(self)}', failed
        register_writer_factory(self.prefix, self)

    def logdir(self, folder):
        return f'{self.prefix}:{folder}'

    def _path(self, path):
        return path[len(self.prefix) + 1:]

    def open(self, path):
        return _EventFile(open(self._path(path), 'wb'), self.failed)

    def directory_check(self, path):
        os.makedirs(self._path(path), exist_ok=True)
