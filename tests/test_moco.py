"""MoCo: queue ring buffer, momentum encoder, shuffle-BN, pretrain_moco.py end to end (1 and 2
processes, resume), the hand-off to train.py's --pretrained_model, and one-sentence errors."""
import copy
import datetime
import os
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import dist
import engine
import fixtures
import pretrain_moco
from checkpoint import load_pretrained
from dataset.moco_augment import TwoCropsTransform, cifar_augmentation
from dataset.splitfile import SplitFileDataset
from errors import UserError
from fixtures import REPO
from models import build_model
from moco.builder import MoCo

pytestmark = pytest.mark.usefixtures('one_thread')  # see conftest.py; the subprocesses get OMP_NUM_THREADS=1


class TinyEncoder(nn.Module):
    """The smallest encoder with the models' interface: num_classes -> model with `.fc`."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def tiny_moco(**kwargs):
    return MoCo(TinyEncoder, **{'dim': 4, 'K': 8, 'm': 0.5, 'T': 0.2, **kwargs})


# ---------------------------------------------------------------- the module

def test_queue_advances_by_the_batch_size_and_wraps():
    model = tiny_moco()
    assert model.queue.shape == (4, 8)
    assert torch.allclose(model.queue.norm(dim=0), torch.ones(8))
    batches = [torch.randn(4, 4) for _ in range(3)]
    expected_ptr = [4, 0, 4]
    for keys, ptr in zip(batches, expected_ptr):
        model._dequeue_and_enqueue(keys)
        assert int(model.queue_ptr) == ptr
    # step 3 overwrote the oldest block (step 1's), step 2's block is still there
    assert torch.equal(model.queue[:, :4], batches[2].T)
    assert torch.equal(model.queue[:, 4:], batches[1].T)


def test_queue_write_wraps_around_the_end():
    model = tiny_moco(K=6)
    first, second = torch.randn(4, 4), torch.randn(4, 4)
    model._dequeue_and_enqueue(first)
    model._dequeue_and_enqueue(second)  # columns 4, 5, then 0, 1
    assert int(model.queue_ptr) == 2
    assert torch.equal(model.queue[:, 4:], second[:2].T)
    assert torch.equal(model.queue[:, :2], second[2:].T)
    assert torch.equal(model.queue[:, 2:4], first[2:].T)


def test_key_encoder_starts_as_the_query_encoder_and_follows_its_ema():
    model = tiny_moco(m=0.5)
    for q, k in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(q, k) and not k.requires_grad
    with torch.no_grad():
        for q in model.encoder_q.parameters():
            q.add_(torch.randn_like(q))
    before_k = [k.clone() for k in model.encoder_k.parameters()]
    model._momentum_update_key_encoder()
    for q, k0, k in zip(model.encoder_q.parameters(), before_k, model.encoder_k.parameters()):
        assert torch.equal(k, 0.5 * k0 + 0.5 * q)


def test_forward_gives_one_positive_and_k_negatives_per_query():
    model = tiny_moco(mlp=True)
    assert isinstance(model.encoder_q.fc, nn.Sequential) and model.encoder_q.fc[2].out_features == 4
    logits, labels = model(torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8))
    assert logits.shape == (4, 1 + 8)
    assert labels.dtype == torch.long and torch.equal(labels, torch.zeros(4, dtype=torch.long))
    assert logits.abs().max() <= 1 / 0.2 + 1e-5  # cosine similarities over T
    nn.CrossEntropyLoss()(logits, labels).backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert int(model.queue_ptr) == 4


def test_logits_are_q_dot_k_and_q_dot_queue_over_t_and_the_queue_takes_the_keys():
    torch.manual_seed(0)
    model = tiny_moco(K=16, m=0.5, T=0.2)
    with torch.no_grad():  # the query encoder moves away, so the momentum update shows
        for p in model.encoder_q.parameters():
            p.add_(0.1 * torch.randn_like(p))
    by_hand = copy.deepcopy(model)
    im_q, im_k = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
    fed_to_key_encoder = []
    model.encoder_k.register_forward_pre_hook(lambda module, args: fed_to_key_encoder.append(args[0].clone()))
    logits, labels = model(im_q, im_k)

    with torch.no_grad():
        for q, k in zip(by_hand.encoder_q.parameters(), by_hand.encoder_k.parameters()):
            k.mul_(0.5).add_(0.5 * q)  # theta_k <- m theta_k + (1 - m) theta_q, before the keys
        q = F.normalize(by_hand.encoder_q(im_q), dim=1)
        k = F.normalize(by_hand.encoder_k(im_k), dim=1)  # BN statistics do not depend on the order
    queue = by_hand.queue
    torch.testing.assert_close(logits, torch.cat([(q * k).sum(1, keepdim=True), q @ queue], dim=1) / 0.2)
    assert torch.equal(labels, torch.zeros(8, dtype=torch.long))
    torch.testing.assert_close(model.queue[:, :8], k.T)  # the newest keys, in the oldest slots
    assert torch.equal(model.queue[:, 8:], queue[:, 8:]) and int(model.queue_ptr) == 8

    # shuffle-BN: the key encoder saw the key images permuted, not in their own order
    fed = fed_to_key_encoder[0]
    order = [next(j for j in range(8) if torch.equal(fed[i], im_k[j])) for i in range(8)]
    assert sorted(order) == list(range(8)) and order != list(range(8))


def test_batch_shuffle_round_trips_with_one_process():
    model = tiny_moco()
    x = torch.arange(16.).view(8, 2)
    shuffled, idx_unshuffle = model._batch_shuffle_ddp(x)
    assert sorted(shuffled[:, 0].tolist()) == x[:, 0].tolist()
    assert torch.equal(model._batch_unshuffle_ddp(shuffled, idx_unshuffle), x)


def _two_rank_worker(rank, init_file, results):
    dist.setup(None, rank, 2, f'file://{init_file}', datetime.timedelta(seconds=30))
    try:
        torch.manual_seed(rank)  # different permutations drawn: the module must use rank 0's
        model = tiny_moco(K=12)
        x = rank * 100 + torch.arange(3.).view(3, 1)
        shuffled, idx_unshuffle = model._batch_shuffle_ddp(x)
        back = model._batch_unshuffle_ddp(shuffled, idx_unshuffle)
        model._dequeue_and_enqueue(torch.full((3, 4), float(rank)))
        results[rank] = (shuffled.flatten().tolist(), torch.equal(back, x), int(model.queue_ptr),
                         model.queue[:, :6].tolist())
    finally:
        dist.cleanup()


def test_shuffle_bn_and_queue_across_two_processes(tmp_path):
    results = mp.Manager().dict()
    # fork: the children inherit this interpreter instead of importing torch again (seconds each)
    mp.start_processes(_two_rank_worker, nprocs=2, args=(str(tmp_path / 'init'), results), start_method='fork')
    shuffled = results[0][0] + results[1][0]
    assert sorted(shuffled) == [0., 1., 2., 100., 101., 102.]  # one permutation of the global batch
    assert results[0][1] and results[1][1]  # each rank gets its own keys back
    assert results[0][2] == results[1][2] == 6  # the queue advances by the global batch
    assert results[0][3] == results[1][3] == [[0.] * 3 + [1.] * 3] * 4


def _ddp_buffers_worker(rank, init_file, results):
    dist.setup(None, rank, 2, f'file://{init_file}', datetime.timedelta(seconds=30))
    broadcasts, real = [], torch.distributed._broadcast_coalesced
    torch.distributed._broadcast_coalesced = lambda *a, **k: broadcasts.append(1) or real(*a, **k)
    try:
        for name, wrap in (('every step', nn.parallel.DistributedDataParallel),  # the original's DDP
                           ('at the start', lambda m: pretrain_moco.wrap_ddp(m, torch.device('cpu')))):
            torch.manual_seed(rank)  # other weights and queue per rank: DDP's start-up broadcast makes them rank 0's
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                model = wrap(tiny_moco(K=48))  # half of it written in 4 steps: the rest is the queue drawn
            del broadcasts[:]
            optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
            images = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
            for _ in range(4):
                logits, labels = pretrain_moco.moco_forward(model, [torch.randn(3, 3, 6, 6, generator=images)
                                                                    for _ in range(2)], None)
                F.cross_entropy(logits, labels).backward()
                optimizer.step()
                optimizer.zero_grad()
            results[name, rank] = len(broadcasts), {k: v.clone() for k, v in model.module.state_dict().items()}
            results[name, rank, 'warnings'] = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    finally:
        torch.distributed._broadcast_coalesced = real
        dist.cleanup()


@pytest.mark.slow
def test_moco_ddp_broadcasts_no_buffers_per_step_and_rank_0_saves_the_same_state(tmp_path):
    """The original's DDP broadcast the queue and every BatchNorm buffer from rank 0 before each step; without
    it rank 0's state (the one saved) is the same to the bit and the queue the same on every rank."""
    results = mp.Manager().dict()
    # spawn: autograd refuses to run in a child forked from a process that ran a backward pass already
    mp.start_processes(_ddp_buffers_worker, nprocs=2, args=(str(tmp_path / 'init'), results), start_method='spawn')
    (every, original), (none, ours) = results['every step', 0], results['at the start', 0]
    assert every == 4 and none == 0
    assert results['at the start', 0, 'warnings'] == results['at the start', 1, 'warnings'] == []  # no deprecated flag
    fixtures.assert_same_tensors(ours, original)
    other = results['at the start', 1][1]
    for key in ('queue', 'queue_ptr', 'encoder_q.conv.weight', 'encoder_k.conv.weight'):
        assert torch.equal(other[key], ours[key]), key
    assert not torch.equal(other['encoder_q.bn.running_mean'], ours['encoder_q.bn.running_mean'])  # never read


