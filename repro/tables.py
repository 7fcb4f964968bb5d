"""The tables: a registry of builders (options, seed) -> cells, each cell an ordered tuple of stages."""
import os
from dataclasses import dataclass
from typing import Callable, Optional

from repro.scripts import REPO, Stage


# lr x0.01 after E1 and x0.0001 after E2 (train.py --lr_steps), as fractions of the epochs.
SCHEDULES = {
    # this project's schedule: 160 / 180 of 200 epochs, as LDAM-DRW's code intended
    'current': lambda epochs: (max(1, round(0.8 * epochs)), max(1, round(0.9 * epochs))),
    # the original's first release tested epoch > 160 before epoch > 180, so x0.01 ran from epoch 161 to
    # the end and x0.0001 never came; E2 = epochs reproduces that (trainer.lr_at: e > E2 never holds)
    'first-release': lambda epochs: (max(1, round(0.8 * epochs)), epochs),
}

SCHEDULE_TEXT = {
    'current': 'x0.01 after {0} and x0.0001 after {1} of {2} epochs (this project\'s schedule)',
    'first-release': 'x0.01 after epoch {0} until the end ({2} epochs), no x0.0001 step '
                     '(the original\'s first release)',
}


@dataclass
class Options:
    table: str
    data_path: str
    out: str
    epochs: Optional[int]        # None: the table's (or, for MoCo, the script's) default
    schedule: str
    rand_number: Optional[int]   # None: each seed draws its own long-tailed subset (--rand_number = seed)
    extra: dict                  # script -> flags appended to its stages (--stage-args)

    def path(self, *parts):
        return os.path.join(self.out, 'runs', self.table, *parts)

    def rand(self, seed):
        return seed if self.rand_number is None else self.rand_number

    def stage(self, script, *argv):
        # the table's flags first, so that --stage-args (every stage's, then this script's) win
        return Stage(script, tuple(str(a) for a in argv) + tuple(self.extra.get('', ()))
                     + tuple(self.extra.get(script, ())))

    def schedule_text(self, epochs):
        """The LR schedule of stages of `epochs` epochs, in words (None: the scripts' own)."""
        if not epochs:
            return 'the scripts\' own schedules'
        return SCHEDULE_TEXT[self.schedule].format(*SCHEDULES[self.schedule](epochs), epochs)

    def stage_log(self, stage):
        """The file a stage's console output goes to: named after its output folder, which is unique."""
        folder = os.path.relpath(os.path.dirname(stage.output()), self.path())
        return self.path('stage_logs', f"{stage.script.removesuffix('.py')}-{folder.replace(os.sep, '-')}.log")

    def tag(self, name, seed, epochs):
        """--exp_str: keeps cells, seeds, subsets, lengths and schedules in separate run folders."""
        return f'{name}_s{seed}r{self.rand(seed)}e{epochs}_{self.schedule}'

    def trainer(self, script, seed, name, default_epochs, *argv):
        """A train.py / train_semi.py / pretrain_rot.py stage with the flags every one of them gets."""
        epochs = self.epochs or default_epochs
        return self._run(script, seed, argv, '--epochs', epochs, '--lr_steps', *SCHEDULES[self.schedule](epochs),
                         '--exp_str', self.tag(name, seed, epochs))

    def stage2(self, seed, *argv):
        """A train_stage2.py stage: its own epochs, lr and batch (the authors'), unless --epochs is given;
        its run folder is named after its --stage1 run's."""
        return self._run('train_stage2.py', seed, argv, *(('--epochs', self.epochs) if self.epochs else ()))

    def _run(self, script, seed, argv, *middle):
        """`script`'s stage: `argv`, then the data, seed and subset, `middle`, then the run folders' roots."""
        return self.stage(script, *argv, '--data_path', self.data_path, '--seed', seed,
                          '--rand_number', self.rand(seed), *middle,
                          '--root_log', self.path('log'), '--root_model', self.path('checkpoint'))


@dataclass(frozen=True)
class Cell:
    key: str                  # short name for --cells and the CSV
    label: str                # the row label
    stages: tuple             # in order; the last one's logs hold the cell's result
    paper: Optional[float] = None   # the paper's top-1 error (%), None where it reports none
    group: str = ''           # cells of a group share a panel of the per-class plot
    source: str = ''          # where `paper` was published and the recipe behind it (tables of other papers' numbers)


