"""reproduce.py --jobs / --gpus: the stage graph, the slots, the bad input, and real runs of the digits
miniature as subprocesses (stages side by side, a SIGTERM during two of them, a failing stage).

The stages of the digits table need no data files and no checksum patch, so they run as the user's
command does: `python reproduce.py ...` starting each stage as its own process.
"""
import csv
import importlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import cli
import fixtures
import reproduce
import signals
from fixtures import REPO
from repro import scheduler
from repro.command import plan
from repro.scripts import Stage
from repro.tables import TABLES, Options

DIGITS = ['--table', 'digits-mini', '--seeds', '0', '--epochs', '1']
STAMP = re.compile(r'^\[reproduce\] stage (\d+)/\d+ (started|finished) at \+([\d.]+) s', re.M)


def _plan(table, seeds=(0,)):
    opts = Options(table, 'D', 'OUT', None, 'current', None, {})
    return plan(TABLES[table], opts, list(seeds))[1]


def _names(stages):
    """Stage -> a short name: the script and its --exp_str, --cfg or --dataset."""
    def name(stage):
        a = stage.argv
        for flag in ('--exp_str', '--cfg'):
            if flag in a:
                return f"{stage.script}:{os.path.basename(stage.flag(flag))}"
        return stage.script
    return {s: name(s) for s in stages}


def _graph(table):
    stages = _plan(table)
    names = _names(stages)
    return {names[s]: sorted(names[d] for d in needs) for s, needs in scheduler.dependencies(stages).items()}


def test_stage_graph_follows_the_pipelines():
    """The paper's pipelines: base model -> pseudo-labels -> semi-supervised run; rotation -> SSP
    fine-tuning (Uniform and Balanced); MoCo -> stage 1 -> cRT / tau-norm / LWS."""
    assert _graph('digits-mini') == {
        'train.py:base_s0r0e15_current': [],   # CE and CE (Balanced): two runs, the same --exp_str
        'pretrain_rot.py:rot_s0r0e15_current': [],
        'train.py:ssp_s0r0e15_current': ['pretrain_rot.py:rot_s0r0e15_current'],
        'gen_pseudolabels.py': ['train.py:base_s0r0e15_current'],
        'train_semi.py:semi_s0r0e15_current': ['gen_pseudolabels.py'],
    }
    stages = _plan('digits-mini')
    needs = scheduler.dependencies(stages)
    base, bal = [s for s in stages if s.script == 'train.py' and '--pretrained_model' not in s.argv]
    assert needs[base] == needs[bal] == [] and stages.index(base) < stages.index(bal)
    assert [s.flag('--train_rule') for s in (base, bal)] == ['None', 'Resample']
    gen, = [s for s in stages if s.script == 'gen_pseudolabels.py']
    assert needs[gen] == [base]  # the pseudo-labels come from the uniform base model, not the balanced one
    assert [len(needs[s]) for s in stages if '--pretrained_model' in s.argv] == [1, 1]
    assert _graph('cifar10-semi') == {
        'train.py:base_s0r0e200_current': [],
        'gen_pseudolabels.py': ['train.py:base_s0r0e200_current'],
        'train_semi.py:semi_s0r0e200_current': ['gen_pseudolabels.py'],
    }
    cifar_ssp = scheduler.dependencies(_plan('cifar10-ssp'))
    rots = [s for s in cifar_ssp if s.script == 'pretrain_rot.py']
    assert len(rots) == 3 and all(cifar_ssp[r] == [] for r in rots)
    for stage, needs in cifar_ssp.items():
        if '--pretrained_model' in stage.argv:  # the rotation run of its own rho
            assert [r.flag('--imb_factor') for r in needs] == [stage.flag('--imb_factor')]
    for table in ('imagenet-lt', 'inat'):
        assert _graph(table) == {
            'pretrain_moco.py': [],
            'imagenet_inat:feat_uniform.yaml': ['pretrain_moco.py'],
            'imagenet_inat:feat_balance.yaml': ['pretrain_moco.py'],
            'imagenet_inat:cls_crt.yaml': ['imagenet_inat:feat_uniform.yaml'],
            'imagenet_inat:cls_tau_norm.yaml': ['imagenet_inat:feat_uniform.yaml'],
            'imagenet_inat:cls_lws.yaml': ['imagenet_inat:feat_uniform.yaml'],
        }
    # seeds do not share stages: seed 1's semi run needs seed 1's pseudo-labels only
    two = _plan('cifar10-semi', (0, 1))
    needs = scheduler.dependencies(two)
    for stage in two:
        assert all(d.flag('--rand_number') == stage.flag('--rand_number') for d in needs[stage])


