"""One command per table of the paper: every stage of every cell, in order, resumable, and the results
written beside the paper's numbers.

    python reproduce.py --table cifar10-semi --data_path ./data --seeds 0 1 2
    python reproduce.py --table cifar10-ssp --dry-run                 # print every command, run nothing
    python reproduce.py --table cifar100-ssp --launcher "torchrun --nproc_per_node=8"
    python reproduce.py --table digits-mini                           # offline miniature, CPU, < 15 min
    python reproduce.py --table cifar10-semi --collect                # re-make the results from the run folders
    python reproduce.py --table cifar10-ssp --epochs 1 --stage-args="-a resnet20 -b 64 -j 0"   # smoke run
    python reproduce.py --table cifar10-ssp --gpus 0,1,2,3            # four stages at a time, one per GPU
    python reproduce.py --table digits-mini --jobs 2                  # two stages at a time on the CPUs
    python reproduce.py --table cifar10-ssp --launcher slurm --slurm_partition gpu   # every stage a SLURM job
    python reproduce.py --table cifar10-ssp --launcher slurm --status # where each stage is; submits nothing

A table is a list of cells (its rows), a cell an ordered list of stages, a stage one command line of
train.py, gen_pseudolabels.py, train_semi.py, pretrain_rot.py, pretrain_moco.py or
`python -m imagenet_inat.main`. A stage that several cells need (one base model and one pseudo-label
file per seed for all rho_U; one rotation pre-training per seed and rho for both SSP cells) runs once.
A stage whose final artefact exists is skipped, one that stopped half-way is resumed from its
checkpoint, so running the same command again continues where it stopped. A stage needs the stages
whose outputs its flags name; with --jobs or --gpus, stages that do not need each other run side by
side, each one's output going to its log file in <out>/runs/<table>/stage_logs/. With --launcher
slurm every stage is a SLURM job (submitit), held until the jobs of the stages it needs have ended
well, and a last job writes the table (docs/reproduce.md "SLURM").

Run folders go to <out>/runs/<table>/, results to <out>/<table>.md, .csv and .png (rebuilt after
every seed and at the end, so an interrupted table shows what is finished; the default <out>,
results/local/, is one git ignores: --out results re-makes the committed tables). --collect,
--status, --dry-run and a resumed run must get the same --seeds, --epochs, --schedule, --rand_number
and --stage-args as the run they refer to: these decide the run folders' names.
"""
import argparse
import difflib
import os
import shlex

import cli
from errors import UserError
from repro import launchers, scheduler
from repro.results import summarize, write_results
from repro.scripts import REPO, SCRIPTS, launcher_processes
from repro.tables import SCHEDULES, TABLES, Options

DEFAULT_OUT = os.path.join('results', 'local')  # git ignores it: a run never rewrites the committed results/


def plan(table, opts, seeds, only=None):
    """{seed: [Cell]} (restricted to `only` cell keys) and the unique stages in running order."""
    cells = {seed: [c for c in table.build(opts, seed) if only is None or c.key in only] for seed in seeds}
    stages = list(dict.fromkeys(s for seed in seeds for c in cells[seed] for s in c.stages))
    return cells, stages


