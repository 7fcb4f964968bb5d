"""What runs inside a submitit job (reproduce.py --launcher slurm | submitit-local): one stage's
command, its stop path when SLURM warns of the end, its requeue; and the table's results pass.

submitit pickles a `StageJob`, runs it on the node (`python -m submitit.core._submit`) and, when
SLURM's warning signal (SIGUSR2, `--signal=USR2@<seconds>` before the time limit or a pre-emption)
reaches the job, calls its `checkpoint`: the stage gets one SIGTERM, its own stop path saves a
resumable checkpoint, and submitit requeues the job, which on its next start resumes the stage from
that checkpoint (Stage.progress, as a re-run of reproduce.py would). The stage ignores the warning
signal itself: SLURM signals every process of the job, and the scripts would die of SIGUSR2.

SIGTERM: on SLURM (scancel, a pre-emption) it reaches every process of the job, the stage too, so
the job leaves it to the stage (submitit only logs it). On this machine (`forward`: submitit-local)
reproduce.py's stop request reaches the job through submitit's local controller, and the job passes
it to the stage (in its own session) once.
"""
import os
import shlex
import signal
import subprocess
import threading
import time

import signals
from repro.scripts import Stage


class StageExit(RuntimeError):
    """A stage that did not finish; the job fails with it, so SLURM never starts its dependants."""

    def __init__(self, code, why):
        super().__init__(f"exit status {code}: {why}")
        self.code = code


def exit_status(trace):
    """The stage's exit status from the text of a failed job's exception (submitit keeps only its
    traceback), or None where the job failed before or around the stage."""
    marker = f"{StageExit.__module__}.{StageExit.__name__}: exit status "
    for line in reversed(trace.splitlines()):
        if line.startswith(marker) or line.startswith('StageExit: exit status '):
            return int(line.split('exit status ', 1)[1].split(':', 1)[0])
    return None


def _warning_signal():
    from submitit import JobEnvironment
    return JobEnvironment._usr_sig()


class StageJob:
    """One stage as a submitit job: `stage` (repro.scripts.Stage), `launcher` (torchrun's words for a
    multi-GPU stage, () for one process), `env` (put over the job's environment; None removes a
    variable), `log` (the stage's console, appended), `cwd` (where reproduce.py ran: the stage's paths
    are relative to it), `forward` (pass SIGTERM on to the stage: submitit-local)."""

    def __init__(self, stage: Stage, launcher, env, log, cwd, forward):
        self.stage, self.launcher, self.env, self.log = stage, tuple(launcher), dict(env), log
        self.cwd, self.forward = cwd, forward
        self._proc, self._ended, self._code = None, None, None

    def __getstate__(self):  # what is pickled, for the job and for its requeue: no running state
        return {k: v for k, v in self.__dict__.items() if k not in ('_proc', '_ended', '_code')}

    def __setstate__(self, state):
        self.__dict__.update(state, _proc=None, _ended=None, _code=None)

    def _note(self, line):
        with open(self.log, 'ab') as f:
            f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n".encode())

    def __call__(self):
        os.chdir(self.cwd)
        os.makedirs(os.path.dirname(self.log), exist_ok=True)
        progress = self.stage.progress()
        if progress.done:
            self._note(f"job {_job_id()}: {progress.note}, nothing to run")
            return 0
        cmd = self.stage.command(self.launcher, progress.resume)
        env = dict(os.environ, PYTHONUNBUFFERED='1')
        for key, value in self.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        self._note(f"job {_job_id()}{f' ({progress.note})' if progress.resume else ''}: {shlex.join(cmd)}")
        print(f"[reproduce] {shlex.join(cmd)}\n[reproduce] its output: {self.log}", flush=True)
        warning = _warning_signal()

        def child():  # in the stage's process, before exec: ignore SLURM's warning; Ctrl-C as usual
            signal.signal(warning, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        self._ended = threading.Event()
        with open(self.log, 'ab') as log:
            self._proc = subprocess.Popen(cmd, env=env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                          preexec_fn=child, start_new_session=self.forward)
        # The wait happens in a thread: the signal handlers below run in this one and may wait for the
        # stage's end themselves (a Popen waited on from a handler and the code it interrupted deadlocks).
        threading.Thread(target=self._wait, daemon=True).start()
        if self.forward:
            repeats = signals.Repeats()

            def stop(signum, frame):
                if not repeats.repeat(signum) and not self._ended.is_set():
                    self._proc.send_signal(signal.SIGTERM)

            signal.signal(signal.SIGTERM, stop)
        while not self._ended.wait(1.0):
            pass
        code = self._code
        self._note(f"job {_job_id()}: exit status {code}")
        if code == 0 and self.stage.progress().done:
            return 0
        why = ('stopped on request after saving a resumable checkpoint' if signals.saved_by_stop(code) else
               f'exited normally but {self.stage.output()} is not finished' if code == 0 else 'failed')
        raise StageExit(code or 1, f"{why}; its output: {self.log}")

    def _wait(self):
        self._code = self._proc.wait()
        self._ended.set()

    def checkpoint(self, *args, **kwargs):
        """submitit's hook for SLURM's warning signal: the stage saves through its own stop path (one
        SIGTERM), then the job is requeued as it was submitted (it resumes from what was saved)."""
        from submitit.helpers import DelayedSubmission
        if self._proc is not None and not self._ended.is_set():
            self._proc.send_signal(signal.SIGTERM)
            self._ended.wait()
            self._note(f"job {_job_id()}: SLURM's warning signal: stage stopped (exit status {self._code}); "
                       f"the job is requeued and resumes it")
        return DelayedSubmission(StageJob(self.stage, self.launcher, self.env, self.log, self.cwd, self.forward))


def _job_id():
    from submitit import JobEnvironment
    try:
        return JobEnvironment().job_id
    except (KeyError, RuntimeError):  # not inside a job (a direct call)
        return '-'


class CollectJob:
    """The table's results pass, as `reproduce.py --collect`, when the stages' jobs have ended."""

    def __init__(self, table, opts, seeds, only, cwd):
        self.table, self.opts, self.seeds, self.only, self.cwd = table, opts, seeds, only, cwd

    def __call__(self):
        from repro.command import collect
        os.chdir(self.cwd)
        return collect(self.table, self.opts, self.seeds, self.only, refuse_empty=False)
