#!/usr/bin/env bash
# Produce the benchmark tables of experiments/README.md: ResNet50 training throughput of Flax
# (the train.py step and a bare jit step), Keras and PyTorch at 32x32 and 64x64, the fast-path speedups, and (with
# --cpu-flags) the XLA:CPU compiler-option sweep. Run it on a quiet machine (nothing else running);
# results go to experiments/results/ (JSON per table + benchmark.md with every printed table).
#
#   experiments/run_benchmarks.sh                # ~25-40 min on a 2-core CPU
#   experiments/run_benchmarks.sh --cpu-flags    # + the XLA:CPU flag sweep (~15 min more)
#   DTYPE=bfloat16 BATCH=256 experiments/run_benchmarks.sh   # e.g. on a GPU
#
# Overridable: PYTHON, OUT, SIZES ("32 64"), BATCH (128), STEPS (10), WARMUP (2), DTYPE (float32),
# DATASET (input-pipeline row; default: the extracted CIFAR-10 JPEGs if present, else synthetic).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-experiments/results}
SIZES=${SIZES:-"32 64"}
BATCH=${BATCH:-128}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-2}
DTYPE=${DTYPE:-float32}
if [[ -z "${DATASET:-}" ]]; then
  if [[ -d /tmp/cifar10-jpeg/train ]]; then DATASET=imagefolder:/tmp/cifar10-jpeg; else DATASET=synthetic; fi
fi
mkdir -p "$OUT"
MD="$OUT/benchmark.md"
{
  echo "# Benchmark ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "Command: \`experiments/run_benchmarks.sh $*\` (BATCH=$BATCH STEPS=$STEPS WARMUP=$WARMUP DTYPE=$DTYPE)"
} > "$MD"

for size in $SIZES; do
  echo "== frameworks, ${size}x${size}" >&2
  "$PYTHON" -m cifar_flax.bench --frameworks flax,flax_bare,keras,torch --size "$size" \
    --batch "$BATCH" --steps "$STEPS" --warmup "$WARMUP" --dtype "$DTYPE" --dataset "$DATASET" \
    --json "$OUT/bench_${size}_${DTYPE}.json" | tee -a "$MD"
done

for size in $SIZES; do
  echo "== fast paths, ${size}x${size}" >&2
  { echo; echo "## Fast paths, ${size}x${size}, batch $BATCH"; echo; echo '```'; } >> "$MD"
  "$PYTHON" -m cifar_flax.bench.fastpaths --size "$size" --batch "$BATCH" --steps "$STEPS" \
    --warmup "$WARMUP" --json "$OUT/fastpaths_${size}.json" | tee -a "$MD"
  echo '```' >> "$MD"
done

if [[ "${1:-}" == "--cpu-flags" ]]; then
  echo "== XLA:CPU flags" >&2
  { echo; echo "## XLA:CPU compiler options (bare step, 32x32)"; echo; } >> "$MD"
  "$PYTHON" experiments/cpu_compiler_flags.py --size 32 --batch 64 --batches 32,128 \
    --json "$OUT/cpu_flags.json" | tee -a "$MD"
fi
echo "Wrote $MD and $OUT/*.json" >&2
