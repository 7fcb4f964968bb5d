"""reproduce.py --launcher slurm | submitit-local (issue 33): every stage a submitit job.

No SLURM here. The submission path runs for real against a fake sbatch / srun / squeue on PATH
(shell-free Python scripts that record what they get and answer as SLURM does): the sbatch files
submitit writes are read back. The jobs themselves run through submitit's LocalExecutor
(`--launcher submitit-local`), which runs the same StageJob with the same stop path and requeue.
"""
import csv
import importlib
import os
import pickle
import re
import shlex
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

import cli
import fixtures
import reproduce
from fixtures import REPO
from repro import command, jobs, launchers, scheduler
from repro.command import plan
from repro.scripts import Stage
from repro.tables import TABLES, Options

DIGITS = ['--table', 'digits-mini', '--seeds', '0', '--epochs', '1']

FAKE_SBATCH = r'''#!{python}
# sbatch as SLURM answers: --test-only checks (FAKE_SBATCH_REFUSE="--option=value|message" refuses it), else
# the job file is kept as FAKE_SLURM/job<id>.sh and gets the next id (from 100)
import os, shutil, sys
folder, args = os.environ['FAKE_SLURM'], sys.argv[1:]
with open(os.path.join(folder, 'calls'), 'a') as f:
    f.write(' '.join(args) + '\n')
if '--test-only' in args:
    option, _, message = os.environ.get('FAKE_SBATCH_REFUSE', '|').partition('|')
    if option in args:
        print(message, file=sys.stderr)
        sys.exit(1)
    print('sbatch: Job 3 to start at 2026-12-01T10:00:00 using 1 processors on nodes n1 in partition gpu',
          file=sys.stderr)
    sys.exit(0)
counter = os.path.join(folder, 'next')
n = int(open(counter).read()) if os.path.exists(counter) else 100
open(counter, 'w').write(str(n + 1))
shutil.copy(args[-1], os.path.join(folder, f'job{{n}}.sh'))
print(f'Submitted batch job {{n}}')
'''
FAKE_SQUEUE = r'''#!{python}
# squeue -h -o "%i %T" -j IDS: the lines of FAKE_SLURM/queue ("<id> <STATE>") for those ids
import os, sys
ids = sys.argv[sys.argv.index('-j') + 1].split(',')
path = os.path.join(os.environ['FAKE_SLURM'], 'queue')
for line in (open(path).read().splitlines() if os.path.exists(path) else []):
    if line.split()[0] in ids:
        print(line)
'''


