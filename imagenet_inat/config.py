"""Stage configs: the original's YAML files (keys of Kang et al.'s classifier-balancing code),
read with `yaml.safe_load` and checked completely before anything runs.

A config file looks like imagenet_inat/config/ImageNet_LT/feat_uniform.yaml: `training_opt`
(dataset, num_classes, batch_size, num_epochs, sampler, log_dir, ...), `networks.feat_model` and
`networks.classifier` (def_file, params, optim_params {lr, momentum, weight_decay}, fix),
`criterions.PerformanceLoss` (def_file, weight), `coslr`/`endlr` (or `scheduler_params` for a
step schedule), `shuffle`, `model_dir`. Additions of this reimplementation, all optional:
`training_opt.crop_size` / `training_opt.resize_size` (224 / 256) and `tau_norm` (a post-hoc
stage: {min, max, step} of the tau grid searched on val; default 0, 2, 0.1 as Kang et al.).
"""
import dataclasses
import os
from typing import Optional

import yaml

from errors import UserError
from imagenet_inat.networks import LOSSES, NETWORKS, SAMPLERS, registry_name, tau_grid
from schedules import cosine_at_epoch_start

# The original shipped iNaturalist's stage-1 config as feat_unifrom.yaml.
ALIASES = {'feat_unifrom.yaml': 'feat_uniform.yaml'}
_MISSING = object()
NETWORK_KEYS = ('feat_model', 'classifier')


@dataclasses.dataclass
class Network:
    key: str                 # 'feat_model' or 'classifier'
    name: str                # registry name, e.g. 'ResNet50Feature'
    params: dict
    lr: float
    momentum: float
    weight_decay: float
    fix: bool

    @property
    def spec(self):
        return NETWORKS[self.name]


@dataclasses.dataclass
class StageConfig:
    path: str
    raw: dict                            # the file as read, with command-line overrides applied
    dataset: str
    num_classes: int
    batch_size: int
    num_epochs: int
    num_workers: int
    display_step: int
    log_dir: str
    model_dir: Optional[str]
    networks: dict                       # key -> Network, in the file's order
    loss: str
    loss_weight: float
    sampler: Optional[str]
    num_samples_cls: int
    coslr: bool
    endlr: float
    step_size: int
    gamma: float
    shuffle: bool
    crop_size: int
    resize_size: int
    taus: Optional[list]                 # tau-norm grid, or None for a training stage

    def lr_factor_at(self, epoch, base_lr):
        """The learning rate of 1-based `epoch` for a network whose configured lr is `base_lr`.

        The original stepped its scheduler at the *start* of every epoch, so epoch e trains at the
        value after e steps: CosineAnnealingLR(T_max=num_epochs, eta_min=endlr) gives
        endlr + (lr - endlr)(1 + cos(pi e / E)) / 2 (0 at the last epoch when endlr is 0), StepLR
        lr * gamma ** (e // step_size). A network with lr 0 stays at 0 (it is fixed on purpose).
        """
        if base_lr == 0:
            return 0.0
        if self.coslr:
            return cosine_at_epoch_start(epoch, base_lr, self.num_epochs, self.endlr)
        return base_lr * self.gamma ** (epoch // self.step_size)


def _fail(path, message):
    raise UserError(f"config {path}: {message}")


def _get(cfg, dotted, path, kind=None, default=_MISSING, check=None, what=''):
    """cfg['a']['b'] for 'a.b'; missing -> `default` or one sentence naming the key."""
    node = cfg
    for part in dotted.split('.'):
        if not isinstance(node, dict) or part not in node:
            if default is not _MISSING:
                return default
            _fail(path, f"key {dotted} is missing")
        node = node[part]
    if node is None and default is not _MISSING:
        return default
    if kind is not None:
        ok = isinstance(node, kind) and not (isinstance(node, bool) and bool not in _as_tuple(kind))
        if not ok or (check is not None and not check(node)):
            _fail(path, f"key {dotted} must be {what or _kind_name(kind)}, got {node!r}")
    return node


def _as_tuple(kind):
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind):
    return ' or '.join(k.__name__ for k in _as_tuple(kind))