def test_slots_split_the_threads_and_name_one_gpu_each(monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '8')
    assert scheduler.cpu_slots(1) == [scheduler.Slot('')]  # one stage at a time: the environment as it is
    assert [s.env for s in scheduler.cpu_slots(3)] == [{'OMP_NUM_THREADS': '2'}] * 3  # 8 // 3
    assert [s.env for s in scheduler.cpu_slots(16)] == [{'OMP_NUM_THREADS': '1'}] * 16
    monkeypatch.delenv('OMP_NUM_THREADS')
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(12)))
    assert scheduler.cpu_slots(4)[0].env == {'OMP_NUM_THREADS': '3'}
    assert scheduler.gpu_slots([1], 1) == [scheduler.Slot('GPU 1', {'CUDA_VISIBLE_DEVICES': '1'})]
    two = scheduler.gpu_slots([0, 1], 2)
    assert [s.env['CUDA_VISIBLE_DEVICES'] for s in two] == ['0', '1', '0', '1']
    assert {s.env['OMP_NUM_THREADS'] for s in two} == {'3'}  # 12 cores over 4 stages
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '4,6,7')  # our GPU 1 is the machine's GPU 6
    assert [s.env['CUDA_VISIBLE_DEVICES'] for s in scheduler.gpu_slots([2, 1], 1)] == ['7', '6']


def _fake_gpus(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: count)


