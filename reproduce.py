"""One command per table of the paper: every stage of every cell, in order, resumable, and the results
written beside the paper's numbers.

    python reproduce.py --table cifar10-semi --data_path ./data --seeds 0 1 2
    python reproduce.py --table cifar10-ssp --dry-run                 # print every command, run nothing
    python reproduce.py --table cifar100-ssp --launcher "torchrun --nproc_per_node=8"
    python reproduce.py --table digits-mini                           # offline miniature, CPU, < 15 min
    python reproduce.py --table cifar10-semi --collect                # re-make the results from the run folders
    python reproduce.py --table cifar10-ssp --epochs 1 --stage-args="-a resnet20 -b 16 -j 0"   # smoke run

A table is a list of cells (its rows), a cell an ordered list of stages, a stage one command line of
train.py, gen_pseudolabels.py, train_semi.py, pretrain_rot.py, pretrain_moco.py or
`python -m imagenet_inat.main`. A stage that several cells need (one base model and one pseudo-label
file per seed for all rho_U; one rotation pre-training per seed and rho for both SSP cells) runs once.
A stage whose final artefact exists is skipped, one that stopped half-way is resumed from its
checkpoint, so running the same command again continues where it stopped.

Run folders go to <out>/runs/<table>/, results to <out>/<table>.md, .csv and .png (rebuilt after
every seed and at the end, so an interrupted table shows what is finished). --collect, --dry-run and
a resumed run must get the same --seeds, --epochs, --schedule, --rand_number and --stage-args as the
run they refer to: these decide the run folders' names.
"""
import argparse
import contextlib
import importlib
import io
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import cli
from errors import UserError

REPO = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------
# Scripts: how a stage of each one is parsed, what it leaves behind, and how it continues.

@dataclass(frozen=True)
class Progress:
    done: bool
    resume: tuple = ()   # flags that continue a half-done run
    note: str = 'not started'


@dataclass(frozen=True)
class Script:
    words: tuple                  # what follows the interpreter (or the launcher): a file, or -m and a module
    module: str                   # the importable module that holds the parser
    parser: str                   # name of the function in `module` that builds the argparse parser
    distributed: bool             # whether --launcher may start it as several processes
    output: Callable              # Stage -> the file the stage is finished by (later stages consume it)
    progress: Callable            # Stage -> Progress
    result: Optional[Callable] = None   # Stage -> metrics dict of a finished result stage
    check: Optional[Callable] = None    # (Stage, processes) -> None; UserError where the stage could not finish


def _run_folder(store_name):
    """train.py-style run folders: <root_model>/<store_name>/ckpt.pth.tar, <root_log>/<store_name>/."""
    def output(stage):
        a = stage.args()
        return os.path.join(a.root_model, _call(store_name, a), 'ckpt.pth.tar')

    def progress(stage):
        path = stage.output()
        if not os.path.isfile(path):
            return Progress(False)
        from checkpoint import load_checkpoint
        ckpt = load_checkpoint(path)
        epoch, step, epochs = int(ckpt.get('epoch', 0)), int(ckpt.get('step', 0)), stage.args().epochs
        if epoch >= epochs and step == 0:
            return Progress(True, note=f'done ({epoch} epochs)')
        return Progress(False, ('--resume', path), f'stopped at epoch {epoch} step {step} of {epochs}: resuming')

    def result(stage):
        a = stage.args()
        return with_labeled_shots(read_trainer_log(os.path.join(a.root_log, _call(store_name, a), 'log_test.csv')),
                                  labeled_counts(a))

    return output, progress, result


def _call(dotted, *args):
    module, name = dotted.rsplit('.', 1)
    return getattr(importlib.import_module(module), name)(*args)


def _file_progress(stage):
    path = stage.output()
    return Progress(True, note=f'done ({path} exists)') if os.path.isfile(path) else Progress(False)


def _pseudo_label_output(stage):
    return _call('gen_pseudolabels.output_path', stage.args())