@dataclass(frozen=True)
class Need:
    path: str                 # relative to --data_path ('{data}') or the working directory
    what: str                 # where to get it


@dataclass(frozen=True)
class Table:
    title: str
    build: Callable           # (Options, seed) -> [Cell]
    epochs: Optional[int]     # default training epochs (None: the scripts' defaults)
    needs: tuple = ()         # Need: files the table reads
    note: str = ''
    # what the numbers are: train.py-style logs (default) or imagenet_inat's final evaluation
    reference: str = 'paper'  # the column of the cells' `paper` numbers: this paper's, or 'published' ones
    extra: tuple = ()         # (key, header, what): more columns, from the results' 'extra' dicts, listed per seed too
    measured: str = ('*best* is the best epoch\'s (the paper\'s number, the logs\' `Best Prec@1`), *last* the last '
                     'epoch\'s. Many / medium / few: last-epoch top-1 accuracy (%) of the classes with > 100, '
                     '20–100 and < 20 images in the labeled long-tailed training set (pseudo-labeled images not '
                     'counted, so that the rows compare).')


def _semi(dataset, papers, epochs=200, imb='0.02'):
    """rho = 50 labeled; CE baseline; CE + D_U@5x for each rho_U (one base model and pseudo-label file per seed)."""
    def build(o, seed):
        base = o.trainer('train.py', seed, 'base', epochs, '--dataset', dataset, '--imb_factor', imb,
                         '--loss_type', 'CE', '--train_rule', 'None')
        pseudo = o.stage('gen_pseudolabels.py', '--dataset', dataset, '--resume', base.output(),
                         '--data_dir', o.data_path, '--imb_factor', imb, '--rand_number', o.rand(seed),
                         '--output_dir', o.path('pseudo_labels', o.tag('base', seed, o.epochs or epochs)))
        cells = [Cell('CE', 'CE (no unlabeled data)', (base,))]
        for rho_u, paper in papers.items():
            semi = o.trainer('train_semi.py', seed, 'semi', epochs, '--dataset', dataset, '--imb_factor', imb,
                             '--imb_factor_unlabel', f'{1 / rho_u:g}', '--pseudo_labels', pseudo.output(),
                             '--loss_type', 'CE', '--train_rule', 'None')
            cells.append(Cell(f'DU_rhoU{rho_u}', f'CE + D_U@5x, rho_U = {rho_u}', (base, pseudo, semi), paper))
        return cells
    return build


def _ssp(dataset, papers, epochs=200):
    """Per rho: CE (Uniform) and CE (Balanced = class-balanced sampling), each without and with rotation SSP."""
    def build(o, seed):
        cells = []
        for rho, (uniform, balanced) in papers.items():
            imb = f'{1 / rho:g}'
            rot = o.trainer('pretrain_rot.py', seed, 'rot', epochs, '--dataset', dataset, '--imb_factor', imb)
            weights = os.path.join(os.path.dirname(rot.output()), 'ckpt.best.pth.tar')
            for rule, name, paper in (('None', 'Uniform', uniform), ('Resample', 'Balanced', balanced)):
                flags = ('--dataset', dataset, '--imb_factor', imb, '--loss_type', 'CE', '--train_rule', rule)
                plain = o.trainer('train.py', seed, 'plain', epochs, *flags)
                ssp = o.trainer('train.py', seed, 'ssp', epochs, *flags, '--pretrained_model', weights)
                group = f'rho = {rho}'
                cells += [Cell(f'{name}_rho{rho}', f'rho = {rho}: CE ({name})', (plain,), group=group),
                          Cell(f'{name}+SSP_rho{rho}', f'rho = {rho}: CE ({name}) + SSP', (rot, ssp), paper, group)]
        return cells
    return build


