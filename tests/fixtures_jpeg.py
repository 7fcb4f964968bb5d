"""A tiny long-tailed JPEG data set in the ImageNet-LT / iNaturalist 2018 on-disk format, and
stage configs for it.

    <root>/images/<split>/<class>/<i>.jpg          48-64 px JPEGs: the class's colour plus noise
    <root>/splits/<dataset>_{train,val,test}.txt   `<path relative to images/> <label>` per line

Training counts 110 / 30 / 5 give one many-shot (> 100), one medium-shot (20-100) and one
few-shot (< 20) class, as the paper's groups.
"""
import os

import numpy as np
import torch
import yaml
from PIL import Image

from imagenet_inat.networks import ResNetFeature

TRAIN_COUNTS = (110, 30, 5)
EVAL_PER_CLASS = 6
DATASET = 'Tiny_LT'
PALETTE = np.array([[200, 40, 40], [40, 180, 60], [50, 70, 210]])


def write_jpeg_dataset(root, train_counts=TRAIN_COUNTS, eval_per_class=EVAL_PER_CLASS, dataset=DATASET, seed=0):
    """Write images and split files under `root`; returns (image root, split folder)."""
    rng = np.random.RandomState(seed)
    images, splits = os.path.join(root, 'images'), os.path.join(root, 'splits')
    os.makedirs(splits, exist_ok=True)
    counts = {'train': list(train_counts), 'val': [eval_per_class] * len(train_counts),
              'test': [eval_per_class] * len(train_counts)}
    for split, per_class in counts.items():
        lines = []
        for label, n in enumerate(per_class):
            folder = os.path.join(images, split, f'class{label}')
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                h, w = rng.choice([48, 56, 64], size=2)
                pixels = PALETTE[label] + rng.normal(0, 40, size=(h, w, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    os.path.join(folder, f'{i}.jpg'), quality=90)
                lines.append(f'{split}/class{label}/{i}.jpg {label}')
        # mixed up, as the real files are
        lines = [lines[i] for i in rng.permutation(len(lines))]
        with open(os.path.join(splits, f'{dataset}_{split}.txt'), 'w') as f:
            f.write('\n'.join(lines) + '\n')
    return images, splits


def stage_config(log_dir, classifier='DotProductClassifier', fix=False, sampler=True, epochs=1, batch=8,
                 lr=0.05, feat_lr=None, tau=False, dataset=DATASET, num_classes=len(TRAIN_COUNTS)):
    """A stage config with the original's keys, for ResNet-10 features at 32 px."""
    network = {'optim_params': {'lr': lr, 'momentum': 0.9, 'weight_decay': 5e-4}}
    cfg = {
        'coslr': True, 'endlr': 0.0, 'last': False, 'shuffle': bool(sampler), 'model_dir': None,
        'memory': {'centroids': False, 'init_centroids': False},
        'criterions': {'PerformanceLoss': {'def_file': './imagenet_inat/loss/SoftmaxLoss.py', 'loss_params': {},
                                           'optim_params': None, 'weight': 1.0}},
        'networks': {
            'classifier': {**network, 'def_file': f'./imagenet_inat/models/{classifier}.py',
                           'params': {'dataset': dataset, 'feat_dim': 512, 'num_classes': num_classes,
                                      'stage1_weights': False}},
            'feat_model': {'def_file': './imagenet_inat/models/ResNet10Feature.py', 'fix': fix,
                           'optim_params': {**network['optim_params'], 'lr': lr if feat_lr is None else feat_lr},
                           'params': {'dataset': dataset, 'dropout': None, 'stage1_weights': False,
                                      'use_fc': False, 'use_selfatt': False}}},
        'training_opt': {
            'dataset': dataset, 'num_classes': num_classes, 'batch_size': batch, 'num_epochs': epochs,
            'num_workers': 0, 'display_step': 3, 'log_dir': str(log_dir), 'crop_size': 32, 'resize_size': 36,
            'sampler': {'def_file': './imagenet_inat/data/ClassAwareSampler.py', 'num_samples_cls': 4,
                        'type': 'ClassAwareSampler'} if sampler else None,
            'scheduler_params': {'gamma': 0.1, 'step_size': 30}},
    }
    if tau:
        cfg['tau_norm'] = {'min': 0.0, 'max': 1.0, 'step': 0.1}
    return cfg


def write_config(path, cfg):
    with open(path, 'w') as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return str(path)


def write_moco_checkpoint(path, seed=0):
    """A MoCo checkpoint as pretrain_moco.py writes it, of a ResNet-10 query encoder with an MLP
    head (`fc.0`, `fc.2`), a key encoder and the queue. Returns the encoder's feature tensors."""
    torch.manual_seed(seed)
    encoder = ResNetFeature(*_resnet10())
    feats = {k: v.clone() for k, v in encoder.state_dict().items()}
    for k, v in feats.items():  # make the BatchNorm statistics non-trivial, so loading them shows
        if k.endswith(('running_mean', 'running_var')):
            v.uniform_(0.5, 1.5)
    head = {'fc.0.weight': torch.randn(512, 512), 'fc.0.bias': torch.zeros(512),
            'fc.2.weight': torch.randn(128, 512), 'fc.2.bias': torch.zeros(128)}
    sd = {f'module.encoder_q.{k}': v for k, v in {**feats, **head}.items()}
    sd.update({f'module.encoder_k.{k}': v.clone() for k, v in {**feats, **head}.items()})
    sd.update({'module.queue': torch.randn(128, 16), 'module.queue_ptr': torch.zeros(1, dtype=torch.long)})
    torch.save({'epoch': 200, 'arch': 'resnet10', 'state_dict': sd, 'optimizer': {}}, path)
    return feats


def _resnet10():
    from torchvision.models.resnet import BasicBlock
    return BasicBlock, [1, 1, 1, 1]
