#!/usr/bin/env bash
# Installs escoin (CUDA kernels compiled in when nvcc is on PATH), escoin-torch, escoin-jax and
# escoin-cupy (CuPy itself only where you install it) into the current Python, with what the demo
# and the tests need. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --upgrade "scikit-build-core>=0.10" "cython>=3.0" numpy tqdm matplotlib \
  pytest hypothesis ml_dtypes
# A CPU build of PyTorch for the adapter and the reference timings, unless one is installed.
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q "torch==2.13.0"
# JAX (its CPU build unless one is installed) for the JAX adapter, which is built against
# the installed escoin's header and jaxlib's XLA FFI headers, so after both; escoin-torch's C++
# kernel likewise against escoin's header and the installed torch.
python3 -c "import jax" 2>/dev/null || python3 -m pip install -q "jax>=0.6"
python3 -m pip install -q --no-build-isolation ./ ./adapters/cupy
python3 -m pip install -q --no-build-isolation ./adapters/torch ./adapters/jax
python3 -c "import escoin; print('escoin', escoin.build_info(), 'GPU usable:', escoin.cuda_available())"
