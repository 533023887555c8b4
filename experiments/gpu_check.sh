#!/usr/bin/env bash
# First look at a GPU: ResNet50 training throughput of ours against PyTorch (CUDA, channels_last,
# autocast for bf16) at 32/64/160 px in float32 and bfloat16, plus a short real training run
# (configs/scratch.py on the CIFAR-10 JPEGs) with its images/s and MFU. Everything lands in
# experiments/results/gpu/ (JSON per benchmark, train.log, the run's workdir, summary.md).
# Sized for 8 minutes of device time on one GPU.
#
#   experiments/gpu_check.sh                              # on the GPU machine
#   experiments/gpu_check.sh --data ../shared/data/cifar10-jpeg.tar.gz --train-steps 300
#   experiments/gpu_check.sh --dry-run                    # print the plan, run nothing
#   experiments/gpu_check.sh --cpu-smoke --out /tmp/g     # tiny version on a CPU (tests)
#
# Options: --out DIR (experiments/results/gpu), --sizes "32 64 160", --dtypes "float32 bfloat16",
# --frameworks flax,torch, --batch 128, --steps 20, --warmup 3, --train-steps 300,
# --data DIR|TAR.GZ (CIFAR-10 JPEG ImageFolder; default: /tmp/cifar10-jpeg or the shared
# archive, else generated data), --install (pip install -e ".[gpu]" first; needs PyPI),
# --dry-run, --cpu-smoke. PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=experiments/results/gpu
SIZES="32 64 160"
DTYPES="float32 bfloat16"
FRAMEWORKS=flax,torch
BATCH=128
STEPS=20
WARMUP=3
TRAIN_STEPS=300
DATA=""
INSTALL=0
DRY=0
SMOKE=0

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }
need() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value (see --help)"; }
positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) need "$@"; OUT=$2; shift 2 ;;
    --sizes) need "$@"; SIZES=$2; shift 2 ;;
    --dtypes) need "$@"; DTYPES=$2; shift 2 ;;
    --frameworks) need "$@"; FRAMEWORKS=$2; shift 2 ;;
    --batch) need "$@"; positive "$1" "$2"; BATCH=$2; shift 2 ;;
    --steps) need "$@"; positive "$1" "$2"; STEPS=$2; shift 2 ;;
    --warmup) need "$@"; WARMUP=$2; shift 2 ;;
    --train-steps) need "$@"; [[ "$2" =~ ^[0-9]+$ ]] || die "--train-steps must be >= 0"; TRAIN_STEPS=$2; shift 2 ;;
    --data) need "$@"; DATA=$2; shift 2 ;;
    --install) INSTALL=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --cpu-smoke) SMOKE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
for s in $SIZES; do positive "--sizes" "$s"; done
for d in $DTYPES; do [[ "$d" == float32 || "$d" == bfloat16 ]] || die "--dtypes: '$d' is not float32 or bfloat16"; done

BENCH_EXTRA=()
TRAIN_ARGS=(--config configs/scratch.py)
if [[ $SMOKE == 1 ]]; then  # tiny network, a couple of steps, generated data: for CPU tests
  BENCH_EXTRA=(--tiny)
  TRAIN_ARGS=(--config configs/smoke.py)
  DATA=synthetic
fi

# The CIFAR-10 JPEG ImageFolder for the training run (extracted once into /tmp).
if [[ -z "$DATA" ]]; then
  if [[ -d /tmp/cifar10-jpeg/train ]]; then DATA=/tmp/cifar10-jpeg
  elif [[ -f ../shared/data/cifar10-jpeg.tar.gz ]]; then DATA=../shared/data/cifar10-jpeg.tar.gz
  else DATA=synthetic; fi
fi

run() {  # echo the command into the plan; run it unless --dry-run
  echo "+ $*" >> "$OUT/plan.txt"
  if [[ $DRY == 1 ]]; then echo "+ $*"; else "$@"; fi
}

mkdir -p "$OUT"
: > "$OUT/plan.txt"
START=$(date +%s)
if [[ $INSTALL == 1 ]]; then run "$PYTHON" -m pip install -q -e ".[gpu,torch]"; fi
if [[ $DRY == 0 ]]; then
  { date -u +%Y-%m-%dT%H:%MZ; nvidia-smi 2>/dev/null || echo "nvidia-smi: not available";
    "$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())"; } > "$OUT/env.txt" 2>&1
fi

for dtype in $DTYPES; do
  for size in $SIZES; do
    run "$PYTHON" -m cifar_flax.bench --frameworks "$FRAMEWORKS" --size "$size" --batch "$BATCH" \
      --steps "$STEPS" --warmup "$WARMUP" --dtype "$dtype" --input_steps 0 "${BENCH_EXTRA[@]}" \
      --json "$OUT/bench_${size}_${dtype}.json"
  done
done

if [[ $TRAIN_STEPS -gt 0 ]]; then
  if [[ "$DATA" == *.tar.gz ]]; then
    run tar xzf "$DATA" -C /tmp
    DATA=/tmp/cifar10-jpeg
  fi
  [[ "$DATA" == synthetic ]] && DATASET=synthetic || DATASET="imagefolder:$DATA"
  if [[ $DRY == 0 ]]; then rm -rf "$OUT/train"; fi
  run "$PYTHON" -m cifar_flax.main "${TRAIN_ARGS[@]}" --workdir "$OUT/train" \
    --config.dataset="$DATASET" --config.phases[0].steps="$TRAIN_STEPS" \
    --config.checkpoint.every_steps=0 2>&1 | tee "$OUT/train.log"
fi

run "$PYTHON" experiments/gpu_summary.py --out "$OUT"
echo "gpu_check: $(( $(date +%s) - START )) s; results in $OUT/ (summary.md)" >&2
