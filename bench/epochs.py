"""One epoch of train.py, train_semi.py and pretrain_rot.py, this repository's against the 2020 original's,
as whole processes alternating (ours, original, ours, original, ...) in one run, with their phases.

    python bench/epochs.py --original /tmp/orig [--repeats 2] [--only train,semi,rot] [--data DIR] [--pool N]
                           [--threads N] [--ours DIR]

--original: a working copy of YyzHarry/imbalanced-semi-self laid out by ../shared/original/prepare_ref.sh
(it runs here with bench/phases.py's CPU shims, the ones ../shared/original/README.md describes, and
`-j 2`: its default workers oversubscribe two cores). Its Python is --original-python (default: this one;
it needs torch, torchvision, numpy, tensorboardX, scipy, scikit-learn, matplotlib, as this repository).

The data set is synthetic, in the real file formats at full size: CIFAR-10 (5,000 training and 1,000 test
images per class, so `--imb_factor 0.01` keeps 12,406 images and 0.02 keeps 13,996), the TinyImages
selection `ti_80M_selected.pickle` (--pool images, default 500,000 as the authors' file, balanced over
the sourcing labels) and `pseudo_labeled_cifar.pickle` (pseudo-labels equal to the sourcing labels).
--data keeps it in DIR for the next run (written once); otherwise a temporary folder.

The commands are the ones ../shared/original/README.md times (defaults, one epoch, --seed 0):
  train    train.py --dataset cifar10 --imb_factor 0.01 --epochs 1 --seed 0
  semi     train_semi.py --dataset cifar10 --imb_factor 0.02 --imb_factor_unlabel 0.02 --epochs 1 --seed 0
  rot      pretrain_rot.py --dataset cifar10 -a resnet32 --imb_factor 0.01 --epochs 1 --seed 0
Each run prints its wall time and CPU seconds (the process and its children: the original's loader
workers), each split into phases (bench/phases.py: start-up to the first training step, training,
evaluation, writing, and the rest: teardown, worker shutdown), and the load average before it started.
The table at the end takes, per script and side, the fastest repeat; the ratio is the original's wall
time over ours (and its CPU seconds over ours). Wall ratios mean little unless the machine is otherwise
idle: record the load beside them (bench/README.md). On a busy machine, `--threads 1` makes the CPU
seconds a fair measure of each side's work (no OpenMP thread spins waiting for a descheduled one).
"""
import argparse
import json
import os
import pickle
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, 'tests'))
import fixtures  # noqa: E402

COMMON = ['--dataset', 'cifar10', '--epochs', '1', '--seed', '0']
SCRIPTS = {
    'train': ('train.py', ['--imb_factor', '0.01']),
    'semi': ('train_semi.py', ['--imb_factor', '0.02', '--imb_factor_unlabel', '0.02']),
    'rot': ('pretrain_rot.py', ['-a', 'resnet32', '--imb_factor', '0.01']),
}
PHASES = ('start-up', 'training', 'evaluation', 'writing', 'rest')