def _decoupled(moco_dataset, config_dir, papers):
    """MoCo -> stage 1 (instance- or class-balanced sampling) -> cRT / tau-norm / LWS (imagenet_inat)."""
    def build(o, seed):
        moco_flags = ('--epochs', o.epochs) if o.epochs else ()
        # ResNet-50 at 224 px: cuDNN's benchmark search, whatever --seed (bit-exact resume across GPU runs
        # is not claimed for these stages; docs/gpu.md).
        moco = o.stage('pretrain_moco.py', '--dataset', moco_dataset, '--data', o.data_path, '--seed', seed,
                       '--root_path', o.path(f'moco_s{seed}' + (f'e{o.epochs}' if o.epochs else '')), *moco_flags,
                       '--cudnn-benchmark')

        def stage(config, source):
            cfg = os.path.relpath(os.path.join(REPO, 'imagenet_inat', 'config', config_dir, f'{config}.yaml'))
            return o.stage('imagenet_inat', '--cfg', cfg, '--model_dir', source.output(), '--data_root', o.data_path,
                           '--log_dir', o.path('imagenet_inat', f's{seed}', config), '--seed', seed,
                           '--cudnn-benchmark')

        uniform, balanced = stage('feat_uniform', moco), stage('feat_balance', moco)
        return [Cell('Uniform+SSP', 'CE (Uniform) + SSP', (moco, uniform), papers[0]),
                Cell('Balanced+SSP', 'CE (Balanced) + SSP', (moco, balanced), papers[1]),
                Cell('cRT+SSP', 'cRT + SSP', (moco, uniform, stage('cls_crt', uniform)), papers[2]),
                Cell('tau-norm+SSP', 'tau-norm + SSP', (moco, uniform, stage('cls_tau_norm', uniform))),
                Cell('LWS+SSP', 'LWS + SSP', (moco, uniform, stage('cls_lws', uniform)))]
    return build


# Sized for <= 15 minutes on a 2-core CPU (21 stages): ResNet-20 rather than the paper's ResNet-32, 15 epochs.
DIGITS_EPOCHS = 15
DIGITS_LOADER = ('-b', '64', '-j', '0')
DIGITS_FLAGS = ('--imb_factor', '0.01', '-a', 'resnet20', *DIGITS_LOADER)


def _digits_mini(o, seed):
    """Long-tailed digits (rho = 100): one base model, one pseudo-label file and one rotation
    pre-training per seed feed all five cells."""
    e = DIGITS_EPOCHS
    base = o.trainer('train.py', seed, 'base', e, '--dataset', 'digits', *DIGITS_FLAGS, '--train_rule', 'None')
    bal = o.trainer('train.py', seed, 'base', e, '--dataset', 'digits', *DIGITS_FLAGS, '--train_rule', 'Resample')
    rot = o.trainer('pretrain_rot.py', seed, 'rot', e, '--dataset', 'digits', *DIGITS_FLAGS)
    weights = os.path.join(os.path.dirname(rot.output()), 'ckpt.best.pth.tar')
    ssp = o.trainer('train.py', seed, 'ssp', e, '--dataset', 'digits', *DIGITS_FLAGS, '--train_rule', 'None',
                    '--pretrained_model', weights)
    bal_ssp = o.trainer('train.py', seed, 'ssp', e, '--dataset', 'digits', *DIGITS_FLAGS, '--train_rule', 'Resample',
                        '--pretrained_model', weights)
    pseudo = o.stage('gen_pseudolabels.py', '--dataset', 'digits', '--resume', base.output(), '--imb_factor', '0.01',
                     '--rand_number', o.rand(seed), '-a', 'resnet20', '-j', '0',
                     '--output_dir', o.path('pseudo_labels', o.tag('base', seed, o.epochs or e)))
    semi = o.trainer('train_semi.py', seed, 'semi', e, '--dataset', 'digits', *DIGITS_FLAGS, '--train_rule', 'None',
                     '--imb_factor_unlabel', '0.01', '--pseudo_labels', pseudo.output())
    return [Cell('CE', 'CE (Uniform)', (base,)),
            Cell('CE+SSP', 'CE (Uniform) + rotation SSP', (rot, ssp)),
            Cell('CE+DU', 'CE + pseudo-labeled digits pool (rho_U = 100)', (base, pseudo, semi)),
            Cell('Balanced', 'CE (Balanced)', (bal,)),
            Cell('Balanced+SSP', 'CE (Balanced) + rotation SSP', (rot, bal_ssp))]


