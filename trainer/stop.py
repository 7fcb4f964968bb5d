"""Stopping a run on a signal: the console notices (rank 0 alone), `GracefulStop` (SIGTERM / SIGINT /
FORWARDED_STOP -> finish the step, save, exit) and the log line of a stopped run.

Separate from the run loop because pretrain_moco.py and imagenet_inat/ stop their own loops the same way.
"""
import os
import signal

import dist
from signals import FORWARDED_STOP, STOP_SIGNALS, Repeats


def console(line):
    """Rank 0's console alone: for notices (GracefulStop's) that a resumed run's logs must not show."""
    if dist.is_main_process():
        print(line, flush=True)


class GracefulStop:
    """First SIGTERM/SIGINT: finish the step, save, exit. Second: stop at once. FORWARDED_STOP (from
    MoCo's per-GPU launcher, or SLURM's --signal=USR1) asks like a SIGTERM if nothing asked yet, and
    the one SIGTERM/SIGINT that may follow it (the same request, sent to the whole group) is not a second.
    Nor is the same signal again within a moment (signals.Repeats): a group signal and a launcher's copy."""

    SIGNALS = STOP_SIGNALS

    def __init__(self, log):
        self.log = log  # for the notice only: a console, not a run log (a resumed run's logs must not show it)
        self.signum = None
        self._forwarded = False
        self._repeats = Repeats()
        self._previous = {}
        self._pid = os.getpid()

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            # A data-loading worker forked during the run inherits this handler, and Ctrl-C signals
            # the whole process group: only the process that trains decides when to stop.
            return
        if self._repeats.repeat(signum):
            return
        if signum == FORWARDED_STOP:
            if self.signum is not None:
                return
            self._forwarded, signum = True, signal.SIGTERM
        elif self._forwarded:
            # The launcher's forward may overtake the group's own SIGTERM: that one asks nothing new.
            self._forwarded = False
            return
        elif self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        self.log(f"=> received {signal.Signals(signum).name}: finishing this step, then saving a resumable "
                 f"checkpoint (send it again to stop at once)")

    def __call__(self, sync=True):
        """Whether to stop now. `sync` marks a point every rank reaches together (a print point, an
        epoch end): only there does a distributed run agree, with one collective, whether a signal
        reached any rank, so all ranks stop after the same step. A single process checks every time."""
        if not dist.is_dist():
            return self.signum is not None
        if not sync:
            return False
        agreed = dist.max_over_ranks(self.signum or 0)
        # Not `self.signum = max_over_ranks(...)`: a signal handled during the collective would be
        # overwritten by the value read before it, and lost. One that came too late for this
        # agreement stays pending for the next.
        if agreed:
            self.signum = agreed
        return bool(agreed)

    def __enter__(self):
        if hasattr(signal, 'SIGTERM') and _in_main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _in_main_thread():
    import threading
    return threading.current_thread() is threading.main_thread()


def stop_notice(stop, epoch, resume_from, step=None, epochs=None):
    """The log line of a run stopped by a signal during 0-based `epoch` (after `step`) or at its end; with
    `epochs` (a script that resumes when run again, rerun.py) it also says so."""
    where = f"during epoch {epoch + 1} after step {step}" if step is not None else f"at the end of epoch {epoch + 1}"
    total = f" ({epochs} epochs in all)" if epochs else ''
    again = ' or run the same command again' if epochs else ''
    return f"=> stopped by {signal.Signals(stop.signum).name} {where}{total}; resume with --resume {resume_from}{again}"
