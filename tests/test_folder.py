"""--dataset folder (dataset/folder.py): a user's image folder through train.py, -e, gen_pseudolabels.py,
train_semi.py, pretrain_rot.py, pretrain_moco.py, train_stage2.py and reproduce.py; its cache; every bad
input. The data: scikit-learn's digits written out by tools/digits_folder.py (the README's worked example),
plus JPEG / RGB / nested / one-image classes."""
import errno
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fixtures
import gen_pseudolabels
import pretrain_moco
import pretrain_rot
import reproduce
import train
import train_semi
import train_stage2
import trainer
from checkpoint import load_checkpoint
from dataset import build_transform, folder, resolve_dataset
from errors import UserError
from fileio import safe_pickle_load
from fixtures import REPO
from test_reproduce import _in_process, _log_values, _rows

sys.path.insert(0, os.path.join(REPO, 'tools'))
import tsne  # noqa: E402
from digits_folder import write_digits_folder  # noqa: E402

# Sorted folder names; 'a single' (one RGB image) sorts after the digits.
CLASSES = [str(c) for c in range(10)] + ['a single']
TRAIN_COUNTS = [6] * 10 + [1]  # per_class 8, of which 2 per digit go to unlabeled/
NAME = 'folder-data_resnet32_CE_None_exp_1.0_ss_pretrained'  # named after the data folder


@pytest.fixture
def root(tmp_path):
    """Digits 32 x 32 grayscale PNGs, with class 3 re-saved as RGB JPEGs nested in 'sub dir/' under names
    with spaces, a class with one RGB PNG (created first, so that creation order is not sorted order),
    3 val images per digit and 20 unlabeled images."""
    data = tmp_path / 'data'
    os.makedirs(data / 'train' / 'a single')
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        data / 'train' / 'a single' / 'only one.png')
    write_digits_folder(str(data), per_class=8, val_per_class=3, unlabeled=2)
    three = data / 'train' / '3'
    os.makedirs(three / 'sub dir')
    for png in sorted(three.glob('*.png')):
        Image.open(png).convert('RGB').save(three / 'sub dir' / f'img {png.stem}.jpg', quality=95)
        png.unlink()
    return data


def _args(data, tmp_path, *extra):
    return ['--dataset', 'folder', '--data_path', str(data), '--imb_factor', '1', '--epochs', '1', '-b', '16',
            '-j', '0', '--seed', '0', '--root_log', str(tmp_path / 'log'), '--root_model', str(tmp_path / 'ckpt'),
            *extra]


def _top1(text):
    return re.findall(r'val Results: Prec@1 (\S+)', text)


def test_train_then_evaluate_gives_the_run_s_top1(root, tmp_path, capsys, one_thread):
    assert train.main(_args(root, tmp_path)) == 0
    out = capsys.readouterr().out
    assert f'cls num list: {TRAIN_COUNTS}' in out
    assert '11 classes, 61 training and 30 val images of 32x32 px' in out
    ckpt_path = tmp_path / 'ckpt' / NAME / 'ckpt.pth.tar'
    ckpt = load_checkpoint(str(ckpt_path))
    assert ckpt['classes'] == CLASSES and ckpt['image_size'] == 32 and len(ckpt['mean']) == 3
    run_top1 = _top1((tmp_path / 'log' / NAME / 'log_test.csv').read_text())
    assert len(run_top1) == 1
    assert train.main(_args(root, tmp_path, '--resume', str(ckpt_path), '-e')) == 0
    assert _top1(capsys.readouterr().out) == run_top1
    # the trial's folder checkpoint evaluated as --dataset digits printed 22.667 % and exit 0
    with pytest.raises(UserError, match=r'was trained with --dataset folder, this command says digits: pass '
                                        r'--dataset folder'):
        train.main(['--dataset', 'digits', '--imb_factor', '1', '-j', '0', '--resume', str(ckpt_path), '-e'])
    # tools/tsne.py reads the same folder at the checkpoint's size, classes and statistics
    png = tmp_path / 'tsne.png'
    assert tsne.main(['--resume', str(ckpt_path), '--dataset', 'folder', '--data_path', str(root), '--imb_factor', '1',
                      '--output', str(png)]) == 0
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and '=> 30 images, 64-d features' in capsys.readouterr().out
    (root / 'train' / 'a single' / 'only one.png').rename(root / 'train' / '9' / 'moved.png')
    (root / 'train' / 'a single').rmdir()
    with pytest.raises(UserError, match=r'was trained on the classes 0, 1, .*, 9, a single at 32 px; --data_path has '
                                        r'0, 1, .*, 9 at 32 px'):
        train.main(_args(root, tmp_path, '--resume', str(ckpt_path), '-e'))


def test_folder_images_are_read_as_written(root):
    info = resolve_dataset('folder', str(root))
    train_set = info.build_train(str(root), 'exp', 1.0, 0, None)
    assert info.classes == tuple(CLASSES) and info.num_classes == 11
    assert train_set.get_cls_num_list() == TRAIN_COUNTS
    data, labels = train_set.data, np.asarray(train_set.targets)
    assert data.shape == (61, 32, 32, 3) and data.dtype == np.uint8
    gray = data[labels == 0]
    assert (gray[..., 0] == gray[..., 2]).all()  # grayscale to RGB: three equal channels
    single = np.asarray(Image.open(root / 'train' / 'a single' / 'only one.png'))
    assert np.array_equal(data[labels == 10][0], single)
    assert len(data[labels == 3]) == 6  # the nested JPEGs with spaces in their names
    val = info.build_val(str(root), None)
    assert val.targets == [c for c in range(10) for _ in range(3)]