def _error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.run_main(reproduce.main, argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and sum('error:' in line for line in err) == 1, err
    return err[-1]


def test_bad_input_starts_nothing(tmp_path, capsys, monkeypatch):
    started = []
    monkeypatch.setattr(scheduler, 'execute', lambda cmd, *rest: started.append(cmd) or 0)
    out = str(tmp_path / 'out')
    argv = [*DIGITS, '--out', out]
    assert "'0' is not a positive integer" in _error(capsys, [*argv, '--jobs', '0'])
    assert "'0' is not a positive integer" in _error(capsys, [*argv, '--gpus', '0', '--jobs-per-gpu', '0'])
    _fake_gpus(monkeypatch, 0)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert 'no CUDA GPU' in _error(capsys, [*argv, '--gpus', '0'])
    _fake_gpus(monkeypatch, 2)
    msg = _error(capsys, [*argv, '--gpus', '0,2'])
    assert 'there is no GPU 2' in msg and 'torch sees 2' in msg
    assert 'distinct GPU ids' in _error(capsys, [*argv, '--gpus', '0,0'])
    assert 'distinct GPU ids' in _error(capsys, [*argv, '--gpus', 'cuda:0'])
    for extra in (['--gpus', '0,1'], ['--jobs', '2']):
        assert 'either --launcher or --gpus / --jobs' in _error(
            capsys, [*argv, '--launcher', 'torchrun --nproc_per_node=2', *extra])
    assert '--jobs-per-gpu' in _error(capsys, [*argv, '--gpus', '0', '--jobs', '2'])
    assert 'give --gpus too' in _error(capsys, [*argv, '--jobs-per-gpu', '2'])
    assert started == [] and not os.path.exists(out)


def test_readme_side_by_side_commands_parse(tmp_path, capsys, monkeypatch):
    """docs/reproduce.md's --gpus and --jobs commands, on a machine with 8 GPUs (a dry run: nothing starts)."""
    _fake_gpus(monkeypatch, 8)
    with open(os.path.join(REPO, 'docs', 'reproduce.md')) as f:
        commands = [shlex.split(line, comments=True)[2:] for line in f
                    if line.startswith('python reproduce.py') and ('--gpus' in line or '--jobs' in line)]
    assert len(commands) == 3  # --gpus, --jobs, and submitit-local's --jobs
    for argv in commands:
        assert reproduce.main([*argv, '--out', str(tmp_path), '--dry-run']) == 0
    assert not tmp_path.joinpath('runs').exists()


def test_each_stage_sees_only_its_gpu(tmp_path, monkeypatch):
    """--gpus 1,0: the two independent stages start at once, one on each GPU, with half the threads."""
    _fake_gpus(monkeypatch, 2)
    monkeypatch.setenv('OMP_NUM_THREADS', '6')
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    seen, both = {}, threading.Barrier(2, timeout=30)

    def execute(cmd, env, log, echo, children):
        seen[cmd[cmd.index('--train_rule') + 1]] = (env['CUDA_VISIBLE_DEVICES'], env['OMP_NUM_THREADS'], echo)
        both.wait()  # returns only once the other stage has started too
        return 1
    monkeypatch.setattr(scheduler, 'execute', execute)
    assert reproduce.main([*DIGITS, '--out', str(tmp_path), '--cells', 'CE', 'Balanced', '--gpus', '1,0']) == 1
    assert seen == {'None': ('1', '3', False), 'Resample': ('0', '3', False)}


class _Proc:
    def __init__(self):
        self.got = []

    def send_signal(self, signum):
        self.got.append(signum)


def test_a_stop_request_reaches_each_running_stage_once():
    """SIGTERM, SIGINT and SIGUSR1 all ask the stages to save and stop (SIGUSR1 passed on as SIGTERM,
    which torchrun also handles); the same signal again within a moment is the same request (a group
    signal and a forwarded copy), a later one a second request (the stages then stop at once)."""
    now = [0.0]
    children = scheduler.Children()
    children._repeats = signals.Repeats(clock=lambda: now[0])
    a, b = children.add(_Proc), children.add(_Proc)
    assert children.stop(signal.SIGINT) == 2 and children.stopped == signal.SIGINT
    now[0] = 1.5
    assert children.stop(signal.SIGINT) is None
    now[0] = 2.5
    assert children.stop(signal.SIGINT) == 2
    assert a.got == b.got == [signal.SIGINT, signal.SIGINT]
    assert children.add(_Proc) is None  # none starts after a stop
    other = scheduler.Children()
    proc = other.add(_Proc)
    other.stop(signal.SIGUSR1)
    assert proc.got == [signal.SIGTERM] and other.stopped == signal.SIGTERM


def test_the_closing_line_says_saved_only_for_stages_that_saved():
    stages = _plan('digits-mini')[:3]
    number = {s: i for i, s in enumerate(stages, 1)}
    log = lambda stage: f'{number[stage]}.log'  # noqa: E731
    code, line = scheduler._outcome({stages[0]: 143, stages[1]: 143}, set(), signal.SIGTERM, number, 3, log)
    assert (code, line) == (143, '[reproduce] stopped by SIGTERM: 2 stage(s) saved; run the same command again '
                                 'to resume them (finished stages are skipped)')
    # killed by the signal (-15) or stopped at once: not saved, and said so, with its log
    code, line = scheduler._outcome({stages[0]: 130, stages[1]: -15}, set(), signal.SIGINT, number, 3, log)
    assert code == -15 and line == ('[reproduce] stopped by SIGINT: 1 stage(s) saved; 1 did not save (stage 2/3 '
                                    '(pretrain_rot.py, exit status -15): log 2.log); run the same command again '
                                    'to resume them (finished stages are skipped)')
    assert scheduler._outcome({}, set(), signal.SIGTERM, number, 3, log) == (
        143, '[reproduce] stopped by SIGTERM; run the same command again to continue')


def test_imagenet_stages_train_the_papers_batchnorm_pieces_however_launched(tmp_path, capsys, monkeypatch):
    """The decoupled stages' BatchNorm batches are the original's on 8 GPUs (DataParallel's pieces) with
    and without --gpus (one GPU each: --bn_pieces 8) and under torchrun on 8 processes (8 pieces, no
    flag); --stage-args can still change it (issue 29 item 6, review C2)."""
    _fake_gpus(monkeypatch, 8)

    def imagenet_inat_commands(*extra):
        assert reproduce.main(['--table', 'imagenet-lt', '--seeds', '0', '--out', str(tmp_path), '--dry-run',
                               *extra]) == 0
        cmds = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if not line.startswith('#')]
        return [c[c.index('imagenet_inat.main') + 1:] for c in cmds if 'imagenet_inat.main' in c]

    plain, gpus = imagenet_inat_commands(), imagenet_inat_commands('--gpus', '0,1,2,3')
    assert len(plain) == 5 and plain == gpus
    assert all(c[:2] == ['--bn_pieces', '8'] and c.count('--bn_pieces') == 1 for c in plain)
    torchrun = imagenet_inat_commands('--launcher', 'torchrun --nproc_per_node=8')
    assert all('--bn_pieces' not in c for c in torchrun)
    mine = imagenet_inat_commands('--stage-args=imagenet_inat: --bn_pieces 2')
    assert all(c[-2:] == ['--bn_pieces', '2'] for c in mine)  # argparse takes the last: the user's