def _moco_output(stage):
    a = stage.args()
    return _call('pretrain_moco.checkpoint_path', a, a.epochs)


def _moco_progress(stage):
    """Continue from the furthest checkpoint: numbered ones by their name, the interrupted one by its content."""
    final = stage.output()
    if os.path.isfile(final):
        return Progress(True, note=f'done ({final} exists)')
    folder = os.path.dirname(final)
    names = sorted(n for n in os.listdir(folder) if n.startswith('moco_ckpt_')) if os.path.isdir(folder) else []
    candidates = [((int(n[10:14]), 0), os.path.join(folder, n)) for n in names if n[10:14].isdigit()]
    interrupted = os.path.join(folder, 'moco_ckpt_interrupted.pth.tar')
    if os.path.isfile(interrupted):
        from checkpoint import load_checkpoint
        ckpt = load_checkpoint(interrupted)
        candidates.append(((int(ckpt.get('epoch', 0)), int(ckpt.get('step', 0))), interrupted))
    if not candidates:
        return Progress(False)
    (epoch, step), path = max(candidates)
    return Progress(False, ('--resume', path), f'stopped at epoch {epoch} step {step}: resuming')


def _decoupled_output(stage):
    return os.path.join(stage.flag('--log_dir'), 'final_model_checkpoint.pth')


def _decoupled_results_file(log_dir):
    """results_test.json (ImageNet-LT) or results_val.json (iNaturalist 2018): written after the final checkpoint."""
    found = [os.path.join(log_dir, f'results_{split}.json') for split in ('test', 'val')]
    return next((path for path in found if os.path.isfile(path)), None)


def _decoupled_progress(stage):
    final, log_dir = stage.output(), stage.flag('--log_dir')
    if os.path.isfile(final) and _decoupled_results_file(log_dir):
        return Progress(True, note=f'done ({final} exists)')
    if os.path.isfile(os.path.join(log_dir, 'latest_model_checkpoint.pth')):
        return Progress(False, ('--resume', log_dir), 'stopped half-way: resuming')
    return Progress(False)


def _decoupled_result(stage):
    return read_decoupled_results(_decoupled_results_file(stage.flag('--log_dir')))


def _decoupled_check(stage, processes):
    _call('imagenet_inat.main.preflight', stage.args(), processes)


def launcher_processes(launcher):
    """How many processes `launcher` starts: torchrun's --nproc_per_node x --nnodes (1 without a launcher)."""
    counts = {'--nproc_per_node': 1, '--nproc-per-node': 1, '--nnodes': 1}
    for i, word in enumerate(launcher):
        name, _, value = word.partition('=')
        if name in counts:
            value = value or (launcher[i + 1] if i + 1 < len(launcher) else '')
            counts[name] = int(value) if value.isdigit() else 1  # 'gpu', '1:4': unknown here, checked when it runs
    return counts['--nproc_per_node'] * counts['--nproc-per-node'] * counts['--nnodes']


_TRAIN = _run_folder('train.supervised_store_name')
SCRIPTS = {
    'train.py': Script(('train.py',), 'train', 'build_parser', True, *_TRAIN),
    'pretrain_rot.py': Script(('pretrain_rot.py',), 'pretrain_rot', 'build_rot_parser', True,
                              *_run_folder('pretrain_rot.rot_store_name')),
    'train_semi.py': Script(('train_semi.py',), 'train_semi', 'build_parser', True,
                            *_run_folder('train_semi.semi_store_name')),
    # one process: it writes one file, and it is quick
    'gen_pseudolabels.py': Script(('gen_pseudolabels.py',), 'gen_pseudolabels', 'build_parser', False,
                                  _pseudo_label_output, _file_progress),
    'pretrain_moco.py': Script(('pretrain_moco.py',), 'pretrain_moco', 'build_parser', True,
                               _moco_output, _moco_progress),
    'imagenet_inat': Script(('-m', 'imagenet_inat.main'), 'imagenet_inat.main', 'build_parser', True,
                            _decoupled_output, _decoupled_progress, _decoupled_result, _decoupled_check),
}


