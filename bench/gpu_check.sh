#!/usr/bin/env bash
# Every CUDA path of the project, once, on one GPU: one PASS/FAIL line per check (issue 18, build 5).
#
#   bash bench/gpu_check.sh                      # on a GPU machine: under 8 minutes on one H100/H200 (planned)
#   DEVICE=cpu bash bench/gpu_check.sh --quick   # the same checks on the CPU, smaller: proves the script works
#
# Checks: the environment and default precision; each loss and train rule; both loaders; the rotation,
# MoCo and semi-supervised pipelines; host waits per source line in the step loops
# (torch.cuda.set_sync_debug_mode; on the CPU the fake-CUDA test stands in); exact resume, SIGTERM and
# divergence; 2 ranks on one GPU with gloo incl. the merged -e; a GPU checkpoint evaluated on the CPU;
# the throughput bench; whether two reproduce.py stages per GPU beat one. Logs of every check: $OUT (default: a new folder under /tmp), printed at the end.
# Exit status 1 if any check failed. Record what a GPU printed in bench/README.md with the card's name.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then
    export CUDA_VISIBLE_DEVICES=
else
    export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}  # one GPU: "2 ranks on one GPU" means it
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT"
EPOCHS=2; [ $QUICK = 1 ] && EPOCHS=1
# digits-LT (scikit-learn's bundled images): no download, a few seconds per epoch
DIGITS=(--dataset digits --imb_factor 0.1 -b 64 -j 0 --seed 0 -p 5)
FAILED=0
START=$SECONDS

# check NAME COMMAND...: runs COMMAND (a shell function or program) with its output in $OUT/NAME.log
check() {
    local name=$1; shift
    local t0=$SECONDS
    if "$@" >"$OUT/$name.log" 2>&1; then
        printf 'PASS %-28s %4ds\n' "$name" $((SECONDS - t0))
    else
        printf 'FAIL %-28s %4ds  %s\n' "$name" $((SECONDS - t0)) "$(grep -v '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-150)"
        FAILED=$((FAILED + 1))
    fi
}

train() {  # train NAME ARGS...: train.py on digits into $OUT/NAME
    local name=$1; shift
    $PY train.py "${DIGITS[@]}" --data_path "$OUT/data" --root_log "$OUT/$name/log" --root_model "$OUT/$name/ckpt" \
        --epochs "$EPOCHS" "$@"
}

ckpt() { ls "$OUT/$1"/ckpt/*/ckpt.pth.tar; }

top1() { grep -o 'val Results: Prec@1 [0-9.]*' | tail -1 | awk '{print $4}'; }

environment() {
    $PY - "$DEVICE" <<'EOF'
import sys
import torch
import dist
from engine import default_amp
device = torch.device(sys.argv[1])
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
if device.type == 'cuda':
    cap = torch.cuda.get_device_capability(device)
    print(f"{torch.cuda.get_device_name(device)}, sm_{cap[0]}{cap[1]}; wheel: {' '.join(torch.cuda.get_arch_list())}")
    dist.check_arch(cap, torch.cuda.get_arch_list(), torch.cuda.get_device_name(device))
    expected = cap >= (8, 0)
else:
    caps = torch.cpu.get_capabilities()
    expected = bool(caps.get('avx512_bf16') or caps.get('amx_bf16'))
print(f"default bf16 autocast: {default_amp(device)} (expected {expected})")
assert default_amp(device) == expected
EOF
}

losses_and_rules() {
    local rules=("CE None" "CE Reweight" "Focal Resample" "LDAM DRW")
    [ $QUICK = 1 ] && rules=("CE None" "LDAM DRW")
    for r in "${rules[@]}"; do
        set -- $r
        train "loss_$1_$2" --loss_type "$1" --train_rule "$2" --epochs 1 || return 1
        grep -q 'Best Prec@1' "$OUT"/loss_$1_$2/log/*/log_test.csv || return 1
    done
}

loaders() {
    train loader_device --loader device --epochs 1 && train loader_torchvision --loader torchvision -j 2 --epochs 1
}

rotation() {
    $PY pretrain_rot.py "${DIGITS[@]}" --data_path "$OUT/data" --root_log "$OUT/rot/log" --root_model "$OUT/rot/ckpt" \
        --epochs 1 && train rot_finetune --epochs 1 --pretrained_model "$(ckpt rot)"
}

moco() {
    $PY pretrain_moco.py --dataset digits --imb_factor 0.1 --moco-k 256 -b 64 -j 0 --seed 0 --epochs 1 \
        --root_path "$OUT/moco" --multiprocessing-distributed false &&
    train moco_finetune --epochs 1 --pretrained_model "$OUT/moco/digits/checkpoint/moco_ckpt_0001.pth.tar"
}

