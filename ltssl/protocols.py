"""The recipe presets of train_ssl.py (--protocol): every knob in which the published codebases differ, with the
place in their code that sets it. A flag given on the command line wins over its preset.

usb  -- USB's classic_cv_imb (microsoft/Semi-supervised-learning, scripts/config_generator_classic_cv_imb.py):
        256 evaluations x 1024 steps, B 64, uratio 2, SGD lr 0.03 Nesterov momentum 0.9, wd 5e-4, EMA 0.999
        (buffers copied), threshold 0.95, ImageNet's mean/std for CIFAR-10 (cv_datasets/cifar.py), USB's split.
        Its FixMatch and supervised rows run AlgorithmBase.set_optimizer: cosine lr 0.03 cos(7 pi t / 16 T), no
        weight decay on BatchNorm and biases; every imbalance add-on runs ImbAlgorithmBase.set_optimizer:
        constant lr, weight decay on every parameter (core/algorithmbase.py). DARP: from epoch 201 of 256
        (darp_warmup_epochs 200, `epoch > warmup`), target the labeled distribution scaled to the unlabeled set,
        mask on the raw probabilities. Reported: the best evaluation.
daso -- DASO's (ytaek-oh/daso, lib/config/defaults.py, configs/cifar10/fixmatch*.yaml): 500 x 500 steps, B 64,
        ratio 2, SGD lr 0.03 constant (APPLY_SCHEDULER False), Nesterov, wd 5e-4 on every parameter, EMA 0.999
        with its warm-up, buffers averaged (lib/models/ema_model.py), kekmodel's mean/std, DASO's split with
        5,000 validation images held out. DARP: from 40 % of the steps (WARMUP_RATIO 0.4), target the configured
        unlabeled counts (its consistent setting; mismatched ones load an estimate: --darp_target PATH), mask on
        the refined probabilities. Reported: the median of the last 20 evaluations.
Both: WRN-28-2, FixMatch's RandAugment (USB's own RandAugment(3, 5) is not built yet: docs/ltssl.md).
"""
from dataset.statistics import DASO_CIFAR100, IMAGENET_MEAN, IMAGENET_STD, KEKMODEL_CIFAR10, USB_CIFAR100

# (mean, std) per (protocol, data set); a data set not listed keeps its own (digits: 0.5, 0.5)
NORMALISATION = {
    ('usb', 'cifar10'): (IMAGENET_MEAN, IMAGENET_STD),
    ('usb', 'cifar100'): USB_CIFAR100,
    ('daso', 'cifar10'): KEKMODEL_CIFAR10,
    ('daso', 'cifar100'): DASO_CIFAR100,
}
SPLIT_NUM_VALID = {('daso', 'cifar10'): 5000, ('daso', 'cifar100'): 5000}

COMMON = dict(epochs=None, eval_step=None, batch_size=64, mu=2, lr=0.03, momentum=0.9, nesterov=True,
              weight_decay=5e-4, threshold=0.95, lambda_u=1.0, ema_decay=0.999, abc_threshold=0.95, abc_weight=1.0,
              darp_alpha=2.0, darp_iter_T=10, darp_every=10, darp_tol=0.1)
PRESETS = {
    'usb': dict(COMMON, epochs=256, eval_step=1024, ema_style='copy', darp_warmup=201 / 256, darp_target='labeled',
                darp_mask='raw', metric='best'),
    'daso': dict(COMMON, epochs=500, eval_step=500, ema_style='daso', lr_schedule='constant', wd_bn_bias=True,
                 darp_warmup=0.4, darp_target='configured', darp_mask='refined', metric='median20'),
}


def by_method(protocol, ssl_alg, imb_alg):
    """USB's two optimizer recipes (module docstring): the knobs that depend on the method."""
    if protocol != 'usb':
        return {}
    plain = imb_alg == 'none'
    return {'lr_schedule': 'cosine' if plain else 'constant', 'wd_bn_bias': not plain}


def apply(args):
    """Fill every knob left at None from the preset of args.protocol; returns the lines that say which values came
    from it and which from the command line."""
    preset = {**PRESETS[args.protocol], **by_method(args.protocol, args.ssl_alg, args.imb_alg)}
    taken, given = [], []
    for key, value in preset.items():
        if key == 'metric':
            continue
        if getattr(args, key) is None:
            setattr(args, key, value)
        if getattr(args, key) == value:
            taken.append(f"{key} {value:.6g}" if isinstance(value, float) else f"{key} {value}")
        else:
            given.append(f"{key} {getattr(args, key)}")
    args.metric = preset['metric']
    lines = [f"=> protocol {args.protocol}: " + ', '.join(taken)]
    if given:
        lines.append("=> given on the command line instead: " + ', '.join(given))
    lines.append(f"=> reported metric of this protocol: {args.metric}")
    return lines