def test_moco_stages_are_refused_on_one_gpu_of_gpus(tmp_path, monkeypatch, capsys):
    """--gpus runs each stage as one process on one GPU: a MoCo stage would train without shuffle-BN, so it
    is refused before anything starts; once the MoCo stage is finished, --gpus runs the rest. A torchrun
    launcher of another process count than the recipe's 8 is said in one line."""
    _fake_gpus(monkeypatch, 8)
    monkeypatch.chdir(tmp_path)
    splits = tmp_path / 'imagenet_inat' / 'data' / 'ImageNet_LT'
    splits.mkdir(parents=True)
    for split in ('train', 'val', 'test'):
        (splits / f'ImageNet_LT_{split}.txt').write_text('a.jpg 0\n')
    (tmp_path / 'images').mkdir()
    started = []
    monkeypatch.setattr(scheduler, 'execute', lambda cmd, *env_log_echo_children: started.append(cmd) or 1)
    argv = ['--table', 'imagenet-lt', '--seeds', '0', '--data_path', str(tmp_path / 'images'), '--out', 'out']
    msg = _error(capsys, [*argv, '--gpus', '0,1'])
    assert 'MoCo\'s recipe trains on 8' in msg and started == []
    moco = plan(TABLES['imagenet-lt'], Options('imagenet-lt', str(tmp_path / 'images'), 'out', None, 'current',
                                               None, {}), [0])[1][0]
    os.makedirs(os.path.dirname(moco.output()))
    open(moco.output(), 'wb').close()  # MoCo finished: the decoupled stages may run one per GPU
    assert reproduce.main([*argv, '--gpus', '0,1']) == 1
    assert len(started) == 2 and all('--bn_pieces' in c for c in started)
    os.remove(moco.output())
    capsys.readouterr()
    assert reproduce.main([*argv, '--launcher', 'torchrun --nproc_per_node=4']) == 1
    assert ('note: --launcher starts 4 process(es) per stage, but the ImageNet-LT / iNat recipe trains on 8 GPUs'
            in capsys.readouterr().out)


# ---------------------------------------------------------------- real runs, side by side

