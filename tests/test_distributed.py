"""Multi-process correctness: 2 gloo processes under torchrun on the CPU, tiny digits data.

Every test here would have hung or silently diverged before the fixes of issue 13: a collective
made by rank 0 only (MoCo's save condition), per-rank run seeds, rank-blind augmentation seeds,
per-rank BatchNorm statistics in the merged evaluation, an error on one rank only.
"""
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

import dist
import fixtures
import trainer
from checkpoint import load_checkpoint
from errors import UserError
from fixtures import REPO

NAME = 'digits_resnet20_CE_None_exp_0.01_ss_pretrained'
pytestmark = pytest.mark.slow


def _env(probe_dir=None, **probes):
    env = fixtures.script_env(IMB_DIST_TIMEOUT_MIN='2')
    if probe_dir is not None:
        env['PROBE_DIR'] = str(probe_dir)
    env.update({k: str(v) for k, v in probes.items()})
    return env


def _torchrun(script, *args, env, timeout=240):
    """SCRIPT under tests/dist_driver.py in two processes."""
    cmd = fixtures.torchrun_cmd(os.path.join(REPO, 'tests', 'dist_driver.py'), script, *args)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _train_args(tmp_path, *extra):
    return ['--dataset', 'digits', '-a', 'resnet20', '-b', '64', '-j', '0', '--root_log', str(tmp_path / 'log'),
            '--root_model', str(tmp_path / 'ckpt'), *extra]


# ---------------------------------------------------------------- MoCo: the collective-mismatch hang

def _moco_args(tmp_path, *extra):
    return ['--dataset', 'digits', '-a', 'resnet20', '--moco-k', '64', '-b', '32', '-j', '0', '--seed', '0',
            '--root_path', str(tmp_path), '--dist-timeout', '60', *extra]


