"""What an evaluation writes and how it is read back: the original's log lines (`report_lines`), their
reader (`read_test_log`), the per-class plot and `_log_eval`, which puts one evaluation into log_test.csv,
tensorboard and the console.

Separate from the run loop because the format is a contract with the original's logs: repro/ and the tests
read logs with the same reader that matches the writer here.
"""
import json
import os
import re
import sys

import numpy as np

from errors import UserError
from fileio import atomic_write_bytes
from trainer.run_folder import warn
from utils import figure_png, new_figure, shot_accuracy


def report_lines(metrics, cls_num_list=None, flag='val', task='classification'):
    """The original's two log lines (results, per-class accuracy) plus shot-group accuracy."""
    name = 'Rotation Prec' if task == 'rotation' else 'Prec'
    lines = [f"{flag} Results: {name}@1 {metrics['top1']:.3f} {name}@5 {metrics['top5']:.3f} "
             f"Loss {metrics['loss']:.5f}",
             # every class, also above numpy's 1,000-element summary threshold ('...'), which no reader can parse
             f"{flag} Class Accuracy: " + np.array2string(
                 metrics['per_class'], separator=',', formatter={'float_kind': lambda x: '%.3f' % x},
                 threshold=sys.maxsize)]
    if cls_num_list is not None and task == 'classification':
        shots = shot_accuracy(metrics['per_class'], cls_num_list)
        metrics.update({f'{k}_shot': v for k, v in shots.items()})
        lines.append(f"{flag} Shot Accuracy: Many {100 * shots['many']:.3f} Medium {100 * shots['medium']:.3f} "
                     f"Few {100 * shots['few']:.3f}")
    return lines


_RESULTS = re.compile(r'(\w+) Results: (?:Rotation )?Prec@1 (\S+) (?:Rotation )?Prec@5 (\S+) Loss (\S+)$')
_SHOTS = re.compile(r'\w+ Shot Accuracy: Many (\S+) Medium (\S+) Few (\S+)$')
_BEST = re.compile(r'Best (?:Rotation )?Prec@1: (\S+)$')


def read_test_log(path):
    """Every evaluation in a `log_test.csv` written by `_log_eval` (or by the original's train.py), in
    order: dicts of 'top1', 'top5', 'loss', 'per_class' (fractions; NaN for a class absent from the test
    set), 'shots' ((many, medium, few) in %, or None) and 'best' (the best top-1 so far, or None).

    np.array2string wraps the per-class line every 75 characters (more than 12 classes), in the
    original's logs too: its continuation lines are joined back. Anything else unexpected is a
    UserError naming the file, the line and what was expected."""
    with open(path) as f:
        lines = f.read().splitlines()
    records, i = [], 0

    def fail(what):
        raise UserError(f"{path} line {i + 1}: expected {what}, found {lines[i][:60]!r}; "
                        f"is it a log_test.csv of train.py / train_semi.py?")

    def number(text, what):
        try:
            return float(text)
        except ValueError:
            fail(what)

    while i < len(lines):
        line = lines[i]
        m = _RESULTS.match(line)
        if m:
            records.append({'top1': number(m[2], 'a Prec@1 number'), 'top5': number(m[3], 'a Prec@5 number'),
                            'loss': number(m[4], 'a loss'), 'per_class': None, 'shots': None, 'best': None})
        elif ' Class Accuracy: [' in line:
            start, text = i, line.split(': ', 1)[1]
            while not text.rstrip().endswith(']') and i + 1 < len(lines):
                i += 1
                text += lines[i].strip()
            if not records or not text.rstrip().endswith(']'):
                i = start
                fail("a 'Class Accuracy: [...]' list after a 'Results:' line")
            records[-1]['per_class'] = np.array([number(v, 'per-class accuracies') for v in
                                                 text.strip().strip('[]').split(',') if v.strip()])
        elif _SHOTS.match(line) and records:
            records[-1]['shots'] = tuple(number(v, 'shot accuracies') for v in _SHOTS.match(line).groups())
        elif _BEST.match(line) and records:
            records[-1]['best'] = number(_BEST.match(line)[1], 'a best Prec@1')
        elif line.strip() and not line.startswith(('val Confusion Matrix:', 'test Confusion Matrix:')):
            fail("'Results:', 'Class Accuracy:', 'Shot Accuracy:', 'Best Prec@1:' or 'Confusion Matrix:'")
        i += 1
    return records