def test_long_tailed_subset_of_a_balanced_folder(tmp_path):
    write_digits_folder(str(tmp_path), per_class=12, val_per_class=2)
    info = resolve_dataset('folder', str(tmp_path))
    # CIFAR's rule: int(12 * 0.1 ** (i / 9)) images of class i
    subset = info.build_train(str(tmp_path), 'exp', 0.1, 0, None)
    assert subset.get_cls_num_list() == [12, 9, 7, 5, 4, 3, 2, 2, 1, 1]
    assert np.array_equal(info.build_train(str(tmp_path), 'exp', 0.1, 0, None).data, subset.data)
    assert not np.array_equal(info.build_train(str(tmp_path), 'exp', 0.1, 1, None).data, subset.data)
    assert info.build_train(str(tmp_path), 'step', 0.1, 0, None).get_cls_num_list() == [12] * 5 + [1] * 5
    # The same images listed in split files (in the sorted order a folder is read in) give the same data set.
    for split in ('train', 'val'):
        os.rename(tmp_path / split, tmp_path / f'listed {split}')
        lines = sorted(f"listed {split}/{p.relative_to(tmp_path / f'listed {split}')} {p.parent.name}"
                       for p in (tmp_path / f'listed {split}').rglob('*.png'))
        (tmp_path / f'{split}.txt').write_text('\n'.join(lines) + '\n')
    listed = resolve_dataset('folder', str(tmp_path))
    assert listed.classes == tuple(str(c) for c in range(10))
    assert np.array_equal(listed.build_train(str(tmp_path), 'exp', 0.1, 0, None).data, subset.data)


def test_gen_pseudolabels_and_train_semi_on_an_unlabeled_folder(root, tmp_path, capsys, one_thread):
    assert train.main(_args(root, tmp_path)) == 0
    base = str(tmp_path / 'ckpt' / NAME / 'ckpt.pth.tar')
    assert gen_pseudolabels.main(['--dataset', 'folder', '--resume', base, '--data_dir', str(root),
                                  '--output_dir', str(root), '-j', '0']) == 0
    entry = safe_pickle_load(str(root / 'pseudo_labeled_folder.pickle'))
    expected_paths = sorted(f'{n}.png' for n in range(20))  # string order: 0, 1, 10, 11, ...
    assert entry['paths'] == expected_paths and len(entry['extrapolated_targets']) == 20
    assert entry['extrapolated_targets'].max() < 11
    capsys.readouterr()
    semi = ['--dataset', 'folder', '--data_path', str(root), '--imb_factor', '1', '--imb_factor_unlabel', '1',
            '--epochs', '1', '-b', '16', '-j', '0', '--seed', '0', '--root_log', str(tmp_path / 'log'),
            '--root_model', str(tmp_path / 'ckpt')]
    assert train_semi.main(semi) == 0
    # 5 x 61 asked for, 20 there: every pool image is drawn
    assert 'training set: 61 labeled + 20 pseudo-labeled images' in capsys.readouterr().out
    os.unlink(root / 'unlabeled' / '7.png')
    with pytest.raises(UserError, match='not made for the 19 images of this unlabeled folder'):
        train_semi.main(semi)


def test_pretrain_rot_fine_tunes_into_train(root, tmp_path, capsys, one_thread):
    assert pretrain_rot.main(_args(root, tmp_path)) == 0
    rot = tmp_path / 'ckpt' / 'folder-data_resnet32_CE_None_exp_1.0_pretrain_rot' / 'ckpt.best.pth.tar'
    assert load_checkpoint(str(rot))['classes'] == CLASSES
    capsys.readouterr()
    assert train.main(_args(root, tmp_path, '--pretrained_model', str(rot), '--exp_str', 'ssp')) == 0
    assert re.search(r'loaded \d+ backbone tensors from rotation/supervised checkpoint', capsys.readouterr().out)


def test_pretrain_moco_fine_tunes_into_train(root, tmp_path, capsys, one_thread):
    """MoCo v2 on the folder's training images (the 32x32 recipe at the images' own 32 px, as digits' and
    CIFAR's), its query encoder then the backbone of train.py on the same folder."""
    out = tmp_path / 'moco'
    assert pretrain_moco.main(['--dataset', 'folder', '--data', str(root), '--imb_factor', '1', '--root_path', str(out),
                               '--moco-k', '32', '-b', '16', '-j', '0', '--epochs', '1', '--seed', '0']) == 0
    text = capsys.readouterr().out
    # 61 images, batches of 16 (drop_last): 3 steps
    assert '===> Training data length 61' in text and 'Epoch: [1/1][3/3]' in text
    weights = out / 'folder-data' / 'checkpoint' / 'moco_ckpt_0001.pth.tar'
    ckpt = load_checkpoint(str(weights))
    assert ckpt['arch'] == 'resnet32' and ckpt['state_dict']['module.queue'].shape == (128, 32)
    small = _moco_data(root)
    assert [tuple(v.shape) for v in small[0][0]] == [(3, 32, 32)] * 2
    assert 'GaussianBlur' not in repr(small.transform.base_transform)  # the 32x32 recipe has no blur
    assert train.main(_args(root, tmp_path, '--pretrained_model', str(weights), '--exp_str', 'moco')) == 0
    assert 'backbone tensors from MoCo checkpoint' in capsys.readouterr().out
    # images above 64 px: streamed, MoCo's ImageNet augmentation at --image_size, an ImageNet ResNet
    with pytest.raises(UserError, match=r'-a resnet32 is a CIFAR ResNet'):
        _moco_data(root, '--image_size', '72')
    large = _moco_data(root, '--image_size', '72', '-a', 'resnet18')
    assert [tuple(v.shape) for v in large[0][0]] == [(3, 72, 72)] * 2
    assert 'GaussianBlur' in repr(large.transform.base_transform)  # MoCo v2's ImageNet augmentation


def _moco_data(root, *extra):
    args = pretrain_moco.build_parser().parse_args(['--dataset', 'folder', '--data', str(root), '--imb_factor', '1',
                                                    *extra])
    return pretrain_moco.PRETRAIN_DATA['folder'].build(pretrain_moco.resolve_args(args))


