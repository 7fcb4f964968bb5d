"""Stop signals, shared by the training scripts, MoCo's per-GPU launcher, reproduce.py and its jobs.

A run asked to stop (SIGTERM, SIGINT, or FORWARDED_STOP) finishes its step, saves and exits with
128 + the signal; a second request stops it at once. But one request often arrives twice: a signal
to a whole process group (SLURM's scancel or time limit, `kill -- -PGID`, systemd) reaches a
launcher and the processes it started, and the launcher forwards its own copy. `Repeats` tells such
a copy (the same signal again within REPEAT_WINDOW_S) from a real second request.
"""
import signal
import time

# A launcher that forwards its own stop request to the processes it started sends this instead: it
# never counts as the second signal, since a signal to the whole process group may reach them too.
# SLURM's `--signal=USR1@<seconds>` sends it before the time limit.
FORWARDED_STOP = getattr(signal, 'SIGUSR1', None)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, *([FORWARDED_STOP] if FORWARDED_STOP else []))

REPEAT_WINDOW_S = 2.0


class Repeats:
    """`repeat(signum)`: whether this signal is the same one again within `window` seconds of the
    last one that counted (a copy of one request), rather than a new request."""

    def __init__(self, window=REPEAT_WINDOW_S, clock=time.monotonic):
        self.window, self.clock = window, clock
        self._last, self._at = None, None

    def repeat(self, signum):
        now = self.clock()
        if signum == self._last and now - self._at < self.window:
            return True
        self._last, self._at = signum, now
        return False


def saved_by_stop(exit_status):
    """Whether a process's exit status says that it stopped on request after saving (128 + the
    signal), rather than being killed by it (negative in Python) or failing."""
    return exit_status in {128 + s for s in STOP_SIGNALS}