@dataclass(frozen=True)
class Stage:
    script: str      # key of SCRIPTS
    argv: tuple      # its flags, as strings

    @property
    def spec(self):
        return SCRIPTS[self.script]

    def parser(self):
        try:
            module = importlib.import_module(self.spec.module)
        except ImportError as e:
            raise UserError(f"{' '.join(self.spec.words)} is not available in this checkout ({e}); "
                            f"this table needs it") from None
        return getattr(module, self.spec.parser)()

    def args(self):
        """The stage's flags as its own script parses them; a rejected flag is the user's --stage-args."""
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                return self.parser().parse_args(list(self.argv))
        except SystemExit:
            reason = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else 'rejected'
            raise UserError(f"{' '.join(self.spec.words)} rejects the flags reproduce.py made for it "
                            f"({reason}); check --stage-args") from None

    def flag(self, name):
        """The value of the last `name` in the stage's flags."""
        position = len(self.argv) - 1 - self.argv[::-1].index(name)
        return self.argv[position + 1]

    def output(self):
        return self.spec.output(self)

    def progress(self):
        return self.spec.progress(self)

    def result(self):
        return self.spec.result(self)

    def command(self, launcher=(), resume=()):
        words = [os.path.relpath(os.path.join(REPO, w)) if w.endswith('.py') else w for w in self.spec.words]
        head = list(launcher) if launcher and self.spec.distributed else [sys.executable]
        return head + words + list(self.argv) + list(resume)


# ----------------------------------------------------------------------------------------------
# Tables: a registry of builders (options, seed) -> cells.

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

    def tag(self, name, seed, epochs):
        """--exp_str: keeps cells, seeds, subsets, lengths and schedules in separate run folders."""
        return f'{name}_s{seed}r{self.rand(seed)}e{epochs}_{self.schedule}'

    def trainer(self, script, seed, name, default_epochs, *argv):
        """A train.py / train_semi.py / pretrain_rot.py stage with the flags every one of them gets."""
        epochs = self.epochs or default_epochs
        return self.stage(script, *argv, '--data_path', self.data_path, '--seed', seed,
                          '--rand_number', self.rand(seed), '--epochs', epochs,
                          '--lr_steps', *SCHEDULES[self.schedule](epochs), '--exp_str', self.tag(name, seed, epochs),
                          '--root_log', self.path('log'), '--root_model', self.path('checkpoint'))


@dataclass(frozen=True)
class Cell:
    key: str                  # short name for --cells and the CSV
    label: str                # the row label
    stages: tuple             # in order; the last one's logs hold the cell's result
    paper: Optional[float] = None   # the paper's top-1 error (%), None where it reports none
    group: str = ''           # cells of a group share a panel of the per-class plot


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
        moco = o.stage('pretrain_moco.py', '--dataset', moco_dataset, '--data', o.data_path, '--seed', seed,
                       '--root_path', o.path(f'moco_s{seed}' + (f'e{o.epochs}' if o.epochs else '')), *moco_flags)

        def stage(config, source):
            cfg = os.path.relpath(os.path.join(REPO, 'imagenet_inat', 'config', config_dir, f'{config}.yaml'))
            return o.stage('imagenet_inat', '--cfg', cfg, '--model_dir', source.output(), '--data_root', o.data_path,
                           '--log_dir', o.path('imagenet_inat', f's{seed}', config), '--seed', seed)

        uniform, balanced = stage('feat_uniform', moco), stage('feat_balance', moco)
        return [Cell('Uniform+SSP', 'CE (Uniform) + SSP', (moco, uniform), papers[0]),
                Cell('Balanced+SSP', 'CE (Balanced) + SSP', (moco, balanced), papers[1]),
                Cell('cRT+SSP', 'cRT + SSP', (moco, uniform, stage('cls_crt', uniform)), papers[2]),
                Cell('tau-norm+SSP', 'tau-norm + SSP', (moco, uniform, stage('cls_tau_norm', uniform))),
                Cell('LWS+SSP', 'LWS + SSP', (moco, uniform, stage('cls_lws', uniform)))]
    return build