def test_train_stage2_crt_on_a_folder_stage1(root, tmp_path, capsys, one_thread):
    """Stage 1 (train.py) on the folder, then cRT: the folder's classes, image side and statistics come with
    the stage-1 checkpoint; the features stay stage 1's, the classifier is retrained; -e repeats the run's
    top-1; a folder whose classes differ from stage 1's is refused in one line."""
    assert train.main(_args(root, tmp_path)) == 0
    stage1 = tmp_path / 'ckpt' / NAME / 'ckpt.pth.tar'
    crt = ['--dataset', 'folder', '--data_path', str(root), '--imb_factor', '1', '--stage', 'cRT', '--epochs', '1',
           '-b', '16', '-j', '0', '--seed', '0', '--root_log', str(tmp_path / 'log'),
           '--root_model', str(tmp_path / 'ckpt')]
    assert train_stage2.main(crt + ['--stage1', str(stage1)]) == 0
    ckpt = load_checkpoint(str(tmp_path / 'ckpt' / f'{NAME}_cRT' / 'ckpt.pth.tar'))
    before = load_checkpoint(str(stage1))
    assert ckpt['classes'] == CLASSES and ckpt['image_size'] == 32 and ckpt['mean'] == before['mean']
    assert ckpt['state_dict']['fc.weight'].shape == (11, 64)
    assert not torch.equal(ckpt['state_dict']['fc.weight'], before['state_dict']['fc.weight'])
    # the parameters stay stage 1's (BatchNorm statistics update in stage 2, as Kang et al.'s code)
    frozen = [k for k in before['state_dict'] if not k.startswith('fc.') and 'running_' not in k
              and 'num_batches_tracked' not in k]
    fixtures.assert_same_tensors({k: ckpt['state_dict'][k] for k in frozen}, {k: before['state_dict'][k] for k in frozen})
    run_top1 = _top1((tmp_path / 'log' / f'{NAME}_cRT' / 'log_test.csv').read_text())
    capsys.readouterr()
    stage2 = str(tmp_path / 'ckpt' / f'{NAME}_cRT' / 'ckpt.pth.tar')
    assert train_stage2.main(crt + ['--resume', stage2, '-e']) == 0
    assert _top1(capsys.readouterr().out) == run_top1 and len(run_top1) == 1
    (root / 'train' / 'a single' / 'only one.png').rename(root / 'train' / '9' / 'moved.png')
    (root / 'train' / 'a single').rmdir()
    with pytest.raises(UserError, match=r'--stage1 .* was trained on the classes 0, 1, .*, 9, a single at 32 px; '
                                        r'--data_path has 0, 1, .*, 9 at 32 px'):
        train_stage2.main(crt + ['--stage1', str(stage1), '--exp_str', 'again'])


def test_reproduce_folder_mini_runs_with_its_readme_command(root, tmp_path, monkeypatch, capsys):
    """`python reproduce.py --table folder-mini --data_path ROOT` (README), --seeds 0 --epochs 1 for time: every
    stage runs on the folder as it is, with ROOT/unlabeled the pseudo-labeled cell too, and every row holds
    its run's logged values; without the folder, one line before anything runs."""
    ran = _in_process(monkeypatch)
    out = str(tmp_path / 'out')
    assert reproduce.main(['--table', 'folder-mini', '--data_path', str(root), '--seeds', '0', '--epochs', '1',
                           '--out', out]) == 0
    assert [script for script, _ in ran] == ['train.py', 'pretrain_rot.py', 'train.py', 'gen_pseudolabels.py',
                                             'train_semi.py', 'train.py', 'train.py']
    rows = _rows(out, 'folder-mini')
    assert list(rows) == ['CE', 'CE+SSP', 'CE+DU', 'Balanced', 'Balanced+SSP']
    logs = {}
    for script, argv in ran:
        if script in ('train.py', 'train_semi.py'):
            args = (train if script == 'train.py' else train_semi).build_parser().parse_args(argv)
            assert (args.dataset, args.data_path, args.imb_factor, args.arch) == ('folder', str(root), 1.0, 'resnet20')
            name = (train.supervised_store_name if script == 'train.py' else train_semi.semi_store_name)(args)
            cell = {('train.py', 'None', False): 'CE', ('train.py', 'None', True): 'CE+SSP',
                    ('train_semi.py', 'None', False): 'CE+DU', ('train.py', 'Resample', False): 'Balanced',
                    ('train.py', 'Resample', True): 'Balanced+SSP'}[(script, args.train_rule,
                                                                    bool(args.pretrained_model))]
            logs[cell] = os.path.join(args.root_log, name)
    assert 'training set: 61 labeled + 20 pseudo-labeled images' in capsys.readouterr().out
    for key, row in rows.items():
        best, shots, n_val, per_class, last = _log_values(logs[key])
        assert (row['n'], row['status'], n_val, len(per_class)) == ('1', 'done', 1, 11), key
        assert float(row['best_err']) == pytest.approx(100 - best, abs=1e-4)
        assert float(row['last_err']) == pytest.approx(100 - last, abs=1e-4)
        # every class has fewer than 20 labeled training images: all are few-shot, and the few-shot cell is the
        # mean over the classes evaluated ('a single' has no val image: NaN, left out); train.py's log says the
        # same, train_semi.py's counts the pseudo-labeled images too (its own shot line differs on purpose)
        assert np.isnan(per_class[-1]) and not np.isnan(per_class[:-1]).any()
        assert (row['many'], row['medium']) == ('', '')
        assert float(row['few']) == pytest.approx(per_class[:-1].mean(), abs=1e-3)
        if key != 'CE+DU':
            assert shots == [pytest.approx(v, nan_ok=True) for v in (np.nan, np.nan, float(row['few']))]
        assert row['paper'] == ''
    os.rename(root / 'unlabeled', tmp_path / 'elsewhere')
    ran.clear()
    assert reproduce.main(['--table', 'folder-mini', '--data_path', str(root), '--seeds', '0', '--epochs', '1',
                           '--out', out]) == 0
    assert ran == [] and list(_rows(out, 'folder-mini')) == ['CE', 'CE+SSP', 'Balanced', 'Balanced+SSP']
    with pytest.raises(UserError, match=r'missing, and the folder-mini table needs it: an image folder: '
                                        r'ROOT/train/<class>/ .*README "Your own data"'):
        reproduce.main(['--table', 'folder-mini', '--data_path', str(tmp_path / 'nowhere'), '--out', out])


