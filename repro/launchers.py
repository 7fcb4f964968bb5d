"""reproduce.py --launcher slurm | submitit-local: every stage a submitit job (repro/jobs.py).

slurm: every unfinished stage is submitted at once, each held by SLURM until the stages it needs have
ended well (`afterok`), with its recipe's GPUs (one process, or torchrun inside the job); a final job
writes the table when all of them have ended (`afterany`). A stage that is finished, or already
queued or running as a job, is not submitted again. submitit-local: the same jobs through
submitit's LocalExecutor on this machine, started by reproduce.py's own scheduler in the same order
(`--jobs N` / `--gpus` at a time), then the same final job.

Job folders: <out>/runs/<table>/jobs/<stage>/ (submitit's files: the job's pickle, result and log,
<job id>_0_log.out); the stage's own console goes to stage_logs/ as with the local launcher.
Nothing here unpickles a job folder's files: --status reads their names, the stage logs and the run
folders.
"""
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import signals
from errors import UserError
from repro.jobs import CollectJob, StageJob, exit_status
from repro.scripts import REPO, with_shutdown_timeout

MODES = ('local', 'slurm', 'submitit-local')
DEFAULT_TIME = '24:00:00'  # sbatch --time of a job without --slurm_time
SIGNAL_DELAY_S = 180      # SLURM's warning (SIGUSR2) this long before the time limit: the stage saves meanwhile
MAX_REQUEUES = 50         # requeues after a time limit a stage may take (pre-emptions do not count)
LOCAL_TIME_MIN = 60 * 24 * 365  # submitit-local without --slurm_time: no limit worth the name
COLLECT_TIME_MIN = 60
# squeue's states of a job that has not ended (one that has is not listed)
LIVE = ('PENDING', 'RUNNING', 'REQUEUED', 'REQUEUE_HOLD', 'REQUEUE_FED', 'CONFIGURING', 'COMPLETING', 'SUSPENDED',
        'RESIZING', 'SIGNALING', 'STAGE_OUT', 'STOPPED', 'RESV_DEL_HOLD')


def need_submitit(mode):
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UserError(f"--launcher {mode} needs submitit, which is not installed: pip install submitit "
                        f"(it is in requirements.txt)") from None


