#!/usr/bin/env bash
# Every CUDA path of the project, once, on one GPU: one PASS/FAIL line per check, cheapest first (issues 18, 29).
#
#   bash bench/gpu_check.sh --part 1             # on a GPU machine: each part planned for under 8 minutes on
#   bash bench/gpu_check.sh --part 2             #   one H100, so that each fits a call of under 10 minutes (an
#   bash bench/gpu_check.sh                      #   estimate: 26 and 32 Python processes of ~10-15 s); both
#   DEVICE=cpu bash bench/gpu_check.sh --quick   # the same checks on the CPU, smaller: proves the script works
#
# Part 1: the GPU, the wheel, NCCL with one rank and DataParallel's replicas under bf16 (device); host waits
# per source line in the step, evaluation and prediction loops, counting synchronisation warnings only
# (torch.cuda.set_sync_debug_mode; on the CPU the fake-CUDA test stands in); the divergence guard; each loss
# and train rule; both loaders; the recipe options on the device loader (and AutoAugment's classic loader);
# a SIGTERM mid-epoch, then a resume equal to the uninterrupted run to the bit; a GPU checkpoint evaluated on
# the CPU (the same top-1 within one image); the rotation, MoCo and semi-supervised pipelines; --compile.
# Part 2: train_stage2.py (cRT, tau-norm, WB); a cached and a streamed image folder; imagenet_inat stage 1
# with --bn_pieces, cRT and tau-norm; 2 ranks on one GPU with gloo under torchrun (NCCL's one-line refusal
# first), stopped by a SIGTERM to torchrun and resumed, and the merged -e against one process's; NCCL with
# 2 ranks where 2 GPUs are visible; the throughput bench; whether two reproduce.py stages per GPU beat one.
# Logs of every check: $OUT (default: a new folder under /tmp), printed at the end. Exit status 1 if any
# check failed. Record what a GPU printed in bench/README.md with the card's name.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
QUICK=0
PART=all
while [ $# -gt 0 ]; do
    case $1 in
        --quick) QUICK=1 ;;
        --part) PART=${2:-}; shift ;;
        *) echo "usage: bash bench/gpu_check.sh [--quick] [--part 1|2]" >&2; exit 2 ;;
    esac
    shift
done
case $PART in 1|2|all) ;; *) echo "--part is 1 or 2" >&2; exit 2 ;; esac
DEVICE=${DEVICE:-cuda}
GPUS=0
if [ "$DEVICE" = cpu ]; then
    export CUDA_VISIBLE_DEVICES=
else
    GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    [ -z "${CUDA_VISIBLE_DEVICES:-}" ] || GPUS=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT"
EPOCHS=2; [ $QUICK = 1 ] && EPOCHS=1
# digits-LT (scikit-learn's bundled images): no download, 604 training images, 10 steps per epoch at -b 64
DIGITS=(--dataset digits --imb_factor 0.1 -b 64 -j 0 --seed 0 -p 5)
CHECK=$PY' bench/gpu_check.py'
TORCHRUN=($PY -m torch.distributed.run --standalone --nproc_per_node 2)
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