FOLDER_FLAGS = ('--imb_factor', '1', '-a', 'resnet20', *DIGITS_LOADER)  # a user's folder as it is: its own imbalance


def _folder_mini(o, seed):
    """digits-mini's pipeline on a user's image folder (--data_path ROOT, README "Your own data"), taken as it
    is: CE and CE (Balanced), each without and with rotation SSP, and CE + the pseudo-labeled ROOT/unlabeled
    images where that folder exists."""
    e = DIGITS_EPOCHS
    data = ('--dataset', 'folder', *FOLDER_FLAGS)
    base = o.trainer('train.py', seed, 'base', e, *data, '--train_rule', 'None')
    bal = o.trainer('train.py', seed, 'base', e, *data, '--train_rule', 'Resample')
    rot = o.trainer('pretrain_rot.py', seed, 'rot', e, *data)
    weights = os.path.join(os.path.dirname(rot.output()), 'ckpt.best.pth.tar')
    ssp = o.trainer('train.py', seed, 'ssp', e, *data, '--train_rule', 'None', '--pretrained_model', weights)
    bal_ssp = o.trainer('train.py', seed, 'ssp', e, *data, '--train_rule', 'Resample', '--pretrained_model', weights)
    cells = [Cell('CE', 'CE (Uniform)', (base,)),
             Cell('CE+SSP', 'CE (Uniform) + rotation SSP', (rot, ssp)),
             Cell('Balanced', 'CE (Balanced)', (bal,)),
             Cell('Balanced+SSP', 'CE (Balanced) + rotation SSP', (rot, bal_ssp))]
    if os.path.isdir(os.path.join(o.data_path, 'unlabeled')):
        pseudo = o.stage('gen_pseudolabels.py', '--dataset', 'folder', '--resume', base.output(),
                         '--data_dir', o.data_path, '-a', 'resnet20', '-j', '0',
                         '--output_dir', o.path('pseudo_labels', o.tag('base', seed, o.epochs or e)))
        # the whole pool, up to 5x the labeled set, drawn by pseudo-label without a further imbalance
        semi = o.trainer('train_semi.py', seed, 'semi', e, *data, '--train_rule', 'None', '--imb_factor_unlabel', '1',
                         '--pseudo_labels', pseudo.output())
        cells.insert(2, Cell('CE+DU', 'CE + pseudo-labeled ROOT/unlabeled images', (base, pseudo, semi)))
    return cells


# Rows of the baseline tables: (key, label, train.py flags). The key is repro.published's method name.
ONE_STAGE = (
    ('CE', 'CE', ('--loss_type', 'CE', '--train_rule', 'None')),
    ('Focal', 'Focal (softmax, gamma = 1)', ('--loss_type', 'Focal', '--train_rule', 'None')),
    ('CB', 'CB (class-balanced re-weighting, beta = 0.9999)', ('--loss_type', 'CE', '--train_rule', 'Reweight')),
    ('LDAM-DRW', 'LDAM-DRW', ('--loss_type', 'LDAM', '--train_rule', 'DRW')),
    ('BalancedSoftmax', 'Balanced Softmax', ('--loss_type', 'BalancedSoftmax', '--train_rule', 'None')),
    ('LogitAdjusted', 'logit-adjusted loss (tau = 1)', ('--loss_type', 'LogitAdjusted', '--train_rule', 'None')),
    ('LogitAdjustedAdaptive', 'logit-adjusted loss + adaptive margin (tau = 1)',
     ('--loss_type', 'LogitAdjustedAdaptive', '--train_rule', 'None')),
    # the CE run again (same seed, so the same training), every evaluation post-hoc adjusted
    ('CE+posthocLA', 'CE + post-hoc logit adjustment (tau = 1)',
     ('--loss_type', 'CE', '--train_rule', 'None', '--posthoc_la', '1')),
)
# train_stage2.py --stage on the CE model: (key, label, stage)
DECOUPLED_STAGES = (('cRT', 'cRT (on CE)', 'cRT'), ('tau-norm', 'tau-norm (on CE, tau = 1)', 'tau_norm'),
                    ('NCM', 'nearest class mean (on CE)', 'NCM'), ('LWS', 'LWS (on CE)', 'LWS'))