def parse_time(text):
    """sbatch's --time (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) -> whole minutes."""
    match = re.fullmatch(r'(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?', text.strip())
    if not match:
        raise UserError(f"--slurm_time {text!r}: expected sbatch's format, minutes or [D-]HH:MM:SS "
                        f"(e.g. 90, 12:00:00 or 2-00:00:00)")
    days, *parts = (None if g is None else int(g) for g in match.groups())
    parts = [p for p in parts if p is not None]
    if days is None:  # minutes, minutes:seconds, hours:minutes:seconds
        seconds = sum(p * unit for p, unit in zip(parts, {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(parts)]))
    else:  # days-hours, days-hours:minutes, days-hours:minutes:seconds
        seconds = days * 86400 + sum(p * unit for p, unit in zip(parts, (3600, 60, 1)))
    if seconds <= 0:
        raise UserError(f"--slurm_time {text!r} is no time at all")
    return -(-seconds // 60)


# sbatch options --slurm_extra may not set: a flag of their own, or what each stage's job must be
OWN_FLAG = ('partition', 'time', 'account', 'qos', 'constraint')
SET_PER_STAGE = ('nodes', 'ntasks-per-node', 'gpus-per-node', 'dependency', 'job-name', 'output', 'error',
                 'open-mode', 'array', 'wrap')


def parse_extra(values):
    """--slurm_extra KEY=VALUE ... -> {KEY: VALUE}: sbatch's own options (#SBATCH --KEY=VALUE)."""
    extra = {}
    for value in values:
        key, sep, val = value.partition('=')
        key = key.strip().lstrip('-').replace('_', '-')
        if not sep or not key or not val:
            raise UserError(f"--slurm_extra {value!r}: expected KEY=VALUE, an sbatch option without its dashes, "
                            f"e.g. cpus-per-task=10 or mem=64G")
        if key in OWN_FLAG:
            raise UserError(f"--slurm_extra {value!r}: use --slurm_{key} {val}")
        if key in SET_PER_STAGE:
            raise UserError(f"--slurm_extra {value!r}: reproduce.py sets --{key} of each stage's job itself "
                            f"(one node, one task, the stage's GPUs, what it waits for, its folder)")
        extra[key] = val
    return extra


@dataclass
class Slurm:
    """The --slurm_* flags."""
    partition: str = None
    time: str = DEFAULT_TIME
    account: str = None
    qos: str = None
    constraint: str = None
    extra: dict = field(default_factory=dict)

    @property
    def minutes(self):
        return parse_time(self.time)

    def sbatch(self):
        """{sbatch option: value} of every job (those given)."""
        given = {'partition': self.partition, 'account': self.account, 'qos': self.qos,
                 'constraint': self.constraint}
        return {**{k: v for k, v in given.items() if v}, 'time': self.minutes, **self.extra}


def stage_launcher(stage):
    """Inside a SLURM job: torchrun over the stage's GPUs (one node, its own rendezvous), or nothing."""
    gpus = stage.gpus()
    if gpus == 1:
        return ()
    return tuple(with_shutdown_timeout([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                        f'--nproc_per_node={gpus}']))


def job_name(stage_log):
    return os.path.basename(stage_log)[:-len('.log')]


def job_folder(root, stage_log):
    return os.path.join(root, 'jobs', job_name(stage_log))


def _setup():
    # the job imports repro.jobs when it unpickles its StageJob, from wherever sbatch started it
    return [f"export PYTHONPATH={shlex.quote(REPO)}${{PYTHONPATH:+:$PYTHONPATH}}"]


def job_parameters(stage, stage_log, slurm):
    """SlurmExecutor.update_parameters(...) of a stage's job (its dependency aside)."""
    params = slurm.sbatch()
    return {'job_name': f'reproduce:{job_name(stage_log)}'[:120], 'nodes': 1, 'ntasks_per_node': 1,
            'gpus_per_node': stage.gpus(), 'time': params.pop('time'), 'signal_delay_s': SIGNAL_DELAY_S,
            'stderr_to_stdout': True, 'setup': _setup(),
            'additional_parameters': {'kill-on-invalid-dep': 'yes', **params}}


def describe(params, after):
    """One line of a job's parameters, for --dry-run and the console."""
    extra = dict(params['additional_parameters'])
    extra.pop('kill-on-invalid-dep')
    words = [f"{params['gpus_per_node']} GPU{'s' if params['gpus_per_node'] > 1 else ''}",
             f"time {params['time']} min"] + [f"{k} {v}" for k, v in extra.items()]
    return ', '.join(words) + (f"; after {after} (afterok)" if after else '')


# ---------------------------------------------------------------- the cluster, checked before anything is submitted

def check_cluster(slurm, gpu_counts):
    """sbatch, srun and squeue on PATH, and sbatch's own verdict (--test-only: nothing is queued) on
    the jobs' partition, time, account, QOS, constraint and extra options, for each GPU count."""
    missing = [tool for tool in ('sbatch', 'srun', 'squeue') if shutil.which(tool) is None]
    if missing:
        raise UserError(f"--launcher slurm: {missing[0]} is not on PATH, so this is not a SLURM login node; run "
                        f"from one, or use --launcher submitit-local (the same jobs on this machine)")
    for gpus in sorted(gpu_counts):
        options = {**slurm.sbatch(), 'gpus-per-node': gpus, 'nodes': 1, 'ntasks-per-node': 1}
        cmd = ['sbatch', '--test-only', *(f"--{k.replace('_', '-')}={v}" for k, v in options.items()),
               '--wrap=true']
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            raise UserError(f"sbatch --test-only did not answer in 120 s: {shlex.join(cmd)}") from None
        if done.returncode:
            said = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
            reason = said[-1] if said else f'exit status {done.returncode}'
            raise UserError(f"sbatch refuses the jobs ({shlex.join(cmd[2:-1])}): {reason}; nothing was submitted")


# ---------------------------------------------------------------- what the job folders say

def latest_job(folder):
    """The id of the job last submitted into `folder`, or None."""
    if not os.path.isdir(folder):
        return None
    pickles = [n for n in os.listdir(folder) if n.endswith('_submitted.pkl')]
    if not pickles:
        return None
    newest = max(pickles, key=lambda n: os.stat(os.path.join(folder, n)).st_mtime_ns)
    return newest[:-len('_submitted.pkl')]


def has_result(folder, job_id):
    return os.path.isfile(os.path.join(folder, f'{job_id}_0_result.pkl'))


def queue_states(job_ids):
    """{job id: squeue's state} of those not ended ({} without squeue: asked nothing)."""
    if not job_ids or shutil.which('squeue') is None:
        return {}
    done = subprocess.run(['squeue', '-h', '-o', '%i %T', '-j', ','.join(job_ids)], capture_output=True,
                          text=True, timeout=120)
    states = {}
    for line in done.stdout.splitlines():
        words = line.split()
        if len(words) == 2 and words[1] in LIVE:
            states[words[0]] = words[1]
    return states


def _local_alive(job_id):
    try:
        os.kill(int(job_id), 0)
    except (ValueError, OSError):
        return False
    return True


def last_exit_status(stage_log, job_id):
    """The stage's exit status that job `job_id` noted in the stage's log, or None."""
    if not os.path.isfile(stage_log):
        return None
    found = None
    with open(stage_log, 'rb') as f:
        for line in f:
            match = re.match(rb'# [\d-]+ [\d:]+ job (\S+): exit status (-?\d+)$', line.rstrip())
            if match and match.group(1).decode() == job_id:
                found = int(match.group(2))
    return found


def live_jobs(items, local):
    """{key: (job id, state)} of the jobs in `items` ({key: job folder}) that have not ended: squeue's
    state (PENDING, RUNNING, ...), or RUNNING for a local job whose process is alive."""
    latest = {key: latest_job(folder) for key, folder in items.items()}
    waiting = {key: job for key, job in latest.items() if job and not has_result(items[key], job)}
    if local:
        return {key: (job, 'RUNNING') for key, job in waiting.items() if _local_alive(job)}
    states = queue_states(sorted(set(waiting.values())))
    return {key: (job, states[job]) for key, job in waiting.items() if job in states}


# ---------------------------------------------------------------- --launcher slurm

def submit_table(stages, needs, number, stage_log, root, slurm, collect):
    """Submit every stage that is neither finished nor queued, each after the jobs of the stages it
    needs, then the final results job; returns the exit status. `collect`: (table, opts, seeds, only)."""
    import submitit
    n, jobs, new = len(stages), {}, 0
    folders = {stage: job_folder(root, stage_log(stage)) for stage in stages}
    live = live_jobs(folders, local=False)
    cwd = os.getcwd()
    for stage in stages:
        label = f"[reproduce] stage {number[stage]}/{n}"
        progress = stage.progress()
        if progress.done:
            print(f"{label}: {progress.note}, skipped", flush=True)
            continue
        if stage in live:
            jobs[stage] = live[stage][0]
            print(f"{label}: already {live[stage][1].lower()} as job {live[stage][0]}, not submitted again",
                  flush=True)
            continue
        after = [jobs[d] for d in needs[stage] if d in jobs]
        params = job_parameters(stage, stage_log(stage), slurm)
        executor = submitit.SlurmExecutor(folder=folders[stage], max_num_timeout=MAX_REQUEUES)
        executor.update_parameters(**params, **({'dependency': 'afterok:' + ':'.join(after)} if after else {}))
        job = executor.submit(StageJob(stage, stage_launcher(stage), {}, stage_log(stage), cwd, forward=False))
        jobs[stage], new = job.job_id, new + 1
        waits = ', '.join(f"job {j}" for j in after)
        resuming = f"; {progress.note}" if progress.resume else ''
        print(f"{label}: job {job.job_id} ({describe(params, waits)}){resuming}, output {stage_log(stage)}",
              flush=True)
    collect_folder = os.path.join(root, 'jobs', 'collect')
    queued = live_jobs({'collect': collect_folder}, local=False)
    if not jobs:
        print(f"[reproduce] every stage is finished: nothing to submit", flush=True)
        print(CollectJob(*collect, cwd)(), flush=True)
        return 0
    if new or not queued:
        executor = submitit.SlurmExecutor(folder=collect_folder)
        executor.update_parameters(job_name='reproduce:collect', nodes=1, ntasks_per_node=1, time=COLLECT_TIME_MIN,
                                   stderr_to_stdout=True, setup=_setup(),
                                   dependency='afterany:' + ':'.join(sorted(set(jobs.values()))),
                                   additional_parameters={k: v for k, v in slurm.sbatch().items()
                                                          if k in ('partition', 'account', 'qos')})
        job = executor.submit(CollectJob(*collect, cwd))
        print(f"[reproduce] the table is written by job {job.job_id} when the {len(jobs)} job(s) above have "
              f"ended (afterany), log {job.paths.stdout}", flush=True)
    print(f"[reproduce] {new} job(s) submitted, {len(jobs) - new} already queued; "
          f"`--status` shows where they are", flush=True)
    return 0


def dry_run(stages, needs, number, stage_log, slurm, mode):
    """Each stage's job: parameters, what it waits for, command; nothing submitted or written."""
    n = len(stages)
    waiting = set()
    for stage in stages:
        status = stage.status()
        if status.done:
            print(f"# stage {number[stage]}/{n}: done, skipped (no job)")
            continue
        waiting.add(stage)
        after = ', '.join(f"stage {number[d]}/{n}" for d in needs[stage] if d in waiting)
        launcher = stage_launcher(stage) if mode == 'slurm' else ()
        if mode == 'slurm':
            job = describe(job_parameters(stage, stage_log(stage), slurm), after)
        else:
            job = f"1 process on this machine{f'; after {after}' if after else ''}"
        print(f"# stage {number[stage]}/{n}: {status.note}; job: {job}")
        print(shlex.join(stage.command(launcher, status.resume)))
    if waiting:
        print(f"# then: the table's results job, after every job above has ended (afterany)")


# ---------------------------------------------------------------- --status

def status(stages, number, stage_log, root, mode):
    """Each stage's state from its run folder and (slurm, submitit-local) its job folder; runs nothing."""
    n, counts = len(stages), {}
    folders = {stage: job_folder(root, stage_log(stage)) for stage in stages}
    jobs = {stage: latest_job(folder) for stage, folder in folders.items()} if mode != 'local' else {}
    live = live_jobs(folders, local=mode == 'submitit-local') if mode != 'local' else {}
    for stage in stages:
        progress, job = stage.status(), jobs.get(stage)
        code = last_exit_status(stage_log(stage), job) if job else None
        about = []
        if stage in live:
            about.append(f"job {job} {live[stage][1].lower()}")
        elif job:
            about.append(f"job {job} ended" + (f", the stage's exit status {code}" if code is not None else
                                               '' if has_result(folders[stage], job) else
                                               ' without a result (cancelled, killed or out of time)'))
        word = ('done' if progress.done else live[stage][1].lower() if stage in live else
                'stopped' if signals.saved_by_stop(code) else 'failed' if code else
                'to run' if mode != 'slurm' else 'to submit')
        counts[word] = counts.get(word, 0) + 1
        about.insert(0, progress.note if progress.done else f"{word} ({progress.note})")
        print(f"[reproduce] stage {number[stage]}/{n}: {'; '.join(about)}; {' '.join(stage.spec.words)}, "
              f"output {stage_log(stage)}", flush=True)
    again = any(w in counts for w in ('to submit', 'to run', 'failed', 'stopped'))
    print(f"[reproduce] {n} stages: {', '.join(f'{c} {w}' for w, c in counts.items())}"
          f"{'; the same command without --status runs what is neither done nor queued' if again else ''}",
          flush=True)
    return 0


# ---------------------------------------------------------------- --launcher submitit-local

class _Controller:
    """A LocalJob as the scheduler's Children see it: a stop request goes to submitit's controller,
    which passes SIGTERM to the job, which passes it to the stage once."""

    def __init__(self, job):
        self.job = job

    def send_signal(self, signum):
        self.job._process.send_signal(signal.SIGTERM)


class LocalJobs:
    """`run` of repro.scheduler.run_stages: each stage a StageJob through submitit's LocalExecutor,
    waited for; its exit status (the stage's, from the job's result)."""

    def __init__(self, root, slurm_time):
        self.root = root
        self.minutes = parse_time(slurm_time) if slurm_time else LOCAL_TIME_MIN

    def executor(self, folder):
        import submitit
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=MAX_REQUEUES)
        executor.update_parameters(timeout_min=self.minutes, signal_delay_s=SIGNAL_DELAY_S, stderr_to_stdout=True)
        return executor

    def submit(self, folder, job):
        # The controller and the job must not see a Ctrl-C meant for reproduce.py (which passes the stop
        # request on itself): started from a thread that blocks SIGINT, they inherit the blocked signal.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return self.executor(folder).submit(job)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def __call__(self, stage, cmd, env, log, echo, children):
        overrides = {k: v for k, v in env.items() if os.environ.get(k) != v}
        overrides.setdefault('CUDA_VISIBLE_DEVICES', os.environ.get('CUDA_VISIBLE_DEVICES'))  # the controller's ''
        job = StageJob(stage, (), overrides, log, os.getcwd(), forward=True)
        controller = children.add(lambda: _Controller(self.submit(job_folder(self.root, log), job)))
        if controller is None:
            return None
        try:
            return finished(controller.job)
        finally:
            children.forget(controller)

    def collect(self, collect):
        return _result(self.submit(os.path.join(self.root, 'jobs', 'collect'), CollectJob(*collect, os.getcwd())))


def finished(job):
    """Wait for a local job; the stage's exit status."""
    from submitit.core.utils import UncompletedJobError
    while not job.done():
        time.sleep(0.5)
    try:
        job.result()
        return 0
    except UncompletedJobError as e:
        code = exit_status(str(e))
        return 1 if code is None else code


def _result(job):
    while not job.done():
        time.sleep(0.5)
    return job.result()