# ---------------------------------------------------------------- data

@pytest.fixture
def jpeg_split(tmp_path):
    """16 small JPEGs over 4 classes under tmp/images/, listed in tmp/split.txt."""
    root = tmp_path / 'images'
    rng = np.random.RandomState(0)
    lines = []
    for i in range(16):
        label = i % 4
        rel = f'train/class{label}/img {i}.jpg'  # a space in the name: the label is the last field
        os.makedirs(root / os.path.dirname(rel), exist_ok=True)
        Image.fromarray(rng.randint(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / rel)
        lines.append(f'{rel} {label}')
    split = tmp_path / 'split.txt'
    split.write_text('\n'.join(lines) + '\n')
    return root, split


def test_split_file_dataset_reads_images_and_labels(jpeg_split):
    root, split = jpeg_split
    data = SplitFileDataset(str(root), str(split), TwoCropsTransform(cifar_augmentation(32, (.5,) * 3, (.5,) * 3)))
    assert len(data) == 16 and data.targets == [i % 4 for i in range(16)]
    (q, k), label = data[5]
    assert q.shape == k.shape == (3, 32, 32) and label == 1


def test_split_file_errors_name_the_file(jpeg_split, tmp_path):
    root, split = jpeg_split
    with pytest.raises(UserError, match='split file not found: .*nope.txt'):
        SplitFileDataset(str(root), str(tmp_path / 'nope.txt'))
    bad = tmp_path / 'bad.txt'
    bad.write_text(split.read_text() + 'train/x.jpg cat\n')
    with pytest.raises(UserError, match=r'bad.txt line 17: expected'):
        SplitFileDataset(str(root), str(bad))
    os.remove(root / 'train/class3/img 7.jpg')
    with pytest.raises(UserError, match=r'1 of the 16 images listed in .*split.txt are missing .*img 7.jpg'):
        SplitFileDataset(str(root), str(split))


# ---------------------------------------------------------------- pretrain_moco.py

def moco_args(jpeg_split, out, *extra):
    root, split = jpeg_split
    return ['--dataset', 'imagenet', '--data', str(root), '--split_file', str(split), '--root_path', str(out),
            '--crop-size', '32', '-a', 'resnet32', '--moco-k', '16', '-b', '4', '-j', '0', '--epochs', '1',
            '--save-freq', '1', '--seed', '0', *extra]


def ckpt_path(out, epoch, dataset='imagenet'):
    return out / dataset / 'checkpoint' / f'moco_ckpt_{epoch:04d}.pth.tar'


def check_moco_checkpoint(path, epoch):
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    # the original's keys, plus what an exact resume needs
    # (and, from several processes, every rank's RNG state)
    assert set(ckpt) - {'rng_ranks'} == {'epoch', 'arch', 'state_dict', 'optimizer', 'step', 'seed', 'rng',
                                         'world_size', 'amp', 'script', 'task', 'flags'}
    assert ('rng_ranks' in ckpt) == (ckpt['world_size'] > 1)
    assert ckpt['epoch'] == epoch and ckpt['arch'] == 'resnet32'
    keys = list(ckpt['state_dict'])
    assert all(k.startswith('module.') for k in keys)
    assert {'module.queue', 'module.queue_ptr', 'module.encoder_q.conv1.weight', 'module.encoder_k.conv1.weight',
            'module.encoder_q.fc.2.weight'} <= set(keys)
    assert ckpt['state_dict']['module.queue'].shape == (128, 16)
    return ckpt


def test_one_process_epoch_writes_the_documented_checkpoint(jpeg_split, tmp_path, capsys):
    assert pretrain_moco.main(moco_args(jpeg_split, tmp_path / 'out')) == 0
    ckpt = check_moco_checkpoint(ckpt_path(tmp_path / 'out', 1), 1)
    assert int(ckpt['state_dict']['module.queue_ptr']) == 0  # 4 steps x 4 keys, K = 16
    assert 'Epoch: [1/1][4/4]' in capsys.readouterr().out  # the console counts epochs from 1, of --epochs


@pytest.mark.slow
def test_two_process_torchrun_epoch_then_resume(jpeg_split, tmp_path, capsys):
    out = tmp_path / 'out'
    cmd = fixtures.torchrun_cmd('pretrain_moco.py', *moco_args(jpeg_split, out, '--dist-timeout', '60'))
    proc = subprocess.run(cmd, cwd=REPO, env=fixtures.script_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Epoch: [1/1][4/4]' in proc.stdout  # 16 images / 2 ranks / 2 per rank, printed by rank 0 only
    assert proc.stdout.count('=> saved') == 1
    check_moco_checkpoint(ckpt_path(out, 1), 1)

    # resumed with one process: the 2-process file loads as is and training goes on from epoch 2
    argv = moco_args(jpeg_split, out, '--epochs', '2', '--resume', str(ckpt_path(out, 1)))
    assert pretrain_moco.main(argv) == 0
    printed = capsys.readouterr().out
    assert '(1 of 2 epochs done)' in printed and 'Epoch: [1/2]' not in printed and 'Epoch: [2/2][4/4]' in printed
    check_moco_checkpoint(ckpt_path(out, 2), 2)


def _assert_same_weights(a, b):
    """The checkpoint files `a` and `b` hold the same weights, to the bit."""
    fixtures.assert_same_tensors(*(torch.load(p, map_location='cpu', weights_only=True)['state_dict'] for p in (a, b)))


def test_resume_at_an_epoch_boundary_is_exact(jpeg_split, tmp_path):
    whole, split = tmp_path / 'whole', tmp_path / 'split'
    assert pretrain_moco.main(moco_args(jpeg_split, whole, '--epochs', '2')) == 0
    assert pretrain_moco.main(moco_args(jpeg_split, split, '--epochs', '1')) == 0
    assert pretrain_moco.main(moco_args(jpeg_split, split, '--epochs', '2',
                                        '--resume', str(ckpt_path(split, 1)))) == 0
    _assert_same_weights(ckpt_path(whole, 2), ckpt_path(split, 2))


@pytest.mark.parametrize('workers', ['0', '2'])  # with workers, each step's augmentations come from the step
def test_sigterm_saves_a_mid_epoch_checkpoint_that_resumes_exactly(jpeg_split, tmp_path, monkeypatch, capsys, workers):
    import signal
    whole, stopped = tmp_path / 'whole', tmp_path / 'stopped'
    epochs = []  # (epoch, loss, top-1, top-5) of every finished epoch: the averages of its steps
    real_epoch = pretrain_moco.train_one_epoch

    def recorded(*args, **kwargs):
        stats = real_epoch(*args, **kwargs)
        if not stats['stopped']:
            epochs.append((args[5], stats['loss'], stats['top1'], stats['top5']))
        return stats

    monkeypatch.setattr(pretrain_moco, 'train_one_epoch', recorded)
    assert pretrain_moco.main(moco_args(jpeg_split, whole, '--epochs', '2', '-j', workers)) == 0
    calls = []
    real_forward = pretrain_moco.moco_forward

    def forward_then_sigterm(model, views, labels):
        calls.append(1)
        if len(calls) == 6:  # epoch 2, step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(model, views, labels)

    monkeypatch.setattr(pretrain_moco, 'moco_forward', forward_then_sigterm)
    assert pretrain_moco.main(moco_args(jpeg_split, stopped, '--epochs', '2', '-j', workers)) == 128 + signal.SIGTERM
    interrupted = stopped / 'imagenet' / 'checkpoint' / 'moco_ckpt_interrupted.pth.tar'
    ckpt = torch.load(interrupted, map_location='cpu', weights_only=True)
    assert (ckpt['epoch'], ckpt['step']) == (1, 2)
    assert ckpt['step_meters']['count'] == 2 * 4  # two steps of -b 4 done in epoch 2
    assert 'stopped by SIGTERM during epoch 2 after step 2' in capsys.readouterr().out
    monkeypatch.setattr(pretrain_moco, 'moco_forward', real_forward)
    assert pretrain_moco.main(moco_args(jpeg_split, stopped, '--epochs', '2', '-j', workers,
                                        '--resume', str(interrupted))) == 0
    _assert_same_weights(ckpt_path(whole, 2), ckpt_path(stopped, 2))
    # the resumed epoch's loss and accuracies average all its steps, the 2 before the stop included
    whole_1, whole_2, stopped_1, resumed_2 = epochs
    assert stopped_1 == whole_1 and resumed_2 == whole_2 and resumed_2[0] == 1


def test_digits_checkpoint_initialises_the_classifier_backbone(tmp_path):
    out = tmp_path / 'out'
    # 8 px crops and 3 steps over the 365 images of digits-LT keep this a few seconds on a CPU
    argv = ['--dataset', 'digits', '-a', 'resnet32', '--root_path', str(out), '--moco-k', '120', '-b', '120',
            '--crop-size', '8', '-j', '0', '--epochs', '1', '--seed', '0']
    assert pretrain_moco.main(argv) == 0
    path = ckpt_path(out, 1, 'digits')
    messages = []
    classifier = build_model('resnet32', 10)
    head_before = classifier.fc.weight.clone()
    assert load_pretrained(classifier, str(path), log=messages.append) == 'MoCo'
    assert messages[0].endswith('fresh: fc.weight, fc.bias')
    moco_sd = torch.load(path, map_location='cpu', weights_only=True)['state_dict']
    for name, tensor in classifier.state_dict().items():
        if name.startswith('fc.'):
            continue
        assert torch.equal(tensor, moco_sd['module.encoder_q.' + name]), name
    assert torch.equal(classifier.fc.weight, head_before)

    # and through the user's command: train.py --pretrained_model, with the LDAM cosine head too
    import train
    for loss in ('CE', 'LDAM'):
        assert train.main(['--dataset', 'digits', '--loss_type', loss, '--epochs', '1', '-b', '128', '-j', '0',
                           '--pretrained_model', str(path), '--root_log', str(tmp_path / 'log'),
                           '--root_model', str(tmp_path / 'ckpt')]) == 0


def test_learning_rate_schedules():
    args = pretrain_moco.build_parser().parse_args(['--lr', '0.1', '--epochs', '10', '--schedule', '3', '6',
                                                    '--cos', 'false'])
    assert [round(pretrain_moco.lr_at(e, args), 6) for e in (0, 2, 3, 6, 9)] == [0.1, 0.1, 0.01, 0.001, 0.001]
    args.cos = True
    assert pretrain_moco.lr_at(0, args) == 0.1 and abs(pretrain_moco.lr_at(5, args) - 0.05) < 1e-12


def test_defaults_follow_the_original_script():
    args = pretrain_moco.resolve_args(pretrain_moco.build_parser().parse_args([]))
    assert (args.arch, args.crop_size, args.moco_t, args.mlp, args.aug_plus, args.cos) == \
        ('resnet50', 224, 0.2, True, True, True)
    assert args.split_file == 'imagenet_inat/data/ImageNet_LT/ImageNet_LT_train.txt'
    args = pretrain_moco.resolve_args(pretrain_moco.build_parser().parse_args(['--dataset', 'cifar10', '--mlp']))
    assert (args.arch, args.crop_size, args.mlp) == ('resnet32', 32, True)


@pytest.mark.parametrize('flags,native_bf16,amp,nhwc', [
    ((), True, True, True),        # README: --amp on by default on an AMD CPU with AVX512-BF16, as train.py
    ((), False, False, True),      # ... off where bf16 would be emulated; --channels-last on by default
    (('--no-amp', '--no-channels-last'), True, False, False),
    (('--amp',), False, True, True),
])
def test_speed_flags_reach_the_training_step(jpeg_split, tmp_path, monkeypatch, flags, native_bf16, amp, nhwc):
    monkeypatch.setattr(torch.cpu, 'get_capabilities', lambda: {'avx512_bf16': native_bf16, 'amx_bf16': False})
    monkeypatch.setattr(engine, 'cpu_vendor', lambda: 'AuthenticAMD')  # where AVX512-BF16 trains faster
    seen = []
    real_forward = pretrain_moco.moco_forward

    def spy(model, views, labels):
        conv = model.encoder_q.conv1.weight
        seen.append((torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16,
                     [v.is_contiguous(memory_format=torch.channels_last) for v in views],
                     conv.is_contiguous(memory_format=torch.channels_last)))
        logits, labels = real_forward(model, views, labels)
        seen[-1] += (logits.dtype,)
        return logits, labels

    monkeypatch.setattr(pretrain_moco, 'moco_forward', spy)
    assert pretrain_moco.main(moco_args(jpeg_split, tmp_path / 'out', *flags)) == 0
    assert seen == [(amp, [nhwc, nhwc], nhwc, torch.bfloat16 if amp else torch.float32)] * 4  # 16 images, -b 4
    # the queue keeps float32 keys whatever the step's precision
    ckpt = check_moco_checkpoint(ckpt_path(tmp_path / 'out', 1), 1)
    assert ckpt['state_dict']['module.queue'].dtype == torch.float32



def test_a_resumed_run_keeps_the_precision_its_steps_ran_in(jpeg_split, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cpu, 'get_capabilities', lambda: {'avx512_bf16': True, 'amx_bf16': False})
    monkeypatch.setattr(engine, 'cpu_vendor', lambda: 'AuthenticAMD')  # --amp's default: bf16
    out = tmp_path / 'out'
    assert pretrain_moco.main(moco_args(jpeg_split, out)) == 0
    assert check_moco_checkpoint(ckpt_path(out, 1), 1)['amp'] is True
    monkeypatch.setattr(engine, 'cpu_vendor', lambda: 'GenuineIntel')  # resumed where the default is float32
    seen = []
    real_forward = pretrain_moco.moco_forward

    def spy(model, views, labels):
        logits, labels = real_forward(model, views, labels)
        seen.append(logits.dtype)
        return logits, labels

    monkeypatch.setattr(pretrain_moco, 'moco_forward', spy)
    capsys.readouterr()
    assert pretrain_moco.main(moco_args(jpeg_split, out, '--epochs', '2', '--resume', str(ckpt_path(out, 1)))) == 0
    assert seen == [torch.bfloat16] * 4
    assert "=> the training steps go on in bf16, as the resumed run's did" in capsys.readouterr().out
    assert check_moco_checkpoint(ckpt_path(out, 2), 2)['amp'] is True

def test_speed_flags_offered_are_those_that_apply():
    helps = pretrain_moco.build_parser().format_help()
    assert '--amp' in helps and '--channels-last' in helps
    # no device loader (ImageNet-size images come from worker processes), no evaluation, no compile
    for flag in ('--loader', '--amp-eval', '--compile'):
        assert flag not in helps


# ---------------------------------------------------------------- bad input

def test_queue_size_must_be_a_multiple_of_the_batch(jpeg_split, tmp_path):
    with pytest.raises(UserError, match=r'--moco-k 16 must be a multiple of the batch of one step over all processes \(5\)'):
        pretrain_moco.main(moco_args(jpeg_split, tmp_path, '-b', '5'))


def test_missing_split_file_or_image_stop_before_training(jpeg_split, tmp_path):
    root, split = jpeg_split
    with pytest.raises(UserError, match='split file not found'):
        pretrain_moco.main(moco_args((root, tmp_path / 'missing.txt'), tmp_path))
    os.remove(root / 'train/class0/img 0.jpg')
    with pytest.raises(UserError, match='missing under'):
        pretrain_moco.main(moco_args(jpeg_split, tmp_path))
    with pytest.raises(UserError, match='--split_file does not apply to --dataset digits'):
        pretrain_moco.main(['--dataset', 'digits', '--split_file', str(split)])


@pytest.mark.parametrize('gpus,torchrun,mp_flag,nodes,expected', [
    # the original: one process per GPU, -b split over a node's GPUs, world = GPUs x nodes
    (4, None, True, 1, (4, 4, 32)),
    (8, None, True, 2, (8, 16, 16)),
    (1, None, True, 1, (0, 1, 128)),       # one GPU: no process to spawn, this one trains
    (0, None, True, 1, (0, 1, 128)),       # CPU only: one process, as before
    (4, None, False, 1, (0, 1, 128)),      # --multiprocessing-distributed False really turns it off
    (4, (4, 4), True, 1, (0, 4, 32)),      # under torchrun its processes are used, nothing is spawned
    (0, (2, 2), True, 1, (0, 2, 64)),      # torchrun on CPUs (gloo)
    (1, (8, 4), True, 1, (0, 8, 32)),      # two nodes of 4 torchrun processes
])
def test_launch_layout_follows_the_original(gpus, torchrun, mp_flag, nodes, expected):
    layout = pretrain_moco.launch_layout(gpus, torchrun, mp_flag, nodes, 128)
    assert (layout.spawn, layout.world_size, layout.per_process_batch) == expected


@pytest.mark.parametrize('value,expected', [(None, True), ('True', True), ('False', False), ('0', False)])
def test_multiprocessing_distributed_flag_spellings(value, expected):
    argv = [] if value is None else ['--multiprocessing-distributed', value]
    args = pretrain_moco.build_parser().parse_args(argv)
    assert args.multiprocessing_distributed is expected
    assert (args.world_size, args.rank, args.dist_url) == (1, 0, 'tcp://localhost:10001')


def test_cpu_run_prints_its_layout_and_trains_in_one_process(jpeg_split, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')  # on a GPU machine: hidden on purpose (dist.visible_gpus)
    assert pretrain_moco.main(moco_args(jpeg_split, tmp_path, '--multiprocessing-distributed')) == 0
    out = capsys.readouterr().out
    assert '=> one process; 4 images per process and step, 4 in all' in out


def test_unreachable_dist_url_ends_with_one_sentence_in_bounded_time(jpeg_split, tmp_path):
    # A port bound here but never listening refuses connections, and stays ours for the whole test:
    # a port closed again before use could be taken by another run (e.g. a torchrun store) meanwhile.
    held = socket.socket()
    held.bind(('127.0.0.1', 0))
    argv = moco_args(jpeg_split, tmp_path, '--world-size', '2', '--rank', '1',
                     '--dist-url', f'tcp://127.0.0.1:{held.getsockname()[1]}', '--dist-timeout', '2')
    start = time.time()
    with held:
        proc = subprocess.run([sys.executable, 'pretrain_moco.py', *argv], cwd=REPO, env=fixtures.script_env(),
                              capture_output=True, text=True, timeout=120)
    assert time.time() - start < 90
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: could not join the process group at tcp://127.0.0.1:')
    assert 'Traceback' not in proc.stderr


# ---------------------------------------------------------------- the per-GPU launcher and SIGTERM (issue 18)

# pretrain_moco.py as on a 2-GPU node: the parent is told it has 2 GPUs, so it spawns one process
# per GPU; the children see the real (CPU-only) torch and train on gloo.
TWO_GPU_PARENT = ("import sys, torch; sys.path.insert(0, {repo!r}); torch.cuda.is_available = lambda: True; "
                  "torch.cuda.device_count = lambda: 2; import cli, pretrain_moco; "
                  "cli.run_main(pretrain_moco.main, sys.argv[1:])")


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _spawned_children(pid):
    """The training processes mp.spawn started (not its resource tracker)."""
    with open(f'/proc/{pid}/task/{pid}/children') as f:
        pids = [int(p) for p in f.read().split()]
    found = []
    for p in pids:
        with open(f'/proc/{p}/cmdline', 'rb') as f:
            if b'spawn_main' in f.read():
                found.append(p)
    return found


@pytest.mark.slow
@pytest.mark.parametrize('target', ['group', 'parent', 'children', 'parent-usr1'])
def test_per_gpu_launcher_leaves_a_resumable_checkpoint_whoever_gets_sigterm(tmp_path, target):
    import signal
    argv = ['--dataset', 'digits', '-a', 'resnet20', '--moco-k', '64', '-b', '32', '-j', '0', '--seed', '0',
            '--root_path', str(tmp_path), '--dist-url', f'tcp://127.0.0.1:{_free_port()}', '--dist-timeout', '60',
            '--epochs', '3', '--save-freq', '1', '-p', '1']
    proc = subprocess.Popen([sys.executable, '-c', TWO_GPU_PARENT.format(repo=REPO), *argv], cwd=REPO,
                            env=fixtures.script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, as a SLURM job step has
    folder = tmp_path / 'digits' / 'checkpoint'
    head = []
    try:
        for line in proc.stdout:  # until the first step is done, in 2 processes
            head.append(line)
            if line.startswith('Epoch: [1/3][1/'):
                break
        assert proc.poll() is None, ''.join(head)[-3000:]
        children = _spawned_children(proc.pid)
        assert len(children) == 2
        if target == 'group':
            os.killpg(proc.pid, signal.SIGTERM)
        elif target == 'parent':
            os.kill(proc.pid, signal.SIGTERM)
        elif target == 'parent-usr1':  # SLURM's --signal=USR1@...: asks the launcher as SIGTERM does
            os.kill(proc.pid, signal.SIGUSR1)
        else:
            for child in children:
                os.kill(child, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert 'stopped by SIGTERM' in out and 'Traceback' not in out, out[-3000:]
    saved = os.listdir(folder)
    assert len(saved) == 1, saved  # written once, after a step both processes agreed on
    ckpt = torch.load(folder / saved[0], map_location='cpu', weights_only=True)
    assert ckpt['world_size'] == 2 and len(ckpt['rng_ranks']) == 2 and ckpt['script'] == 'pretrain_moco'
    if target == 'group':  # and it resumes, under the same launcher
        done = ckpt['epoch'] + 1
        resumed = subprocess.run([sys.executable, '-c', TWO_GPU_PARENT.format(repo=REPO),
                                  *argv[:argv.index('--epochs')], '--epochs', str(done), '--save-freq', '1',
                                  '--resume', str(folder / saved[0])],
                                 cwd=REPO, env=fixtures.script_env(), capture_output=True, text=True, timeout=180)
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
        assert torch.load(folder / f'moco_ckpt_{done:04d}.pth.tar', map_location='cpu',
                          weights_only=True)['epoch'] == done


def test_per_gpu_launcher_caches_a_folder_before_it_spawns(tmp_path, monkeypatch):
    """The launcher's process decodes and caches a folder before it starts the workers (which then read the
    cache, as the slow test below runs them)."""
    sys.path.insert(0, os.path.join(REPO, 'tools'))
    from digits_folder import write_digits_folder
    data = tmp_path / 'cells'
    write_digits_folder(str(data), per_class=4, val_per_class=1)
    at_spawn = []

    class Started:
        def join(self):
            return True

        def pids(self):
            return []

    def spawn(fn, nprocs, args, join):
        at_spawn.append(sorted(n.split('-')[0] for n in os.listdir(data / '.folder_cache')))
        return Started()
    monkeypatch.setattr(pretrain_moco.mp, 'spawn', spawn)
    args = pretrain_moco.resolve_args(pretrain_moco.build_parser().parse_args(['--dataset', 'folder', '--data',
                                                                               str(data)]))
    assert pretrain_moco.spawn_per_gpu(args, pretrain_moco.Layout(2, 2, 64, 'two fake GPUs')) == 0
    assert at_spawn == [['train', 'val']]


@pytest.mark.slow
def test_per_gpu_launcher_decodes_a_folder_once_before_starting_its_workers(tmp_path):
    """gpu review A2 and D5: each of the launcher's workers decoded the folder itself, and the ones that met a
    stale cache raced to delete it. Now the launcher's process decodes and caches it before spawning; the
    workers read that cache (memory-mapped). Here with a stale cache of the folder's earlier version."""
    sys.path.insert(0, os.path.join(REPO, 'tools'))
    from digits_folder import write_digits_folder
    data = tmp_path / 'cells'
    write_digits_folder(str(data), per_class=8, val_per_class=2)
    os.makedirs(data / '.folder_cache')
    stale = data / '.folder_cache' / 'train-native-0123456789abcdef.npy'
    np.save(stale, np.zeros((1, 8, 8, 3), dtype=np.uint8))
    argv = ['--dataset', 'folder', '--data', str(data), '-a', 'resnet20', '--moco-k', '32', '-b', '16', '-j', '0',
            '--crop-size', '8', '--seed', '0', '--epochs', '1', '--root_path', str(tmp_path / 'out'),
            '--dist-url', f'tcp://127.0.0.1:{_free_port()}', '--dist-timeout', '60']
    proc = subprocess.run([sys.executable, '-c', TWO_GPU_PARENT.format(repo=REPO), *argv], cwd=REPO,
                          env=fixtures.script_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert '=> one process per GPU: 2 on each of 1 node(s)' in proc.stdout
    assert proc.stdout.count('decoding the') == 2, proc.stdout  # train/ and val/, once, by the launcher
    assert not stale.exists() and len(os.listdir(data / '.folder_cache')) == 2
    assert (tmp_path / 'out' / 'folder-cells' / 'checkpoint' / 'moco_ckpt_0001.pth.tar').is_file()


def test_forwarded_stop_request_and_the_group_signal_after_it_count_once():
    import signal
    import trainer
    with trainer.GracefulStop(lambda line: None) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)   # the launcher's forward, here before the group's SIGTERM
        assert stop.signum == signal.SIGTERM and stop()
        os.kill(os.getpid(), signal.SIGTERM)   # the same request: not a second signal (that would kill us)
        os.kill(os.getpid(), signal.SIGUSR1)   # forwards after a request ask nothing new
        assert stop.signum == signal.SIGTERM


def test_a_signal_during_the_stop_agreement_is_kept_for_the_next_one(monkeypatch):
    import signal
    import trainer
    stop = trainer.GracefulStop(lambda line: None)
    monkeypatch.setattr(dist, 'is_dist', lambda: True)

    def agreement_interrupted(value):  # the signal's handler runs while the ranks exchange their values
        stop._handle(signal.SIGTERM, None)
        return value

    monkeypatch.setattr(dist, 'max_over_ranks', agreement_interrupted)
    assert stop(sync=True) is False            # no rank had asked when the values were read
    monkeypatch.setattr(dist, 'max_over_ranks', lambda value: value)
    assert stop(sync=True) is True and stop.signum == signal.SIGTERM   # was lost before
