"""The Python parts of bench/gpu_check.sh, one subcommand each (run from the repository root):

    python bench/gpu_check.py device cuda|cpu        the GPU, the wheel, NCCL, DataParallel under bf16
    python bench/gpu_check.py host_waits DATA        step loops under torch.cuda.set_sync_debug_mode
    python bench/gpu_check.py stop_after N self|parent SCRIPT ARGS...
                                                     SCRIPT with a SIGTERM to itself (or, on rank 0, to
                                                     its parent: torchrun) after its N-th optimizer step
    python bench/gpu_check.py same CKPT CKPT         two checkpoints' weights equal to the bit
    python bench/gpu_check.py close TOP1 TOP1 N      two top-1 (%) within one image of N
    python bench/gpu_check.py folder ROOT            a small image folder (train/, val/) from digits
    python bench/gpu_check.py jpeg_world ROOT        tests/fixtures_jpeg.py's ImageNet-LT-like set, configs
"""
import collections
import functools
import os
import signal
import socket
import sys
import traceback
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402


def device(kind):
    """What the machine is, and the CUDA paths no training run of the script reaches on one GPU."""
    import dist
    import engine
    from imagenet_inat import layout
    dev = torch.device(kind)
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), visible GPUs: {dist.visible_gpus()}, "
          f"loader workers per process by default: {dist.loader_workers(4)}")
    if dev.type == 'cpu':
        print("CPU: the fake-CUDA tests (tests/test_gpu_ready.py) cover DataParallel's replicas and the refusals")
    else:
        cap = torch.cuda.get_device_capability(dev)
        name = torch.cuda.get_device_name(dev)
        driver = open(dist.NVIDIA_VERSION_FILE).readline().strip() if os.path.exists(dist.NVIDIA_VERSION_FILE) else '?'
        print(f"{name}, sm_{cap[0]}{cap[1]}; wheel: {' '.join(torch.cuda.get_arch_list())}; bf16 autocast by "
              f"default: {engine.default_amp(dev)}; {driver}")
        dist.check_arch(cap, torch.cuda.get_arch_list(), name)
        # imagenet_inat's DataParallel: each replica in a thread of its own, as on G GPUs (item 1 of issue 29)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2)).to(
            dev, memory_format=torch.channels_last)
        dp = layout.DataParallel(model, device_ids=[0, 0])
        x = torch.randn(2, 3, 8, 8, device=dev).contiguous(memory_format=torch.channels_last)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            outs = dp.parallel_apply([model, model], [(x,), (x,)], [{}, {}])
            bare = torch.nn.parallel.parallel_apply([model, model], [(x,), (x,)], devices=[0, 0])
        print(f"parallel_apply under bf16 autocast: replicas give {outs[0].dtype} ({bare[0].dtype} without "
              f"layout.DataParallel)")
        assert all(o.dtype == torch.bfloat16 for o in outs), outs[0].dtype
    # NCCL itself (gloo on the CPU), one rank: every collective of dist.py on the device's tensors
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    backend = 'nccl' if dev.type == 'cuda' else 'gloo'
    torch.distributed.init_process_group(backend, init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1)
    try:
        t = dist.all_reduce_sum(torch.ones(3, device=dev))
        assert t.tolist() == [1.0] * 3 and dist.max_over_ranks(5) == 5 and dist.broadcast_int(7) == 7
        assert dist.all_gather_cat(torch.arange(4, device=dev)).tolist() == [0, 1, 2, 3]
        assert dist.all_gather_object({'a': 1}) == [{'a': 1}] and dist.gather_object(2) == [2]
        bn = torch.nn.BatchNorm2d(3).to(dev)
        dist.broadcast_buffers(bn)
        print(f"{backend}: all_reduce, all_gather, broadcast, gather_object, buffer broadcast on {dev.type} tensors")
    finally:
        torch.distributed.destroy_process_group()


