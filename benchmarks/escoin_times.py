"""escoin alone on chosen suite layers, for comparing two builds side by side in one GPU session:
run it once per build (PYTHONPATH picks the build), then compare the JSON files.

    python benchmarks/escoin_times.py --layers rn.l4.3x3 alex.c3 --batches 1 32 --out base.json
    python benchmarks/escoin_times.py --compare base.json new.json [base_again.json]

(`bash scripts/gpu_ab.sh BASE_DIR [LAYER ...]` builds both, tests this tree and does all of it.)

Every case draws the same pruned weight and input in every run (one seed), is checked against
float64 `torch.nn.functional.conv2d`, and is timed as gpu_layers.py times it (median per call in a
CUDA graph of back-to-back calls). With a third file (the first build timed again after the
second) the comparison also prints how far the first build moved against itself: a difference
smaller than that is noise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict, List, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import escoin  # noqa: E402
from gpu_layers import escoin_case, gpu_operands  # noqa: E402
from gpu_timing import time_ms  # noqa: E402
from suite import LAYERS, Layer, geomean  # noqa: E402

SUITE: Dict[str, Layer] = {l.name: l for net in LAYERS.values() for l in net}


def layer_call(torch, layer: Layer, batch: int, sparsity: float, block: int,
               rng: np.random.Generator,
               tensor_cores: bool) -> Tuple[Callable[[], None], float, int]:
    """escoin's call of `layer` on a pruned weight and an input drawn from rng, on the GPU, its
    relative error against float64 (gpu_layers.escoin_case) and the filter's nonzeros."""
    import torch.nn.functional as F

    x, weight = gpu_operands(torch, layer, batch, sparsity, rng, block)
    case = escoin_case(torch, F, layer, x, weight, tensor_cores=tensor_cores)
    return case.run, case.rel_err, case.nnz


def measure(torch, layer: Layer, batch: int, sparsity: float, block: int,
            rng: np.random.Generator, tensor_cores: bool) -> Dict:
    run, err, nnz = layer_call(torch, layer, batch, sparsity, block, rng, tensor_cores)
    return dict(layer=layer.name, batch=batch, sparsity=sparsity, block=block, rel_err=err,
                nnz=nnz, ms=time_ms(torch, run))


def compare(paths: List[str]) -> None:
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append({(r["layer"], r["batch"], r["sparsity"], r.get("block", 1)): r
                         for r in json.load(f)["rows"]})
    base, new = runs[0], runs[1]
    again = runs[2] if len(runs) > 2 else None
    print(f"{'layer':<13}{'N':>3}{'sp':>5}{'blk':>4}{'first us':>10}{'second us':>11}"
          f"{'second/first':>14}"
          + (f"{'first again':>13}" if again else "") + f"{'max err':>9}")
    ratios, spreads = [], []
    for key, b in base.items():
        n = new[key]
        ratios.append(n["ms"] / b["ms"])
        line = (f"{key[0]:<13}{key[1]:>3}{key[2]:>5.2f}{key[3]:>4}{b['ms'] * 1e3:>10.2f}"
                f"{n['ms'] * 1e3:>11.2f}{ratios[-1]:>13.3f}x")
        errors = [b["rel_err"], n["rel_err"]]
        if again:
            spreads.append(again[key]["ms"] / b["ms"])
            errors.append(again[key]["rel_err"])
            line += f"{spreads[-1]:>12.3f}x"
        print(line + f"{max(errors):>9.1e}")
    print(f"geometric mean second/first: {geomean(ratios):.3f}x over {len(ratios)} cases"
          + (f"; first against itself {geomean(spreads):.3f}x (per case "
             f"{min(spreads):.3f}-{max(spreads):.3f})" if spreads else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", choices=list(SUITE), default=list(SUITE))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9])
    parser.add_argument("--blocks", nargs="+", type=int, default=[1],
                        help="prune in blocks of this many output channels (1: unstructured)")
    parser.add_argument("--tensor-cores", action="store_true",
                        help="time the tensor-core kernel (conv2d(..., tensor_cores=True))")
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--compare", nargs="+", metavar="JSON",
                        help="compare runs: first, second[, first again]")
    args = parser.parse_args()
    if args.compare:
        if not 2 <= len(args.compare) <= 3:
            parser.error("--compare takes two or three JSON files")
        compare(args.compare)
        return
    import torch

    torch.set_grad_enabled(False)
    rng = np.random.default_rng(0)
    rows = [measure(torch, SUITE[name], n, sp, b, rng, args.tensor_cores)
            for b in args.blocks for sp in args.sparsities for name in args.layers
            for n in args.batches]
    for r in rows:
        print(f"{r['layer']:<13}{r['batch']:>3}{r['sparsity']:>5.2f}{r['block']:>4}"
              f"{r['ms'] * 1e3:>10.2f} us"
              f"{r['rel_err']:>10.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), escoin=escoin.build_info(),
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
