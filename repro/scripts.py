"""The scripts a stage can run (how each parses its flags, what it leaves behind, how it continues
after a stop) and the Stage: one command line of one of them."""
import contextlib
import functools
import importlib
import io
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from errors import UserError
from repro.results import labeled_counts, read_decoupled_results, read_trainer_log, with_labeled_shots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The GPUs of one node that the original's ImageNet-LT / iNaturalist 2018 recipes train on: MoCo v2 one
# process per GPU (shuffle-BN over them), the decoupled stages DataParallel over them (each BatchNorm
# normalising one of 8 pieces of the batch). A stage of these trains that recipe however it is launched.
RECIPE_GPUS = 8
# torchrun's wait between the SIGTERM it forwards and a SIGKILL (its default, 30 s, is shorter than a
# ResNet-50 rank reaching its next print point and writing its checkpoint to network storage)
SHUTDOWN_TIMEOUT_S = 300

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
    gpus: Callable = lambda stage: 1    # Stage -> the GPUs its recipe trains on (a SLURM job's, one process each)
    alone: tuple = ()                   # flags it gets when it runs as one process: the recipe's layout


def _position(path):
    """(epoch, step) the checkpoint at `path` records. The table's bookkeeping asks about every stage
    many times (before the run, after each stage, for each results file), and each read unpickles the
    whole checkpoint: read once per version of the file (an atomic save makes a new inode)."""
    st = os.stat(path)
    return _read_position(path, st.st_ino, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=1024)
def _read_position(path, *version):
    from checkpoint import load_checkpoint
    ckpt = load_checkpoint(path)
    return int(ckpt.get('epoch', 0)), int(ckpt.get('step', 0))


def _run_folder(store_name):
    """train.py-style run folders: <root_model>/<store_name>/ckpt.pth.tar, <root_log>/<store_name>/."""
    def output(stage):
        a = stage.args()
        return os.path.join(a.root_model, _call(store_name, a), 'ckpt.pth.tar')

    def progress(stage):
        path = stage.output()
        if not os.path.isfile(path):
            return Progress(False)
        (epoch, step), epochs = _position(path), stage.args().epochs
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
        candidates.append((_position(interrupted), interrupted))
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
    _call('imagenet_inat.main.preflight', stage.args(alone=processes == 1), processes)


def _moco_gpus(stage):
    return RECIPE_GPUS if stage.flag('--dataset') in ('imagenet', 'inat') else 1


def with_shutdown_timeout(launcher):
    """torchrun's words with --shutdown_timeout SHUTDOWN_TIMEOUT_S where they set none."""
    words = list(launcher)
    is_torchrun = words and (os.path.basename(words[0]) == 'torchrun' or 'torch.distributed.run' in words[:3])
    if is_torchrun and not any(w.split('=')[0] in ('--shutdown_timeout', '--shutdown-timeout') for w in words):
        words += ['--shutdown_timeout', str(SHUTDOWN_TIMEOUT_S)]
    return words


def launcher_processes(launcher):
    """How many processes `launcher` starts: torchrun's --nproc_per_node x --nnodes (1 without a launcher)."""
    counts = {'--nproc_per_node': 1, '--nproc-per-node': 1, '--nnodes': 1}
    for i, word in enumerate(launcher):
        name, _, value = word.partition('=')
        if name in counts:
            value = value or (launcher[i + 1] if i + 1 < len(launcher) else '')
            counts[name] = int(value) if value.isdigit() else 1  # 'gpu', '1:4': unknown here, checked when it runs
    return counts['--nproc_per_node'] * counts['--nproc-per-node'] * counts['--nnodes']


def _ssl_result(stage):
    a = stage.args()
    return _call('repro.published_ltssl.read_ssl_result', a, os.path.join(a.root_log, a.store_name))


_TRAIN = _run_folder('train.supervised_store_name')
_SSL = _run_folder('train_ssl.ssl_store_name')
SCRIPTS = {
    'train.py': Script(('train.py',), 'train', 'build_parser', True, *_TRAIN),
    'pretrain_rot.py': Script(('pretrain_rot.py',), 'pretrain_rot', 'build_rot_parser', True,
                              *_run_folder('pretrain_rot.rot_store_name')),
    'train_semi.py': Script(('train_semi.py',), 'train_semi', 'build_parser', True,
                            *_run_folder('train_semi.semi_store_name')),
    'train_stage2.py': Script(('train_stage2.py',), 'train_stage2', 'build_parser', True,
                              *_run_folder('train_stage2.stage2_store_name')),
    # one process: it writes one file, and it is quick
    'gen_pseudolabels.py': Script(('gen_pseudolabels.py',), 'gen_pseudolabels', 'build_parser', False,
                                  _pseudo_label_output, _file_progress),
    'pretrain_moco.py': Script(('pretrain_moco.py',), 'pretrain_moco', 'build_parser', True,
                               _moco_output, _moco_progress, gpus=_moco_gpus),
    # one process: --bn_pieces cuts each batch as DataParallel over the recipe's GPUs did (on that many
    # visible GPUs, DataParallel itself; under torchrun, the processes are the pieces)
    'imagenet_inat': Script(('-m', 'imagenet_inat.main'), 'imagenet_inat.main', 'build_parser', True,
                            _decoupled_output, _decoupled_progress, _decoupled_result, _decoupled_check,
                            gpus=lambda stage: RECIPE_GPUS, alone=('--bn_pieces', str(RECIPE_GPUS))),
    'train_ssl.py': Script(('train_ssl.py',), 'train_ssl', 'build_parser', True, _SSL[0], _SSL[1], _ssl_result),
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

    def args(self, alone=False):
        """The stage's flags as its own script parses them (`alone`: as it runs as one process); a
        rejected flag is the user's --stage-args."""
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                return self.parser().parse_args([*(self.spec.alone if alone else ()), *self.argv])
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

    def status(self):
        """progress(), or 'status unknown' where the script cannot parse the flags (a dry run prints the
        plan all the same)."""
        try:
            return self.progress()
        except UserError as e:
            return Progress(False, note=f'status unknown: {e}')

    def result(self):
        return self.spec.result(self)

    def gpus(self):
        return self.spec.gpus(self)

    def command(self, launcher=(), resume=()):
        """The command line: `launcher` (torchrun's words) or the interpreter, the script, the flags
        (after the one-process layout flags, so that --stage-args can change them) and `resume`."""
        words = [os.path.relpath(os.path.join(REPO, w)) if w.endswith('.py') else w for w in self.spec.words]
        if launcher and self.spec.distributed:
            return with_shutdown_timeout(launcher) + words + list(self.argv) + list(resume)
        return [sys.executable] + words + list(self.spec.alone) + list(self.argv) + list(resume)

