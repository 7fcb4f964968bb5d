"""Runs one training script in this process and writes when its phases began and ended (bench/epochs.py).

    python bench/phases.py ours|original SCRIPT_DIR SCRIPT OUT_JSON -- ARGS...

`ours`: this repository's SCRIPT; `original`: the 2020 code's SCRIPT in SCRIPT_DIR (a copy laid out by
../shared/original/prepare_ref.sh), with the CPU shims its README describes applied first (`.cuda()` a
no-op, loads and `.to('cuda')` mapped to the CPU, DataParallel over no GPU the bare model).
Both read synthetic CIFAR files, whose md5 sums cannot match: the check is skipped.

The phases are the wall time spent inside the functions that do them, summed over calls:
  training   ours: engine.train_one_epoch (as trainer calls it); original: the script's train()
  evaluation ours: engine.evaluate (as trainer calls it);        original: the script's validate()
  writing    ours: trainer._log_eval (logs, tensorboard, plot) and RunFolder.save (checkpoint);
             original: save_checkpoint() (its log lines are written inside validate())
Start-up is from the launch (BENCH_LAUNCH, the parent's time.time() just before it started this
process) to the first training call; the rest of the wall time is left to the caller. Each call also
records the CPU seconds spent (this process's threads and its ended children, e.g. loader workers).
"""
import atexit
import json
import os
import resource
import sys
import time

CALLS = []  # (phase, start, end, CPU seconds at start, at end): time.time() and cpu_seconds()


def cpu_seconds():
    """CPU seconds of this process (all its threads) and of its children that have ended (the original's
    loader workers, which end with every pass over a loader)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed(phase, fn):
    def wrapper(*args, **kwargs):
        start, cpu = time.time(), cpu_seconds()
        try:
            return fn(*args, **kwargs)
        finally:
            CALLS.append((phase, start, time.time(), cpu, cpu_seconds()))
    wrapper.__wrapped__ = fn
    return wrapper


def write(path):
    with open(path, 'w') as f:
        json.dump({'launch': float(os.environ.get('BENCH_LAUNCH', 0)) or None, 'calls': CALLS,
                   'exit': time.time()}, f)


def cpu_shims():
    """The 2020 code was written for CUDA only: what ../shared/original/README.md's sitecustomize.py does."""
    import torch
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.FloatTensor = torch.FloatTensor
    load = torch.load
    torch.load = lambda f, *a, **k: load(f, map_location='cpu', weights_only=False)
    to = torch.Tensor.to

    def gpu(d):
        return (isinstance(d, int) and not isinstance(d, bool)) or (
            isinstance(d, (str, torch.device)) and 'cuda' in str(d))

    def to_cpu(self, *a, **k):
        a = tuple('cpu' if gpu(x) else x for x in a)
        if gpu(k.get('device')):
            k['device'] = 'cpu'
        return to(self, *a, **k)
    torch.Tensor.to = to_cpu
    torch.nn.DataParallel = lambda m, *a, **k: m


def skip_md5():
    import torchvision.datasets.cifar as cifar
    cifar.CIFAR10._check_integrity = lambda self: True
    cifar.check_integrity = lambda *a, **k: True
    cifar.CIFAR10.download = lambda self: None


def run_original(script_dir, script, argv):
    cpu_shims()
    skip_md5()
    path = os.path.join(script_dir, script)
    os.chdir(script_dir)
    sys.path.insert(0, script_dir)
    sys.argv = [path, *argv]
    # Executed as a module that is not __main__, so that its functions can be wrapped before main() runs.
    scope = {'__name__': '__bench__', '__file__': path}
    with open(path) as f:
        exec(compile(f.read(), path, 'exec'), scope)
    for phase, name in (('training', 'train'), ('evaluation', 'validate'), ('writing', 'save_checkpoint')):
        scope[name] = timed(phase, scope[name])
    scope['main']()


def run_ours(repo, script, argv):
    import runpy
    os.chdir(repo)
    sys.path.insert(0, repo)
    skip_md5()
    import trainer
    trainer.train_one_epoch = timed('training', trainer.train_one_epoch)
    trainer.evaluate = timed('evaluation', trainer.evaluate)
    trainer._log_eval = timed('writing', trainer._log_eval)
    trainer.RunFolder.save = timed('writing', trainer.RunFolder.save)
    sys.argv = [os.path.join(repo, script), *argv]
    runpy.run_path(sys.argv[0], run_name='__main__')


def main():
    which, script_dir, script, out = sys.argv[1:5]
    argv = sys.argv[6:] if sys.argv[5:6] == ['--'] else sys.argv[5:]
    atexit.register(write, out)
    (run_original if which == 'original' else run_ours)(script_dir, script, argv)


if __name__ == '__main__':
    main()