def host_waits(data):
    """Each step loop, the evaluation and the prediction loop under torch.cuda.set_sync_debug_mode('warn'):
    every synchronizing call warns; count those warnings (only those) per project line and step. A wait
    in a step other than the last (the only print point here) fails the check."""
    import engine
    import pretrain_moco
    import pretrain_rot
    import train
    import trainer
    from dataset import DATASETS
    from dataset.device_loader import DeviceLoader
    from models import build_model
    from moco.builder import MoCo
    from torch.utils.data import DataLoader
    dev, step = torch.device('cuda'), [0]
    events = collections.defaultdict(set)
    others = collections.Counter()

    def where():
        for f in reversed(traceback.extract_stack()):
            p = os.path.abspath(f.filename)
            if p.startswith(REPO + os.sep) and not p.endswith('gpu_check.py'):
                return f"{os.path.relpath(p, REPO)}:{f.lineno}"

    def counted(loader):
        step[0] = 0
        for batch in loader:
            step[0] += 1
            yield batch

    def hook(message, category, *a, **k):
        if 'synchronizing CUDA operation' in str(message):
            events[where()].add(step[0])
        else:
            others[f"{category.__name__}: {str(message)[:100]}"] += 1

    def watched(name, run, steps):
        events.clear()
        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode('warn')
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        inside = {line: sorted(s) for line, s in events.items() if any(0 < k < steps for k in s)}
        print(f"{name}: {steps} steps; waits per line (steps): {dict(events) or 'none'}")
        return inside

    def train_loop(model, loader, steps, **kw):
        optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
        return lambda: engine.train_one_epoch(model, torch.nn.CrossEntropyLoss(), counted(loader), optimizer, dev, 0,
                                              print_freq=10 ** 6, log=lambda *a, **k: None, num_steps=steps, **kw)

    warnings.simplefilter('always')  # every warning, not the first per line
    bad = {}
    for script, batch_fn, classes in (('train', None, 10), ('pretrain_rot', pretrain_rot.random_rotation_batch, 4)):
        args = train.build_parser().parse_args(['--dataset', 'digits', '--data_path', data, '--imb_factor', '0.1',
                                                '-b', '16'])
        _, train_set, val_set = train.load_data(args)
        exp = trainer.Experiment(script, 'classification', build_model('resnet32', classes), train_set, val_set,
                                 classes, train_set.get_cls_num_list(), batch_fn=batch_fn)
        model = trainer.place_model(exp.model, args, dev, 1)
        loader, sampler, _ = trainer._loaders(args, exp, 0, 0, 1, dev)
        trainer.begin_epoch(sampler, loader, 0, 0, 0)
        bad[script] = watched(script, train_loop(model, loader, len(loader), batch_fn=batch_fn,
                                                 amp=engine.default_amp(dev), channels_last=True), len(loader))
        if script == 'train':  # batches of 32 rather than 1,000: 10 of them, so that a wait shows before the last
            val_loader = DeviceLoader.from_dataset(val_set, range(len(val_set)), 32, dev, exp.info or DATASETS['digits'],
                                                   train=False, channels_last=True)
            n = len(val_loader)
            bad['evaluate'] = watched('evaluate', lambda: engine.evaluate(
                model, torch.nn.CrossEntropyLoss(), counted(val_loader), dev, classes, channels_last=True), n)
            bad['predict'] = watched('predict', lambda: engine.predict(model, counted(val_loader), dev,
                                                                        channels_last=True), n)
    margs = pretrain_moco.resolve_args(pretrain_moco.build_parser().parse_args(
        ['--dataset', 'digits', '--data', data, '--imb_factor', '0.1', '--moco-k', '64', '-b', '16']))
    moco = MoCo(functools.partial(build_model, margs.arch), 128, 64, 0.999, 0.2, True).to(
        dev, memory_format=torch.channels_last)  # pretrain_moco's defaults: channels_last, bf16 where native
    loader = DataLoader(pretrain_moco.PRETRAIN_DATA['digits'].build(margs), batch_size=16, shuffle=True,
                        drop_last=True, pin_memory=True)
    bad['pretrain_moco'] = watched('pretrain_moco', train_loop(moco, loader, len(loader),
                                                               forward=pretrain_moco.moco_forward,
                                                               **engine.step_hooks(margs, dev)), len(loader))
    print('other warnings (not counted):', dict(others) or 'none')
    print('waits inside the steps:', {k: v for k, v in bad.items() if v} or 'none')
    return 1 if any(bad.values()) else 0


