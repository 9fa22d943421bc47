#!/usr/bin/env bash
# The main job: escoin against the dense convolution PyTorch would run, on the GPU when one is
# usable, else on the CPU. Prints a table; results land in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
if python3 -c "import escoin, sys; sys.exit(0 if escoin.cuda_available() else 1)"; then
  exec python3 benchmarks/gpu_layers.py "$@"
else
  exec python3 benchmarks/cpu_layers.py "$@"
fi
