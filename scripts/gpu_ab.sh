#!/usr/bin/env bash
# On a CUDA machine: this tree against another escoin source tree ("base"), both built for one
# GPU architecture side by side; this tree's GPU tests of the staged kernel, then escoin alone on
# the chosen suite layers (base, this tree, base again: its spread), the comparison printed last.
#   git archive --prefix=.ab-base/ HEAD | tar -x       # base = the last commit (ignored by git)
#   bash scripts/gpu_ab.sh [--tensor-cores] .ab-base [LAYER ...]   # default: the whole suite
# --tensor-cores: the tensor-core kernel's GPU tests instead, and that kernel timed.
# A second variant in the same call: git archive --prefix=.ab-v2/ BRANCH | tar -x, then
#   (cd .ab-v2 && OUT=$OUT/v2 PYTHONPATH=/tmp/escoin-site bash scripts/gpu_ab.sh ../.ab-base)
#   (/tmp/escoin-site: the test wheels the first run installed; add --tensor-cores as needed)
# ESCOIN_BASE_CUDA_ARCHITECTURES builds the base for other architectures than this tree (e.g. this
# tree for 80-virtual, the code Ampere GPUs run, JIT-compiled on a Hopper one; the base for 90).
# Results go to $OUT or benchmarks/results.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
tensor_cores=()
if [ "${1:-}" = --tensor-cores ]; then tensor_cores=(--tensor-cores); shift; fi
base_src="${1:?usage: bash scripts/gpu_ab.sh BASE_DIR [LAYER ...]}"
shift
layers=("$@")
out="${OUT:-benchmarks/results}"
base_site=/tmp/escoin-ab-base
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
export ESCOIN_CUDA=ON ESCOIN_CUDA_ARCHITECTURES="${ESCOIN_CUDA_ARCHITECTURES:-90}"
echo "== build (base and this tree, in parallel)"
(cd "$base_src" &&
   ESCOIN_CUDA_ARCHITECTURES="${ESCOIN_BASE_CUDA_ARCHITECTURES:-$ESCOIN_CUDA_ARCHITECTURES}" \
   python3 -m pip install -q --no-build-isolation --no-deps --upgrade \
   --target "$base_site" . > "$out/build_base.log" 2>&1; echo "base build rc $?") &
python3 -m pip install -q --no-build-isolation --no-deps . > "$out/build.log" 2>&1
echo "build rc $?"
wait
if [ -d .whl ]; then  # test-only packages carried as wheels where the machine has no network
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/escoin-site .whl/*.whl
  export PYTHONPATH=/tmp/escoin-site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "${#tensor_cores[@]}" -gt 0 ]; then
  echo "== this tree's tensor-core GPU tests"
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda_tensor_cores.py \
    > "$out/tests_tensor_cores.log" 2>&1
  tail -1 "$out/tests_tensor_cores.log"
else
  echo "== this tree's GPU tests (deterministic, then the staged kernel's hypothesis tests)"
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    -k "not random_geometry and not residual" > "$out/tests_deterministic.log" 2>&1
  tail -1 "$out/tests_deterministic.log"
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    -k "random_geometry_on_the_staged or residual_on_the_staged" > "$out/tests_staged.log" 2>&1
  tail -1 "$out/tests_staged.log"
fi
echo "== escoin alone: base, this tree, base again"
choice=()
[ "${#layers[@]}" -gt 0 ] && choice=(--layers "${layers[@]}")
for run in base new base_again; do
  site=""
  [ "$run" != new ] && site="$base_site"
  path="$site"
  [ -n "${PYTHONPATH:-}" ] && path="${site:+$site:}$PYTHONPATH"
  PYTHONPATH="$path" python3 benchmarks/escoin_times.py \
    ${tensor_cores[@]+"${tensor_cores[@]}"} ${choice[@]+"${choice[@]}"} \
    --out "$out/ab_$run.json" > /dev/null 2>> "$out/ab_errors.log" ||
    echo "the $run run failed: $out/ab_errors.log"
done
runs=("$out/ab_base.json" "$out/ab_new.json" "$out/ab_base_again.json")
if [ -f "${runs[0]}" ] && [ -f "${runs[1]}" ] && [ -f "${runs[2]}" ]; then
  python3 benchmarks/escoin_times.py --compare "${runs[@]}"
fi