def _decodes(monkeypatch):
    calls = []
    real = folder._decode
    monkeypatch.setattr(folder, '_decode', lambda listing, size: calls.append(listing.source) or real(listing, size))
    return calls


def _caches(data):
    return sorted(os.listdir(data / folder.CACHE_FOLDER)) if (data / folder.CACHE_FOLDER).exists() else []


def test_cache_is_used_and_rebuilt_when_a_file_changes(root, monkeypatch):
    calls = _decodes(monkeypatch)
    first = resolve_dataset('folder', str(root)).build_train(str(root), 'exp', 1.0, 0, None).data
    assert len(calls) == 2 and len(_caches(root)) == 2  # train and val, decoded once, cached
    again = resolve_dataset('folder', str(root)).build_train(str(root), 'exp', 1.0, 0, None).data
    assert len(calls) == 2 and np.array_equal(again, first)  # read back, not decoded
    image = root / 'train' / '5' / '0.png'
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # same bytes, newer mtime
    resolve_dataset('folder', str(root))
    assert calls[2:] == [str(root / 'train')] and len(_caches(root)) == 2  # the stale cache is gone
    Image.fromarray(np.full((32, 32), 255, dtype=np.uint8)).save(image)  # other pixels, other size
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # the mtime of the last cache
    data = resolve_dataset('folder', str(root)).build_train(str(root), 'exp', 1.0, 0, None).data
    assert len(calls) == 4 and (data[np.asarray(TRAIN_COUNTS).cumsum()[4]] == 255).all()


def test_an_interrupted_cache_write_leaves_no_file(root, monkeypatch):
    def killed(fd):
        raise KeyboardInterrupt  # as a kill between writing the bytes and the rename

    with monkeypatch.context() as m:
        m.setattr(os, 'fsync', killed)
        with pytest.raises(KeyboardInterrupt):
            resolve_dataset('folder', str(root))
    assert _caches(root) == []  # no cache, no temporary
    calls = _decodes(monkeypatch)
    resolve_dataset('folder', str(root))
    assert len(calls) == 2 and len(_caches(root)) == 2


def _empty_class(data):
    os.makedirs(data / 'train' / '5b')


def _val_class_training_lacks(data):
    os.makedirs(data / 'val' / 'cat')
    Image.new('L', (32, 32)).save(data / 'val' / 'cat' / 'x.png')


def _corrupt(data):
    (data / 'train' / '2' / '1.png').write_bytes(b'not a png at all')


def _truncated(data):
    jpeg = data / 'train' / '3' / 'sub dir' / 'img 1.jpg'
    jpeg.write_bytes(jpeg.read_bytes()[:200])


def _non_image(data):
    (data / 'train' / '1' / 'notes.txt').write_text('labels checked by hand')


def _no_train(data):
    os.rename(data / 'train', data / 'training')


def _split_file_missing_image(data):
    os.rename(data / 'train', data / 'images')
    (data / 'train.txt').write_text('images/0/0.png 0\nimages/0/99.png 0\n')
    (data / 'val.txt').write_text('val/0/0.png 0\n')


def _mixed_sizes(data):
    Image.new('L', (16, 16)).save(data / 'train' / '4' / '0.png')


def _one_class(data):
    for split in ('train', 'val'):
        for d in (data / split).iterdir():
            if d.name != '0':
                shutil.rmtree(d)


BAD = {
    _one_class: r'train holds 1 class \(0\); a classifier needs at least two',
    _empty_class: r'class folder .*train/5b holds no images',
    _val_class_training_lacks: r'class folder .*val/cat has no counterpart in the training folder',
    _corrupt: r'cannot read image .*train/2/1\.png',
    _truncated: r'cannot read image .*train/3/sub dir/img 1\.jpg',
    _non_image: r'.*train/1/notes\.txt in .* is not an image',
    _no_train: r'has no train/ folder',
    _split_file_missing_image: r'1 of the 2 images listed in .*train\.txt are missing .*images/0/99\.png',
    _mixed_sizes: r'images of mixed sizes in .*train: .* is 32x32, .*train/4/0\.png is 16x16; pass --image_size',
}


@pytest.mark.parametrize('spoil', BAD, ids=lambda f: f.__name__.strip('_'))
def test_bad_input_is_one_line_and_writes_nothing(root, tmp_path, spoil):
    spoil(root)
    before = sorted(p for p in root.rglob('*'))
    with pytest.raises(UserError, match=BAD[spoil]) as e:
        train.main(_args(root, tmp_path))
    assert '\n' not in str(e.value)
    assert sorted(p for p in root.rglob('*')) == before  # no cache
    assert not (tmp_path / 'log').exists() and not (tmp_path / 'ckpt').exists()


def test_image_size_resizes_mixed_sizes(root):
    _mixed_sizes(root)
    info = resolve_dataset('folder', str(root), image_size=16)
    assert info.image_size == 16 and info.build_val(str(root), None).data.shape == (30, 16, 16, 3)