def _reproduce(out, *extra, env=None, **popen):
    cmd = [sys.executable, 'reproduce.py', *DIGITS, '--out', str(out), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env or fixtures.script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def _finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _stamps(console):
    """{stage number: {'started': seconds, 'finished': seconds}} from the console lines."""
    stamps = {}
    for number, what, at in STAMP.findall(console):
        stamps.setdefault(int(number), {})[what] = float(at)
    return stamps


def _csv(out):
    with open(os.path.join(out, 'digits-mini.csv')) as f:
        return list(csv.DictReader(f))


def _logs(console):
    return re.findall(r', log (\S+\.log)', console)


def _in_process(monkeypatch):
    """Run each stage by calling its script's main in this process, one after the other (--jobs 1)."""
    def execute(cmd, env, *log_echo_children):
        i = next(k for k, w in enumerate(cmd) if w.endswith('.py'))
        return importlib.import_module(os.path.basename(cmd[i])[:-3]).main(cmd[i + 1:]) or 0
    monkeypatch.setattr(scheduler, 'execute', execute)


@pytest.mark.slow
def test_two_jobs_write_the_same_table_as_one(tmp_path, monkeypatch, one_thread):
    """Cells CE and CE + SSP: stages 1 (base model) and 2 (rotation) are independent, stage 3 (SSP
    fine-tuning) loads stage 2's weights. The one-at-a-time reference runs its stages in this process
    (one thread, as the subprocesses' OMP_NUM_THREADS=1), to save three interpreter start-ups."""
    cells = ['--cells', 'CE', 'CE+SSP']
    two = _reproduce(tmp_path / 'two', *cells, '--jobs', '2')
    _in_process(monkeypatch)
    assert reproduce.main([*DIGITS, '--out', str(tmp_path / 'one'), *cells]) == 0
    code2, console2 = _finish(two)
    assert code2 == 0, console2[-3000:]
    rows = _csv(tmp_path / 'two')
    assert [(r['cell'], r['status']) for r in rows] == [('CE', 'done'), ('CE+SSP', 'done')]
    assert rows == _csv(tmp_path / 'one')  # every number, to the last digit written
    stamps = _stamps(console2)
    assert sorted(stamps) == [1, 2, 3] and all(len(s) == 2 for s in stamps.values())
    base, rot, ssp = stamps[1], stamps[2], stamps[3]
    assert rot['started'] < base['finished'] and base['started'] < rot['finished']  # side by side
    assert ssp['started'] >= rot['finished']  # never before the stage it needs
    assert 'up to 2 at a time (job 1, job 2)' in console2
    assert '[reproduce] progress: 3/3 stages done (0 skipped before), 0 running, 0 failed' in console2
    # two stages at a time: each one's output in its own log under the run folder, not on the console
    logs = set(_logs(console2))
    assert len(logs) == 3 and 'val Results' not in console2
    for log in logs:
        assert os.path.dirname(log) == str(tmp_path / 'two' / 'runs' / 'digits-mini' / 'stage_logs')
        with open(log) as f:
            text = f.read()
        assert text.startswith('# ') and 'val Results' in text and 'Best ' in text


HOOK = r'''
# Test hook (tests/test_reproduce_scheduler.py): a stage pauses after its first optimizer step, marks
# that in PAUSE_DIR, and waits there until its own stop handler has taken a signal.
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
        marker = os.path.join(os.environ['PAUSE_DIR'], str(os.getpid()))
        if not os.path.exists(marker):
            open(marker, 'w').close()
            deadline = time.time() + 120
            while not _taken and time.time() < deadline:
                time.sleep(0.01)
        return out

    torch.optim.SGD.step = _paused_step
'''


def _wait_for_markers(folder, count, proc, timeout=180):
    deadline = time.time() + timeout
    while len(os.listdir(folder)) < count:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f'{len(os.listdir(folder))} of {count} stages paused:\n{proc.communicate()[0][-3000:]}')
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize('target, signum', [('group', signal.SIGTERM), ('group', signal.SIGINT),
                                            ('alone', signal.SIGUSR1)])
