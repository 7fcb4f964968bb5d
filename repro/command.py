"""One command per table of the paper: every stage of every cell, in order, resumable, and the results
written beside the paper's numbers.

    python reproduce.py --table cifar10-semi --data_path ./data --seeds 0 1 2
    python reproduce.py --table cifar10-ssp --dry-run                 # print every command, run nothing
    python reproduce.py --table cifar100-ssp --launcher "torchrun --nproc_per_node=8"
    python reproduce.py --table digits-mini                           # offline miniature, CPU, < 15 min
    python reproduce.py --table cifar10-semi --collect                # re-make the results from the run folders
    python reproduce.py --table cifar10-ssp --epochs 1 --stage-args="-a resnet20 -b 16 -j 0"   # smoke run
    python reproduce.py --table cifar10-ssp --gpus 0,1,2,3            # four stages at a time, one per GPU
    python reproduce.py --table digits-mini --jobs 2                  # two stages at a time on the CPUs

A table is a list of cells (its rows), a cell an ordered list of stages, a stage one command line of
train.py, gen_pseudolabels.py, train_semi.py, pretrain_rot.py, pretrain_moco.py or
`python -m imagenet_inat.main`. A stage that several cells need (one base model and one pseudo-label
file per seed for all rho_U; one rotation pre-training per seed and rho for both SSP cells) runs once.
A stage whose final artefact exists is skipped, one that stopped half-way is resumed from its
checkpoint, so running the same command again continues where it stopped. A stage needs the stages
whose outputs its flags name; with --jobs or --gpus, stages that do not need each other run side by
side, each one's output going to its log file in <out>/runs/<table>/stage_logs/.

Run folders go to <out>/runs/<table>/, results to <out>/<table>.md, .csv and .png (rebuilt after
every seed and at the end, so an interrupted table shows what is finished). --collect, --dry-run and
a resumed run must get the same --seeds, --epochs, --schedule, --rand_number and --stage-args as the
run they refer to: these decide the run folders' names.
"""
import argparse
import os
import shlex

import cli
from errors import UserError
from repro import scheduler
from repro.results import summarize, write_results
from repro.scripts import SCRIPTS, launcher_processes
from repro.tables import SCHEDULES, TABLES, Options


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
                                                        'interpreter, e.g. "torchrun --nproc_per_node=8"; stages '
                                                        'then run one at a time')
    parser.add_argument('--jobs', type=cli.positive_int, default=1, metavar='N',
                        help='run up to N independent stages at the same time on the CPUs, the CPU threads split '
                             'between them (default: 1, one stage after the other)')
    parser.add_argument('--gpus', default=None, metavar='IDS',
                        help='comma-separated GPU ids, e.g. 0,1,2,3: independent stages run at the same time, each '
                             'process seeing only its GPU')
    parser.add_argument('--jobs-per-gpu', type=cli.positive_int, default=1, metavar='K',
                        help='with --gpus: up to K stages on each GPU at a time (default: 1; whether more pays '
                             'off for ResNet-32 is not measured yet, bench/README.md)')
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


def slots(args):
    """Where the stages run: one slot each for as many stages as may run at the same time."""
    if args.launcher and (args.gpus is not None or args.jobs > 1):
        raise UserError("--launcher starts every stage on all of the machine's GPUs, one stage at a time: "
                        "use either --launcher or --gpus / --jobs")
    if args.gpus is None:
        if args.jobs_per_gpu != 1:
            raise UserError("--jobs-per-gpu counts stages per GPU of --gpus: give --gpus too")
        return scheduler.cpu_slots(args.jobs)
    if args.jobs != 1:
        raise UserError("--jobs counts stages on the CPUs; with --gpus, --jobs-per-gpu sets the stages per GPU")
    words = [w.strip() for w in args.gpus.split(',')]
    if not all(w.isdigit() for w in words) or len(set(words)) != len(words):
        raise UserError(f"--gpus {args.gpus!r}: expected distinct GPU ids separated by commas, e.g. 0,1,2")
    import torch
    if not torch.cuda.is_available():
        raise UserError(f"--gpus {args.gpus}: torch sees no CUDA GPU on this machine; leave --gpus out "
                        f"(--jobs N runs stages side by side on the CPUs)")
    count = torch.cuda.device_count()
    missing = [w for w in words if int(w) >= count]
    if missing:
        raise UserError(f"--gpus {args.gpus}: there is no GPU {missing[0]}; torch sees {count} "
                        f"(ids 0 to {count - 1})")
    return scheduler.gpu_slots([int(w) for w in words], args.jobs_per_gpu)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.table not in TABLES:
        raise UserError(f"unknown table {args.table!r}; choose one of {', '.join(TABLES)}")
    table, seeds = TABLES[args.table], parse_seeds(args.seeds)
    where = slots(args)
    opts = Options(args.table, args.data_path, args.out, args.epochs, args.schedule, args.rand_number,
                   parse_stage_args(args.stage_args))
    keys = [c.key for c in table.build(opts, seeds[0])]
    unknown = [k for k in args.cells or () if k not in keys]
    if unknown:
        raise UserError(f"unknown cell {unknown[0]!r} for table {args.table}; choose from {', '.join(keys)}")
    cells, stages = plan(table, opts, seeds, args.cells)
    launcher = shlex.split(args.launcher)

    def collect():
        return write_results(args.table, table, opts, seeds, summarize(table, cells, seeds))

    if args.collect:
        print(collect())
        return 0
    if args.dry_run:
        for i, stage in enumerate(stages, 1):
            status = stage.status()
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
    at_once = f", up to {len(where)} at a time ({', '.join(s.name for s in where)})" if len(where) > 1 else ''
    print(f"[reproduce] {args.table}: {len(stages)} stages for {len(cells[seeds[0]])} cells x {len(seeds)} seeds"
          f"{at_once}", flush=True)
    by_seed = [{s for c in cells[seed] for s in c.stages} for seed in seeds]

    def finished(stage, done):  # the results are re-made when all of a seed's stages have finished
        if any(stage in needed and needed <= done for needed in by_seed):
            collect()

    message = ''
    try:
        code, message = scheduler.run_stages(stages, where, launcher, opts.stage_log, finished)
    finally:
        print(collect(), flush=True)
        if message:
            print(message, flush=True)
    return code