# Sized for <= 15 minutes on a 2-core CPU (21 stages): ResNet-20 rather than the paper's ResNet-32, 15 epochs.
DIGITS_EPOCHS = 15
DIGITS_FLAGS = ('--imb_factor', '0.01', '-a', 'resnet20', '-b', '64', '-j', '0')


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


_DATA = 'see README "Data preparation"'
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
    'digits-mini': Table('Miniature: long-tailed digits (rho = 100), ResNet-20, CPU', _digits_mini, DIGITS_EPOCHS,
                         note='No paper numbers: the paper has no digits table. Its claims, in this setting: '
                              'SSP and pseudo-labeled data each lower the error of CE, and SSP also helps '
                              'CE (Balanced).'),
}


# ----------------------------------------------------------------------------------------------
# Reading results.

def read_trainer_log(path):
    """The last epoch's top-1, shot and per-class accuracy (%) and the best top-1 of a train.py-style
    run, read by the trainer's own reader of what it writes (None before the first evaluation)."""
    import numpy as np
    from trainer import read_test_log
    if not os.path.isfile(path):
        return None
    records = read_test_log(path)
    if not records or records[-1]['best'] is None:
        return None
    last = records[-1]
    many, medium, few = last['shots'] or (np.nan, np.nan, np.nan)
    return {'best': last['best'], 'last': last['top1'], 'many': many, 'medium': medium, 'few': few,
            'per_class': None if last['per_class'] is None else 100 * last['per_class']}


def labeled_counts(args):
    """Images per class of the labeled long-tailed training set of a train.py / train_semi.py run, or
    None where its data is not at hand."""
    import numpy as np
    from dataset import DATASETS
    try:
        train_set = DATASETS[args.dataset].build_train(args.data_path, args.imb_type, args.imb_factor,
                                                       args.rand_number, None)
    except (UserError, OSError):
        return None
    return np.asarray(train_set.get_cls_num_list())


def with_labeled_shots(result, counts):
    """Shot groups by the labeled counts (the logs of train_semi.py count the pseudo-labeled images too)
    and the class order from the most to the fewest of them."""
    import numpy as np
    from utils import shot_accuracy
    if result is None or counts is None or result['per_class'] is None:
        return result
    shots = shot_accuracy(result['per_class'], counts)  # the mean of per-class %, so in % too
    return {**result, **shots, 'order': np.argsort(-counts, kind='stable').tolist()}


def read_decoupled_results(path):
    """imagenet_inat's results_<split>.json: the best-val weights evaluated after training (top-1 and
    shots in %, per-class accuracy as fractions, None for NaN); it has no last-epoch test number."""
    import json
    import numpy as np
    if path is None:
        return None
    def value(v):
        return np.nan if v is None else float(v)
    try:
        with open(path) as f:
            r = json.load(f)
        counts = np.asarray(r['train_class_counts'])
        return {'best': float(r['top1']), 'last': None, 'many': value(r['many_shot']),
                'medium': value(r['medium_shot']), 'few': value(r['few_shot']),
                'per_class': 100 * np.array([value(a) for a in r['cls_accs']]),
                'order': np.argsort(-counts, kind='stable').tolist()}
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: expected imagenet_inat's results JSON (top1, many_shot, medium_shot, few_shot, "
                        f"cls_accs, train_class_counts), could not read it ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------
# Planning, running, collecting.

def plan(table, opts, seeds, only=None):
    """{seed: [Cell]} (restricted to `only` cell keys) and the unique stages in running order."""
    cells = {seed: [c for c in table.build(opts, seed) if only is None or c.key in only] for seed in seeds}
    stages = list(dict.fromkeys(s for seed in seeds for c in cells[seed] for s in c.stages))
    return cells, stages


def check_data(name, table, data_path):
    for need in table.needs:
        path = need.path.format(data=data_path)
        if not os.path.exists(path):
            raise UserError(f"{path} is missing, and the {name} table needs it: {need.what}")


