"""The stage graph and the scheduler: every stage starts as soon as the stages it needs have finished
and a slot (a share of the CPU cores, or a GPU) is free; one stage at a time when there is one slot.

Each stage runs in a worker thread that calls `execute` (the seam the tests replace with an
in-process call; `run_stages(run=...)` puts a submitit job in its place); the main thread starts
stages, takes their results in the order they end, prints the progress and re-makes the results
files, so that no two writers ever overlap. Each stage runs in its own session, so a signal to our
process group (SLURM's scancel, `kill -- -PGID`, Ctrl-C) reaches us alone; a stop request (SIGTERM,
SIGINT, SIGUSR1) is passed to every running stage once (signals.Repeats), which saves; none starts
after it.
"""
import codecs
import contextlib
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import signals
from repro.scripts import REPO


def dependencies(stages):
    """{stage: [the stages it needs]}: those whose output one of its flags names, the file itself or
    one beside it (an SSP stage's --pretrained_model is the rotation run's ckpt.best.pth.tar, next to
    the ckpt.pth.tar that finishes that run)."""
    outputs = {stage: stage.output() for stage in stages}
    needs = {}
    for stage in stages:
        values = set(stage.argv)
        folders = {os.path.dirname(v) for v in values}
        needs[stage] = [other for other in stages if other != stage and
                        (outputs[other] in values or os.path.dirname(outputs[other]) in folders)]
    return needs


@dataclass(frozen=True)
class Slot:
    name: str                                  # for the console: 'GPU 1', or '' where there is one slot
    env: dict = field(default_factory=dict)    # put over the environment of the stage it runs