def test_a_stop_request_during_two_stages_leaves_both_resumable(tmp_path, target, signum):
    """A stop request while two stages run: both save once and the console says so. 'group': the signal
    to reproduce.py's whole process group (SLURM's scancel or time limit, `kill -- -PGID`; SIGINT: Ctrl-C
    in a terminal), which reaches reproduce.py alone, the stages running in their own sessions, so that
    each gets the request once, from reproduce.py (issue 29 item 2). 'alone': SIGUSR1 (SLURM's
    `--signal=USR1@...`) to reproduce.py, passed on as SIGTERM."""
    hook, paused = tmp_path / 'hook', tmp_path / 'paused'
    hook.mkdir()
    paused.mkdir()
    (hook / 'sitecustomize.py').write_text(HOOK)
    out = tmp_path / 'out'
    cells = ['--cells', 'CE', 'Balanced']  # two base models: independent stages
    proc = _reproduce(out, *cells, '--jobs', '2', start_new_session=True,
                      env=fixtures.script_env(PYTHONPATH=str(hook), PAUSE_DIR=str(paused)))
    _wait_for_markers(paused, 2, proc)  # both stages inside their first epoch
    if target == 'group':
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    code, console = _finish(proc)
    name = 'SIGINT' if signum == signal.SIGINT else 'SIGTERM'
    assert code == 128 + (signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM), console[-3000:]
    assert f'{signal.Signals(signum).name}: 2 running stage(s) save and stop' in console
    assert console.rstrip().endswith(f'stopped by {name}: 2 stage(s) saved; run the same command again to resume '
                                     'them (finished stages are skipped)')
    for log in set(_logs(console)):
        with open(log) as f:
            text = f.read()
        assert text.count(f'received {name}') == 1 and f'stopped by {name}' in text, text[-2000:]
    stages = [Stage('train.py', tuple(line.split(': ', 1)[1].split()[2:]))
              for line in console.splitlines() if ' started at ' in line]
    assert len(stages) == 2
    for stage in stages:
        progress = stage.progress()
        assert not progress.done and progress.resume == ('--resume', stage.output())
        assert 'stopped at epoch 0 step 1 of 1' in progress.note
    assert [r['status'] for r in _csv(out)] == ['missing', 'missing']
    if (target, signum) != ('group', signal.SIGTERM):
        return
    code, console = _finish(_reproduce(out, *cells, '--jobs', '2'))
    assert code == 0, console[-3000:]
    assert console.count('stopped at epoch 0 step 1 of 1: resuming') == 2
    assert all(stage.progress().done for stage in stages)
    assert [(r['cell'], r['n'], r['status']) for r in _csv(out)] == [('CE', '1', 'done'), ('Balanced', '1', 'done')]


# MoCo's per-GPU launcher believing it has two GPUs (tests/test_moco.py's TWO_GPU_PARENT), as the words that
# start a stage: argv[1] is the script's path, which reproduce.py puts after them. Under the __main__ guard:
# the spawned workers import this file again and must not start a launcher of their own.
FAKE_TWO_GPU_LAUNCHER = """
if __name__ == '__main__':
    import sys, torch
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 2
    import cli, pretrain_moco
    cli.run_main(pretrain_moco.main, sys.argv[2:])
"""
# reproduce.py's scheduler with one MoCo stage, started by the launcher above: DRIVER LAUNCHER LOG FLAGS...
# (two slots: the stage's output goes to its log alone, not through a pipe nobody reads until the end)
DRIVER = """
import sys
sys.path.insert(0, {repo!r})
from repro import scheduler
from repro.scripts import Stage
launcher, log, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
code, message = scheduler.run_stages([Stage('pretrain_moco.py', tuple(argv))], scheduler.cpu_slots(2),
                                     [sys.executable, launcher], lambda stage: log, lambda *args: None)
print(message, flush=True)
sys.exit(code)
"""


