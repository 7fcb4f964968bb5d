"""What a user reads (issue 34 items 5 and 6): --help with every default, in groups; an argument error as one
`error:` line with a "did you mean"; the training console's epoch count, times with units, ETA, confusion
matrix on request and closing summary, while the log files keep the original's lines."""
import os
import re
import subprocess
import sys

import pytest

import cli
import fixtures
import gen_pseudolabels
import pretrain_moco
import pretrain_rot
import train
import train_semi
import train_stage2
from fixtures import REPO
from imagenet_inat import main as ii_main

PARSERS = {'train.py': train.build_parser, 'train_semi.py': train_semi.build_parser,
           'train_stage2.py': train_stage2.build_parser, 'pretrain_rot.py': pretrain_rot.build_rot_parser,
           'pretrain_moco.py': pretrain_moco.build_parser, 'gen_pseudolabels.py': gen_pseudolabels.build_parser,
           'imagenet_inat': ii_main.build_parser}


@pytest.mark.parametrize('script', PARSERS)
def test_help_shows_every_default(script):
    """Every flag with a value by default says it in --help (the trial found 25 of 40 train.py flags without),
    once."""
    parser = PARSERS[script]()
    entries = re.split(r'\n(?=  -)', parser.format_help())  # one per flag: its invocation, then its help
    for action in parser._actions:
        if cli.default_text(action) is None:
            continue
        entry = next(e for e in entries if e.startswith('  ' + action.option_strings[0]))
        assert entry.split('\n\n')[0].count('default') == 1, entry


def test_help_groups_the_flags():
    text = train.build_parser().format_help()
    titles = re.findall(r'^(\w[\w ]*?)(?: \(.*\))?:$', text, flags=re.M)
    assert titles[titles.index('data'):] == ['data', 'model and method', 'schedule', 'run and output', 'speed',
                                             'distributed', 'recipe options']
    section = text.split('\nschedule:\n')[1].split('\n\n')[0]
    assert '--epochs N' in section and '-b N, --batch-size N' in section and '(default: 200)' in section
    for flag, default in (('--dataset', 'cifar10'), ('--imb_factor', '0.01'), ('--lr LR', '0.1'), ('-j N', '4'),
                          ('--loss_type', 'CE'), ('--train_rule', 'None'), ('--exp_str', 'ss_pretrained'),
                          ('--root_log', 'log'), ('--root_model', './checkpoint')):
        (entry,) = [e for e in re.split(r'\n(?=  -)', text) if e.startswith('  ' + flag)]
        assert f'(default: {default}' in ' '.join(entry.split()), flag


def test_an_argument_error_is_one_line():
    """As a user runs it: one line on stderr, exit status 2, no usage block (that is --help's). (Every other
    argument error of the catalogue: tests/test_bad_input.py, in-process.)"""
    proc = subprocess.run([sys.executable, 'train.py', '--dataset', 'digits', '--imb_factr', '0.01'], cwd=REPO,
                          env=fixtures.script_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ''
    assert proc.stderr.splitlines() == ['error: unrecognized arguments: --imb_factr 0.01; did you mean --imb_factor?']
    parser = train.build_parser()
    assert parser.suggestion("argument --dataset: invalid choice: 'cifar-10' (choose from 'cifar10', 'cifar100', "
                             "'svhn', 'digits', 'folder')") == '; did you mean cifar10?'
    assert parser.suggestion("argument --epochs: '0' is not a positive integer") == ''
    assert parser.suggestion('unrecognized arguments: --zzz') == ''


ARGV = ['--dataset', 'digits', '--imb_factor', '0.1', '-a', 'resnet20', '-b', '32', '-j', '0', '--seed', '1',
        '--epochs', '2', '-p', '2']
NAME = 'digits_resnet20_CE_None_exp_0.1_ss_pretrained'


def test_console_and_logs(tmp_path, capsys, one_thread, small_digits):
    """The console counts epochs from 1 of --epochs, gives the time since the last line in seconds and an
    ETA, prints the confusion matrix only when asked, and ends with a summary (last and best top-1 with its
    epoch, last shot groups, where the files are); log_train.csv / log_test.csv keep the original's lines
    (0-based epochs, no times) that reproduce.py and users' parsers read."""
    argv = ARGV + ['--root_log', str(tmp_path / 'log'), '--root_model', str(tmp_path / 'ckpt')]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    steps = [line for line in out.splitlines() if line.startswith('Epoch')]
    assert [line.split(',')[0] for line in steps] == [f'Epoch: [{e}/2][{s}/4]' for e in (1, 2) for s in (2, 4)]
    assert all(re.search(r'\tTime \d+\.\d{3} s\tETA \d+:\d\d:\d\d$', line) for line in steps), steps
    assert steps[-1].endswith('ETA 0:00:00')
    assert 'Confusion' not in out
    log = (tmp_path / 'log' / NAME / 'log_train.csv').read_text().splitlines()
    assert [line.split(',')[0] for line in log] == [f'Epoch: [{e}][{s}/4]' for e in (0, 1) for s in (2, 4)]
    assert all(re.fullmatch(r'Epoch: \[\d\]\[\d/4\], lr: \d\.\d{5}\tLoss \S+ \(\S+\)\tPrec@1 \S+ \(\S+\)\t'
                            r'Prec@5 \S+ \(\S+\)', line) for line in log), log
    import trainer
    evaluations = trainer.read_test_log(str(tmp_path / 'log' / NAME / 'log_test.csv'))
    top1 = [e['top1'] for e in evaluations]
    best = max(top1)
    many, medium, few = evaluations[-1]['shots']
    assert (f"=> done, 2 epochs: last top-1 {top1[-1]:.3f}, best {best:.3f} (epoch {top1.index(best) + 1}); last "
            f"epoch many / medium / few-shot {many:.3f} / {medium:.3f} / {few:.3f}") in out
    ckpt = os.path.join(str(tmp_path / 'ckpt'), NAME, 'ckpt.pth.tar')
    assert f"=> checkpoints: {ckpt} (last)" in out
    assert train.main(argv + ['--exp_str', 'cm', '--confusion']) == 0
    printed = capsys.readouterr().out
    assert printed.count('val Confusion Matrix (rows: true class, columns: prediction):') == 2
    cm_log = (tmp_path / 'log' / 'digits_resnet20_CE_None_exp_0.1_cm' / 'log_test.csv').read_text()
    assert cm_log.count('val Confusion Matrix: [[') == 2  # in the log either way, one JSON line an evaluation
