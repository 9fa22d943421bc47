#!/usr/bin/env bash
# On a CUDA machine (Hopper): the tensor-core probes of docs/performance.md ("Tensor cores at
# fp32 accuracy"): instruction rates, the split products' error on the tensor cores, the inner
# loop with its operand traffic, the sparse MMA's metadata layout, then the per-layer ceilings
# at the measured rates. Outputs go to $OUT or benchmarks/results.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
for probe in mma_rate_probe split_mma_accuracy_probe sparse_mma_loop_probe sparse_mma_metadata_probe; do
  nvcc -O3 -arch=sm_90a -o "/tmp/$probe" "benchmarks/$probe.cu"
  echo "== $probe"
  "/tmp/$probe" | tee "$out/$probe.txt" || echo "$probe exited with an error"
done
floor_rate=$(python3 -c "
import sys, torch; sys.path.insert(0, 'benchmarks')
from gpu_timing import fp32_rate
print(f'{fp32_rate(torch) / 1e12:.1f}')")
echo "== ceilings at the measured rates (strict-fp32 rate $floor_rate TFLOP/s)"
python3 benchmarks/tensor_core_estimate.py --probe "$out/mma_rate_probe.txt" \
  --floor-rate "$floor_rate" | tail -n 22 | tee "$out/tensor_core_estimate.txt"
