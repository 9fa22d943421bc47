"""GPU 16-bit benchmark: escoin with float16 and bfloat16 activations (computed in float32, each
output rounded once) beside escoin float32 and cuDNN's 16-bit convolutions, per suite layer.

    python benchmarks/gpu_half.py --batches 1 32

What a user of a `model.half()` (or `.bfloat16()`) network gets from escoin's layers: the dense
16-bit alternative is cuDNN on the tensor cores, in channels_last (as a deployment would run it)
and in NCHW (as `model.half()` leaves it). Every case is checked in the same run against
float64 F.conv2d of the same 16-bit x and weights: escoin's relative-norm error must be within
one rounding step of the type (2^-10, 2^-7), and is printed beside cuDNN's in the same type.
(Not per element in units in the last place: where the products nearly cancel, an output is
tiny against them, and any float32 sum of them is many of its 16-bit steps off.) Times as in
gpu_layers.py (per call, in CUDA graphs of back-to-back calls). Writes JSON; prints a table
last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from gpu_layers import escoin_case, gpu_operands, relative_error  # noqa: E402
from gpu_timing import time_ms  # noqa: E402
from suite import LAYERS, Layer, geomean, layers  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety
    def tqdm(items, **_):  # type: ignore[no-redef]
        return items

DTYPES = ("float16", "bfloat16")
# A rounding step of each type, relative: the error allowed against float64 (as in the tests).
TOLERANCE = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}


def measure(torch, F, layer: Layer, batch: int, sparsity: float,
            rng: np.random.Generator) -> Dict:
    x32, w32 = gpu_operands(torch, layer, batch, sparsity, rng)
    s, p = layer.stride, layer.padding
    fp32 = escoin_case(torch, F, layer, x32, w32)
    row = dict(layer=layer.name, batch=batch, sparsity=sparsity, nnz=fp32.nnz,
               escoin_float32=time_ms(torch, fp32.run), rel_err_float32=fp32.rel_err)
    for name in DTYPES:
        x, w = x32.to(getattr(torch, name)), w32.to(getattr(torch, name))
        case = escoin_case(torch, F, layer, x, w)
        row[f"rel_err_{name}"] = case.rel_err
        row[f"escoin_{name}"] = time_ms(torch, case.run)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        w_cl = w.contiguous(memory_format=torch.channels_last)
        row[f"rel_err_cudnn_{name}"] = relative_error(
            F.conv2d(x_cl, w_cl, stride=s, padding=p),
            F.conv2d(x.double(), w.double(), stride=s, padding=p))
        row[f"cudnn_{name}_cl"] = time_ms(torch,
                                          lambda: F.conv2d(x_cl, w_cl, stride=s, padding=p))
        row[f"cudnn_{name}"] = time_ms(torch, lambda: F.conv2d(x, w, stride=s, padding=p))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    import escoin
    import torch
    import torch.nn.functional as F

    torch.set_grad_enabled(False)
    torch.backends.cudnn.benchmark = True
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; cuDNN "
          f"{torch.backends.cudnn.version()}; escoin {escoin.__version__}")
    rng = np.random.default_rng(0)
    cases = [(l, n) for l in layers(args.nets) for n in args.batches]
    rows = [measure(torch, F, l, n, args.sparsity, rng)
            for l, n in tqdm(cases, desc="cases", file=sys.stderr)]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_half.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)

    times = ["escoin_float32"] + [t for d in DTYPES
                                  for t in (f"escoin_{d}", f"cudnn_{d}", f"cudnn_{d}_cl")]
    print(f"{'layer':<13}{'N':>3}" + "".join(f"{t.replace('escoin_', 'e_'):>17}" for t in times)
          + "".join(f"{'err ' + n:>15}" for n in DTYPES))
    for r in rows:
        print(f"{r['layer']:<13}{r['batch']:>3}" + "".join(f"{r[t] * 1e3:>14.1f} us" for t in times)
              + "".join(f"{r['rel_err_' + n]:>15.1e}" for n in DTYPES))
    print(f"\ngeometric means at {args.sparsity:.0%} sparsity: escoin's time in each 16-bit type "
          "over escoin float32's, and escoin's speed-up over cuDNN in the same type")
    print(f"{'N':>3}" + "".join(f"{n + ' / fp32':>18}{'x cuDNN ' + n:>22}{'x cuDNN cl':>14}"
                                for n in DTYPES))
    for n in args.batches:
        sel = [r for r in rows if r["batch"] == n]
        print(f"{n:>3}" + "".join(
            f"{geomean(r['escoin_' + d] / r['escoin_float32'] for r in sel):>18.3f}"
            f"{geomean(r['cudnn_' + d] / r['escoin_' + d] for r in sel):>22.2f}"
            f"{geomean(r['cudnn_' + d + '_cl'] / r['escoin_' + d] for r in sel):>14.2f}"
            for d in DTYPES))
    passed = True
    for d in DTYPES:
        worst = max(r["rel_err_" + d] for r in rows)
        passed = passed and worst <= TOLERANCE[d]
        print(f"{d}: max relative error vs float64 {worst:.2e} "
              f"({'PASS' if worst <= TOLERANCE[d] else 'FAIL'} at {TOLERANCE[d]:.1e}); cuDNN's "
              f"in {d} {max(r['rel_err_cudnn_' + d] for r in rows):.2e}")
    print(f"float32: max relative error {max(r['rel_err_float32'] for r in rows):.2e}")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
