"""The commands of README.md, docs/*.md and `make demo`, read from those files and run as written
(issue 17, item 5), in a fresh working directory: relative paths such as checkpoint/<run>/ and
./data/ chain the steps exactly as a user's shell would. Added to keep them to seconds: `--epochs 1`
(argparse takes the last value; `-j 0 -b 64` for MoCo on CIFAR) and tiny data in the real formats (the
CIFAR/SVHN/TinyImages fixtures in ./data, a 40-per-class digits subset). Placeholders such as
<ckpt> are filled in with the file the previous step wrote.

The README is a landing page (issue 31): its Quick start's commands are run from it; every other command of it
is, word for word, a command of a docs/ page (test_readme_commands_are_the_pages_commands), run from that page
here where it is run at all: train.py's from docs/train.md, the semi-supervised ones from docs/semi.md, and so on.
Every `python <script>` command of every page, run or not, is at least taken by its script's parser
(test_every_pages_script_command_parses; reproduce.py's: test_every_reproduce_md_command_parses).

Not run here: commands that need ImageNet / iNaturalist images or several GPUs (imagenet_inat,
MoCo on imagenet/inat, torchrun with 8 processes: tests/test_imagenet_inat.py, test_moco.py and
test_distributed.py run them on small image folders and 2 processes), reproduce.py's tables
(tests/test_reproduce.py), train_ssl.py's CIFAR commands (its digits one is run here), tools/tsne.py
(tests/test_tsne.py), installation and benchmarks. Of
docs/reproduce.md's SLURM section: the worked example's commands, against a fake sbatch
(tests/test_reproduce_slurm.py), and the multi-node torchrun line, read by torchrun's own parser.
"""
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

import fixtures
import reproduce
import gen_pseudolabels
import pretrain_moco
import pretrain_rot
import train
import train_semi
import train_ssl
import train_stage2
from imagenet_inat import main as imagenet_main
from fixtures import REPO
from models import build_model
from test_reproduce_slurm import fake_slurm  # noqa: F401 (a fixture: sbatch, srun, squeue on PATH)

SCRIPTS = {'train.py': train, 'gen_pseudolabels.py': gen_pseudolabels, 'train_semi.py': train_semi,
           'pretrain_rot.py': pretrain_rot, 'pretrain_moco.py': pretrain_moco, 'train_stage2.py': train_stage2,
           'train_ssl.py': train_ssl}
SHORT = ['--epochs', '1']
PAGES = ['README.md', *sorted(os.path.join('docs', name) for name in os.listdir(os.path.join(REPO, 'docs'))
                              if name.endswith('.md'))]


def documented(path, block='bash', fill=False):
    """Every command of the ```bash blocks of a file: continuation lines joined, comments cut off; with fill, each
    <placeholder> (spaces and all) becomes one word: its first number where it starts with one (<0 or 1>), else
    PLACE."""
    with open(os.path.join(REPO, path)) as f:
        text = f.read()
    if fill:
        text = re.sub(r'<(\d*)[^<>\n]*>', lambda m: m[1] or 'PLACE', text)
    commands = []
    for body in re.findall(rf'```{block}\n(.*?)```', text, flags=re.S):
        for line in body.replace('\\\n', ' ').splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def script_commands(path, script, must_contain=()):
    """The `python <script> ...` commands of a file (flags only) that contain every word of must_contain."""
    found = [words[2:] for words in documented(path) if words[:2] == ['python', script]
             and all(w in words for w in must_contain)]
    assert found, f'{path} has no `python {script}` command with {must_contain}'
    return found


def run(script, argv, extra=SHORT, **placeholders):
    argv = [placeholders.get(w, w) for w in argv]
    assert not [w for w in argv if w.startswith('<')], f'unfilled placeholder in {script} {argv}'
    assert SCRIPTS[script].main([*argv, *extra]) == 0, (script, argv)