def describe(stage):
    """stage.progress(), or 'status unknown' where the stage's script cannot parse its flags (a dry run
    prints the plan all the same)."""
    try:
        return stage.progress()
    except UserError as e:
        return Progress(False, note=f'status unknown: {e}')


def execute(cmd, env):
    """Run one stage with its output on our console; a SIGTERM to us is passed on, so it saves and stops."""
    proc = subprocess.Popen(cmd, env=env)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return proc.wait()  # the stage got the same SIGINT (one process group) and is saving
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_stages(stages, launcher, collect_hook):
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p)
    for i, stage in enumerate(stages, 1):
        progress = stage.progress()
        cmd = stage.command(launcher, progress.resume)
        if progress.done:
            print(f"[reproduce] stage {i}/{len(stages)}: {progress.note}, skipped: {shlex.join(cmd)}", flush=True)
            continue
        print(f"[reproduce] stage {i}/{len(stages)} ({progress.note}): {shlex.join(cmd)}", flush=True)
        code = execute(cmd, env)
        if code != 0:
            print(f"[reproduce] stage {i}/{len(stages)} ended with exit status {code}; run the same reproduce.py "
                  f"command again to continue (finished stages are skipped, this one resumes)", flush=True)
            return code
        if not stage.progress().done:
            raise UserError(f"stage {i} ({' '.join(stage.spec.words)}) exited normally but {stage.output()} "
                            f"is not finished")
        collect_hook(stage)
    return 0


def summarize(table, cells, seeds):
    """One row per cell: mean and std over the seeds whose result stage finished."""
    import numpy as np
    rows = []
    for k, cell in enumerate(cells[seeds[0]]):
        found = {}
        for seed in seeds:
            last = cells[seed][k].stages[-1]
            if describe(last).done and last.spec.result is not None:
                r = last.result()
                if r is not None:
                    found[seed] = r
        row = {'key': cell.key, 'label': cell.label, 'group': cell.group, 'paper': cell.paper,
               'n': len(found), 'seeds': ' '.join(str(s) for s in found)}
        for metric in ('best', 'last'):
            err = np.array([100 - r[metric] for r in found.values() if r[metric] is not None])
            row[f'{metric}_err'] = err.mean() if len(err) else None
            row[f'{metric}_err_std'] = err.std(ddof=1) if len(err) > 1 else None
        for group in ('many', 'medium', 'few'):
            acc = np.array([r[group] for r in found.values()])
            row[group] = np.nanmean(acc) if len(acc) and np.isfinite(acc).any() else None
            row[f'{group}_std'] = np.nanstd(acc, ddof=1) if np.isfinite(acc).sum() > 1 else None
        curves = [r['per_class'] for r in found.values() if r.get('per_class') is not None]
        row['per_class'] = np.mean(curves, axis=0) if curves else None
        orders = [r['order'] for r in found.values() if r.get('order') is not None]
        row['order'] = orders[0] if orders else None
        row['diff'] = row['best_err'] - cell.paper if cell.paper is not None and found else None
        row['status'] = 'done' if len(found) == len(seeds) else ('missing' if not found else
                                                               f'partial ({len(found)} of {len(seeds)} seeds)')
        rows.append(row)
    return rows


def _fmt(mean, std=None):
    if mean is None:
        return '—'
    return f'{mean:.2f}' if std is None else f'{mean:.2f} ± {std:.2f}'


CSV_COLUMNS = ('table', 'cell', 'label', 'n', 'seeds', 'best_err', 'best_err_std', 'last_err', 'last_err_std',
               'many', 'many_std', 'medium', 'medium_std', 'few', 'few_std', 'paper', 'best_minus_paper',
               'status', 'schedule', 'epochs')