# BALMS's decoupled stage behind the published cRT / LWS numbers (its config/CIFAR*_LT/decouple_*.yaml:
# 2,000 iterations at batch 512, lr 0.1, cosine, wd 5e-4); the tables with published numbers run it
BALMS_ITERATIONS, BALMS_BATCH, BALMS_LR = 2000, 512, '0.1'
TRAINED_STAGES = ('cRT', 'LWS')
# Weight balancing's stage 1 as Alshammari et al. ran it (LTR-weight-balancing demo1_first-stage-training.py;
# the paper's 200 epochs, the table's): batch 64, lr 0.01, cosine without warm-up, weight decay 5e-3 (their
# CIFAR-100-LT rho 100 value); `wb_arch` adds their CIFAR ResNet-34
WB_STAGE1 = ('-b', '64', '--lr', '0.01', '--lr_schedule', 'cosine_nowarmup', '--wd', '5e-3')
# SSP on the two strongest one-stage losses: LDAM-DRW (the paper's own SSP row) and Balanced Softmax
SSP_ON = ('LDAM-DRW', 'BalancedSoftmax')
CIFAR_SIZES = {'cifar10': (5000, 10), 'cifar100': (500, 100)}  # (images of the largest class, classes)


def balms_epochs(dataset, rho):
    """Epochs of floor(N / 512) class-balanced steps (train_stage2.py's epoch) that make BALMS's 2,000 iterations
    on the long-tailed training set of `dataset` at imbalance `rho`, rounded up."""
    from dataset.imbalance_cifar import img_num_per_cls
    n_max, classes = CIFAR_SIZES[dataset]
    steps = max(1, sum(img_num_per_cls(n_max, classes, 'exp', 1 / rho)) // BALMS_BATCH)
    return -(-BALMS_ITERATIONS // steps)


def unpublished_note(published):
    """The lines under a table: why some rows have no published number for data set `published`."""
    from repro.published import PUBLISHED, RHOS, UNPUBLISHED
    missing = [m for m in UNPUBLISHED if any((published, rho, m) not in PUBLISHED for rho in RHOS)]
    return 'Empty published cells: ' + '; '.join(f'{m}: {UNPUBLISHED[m]}' for m in missing) + '.'


def _baselines(dataset, rhos, epochs, flags=(), stage2_flags=(), published=None, wb_arch=None):
    """Every method under this project's (the paper's) recipe, per rho: one-stage losses, the decoupled
    stages and weight balancing on a CE model, rotation SSP under the strongest two. `flags` go to the
    train.py / pretrain_rot.py stages, `stage2_flags` to train_stage2.py's; `published`: the data set's key
    in repro.published (None: no published numbers; with them, cRT and LWS run BALMS's 2,000 iterations);
    `wb_arch`: weight balancing's stage-1 network (None: the table's)."""
    from repro.published import PUBLISHED

    def cell(key, label, stages, rho):
        ref = PUBLISHED.get((published, rho, key))
        return Cell(f'{key}_rho{rho}', f'rho = {rho}: {label}', stages, ref and ref.error, f'rho = {rho}',
                    ref and f'{ref.source}. Recipe: {ref.recipe}' or '')

    def build(o, seed):
        cells = []
        for rho in rhos:
            data = ('--dataset', dataset, '--imb_factor', f'{1 / rho:g}', *flags)
            runs = {key: o.trainer('train.py', seed, key.replace('+', '_'), epochs, *data, *method)
                    for key, _, method in ONE_STAGE}
            cells += [cell(key, label, (runs[key],), rho) for key, label, _ in ONE_STAGE]

            def stage2(name, stage1, *extra):
                return o.stage2(seed, '--dataset', dataset, '--imb_factor', f'{1 / rho:g}', *stage2_flags, *extra,
                                '--stage', name, '--stage1', stage1)

            for key, label, name in DECOUPLED_STAGES:
                balms = published and name in TRAINED_STAGES
                extra = ('--epochs', balms_epochs(dataset, rho), '-b', BALMS_BATCH, '--lr', BALMS_LR) if balms else ()
                label += ', BALMS\'s 2K iterations at lr 0.1' if balms else ''
                cells.append(cell(key, label, (runs['CE'], stage2(name, runs['CE'].output(), *extra)), rho))
            wb1 = o.trainer('train.py', seed, 'WB1', epochs, *data, '--loss_type', 'CE', '--train_rule', 'None',
                            *WB_STAGE1, *(('-a', wb_arch) if wb_arch else ()))
            # their stage 2 starts from the best stage-1 epoch (demo2 loads with_WD_model_best.paramOnly)
            best = os.path.join(os.path.dirname(wb1.output()), 'ckpt.best.pth.tar')
            network = wb_arch or 'this table\'s network'
            cells.append(cell('WB', f'weight balancing (stage 1: their recipe, {network})', (wb1, stage2('WB', best)),
                              rho))
            rot = o.trainer('pretrain_rot.py', seed, 'rot', epochs, *data)
            weights = os.path.join(os.path.dirname(rot.output()), 'ckpt.best.pth.tar')
            for key, label, method in (m for m in ONE_STAGE if m[0] in SSP_ON):
                ssp = o.trainer('train.py', seed, f'{key}_ssp', epochs, *data, *method, '--pretrained_model', weights)
                cells.append(cell(f'{key}+SSP', f'{label} + rotation SSP', (rot, ssp), rho))
        return cells
    return build


_DATA = 'see README "Data preparation"'
BASELINES = ('Every row runs under one recipe, this table\'s (train.py\'s defaults but for the epochs, '
             'architecture and batch the table sets), but for weight balancing\'s stage 1 (the authors\' recipe) and, '
             'where the table prints published numbers, cRT and LWS (BALMS\'s 2K iterations); stage 2 (cRT, tau-norm, '
             'NCM, LWS, weight balancing) otherwise with its authors\' settings (train_stage2.py\'s defaults; '
             'docs/baselines.md).')
PAPER_RECIPE = ('The recipe is the paper\'s: ResNet-32, 200 epochs, batch 128, SGD lr 0.1 with 5 warm-up epochs '
                'and x0.01 / x0.0001 steps, wd 2e-4, crop + flip. A published number stands beside a row only where '
                'it was made with the row\'s loss; the recipe behind it is named under the table: compare a row '
                'with its published number only as far as the recipes agree.')
DECOUPLED = ('*best*: the weights of the best validation epoch, evaluated after training (ImageNet-LT: test split, '
             'iNaturalist 2018: val), as the paper reports; no last-epoch test number exists. Many / medium / few: '
             'top-1 accuracy (%) of the classes with > 100, 20–100 and < 20 training images, same weights.')
_TORONTO = 'python version, from https://www.cs.toronto.edu/~kriz/cifar.html'
CIFAR10 = Need('{data}/cifar-10-batches-py', f'CIFAR-10, {_TORONTO} ({_DATA})')
CIFAR100 = Need('{data}/cifar-100-python', f'CIFAR-100, {_TORONTO} ({_DATA})')
SVHN = tuple(Need(f'{{data}}/{split}_32x32.mat', f'SVHN from http://ufldl.stanford.edu/housenumbers/ ({_DATA})')
             for split in ('train', 'test', 'extra'))
TINY = Need('{data}/ti_80M_selected.pickle', f"the authors' 80M TinyImages selection, linked from the original "
                                            f"README ({_DATA} and docs/semi.md)")


def _split_files(folder, splits):
    return tuple(Need(f'imagenet_inat/data/{folder}/{folder}_{s}.txt',
                      f'the split files of the original imagenet_inat/data/{folder}/ ({_DATA})') for s in splits)


TABLES = {
    'cifar10-semi': Table('CIFAR-10-LT (rho = 50): CE + unlabeled TinyImages (D_U@5x)',
                          _semi('cifar10', {1: 16.79, 25: 16.88, 50: 18.36, 100: 19.94}), 200,
                          (CIFAR10, TINY)),
    'svhn-semi': Table('SVHN-LT (rho = 50): CE + unlabeled SVHN extra (D_U@5x)',
                       _semi('svhn', {1: 13.07, 25: 13.36, 50: 13.16, 100: 14.54}), 200, SVHN),
    'cifar10-ssp': Table('CIFAR-10-LT: CE (Uniform / Balanced) with and without rotation SSP',
                         _ssp('cifar10', {10: (12.28, 11.57), 50: (21.80, 19.60), 100: (26.50, 23.47)}), 200,
                         (CIFAR10,)),
    'cifar100-ssp': Table('CIFAR-100-LT: CE (Uniform / Balanced) with and without rotation SSP',
                          _ssp('cifar100', {10: (42.93, 41.94), 50: (54.96, 52.91), 100: (59.60, 56.94)}), 200,
                          (CIFAR100,)),
    'imagenet-lt': Table('ImageNet-LT: MoCo SSP, then decoupled training (ResNet-50)',
                         _decoupled('imagenet', 'ImageNet_LT', (54.4, 52.4, 48.7)), None,
                         (Need('{data}', f'the ImageNet images ({_DATA})'),)
                         + _split_files('ImageNet_LT', ('train', 'val', 'test')), measured=DECOUPLED),
    'inat': Table('iNaturalist 2018: MoCo SSP, then decoupled training (ResNet-50)',
                  _decoupled('inat', 'iNaturalist18', (35.6, 34.1, 31.9)), None,
                  (Need('{data}', f'the iNaturalist 2018 images ({_DATA})'),)
                  + _split_files('iNaturalist18', ('train', 'val')), measured=DECOUPLED),
    'cifar10-lt-baselines': Table('CIFAR-10-LT (rho = 100, 50, 10): long-tailed baselines under one recipe (the '
                                  'paper\'s), ResNet-32', _baselines('cifar10', (100, 50, 10), 200,
                                                                      published='cifar10', wb_arch='resnet34_cifar'),
                                  200, (CIFAR10,), note=f'{BASELINES} {PAPER_RECIPE} {unpublished_note("cifar10")}',
                                  reference='published'),
    'cifar100-lt-baselines': Table('CIFAR-100-LT (rho = 100, 50, 10): long-tailed baselines under one recipe (the '
                                   'paper\'s), ResNet-32', _baselines('cifar100', (100, 50, 10), 200,
                                                                       published='cifar100', wb_arch='resnet34_cifar'),
                                   200, (CIFAR100,), note=f'{BASELINES} {PAPER_RECIPE} {unpublished_note("cifar100")}',
                                   reference='published'),
    'digits-baselines-mini': Table('Miniature: long-tailed digits (rho = 100), the baselines, ResNet-20, CPU',
                                   _baselines('digits', (100,), DIGITS_EPOCHS, ('-a', 'resnet20', *DIGITS_LOADER),
                                              DIGITS_LOADER),
                                   DIGITS_EPOCHS, reference='published',
                                   note='No published numbers: no paper has a digits table. ' + BASELINES),
    'folder-mini': Table('Your own image folder (--data_path ROOT) as it is, digits-mini\'s pipeline, ResNet-20',
                         _folder_mini, DIGITS_EPOCHS,
                         (Need('{data}', 'an image folder: ROOT/train/<class>/ and ROOT/val/<class>/ (or train.txt '
                                         'and val.txt), optionally ROOT/unlabeled/ (README "Your own data")'),),
                         note='No paper numbers: your data. Flags for the stages go in --stage-args: '
                              '\'-a resnet32\' or \'--imb_factor 0.01\' (a balanced folder made long-tailed) for '
                              'every stage; --image_size per script (\'train.py: --image_size 16\', the same for '
                              'pretrain_rot.py and train_semi.py; gen_pseudolabels.py reads it from its checkpoint).'),
    'digits-mini': Table('Miniature: long-tailed digits (rho = 100), ResNet-20, CPU', _digits_mini, DIGITS_EPOCHS,
                         note='No paper numbers: the paper has no digits table. Its claims, in this setting: '
                              'SSP and pseudo-labeled data each lower the error of CE, and SSP also helps '
                              'CE (Balanced).'),
}



# ---------------------------------------------------------------- long-tailed semi-supervised learning (train_ssl.py)

LTSSL_ROWS = (('supervised', 'supervised (labeled data only)', ('--ssl_alg', 'supervised')),
              ('fixmatch', 'FixMatch', ()),
              ('fixmatch+darp', 'FixMatch + DARP', ('--imb_alg', 'darp')),
              ('fixmatch+abc', 'FixMatch + ABC', ('--imb_alg', 'abc')))
LTSSL_EXTRA = (('tail', 'tail recall', 'mean last-evaluation accuracy (%) of the 30 % classes with the fewest labeled '
                                       'images (CIFAR-10, digits: 7, 8, 9).'),
               ('kl', 'KL to truth', "KL(histogram of the pseudo-labels the last evaluation period trained with || "
                                     "the true unlabeled class distribution), nats, from log_pseudo.csv (DARP: its "
                                     "refined labels); none for the labeled-only row."))
LTSSL_MEASURED = ("*best* is the best evaluation's (the weight average's) top-1 error, USB's metric; *last* the last "
                  "evaluation's. Many / medium / few: last-evaluation accuracy (%) of the classes with > 100, 20–100 "
                  "and < 20 labeled images.")
# the digits miniature (docs/ltssl.md): one recipe for every row
LTSSL_DIGITS = ('-a', 'resnet20', '--epochs', '10', '--eval_step', '50', '-b', '8', '--mu', '2',
                '--ema_decay', '0.99', '--lr_schedule', 'constant', '--wd_bn_bias', 'true', '--darp_warmup', '0.4', '-j', '0')


def _ltssl(dataset, settings, flags=(), protocol='usb'):
    """Per (N1, M1, gamma), gamma_u = gamma_l: supervised, FixMatch, + DARP, + ABC, one train_ssl.py stage each; the
    published column from the same protocol (repro.published_ltssl)."""
    from repro.published_ltssl import PUBLISHED

    def build(o, seed):
        cells = []
        for n, m, gamma in settings:
            group = f'N1 = {n}, M1 = {m}, gamma = {gamma}'
            data = ('--dataset', dataset, '--protocol', protocol, '--num_max', n, '--num_max_u', m,
                    '--imb_factor', repr(1 / gamma), '--imb_factor_unlabel', repr(1 / gamma), *flags)
            epochs = ('--epochs', o.epochs) if o.epochs else ()
            for key, label, method in LTSSL_ROWS:
                tag = f'ssl_s{seed}r{o.rand(seed)}' + (f'e{o.epochs}' if o.epochs else '')
                stage = o._run('train_ssl.py', seed, (*data, *method), *epochs, '--exp_str', tag)
                ref = PUBLISHED.get((protocol, dataset, n, m, gamma, gamma, key))
                cells.append(Cell(f'{key}_N{n}_M{m}_g{gamma}', f'{group}: {label}', (stage,), ref and ref.error, group,
                                  ref and f'{ref.source}; ± {ref.std}' or ''))
        return cells
    return build


TABLES.update({
    'ltssl-cifar10-usb': Table('CIFAR-10-LT semi-supervised, USB protocol (classic_cv_imb): supervised, FixMatch, '
                               '+ DARP, + ABC; WRN-28-2',
                               _ltssl('cifar10', ((1500, 3000, 100), (1500, 3000, 150), (500, 4000, 100),
                                                  (500, 4000, 150))),
                               None, (CIFAR10,), reference='published', measured=LTSSL_MEASURED, extra=LTSSL_EXTRA,
                               note="USB's recipe per row, as its CSV ran them (train_ssl.py --protocol usb: FixMatch "
                                    "and supervised with the cosine schedule and no decay on BatchNorm and biases, "
                                    "the add-ons with a constant lr and decay on every parameter); its strong "
                                    "augmentation is RandAugment(3, 5), ours FixMatch's (docs/ltssl.md). 256 x 1024 "
                                    "steps per cell: a GPU table (--gpus)."),
    'ltssl-digits-mini': Table('Miniature: long-tailed digits semi-supervised (N1 = 40, M1 = 100, gamma = 10), '
                               'ResNet-20, CPU', _ltssl('digits', ((40, 100, 10),), LTSSL_DIGITS), None,
                               reference='published', measured=LTSSL_MEASURED, extra=LTSSL_EXTRA,
                               note='No published numbers: no paper has digits. One recipe for every row (constant lr '
                                    '0.03, decay on every parameter, 10 x 50 steps, B 8, mu 2, EMA 0.99, DARP from '
                                    '40 %); the criteria it is judged by, set before it ran: docs/ltssl.md.'),
})