semi() {
    train semi_base --epochs 1 &&
    $PY gen_pseudolabels.py --dataset digits --imb_factor 0.1 --resume "$(ckpt semi_base)" --data_dir "$OUT/data" \
        --output_dir "$OUT/data" -j 0 --overwrite &&
    $PY train_semi.py "${DIGITS[@]}" --data_path "$OUT/data" --imb_factor_unlabel 0.1 --unlabel_size_factor 1 \
        --root_log "$OUT/semi/log" --root_model "$OUT/semi/ckpt" --epochs 1
}

host_waits() {
    if [ "$DEVICE" = cpu ]; then  # no CUDA to ask: the FakeTensor recorder of the tests
        $PY -m pytest -q -p no:cacheprovider tests/test_gpu_ready.py -k never_wait
        return
    fi
    $PY - "$OUT/data" <<'EOF'
"""Each step loop under torch.cuda.set_sync_debug_mode('warn'): every synchronizing call warns; count
them per project line and step. A wait in a step other than the last (the only print point here)
fails the check."""
import collections, functools, os, sys, traceback, warnings
import torch
import engine, pretrain_moco, pretrain_rot, train, trainer
from models import build_model
from moco.builder import MoCo
from torch.utils.data import DataLoader
REPO, device, step = os.getcwd(), torch.device('cuda'), [0]
events = collections.defaultdict(set)

def where():
    for f in reversed(traceback.extract_stack()):
        p = os.path.abspath(f.filename)
        if p.startswith(REPO + os.sep):
            return f"{os.path.relpath(p, REPO)}:{f.lineno}"

def counted(loader):
    step[0] = 0
    for batch in loader:
        step[0] += 1
        yield batch

def hook(message, category, *a, **k):
    events[where()].add(step[0])

warnings.simplefilter('always')  # every warning, not the first per line

def run(name, model, loader, steps, **kw):
    events.clear()
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
    warnings.showwarning = hook
    torch.cuda.set_sync_debug_mode('warn')
    try:
        engine.train_one_epoch(model, torch.nn.CrossEntropyLoss(), counted(loader), optimizer, device, 0,
                               print_freq=10 ** 6, log=lambda *a, **k: None, num_steps=steps, **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    inside = {line: sorted(s) for line, s in events.items() if any(0 < k < steps for k in s)}
    print(f"{name}: {steps} steps; waits per line (steps): {dict(events) or 'none'}")
    return inside

bad = {}
for script, batch_fn, classes in (('train', None, 10), ('pretrain_rot', pretrain_rot.random_rotation_batch, 4)):
    args = train.build_parser().parse_args(['--dataset', 'digits', '--data_path', sys.argv[1], '--imb_factor', '0.1', '-b', '16'])
    _, train_set, val_set = train.load_data(args)
    exp = trainer.Experiment(script, 'classification', build_model('resnet32', classes), train_set, val_set, classes,
                             train_set.get_cls_num_list(), batch_fn=batch_fn)
    model = trainer.place_model(exp.model, args, device, 1)
    loader, sampler, _ = trainer._loaders(args, exp, 0, 0, 1, device)
    trainer.begin_epoch(sampler, loader, 0, 0, 0)
    bad[script] = run(script, model, loader, len(loader), batch_fn=batch_fn, amp=engine.default_amp(device),
                      channels_last=True)
margs = pretrain_moco.resolve_args(pretrain_moco.build_parser().parse_args(
    ['--dataset', 'digits', '--data', sys.argv[1], '--imb_factor', '0.1', '--moco-k', '64', '-b', '16']))
moco = MoCo(functools.partial(build_model, margs.arch), 128, 64, 0.999, 0.2, True).to(
    device, memory_format=torch.channels_last)  # pretrain_moco's defaults: channels_last, bf16 where native
loader = DataLoader(pretrain_moco.PRETRAIN_DATA['digits'].build(margs), batch_size=16, shuffle=True,
                    drop_last=True, pin_memory=True)
bad['pretrain_moco'] = run('pretrain_moco', moco, loader, len(loader), forward=pretrain_moco.moco_forward,
                           **engine.step_hooks(margs, device))
print('waits inside the steps:', {k: v for k, v in bad.items() if v} or 'none')
sys.exit(1 if any(bad.values()) else 0)
EOF
}

exact_resume() {
    train whole --epochs 2 && train halves --epochs 1 && train halves --epochs 2 --resume "$(ckpt halves)" &&
    $PY - "$(ckpt whole)" "$(ckpt halves)" <<'EOF'
import sys, torch
a, b = (torch.load(p, map_location='cpu', weights_only=True)['state_dict'] for p in sys.argv[1:])
torch.testing.assert_close(a, b, rtol=0, atol=0)
print('2 epochs == 1 epoch + resume, to the bit')
EOF
}

sigterm() {
    $PY train.py "${DIGITS[@]}" --data_path "$OUT/data" --root_log "$OUT/stopped/log" --root_model "$OUT/stopped/ckpt" \
        --epochs 50 -p 1 &
    local pid=$!
    while [ ! -e "$OUT/stopped/ckpt" ] || [ -z "$(ls "$OUT"/stopped/ckpt/*/ckpt.pth.tar 2>/dev/null)" ]; do
        kill -0 $pid 2>/dev/null || return 1
        sleep 0.2
    done
    sleep 1; kill -TERM $pid; wait $pid; local rc=$?
    echo "exit status after SIGTERM: $rc (expected 143)"
    [ $rc = 143 ] && train stopped --epochs 2 --resume "$(ckpt stopped)"
}

divergence() {
    train diverged --epochs 1 --lr 1e30 --loss_type LDAM; local rc=$?
    echo "exit status: $rc (expected 2)"
    [ $rc = 2 ] && grep -q 'non-finite' "$OUT/divergence.log"
}

two_ranks() {
    local run=($PY -m torch.distributed.run --standalone --nproc_per_node 2)
    if [ "$DEVICE" != cpu ]; then  # NCCL refuses two processes on one GPU, in one line, before writing
        "${run[@]}" train.py "${DIGITS[@]}" --data_path "$OUT/data" --root_log "$OUT/refused/log" \
            --root_model "$OUT/refused/ckpt" --epochs 1 && return 1
        [ ! -e "$OUT/refused" ] || return 1
    fi
    IMB_DIST_BACKEND=gloo "${run[@]}" train.py "${DIGITS[@]}" --data_path "$OUT/data" --root_log "$OUT/ranks/log" \
        --root_model "$OUT/ranks/ckpt" --epochs 1 || return 1
    local merged single
    merged=$(IMB_DIST_BACKEND=gloo "${run[@]}" train.py "${DIGITS[@]}" --data_path "$OUT/data" -e \
        --resume "$(ckpt ranks)" | top1)
    single=$($PY train.py "${DIGITS[@]}" --data_path "$OUT/data" -e --resume "$(ckpt ranks)" | top1)
    echo "-e top-1: 2 ranks merged $merged, one process $single"
    [ -n "$merged" ] && [ "$merged" = "$single" ]
}

gpu_to_cpu() {
    local here there
    here=$($PY train.py "${DIGITS[@]}" --data_path "$OUT/data" -e --resume "$(ckpt whole)" | top1)
    there=$(CUDA_VISIBLE_DEVICES= $PY train.py "${DIGITS[@]}" --data_path "$OUT/data" -e --resume "$(ckpt whole)" | top1)
    echo "-e top-1 of the $DEVICE checkpoint: on $DEVICE $here, on the CPU $there"
    [ -n "$there" ]
}

bench() {
    if [ $QUICK = 1 ]; then
        $PY bench/throughput.py --train-steps 2 --skip-compile --skip-process --only pre-made
    else
        $PY bench/throughput.py --train-steps 60
    fi
}

stages_per_slot() {  # reproduce.py --jobs-per-gpu: do 2 stages per GPU beat 1 for ResNet-32? (issue 19)
    local slots k t0 took=()
    if [ "$DEVICE" = cpu ]; then slots=(--jobs); else slots=(--gpus 0 --jobs-per-gpu); fi
    for k in 1 2; do  # two independent stages (CE and CE Balanced of digits-mini), ResNet-32
        t0=$EPOCHREALTIME
        $PY reproduce.py --table digits-mini --seeds 0 --epochs $((EPOCHS * 5)) --cells CE Balanced \
            --out "$OUT/stages_k$k" --stage-args="-a resnet32" "${slots[@]}" $k || return 1
        took+=("$(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $t0}")")
    done
    echo "two ResNet-32 stages: ${took[0]} s one at a time, ${took[1]} s two at a time (${slots[*]} 1 vs 2)"
}

echo "gpu_check: DEVICE=$DEVICE quick=$QUICK logs in $OUT"
check environment environment
check losses_and_rules losses_and_rules
check loaders loaders
check rotation rotation
check moco moco
check semi semi
check host_waits host_waits
check exact_resume exact_resume
check sigterm sigterm
check divergence divergence
check two_ranks_one_device two_ranks
check checkpoint_to_cpu gpu_to_cpu
check throughput_bench bench
check stages_per_gpu stages_per_slot
echo "gpu_check: $FAILED failed, $((SECONDS - START)) s; logs in $OUT"
[ $FAILED = 0 ]