@pytest.fixture
def cwd(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_make_demo(cwd, monkeypatch):
    """The two train.py runs of the Makefile's demo target (LDAM needs an image of every class: 120 per
    class before the long-tailed draw, 1 of the last class after it)."""
    fixtures.shrink_digits(monkeypatch.setattr, per_class=130)
    with open(os.path.join(REPO, 'Makefile')) as f:
        recipe = re.search(r'^demo:.*?\n((?:\t.*\n)+)', f.read(), flags=re.M).group(1)
    runs = [shlex.split(line)[1:] for line in recipe.replace('\\\n', ' ').splitlines()]
    assert [r[0] for r in runs] == ['train.py', 'train.py']
    for argv in runs:
        run('train.py', argv[1:])
    for name in ('digits_resnet32_CE_None_exp_0.01_demo', 'digits_resnet32_LDAM_DRW_exp_0.01_demo'):
        assert (cwd / 'checkpoint' / name / 'ckpt.pth.tar').is_file(), name


SET_UP = [['python3', '-m', 'venv', '.venv', '&&', '.venv/bin/pip', 'install', '-r', 'requirements.txt'],
          ['source', '.venv/bin/activate']]


def test_readme_quick_start_runs_in_a_shell_after_the_two_set_up_commands(tmp_path):
    """The Quick start's commands as written, in bash, after only its two set-up commands: the trial's shell had
    a `python` without torch, so `python pretrain_rot.py ...` ended in a ModuleNotFoundError traceback. Here
    `python` on the PATH is not the project's either; the first set-up command's result (.venv) is the
    project's environment, linked, and the second runs as written. --epochs 1 and the 40-per-class digits (a
    sitecustomize on PYTHONPATH) keep it short."""
    with open(os.path.join(REPO, 'README.md')) as f:
        quick = f.read().split('## Quick start', 1)[1].split('\n## ', 1)[0]
    blocks = [[shlex.split(line, comments=True) for line in body.replace('\\\n', ' ').splitlines()]
              for body in re.findall(r'```bash\n(.*?)```', quick, flags=re.S)]
    assert [w for w in blocks[0] if w] == SET_UP
    commands = [w for block in blocks[1:] for w in block if w and w[0] == 'python']
    assert [w[1] for w in commands] == ['pretrain_rot.py', 'train.py']
    for name in os.listdir(REPO):
        if name not in ('.git', 'log', 'checkpoint', 'data', 'hooks'):
            os.symlink(os.path.join(REPO, name), tmp_path / name)
    script = '\n'.join(['set -e', shlex.join(SET_UP[1])] + [shlex.join(w + ['--epochs', '1']) for w in commands])
    hooks = tmp_path / 'hooks'
    hooks.mkdir()
    (hooks / 'sitecustomize.py').write_text(f"import sys; sys.path[:0] = [{REPO!r}, {os.path.join(REPO, 'tests')!r}]; "
                                            f"import fixtures; fixtures.shrink_digits(setattr)\n")
    env = {**fixtures.script_env(), 'PATH': '/usr/bin:/bin', 'PYTHONPATH': str(hooks)}
    env.pop('VIRTUAL_ENV', None)
    proc = subprocess.run(['bash', '-c', script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'loaded 186 backbone tensors from rotation/supervised checkpoint' in proc.stdout
    assert 'cls num list (labels unused): [30, ' in proc.stdout  # the small digits


def test_readme_offline_ssp(cwd, small_digits, capsys):
    """README quick start: rotation SSP on digits, then train.py from the checkpoint path it names."""
    (rot,) = script_commands('README.md', 'pretrain_rot.py', ['digits'])
    (fine,) = script_commands('README.md', 'train.py', ['digits', '--pretrained_model'])
    run('pretrain_rot.py', rot)
    capsys.readouterr()
    run('train.py', fine)
    n_backbone = len([k for k in build_model('resnet32', 10).state_dict() if not k.startswith('fc.')])
    assert f'loaded {n_backbone} backbone tensors' in capsys.readouterr().out


def test_semi_md_offline_digits(cwd, small_digits):
    """docs/semi.md "Offline: long-tailed digits": train.py -> gen_pseudolabels.py -> train_semi.py."""
    (base,) = script_commands('docs/semi.md', 'train.py', ['digits'])
    (gen,) = script_commands('docs/semi.md', 'gen_pseudolabels.py', ['digits'])
    (semi,) = script_commands('docs/semi.md', 'train_semi.py', ['digits'])
    run('train.py', base)
    run('gen_pseudolabels.py', gen, extra=())
    assert (cwd / 'data' / 'pseudo_labeled_digits.pickle').is_file() and (cwd / 'data' / 'prediction.log').is_file()
    run('train_semi.py', semi)
    assert (cwd / 'checkpoint' / 'digits_resnet32_CE_None_exp_0.01_0.01_semi' / 'ckpt.pth.tar').is_file()


def test_ltssl_md_offline_digits(cwd, small_digits, one_thread):
    """docs/ltssl.md's digits miniature command, then -e on its checkpoint; a smaller split for the small digits
    (30 pool images per digit) and 2 steps."""
    (mini,) = script_commands('docs/ltssl.md', 'train_ssl.py', ['digits'])
    run('train_ssl.py', mini, extra=('--epochs', '1', '--eval_step', '2', '--num_max', '12', '--num_max_u', '16'))
    ckpt = cwd / 'checkpoint' / 'digits_resnet20_fixmatch_abc_N12_M16_0.1_0.1_usb_ssl' / 'ckpt.pth.tar'
    assert ckpt.is_file()
    run('train_ssl.py', mini, extra=('--epochs', '1', '--num_max', '12', '--num_max_u', '16', '--resume', str(ckpt),
                                     '-e'))


def test_moco_md_offline_digits(cwd, small_digits):
    (moco,) = script_commands('docs/moco.md', 'pretrain_moco.py', ['digits'])
    run('pretrain_moco.py', moco)
    # docs/moco.md: <--root_path>/<dataset>/checkpoint/moco_ckpt_XXXX.pth.tar, XXXX the epochs done
    assert (cwd / 'data' / 'digits' / 'checkpoint' / 'moco_ckpt_0001.pth.tar').is_file()


@pytest.fixture
def cifar_data(cwd, no_checksum):
    """./data with CIFAR-10 (20 training images per class), CIFAR-100 (5), TinyImages (20), SVHN."""
    fixtures.write_cifar10(cwd / 'data', per_class=20, test_per_class=2)
    fixtures.write_cifar100(cwd / 'data', per_class=5, test_per_class=1)
    fixtures.write_tinyimages(str(cwd / 'data' / 'ti_80M_selected.pickle'), n_per_class=20)
    for split, per_class in (('train', 12), ('test', 2), ('extra', 10)):
        fixtures.write_svhn(str(cwd / 'data'), split, per_class=per_class, seed=len(split))
    return cwd


def test_train_md_commands(cifar_data, capsys):
    """docs/train.md "Commands": the CE baseline, LDAM-DRW, Focal/Reweight, Balanced Softmax and logit-adjusted
    runs, then -e (plain and --posthoc_la) and --resume of the baseline's checkpoint (the
    --pretrained_model ones: test_readme_rotation_ssp); the README's train.py commands of "What to run" are
    among them. LDAM and the log prior need an image of every class: 100 per class before the long-tailed
    draw, 1 of the last class after it."""
    fixtures.write_cifar10(cifar_data / 'data', per_class=100, test_per_class=2)
    commands = [c for c in script_commands('docs/train.md', 'train.py', ['--dataset'])
                if '--pretrained_model' not in c and 'digits' not in c]
    assert len(commands) == 8
    readme = [c for c in script_commands('README.md', 'train.py', ['cifar10', '0.01']) if '--pretrained_model' not in c]
    readme += script_commands('README.md', 'train.py', ['-e'])
    assert len(readme) == 4 and all(c in commands for c in readme)
    ckpt = 'checkpoint/cifar10_resnet32_CE_None_exp_0.01_ss_pretrained/ckpt.pth.tar'
    for argv in commands:
        if '--resume' not in argv:
            run('train.py', argv)
    for name in ('cifar10_resnet32_CE_None_exp_0.01_ss_pretrained', 'cifar10_resnet32_LDAM_DRW_exp_0.01_ss_pretrained',
                 'cifar100_resnet32_Focal_Reweight_exp_0.01_ss_pretrained',
                 'cifar10_resnet32_BalancedSoftmax_None_exp_0.01_ss_pretrained',
                 'cifar10_resnet32_LogitAdjusted_None_exp_0.01_ss_pretrained'):
        assert (cifar_data / 'checkpoint' / name / 'ckpt.pth.tar').is_file(), name
    evaluate, resume, posthoc = [c for c in commands if '--resume' in c]
    capsys.readouterr()
    run('train.py', evaluate, **{'<ckpt.pth.tar>': ckpt})
    assert 'val Results: Prec@1' in capsys.readouterr().out
    run('train.py', posthoc, **{'<ckpt.pth.tar>': ckpt})
    out = capsys.readouterr().out
    assert '=> post-hoc logit adjustment on' in out and 'val Results: Prec@1' in out
    run('train.py', resume, extra=['--epochs', '2'], **{'checkpoint/<run>/ckpt.pth.tar': ckpt})
    assert torch.load(ckpt, map_location='cpu', weights_only=True)['epoch'] == 2


def test_readme_rotation_ssp(cifar_data, capsys):
    """README "Self-supervised pre-training" (and docs/train.md "pretrain_rot.py", the same two commands):
    pre-train, then train.py --pretrained_model with the path it names."""
    (rot,) = script_commands('README.md', 'pretrain_rot.py', ['cifar10'])
    (fine,) = script_commands('README.md', 'train.py', ['--pretrained_model',
                              'checkpoint/cifar10_resnet32_CE_None_exp_0.01_pretrain_rot/ckpt.best.pth.tar'])
    assert script_commands('docs/train.md', 'pretrain_rot.py', ['cifar10']) == [rot]
    assert script_commands('docs/train.md', 'train.py', ['--pretrained_model', fine[-1]]) == [fine]
    run('pretrain_rot.py', rot)
    capsys.readouterr()
    run('train.py', fine)
    assert 'backbone tensors from rotation/supervised checkpoint' in capsys.readouterr().out


def test_readme_moco_ssp(cifar_data, capsys):
    """README "Self-supervised pre-training" (docs/moco.md's same two commands): MoCo v2 on CIFAR-10-LT, then
    train.py from the checkpoint path it names (epoch 1 for the 200 of the default). 100 images per class before
    the long-tailed draw (242 after it) and -b 64 give MoCo three steps of a batch its 4096 keys divide by."""
    fixtures.write_cifar10(cifar_data / 'data', per_class=100, test_per_class=2)
    (moco,) = script_commands('README.md', 'pretrain_moco.py', ['cifar10'])
    (fine,) = script_commands('README.md', 'train.py', ['ssp_moco'])
    assert script_commands('docs/moco.md', 'pretrain_moco.py', ['cifar10']) == [moco]
    assert script_commands('docs/moco.md', 'train.py', ['cifar10']) == [fine]
    run('pretrain_moco.py', moco, extra=['--epochs', '1', '-j', '0', '-b', '64'])
    assert (cifar_data / 'data' / 'cifar10' / 'checkpoint' / 'moco_ckpt_0001.pth.tar').is_file()
    capsys.readouterr()
    run('train.py', fine, **{'data/cifar10/checkpoint/moco_ckpt_0200.pth.tar':
                             'data/cifar10/checkpoint/moco_ckpt_0001.pth.tar'})
    assert 'backbone tensors from MoCo checkpoint' in capsys.readouterr().out


def test_semi_supervised_cifar10(cifar_data):
    """docs/semi.md: base model, pseudo-labels of the TinyImages selection, semi training, -e. The
    README's commands are the same ones."""
    (base,) = script_commands('docs/semi.md', 'train.py', ['cifar10', '0.02'])
    (gen,) = script_commands('docs/semi.md', 'gen_pseudolabels.py', ['pseudo_labeled_cifar.pickle'])
    semi, evaluate = script_commands('docs/semi.md', 'train_semi.py', ['cifar10'])
    assert script_commands('README.md', 'train.py', ['cifar10', '0.02']) == [base]
    assert script_commands('README.md', 'gen_pseudolabels.py', ['pseudo_labeled_cifar.pickle']) == [gen]
    assert script_commands('README.md', 'train_semi.py', ['cifar10']) == [semi, evaluate]
    run('train.py', base)
    run('gen_pseudolabels.py', gen, extra=())
    run('train_semi.py', semi)
    run('train_semi.py', evaluate, **{'<ckpt>': 'checkpoint/cifar10_resnet32_CE_None_exp_0.02_0.02_semi/ckpt.pth.tar'})


def test_semi_md_svhn(cifar_data):
    (base,) = script_commands('docs/semi.md', 'train.py', ['svhn'])
    (gen,) = script_commands('docs/semi.md', 'gen_pseudolabels.py', ['svhn'])
    (semi,) = script_commands('docs/semi.md', 'train_semi.py', ['svhn'])
    run('train.py', base)
    run('gen_pseudolabels.py', gen, extra=())
    run('train_semi.py', semi)
    assert (cifar_data / 'checkpoint' / 'svhn_resnet32_CE_None_exp_0.02_0.02_semi' / 'ckpt.pth.tar').is_file()


def test_readme_flags_of_train_py(cwd, small_digits, capsys):
    """docs/train.md's flag list of train.py: `--imb_type step` halves the classes (the first half keeps n_max,
    the rest n_max * imb_factor), `--start-epoch 1` starts the epoch loop at epoch 1 (warm-up: lr * 2 / 5),
    `-p 1` prints every step, `--lr`, `--momentum` and `--wd` reach SGD. The 40-per-class digits keep
    30 training images per class."""
    assert train.main(['--dataset', 'digits', '--imb_type', 'step', '--imb_factor', '0.1', '--start-epoch', '1',
                       '--epochs', '2', '-b', '64', '-p', '1', '--lr', '0.05', '--momentum', '0.5',
                       '--wd', '1e-3']) == 0
    out = capsys.readouterr().out
    assert 'cls num list: [30, 30, 30, 30, 30, 3, 3, 3, 3, 3]' in out
    # 165 images in batches of 64: three steps, each printed, all in the second of two epochs (the console
    # counts from 1; log_train.csv keeps the original's 0-based [1])
    steps = [line.split('\t')[0] for line in out.splitlines() if line.startswith('Epoch: ')]
    assert steps == [f'Epoch: [2/2][{s}/3], lr: 0.02000' for s in (1, 2, 3)]
    ckpt = torch.load('checkpoint/digits_resnet32_CE_None_step_0.1_ss_pretrained/ckpt.pth.tar', map_location='cpu',
                      weights_only=True)
    assert ckpt['epoch'] == 2
    group = ckpt['optimizer']['param_groups'][0]
    assert (group['lr'], group['momentum'], group['weight_decay']) == (0.02, 0.5, 1e-3)


def test_own_data_worked_example(cwd, monkeypatch, capsys):
    """docs/own_data.md's worked example: digits written as a folder, then train.py, -e, gen_pseudolabels.py,
    train_semi.py, pretrain_rot.py and the SSP fine-tuning, pretrain_moco.py and its fine-tuning, cRT, each as
    written. 141 digits per class (10 of them val, 30 moved to unlabeled/) keep 101 labeled training images
    per class, so that --imb_factor 0.01 leaves the last class one."""
    sys.path.insert(0, os.path.join(REPO, 'tools'))
    import digits_folder
    fixtures.shrink_digits(monkeypatch.setattr, per_class=141, test_per_class=10)
    tool = [w[2:] for w in documented('docs/own_data.md') if w[:2] == ['python', 'tools/digits_folder.py']]
    assert len(tool) == 1 and digits_folder.main(tool[0]) == 0
    commands = [(w[1], w[2:]) for w in documented('docs/own_data.md') if w[0] == 'python' and '--dataset' in w
                and w[w.index('--dataset') + 1] == 'folder']
    assert [script for script, _ in commands] == ['train.py', 'train.py', 'gen_pseudolabels.py', 'train_semi.py',
                                                  'pretrain_rot.py', 'train.py', 'pretrain_moco.py', 'train.py',
                                                  'train_stage2.py']
    moco = {'data/folder-digits-folder/checkpoint/moco_ckpt_0030.pth.tar':
            'data/folder-digits-folder/checkpoint/moco_ckpt_0001.pth.tar'}  # SHORT
    for script, argv in commands:
        run(script, argv, extra=() if script == 'gen_pseudolabels.py' or '-e' in argv else SHORT, **moco)
    out = capsys.readouterr().out
    assert '10 classes, 1010 training and 100 val images of 32x32 px' in out
    assert 'wrote 300 pseudo-labels' in out and 'backbone tensors from rotation/supervised checkpoint' in out
    assert 'backbone tensors from MoCo checkpoint' in out and '=> cRT: features frozen' in out
    assert (cwd / 'checkpoint' / 'folder-digits-folder_resnet32_CE_None_exp_0.01_0.01_semi' / 'ckpt.pth.tar').is_file()


def _store_names(paths, pretrained):
    names = {}
    for path in paths:
        for argv in [w[2:] for w in documented(path) if w[:2] == ['python', 'train.py'] and '--dataset' in w]:
            if ('--pretrained_model' in argv) == pretrained and '--resume' not in argv:
                names.setdefault(train.supervised_store_name(train.build_parser().parse_args(argv)), []).append(argv)
    return names


def test_fine_tuning_from_ssp_gets_its_own_run_folder():
    """A documented SSP fine-tuning run must not write into the folder of a documented plain run (the
    second would replace the first's checkpoints and add to its logs), on any page."""
    plain = _store_names(PAGES, pretrained=False)
    ssp = _store_names(PAGES, pretrained=True)
    assert len(ssp) >= 5 and len(plain) >= 10
    assert {name: argv for name, argv in ssp.items() if name in plain} == {}


PARSERS = {'train.py': train.build_parser, 'train_semi.py': train_semi.build_parser,
           'gen_pseudolabels.py': gen_pseudolabels.build_parser, 'pretrain_rot.py': pretrain_rot.build_rot_parser,
           'pretrain_moco.py': pretrain_moco.build_parser, 'train_stage2.py': train_stage2.build_parser,
           'train_ssl.py': train_ssl.build_parser, '-m imagenet_inat.main': imagenet_main.build_parser}


def test_every_pages_script_command_parses():
    """Each `python <script>` command of every page (README.md, docs/*.md), its <placeholders> filled, is taken by
    that script's parser: a flag renamed or a command that lost a word while moving between pages fails here, also
    for the commands no other test runs (ImageNet-LT / iNaturalist, several GPUs, placeholders)."""
    found = [(page, ['-m ' + w[2], *w[3:]] if w[1] == '-m' else w[1:]) for page in PAGES
             for w in documented(page, fill=True) if w[0] == 'python']
    found = [(page, words) for page, words in found if words[0] in PARSERS]
    assert len(found) >= 60 and {words[0] for _, words in found} == set(PARSERS)
    for page, words in found:
        try:
            PARSERS[words[0]]().parse_args(words[1:])
        except SystemExit:
            pytest.fail(f'{page}: python {words[0]} {shlex.join(words[1:])} does not parse')


def test_readme_commands_are_the_pages_commands():
    """Every `python` command of the README outside its Quick start is, word for word, a command of a docs/ page,
    where the tests of this file find it (the README is the landing page; the pages hold the commands)."""
    with open(os.path.join(REPO, 'README.md')) as f:
        text = f.read()
    quick = text.split('## Quick start', 1)[1].split('\n## ', 1)[0]
    page_commands = [w for page in PAGES[1:] for w in documented(page)]
    readme = [w for w in documented('README.md') if w[0] == 'python']
    in_quick_start = [w for body in re.findall(r'```bash\n(.*?)```', quick, flags=re.S)
                      for w in (shlex.split(line, comments=True) for line in body.replace('\\\n', ' ').splitlines())
                      if w and w[0] == 'python']
    others = [w for w in readme if w not in in_quick_start]
    assert len(others) >= 20
    assert [shlex.join(w) for w in others if w not in page_commands] == []


def _slurm_section():
    """docs/reproduce.md's `python reproduce.py` commands of its SLURM section, and its other commands."""
    with open(os.path.join(REPO, 'docs', 'reproduce.md')) as f:
        text = f.read()
    section = text[text.index('### SLURM: `--launcher slurm`'):text.index('### The miniature')]
    commands = []
    for body in re.findall(r'```bash\n(.*?)```', section, flags=re.S):
        for line in body.replace('\\\n', ' ').splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def test_reproduce_md_slurm_worked_example(cifar_data, fake_slurm, capsys):
    """docs/reproduce.md "SLURM", as written (one seed, --seeds 0 appended, for time): the dry run prints
    every job, the submission queues one job per stage and the results job, --status prints each stage."""
    slurm = [w[2:] for w in _slurm_section() if w[:2] == ['python', 'reproduce.py'] and 'slurm' in w]
    assert [('--dry-run' in a, '--status' in a) for a in slurm] == [(True, False), (False, False), (False, True)]
    dry, submit, status = ([*a, '--seeds', '0'] for a in slurm)
    assert reproduce.main(dry) == 0
    out = capsys.readouterr().out
    assert out.count('# stage ') == 15 and out.count('; job: 1 GPU, time 1440 min, partition gpu, cpus-per-task 8, '
                                                      'mem 32G') == 15
    assert reproduce.main(submit) == 0
    assert '15 job(s) submitted, 0 already queued' in capsys.readouterr().out
    assert sorted(os.listdir(fake_slurm)) == sorted(['calls', 'next', *(f'job{n}.sh' for n in range(100, 116))])
    assert reproduce.main(status) == 0
    assert capsys.readouterr().out.rstrip().endswith('15 stages: 15 to submit; the same command without --status '
                                                     'runs what is neither done nor queued')  # no squeue lists them


def test_reproduce_md_multi_node_torchrun_parses():
    """The multi-node job script's torchrun line: its flags as torchrun reads them, the script's as it does."""
    from torch.distributed.run import get_args_parser
    (srun,) = [w for w in _slurm_section() if w[:2] == ['srun', 'torchrun']]
    args = get_args_parser().parse_args(shlex.split(' '.join(srun[2:]).replace('<ImageNet root>', 'IN')))
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.shutdown_timeout) == ('2', '8', 'c10d', 300)
    assert args.rdzv_endpoint == '$head:29500' and args.training_script == 'pretrain_moco.py'
    moco = pretrain_moco.build_parser().parse_args(args.training_script_args)
    assert (moco.dataset, moco.batch_size) == ('imagenet', 128)  # a node's batch: 16 per GPU, as the recipe's


def test_every_reproduce_md_command_parses():
    """Each `python reproduce.py` command of docs/reproduce.md and of every other page (README.md, docs/*.md),
    its placeholders filled: reproduce.py's parser takes it, with a known table and launcher."""
    from repro import command
    from repro.tables import TABLES
    found = []
    for page in PAGES:
        with open(os.path.join(REPO, page)) as f:
            found += [shlex.split(re.sub(r'<[^>]*>', 'PLACE', line), comments=True)[2:] for line in f
                      if line.startswith('python reproduce.py')]
    assert len(found) >= 30
    for argv in found:
        args = command.build_parser().parse_args(argv)
        assert args.table in TABLES and command.parse_launcher(args.launcher)[0] in ('local', 'slurm',
                                                                                  'submitit-local')