def test_moco_epochs_between_saves_do_not_hang(tmp_path):
    """--epochs 3 --save-freq 2: epoch 1 saves nothing, epoch 2 is a --save-freq save, epoch 3 the save
    after the last epoch, off the --save-freq beat (pretrain_moco.py: "every --save-freq epochs and after
    the last one")."""
    start = time.time()
    proc = _torchrun('pretrain_moco.py', *_moco_args(tmp_path, '--epochs', '3', '--save-freq', '2'),
                     env=_env(SMALL_DIGITS=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.time() - start < 120  # the hang waited for --dist-timeout (60 s) and then failed
    folder = tmp_path / 'digits' / 'checkpoint'
    assert sorted(os.listdir(folder)) == ['moco_ckpt_0002.pth.tar', 'moco_ckpt_0003.pth.tar']
    assert [load_checkpoint(str(folder / f'moco_ckpt_000{e}.pth.tar'))['epoch'] for e in (2, 3)] == [2, 3]


def _children(pid):
    with open(f'/proc/{pid}/task/{pid}/children') as f:
        return [int(p) for p in f.read().split()]


def _local_rank_of(pid):
    with open(f'/proc/{pid}/environ', 'rb') as f:
        env = dict(kv.split(b'=', 1) for kv in f.read().split(b'\0') if b'=' in kv)
    return int(env.get(b'LOCAL_RANK', b'-1'))


def test_moco_sigterm_to_one_rank_stops_both_after_the_same_step(tmp_path):
    args = _moco_args(tmp_path, '--epochs', '40', '--save-freq', '1', '-p', '1')
    proc = subprocess.Popen(fixtures.torchrun_cmd(os.path.join(REPO, 'pretrain_moco.py'), *args), cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    folder = tmp_path / 'digits' / 'checkpoint'
    deadline = time.time() + 180
    while not (folder / 'moco_ckpt_0001.pth.tar').exists():  # marker: the first epoch is done
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    workers = [p for p in _children(proc.pid) if _local_rank_of(p) == 1]
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert 'stopped by SIGTERM' in out, out[-3000:]
    stopped = [f for f in os.listdir(folder) if f != 'moco_ckpt_0001.pth.tar']
    # Both ranks stopped at one step: the checkpoint was written once, after a step all agreed on.
    assert len(stopped) == 1, stopped
    ckpt = load_checkpoint(str(folder / stopped[0]))
    assert ckpt['world_size'] == 2 and len(ckpt['rng_ranks']) == 2
    done = ckpt['epoch'] + 1
    resumed = _torchrun('pretrain_moco.py', *_moco_args(tmp_path, '--epochs', str(done), '--save-freq', '1',
                                                        '--resume', str(folder / stopped[0])), env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(str(folder / f'moco_ckpt_{done:04d}.pth.tar'))['epoch'] == done


# ---------------------------------------------------------------- train.py, train_semi.py, pretrain_rot.py

def _probed(tmp_path, script, *args, **probes):
    """torchrun SCRIPT under tests/dist_driver.py with probes; fails the test unless it exits 0.
    Returns the folder the probes wrote into and the console output (stdout)."""
    folder = tmp_path / 'probes'
    folder.mkdir(exist_ok=True)
    for f in folder.iterdir():
        f.unlink()
    proc = _torchrun(script, *args, env=_env(folder, **probes))
    # the first rank to fail prints first; the launcher's summary comes last
    assert proc.returncode == 0, proc.stderr[:3000] + '\n...\n' + proc.stderr[-3000:]
    return folder, proc.stdout


def _ranks_hold_the_same_weights(probes, epoch):
    fixtures.assert_same_tensors(*(torch.load(probes / f'rank{r}_epoch{epoch}_step0.pt', weights_only=True)
                                   for r in (0, 1)))


def _last(log_text, prefix):
    return [line for line in log_text.splitlines() if line.startswith(prefix)][-1]


def test_train_two_epochs_ranks_agree_and_merged_evaluation_is_exact(tmp_path, capsys, small_digits):
    # small_digits: in this process, the digits the ranks train on (SMALL_DIGITS)
    probes, _ = _probed(tmp_path, 'train.py', *_train_args(tmp_path, '--epochs', '2', '--seed', '0'), PROBE_STATES=1,
                        SMALL_DIGITS=1)
    _ranks_hold_the_same_weights(probes, 2)
    ckpt_path = tmp_path / 'ckpt' / NAME / 'ckpt.pth.tar'
    fixtures.assert_same_tensors(load_checkpoint(str(ckpt_path))['state_dict'],
                         torch.load(probes / 'rank0_epoch2_step0.pt', weights_only=True))

    log = (tmp_path / 'log' / NAME / 'log_test.csv').read_text()
    confusion = np.array(json.loads(_last(log, 'val Confusion Matrix: ').split(': ', 1)[1]))
    assert confusion.sum() == 100 and (confusion.sum(axis=1) == 10).all()  # the balanced test set: 10 per digit
    merged_top1 = float(_last(log, 'val Results: ').split()[3])

    import train
    capsys.readouterr()
    assert train.main(_train_args(tmp_path, '--resume', str(ckpt_path), '-e')) == 0
    assert f'val Results: Prec@1 {merged_top1:.3f}' in capsys.readouterr().out

    from dataset import DATASETS, build_transform
    from engine import evaluate
    from models import build_model
    model = build_model('resnet20', 10)
    model.load_state_dict(load_checkpoint(str(ckpt_path))['state_dict'])
    loader = torch.utils.data.DataLoader(DATASETS['digits'].build_val(None, build_transform('digits', train=False)),
                                         batch_size=100)
    single = evaluate(model, torch.nn.CrossEntropyLoss(), loader, torch.device('cpu'), 10)
    assert np.array_equal(single['confusion'], confusion)


def test_pretrain_rot_and_train_semi_two_epochs_ranks_agree(tmp_path, small_digits):
    # small_digits: in this process, the digits the ranks train on (SMALL_DIGITS)
    probes, _ = _probed(tmp_path, 'pretrain_rot.py', *_train_args(tmp_path, '--epochs', '2', '--seed', '0'),
                        PROBE_STATES=1, SMALL_DIGITS=1)
    _ranks_hold_the_same_weights(probes, 2)

    from dataset import load_unlabeled_pool
    pool_args = {'imb_type': 'exp', 'imb_factor': 0.01, 'rand_number': 0}
    _, _, truth, _ = load_unlabeled_pool('digits', None, **pool_args)
    fixtures.write_pseudo_labels(tmp_path / 'pseudo_labeled_digits.pickle', truth, extra={'pool_args': pool_args})
    semi = _train_args(tmp_path, '--epochs', '2', '--seed', '0',
                       '--pseudo_labels', str(tmp_path / 'pseudo_labeled_digits.pickle'))
    probes, _ = _probed(tmp_path, 'train_semi.py', *semi, PROBE_STATES=1, SMALL_DIGITS=1)
    _ranks_hold_the_same_weights(probes, 2)


def test_without_seed_shards_are_disjoint_and_cover_the_data(tmp_path, small_digits):
    """... and rank 0 alone reports and writes the run folder: one evaluation line, plain weights (no
    `module.` prefix from DistributedDataParallel). small_digits: in this process, the digits the ranks
    train on (SMALL_DIGITS)."""
    probes, out = _probed(tmp_path, 'train.py', *_train_args(tmp_path, '--epochs', '1'), PROBE_INDICES=1,
                          SMALL_DIGITS=1)
    assert out.count('val Results: Prec@1') == 1
    ckpt = load_checkpoint(str(tmp_path / 'ckpt' / NAME / 'ckpt.pth.tar'))
    assert ckpt['epoch'] == 1 and not any(k.startswith('module.') for k in ckpt['state_dict'])
    shards = [[int(i) for i in (probes / f'rank{r}_indices.txt').read_text().split('\n')[0].split()[1:]]
              for r in (0, 1)]
    from dataset.digits import ImbalanceDigits
    n = len(ImbalanceDigits(None, 'exp', 0.01, 0))
    assert len(shards[0]) == len(shards[1]) == -(-n // 2)
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    overlap = set(shards[0]) & set(shards[1])
    assert len(overlap) <= n % 2  # only the padding that evens out the shards repeats


def test_ranks_augment_differently_with_workers(tmp_path):
    # The per-image pipeline, whose augmentations run in worker processes seeded from the loader's generator
    # (the device loader seeds its crops from (seed, epoch, step, rank) itself: tests/test_device_loader.py).
    probes, _ = _probed(tmp_path, 'train.py', *_train_args(tmp_path, '--epochs', '1', '--seed', '0', '-j', '2',
                                                        '--loader', 'torchvision'), PROBE_AUGMENT=1)
    draws = [sorted((probes / f'rank{r}_augment.txt').read_text().split()) for r in (0, 1)]
    assert len(draws[0]) > 100 and not set(draws[0]) & set(draws[1])


def test_non_finite_loss_on_one_rank_stops_both_promptly(tmp_path):
    start = time.time()
    proc = _torchrun('train.py', *_train_args(tmp_path, '--epochs', '3', '--seed', '0', '-b', '32', '-p', '2'),
                     env=_env(tmp_path, PROBE_NAN_AT='1:3'), timeout=200)
    assert time.time() - start < 90
    assert proc.returncode != 0
    assert 'the training loss became non-finite at epoch 1, step 3' in proc.stderr + proc.stdout
    ckpt = tmp_path / 'ckpt' / NAME / 'ckpt.pth.tar'
    assert not ckpt.exists()  # nothing non-finite was saved


# ---------------------------------------------------------------- pure decisions

@pytest.mark.parametrize('gpu,local_rank,world,gpus,expected', [
    (None, 0, 1, 0, ('cpu', None)),                  # CPU only
    (None, 0, 2, 0, ('cpu', 'gloo')),                # torchrun on CPUs
    (None, 0, 1, 1, ('cuda:0', None)),               # one GPU, one process
    (None, 0, 2, 1, ('cuda:0', 'nccl')),             # one visible GPU per process (SLURM --gpus-per-task=1)
    (None, 1, 2, 1, ('cuda:0', 'nccl')),
    (None, 3, 4, 4, ('cuda:3', 'nccl')),             # torchrun, 4 GPUs, local ranks 0-3
    (None, 0, 4, 4, ('cuda:0', 'nccl')),
    (2, 0, 1, 4, ('cuda:2', None)),                  # --gpu 2, single process
])
def test_device_plan(gpu, local_rank, world, gpus, expected):
    plan = dist.plan_device(gpu, local_rank, world, gpus)
    assert (plan.device, plan.backend) == expected


@pytest.mark.parametrize('gpu,local_rank,world,gpus,message', [
    (0, 1, 2, 4, '--gpu picks the GPU of a single-process run'),
    (1, 0, 1, 0, 'no CUDA GPU is available'),
    (4, 0, 1, 4, '--gpu 4 does not exist'),
    (None, 5, 8, 4, '6 processes on this node but 4 visible GPU'),
])
def test_device_plan_refusals(gpu, local_rank, world, gpus, message):
    with pytest.raises(UserError, match=message):
        dist.plan_device(gpu, local_rank, world, gpus)


def test_loader_seeds_differ_by_rank_and_epoch_and_rank_rngs_differ():
    seeds = {trainer.loaders.loader_seed(7, e, r) for e in range(3) for r in range(4)}
    assert len(seeds) == 12
    trainer.restore_rng(None, 7, 1, 2)
    a = torch.rand(3)
    trainer.restore_rng(None, 8, 1, 2)
    b = torch.rand(3)
    assert not torch.equal(a, b)


def test_mid_epoch_checkpoint_of_another_world_size_is_refused():
    trainer.check_resume_layout({'step': 0, 'world_size': 2}, 'x', 1)      # epoch end: fine
    trainer.check_resume_layout({'step': 5, 'world_size': 2}, 'x', 2)
    trainer.check_resume_layout({'step': 5}, 'x', 1)                       # the original's / older ones
    with pytest.raises(UserError, match='in the middle of an epoch by 2 process'):
        trainer.check_resume_layout({'step': 5, 'world_size': 2}, 'x', 1)
