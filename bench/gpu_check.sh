#!/usr/bin/env bash
# One GPU, synthetic data, about 8 minutes: the speed figures of the README's Performance section.
#
#   bash bench/gpu_check.sh                 # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --smoke         # the same commands on the CPU, tiny UNet, no compilation (checks the script)
#   bash bench/gpu_check.sh --fetch-wheels  # here, before: Python 3.12 wheels of what the GPU machine may lack
#
# Paper UNet, batch 128 (rows: bench/train_step.py's table):
#   1. OT-CFM: plain fp32, bf16, bf16+compile (OT pipelined and inline); locality and anchor
#      bf16+compile (% of 790 TFLOP/s)
#   2. I-CFM plain bf16 and bf16+compile (target: OT-CFM within 5% of it); plain OT-CFM bf16 unconditioned and
#      class-conditioned (target: a conditioned step within 1.05x)
#   3. host syncs per step (torch.cuda.set_sync_debug_mode "warn"): I-CFM plain/local/anchor,
#      OT-CFM plain with pipelined and inline OT
#   4. peak memory at batch 32 and 64 (128: table 1)
#   5. 1024 dopri5 samples of a random paper UNet, fp32 (images/s); 1024 samples x 10 Euler steps of a random
#      class-conditioned paper UNet, unguided (w=1, 1024 rows a call) and guided (w=2, 2048 rows), median of 3
#      (target: a guided step at most 2.05x an unguided one)
#   6. the memorizing field v* (bench/memorizing_field.py): 1k points x 10 times and the v*-driven sampler
#      (1k samples x 100 Euler steps) against 100k synthetic images + mirrors, float64
#   7. compute_generalization.py's default sizes (bench/generalization.py): 10k queries against 50k training
#      images and their mirrors (float64, checked against the CPU), and the loss gap of 10k train and test images
#      at 10 times on a random paper UNet
# Each section gets what is left of a 480 s budget (--smoke: 900 s); a section that fails or runs out is noted and
# the next one runs. Into $OUT (else ./gpu_check_out): gpu_check.md (the tables) and gpu_check.log
# (everything printed).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(pot absl-py tqdm torchdiffeq scipy numpy)  # the imports of the benchmarks, torch aside

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    exec "$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        --no-deps -d .whl "${WHEELS[@]}"
fi

DEVICE=cuda
UNET=()  # the paper UNet
TRAIN=(--batch_size=128 --steps=10 --warmup_steps=3 --peak_tflops=790)
SAMPLE=(--batch_size=1024 --methods=dopri5)
SAMPLE_UNET=()
GUIDED=(--batch_size=1024 --methods=euler --integration_steps=10 --repeats=3)
MEMORY_BATCHES=(32 64)
VSTAR=()  # bench/memorizing_field.py's defaults: the evaluation's default size
GENERALIZATION=()  # the defaults of compute_generalization.py
BUDGET=480  # seconds for all sections
if [[ "${1:-}" == "--smoke" ]]; then
    DEVICE=cpu
    UNET=(--num_channel=32 --num_res_blocks=1 --channel_mult=1,2)
    TRAIN=(--batch_size=4 --steps=1 --warmup_steps=1 --num_images=200 --peak_tflops=790)
    SAMPLE=(--batch_size=8 --methods=dopri5 --tol=1e-3)
    SAMPLE_UNET=(--num_channel=32)  # bench/sample.py: the paper UNet at this width
    GUIDED=(--batch_size=8 --methods=euler --integration_steps=2 --repeats=1)
    # torch.compile becomes a no-op: inductor takes many minutes on a CPU. The "compiled" rows then
    # run eager; tests/test_fast_path.py checks that the forward compiles without graph breaks.
    export TORCH_COMPILE_DISABLE=1
    MEMORY_BATCHES=(4 8)
    VSTAR=(--num_train=2000 --num_points=100 --num_times=2 --sampler_samples=16 --sampler_steps=5)
    GENERALIZATION=(--num_queries=256 --num_train=5000 --check=64 --loss_images=32 --batch_size=16 --num_times=2
                    --num_channel=32)
    BUDGET=900  # bf16 runs many times slower on a CPU without native bf16
fi
RESULTS=${OUT:-./gpu_check_out}
mkdir -p "$RESULTS"
TABLES=$RESULTS/gpu_check.md LOG=$RESULTS/gpu_check.log
: >"$TABLES"
: >"$LOG"
export PYTHONUNBUFFERED=1

# What the machine lacks, from .whl/ (carried along): only modules that do not import already.
missing=()
for pair in ot:POT absl:absl_py tqdm:tqdm torchdiffeq:torchdiffeq scipy:scipy numpy:numpy; do
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=(.whl/"${pair#*:}"-*.whl)
done
if ((${#missing[@]})); then
    echo "installing from .whl/: ${missing[*]}"
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site "${missing[@]}" && export PYTHONPATH=/tmp/site
fi

section() {  # section NAME COMMAND...: run with what is left of the budget; its output to the log
    local name=$1 left=$((BUDGET - SECONDS))
    shift
    echo "== $name ($SECONDS s in, $left s left)" | tee -a "$LOG"
    if ((left < 10)); then
        echo "skipped: out of time" | tee -a "$LOG" "$TABLES"
        return
    fi
    echo -e "\n### $name\n" >>"$TABLES"
    timeout "$left" "$@" 2>&1 | tee -a "$LOG"
    local status=${PIPESTATUS[0]}
    ((status == 0)) || echo "FAILED ($name: exit $status)" | tee -a "$LOG" "$TABLES"
}

bench=("$PY" bench/train_step.py --device=$DEVICE "${UNET[@]}" "${TRAIN[@]}" --out="$TABLES")
section env "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and \
torch.cuda.get_device_name(), 'bf16:', torch.cuda.is_available() and torch.cuda.is_bf16_supported())"
tail -n 1 "$LOG" >>"$TABLES"  # the versions
section otcfm "${bench[@]}" \
    --rows=none:fp32,none:bf16,none:bf16+compile,none:bf16+compile+inline,local:bf16+compile,anchor:bf16+compile
section icfm "${bench[@]}" --model=icfm --rows=none:bf16,none:bf16+compile
# Eager, so that the label embedding's few extra kernels weigh as much as they can against the step.
section conditioned "${bench[@]}" --rows=none:bf16,none:bf16+cond,none:bf16,none:bf16+cond
section syncs_icfm "${bench[@]}" --model=icfm --sync_check --steps=3 \
    --rows=none:bf16,local:bf16,anchor:bf16
section syncs_otcfm "${bench[@]}" --sync_check --steps=3 --rows=none:bf16,none:bf16+inline
for batch in "${MEMORY_BATCHES[@]}"; do
    section "memory_$batch" "${bench[@]}" --batch_size=$batch --steps=3 \
        --rows=none:bf16,anchor:bf16
done
section sample "$PY" bench/sample.py --device=$DEVICE "${SAMPLE_UNET[@]}" "${SAMPLE[@]}" --out="$TABLES"
section guided "$PY" bench/sample.py --device=$DEVICE --guided "${SAMPLE_UNET[@]}" "${GUIDED[@]}" --out="$TABLES"
section memorizing_field "$PY" bench/memorizing_field.py --device=$DEVICE "${VSTAR[@]}" --out="$TABLES"
section generalization "$PY" bench/generalization.py --device=$DEVICE "${GENERALIZATION[@]}" --out="$TABLES"
echo "done in $SECONDS s: $TABLES, $LOG" | tee -a "$LOG"
