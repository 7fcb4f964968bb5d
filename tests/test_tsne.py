"""tools/tsne.py: penultimate features of train.py and imagenet_inat checkpoints -> t-SNE -> PNG."""
import io
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fixtures_jpeg
from dataset import DATASETS, build_transform
from fixtures import REPO
from models import build_model

sys.path.insert(0, os.path.join(REPO, 'tools'))
import tsne  # noqa: E402

PNG = b'\x89PNG\r\n\x1a\n'


def _classifier_ckpt(path, use_norm=False):
    torch.manual_seed(0)
    model = build_model('resnet20', 10, use_norm=use_norm)
    torch.save({'epoch': 1, 'arch': 'resnet20', 'state_dict': model.state_dict(), 'task': 'classification'}, path)
    return model


def test_features_are_the_models_penultimate_layer(tmp_path):
    model = _classifier_ckpt(tmp_path / 'ckpt.pth.tar')
    args = tsne.build_parser().parse_args(['--resume', str(tmp_path / 'ckpt.pth.tar'), '--dataset', 'digits'])
    features, net, data, counts = tsne.SOURCES['classifier'](args, tsne.load_checkpoint(args.resume))
    assert counts.tolist() == [148, 89, 53, 32, 19, 11, 6, 4, 2, 1]  # the long-tailed training split
    feats, labels = tsne.extract(features, net, torch.utils.data.Subset(data, range(7)), torch.device('cpu'))
    test = DATASETS['digits'].build_val('./data', build_transform('digits', train=False))
    images = torch.stack([test[i][0] for i in range(7)])
    model.eval()
    with torch.no_grad():  # 64-d: the input of the fc layer
        expected = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(
            model.layer3(model.layer2(model.layer1(torch.relu(model.bn1(model.conv1(images)))))), 1), 1)
    assert feats.shape == (7, 64) and np.allclose(feats, expected.numpy(), atol=1e-5)
    assert labels.tolist() == [test.targets[i] for i in range(7)]


def test_head_classes_and_subsample():
    assert tsne.head_classes([148, 89, 53, 32, 19, 11, 6, 4, 2, 1]) == {0, 1, 2, 3, 4}
    assert tsne.head_classes([5, 50, 40, 30, 3]) == {1, 2, 3}  # by count, not by id
    labels = np.repeat(np.arange(3), [100, 50, 10])
    keep = tsne.subsample(labels, 32, seed=0)
    assert np.bincount(labels[keep]).tolist() == [20, 10, 2] and len(set(keep)) == len(keep)
    assert tsne.subsample(labels, 500).tolist() == list(range(160))


@pytest.mark.parametrize('use_norm', [False, True])
def test_tsne_of_a_train_py_checkpoint_writes_a_png(tmp_path, use_norm, capsys):
    _classifier_ckpt(tmp_path / 'ckpt.pth.tar', use_norm)
    out = tmp_path / 'tsne.png'
    assert tsne.main(['--resume', str(tmp_path / 'ckpt.pth.tar'), '--dataset', 'digits', '--max-points', '60',
                      '--output', str(out)]) == 0
    assert out.read_bytes()[:8] == PNG and Image.open(io.BytesIO(out.read_bytes())).size == (700, 600)
    assert '=> 60 images, 64-d features' in capsys.readouterr().out


def test_tsne_of_an_imagenet_inat_result(tmp_path):
    from imagenet_inat.networks import NETWORKS
    from imagenet_inat.weights import final_state, original_layout
    images, splits = fixtures_jpeg.write_jpeg_dataset(str(tmp_path / 'data'))
    cfg = tmp_path / 'stage.yaml'
    fixtures_jpeg.write_config(cfg, fixtures_jpeg.stage_config(tmp_path / 'log'))
    feat = NETWORKS['ResNet10Feature'].build({})
    ckpt = tmp_path / 'final_model_checkpoint.pth'
    torch.save(final_state(1, 1, {'feat_model': original_layout(feat), 'classifier': None}, 0.5), ckpt)
    out = tmp_path / 'tsne.png'
    assert tsne.main(['--resume', str(ckpt), '--cfg', str(cfg), '--data_root', images, '--split_dir', splits,
                      '--output', str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    args = tsne.build_parser().parse_args(['--resume', str(ckpt), '--cfg', str(cfg), '--data_root', images,
                                           '--split_dir', splits])
    _, _, data, counts = tsne.SOURCES['imagenet_inat'](args, tsne.load_checkpoint(str(ckpt)))
    assert counts.tolist() == list(fixtures_jpeg.TRAIN_COUNTS) and len(data) == 3 * fixtures_jpeg.EVAL_PER_CLASS
