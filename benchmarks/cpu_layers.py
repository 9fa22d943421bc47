"""CPU layer benchmark: escoin against a framework's dense CPU convolution on pruned layers.

    python benchmarks/cpu_layers.py --sparsity 0.9 --batches 1 8 [--dtype bfloat16]
    python benchmarks/cpu_layers.py --framework jax     # escoin-jax against XLA's conv, jitted

Prints a table of per-layer times and speed-ups and their geometric mean; writes JSON. With
--framework torch (the default) escoin.conv2d runs against torch's conv2d (oneDNN); with jax,
escoin_jax.conv2d against lax.conv_general_dilated, both under jax.jit. Both sides compute in
--dtype (the dense side in that dtype; escoin stores 16-bit types and computes in float32); the
error is against float64 on the same inputs. bfloat16 NumPy arrays need the ml_dtypes package.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import escoin  # noqa: E402
from suite import LAYERS, geomean, layers, pruned_weight, sparse_flops  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety
    def tqdm(items, **_):  # type: ignore[no-redef]
        return items


def median_seconds(fn: Callable[[], object], min_time: float = 0.3, min_reps: int = 3) -> float:
    fn()  # warm-up: caches, thread pool, stretched offsets
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--framework", default="torch", choices=["torch", "jax"])
    parser.add_argument("--json", default=None,
                        help="default: benchmarks/results/cpu_layers[_jax].json")
    args = parser.parse_args()
    dtype = np.dtype(args.dtype) if args.dtype != "bfloat16" else _numpy_bfloat16()
    json_path = args.json or ("benchmarks/results/cpu_layers.json" if args.framework == "torch"
                              else "benchmarks/results/cpu_layers_jax.json")
    pair = _torch_pair if args.framework == "torch" else _jax_pair

    rng = np.random.default_rng(0)
    rows: List[Dict] = []
    cases = [(layer, n) for layer in layers(args.nets) for n in args.batches]
    print(f"escoin {escoin.__version__} CPU, {escoin.build_info()['openmp_threads']} threads; "
          f"{_framework_line(args.framework)}; sparsity {args.sparsity}; {args.dtype}")
    for layer, n in tqdm(cases, desc="layers", file=sys.stderr):
        weight = pruned_weight(layer, args.sparsity, rng).astype(dtype)
        x = rng.standard_normal((n, layer.in_channels, layer.size, layer.size)).astype(dtype)
        filt = escoin.SparseFilter.from_dense(weight)
        dense, sparse = pair(x, weight, filt, layer, args.dtype)
        ref = _reference(x, weight, layer)
        err = float(np.linalg.norm(np.asarray(sparse(), np.float64) - ref) / np.linalg.norm(ref))
        t_dense = median_seconds(dense)
        t_escoin = median_seconds(sparse)
        flops = sparse_flops(filt.nnz, n, layer)
        rows.append(dict(layer=layer.name, batch=n, dense_ms=t_dense * 1e3,
                         escoin_ms=t_escoin * 1e3, speedup=t_dense / t_escoin,
                         escoin_gflops=flops / t_escoin / 1e9, rel_err=err))
    print(f"{'layer':<14}{'N':>3}{'dense ms':>11}{'escoin ms':>11}{'speed-up':>10}"
          f"{'GFLOP/s':>9}{'rel err':>10}")
    for r in rows:
        print(f"{r['layer']:<14}{r['batch']:>3}{r['dense_ms']:>11.2f}{r['escoin_ms']:>11.2f}"
              f"{r['speedup']:>9.2f}x{r['escoin_gflops']:>9.1f}{r['rel_err']:>10.1e}")
    for n in args.batches:
        g = geomean(r["speedup"] for r in rows if r["batch"] == n)
        print(f"geometric-mean speed-up over {args.framework}'s dense CPU convolution, batch {n}: "
              f"{g:.2f}x")
    print(f"geometric-mean speed-up, all: {geomean(r['speedup'] for r in rows):.2f}x; "
          f"max rel err {max(r['rel_err'] for r in rows):.1e}")
    os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(dict(sparsity=args.sparsity, dtype=args.dtype, framework=args.framework,
                       rows=rows), f, indent=1)


def _framework_line(framework: str) -> str:
    if framework == "torch":
        import torch
        return f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    import jax
    return f"jax {jax.__version__} on {jax.devices('cpu')[0].device_kind}"


def _reference(x: np.ndarray, weight: np.ndarray, layer: object) -> np.ndarray:
    """float64 on the same (possibly 16-bit) inputs, through torch (which holds every 16-bit
    value in float64)."""
    import torch
    import torch.nn.functional as F

    x64, w64 = (torch.from_numpy(a.astype(np.float64)) for a in (x, weight))
    with torch.no_grad():
        return F.conv2d(x64, w64, stride=layer.stride, padding=layer.padding).numpy()


def _torch_pair(x: np.ndarray, weight: np.ndarray, filt: escoin.SparseFilter, layer: object,
                dtype: str) -> Tuple[Callable[[], object], Callable[[], object]]:
    """torch's conv2d in `dtype`, and escoin.conv2d into a reused output."""
    import torch
    import torch.nn.functional as F

    torch.set_grad_enabled(False)
    torch_dtype = getattr(torch, dtype)
    xt, wt = (torch.from_numpy(a.astype(np.float64)).to(torch_dtype) for a in (x, weight))
    out = escoin.conv2d(x, filt, stride=layer.stride, padding=layer.padding)
    return (lambda: F.conv2d(xt, wt, stride=layer.stride, padding=layer.padding),
            lambda: escoin.conv2d(x, filt, stride=layer.stride, padding=layer.padding, out=out))


def _jax_pair(x: np.ndarray, weight: np.ndarray, filt: escoin.SparseFilter, layer: object,
              dtype: str) -> Tuple[Callable[[], object], Callable[[], object]]:
    """XLA's convolution and escoin_jax.conv2d, each jitted, on the same device array (each call
    waits for its result)."""
    import escoin_jax
    import jax
    from jax import lax

    xj, wj = jax.device_put(x), jax.device_put(weight)
    pad = ((layer.padding, layer.padding), (layer.padding, layer.padding))
    dense = jax.jit(lambda x, w: lax.conv_general_dilated(
        x, w, (layer.stride, layer.stride), pad, dimension_numbers=("NCHW", "OIHW", "NCHW"),
        precision=lax.Precision.HIGHEST))
    sparse = jax.jit(lambda x: escoin_jax.conv2d(x, filt, stride=layer.stride,
                                                 padding=layer.padding))
    return (lambda: dense(xj, wj).block_until_ready(),
            lambda: sparse(xj).block_until_ready())


def _numpy_bfloat16() -> np.dtype:
    try:
        import ml_dtypes
    except ImportError:
        sys.exit("--dtype bfloat16 needs the ml_dtypes package (pip install ml_dtypes)")
    return np.dtype(ml_dtypes.bfloat16)


if __name__ == "__main__":
    main()