def write_results(name, table, opts, seeds, rows):
    """<out>/<name>.csv, .md and .png (atomically); returns the markdown."""
    import csv
    from fileio import atomic_write_bytes
    epochs = opts.epochs or table.epochs
    schedule = (SCHEDULE_TEXT[opts.schedule].format(*SCHEDULES[opts.schedule](epochs), epochs) if epochs
                else 'the scripts\' own schedules')
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    writer.writerow(CSV_COLUMNS)
    num = lambda v: '' if v is None else f'{v:.4f}'
    for r in rows:
        writer.writerow([name, r['key'], r['label'], r['n'], r['seeds'], num(r['best_err']), num(r['best_err_std']),
                         num(r['last_err']), num(r['last_err_std']), num(r['many']), num(r['many_std']),
                         num(r['medium']), num(r['medium_std']), num(r['few']), num(r['few_std']),
                         num(r['paper']), num(r['diff']), r['status'], opts.schedule, epochs or ''])
    lines = [f'# {name}: {table.title}', '',
             f'Top-1 error (%) on the balanced test set, mean ± std over n seeds (of {" ".join(map(str, seeds))}): '
             f'{table.measured} LR schedule: {schedule}.', '']
    if table.note:
        lines += [table.note, '']
    lines += ['| cell | n | best error | last error | many | medium | few | paper | best − paper |',
              '| --- | :---: | :---: | :---: | :---: | :---: | :---: | :---: | :---: |']
    for r in rows:
        if r['n'] == 0:
            lines.append(f"| {r['label']} | 0 | missing | | | | | {_fmt(r['paper'])} | |")
            continue
        diff = '—' if r['diff'] is None else f"{r['diff']:+.2f}"
        lines.append(f"| {r['label']} | {r['n']} | {_fmt(r['best_err'], r['best_err_std'])} | "
                     f"{_fmt(r['last_err'], r['last_err_std'])} | {_fmt(r['many'])} | {_fmt(r['medium'])} | "
                     f"{_fmt(r['few'])} | {_fmt(r['paper'])} | {diff} |")
    lines += ['', f'![per-class accuracy]({name}.png)', '']
    markdown = '\n'.join(lines)
    os.makedirs(opts.out, exist_ok=True)
    atomic_write_bytes(os.path.join(opts.out, f'{name}.csv'), buf.getvalue().encode())
    atomic_write_bytes(os.path.join(opts.out, f'{name}.md'), markdown.encode())
    atomic_write_bytes(os.path.join(opts.out, f'{name}.png'), per_class_png(table, rows))
    return markdown