def thread_budget():
    """CPU threads for all stages together: the OMP_NUM_THREADS we were given, else our cores."""
    given = os.environ.get('OMP_NUM_THREADS', '')
    if given.isdigit() and int(given) > 0:
        return int(given)
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def cpu_slots(jobs):
    """`jobs` concurrent stages on the CPUs, the threads split between them (one stage: left as it is)."""
    if jobs == 1:
        return [Slot('')]
    threads = str(max(1, thread_budget() // jobs))
    return [Slot(f'job {i + 1}', {'OMP_NUM_THREADS': threads}) for i in range(jobs)]


def gpu_slots(gpus, per_gpu):
    """`per_gpu` concurrent stages on each GPU id of `gpus`; each stage's process sees only its GPU.
    The ids count the GPUs we see, so they go through our own CUDA_VISIBLE_DEVICES where one is set."""
    visible = [v for v in os.environ.get('CUDA_VISIBLE_DEVICES', '').split(',') if v.strip()]
    count = len(gpus) * per_gpu
    threads = {} if count == 1 else {'OMP_NUM_THREADS': str(max(1, thread_budget() // count))}
    return [Slot(f'GPU {gpu}', {'CUDA_VISIBLE_DEVICES': visible[gpu] if visible else str(gpu), **threads})
            for _ in range(per_gpu) for gpu in gpus]


class Children:
    """The running stages' processes (or anything with send_signal): a stop request to us is passed to
    each of them once, and once it has come no stage starts."""

    def __init__(self):
        self._lock = threading.RLock()  # re-entrant: a signal handler may interrupt the main thread holding it
        self._procs = set()
        self._repeats = signals.Repeats()
        self.stopped = None  # the signal that stopped us

    def start(self, cmd, **popen):
        return self.add(lambda: subprocess.Popen(cmd, start_new_session=True, **popen))

    def add(self, begin):
        """`begin()`'s process, kept to be signalled; None (nothing begun) once a stop has come."""
        with self._lock:
            if self.stopped is not None:
                return None
            proc = begin()
            self._procs.add(proc)
            return proc

    def forget(self, proc):
        with self._lock:
            self._procs.discard(proc)

    def stop(self, signum):
        """Pass a stop request on (SIGUSR1 as SIGTERM: torchrun and the scripts all save on SIGTERM); the
        number of stages it reached, or None for the same signal again within a moment (the same request)."""
        with self._lock:
            if self.stopped is None:
                self.stopped = signal.SIGTERM if signum == signals.FORWARDED_STOP else signum
            if self._repeats.repeat(signum):
                return None
            for proc in self._procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM if signum == signals.FORWARDED_STOP else signum)
            return len(self._procs)


def execute(cmd, env, log_path, echo, children):
    """Run one stage, its output appended to `log_path` (and, if `echo`, shown on our console too);
    its exit status, or None where a stop came before it could start."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, 'ab') as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = children.start(cmd, env=env, stdout=subprocess.PIPE if echo else log, stderr=subprocess.STDOUT)
        if proc is None:
            return None
        try:
            if echo:
                _tee(proc.stdout, log)
            return proc.wait()
        finally:
            children.forget(proc)


def _tee(pipe, log):
    decode = codecs.getincrementaldecoder('utf-8')('replace')  # a character may span two reads
    for chunk in iter(lambda: pipe.read1(65536), b''):
        log.write(chunk)
        log.flush()
        sys.stdout.write(decode.decode(chunk))
        sys.stdout.flush()


def _clock(seconds):
    seconds = int(round(seconds))
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def run_stages(stages, slots, launcher, stage_log, on_finish, run=None):
    """Run the unfinished `stages` (in dependency order, listed so), up to len(slots) at a time.
    `stage_log(stage)`: its log file; `on_finish(stage, finished)`: called after each stage that ends
    well, with the set of finished stages; `run(stage, cmd, env, log, echo, children)`: runs one stage
    and returns its exit status (default: `execute` the command here). Returns (exit status, the
    closing message)."""
    n = len(stages)
    number = {stage: i for i, stage in enumerate(stages, 1)}
    needs = dependencies(stages)
    finished, failed, blocked, running = set(), {}, set(), {}
    for stage in stages:
        progress = stage.progress()
        if progress.done:
            finished.add(stage)
            print(f"[reproduce] stage {number[stage]}/{n}: {progress.note}, skipped: "
                  f"{shlex.join(stage.command(launcher))}", flush=True)
    pending = [stage for stage in stages if stage not in finished]
    skipped = len(finished)
    env = dict(os.environ, PYTHONUNBUFFERED='1')  # a stage's log shows its lines as they come
    env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p)
    echo = len(slots) == 1  # one stage at a time: its output on the console too, as a plain run's
    free, events, children, durations = list(slots), queue.Queue(), Children(), []
    start = time.monotonic()

    def work(stage, slot, cmd):
        try:
            args = (cmd, {**env, **slot.env}, stage_log(stage), echo, children)
            result = execute(*args) if run is None else run(stage, *args)
        except BaseException as e:  # re-raised by the main thread
            result = e
        events.put((stage, slot, result))

    def launch(stage, slot):
        progress = stage.progress()
        cmd = stage.command(launcher, progress.resume)
        about = ', '.join(word for word in (slot.name, progress.resume and progress.note) if word)
        print(f"[reproduce] stage {number[stage]}/{n} started at +{time.monotonic() - start:.1f} s"
              f"{f' ({about})' if about else ''}, log {stage_log(stage)}: {shlex.join(cmd)}", flush=True)
        running[stage] = time.monotonic()
        threading.Thread(target=work, args=(stage, slot, cmd), daemon=True).start()

    def stop(signum, frame):
        count = children.stop(signum)
        if count is None:
            return
        # os.write: a print here could interrupt a print of the main thread (a reentrant buffered write fails)
        os.write(1, f"[reproduce] {signal.Signals(signum).name}: {count} running stage(s) save and stop; no "
                    f"other starts\n".encode())

    previous = {s: signal.signal(s, stop) for s in signals.STOP_SIGNALS}
    try:
        while True:
            for stage in [s for s in pending if children.stopped is None]:
                if free and all(d in finished for d in needs[stage]):
                    pending.remove(stage)
                    launch(stage, free.pop(0))
            if not running:
                break
            stage, slot, result = events.get()
            if isinstance(result, BaseException):
                raise result
            free.append(slot)
            took, now = time.monotonic() - running.pop(stage), time.monotonic() - start
            label = f"[reproduce] stage {number[stage]}/{n}"
            if result is None:  # stopped before it began
                continue
            if result == 0 and stage.progress().done:
                finished.add(stage)
                durations.append(took)
                print(f"{label} finished at +{now:.1f} s ({took:.1f} s), log {stage_log(stage)}", flush=True)
                on_finish(stage, finished)
            else:
                why = (f'exited normally but {stage.output()} is not finished' if result == 0 else
                       f'ended with exit status {result}')
                failed[stage] = result  # 0: exited normally without its output, reported so (a failure all the same)
                word = 'stopped' if children.stopped and signals.saved_by_stop(result) else 'failed'
                print(f"{label} {word} at +{now:.1f} s: {why}; "
                      f"log {stage_log(stage)}", flush=True)
                for other in list(pending):  # listed in dependency order: a dependant comes after what it needs
                    if any(d in failed or d in blocked for d in needs[other]):
                        blocked.add(other)
                        pending.remove(other)
            left = len(pending) + len(running)
            estimate = (f'about {_clock(sum(durations) / len(durations) * left / min(len(slots), left))} left'
                        if durations and left else 'time left unknown' if left else 'nothing left')
            print(f"[reproduce] progress: {len(finished)}/{n} stages done ({skipped} skipped before), "
                  f"{len(running)} running, {len(failed)} failed; elapsed {_clock(now)}, {estimate}", flush=True)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return _outcome(failed, blocked, children.stopped, number, n, stage_log)


def _outcome(failed, blocked, stopped, number, n, stage_log):
    def named(items):
        return '; '.join(f"stage {number[s]}/{n} ({' '.join(s.spec.words)}, "
                         f"{'exit status 0 but its output unfinished' if c == 0 else f'exit status {c}'}): "
                         f"log {stage_log(s)}" for s, c in items)

    if stopped:
        saved = [s for s, c in failed.items() if signals.saved_by_stop(c)]
        lost = [(s, c) for s, c in failed.items() if not signals.saved_by_stop(c)]
        line = f"[reproduce] stopped by {signal.Signals(stopped).name}"
        if saved:
            line += f": {len(saved)} stage(s) saved"
        if lost:
            line += f"{';' if saved else ':'} {len(lost)} did not save ({named(lost)})"
        again = ('run the same command again to resume them (finished stages are skipped)' if failed else
                 'run the same command again to continue')
        return (lost[0][1] or 1 if lost else 128 + stopped), f"{line}; {again}"
    if not failed:
        return 0, ''
    code = next(iter(failed.values())) or 1  # a stage that exited 0 without its output fails the run too
    waiting = f", so {len(blocked)} stage(s) that need it did not start" if blocked else ''
    return code, (f"[reproduce] failed: {named(failed.items())}{waiting}; the others finished. Run the same command "
                  f"again to retry (finished stages are skipped, a stage stopped half-way resumes)")