finished() { grep -q 'Best Prec@1' "$OUT"/$1/log/*/log_test.csv; }  # finished NAME: the run's last epoch logged

# ---------------------------------------------------------------- part 1

device() { $CHECK device "$DEVICE"; }

host_waits() {
    if [ "$DEVICE" = cpu ]; then  # no CUDA to ask: the FakeTensor recorder of the tests
        $PY -m pytest -q -p no:cacheprovider tests/test_gpu_ready.py -k never_wait
    else
        $CHECK host_waits "$OUT/data"
    fi
}

divergence() {
    train diverged --epochs 1 --lr 1e30 --loss_type LDAM; local rc=$?
    echo "exit status: $rc (expected 2)"
    [ $rc = 2 ] && grep -q 'non-finite' "$OUT/divergence.log"
}

losses_and_rules() {
    local rules=("CE None" "CE Reweight" "Focal Resample" "LDAM DRW")
    [ $QUICK = 1 ] && rules=("CE None" "LDAM DRW")
    for r in "${rules[@]}"; do
        set -- $r
        train "loss_$1_$2" --loss_type "$1" --train_rule "$2" --epochs 1 && finished "loss_$1_$2" || return 1
    done
}

loaders() {
    train loader_device --loader device --epochs 1 && train loader_torchvision --loader torchvision -j 2 --epochs 1
}

recipe() {  # mixup, Cutout and the cosine schedule on the device loader; AutoAugment on the classic one
    train recipe_device --mixup 0.2 --cutout 4 --lr_schedule cosine --epochs 1 && finished recipe_device &&
    ! grep -q 'using --loader torchvision' "$OUT/recipe.log" &&
    train recipe_aa --autoaugment -j 2 --epochs 1 && finished recipe_aa &&
    grep -q 'using --loader torchvision' "$OUT/recipe.log"
}

exact_resume() {  # SIGTERM after step 13 of 20 (epoch 2, step 3): exit 143, a mid-epoch checkpoint, then
    # a resume that ends with the uninterrupted run's weights, to the bit
    train whole --epochs 2 || return 1
    $CHECK stop_after 13 self train.py "${DIGITS[@]}" --data_path "$OUT/data" --root_log "$OUT/halves/log" \
        --root_model "$OUT/halves/ckpt" --epochs 2; local rc=$?
    echo "exit status after SIGTERM: $rc (expected 143)"
    [ $rc = 143 ] && grep -q 'stopped by SIGTERM during epoch 2 after step 3' "$OUT/exact_resume.log" &&
    train halves --epochs 2 --resume "$(ckpt halves)" && $CHECK same "$(ckpt whole)" "$(ckpt halves)"
}

gpu_to_cpu() {  # the GPU checkpoint evaluated on the CPU: the same top-1, up to one near-tied image
    local here there
    here=$($PY train.py "${DIGITS[@]}" --data_path "$OUT/data" -e --resume "$(ckpt whole)" | top1)
    there=$(CUDA_VISIBLE_DEVICES= $PY train.py "${DIGITS[@]}" --data_path "$OUT/data" -e --resume "$(ckpt whole)" | top1)
    echo "-e top-1 of the $DEVICE checkpoint: on $DEVICE $here, on the CPU $there"
    [ -n "$here" ] && [ -n "$there" ] && $CHECK close "$here" "$there" 300
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

compiled() {  # -b 302: two whole batches per epoch, so the training graph compiles once (a last, partial batch
    # would compile it again, minutes on a CPU); ResNet-20 on the CPU with --quick
    local small=(); [ $QUICK = 1 ] && [ "$DEVICE" = cpu ] && small=(-a resnet20)
    train compiled --compile -b 302 "${small[@]}" --epochs 1 && finished compiled
}

# ---------------------------------------------------------------- part 2

stage2() {
    train stage1 --epochs 1 || return 1
    local s
    for s in cRT tau_norm WB; do
        $PY train_stage2.py --dataset digits --imb_factor 0.1 --stage $s -b 64 -j 0 --seed 0 --epochs 1 \
            --data_path "$OUT/data" --root_log "$OUT/stage2/log" --root_model "$OUT/stage2/ckpt" \
            --stage1 "$(ckpt stage1)" || return 1
    done
}

folders() {  # 8-px PNGs cached as an array on the device; the same streamed from their files at 72 px
    $CHECK folder "$OUT/folder" &&
    $PY train.py --dataset folder --data_path "$OUT/folder" --imb_factor 1 -b 32 --seed 0 --epochs 1 \
        --root_log "$OUT/folder_cached/log" --root_model "$OUT/folder_cached/ckpt" && finished folder_cached &&
    ls "$OUT"/folder/.folder_cache/train-native-*.npz &&
    $PY train.py --dataset folder --data_path "$OUT/folder" --imb_factor 1 --image_size 72 -a resnet50 -b 32 -j 2 \
        --seed 0 --epochs 1 --root_log "$OUT/folder_streamed/log" --root_model "$OUT/folder_streamed/ckpt" &&
    finished folder_streamed
}

imagenet_inat() {  # stage 1 in two BatchNorm pieces (an 2-GPU run's), cRT, tau-norm: ResNet-10 at 32 px
    local w="$OUT/jpeg"
    $CHECK jpeg_world "$w" || return 1
    local common=(--data_root "$w/images" --split_dir "$w/splits" --seed 0)
    $PY -m imagenet_inat.main --cfg "$w/stage1.yaml" --model_dir "$w/moco.pth.tar" --bn_pieces 2 "${common[@]}" &&
    grep -q 'BatchNorm batches of 8, 8' "$w/logs/stage1/log.txt" &&
    $PY -m imagenet_inat.main --cfg "$w/crt.yaml" --model_dir "$w/logs/stage1" "${common[@]}" &&
    $PY -m imagenet_inat.main --cfg "$w/tau.yaml" --model_dir "$w/logs/stage1" "${common[@]}" &&
    ls "$w"/logs/{stage1,crt,tau}/results_test.json
}

two_ranks() {  # torchrun, 2 ranks on one GPU over gloo: SIGTERM to torchrun, resume, merged -e
    local ranks=(train.py "${DIGITS[@]}" --data_path "$OUT/data" --root_log "$OUT/ranks/log" --root_model "$OUT/ranks/ckpt")
    if [ "$DEVICE" != cpu ]; then  # NCCL refuses two processes on one GPU, in one line, before writing
        "${TORCHRUN[@]}" train.py "${DIGITS[@]}" --data_path "$OUT/data" --root_log "$OUT/refused/log" \
            --root_model "$OUT/refused/ckpt" --epochs 1 && return 1
        [ ! -e "$OUT/refused" ] || return 1
    fi
    local gloo=(env IMB_DIST_BACKEND=gloo "${TORCHRUN[@]}")
    # 10 steps per rank and epoch: rank 0 signals torchrun after step 13; every rank saves at the next print point
    "${gloo[@]}" --shutdown_timeout 120 bench/gpu_check.py stop_after 13 parent "${ranks[@]}" -p 1 --epochs 2
    echo "torchrun's exit status after SIGTERM: $? (1: its SignalException)"
    grep -q 'stopped by SIGTERM during epoch 2' "$OUT/two_ranks_one_device.log" || return 1
    "${gloo[@]}" "${ranks[@]}" --epochs 2 --resume "$(ckpt ranks)" && finished ranks || return 1
    local merged single
    merged=$("${gloo[@]}" "${ranks[@]}" -e --resume "$(ckpt ranks)" | top1)
    single=$($PY "${ranks[@]}" -e --resume "$(ckpt ranks)" | top1)
    echo "-e top-1: 2 ranks merged $merged, one process $single"
    [ -n "$merged" ] && [ -n "$single" ] && $CHECK close "$merged" "$single" 300
}

nccl_two_gpus() {
    if [ "$GPUS" -lt 2 ]; then
        echo "$GPUS GPU(s) visible: NCCL ran with one rank in 'device'; 2 ranks need 2 GPUs"
        return 0
    fi
    CUDA_VISIBLE_DEVICES=0,1 "${TORCHRUN[@]}" train.py "${DIGITS[@]}" --data_path "$OUT/data" \
        --root_log "$OUT/nccl/log" --root_model "$OUT/nccl/ckpt" --epochs 1 && finished nccl
}

bench() {
    if [ $QUICK = 1 ]; then
        $PY bench/throughput.py --train-steps 2 --skip-compile --skip-process --only pre-made
    else
        $PY bench/throughput.py --train-steps 60 --skip-compile --skip-process
    fi
}

stages_per_slot() {  # reproduce.py --jobs-per-gpu: do 2 stages per GPU beat 1 for ResNet-32? (issue 19)
    local slots k t0 took=()
    if [ "$DEVICE" = cpu ]; then slots=(--jobs); else slots=(--gpus 0 --jobs-per-gpu); fi
    for k in 1 2; do  # two independent stages (CE and CE Balanced of digits-mini), ResNet-32
        t0=$EPOCHREALTIME
        $PY reproduce.py --table digits-mini --seeds 0 --epochs $((EPOCHS * 3)) --cells CE Balanced \
            --out "$OUT/stages_k$k" --stage-args="-a resnet32" "${slots[@]}" $k || return 1
        took+=("$(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $t0}")")
    done
    echo "two ResNet-32 stages: ${took[0]} s one at a time, ${took[1]} s two at a time (${slots[*]} 1 vs 2)"
}

echo "gpu_check: DEVICE=$DEVICE quick=$QUICK part=$PART logs in $OUT"
if [ "$PART" != 2 ]; then
    check device device
    check host_waits host_waits
    check divergence divergence
    check losses_and_rules losses_and_rules
    check loaders loaders
    check recipe recipe
    check exact_resume exact_resume
    check checkpoint_to_cpu gpu_to_cpu
    check rotation rotation
    check moco moco
    check semi semi
    check compile compiled
fi
if [ "$PART" != 1 ]; then
    check train_stage2 stage2
    check folders folders
    check imagenet_inat imagenet_inat
    check two_ranks_one_device two_ranks
    check nccl_two_gpus nccl_two_gpus
    check throughput_bench bench
    check stages_per_gpu stages_per_slot
fi
echo "gpu_check: $FAILED failed, $((SECONDS - START)) s; logs in $OUT"
[ $FAILED = 0 ]