def _tool(folder, name, text):
    path = folder / name
    path.write_text(text.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch, srun and squeue on PATH; the folder where they record what they got."""
    bin_dir, record = tmp_path / 'bin', tmp_path / 'slurm'
    bin_dir.mkdir()
    record.mkdir()
    _tool(bin_dir, 'sbatch', FAKE_SBATCH)
    _tool(bin_dir, 'squeue', FAKE_SQUEUE)
    _tool(bin_dir, 'srun', '#!/bin/sh\nexit 0\n')
    monkeypatch.setenv('PATH', f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv('FAKE_SLURM', str(record))
    return record


def _digits_stages(out, seeds=(0,)):
    opts = Options('digits-mini', './data', str(out), 1, 'current', None, {})
    return opts, plan(TABLES['digits-mini'], opts, list(seeds))[1]


def _sbatch(path):
    """{option: value} of a job file's #SBATCH lines, and its other lines."""
    options, rest = {}, []
    for line in path.read_text().splitlines():
        if line.startswith('#SBATCH --'):
            key, _, value = line[len('#SBATCH --'):].partition('=')
            options[key] = value
        else:
            rest.append(line)
    return options, rest


# ---------------------------------------------------------------- the plan: job parameters and dependencies

def _dry_run(capsys, argv):
    """[(stage number, job line, after {stage numbers}, command words)] of a --dry-run's output."""
    assert reproduce.main([*argv, '--dry-run']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == '# then: the table\'s results job, after every job above has ended (afterany)'
    found = []
    for head, cmd in zip(lines[0:-1:2], lines[1:-1:2]):
        match = re.fullmatch(r'# stage (\d+)/\d+: [^;]+; job: ([^;]+)(?:; after (.+) \(afterok\))?', head)
        assert match, head
        after = {int(n) for n in re.findall(r'stage (\d+)/', match.group(3) or '')}
        found.append((int(match.group(1)), match.group(2), after, shlex.split(cmd)))
    return found


@pytest.mark.parametrize('table', ['digits-mini', 'cifar10-ssp', 'imagenet-lt'])
def test_dry_run_prints_each_job_and_the_jobs_it_waits_for(table, tmp_path, capsys):
    """Each stage's job waits (afterok) for exactly the stages its flags name (the stage graph), and
    asks for its recipe's GPUs: one for CIFAR / digits stages; 8 for ImageNet-LT's MoCo and decoupled
    stages, run by torchrun inside the job (8 processes: the 8 BatchNorm pieces, so no --bn_pieces)."""
    out = tmp_path / 'out'
    argv = ['--table', table, '--seeds', '0', '--out', str(out), '--launcher', 'slurm', '--slurm_partition', 'gpu',
            '--slurm_time', '12:00:00', '--slurm_extra', 'cpus-per-task=10']
    found = _dry_run(capsys, argv)
    opts = Options(table, './data', str(out), None, 'current', None, {})
    stages = plan(TABLES[table], opts, [0])[1]
    needs = scheduler.dependencies(stages)
    number = {s: i for i, s in enumerate(stages, 1)}
    assert [n for n, *_ in found] == list(range(1, len(stages) + 1))
    for (n, job, after, cmd), stage in zip(found, stages):
        assert after == {number[d] for d in needs[stage]}
        gpus = 8 if table == 'imagenet-lt' else 1
        assert job == f"{gpus} GPU{'s' if gpus > 1 else ''}, time 720 min, partition gpu, cpus-per-task 10"
        if gpus > 1:
            assert cmd[:6] == [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=8',
                               '--shutdown_timeout'] and '--bn_pieces' not in cmd
        else:
            assert cmd[0] == sys.executable and cmd[1].endswith('.py')
    assert sum(bool(a) for *_, a, _ in found) == {'digits-mini': 4, 'cifar10-ssp': 6, 'imagenet-lt': 5}[table]
    assert not out.exists()


def test_dry_run_of_finished_stages_names_no_job(tmp_path, capsys):
    out = tmp_path / 'out'
    _, stages = _digits_stages(out)
    base = stages[0]
    os.makedirs(os.path.dirname(base.output()))
    torch.save({'epoch': 1, 'step': 0}, base.output())  # stage 1 finished: gen_pseudolabels waits for nothing
    assert reproduce.main([*DIGITS, '--out', str(out), '--launcher', 'slurm', '--dry-run']) == 0
    text = capsys.readouterr().out
    assert '# stage 1/7: done, skipped (no job)' in text
    assert re.search(r'^# stage 4/7: not started; job: 1 GPU, time 1440 min\n', text, re.M)  # no afterok


# ---------------------------------------------------------------- submission (fake sbatch)

def test_slurm_submits_each_stage_after_the_jobs_it_needs_then_only_what_is_missing(tmp_path, fake_slurm, capsys):
    out = tmp_path / 'out'
    argv = [*DIGITS, '--out', str(out), '--launcher', 'slurm', '--slurm_partition', 'gpu', '--slurm_time',
            '2-00:00:00', '--slurm_account', 'lab', '--slurm_qos', 'high', '--slurm_constraint', 'a100',
            '--slurm_extra', 'cpus-per-task=10', '--slurm_extra', 'mem=32G']
    assert reproduce.main(argv) == 0
    console = capsys.readouterr().out
    opts, stages = _digits_stages(out)
    needs = scheduler.dependencies(stages)
    number = {stage: i for i, stage in enumerate(stages, 1)}
    ids = {stage: str(100 + i) for i, stage in enumerate(stages)}  # submitted in the printed order
    calls = (fake_slurm / 'calls').read_text().splitlines()
    # sbatch's own check of every option first (one GPU count: one check), then the 7 jobs and the results job
    assert calls[0] == ('--test-only --partition=gpu --account=lab --qos=high --constraint=a100 --time=2880 '
                        '--cpus-per-task=10 --mem=32G --gpus-per-node=1 --nodes=1 --ntasks-per-node=1 --wrap=true')
    assert len(calls) == 1 + 7 + 1 and not any('--test-only' in c for c in calls[1:])
    for stage in stages:
        options, lines = _sbatch(fake_slurm / f'job{ids[stage]}.sh')
        folder = launchers.job_folder(opts.path(), opts.stage_log(stage))
        assert options.pop('dependency', None) == ('afterok:' + ':'.join(ids[d] for d in needs[stage])
                                                   if needs[stage] else None)
        assert options == {'account': 'lab', 'constraint': 'a100', 'cpus-per-task': '10', 'gpus-per-node': '1',
                           'job-name': f"reproduce:{os.path.basename(folder)}", 'kill-on-invalid-dep': 'yes',
                           'mem': '32G', 'nodes': '1', 'ntasks-per-node': '1', 'open-mode': 'append',
                           'output': f'{folder}/%j_0_log.out', 'partition': 'gpu', 'qos': 'high',
                           'signal': 'USR2@180', 'time': '2880', 'wckey': 'submitit'}
        assert f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}" in lines
        assert any(line.endswith(f'-m submitit.core._submit {folder}') for line in lines)
        with open(os.path.join(folder, f'{ids[stage]}_submitted.pkl'), 'rb') as f:
            job = pickle.load(f).function  # what the node will run: this stage, as one process, output to its log
        assert (job.stage, job.launcher, job.log, job.cwd, job.forward) == (stage, (), opts.stage_log(stage),
                                                                          os.getcwd(), False)
        assert f"stage {number[stage]}/7: job {ids[stage]} (1 GPU, time 2880 min, " in console
    options, _ = _sbatch(fake_slurm / 'job107.sh')
    assert options['dependency'] == 'afterany:' + ':'.join(str(100 + i) for i in range(7))
    assert options['partition'] == 'gpu' and 'gpus-per-node' not in options

    # the base model's job runs, the rotation's waits; the other five ended without finishing their stage
    (fake_slurm / 'queue').write_text('100 RUNNING\n101 PENDING\n')
    assert reproduce.main([*argv, '--status']) == 0
    status = capsys.readouterr().out
    assert re.search(r'^\[reproduce\] stage 1/7: running \(not started\); job 100 running; ', status, re.M)
    assert re.search(r'^\[reproduce\] stage 2/7: pending \(not started\); job 101 pending; ', status, re.M)
    assert re.search(r'^\[reproduce\] stage 3/7: to submit \(not started\); job 102 ended without a result ',
                     status, re.M)
    assert status.rstrip().endswith('7 stages: 1 running, 1 pending, 5 to submit; the same command without '
                                    '--status runs what is neither done nor queued')
    assert len((fake_slurm / 'calls').read_text().splitlines()) == 9  # --status submitted nothing

    assert reproduce.main(argv) == 0
    console = capsys.readouterr().out
    assert 'stage 1/7: already running as job 100, not submitted again' in console
    assert 'stage 2/7: already pending as job 101, not submitted again' in console
    new = {stage: str(108 + i) for i, stage in enumerate(stages[2:])}
    resubmitted = {**{stages[0]: '100', stages[1]: '101'}, **new}
    for stage, job_id in new.items():
        options, _ = _sbatch(fake_slurm / f'job{job_id}.sh')
        assert options.get('dependency') == ('afterok:' + ':'.join(resubmitted[d] for d in needs[stage])
                                             if needs[stage] else None)
    options, _ = _sbatch(fake_slurm / 'job113.sh')
    assert options['dependency'] == 'afterany:' + ':'.join(sorted(resubmitted.values()))
    assert '5 job(s) submitted, 2 already queued' in console


def _error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.run_main(reproduce.main, argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith('error: '), err
    return err[0]


def test_bad_input_submits_nothing(tmp_path, fake_slurm, monkeypatch, capsys):
    out = tmp_path / 'out'
    argv = [*DIGITS, '--out', str(out), '--launcher', 'slurm']
    monkeypatch.setenv('FAKE_SBATCH_REFUSE', '--partition=nope|sbatch: error: invalid partition specified: nope')
    msg = _error(capsys, [*argv, '--slurm_partition', 'nope'])
    assert msg.endswith('sbatch: error: invalid partition specified: nope; nothing was submitted')
    monkeypatch.setenv('FAKE_SBATCH_REFUSE', '--time=43200|sbatch: error: Requested time limit is invalid '
                                             '(missing or exceeds some limit)')
    assert 'Requested time limit is invalid' in _error(capsys, [*argv, '--slurm_time', '30-00:00:00'])
    assert "--slurm_time 'a week'" in _error(capsys, [*argv, '--slurm_time', 'a week'])
    assert 'expected KEY=VALUE' in _error(capsys, [*argv, '--slurm_extra', 'exclusive'])
    assert 'use --slurm_time 10' in _error(capsys, [*argv, '--slurm_extra', 'time=10'])
    assert "sets --gpus-per-node of each stage's job" in _error(capsys, [*argv, '--slurm_extra', 'gpus_per_node=2'])
    assert 'leave --gpus, --jobs and --jobs-per-gpu out' in _error(capsys, [*argv, '--jobs', '2'])
    assert 'did you mean slurm?' in _error(capsys, [*DIGITS, '--out', str(out), '--launcher', 'slrum'])
    assert '--slurm_partition sets the SLURM jobs' in _error(capsys, [*DIGITS, '--out', str(out),
                                                                      '--slurm_partition', 'gpu'])
    assert (fake_slurm / 'calls').read_text().count('--test-only') == 2 and not (fake_slurm / 'next').exists()
    monkeypatch.setenv('PATH', str(tmp_path / 'empty'))  # no sbatch: not a login node
    msg = _error(capsys, argv)
    assert 'sbatch is not on PATH' in msg and '--launcher submitit-local' in msg
    monkeypatch.setitem(sys.modules, 'submitit', None)  # not installed
    for mode in ('slurm', 'submitit-local'):
        msg = _error(capsys, [*DIGITS, '--out', str(out), '--launcher', mode])
        assert 'needs submitit' in msg and 'pip install submitit' in msg
    assert not out.exists()


def test_slurm_time_is_read_as_sbatch_reads_it():
    minutes = {'90': 90, '0:30': 1, '1:30': 2, '02:00:00': 120, '1-0': 1440, '1-12:30': 2190,
               '2-00:00:00': 2880, '30:00': 30}
    assert {t: launchers.parse_time(t) for t in minutes} == minutes
    for bad in ('0', '1h', '-1', '1-', '1:2:3:4'):
        with pytest.raises(command.UserError):
            launchers.parse_time(bad)


# ---------------------------------------------------------------- issue 34: committed results stay as they are

def test_default_output_is_ignored_by_git_and_an_empty_collect_keeps_an_existing_table(tmp_path, capsys):
    assert command.build_parser().parse_args(['--table', 'digits-mini']).out == os.path.join('results', 'local')
    if subprocess.run(['git', 'rev-parse'], cwd=REPO, capture_output=True).returncode:
        pytest.skip('not a git checkout')
    ignored = subprocess.run(['git', 'check-ignore', '-q', 'results/local/digits-mini.md'], cwd=REPO)
    assert ignored.returncode == 0  # git status never shows what a run writes there
    tracked = subprocess.run(['git', 'ls-files', 'results/digits-mini.md'], cwd=REPO, capture_output=True,
                             text=True).stdout.strip()
    assert tracked == 'results/digits-mini.md'  # the README's measured table, which --out results would replace
    out = tmp_path / 'out'
    out.mkdir()
    before = {ext: f'{ext} of a longer run'.encode() for ext in ('md', 'csv', 'png')}
    for ext, data in before.items():
        (out / f'digits-mini.{ext}').write_bytes(data)
    msg = _error(capsys, [*DIGITS, '--out', str(out), '--collect'])
    assert 'no cell of digits-mini has finished' in msg and 'rather than replaced by an empty table' in msg
    opts, _ = _digits_stages(out)
    line = command.collect('digits-mini', opts, [0], None, refuse_empty=False)  # a run's own results pass
    assert line.startswith('[reproduce] no cell of digits-mini has finished')
    assert {ext: (out / f'digits-mini.{ext}').read_bytes() for ext in before} == before
    fresh = tmp_path / 'fresh'
    assert reproduce.main([*DIGITS, '--out', str(fresh), '--collect']) == 0  # nothing to keep: written
    assert 'missing' in (fresh / 'digits-mini.md').read_text()


# ---------------------------------------------------------------- jobs run through submitit's LocalExecutor

def _reproduce(out, *extra, env=None):
    return subprocess.Popen([sys.executable, 'reproduce.py', *DIGITS, '--out', str(out), '--launcher',
                             'submitit-local', *extra], cwd=REPO, env=env or fixtures.script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _csv(out):
    with open(os.path.join(out, 'digits-mini.csv')) as f:
        return list(csv.DictReader(f))


def _in_process(monkeypatch):
    """The reference: the same stages run one after the other in this process (one thread, as the
    stage processes' OMP_NUM_THREADS=1)."""
    def execute(cmd, env, *log_echo_children):
        i = next(k for k, w in enumerate(cmd) if w.endswith('.py'))
        return importlib.import_module(os.path.basename(cmd[i])[:-3]).main(cmd[i + 1:]) or 0
    monkeypatch.setattr(scheduler, 'execute', execute)


def _status(capsys, out, *extra):
    capsys.readouterr()
    assert reproduce.main([*DIGITS, '--out', str(out), '--launcher', 'submitit-local', *extra, '--status']) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_submitit_local_fills_the_ce_and_ssp_rows(tmp_path, monkeypatch, capsys, one_thread):
    cells = ['--cells', 'CE', 'CE+SSP']
    proc = _reproduce(tmp_path / 'jobs', *cells)
    _in_process(monkeypatch)
    assert reproduce.main([*DIGITS, '--out', str(tmp_path / 'ref'), *cells]) == 0
    console, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, console[-3000:]
    rows = _csv(tmp_path / 'jobs')
    assert [(r['cell'], r['status']) for r in rows] == [('CE', 'done'), ('CE+SSP', 'done')]
    assert rows == _csv(tmp_path / 'ref')  # every number, to the last digit written
    opts, _ = _digits_stages(tmp_path / 'jobs')
    stages = plan(TABLES['digits-mini'], opts, [0], ['CE', 'CE+SSP'])[1]
    assert [s.script for s in stages] == ['train.py', 'pretrain_rot.py', 'train.py']
    for stage in stages:  # one job each, ended with a result; the stage's output in its own log
        folder = launchers.job_folder(opts.path(), opts.stage_log(stage))
        job = launchers.latest_job(folder)
        assert sorted(os.listdir(folder)) == [f'{job}_0_log.out', f'{job}_0_result.pkl', f'{job}_submitted.pkl']
        assert launchers.last_exit_status(opts.stage_log(stage), job) == 0
        assert 'val Results' in open(opts.stage_log(stage)).read()
    collect = launchers.job_folder(opts.path(), 'collect.log')
    assert any(n.endswith('_result.pkl') for n in os.listdir(collect))  # the table came from the results job
    assert '| CE (Uniform) + rotation SSP | 1 |' in console
    status = _status(capsys, tmp_path / 'jobs', *cells)
    assert status.count(': done (1 epochs); job ') == 3 and status.rstrip().endswith('3 stages: 3 done')


PAUSE_ONCE = r'''
# Test hook (tests/test_reproduce_slurm.py): the first stage process to finish an optimizer step writes its
# pid to PAUSE_DIR/paused and waits there until its own stop handler has taken a signal; later ones do not.
import os
if os.environ.get('PAUSE_DIR'):
    import signal, time
    import torch
    _signal, _taken = signal.signal, []

    def _remember(signum, handler):
        if callable(handler):
            def wrapped(s, frame, handler=handler):
                _taken.append(s)
                return handler(s, frame)
            return _signal(signum, wrapped)
        return _signal(signum, handler)

    signal.signal = _remember
    _step = torch.optim.SGD.step

    def _paused_step(self, *args, **kwargs):
        out = _step(self, *args, **kwargs)
        marker = os.path.join(os.environ['PAUSE_DIR'], 'paused')
        if not os.path.exists(marker):
            with open(marker, 'w') as f:
                f.write(str(os.getpid()))
            deadline = time.time() + 120
            while not _taken and time.time() < deadline:
                time.sleep(0.01)
        return out

    torch.optim.SGD.step = _paused_step
'''


def _paused(tmp_path, proc):
    marker = tmp_path / 'paused' / 'paused'
    deadline = time.time() + 240
    while not (marker.exists() and marker.read_text()):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f'no stage paused:\n{proc.communicate()[0][-3000:]}')
        time.sleep(0.05)


def _job_process(folder):
    """(job id, pid of the job's Python process) of the local job in `folder`: the child of submitit's
    controller (whose pid is the job id) that runs submitit.core._submit."""
    job = launchers.latest_job(folder)
    with open(f'/proc/{job}/task/{job}/children') as f:
        children = [int(p) for p in f.read().split()]
    for pid in children:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            if b'submitit.core._submit' in f.read():
                return job, pid
    raise AssertionError(f'no job process under controller {job}: {children}')


def _hooked(tmp_path):
    hook, paused = tmp_path / 'hook', tmp_path / 'paused'
    hook.mkdir()
    paused.mkdir()
    (hook / 'sitecustomize.py').write_text(PAUSE_ONCE)
    return fixtures.script_env(PYTHONPATH=str(hook), PAUSE_DIR=str(paused))


@pytest.mark.slow
def test_a_stage_warned_by_slurm_saves_is_requeued_and_resumes_exactly(tmp_path, monkeypatch, capsys, one_thread):
    """SLURM's warning signal (SIGUSR2) to the CE stage's job and the stage during its first epoch of two:
    the stage ignores it, the job stops the stage through its own stop path (it saves), submitit
    requeues the job, the job resumes the stage from the mid-epoch checkpoint; the run ends as an
    uninterrupted one does, to the bit."""
    argv = ['--cells', 'CE', '--epochs', '2']
    proc = _reproduce(tmp_path / 'jobs', *argv, env=_hooked(tmp_path))
    _paused(tmp_path, proc)
    opts, stages = _digits_stages(tmp_path / 'jobs')
    opts.epochs = 2
    stage = plan(TABLES['digits-mini'], opts, [0], ['CE'])[1][0]
    folder = launchers.job_folder(opts.path(), opts.stage_log(stage))
    job, pid = _job_process(folder)
    status = _status(capsys, tmp_path / 'jobs', *argv)
    assert f'stage 1/1: running (not started); job {job} running' in status
    # SLURM signals every process of the job: the stage ignores the warning, the job takes it
    os.kill(int((tmp_path / 'paused' / 'paused').read_text()), signal.SIGUSR2)
    os.kill(pid, signal.SIGUSR2)
    console, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, console[-3000:]
    log = open(opts.stage_log(stage)).read()
    assert log.count('received SIGTERM') == 1
    assert f"job {job}: SLURM's warning signal: stage stopped (exit status 143); the job is requeued" in log
    assert f'job {job} (stopped at epoch 0 step 1 of 2: resuming): ' in log
    assert re.search(rf'^# [\d-]+ [\d:]+ job {job}: exit status 0$', log, re.M)
    assert f'Requeued job {job}' in open(os.path.join(folder, f'{job}_0_log.out')).read()
    assert launchers.latest_job(folder) == job  # the same job, requeued, not a new submission
    _in_process(monkeypatch)
    assert reproduce.main([*DIGITS, '--out', str(tmp_path / 'ref'), *argv]) == 0
    assert _csv(tmp_path / 'jobs') == _csv(tmp_path / 'ref')
    ref = stage.output().replace(str(tmp_path / 'jobs'), str(tmp_path / 'ref'))
    mine, theirs = (torch.load(p, map_location='cpu', weights_only=True) for p in (stage.output(), ref))
    fixtures.assert_same_tensors(mine['state_dict'], theirs['state_dict'])
    fixtures.assert_same_tensors(mine['optimizer']['state'], theirs['optimizer']['state'])
    status = _status(capsys, tmp_path / 'jobs', *argv)
    assert f'stage 1/1: done (2 epochs); job {job} ended, the stage\'s exit status 0' in status


@pytest.mark.slow
def test_a_failing_stage_blocks_its_dependant_only(tmp_path, capsys):
    """The rotation stage's job fails (its --resume names no file): the SSP stage that needs it never
    starts, the base model's job beside it finishes, and the results job writes the CE row."""
    out = tmp_path / 'out'
    missing = tmp_path / 'missing.pth.tar'
    extra = ['--cells', 'CE', 'CE+SSP', '--jobs', '2', f'--stage-args=pretrain_rot.py: --resume {missing}']
    console, _ = _reproduce(out, *extra).communicate(timeout=600)
    assert 'stage 1/3 finished' in console and 'stage 3/3 started' not in console, console[-3000:]
    assert re.search(r'^\[reproduce\] stage 2/3 failed at \+[\d.]+ s: ended with exit status 2; log ', console,
                     re.M)
    assert console.rstrip().splitlines()[-1].startswith('[reproduce] failed: stage 2/3 (pretrain_rot.py, exit '
                                                       'status 2): log ')
    assert {r['cell']: r['status'] for r in _csv(out)} == {'CE': 'done', 'CE+SSP': 'missing'}
    status = _status(capsys, out, *extra)
    lines = [line for line in status.splitlines() if line.startswith('[reproduce] stage ')]
    assert re.match(r'\[reproduce\] stage 1/3: done \(1 epochs\); job \d+ ended, the stage\'s exit status 0', lines[0])
    assert re.match(r"\[reproduce\] stage 2/3: failed \(not started\); job \d+ ended, the stage's exit status 2",
                    lines[1])
    assert lines[2].startswith('[reproduce] stage 3/3: to run (not started); train.py')
    assert status.rstrip().endswith('3 stages: 1 done, 1 failed, 1 to run; the same command without --status '
                                    'runs what is neither done nor queued')
    rot_log = [line for line in status.splitlines() if 'stage 2/3' in line][0].rsplit('output ', 1)[1]
    assert f'error: --resume file not found: {missing}' in open(rot_log).read()


def test_a_failed_jobs_exit_status_is_read_from_its_trace():
    trace = ('Traceback (most recent call last):\n  File "x", line 1\nrepro.jobs.StageExit: exit status 143: '
             'stopped on request after saving a resumable checkpoint; its output: a.log\n')
    assert jobs.exit_status(trace) == 143
    assert jobs.exit_status('Traceback\nRuntimeError: exit status 3\n') is None