def test_larger_images_stream_through_the_jpeg_loader(root, tmp_path, capsys, one_thread):
    """--image_size above 64: read from the files at every step with imagenet_inat's transforms at that size,
    nothing cached, an ImageNet ResNet (train.py, -e, tools/tsne.py); the scripts that need the array refuse
    in one line."""
    large = ['--image_size', '72']
    with pytest.raises(UserError, match=r'-a resnet32 is a CIFAR ResNet, .* pass -a resnet50'):
        train.main(_args(root, tmp_path, *large))
    info = resolve_dataset('folder', str(root), image_size=72)
    val = info.build_val(str(root), build_transform('folder', False, info=info))
    assert val[0][0].shape == (3, 72, 72) and val.targets == [c for c in range(10) for _ in range(3)]
    assert train.main(_args(root, tmp_path, *large, '-a', 'resnet18')) == 0
    name = NAME.replace('resnet32', 'resnet18')
    ckpt_path = str(tmp_path / 'ckpt' / name / 'ckpt.pth.tar')
    assert load_checkpoint(ckpt_path)['image_size'] == 72
    run_top1 = _top1((tmp_path / 'log' / name / 'log_test.csv').read_text())
    capsys.readouterr()
    assert train.main(_args(root, tmp_path, *large, '-a', 'resnet18', '--resume', ckpt_path, '-e')) == 0
    assert _top1(capsys.readouterr().out) == run_top1
    assert not (root / folder.CACHE_FOLDER).exists()
    assert tsne.main(['--resume', ckpt_path, '--dataset', 'folder', '--data_path', str(root), '--imb_factor', '1',
                      '--output', str(tmp_path / 'tsne.png')]) == 0
    assert '=> 30 images, 512-d features' in capsys.readouterr().out
    with pytest.raises(UserError, match=r'trained on 72 px images, streamed .* only train.py and pretrain_rot.py'):
        gen_pseudolabels.main(['--dataset', 'folder', '--resume', ckpt_path, '-a', 'resnet18', '--data_dir', str(root),
                               '--output_dir', str(tmp_path)])
    with pytest.raises(UserError, match='only train.py, pretrain_rot.py and pretrain_moco.py take'):
        train_semi.main(['--dataset', 'folder', '--data_path', str(root), *large, '-a', 'resnet18'])