def per_class_plot(per_class, cls_num_list, title):
    """PNG bytes: per-class accuracy (bars) against training images per class (line). Redrawn every
    epoch, so kept cheap: fixed margins (tight_layout cost as much as the drawing), the bars as one
    outline (`stairs`, not an artist per class), at most 24 inches wide (at 0.12 in per class, 8,142
    classes made a 78,163 px wide image that took 6 s to draw)."""
    n = len(per_class)
    width, height = min(24.0, max(6.0, n * 0.12)), 3.5
    fig = new_figure((width, height))
    ax = fig.add_axes((0.8 / width, 0.5 / height, 1 - 1.6 / width, 1 - 0.85 / height))
    ax.stairs(100 * np.nan_to_num(per_class), np.arange(n + 1) - 0.5, fill=True, color='tab:blue')
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_xlabel('class (sorted by training images)' if n > 20 else 'class')
    ax.set_ylabel('test accuracy (%)', color='tab:blue')
    ax.set_ylim(0, 100)
    ax2 = ax.twinx()
    ax2.plot(np.arange(n), cls_num_list, color='tab:red', marker='.' if n <= 100 else None)
    ax2.set_ylabel('training images', color='tab:red')
    ax.set_title(title)
    return figure_png(fig, dpi=80)


def _log_eval(folder, metrics, exp, epoch, best_acc1, main, confusion=False):
    """An evaluation into log_test.csv (the original's lines, the confusion matrix as one JSON line),
    tensorboard and the console; `confusion`: the matrix on the console too. Above
    engine.CONFUSION_MAX_CLASSES classes there is no matrix."""
    lines = report_lines(metrics, exp.cls_num_list, 'val', exp.task)
    lines.append(f"Best Prec@1: {best_acc1:.3f}" if exp.task == 'classification'
                 else f"Best Rotation Prec@1: {best_acc1:.3f}")
    if not main:
        return
    for line in lines:
        print(line, flush=True)
        folder.write('log_test.csv', line)
    cm = metrics['confusion']
    if cm is not None:
        # One line in the log (rows: true class), however many classes.
        folder.write('log_test.csv', 'val Confusion Matrix: ' + json.dumps(cm.tolist(), separators=(',', ':')))
        if confusion:
            print('val Confusion Matrix (rows: true class, columns: prediction):\n' +
                  np.array2string(cm, max_line_width=200, threshold=10 ** 6), flush=True)
        folder.image('confusion_matrix', cm / np.maximum(cm.sum(axis=1, keepdims=True), 1), epoch)
    tag = 'rot_acc' if exp.task == 'rotation' else 'acc'
    per_class = np.nan_to_num(metrics['per_class'])
    folder.scalars(f'{tag}/test_val_cls_acc', {str(i): float(a) for i, a in enumerate(per_class)}, epoch)
    folder.scalar('loss/test', metrics['loss'], epoch)
    folder.scalar(f'{tag}/test_top1', metrics['top1'], epoch)
    folder.scalar(f'{tag}/test_top5', metrics['top5'], epoch)
    folder.scalar(f'{tag}/test_top1_best', best_acc1, epoch)
    for group in ('many', 'medium', 'few'):
        if f'{group}_shot' in metrics and np.isfinite(metrics[f'{group}_shot']):
            folder.scalar(f'{tag}/test_{group}_shot', 100 * metrics[f'{group}_shot'], epoch)
    counts = exp.cls_num_list if exp.task == 'classification' else [0] * exp.num_classes
    png = per_class_plot(metrics['per_class'], counts, f'epoch {epoch + 1}: top-1 {metrics["top1"]:.2f}%')
    try:
        atomic_write_bytes(os.path.join(folder.log_dir, 'per_class_acc.png'), png)
    except UserError as e:
        warn(f"{e}; training goes on")