def collect(name, opts, seeds, only, refuse_empty=True):
    """Write <out>/<name>.md, .csv and .png from the run folders; returns the markdown. A table with no
    finished cell never replaces an existing one (the committed results, a longer run's): refused in
    one line with `refuse_empty` (--collect), else said in one line instead of the markdown."""
    table = TABLES[name]
    cells, _ = plan(table, opts, seeds, only)
    rows = summarize(table, cells, seeds)
    existing = [p for p in (os.path.join(opts.out, f'{name}.{ext}') for ext in ('md', 'csv', 'png'))
                if os.path.exists(p)]
    if existing and not any(r['n'] for r in rows):
        why = (f"no cell of {name} has finished in {opts.path()} (for these --seeds, --epochs, --schedule, "
               f"--rand_number, --stage-args and --cells), so {existing[0]} is left as it is")
        if refuse_empty:
            raise UserError(f"{why} rather than replaced by an empty table")
        return f"[reproduce] {why}"
    return write_results(name, table, opts, seeds, rows)


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
    parser.add_argument('--out', default=DEFAULT_OUT,
                        help='results go to OUT/<table>.*, run folders to OUT/runs/<table>/ (default: %(default)s, '
                             'which git ignores; --out results re-makes the committed tables)')
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
    parser.add_argument('--launcher', default='local', metavar='{local,slurm,submitit-local} or WORDS',
                        help='local (default): the stages run on this machine; slurm: every stage a SLURM job '
                             '(submitit), each after the jobs of the stages it needs; submitit-local: the same jobs '
                             'through submitit on this machine. Or the words that start the multi-process stages '
                             'here instead of the interpreter, e.g. "torchrun --nproc_per_node=8" (stages then run '
                             'one at a time)')
    parser.add_argument('--jobs', type=cli.positive_int, default=1, metavar='N',
                        help='run up to N independent stages at the same time on the CPUs, the CPU threads split '
                             'between them (default: 1, one stage after the other)')
    parser.add_argument('--gpus', default=None, metavar='IDS',
                        help='comma-separated GPU ids, e.g. 0,1,2,3: independent stages run at the same time, each '
                             'process seeing only its GPU')
    parser.add_argument('--jobs-per-gpu', type=cli.positive_int, default=1, metavar='K',
                        help='with --gpus: up to K stages on each GPU at a time (default: 1; whether more pays '
                             'off for ResNet-32 is not measured yet, bench/README.md)')
    parser.add_argument('--dry-run', action='store_true', help='print the plan and every command (with --launcher '
                                                              'slurm: each job\'s parameters and what it waits '
                                                              'for); run nothing')
    parser.add_argument('--collect', action='store_true', help='only re-make the results from the run folders')
    parser.add_argument('--status', action='store_true', help='print each stage\'s state from the run folders (and '
                                                             'the job folders of --launcher slurm / submitit-local); '
                                                             'run and submit nothing')
    slurm = parser.add_argument_group('SLURM (--launcher slurm; --slurm_time also bounds submitit-local\'s jobs)')
    slurm.add_argument('--slurm_partition', default=None, help='sbatch --partition of every job')
    slurm.add_argument('--slurm_time', default=None, metavar='TIME',
                       help='sbatch --time of every job (minutes or [D-]HH:MM:SS; default 24:00:00 on SLURM); a '
                            'stage still running then saves and is requeued')
    slurm.add_argument('--slurm_account', default=None, help='sbatch --account')
    slurm.add_argument('--slurm_qos', default=None, help='sbatch --qos')
    slurm.add_argument('--slurm_constraint', default=None, help='sbatch --constraint')
    slurm.add_argument('--slurm_extra', action='append', default=[], metavar='KEY=VALUE',
                       help='any other sbatch option for every stage\'s job, e.g. --slurm_extra cpus-per-task=10 '
                            '--slurm_extra mem=64G (repeatable)')
    return parser


def parse_seeds(values):
    try:
        seeds = [int(v) for v in values]
    except ValueError:
        raise UserError(f"--seeds must be integers, got {' '.join(values)}") from None
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds lists a seed twice: {' '.join(values)}")
    return seeds


def parse_launcher(value):
    """--launcher -> (mode, torchrun's words): one of launchers.MODES, or words (the local scheduler)."""
    if value in launchers.MODES:
        return value, []
    words = shlex.split(value)
    close = difflib.get_close_matches(value, launchers.MODES, n=1)
    if len(words) == 1 and close:
        raise UserError(f"--launcher {value!r}: did you mean {close[0]}? (or the words that start a multi-process "
                        f"stage, such as \"torchrun --nproc_per_node=8\")")
    return 'local', words


def slots(args, mode, launcher):
    """Where the stages run: one slot each for as many stages as may run at the same time."""
    if mode == 'slurm':
        if args.gpus is not None or args.jobs > 1 or args.jobs_per_gpu != 1:
            raise UserError("--launcher slurm gives every stage its own job, and SLURM places them: leave --gpus, "
                            "--jobs and --jobs-per-gpu out")
        return []
    slurm_flags = [f for f in ('partition', 'account', 'qos', 'constraint') if getattr(args, f'slurm_{f}')]
    if slurm_flags or args.slurm_extra or (args.slurm_time and mode == 'local'):
        raise UserError(f"--slurm_{(slurm_flags or ['extra' if args.slurm_extra else 'time'])[0]} sets the SLURM "
                        f"jobs of --launcher slurm" + ("" if mode == 'local' else
                                                       " (submitit-local takes --slurm_time only)"))
    if launcher and (args.gpus is not None or args.jobs > 1):
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