def resolve_path(cfg_path):
    """The config file to read: `cfg_path`, or the file its alias stands for."""
    if os.path.isfile(cfg_path):
        return cfg_path
    folder, name = os.path.split(cfg_path)
    if name in ALIASES and os.path.isfile(os.path.join(folder, ALIASES[name])):
        return os.path.join(folder, ALIASES[name])
    raise UserError(f"--cfg file not found: {cfg_path}")


def load_config(cfg_path, batch_size=None, model_dir=None, log_dir=None, workers=None):
    """Read and check a stage config; command-line values (not None) override the file's."""
    if not cfg_path:
        raise UserError("--cfg is required (e.g. --cfg imagenet_inat/config/ImageNet_LT/feat_uniform.yaml)")
    path = resolve_path(cfg_path)
    try:
        with open(path, encoding='utf-8') as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UserError(f"--cfg {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"--cfg {path} does not hold a mapping of config keys")
    opt = _get(raw, 'training_opt', path, dict)
    for key, value in (('batch_size', batch_size), ('log_dir', log_dir), ('num_workers', workers)):
        if value is not None:
            opt[key] = value
    if model_dir is not None:
        raw['model_dir'] = model_dir
    return _check(raw, path)


def _check(raw, path):
    pos_int = dict(kind=int, check=lambda v: v > 0, what='a positive integer')
    nonneg = dict(kind=(int, float), check=lambda v: v >= 0, what='a non-negative number')
    dataset = _get(raw, 'training_opt.dataset', path, str)
    num_classes = _get(raw, 'training_opt.num_classes', path, **pos_int)
    networks = {}
    declared = _get(raw, 'networks', path, dict)
    if set(declared) != set(NETWORK_KEYS):
        _fail(path, f"networks must be exactly feat_model and classifier, got {', '.join(map(str, declared))}")
    for key in declared:
        networks[key] = _network(raw, key, path, nonneg)
    feat, clf = networks['feat_model'], networks['classifier']
    if clf.params.get('num_classes', num_classes) != num_classes:
        _fail(path, f"networks.classifier.params.num_classes ({clf.params['num_classes']}) differs from "
                    f"training_opt.num_classes ({num_classes})")
    clf.params['num_classes'] = num_classes
    feat_dim = feat.spec.out_dim
    if _get(raw, 'networks.classifier.params.feat_dim', path, int) != feat_dim:
        _fail(path, f"networks.classifier.params.feat_dim is {clf.params['feat_dim']} but {feat.name} "
                    f"gives {feat_dim}-d features")
    if _get(raw, 'memory.centroids', path, bool, default=False) or \
            _get(raw, 'memory.init_centroids', path, bool, default=False):
        _fail(path, "memory.centroids / memory.init_centroids (OLTR's centroid loss) are not supported")
    criterions = _get(raw, 'criterions', path, dict)
    if set(criterions) != {'PerformanceLoss'}:
        _fail(path, f"criterions must hold exactly PerformanceLoss (softmax cross-entropy), got "
                    f"{', '.join(map(str, criterions))}")
    loss = registry_name(_get(raw, 'criterions.PerformanceLoss.def_file', path), LOSSES,
                         'criterions.PerformanceLoss.def_file')
    if _get(raw, 'criterions.PerformanceLoss.optim_params', path, default=None) is not None:
        _fail(path, "criterions.PerformanceLoss.optim_params must be null (the loss has no parameters)")
    sampler_cfg = _get(raw, 'training_opt.sampler', path, dict, default=None)
    sampler, num_samples_cls = None, 0
    if sampler_cfg is not None:
        sampler = registry_name(_get(raw, 'training_opt.sampler.def_file', path), SAMPLERS,
                                'training_opt.sampler.def_file')
        if _get(raw, 'training_opt.sampler.type', path, str, default=sampler) != sampler:
            _fail(path, f"training_opt.sampler.type {sampler_cfg['type']!r} does not match its def_file ({sampler})")
        num_samples_cls = _get(raw, 'training_opt.sampler.num_samples_cls', path, **pos_int)
    coslr = _get(raw, 'coslr', path, bool)
    tau = _get(raw, 'tau_norm', path, dict, default=None)
    return StageConfig(
        path=path, raw=raw, dataset=dataset, num_classes=num_classes,
        batch_size=_get(raw, 'training_opt.batch_size', path, **pos_int),
        num_epochs=_get(raw, 'training_opt.num_epochs', path, kind=int, check=lambda v: v > 0 or tau is not None,
                        what='a positive integer'),
        num_workers=_get(raw, 'training_opt.num_workers', path, kind=int, check=lambda v: v >= 0,
                         what='a non-negative integer', default=4),
        display_step=_get(raw, 'training_opt.display_step', path, **pos_int, default=10),
        log_dir=_get(raw, 'training_opt.log_dir', path, str, default=None) or os.path.join(
            'logs', dataset, str(_get(raw, 'training_opt.stage', path, default='stage'))),
        model_dir=_get(raw, 'model_dir', path, str, default=None),
        networks=networks, loss=loss,
        loss_weight=_get(raw, 'criterions.PerformanceLoss.weight', path, **nonneg, default=1.0),
        sampler=sampler, num_samples_cls=num_samples_cls, coslr=coslr,
        endlr=_get(raw, 'endlr', path, **nonneg) if coslr else 0.0,
        step_size=0 if coslr else _get(raw, 'training_opt.scheduler_params.step_size', path, **pos_int),
        gamma=1.0 if coslr else _get(raw, 'training_opt.scheduler_params.gamma', path, **nonneg),
        shuffle=_get(raw, 'shuffle', path, bool, default=False),
        crop_size=_get(raw, 'training_opt.crop_size', path, **pos_int, default=224),
        resize_size=_get(raw, 'training_opt.resize_size', path, **pos_int, default=256),
        taus=None if tau is None else _tau_grid(raw, path))


def _network(raw, key, path, nonneg):
    prefix = f'networks.{key}'
    name = registry_name(_get(raw, f'{prefix}.def_file', path), NETWORKS, f'{prefix}.def_file')
    spec = NETWORKS[name]
    if spec.role != key:
        _fail(path, f"{prefix}.def_file names {name}, which is a {spec.role}, not a {key}")
    params = dict(_get(raw, f'{prefix}.params', path, dict, default={}))
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        _fail(path, f"{prefix}.params: unknown key(s) {', '.join(unknown)}; {name} takes {', '.join(spec.params)}")
    if params.get('stage1_weights'):
        _fail(path, f"{prefix}.params.stage1_weights is not supported; pass the stage-1 result with --model_dir")
    for flag in ('use_selfatt', 'use_fc'):
        if params.get(flag):
            _fail(path, f"{prefix}.params.{flag} (OLTR's attention / extra fc layer) is not supported")
    return Network(
        key=key, name=name, params=params,
        lr=float(_get(raw, f'{prefix}.optim_params.lr', path, **nonneg)),
        momentum=float(_get(raw, f'{prefix}.optim_params.momentum', path, **nonneg)),
        weight_decay=float(_get(raw, f'{prefix}.optim_params.weight_decay', path, **nonneg)),
        fix=_get(raw, f'{prefix}.fix', path, bool, default=False))


def _tau_grid(raw, path):
    lo = _get(raw, 'tau_norm.min', path, (int, float), default=0.0)
    hi = _get(raw, 'tau_norm.max', path, (int, float), default=2.0)
    step = _get(raw, 'tau_norm.step', path, (int, float), default=0.1, check=lambda v: v > 0, what='a positive number')
    if hi < lo:
        _fail(path, f"tau_norm.max ({hi}) is below tau_norm.min ({lo})")
    return tau_grid(lo, hi, step)