def write_pool(root, size, chunk=20000):
    """ti_80M_selected.pickle (size images, balanced sourcing labels) and pseudo_labeled_cifar.pickle,
    written in chunks: the fixtures' float64 noise for 500,000 images at once would take 12 GB."""
    labels = fixtures.shuffled_labels(size // 10, 10, seed=7)
    data = np.empty((len(labels), 32, 32, 3), dtype=np.uint8)
    for start in range(0, len(labels), chunk):
        data[start:start + chunk] = fixtures.class_images(labels[start:start + chunk], seed=start)
    with open(os.path.join(root, 'ti_80M_selected.pickle'), 'wb') as f:
        pickle.dump({'data': data, 'extrapolated_targets': labels}, f, protocol=4)
    fixtures.write_pseudo_labels(os.path.join(root, 'pseudo_labeled_cifar.pickle'), labels)


def prepare(root, pool):
    stamp = os.path.join(root, f'.bench-epochs-{pool}')
    if os.path.exists(stamp):
        return
    os.makedirs(root, exist_ok=True)
    print(f"writing the synthetic CIFAR-10 and a {pool:,}-image pool into {root} ...", flush=True)
    fixtures.write_cifar10(root, per_class=5000, test_per_class=1000)
    write_pool(root, pool)
    open(stamp, 'w').close()


def run_once(side, name, args, root, work):
    """Wall seconds, phases, CPU seconds and load average of one whole process."""
    script, extra = SCRIPTS[name]
    run_dir = tempfile.mkdtemp(dir=work)
    os.makedirs(os.path.join(run_dir, 'log'))
    os.makedirs(os.path.join(run_dir, 'ckpt'))
    out = os.path.join(run_dir, 'phases.json')
    where, python = (args.original, args.original_python) if side == 'original' else (args.ours, sys.executable)
    cmd = [python, os.path.join(HERE, 'phases.py'), side, where, script, out, '--',
           *COMMON, *extra, '--data_path', root, '--root_log', os.path.join(run_dir, 'log'),
           '--root_model', os.path.join(run_dir, 'ckpt'), *(['-j', '2'] if side == 'original' else [])]
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    launch = time.time()
    env = {**os.environ, 'BENCH_LAUNCH': repr(launch)}
    if args.threads:
        env['OMP_NUM_THREADS'] = str(args.threads)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - launch
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{side} {script} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(out) as f:
        calls = json.load(f)['calls']
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    first = min((c for c in calls if c[0] == 'training'), key=lambda c: c[1])
    phases, cpu_phases = dict.fromkeys(PHASES, 0.0), dict.fromkeys(PHASES, 0.0)
    phases['start-up'], cpu_phases['start-up'] = first[1] - launch, first[3]
    for phase, start, end, cpu_start, cpu_end in calls:
        phases[phase] += end - start
        cpu_phases[phase] += cpu_end - cpu_start
    phases['rest'] = wall - sum(phases.values())
    cpu_phases['rest'] = cpu - sum(cpu_phases.values())
    return {'wall': wall, 'phases': phases, 'cpu': cpu, 'cpu_phases': cpu_phases, 'load': load}


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def fmt(run):
    phases = ', '.join(f"{p} {run['phases'][p]:.1f} / {run['cpu_phases'][p]:.1f}" for p in PHASES)
    return f"wall / CPU s: {run['wall']:.1f} / {run['cpu']:.1f} ({phases}); load before {run['load']:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--original', metavar='DIR', help="the original's working copy (left out: ours alone)")
    parser.add_argument('--original-python', default=sys.executable, metavar='PYTHON')
    parser.add_argument('--ours', default=REPO, metavar='DIR',
                        help='the checkout of this repository to time (default: this one), e.g. an earlier commit '
                             'laid out by `git archive`')
    parser.add_argument('--repeats', type=int, default=2, help='runs per script and side, alternating')
    parser.add_argument('--only', default='train,semi,rot', help='comma-separated: train, semi, rot')
    parser.add_argument('--data', default=None, metavar='DIR', help='keep the synthetic data here')
    parser.add_argument('--pool', type=int, default=500000, help='images in the synthetic TinyImages pool')
    parser.add_argument('--threads', type=int, default=None,
                        help='OMP_NUM_THREADS for both sides (default: unset, each uses its defaults); on a busy '
                             'machine --threads 1 makes the CPU seconds a fair measure of the work')
    args = parser.parse_args()
    names = [n for n in args.only.split(',') if n]
    for n in names:
        if n not in SCRIPTS:
            parser.error(f"--only: unknown script {n!r} (train, semi, rot)")
    sides = ('ours', 'original') if args.original else ('ours',)
    args.original, args.ours = args.original and os.path.abspath(args.original), os.path.abspath(args.ours)
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}; python "
          f"{platform.python_version()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
          + (f"; OMP_NUM_THREADS={args.threads}" if args.threads else ''), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.abspath(args.data) if args.data else os.path.join(tmp, 'data')
        prepare(root, args.pool)
        results = {(n, side): [] for n in names for side in sides}
        for r in range(args.repeats):
            for n in names:
                for side in sides:
                    run = run_once(side, n, args, root, tmp)
                    results[n, side].append(run)
                    print(f"  [{r + 1}] {side:8s} {SCRIPTS[n][0]:15s} {fmt(run)}", flush=True)

    print(f"\nwall seconds / CPU seconds (this process and its children), the fastest repeat by wall time; "
          f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n| one epoch | side | total | " + ' | '.join(PHASES) + " | load | original / ours, wall (CPU) |")
    print("| --- | --- | ---: | " + ' | '.join('---:' for _ in PHASES) + " | ---: | ---: |")
    for n in names:
        best = {side: min(results[n, side], key=lambda run: run['wall']) for side in sides}
        for side in sides[::-1]:
            run = best[side]
            ratio = (f"**{best['original']['wall'] / run['wall']:.2f}x** ({best['original']['cpu'] / run['cpu']:.2f}x)"
                     if side == 'ours' and 'original' in best else '')
            print(f"| `{SCRIPTS[n][0]}` | {side} | {run['wall']:.1f} / {run['cpu']:.1f} | "
                  + ' | '.join(f"{run['phases'][p]:.1f} / {run['cpu_phases'][p]:.1f}" for p in PHASES)
                  + f" | {run['load']:.1f} | {ratio} |")
    if args.repeats > 1:
        # Two OpenMP threads on two cores stall when another process takes one core: a phase may then
        # take several times as long (bench/README.md). The fastest of each phase over the repeats,
        # summed, is what an idle machine would show.
        print("\nSums of each phase's fastest repeat (wall seconds):\n")
        print("| one epoch | original | ours | original / ours |")
        print("| --- | ---: | ---: | ---: |")
        for n in names:
            sums = {side: sum(min(run['phases'][p] for run in results[n, side]) for p in PHASES) for side in sides}
            ratio = f"**{sums['original'] / sums['ours']:.2f}x**" if 'original' in sums else ''
            print(f"| `{SCRIPTS[n][0]}` | {sums.get('original', float('nan')):.1f} | {sums['ours']:.1f} | {ratio} |")


if __name__ == '__main__':
    main()
