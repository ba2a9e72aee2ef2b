#!/usr/bin/env bash
# The GPU case of benchmarks/machine.py, sized for one lent GPU (about 12 minutes):
#   bench: `mimkit bench tiny32,base224` at batch 256 in the precisions auto times (bf16 on a GPU that runs it),
#          mimkit eager and compiled against transformers' ViTMAE and lightly's MAE, and the card's matmul rate;
#   curve: the README's time-to-accuracy curve at the step counts the CPU's 5/10/20-minute runs took (STEPS), each
#          scored by k-NN and linear probe as on the CPU.
# Targets: mimkit >= 1.3x the faster peer, and >= 40% of the measured bf16 matmul rate (benchmarks/targets.py).
# Writes OUT/numbers.json and OUT/numbers.md (machine, figures, the README's where the same model measured them).
#
# usage: benchmarks/gpu.sh [CIFAR10 folder or .tar.gz] [output folder]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10-train.tar.gz}
OUT=${2:-runs/gpu}
PY=${PYTHON:-python3}
"$PY" -c "import lightly, transformers" 2>/dev/null || "$PY" -m pip install -q -e ".[bench]"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
"$PY" benchmarks/machine.py --device cuda --parts bench,curve --curve-steps "${STEPS:-42,74,172,240}" \
    --data "$DATA" --out "$OUT"
"$PY" benchmarks/targets.py "$OUT/bench.json" || true