def stop_after(n, target, script, *args):
    """Run SCRIPT as `python SCRIPT ARGS`, sending SIGTERM after its n-th optimizer step: to itself, or from
    rank 0 to its parent (torchrun, which forwards it to every rank)."""
    import runpy
    real, steps = torch.optim.SGD.step, [0]

    def step(self, *a, **k):
        out = real(self, *a, **k)
        steps[0] += 1
        if steps[0] == int(n) and os.environ.get('RANK', '0') == '0':
            os.kill(os.getppid() if target == 'parent' else os.getpid(), signal.SIGTERM)
        return out

    torch.optim.SGD.step = step
    sys.argv = [script, *args]
    runpy.run_path(script, run_name='__main__')


def same(a, b):
    sa, sb = (torch.load(p, map_location='cpu', weights_only=True) for p in (a, b))
    torch.testing.assert_close(sa['state_dict'], sb['state_dict'], rtol=0, atol=0)
    print(f"the same weights to the bit (epoch {sa['epoch']}, step {sa.get('step', 0)})")


def close(a, b, n):
    """Two top-1 accuracies (%) of the same n images: equal up to one image whose near-tied logits may
    order otherwise under other kernels (another device, another batch size)."""
    diff = abs(float(a) - float(b))
    print(f"top-1 {a} and {b}: {diff / (100 / int(n)):.2f} image(s) apart of {n}")
    return 0 if diff <= 100 / int(n) + 1e-6 else 1


def folder(root, per_class=30, val_per_class=10):
    """digits as an image folder of 8 x 8 grayscale PNGs: ROOT/train/<digit>/, ROOT/val/<digit>/."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = (digits.images * (255 / 16)).astype(np.uint8)
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        for split, part in (('train', idx[:per_class]), ('val', idx[per_class:per_class + val_per_class])):
            os.makedirs(os.path.join(root, split, str(label)), exist_ok=True)
            for i in part:
                Image.fromarray(images[i]).save(os.path.join(root, split, str(label), f'{i}.png'))
    print(f"{root}: 10 classes, {per_class} training and {val_per_class} validation images each")


def jpeg_world(root):
    """The tiny long-tailed JPEG set of the imagenet_inat tests, a MoCo checkpoint of its ResNet-10, and
    the configs of stage 1 (instance-balanced), cRT and tau-norm."""
    sys.path.insert(0, os.path.join(REPO, 'tests'))
    import fixtures_jpeg as fx
    os.makedirs(root, exist_ok=True)
    fx.write_jpeg_dataset(root)
    fx.write_moco_checkpoint(os.path.join(root, 'moco.pth.tar'))
    logs = os.path.join(root, 'logs')
    fx.write_config(os.path.join(root, 'stage1.yaml'), fx.stage_config(os.path.join(logs, 'stage1'), sampler=False,
                                                                       batch=16))
    fx.write_config(os.path.join(root, 'crt.yaml'), fx.stage_config(os.path.join(logs, 'crt'), fix=True, batch=16))
    fx.write_config(os.path.join(root, 'tau.yaml'), fx.stage_config(os.path.join(logs, 'tau'), fix=True, epochs=0,
                                                                    sampler=False, batch=16, tau=True))
    print(f"{root}: images/, splits/, moco.pth.tar, stage1.yaml, crt.yaml, tau.yaml")


if __name__ == '__main__':
    command, *rest = sys.argv[1:]
    sys.exit({'device': device, 'host_waits': host_waits, 'stop_after': stop_after, 'same': same, 'close': close,
              'folder': folder, 'jpeg_world': jpeg_world}[command](*rest) or 0)