@pytest.mark.slow
def test_torchrun_two_processes_shard_the_folder(root, tmp_path):
    """Rank 0 decodes the folder while rank 1 waits, then rank 1 reads rank 0's cache: one set of
    decodes (train, val) for the two processes; a corrupt image stops both with rank 0's line, at once."""
    cmd = fixtures.torchrun_cmd(os.path.join(REPO, 'train.py'), *_args(root, tmp_path, '-a', 'resnet20'))
    good = (root / 'train' / '2' / '1.png').read_bytes()
    _corrupt(root)
    proc = subprocess.run(cmd, cwd=REPO, env=fixtures.script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and _caches(root) == []
    errors = re.findall(r'error: cannot read image .*train/2/1\.png', proc.stdout + proc.stderr)
    # one line from each rank, though torchrun may end rank 1 before it prints once rank 0 has exited;
    # never a traceback through the project's code (a rank left waiting would time out with one; torchrun's
    # own ChildFailedError is the launcher's report)
    assert len(errors) in (1, 2) and not fixtures.project_traceback(proc.stderr), \
        proc.stdout[-2000:] + proc.stderr[-2000:]
    (root / 'train' / '2' / '1.png').write_bytes(good)
    proc = subprocess.run(cmd, cwd=REPO, env=fixtures.script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    decoded = re.findall(r'decoding the (\d+) images of (\S+)', proc.stdout + proc.stderr)
    assert sorted(decoded) == [('30', str(root / 'val')), ('61', str(root / 'train'))]
    log = (tmp_path / 'log' / NAME.replace('resnet32', 'resnet20') / 'log_test.csv').read_text()
    confusion = np.array(eval(re.search(r'val Confusion Matrix: (.*)', log)[1]))
    # each process evaluates half the 30 val images; the sums cover every one once
    assert confusion.sum() == 30 and (confusion.sum(axis=1)[:10] == 3).all()
    # 61 images, batches of 16 split 8 + 8: each process runs ceil(31 / 8) = 4 steps
    assert 'Epoch: [0][4/4]' in (tmp_path / 'log' / NAME.replace('resnet32', 'resnet20') / 'log_train.csv').read_text()


# ---------------------------------------------------------------- val splits that differ from train

def _shade(split, name, n):
    """A uniform 8 x 8 grey level that names its image: train 'ant' image 0 -> 10, 'bee' 1 -> 21, ...;
    val images 100 more."""
    return (100 if split == 'val' else 0) + 10 * (1 + ['ant', 'bee', 'cat'].index(name)) + n


def _write_named(data, layout):
    """`layout`: {split: {class folder: images}}; each image a uniform grey PNG of its _shade."""
    for split, classes in layout.items():
        for name, count in classes.items():
            os.makedirs(data / split / name)
            for n in range(count):
                Image.fromarray(np.full((8, 8), _shade(split, name.lower(), n), np.uint8)).save(
                    data / split / name / f'{n}.png')


def test_val_folder_missing_the_first_class_keeps_the_training_labels(tmp_path):
    """Labels are the training folder's sorted names: a val/ without 'ant' (which sorts first) labels
    its 'bee' images 1 and its 'cat' images 2, as train/'s, and serves val/'s own images."""
    _write_named(tmp_path, {'train': {'ant': 2, 'bee': 3, 'cat': 2}, 'val': {'bee': 2, 'cat': 1}})
    info = resolve_dataset('folder', str(tmp_path))
    assert info.classes == ('ant', 'bee', 'cat') and info.num_classes == 3
    train_set = info.build_train(str(tmp_path), 'exp', 1.0, 0, None)
    assert train_set.targets == [0, 0, 1, 1, 1, 2, 2] and train_set.data[:, 0, 0, 0].tolist() == [10, 11, 20, 21, 22,
                                                                                                    30, 31]
    val = info.build_val(str(tmp_path), None)
    assert val.targets == [1, 1, 2] and val.get_cls_num_list() == [0, 2, 1]
    assert val.data[:, 0, 0, 0].tolist() == [120, 121, 130] and val.data.shape == (3, 8, 8, 3)
    # and the reverse: a val class the training folder lacks, sorting first, is refused in one line
    _write_named(tmp_path / 'other', {'train': {'bee': 1, 'cat': 1}, 'val': {'ant': 1, 'bee': 1, 'cat': 1}})
    with pytest.raises(UserError, match=r'^class folder .*other/val/ant has no counterpart in the training folder '
                                        r'\(training classes: bee, cat\)$'):
        resolve_dataset('folder', str(tmp_path / 'other'))


def test_val_folder_naming_a_class_otherwise_is_refused(tmp_path):
    """val/Ant for train/ant: class folders match by exact name, so the renamed one (sorting first) is
    refused with one line, not given another class's label."""
    _write_named(tmp_path, {'train': {'ant': 1, 'bee': 1, 'cat': 1}, 'val': {'Ant': 1, 'bee': 1, 'cat': 1}})
    with pytest.raises(UserError, match=r'^class folder .*val/Ant has no counterpart in the training folder '
                                        r'\(training classes: ant, bee, cat\)$'):
        resolve_dataset('folder', str(tmp_path))
    assert not (tmp_path / folder.CACHE_FOLDER).exists()


def _write_split_files(data, train_lines, val_lines):
    """The images of _write_named's layout under images/, listed in train.txt / val.txt."""
    _write_named(data / 'images', {'train': {'ant': 2, 'bee': 2, 'cat': 2}, 'val': {'ant': 1, 'bee': 1, 'cat': 1}})
    (data / 'train.txt').write_text(''.join(f'{line}\n' for line in train_lines))
    (data / 'val.txt').write_text(''.join(f'{line}\n' for line in val_lines))


def test_split_file_val_split_is_read_from_val_txt(tmp_path):
    """train.txt and val.txt (README "Your own data"): labels are the files' integers, classes 0..the
    largest training label; val.txt's images and labels are its own, a label missing from it (0, the
    first) shifts nothing, and a label beyond the training classes is refused naming its line."""
    train_lines = ['images/train/ant/0.png 0', 'images/train/ant/1.png 0', 'images/train/bee/0.png 1',
                   'images/train/cat/0.png 2', 'images/train/cat/1.png 2']
    val_lines = ['images/val/cat/0.png 2', 'images/val/bee/0.png 1']
    _write_split_files(tmp_path, train_lines, val_lines)
    info = resolve_dataset('folder', str(tmp_path))
    assert info.classes == ('0', '1', '2') and info.num_classes == 3
    train_set = info.build_train(str(tmp_path), 'exp', 1.0, 0, None)
    assert train_set.targets == [0, 0, 1, 2, 2] and train_set.data[:, 0, 0, 0].tolist() == [10, 11, 20, 30, 31]
    val = info.build_val(str(tmp_path), None)
    assert val.targets == [2, 1] and val.data[:, 0, 0, 0].tolist() == [130, 120]
    (tmp_path / 'val.txt').write_text('images/val/ant/0.png 0\nimages/val/bee/0.png 3\n')
    with pytest.raises(UserError, match=r'val\.txt line 2: label 3 is outside 0\.\.2'):
        resolve_dataset('folder', str(tmp_path))


def test_normalisation_uses_the_whole_training_folder_s_pixel_statistics(tmp_path):
    """README "Your own data": the mean / std are the training folder's pixel statistics (every pixel of every
    training image, the whole folder whatever --imb_factor keeps; population std), not val's; the
    evaluation transform and the checkpoint use them. Grey images, so the three channels agree."""
    _write_named(tmp_path, {'train': {'ant': 2, 'bee': 3, 'cat': 2}, 'val': {'bee': 2, 'cat': 1}})
    shades = np.array([10, 11, 20, 21, 22, 30, 31]) / 255  # each image uniform, 64 pixels each
    mean, std = shades.mean(), shades.std()
    info = resolve_dataset('folder', str(tmp_path))
    assert info.mean == pytest.approx((mean,) * 3, abs=1e-12) and info.std == pytest.approx((std,) * 3, abs=1e-12)
    assert folder.checkpoint_entries(info) == {'classes': ['ant', 'bee', 'cat'], 'mean': list(info.mean),
                                               'std': list(info.std), 'image_size': 8}
    val = info.build_val(str(tmp_path), build_transform('folder', train=False, info=info))
    image, label = val[2]  # cat/0.png: 130
    assert label == 2 and image.shape == (3, 8, 8)
    assert torch.allclose(image, torch.full((3, 8, 8), (130 / 255 - mean) / std), atol=1e-6)


def _steps(transform):
    """Each step of a Compose as (name, its parameters), sequences made tuples."""
    keys = {'RandomCrop': ('size', 'padding'), 'RandomResizedCrop': ('size', 'scale', 'ratio', 'interpolation'),
            'RandomHorizontalFlip': ('p',), 'ColorJitter': ('brightness', 'contrast', 'saturation', 'hue'),
            'Resize': ('size', 'interpolation'), 'CenterCrop': ('size',), 'ToTensor': (), 'Normalize': ('mean', 'std')}
    return [(type(t).__name__, tuple(tuple(v) if isinstance(v, (list, tuple)) else v
                                     for v in (getattr(t, k) for k in keys[type(t).__name__])))
            for t in transform.transforms]


def test_image_size_resizes_bilinearly_and_folders_flip(tmp_path):
    """README "Your own data": --image_size S <= 64 resizes every image to S x S, bilinear, aspect ratio not
    kept (PIL's resize is the reference); a folder's images are served as CIFAR's, flips on for every
    folder: RandomCrop(S, padding=4), RandomHorizontalFlip, ToTensor, Normalize (and the device loader
    flips where info.flip)."""
    from torchvision import transforms as T
    rng = np.random.RandomState(0)
    for split in ('train', 'val'):
        for name in ('ant', 'bee'):
            os.makedirs(tmp_path / split / name)
            Image.fromarray(rng.randint(0, 256, (12, 20, 3), dtype=np.uint8)).save(tmp_path / split / name / '0.png')
    info = resolve_dataset('folder', str(tmp_path), image_size=8)
    data = info.build_train(str(tmp_path), 'exp', 1.0, 0, None).data
    for k, name in enumerate(('ant', 'bee')):
        expected = np.asarray(Image.open(tmp_path / 'train' / name / '0.png').convert('RGB').resize((8, 8),
                                                                                                Image.BILINEAR))
        assert np.array_equal(data[k], expected)
    assert info.flip and info.image_size == 8
    expected = T.Compose([T.RandomCrop(8, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(info.mean, info.std)])
    assert _steps(build_transform('folder', train=True, info=info)) == _steps(expected)


def test_larger_images_get_imagenet_inat_s_transforms_at_their_size(root):
    """README "Larger images": at --image_size 72, training RandomResizedCrop(72), flip, colour jitter 0.4;
    evaluation Resize(72 * 256 / 224 = 82), CenterCrop(72); ImageNet's mean and std."""
    from torchvision import transforms as T
    info = resolve_dataset('folder', str(root), image_size=72)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_steps = T.Compose([T.RandomResizedCrop(72), T.RandomHorizontalFlip(),
                             T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0), T.ToTensor(),
                             T.Normalize(*imagenet)])
    eval_steps = T.Compose([T.Resize(82), T.CenterCrop(72), T.ToTensor(), T.Normalize(*imagenet)])
    assert _steps(build_transform('folder', train=True, info=info)) == _steps(train_steps)
    assert _steps(build_transform('folder', train=False, info=info)) == _steps(eval_steps)
    assert (info.mean, info.std) == imagenet


def test_evaluate_normalises_with_the_checkpoint_s_statistics_after_the_folder_changed(tmp_path, capsys, one_thread):
    """README: the statistics stored in the checkpoint are the ones -e uses, so an image added to train/ after
    training (other pixel statistics, the same classes) leaves -e's numbers those of the run's last evaluation."""
    _write_named(tmp_path / 'data', {'train': {'ant': 4, 'bee': 4, 'cat': 4}, 'val': {'ant': 2, 'bee': 2, 'cat': 2}})
    assert train.main(_args(tmp_path / 'data', tmp_path, '-a', 'resnet20')) == 0
    name = NAME.replace('resnet32', 'resnet20')
    logged = [line for line in (tmp_path / 'log' / name / 'log_test.csv').read_text().splitlines()
              if line.startswith('val Results')]
    Image.fromarray(np.full((8, 8), 250, np.uint8)).save(tmp_path / 'data' / 'train' / 'ant' / 'bright.png')
    assert resolve_dataset('folder', str(tmp_path / 'data')).mean != \
        tuple(load_checkpoint(str(tmp_path / 'ckpt' / name / 'ckpt.pth.tar'))['mean'])
    capsys.readouterr()
    assert train.main(_args(tmp_path / 'data', tmp_path, '-a', 'resnet20', '-e', '--resume',
                            str(tmp_path / 'ckpt' / name / 'ckpt.pth.tar'))) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith('val Results')]
    assert printed == logged and len(printed) == 1


# ---------------------------------------------------------------- the trial's own folders (issue 34 item 3)

def _balanced(path, classes=('a', 'b'), per_class=8, val=2, side=8):
    """`classes` of `per_class` random side x side RGB PNGs (and `val` each in val/)."""
    rng = np.random.RandomState(0)
    for split, n in (('train', per_class), ('val', val)):
        for c in classes:
            os.makedirs(path / split / c)
            for i in range(n):
                pixels = rng.randint(0, 256, (side, side, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path / split / c / f'{i}.png')
    return path


def test_a_folder_is_taken_as_it_is_unless_imb_factor_is_given(tmp_path, capsys, one_thread):
    """The trial's 2 classes x 8 images: the default no longer cuts class b to 0 images (it trained on an
    empty class, 'Many nan Medium nan'); --imb_factor 0.01, which would, is refused in one line."""
    data = _balanced(tmp_path / 'two')
    argv = ['--dataset', 'folder', '--data_path', str(data), '--epochs', '1', '-b', '16', '-j', '0',
            '--root_log', str(tmp_path / 'log'), '--root_model', str(tmp_path / 'ckpt')]
    assert train.build_parser().parse_args(argv).imb_factor == 1.0
    assert train.build_parser().parse_args(['--dataset', 'cifar10']).imb_factor == 0.01  # the original's default
    assert train.main(argv) == 0
    assert 'cls num list: [8, 8]' in capsys.readouterr().out
    assert os.listdir(tmp_path / 'ckpt') == ['folder-two_resnet32_CE_None_exp_1.0_ss_pretrained']
    with pytest.raises(UserError, match=r"--imb_factor 0\.01 leaves class 'b' with no training image \(the training "
                                        r"folder has 8 to 8 per class\); pass a larger --imb_factor, or leave it out"):
        train.main(argv + ['--imb_factor', '0.01'])
    assert pretrain_moco.build_parser().parse_args(['--dataset', 'folder']).imb_factor == 1.0


def test_a_read_only_folder_caches_in_cache_dir(root, tmp_path, monkeypatch, capsys):
    """The trial's read-only folder printed the same warning twice and had no way out: one warning naming
    --cache_dir; with --cache_dir the cache goes there and the next run reads it instead of decoding."""
    real = folder.atomic_path

    def read_only(path, size=None):
        if str(path).startswith(str(root)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(path, size)
    monkeypatch.setattr(folder, 'atomic_path', read_only)
    calls = _decodes(monkeypatch)
    resolve_dataset('folder', str(root))
    err = capsys.readouterr().err
    assert err.count('warning: cannot cache') == 1 and '--cache_dir puts the cache elsewhere' in err
    cache = tmp_path / 'cache'
    for _ in range(2):
        resolve_dataset('folder', str(root), cache_dir=str(cache))
    assert len(calls) == 4 and len(os.listdir(cache)) == 2 and capsys.readouterr().err == ''
    args = train.build_parser().parse_args(['--dataset', 'folder', '--data_path', str(root), '--cache_dir', str(cache)])
    assert args.cache_dir == str(cache) and train.load_data(args)[0].num_classes == 11 and len(calls) == 4


def test_scripts_that_need_the_same_pixels_share_one_cache(root, monkeypatch):
    """train.py reads a folder at its own size (32 px), train_stage2.py at its stage-1 checkpoint's
    --image_size 32: the same pixels, one cache (the trial found two identical files). A size that resizes has
    its own."""
    calls = _decodes(monkeypatch)
    native = resolve_dataset('folder', str(root))
    at_32 = resolve_dataset('folder', str(root), image_size=32)
    assert len(calls) == 2 and len(_caches(root)) == 2 and all('-native-' in n for n in _caches(root))
    assert np.array_equal(native.build_val(str(root), None).data, at_32.build_val(str(root), None).data)
    resolve_dataset('folder', str(root), image_size=16)
    assert len(calls) == 4 and sorted(n.split('-')[1] for n in _caches(root)) == ['16', '16', 'native', 'native']
    shutil.rmtree(root / folder.CACHE_FOLDER)  # the other order: S first, then the images' own size
    resolve_dataset('folder', str(root), image_size=32)
    resolve_dataset('folder', str(root))
    assert len(calls) == 6 and all('-native-' in n for n in _caches(root))


def test_cached_images_are_memory_mapped(root):
    """Read back from the cache, the images are a view of the file (every process that reads it shares its
    pages), and the whole folder (--imb_factor 1) is not copied into the training set."""
    resolve_dataset('folder', str(root))
    info = resolve_dataset('folder', str(root))
    data = info.build_train(str(root), 'exp', 1.0, 0, None).data
    assert isinstance(data, np.memmap) and data.filename.endswith('.npy') and data.shape == (61, 32, 32, 3)
    assert isinstance(info.build_val(str(root), None).data, np.memmap)


def test_a_stale_cache_removed_by_another_process_is_no_error(root, monkeypatch, capsys):
    """Processes decoding one changed folder race to delete its stale cache (gpu review A2): the one that finds
    it gone goes on, without a word."""
    resolve_dataset('folder', str(root))
    image = root / 'train' / '5' / '0.png'
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10 ** 9))  # the caches are stale
    real = os.listdir

    def listdir_then_another_process_unlinks(path):
        """The listing of the cache folder once the new cache is written, after which the other process
        removes the stale one."""
        names = real(path)
        caches = sorted((os.path.getmtime(os.path.join(path, n)), n) for n in names if n.startswith('train-'))
        if str(path).endswith(folder.CACHE_FOLDER) and len(caches) == 2:
            os.unlink(os.path.join(path, caches[0][1]))
        return names
    monkeypatch.setattr(os, 'listdir', listdir_then_another_process_unlinks)
    capsys.readouterr()
    resolve_dataset('folder', str(root))
    assert len(_caches(root)) == 2 and capsys.readouterr().err == ''


def test_no_flip_turns_the_flips_off(root, tmp_path, monkeypatch, one_thread):
    """--no-flip for orientation-sensitive images: the training batches are never mirrored, and the run folder
    says so (_noflip), apart from the flipped run's."""
    seen = []
    real = trainer.DeviceLoader.from_dataset

    def spy(dataset, sampler, batch_size, device, info, train=False, **kwargs):
        if train:
            seen.append(kwargs['flip'])
        return real(dataset, sampler, batch_size, device, info, train=train, **kwargs)
    monkeypatch.setattr(trainer.DeviceLoader, 'from_dataset', spy)
    assert train.main(_args(root, tmp_path, '--no-flip')) == 0
    assert train.main(_args(root, tmp_path)) == 0
    assert seen == [False, True]
    assert sorted(os.listdir(tmp_path / 'ckpt')) == [NAME, NAME + '_noflip']
    info = resolve_dataset('folder', str(root), flip=False)
    assert 'RandomHorizontalFlip' not in repr(build_transform('folder', True, info=info))


def test_more_than_1000_classes_train_save_and_evaluate(tmp_path, capsys, one_thread):
    """gpu review A1: above 1,000 classes evaluate() keeps no confusion matrix, and its readers crashed after
    the first epoch (`None.tolist()`) and in -e. A folder of 1,001 classes trains, saves, evaluates."""
    data = _balanced(tmp_path / 'many', classes=[f'c{i:04d}' for i in range(1001)], per_class=1, val=1, side=8)
    argv = ['--dataset', 'folder', '--data_path', str(data), '--epochs', '1', '-b', '256', '-j', '0', '-a',
            'resnet20', '--root_log', str(tmp_path / 'log'), '--root_model', str(tmp_path / 'ckpt'), '--confusion']
    assert train.main(argv) == 0
    name = 'folder-many_resnet20_CE_None_exp_1.0_ss_pretrained'
    log = (tmp_path / 'log' / name / 'log_test.csv').read_text()
    assert 'Confusion Matrix' not in log and len(trainer.read_test_log(
        str(tmp_path / 'log' / name / 'log_test.csv'))[0]['per_class']) == 1001
    ckpt = tmp_path / 'ckpt' / name / 'ckpt.pth.tar'
    assert len(load_checkpoint(str(ckpt))['classes']) == 1001
    capsys.readouterr()
    assert train.main(argv + ['--resume', str(ckpt), '-e']) == 0
    out = capsys.readouterr().out
    assert _top1(out) == _top1(log) and 'Confusion' not in out