@pytest.mark.slow
def test_moco_launcher_as_a_stage_saves_once_when_the_request_reaches_it_twice(tmp_path):
    """MoCo's per-GPU launcher (two gloo workers) as a stage of reproduce.py's scheduler, on SLURM: the
    group signal of the job step reaches the launcher and its workers, and reproduce.py, in its own
    group, passes its own on a moment later. The launcher takes the second as the same request (not
    as 'stop at once', which SIGKILLed its workers), its workers save the interrupted checkpoint, and
    the scheduler says the stage saved; the stage then resumes from it (issue 29 item 2, review B2)."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    (tmp_path / 'launcher.py').write_text(FAKE_TWO_GPU_LAUNCHER)
    log = tmp_path / 'moco.log'
    argv = ['--dataset', 'digits', '-a', 'resnet20', '--moco-k', '64', '-b', '32', '-j', '0', '--seed', '0',
            '--root_path', str(tmp_path / 'moco'), '--dist-url', f'tcp://127.0.0.1:{port}', '--dist-timeout', '60',
            '--epochs', '3', '--save-freq', '1', '-p', '1']
    proc = subprocess.Popen([sys.executable, '-c', DRIVER.format(repo=REPO), str(tmp_path / 'launcher.py'),
                             str(log), *argv], cwd=REPO, env=fixtures.script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (log.exists() and 'Epoch: [1/3][1/' in log.read_text()):  # both workers past their first step
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.05)
        tasks = os.listdir(f'/proc/{proc.pid}/task')  # the stage is the child of a worker thread
        (stage,) = [int(p) for t in tasks for p in open(f'/proc/{proc.pid}/task/{t}/children').read().split()]
        assert os.getpgid(stage) == stage != os.getpgid(proc.pid)  # the stage in its own session
        os.killpg(stage, signal.SIGTERM)   # the job step's signal: launcher and workers
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGTERM)  # reproduce.py's: passed on to the launcher, a second SIGTERM
        console, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, console[-3000:]
    assert console.rstrip().endswith('stopped by SIGTERM: 1 stage(s) saved; run the same command again to resume '
                                     'them (finished stages are skipped)'), console[-3000:]
    text = log.read_text()
    assert 'stopped by SIGTERM' in text and 'Traceback' not in text, text[-3000:]
    progress = Stage('pretrain_moco.py', tuple(argv)).progress()
    folder = tmp_path / 'moco' / 'digits' / 'checkpoint'
    assert progress.resume == ('--resume', str(folder / 'moco_ckpt_interrupted.pth.tar')), progress
    ckpt = torch.load(folder / 'moco_ckpt_interrupted.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['world_size'] == 2 and len(ckpt['rng_ranks']) == 2


@pytest.mark.slow
def test_a_failing_stage_stops_its_dependants_only(tmp_path):
    """The rotation stage fails (its --resume names no file): the SSP stage that needs it never
    starts, the base model beside it finishes, and the last line names the rotation stage's log."""
    out = tmp_path / 'out'
    missing = tmp_path / 'missing.pth.tar'
    code, console = _finish(_reproduce(out, '--cells', 'CE', 'CE+SSP', '--jobs', '2',
                                       f'--stage-args=pretrain_rot.py: --resume {missing}'))
    assert code == 2, console[-3000:]
    stamps = _stamps(console)
    assert sorted(stamps) == [1, 2] and 'finished' in stamps[1] and 'finished' not in stamps[2]
    assert re.search(r'^\[reproduce\] stage 2/3 failed at \+[\d.]+ s: ended with exit status 2; log ', console, re.M)
    rows = {r['cell']: r['status'] for r in _csv(out)}
    assert rows == {'CE': 'done', 'CE+SSP': 'missing'}
    last = console.rstrip().splitlines()[-1]
    rot_log = str(out / 'runs' / 'digits-mini' / 'stage_logs' /
                  'pretrain_rot-checkpoint-digits_resnet20_CE_None_exp_0.01_rot_s0r0e1_current.log')
    assert last.startswith(f'[reproduce] failed: stage 2/3 (pretrain_rot.py, exit status 2): log {rot_log}, so 1 '
                           f'stage(s) that need it did not start; the others finished.')
    with open(rot_log) as f:
        assert f'error: --resume file not found: {missing}' in f.read()
