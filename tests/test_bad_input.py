"""The bad-input catalogue: every entry must end with exit status != 0, one `error:` line naming
the problem, no traceback, and nothing written or changed on disk.

Each case runs the script's real front-end (`cli.run_main(script.main, argv)`) in-process, on a
shared "world" of tiny data sets, checkpoints and an earlier run's outputs.
"""
import hashlib
import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100, SVHN

import cli
import fixtures
import gen_pseudolabels
import pretrain_moco
import pretrain_rot
import train
import train_semi
import train_stage2
from models import build_model

RUN = 'cifar10_resnet32_CE_None_exp_0.01_ss_pretrained'


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def _ckpt(path, arch='resnet32', num_classes=10, **extra):
    model = build_model(arch, num_classes)
    torch.save({'epoch': 1, 'arch': arch, 'state_dict': model.state_dict(), 'best_acc1': 10.0,
                'optimizer': torch.optim.SGD(model.parameters(), 0.1, momentum=0.9).state_dict(), **extra}, path)
    return str(path)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp('world')
    fixtures.write_cifar10(w / 'data', per_class=20, test_per_class=5)
    fixtures.write_svhn(w / 'svhn', 'train', per_class=20)
    fixtures.write_svhn(w / 'svhn', 'test', per_class=5)
    fixtures.write_tinyimages(str(w / 'data' / 'ti_80M_selected.pickle'), n_per_class=10)
    fixtures.write_pseudo_labels(str(w / 'data' / 'pseudo_labeled_cifar.pickle'), np.zeros(7, dtype=np.int64))
    os.makedirs(w / 'broken' / 'cifar-10-batches-py')
    for name in os.listdir(w / 'data' / 'cifar-10-batches-py'):
        (w / 'broken' / 'cifar-10-batches-py' / name).write_bytes(b'\x80\x04garbage')
    _ckpt(w / 'good.pth.tar')
    _ckpt(w / 'c100.pth.tar', num_classes=100)
    _ckpt(w / 'r20.pth.tar', arch='resnet20')
    _ckpt(w / 'rot.pth.tar', num_classes=4, script='pretrain_rot', task='rotation')
    _ckpt(w / 'svhn.pth.tar', store_name='svhn_resnet32_CE_None_exp_0.01_ss_pretrained')
    torch.save({'epoch': 1, 'arch': 'resnet32', 'state_dict': {  # MoCo's layout: a query encoder, no classifier
        f'module.encoder_q.{k}': v for k, v in build_model('resnet32', 10).state_dict().items()
        if not k.startswith('fc.')}}, w / 'moco.pth.tar')
    (w / 'corrupt.pth.tar').write_bytes(b'PK\x03\x04 not a checkpoint')
    torch.save({'state_dict': {}, 'x': _Evil(str(w / 'pwned'))}, w / 'evil.pth.tar')
    (w / 'evil.pickle').write_bytes(pickle.dumps({'data': _Evil(str(w / 'pwned'))}))
    (w / 'afile').write_text('a file, not a folder')
    # an earlier run's outputs, which no failing invocation may touch
    for sub in ('log', 'ckpt'):
        os.makedirs(w / sub / RUN)
    (w / 'log' / RUN / 'log_train.csv').write_text('earlier run\n')
    _ckpt(w / 'ckpt' / RUN / 'ckpt.pth.tar')
    fixtures.write_pseudo_labels(str(w / 'out.pickle'), np.zeros(100, dtype=np.int64))
    # a JPEG split with one listed image missing
    os.makedirs(w / 'jpg' / 'a')
    Image.new('RGB', (8, 8)).save(w / 'jpg' / 'a' / '0.jpg')
    Image.new('RGB', (8, 8), 'red').save(w / 'jpg' / 'a' / '1.jpg')
    (w / 'goodsplit.txt').write_text('a/0.jpg 0\na/1.jpg 1\n')
    (w / 'split.txt').write_text('a/0.jpg 0\na/missing.jpg 1\n')
    (w / 'badsplit.txt').write_text('a/0.jpg\n')
    return w


def _snapshot(root):
    """Every file's md5 and every folder (an empty run folder left behind counts as a change)."""
    digest = {}
    for folder, _, files in os.walk(root):
        digest[folder] = 'folder'
        for name in files:
            path = os.path.join(folder, name)
            with open(path, 'rb') as f:
                digest[path] = hashlib.md5(f.read()).hexdigest()
    return digest


T = ['--data_path', '{w}/data', '--epochs', '1', '-b', '16', '-j', '0',
     '--root_log', '{w}/log', '--root_model', '{w}/ckpt']
S = ['--dataset', 'cifar10', '--data_path', '{w}/data', '--epochs', '1', '-b', '16', '-j', '0',
     '--root_log', '{w}/log', '--root_model', '{w}/ckpt']