def per_class_png(table, rows):
    """Per-class test accuracy of every cell (mean over seeds), classes from the most to the fewest
    training images; one panel per group of cells."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from utils import figure_png
    import numpy as np
    groups = list(dict.fromkeys(r['group'] for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 5.2), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for r in (r for r in rows if r['group'] == group):
            if r['per_class'] is None:
                ax.plot([], [], label=f"{r['label']} (missing)")
                continue
            order = r['order'] if r['order'] is not None else list(range(len(r['per_class'])))
            ax.plot(np.arange(len(order)), r['per_class'][order], marker='.' if len(order) <= 20 else None,
                    label=f"{r['label']} (n={r['n']})")
            if len(order) <= 20:
                ax.set_xticks(np.arange(len(order)), [str(c) for c in order])
        ax.set_title(group or table.title, fontsize=9)
        ax.set_xlabel('class, most to fewest training images')
        ax.set_ylabel('test accuracy (%)')
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    fig.tight_layout()
    return figure_png(fig, dpi=90)


def parse_stage_args(values):
    """--stage-args values -> {script or '' (every stage): [flags]}; 'SCRIPT: flags' targets one script."""
    extra = {}
    for value in values:
        words = shlex.split(value)
        script = ''
        if words and words[0].endswith(':'):
            script = words.pop(0)[:-1]
            if script not in SCRIPTS:
                raise UserError(f"--stage-args {value!r}: unknown script {script!r}; "
                                f"choose one of {', '.join(SCRIPTS)}")
        extra.setdefault(script, []).extend(words)
    return extra


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--table', required=True, help='one of: ' + ', '.join(TABLES))
    parser.add_argument('--seeds', nargs='+', default=['0', '1', '2'], help='training seeds (default: 0 1 2)')
    parser.add_argument('--data_path', default='./data', help='folder with the data set files (README "Data '
                                                               'preparation"); checked before anything runs')
    parser.add_argument('--out', default='results',
                        help='results go to OUT/<table>.*, run folders to OUT/runs/<table>/')
    parser.add_argument('--epochs', type=cli.positive_int, default=None,
                        help='training epochs of every stage (default: the paper\'s; the LR steps scale with it)')
    parser.add_argument('--schedule', default='current', choices=list(SCHEDULES),
                        help="LR schedule: 'current' (x0.01 after 80 %% of the epochs, x0.0001 after 90 %%) or "
                             "'first-release' (x0.01 after 80 %% to the end, as the original's first release)")
    parser.add_argument('--rand_number', type=int, default=None,
                        help='long-tailed subset for every seed (default: each seed its own, --rand_number = seed)')
    parser.add_argument('--cells', nargs='+', default=None, metavar='KEY', help='run / collect only these cells')
    parser.add_argument('--stage-args', action='append', default=[], metavar='"[SCRIPT:] FLAGS"',
                        help='flags appended to every stage (or, with a SCRIPT: prefix such as "train.py:", to '
                             'that script\'s stages), e.g. --stage-args="-j 8" '
                             '--stage-args="gen_pseudolabels.py: -b 1000"')
    parser.add_argument('--launcher', default='', help='words that start the multi-process stages instead of the '
                                                        'interpreter, e.g. "torchrun --nproc_per_node=8"')
    parser.add_argument('--dry-run', action='store_true', help='print the plan and every command; run nothing')
    parser.add_argument('--collect', action='store_true', help='only re-make the results from the run folders')
    return parser


def parse_seeds(values):
    try:
        seeds = [int(v) for v in values]
    except ValueError:
        raise UserError(f"--seeds must be integers, got {' '.join(values)}") from None
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds lists a seed twice: {' '.join(values)}")
    return seeds


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.table not in TABLES:
        raise UserError(f"unknown table {args.table!r}; choose one of {', '.join(TABLES)}")
    table, seeds = TABLES[args.table], parse_seeds(args.seeds)
    opts = Options(args.table, args.data_path, args.out, args.epochs, args.schedule, args.rand_number,
                   parse_stage_args(args.stage_args))
    keys = [c.key for c in table.build(opts, seeds[0])]
    unknown = [k for k in args.cells or () if k not in keys]
    if unknown:
        raise UserError(f"unknown cell {unknown[0]!r} for table {args.table}; choose from {', '.join(keys)}")
    cells, stages = plan(table, opts, seeds, args.cells)
    launcher = shlex.split(args.launcher)

    def collect(_stage=None):
        return write_results(args.table, table, opts, seeds, summarize(table, cells, seeds))

    if args.collect:
        print(collect())
        return 0
    if args.dry_run:
        for i, stage in enumerate(stages, 1):
            status = describe(stage)
            word = 'done, skipped' if status.done else status.note
            print(f"# stage {i}/{len(stages)}: {word}")
            print(shlex.join(stage.command(launcher, status.resume)))
        return 0
    check_data(args.table, table, args.data_path)
    processes = launcher_processes(launcher)
    for stage in stages:  # every command must parse, and pass its script's checks, before the first one runs
        stage.args()
        if stage.spec.check is not None:
            stage.spec.check(stage, processes if stage.spec.distributed else 1)
    print(f"[reproduce] {args.table}: {len(stages)} stages for {len(cells[seeds[0]])} cells x {len(seeds)} seeds",
          flush=True)
    # the results are re-made when a seed's last stage has finished
    seed_ends = {max((s for c in cells[seed] for s in c.stages), key=stages.index) for seed in seeds}
    try:
        code = run_stages(stages, launcher, lambda stage: collect() if stage in seed_ends else None)
    finally:
        print(collect(), flush=True)
    return code


if __name__ == '__main__':
    cli.run_main(main)
