#!/usr/bin/env bash
# The main job: VGG16, ResNet-50, AlexNet and LeNet5 pruned to 90% (global random unstructured),
# converted with escoin_torch.sparsify, checked against the dense network in float64 and timed
# end to end against dense PyTorch. On a GPU when one is usable (fp32 strict, TF32, fp16, CUDA
# graphs on and off; batches 1 and 32), else on the CPU with --quick inputs (about a minute).
# Extra arguments go to the benchmark (python3 -m escoin_torch.bench --help).
set -euo pipefail
cd "$(dirname "$0")/.."
if python3 -c "import escoin, sys; sys.exit(0 if escoin.cuda_available() else 1)"; then
  exec python3 -m escoin_torch.bench --batches 1 32 "$@"
else
  exec python3 -m escoin_torch.bench --quick "$@"
fi