G = ['--resume', '{w}/good.pth.tar', '--data_dir', '{w}/data', '--output_dir', '{w}', '-j', '0']
M = ['--dataset', 'imagenet', '--data', '{w}/jpg', '--crop-size', '8', '-a', 'resnet20', '-b', '2',
     '--moco-k', '4', '-j', '0', '--epochs', '1', '--root_path', '{w}/moco']

CASES = [
    # (id, script, argv, what the message must say)
    ('unknown dataset', train, ['--dataset', 'mnist'], r'invalid choice'),
    ('unknown arch', train, ['-a', 'vgg16'], r'invalid choice'),
    ('unknown loss', train, ['--loss_type', 'Hinge'], r'invalid choice'),
    ('unknown train rule', train, ['--train_rule', 'Oversample'], r'invalid choice'),
    ('imb_factor zero', train, ['--imb_factor', '0'], r'--imb_factor.*not in \(0, 1\]'),
    ('imb_factor above one', train, ['--imb_factor', '1.5'], r'not in \(0, 1\]'),
    ('imb_factor negative', train, ['--imb_factor', '-0.1'], r'not in \(0, 1\]'),
    ('zero batch size', train, ['-b', '0'], r'-b.*not a positive integer'),
    ('negative epochs', train, ['--epochs', '-1'], r'--epochs.*not a positive integer'),
    ('zero learning rate', train, ['--lr', '0'], r'--lr.*not a positive number'),
    ('negative workers', train, ['-j', '-2'], r'-j.*not a non-negative integer'),
    ('missing data folder', train, T[:1] + ['{w}/nowhere', '--no-download'] + T[2:], r'CIFAR-10.*not found.*nowhere'),
    ('corrupt CIFAR batch', train, T[:1] + ['{w}/broken'] + T[2:], r'corrupt|truncated'),
    ('missing resume file', train, T + ['--resume', '{w}/none.pth.tar'], r'--resume file not found'),
    ('corrupt resume file', train, T + ['--resume', '{w}/corrupt.pth.tar'], r'corrupt or truncated'),
    ('resume for 100 classes', train, T + ['--resume', '{w}/c100.pth.tar'], r'another number of classes'),
    ('resume of another script', train, T + ['--resume', '{w}/rot.pth.tar'], r'pretrain_rot\.py'),
    ('resume of another arch', train, T + ['--resume', '{w}/r20.pth.tar'], r'does not fit the architecture'),
    ('malicious checkpoint', train, T + ['--resume', '{w}/evil.pth.tar'], r'refusing to load'),
    ('pretrained of another arch', train, T + ['--pretrained_model', '{w}/r20.pth.tar', '--exp_str', 'new'],
     r'does not fit'),
    ('missing pretrained file', train, T + ['--pretrained_model', '{w}/none.pth', '--exp_str', 'new'],
     r'--pretrained_model file not found'),
    ('run folder holds a run', train, T, r'holds a finished run \(1 of 1 epochs done\) whose flags were not recorded'),
    ('resume into a folder holding another run', train, T + ['--resume', '{w}/good.pth.tar'],
     r'holds another run than --resume'),
    ('resume a folder', train, T + ['--resume', '{w}/ckpt/' + RUN, '-e'], r'is a folder; did you mean .*ckpt\.pth\.tar\?'),
    ('resume a text file', train, T + ['--resume', '{w}/afile', '-e'], r'is not a PyTorch checkpoint \(it holds text\)'),
    ('typo in a flag', train, T + ['--imb_factr', '0.1'], r'unrecognized arguments: --imb_factr 0.1; did you mean '
                                                            r'--imb_factor\?'),
    ('typo in a choice', train, ['--dataset', 'cifar-10'], r"invalid choice: 'cifar-10' .*; did you mean cifar10\?"),
    ('evaluate without checkpoint', train, T + ['-e'], r'needs a checkpoint'),
    ('unwritable output folder', train, T + ['--root_model', '{w}/afile/sub'], r'cannot create folder'),
    # a GPU that does not exist: none at all on a CPU machine, one past the last otherwise
    ('gpu that does not exist', train, T + ['--gpu', str(torch.cuda.device_count())],
     r'no CUDA GPU' if not torch.cuda.is_available() else r'does not exist'),
    ('rotation on svhn', pretrain_rot, ['--dataset', 'svhn'], r'invalid choice'),
    ('semi on cifar100', train_semi, ['--dataset', 'cifar100'], r'invalid choice'),
    ('semi unlabeled imbalance zero', train_semi, ['--imb_factor_unlabel', '0'], r'not in \(0, 1\]'),
    ('semi threshold above one', train_semi, ['--pseudo_threshold', '2'], r'not in \[0, 1\]'),
    ('semi missing TinyImages', train_semi, S + ['--unlabeled_data', '{w}/none.pickle'],
     r'80M TinyImages.*not found'),
    ('semi missing pseudo-labels', train_semi, S + ['--pseudo_labels', '{w}/none.pickle'],
     r'pseudo-label file not found.*gen_pseudolabels\.py'),
    ('semi pseudo-labels of wrong length', train_semi, S, r'has 7 labels but the unlabeled pool has 100'),
    ('semi malicious pseudo-labels', train_semi, S + ['--pseudo_labels', '{w}/evil.pickle'], r'refusing'),
    ('semi missing svhn extra', train_semi, ['--dataset', 'svhn', '--data_path', '{w}/svhn', '-j', '0', '--no-download',
                                             '--root_log', '{w}/log', '--root_model', '{w}/ckpt'],
     r'extra_32x32\.mat'),
    ('pseudo-labels output exists', gen_pseudolabels, G + ['--output_filename', 'out.pickle'], r'--overwrite'),
    ('pseudo-labels for 100 classes', gen_pseudolabels, G[:1] + ['{w}/c100.pth.tar'] + G[2:],
     r'another number of classes'),
    ('pseudo-labels without checkpoint', gen_pseudolabels, G[2:], r'required: --resume'),
    ('pseudo-labels svhn without extra', gen_pseudolabels,
     ['--dataset', 'svhn', '--resume', '{w}/good.pth.tar', '--data_dir', '{w}/svhn', '--output_dir', '{w}',
      '--no-download'], r'extra_32x32\.mat'),
    ('moco queue not divisible', pretrain_moco, M[:-6] + ['--moco-k', '5'] + M[-4:], r'--moco-k'),
    ('moco missing split file', pretrain_moco, M + ['--split_file', '{w}/none.txt'], r'split file.*not found|none\.txt'),
    ('moco missing image', pretrain_moco, M + ['--split_file', '{w}/split.txt'], r'missing\.jpg'),
    ('moco malformed split line', pretrain_moco, M + ['--split_file', '{w}/badsplit.txt'], r'line 1'),
    ('moco resume of a classifier', pretrain_moco, M + ['-a', 'resnet32', '--split_file', '{w}/goodsplit.txt', '--resume',
                                                        '{w}/good.pth.tar'], r'does not fit'),
    ('stage 2 unknown stage', train_stage2, ['--stage', 'BBN'], r'invalid choice'),
    ('stage 2 negative tau', train_stage2, ['--stage', 'tau_norm', '--tau', '-1'], r'--tau.*not a non-negative'),
    ('stage 2 tau for another stage', train_stage2, S + ['--stage', 'cRT', '--tau', '1'],
     r'--tau applies to --stage tau_norm'),
    ('stage 2 without stage 1', train_stage2, S + ['--stage', 'cRT'], r'--stage1 PATH is required'),
    ('stage 2 from 100 classes', train_stage2, S + ['--stage', 'cRT', '--stage1', '{w}/c100.pth.tar'],
     r'another number of classes \(100'),
    ('stage 2 from another data set', train_stage2, S + ['--stage', 'LWS', '--stage1', '{w}/svhn.pth.tar'],
     r'trained on svhn, not --dataset cifar10'),
    ('stage 2 from rotation', train_stage2, S + ['--stage', 'WB', '--stage1', '{w}/rot.pth.tar'],
     r'pretrain_rot\.py.*stage 2 starts from'),
    ('stage 2 from MoCo', train_stage2, S + ['--stage', 'tau_norm', '--stage1', '{w}/moco.pth.tar'],
     r'holds no classifier'),
]


@pytest.mark.parametrize('script,argv,pattern', [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_invocation(world, script, argv, pattern, capsys, monkeypatch):
    for cls in (CIFAR10, CIFAR100, SVHN):  # fixture files cannot match the real md5 sums
        monkeypatch.setattr(cls, '_check_integrity', lambda self: True)
    monkeypatch.chdir(world)
    before = _snapshot(world)
    with pytest.raises(SystemExit) as e:
        cli.run_main(script.main, [a.format(w=world) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert 'Traceback' not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert sum('error:' in line for line in lines) == 1, err
    last = lines[-1]
    assert lines == [last] and last.startswith('error: '), err  # one line, argument errors too (no usage block)
    assert re.search(pattern, last), last
    assert _snapshot(world) == before
    assert not (world / 'pwned').exists()


def test_catalogue_is_large_enough():
    assert len(CASES) >= 25
    assert {c[1] for c in CASES} == {train, train_semi, gen_pseudolabels, pretrain_rot, pretrain_moco, train_stage2}
