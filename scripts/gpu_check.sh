#!/usr/bin/env bash
# On a CUDA machine: build escoin from this checkout, run every test (GPU ones included), then the
# GPU layer benchmark; prints the benchmark table last. Usage:
#   bash scripts/gpu_check.sh [--quick] [--gpu-tests] [--sanitize] [--networks] [--half] [--probes]
#                             [--blocks] [--no-layers] [--graphs-only] [--training]
# (--quick: 90% sparsity only; --blocks: the layer and network benchmarks also on filters pruned
# in blocks of four output channels, which the staged kernel's row-group form runs; --no-layers:
# no layer benchmark; --graphs-only: the network benchmark with CUDA graphs only; --gpu-tests:
# only the tests marked `cuda`, leaving the CPU ones to CI, among them escoin-jax's LeNet5
# example, which runs on JAX's default device, the GPU here;
# --networks: also the whole-network benchmark; --half: also the 16-bit layer benchmark
# (benchmarks/gpu_half.py); --probes: also the probes of what a loop can reach,
# benchmarks/shared_load_ceiling_probe.cu and scripts/tensor_core_probes.sh; results go to $OUT
# or benchmarks/results; --training: also a sparse-training step of ResNet-50 against a dense
# one, benchmarks/sparse_training.py). The build is for
# ESCOIN_CUDA_ARCHITECTURES (default 90); 80-virtual checks on a Hopper GPU the code that Ampere
# and Ada GPUs run. ESCOIN_WHEEL=path installs that wheel of escoin instead of building it here
# (one built from this checkout for the GPU machine's Python, e.g. on a machine with nvcc:
# ESCOIN_CUDA=ON ESCOIN_CUDA_ARCHITECTURES=90 python3.12 -m pip wheel --no-deps . -w DIR),
# which spares the GPU machine's time the build.
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
quick=0; sanitize=0; networks=0; half=0; probes=0; training=0; blocks=(1); layers=1; graphs=both
only=()
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;; --sanitize) sanitize=1 ;; --networks) networks=1 ;; --half) half=1 ;;
    --probes) probes=1 ;; --training) training=1 ;; --blocks) blocks=(1 4) ;;
    --no-layers) layers=0 ;;
    --graphs-only) graphs=on ;;
    --gpu-tests) only=(-m cuda) ;;
  esac
done
# Test-only packages may be carried as wheels in .whl/ where the machine has no network.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/escoin-site .whl/*.whl
  export PYTHONPATH=/tmp/escoin-site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== build"
if [ -n "${ESCOIN_WHEEL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --force-reinstall "$ESCOIN_WHEEL" 2>&1 | tail -3
else
  ESCOIN_CUDA=ON ESCOIN_CUDA_ARCHITECTURES="${ESCOIN_CUDA_ARCHITECTURES:-90}" \
    python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
fi
python3 -m pip install -q --no-build-isolation --no-deps ./adapters/torch 2>&1 | tail -3 ||
  echo "escoin-torch did not install"
python3 -m pip install -q --no-build-isolation --no-deps ./adapters/jax 2>&1 | tail -3 ||
  echo "escoin-jax did not install"
python3 -m pip install -q --no-build-isolation --no-deps ./adapters/cupy 2>&1 | tail -3 ||
  echo "escoin-cupy did not install"
python3 -c "import escoin; print(escoin.build_info(), 'cuda_available:', escoin.cuda_available())"
echo "== tests"
python3 -m pytest -q -rs ${only[@]+"${only[@]}"} tests adapters/*/tests --continue-on-collection-errors -p no:cacheprovider 2>&1 | tee "$out/pytest.log" | tail -15 ||
  echo "TESTS FAILED (the benchmark still runs)"
# GPUs with 100 KB of shared memory per SM run the staged kernel's other form (entries handed out
# by shuffles): the GPU tests again in that form.
ESCOIN_SHUFFLED_ENTRIES=1 python3 -m pytest -q -m cuda tests/test_cuda.py \
  tests/test_half_precision.py -p no:cacheprovider 2>&1 |
  tee "$out/pytest_shuffled_entries.log" | tail -2 | sed 's/^/shuffled entries: /' ||
  echo "TESTS FAILED (shuffled entries)"
# Every staged program in its row-group form (tile_program.hpp), which the tests' random filters
# take only where it is cheaper: the same GPU tests again with it forced.
ESCOIN_TILE_FORM=groups python3 -m pytest -q -m cuda tests/test_cuda.py \
  tests/test_half_precision.py -p no:cacheprovider 2>&1 |
  tee "$out/pytest_row_groups.log" | tail -2 | sed 's/^/row groups: /' ||
  echo "TESTS FAILED (row groups)"
if [ "$sanitize" = 1 ]; then
  echo "== compute-sanitizer (memcheck) on the GPU tests"
  compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest -q -x -m cuda \
    tests/test_cuda.py tests/test_cuda_tensor_cores.py tests/test_half_precision.py \
    -p no:cacheprovider -k "not random_geometry and not residual_on_the_tensor_cores" 2>&1 |
    tail -5 || echo "MEMCHECK FAILED (the benchmarks still run)"
fi
if [ "$networks" = 1 ]; then
  echo "== networks"
  for block in "${blocks[@]}"; do
    echo "-- pruned in blocks of $block output channels"
    python3 -m escoin_torch.bench --batches 1 32 --graphs "$graphs" --block "$block" \
      --out "$out/networks_block$block" 2>/dev/null | tail -40
  done
fi
if [ "$half" = 1 ]; then
  echo "== 16-bit layer benchmark"
  python3 benchmarks/gpu_half.py --batches 1 32 --out "$out" 2>/dev/null ||
    echo "16-BIT CHECK FAILED"
fi
if [ "$probes" = 1 ]; then
  echo "== shared-memory ceiling probe"
  { nvcc -O3 -arch=sm_90 -o /tmp/shared_load_ceiling_probe \
      benchmarks/shared_load_ceiling_probe.cu && /tmp/shared_load_ceiling_probe; } 2>&1 |
    tee "$out/shared_load_ceiling_probe.txt" || echo "CEILING PROBE FAILED"
  echo "== tensor-core probes"
  OUT="$out" bash scripts/tensor_core_probes.sh 2>&1 | grep -v "^$" | tail -60 ||
    echo "PROBES FAILED"
fi
if [ "$training" = 1 ]; then
  echo "== sparse training (ResNet-50 at 90%, batch 32)"
  python3 benchmarks/sparse_training.py --steps 5 2>/dev/null || echo "TRAINING BENCHMARK FAILED"
fi
if [ "$layers" = 0 ]; then exit 0; fi
echo "== layer benchmark"
if [ "$quick" = 1 ]; then
  python3 benchmarks/gpu_layers.py --sparsities 0.9 --batches 1 32 --blocks "${blocks[@]}" \
    --out "$out" 2>/dev/null
else
  python3 benchmarks/gpu_layers.py --sparsities 0.8 0.9 0.95 --batches 1 32 \
    --blocks "${blocks[@]}" --out "$out" 2>/dev/null
fi