def check_recipe(stages, args, mode, launcher):
    """The same table trains the same recipe however it is launched (docs/reproduce.md): a MoCo stage
    of the ImageNet-LT / iNat recipe (8 GPUs, shuffle-BN over them) is refused on one GPU of --gpus; a
    launcher with another process count than such a stage's recipe is said in one line."""
    multi = [s for s in stages if s.gpus() > 1 and s.spec.distributed]
    moco = [s for s in multi if s.script == 'pretrain_moco.py' and not s.status().done]
    if args.gpus is not None and moco:
        raise UserError(f"--gpus runs each stage as one process on one GPU, but MoCo's recipe trains on "
                        f"{moco[0].gpus()} (shuffle-BN over them does nothing in one process): run the MoCo stages "
                        f"with --launcher slurm or --launcher \"torchrun --nproc_per_node={moco[0].gpus()}\" first "
                        f"(then --gpus runs the rest)")
    processes = launcher_processes(launcher)
    if mode == 'local' and launcher and multi and processes != multi[0].gpus():
        print(f"[reproduce] note: --launcher starts {processes} process(es) per stage, but the ImageNet-LT / iNat "
              f"recipe trains on {multi[0].gpus()} GPUs (its BatchNorm pieces, MoCo's shuffle-BN): "
              f"{len(multi)} stage(s) train another recipe", flush=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.table not in TABLES:
        raise UserError(f"unknown table {args.table!r}; choose one of {', '.join(TABLES)}")
    table, seeds = TABLES[args.table], parse_seeds(args.seeds)
    mode, launcher = parse_launcher(args.launcher)
    where = slots(args, mode, launcher)
    slurm = launchers.Slurm(args.slurm_partition, args.slurm_time or launchers.DEFAULT_TIME, args.slurm_account,
                            args.slurm_qos, args.slurm_constraint, launchers.parse_extra(args.slurm_extra))
    launchers.parse_time(slurm.time)  # a time sbatch could not read: refused here, before anything
    opts = Options(args.table, args.data_path, args.out, args.epochs, args.schedule, args.rand_number,
                   parse_stage_args(args.stage_args))
    keys = [c.key for c in table.build(opts, seeds[0])]
    unknown = [k for k in args.cells or () if k not in keys]
    if unknown:
        raise UserError(f"unknown cell {unknown[0]!r} for table {args.table}; choose from {', '.join(keys)}")
    cells, stages = plan(table, opts, seeds, args.cells)
    number = {stage: i for i, stage in enumerate(stages, 1)}
    what = (args.table, opts, seeds, args.cells)

    if args.collect:
        print(collect(*what))
        return 0
    if args.status:
        return launchers.status(stages, number, opts.stage_log, opts.path(), mode)
    if args.dry_run:
        if mode == 'local':
            _print_commands(stages, launcher)
        else:
            launchers.dry_run(stages, scheduler.dependencies(stages), number, opts.stage_log, slurm, mode)
        return 0
    if mode != 'local':
        launchers.need_submitit(mode)
    check_data(args.table, table, args.data_path)
    for stage in stages:  # every command must parse, and pass its script's checks, before the first one runs
        stage.args()
        if stage.spec.check is not None:
            processes = launcher_processes(launcher) if mode == 'local' else stage.gpus() if mode == 'slurm' else 1
            stage.spec.check(stage, processes if stage.spec.distributed else 1)
    check_recipe(stages, args, mode, launcher)
    if mode == 'slurm':
        launchers.check_cluster(slurm, {s.gpus() for s in stages if not s.status().done})
        return launchers.submit_table(stages, scheduler.dependencies(stages), number, opts.stage_log, opts.path(),
                                      slurm, what)
    at_once = f", up to {len(where)} at a time ({', '.join(s.name for s in where)})" if len(where) > 1 else ''
    via = ', each a submitit job on this machine' if mode == 'submitit-local' else ''
    print(f"[reproduce] {args.table}: {len(stages)} stages for {len(cells[seeds[0]])} cells x {len(seeds)} seeds"
          f"{at_once}{via}", flush=True)
    if mode == 'submitit-local':
        return _run_local_jobs(stages, where, opts, what, args.slurm_time)
    by_seed = [{s for c in cells[seed] for s in c.stages} for seed in seeds]

    def finished(stage, done):  # the results are re-made when all of a seed's stages have finished
        if any(stage in needed and needed <= done for needed in by_seed):
            collect(*what, refuse_empty=False)

    message = ''
    try:
        code, message = scheduler.run_stages(stages, where, launcher, opts.stage_log, finished)
    finally:
        print(collect(*what, refuse_empty=False), flush=True)
        if message:
            print(message, flush=True)
    return code


def _print_commands(stages, launcher):
    for i, stage in enumerate(stages, 1):
        status = stage.status()
        print(f"# stage {i}/{len(stages)}: {'done, skipped' if status.done else status.note}")
        print(shlex.join(stage.command(launcher, status.resume)))


def _run_local_jobs(stages, where, opts, what, slurm_time):
    """--launcher submitit-local: the scheduler starts each stage as a submitit job on this machine; then
    a job writes the table, as SLURM's final job does."""
    from submitit.core.utils import UncompletedJobError
    jobs = launchers.LocalJobs(opts.path(), slurm_time)
    before = os.environ.get('PYTHONPATH')  # the jobs unpickle repro.jobs wherever reproduce.py was started
    os.environ['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, before) if p)
    message = ''
    try:
        code, message = scheduler.run_stages(stages, where, (), opts.stage_log, lambda *args: None, run=jobs)
    finally:
        try:
            print(jobs.collect(what), flush=True)
        except UncompletedJobError as e:
            lines = [line for line in str(e).splitlines() if line.strip() and not line.startswith(' ')]
            print(f"[reproduce] the results job failed: {lines[-1] if lines else e}", flush=True)
        if before is None:
            os.environ.pop('PYTHONPATH')
        else:
            os.environ['PYTHONPATH'] = before
        if message:
            print(message, flush=True)
    return code
