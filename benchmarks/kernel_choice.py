"""Which CUDA kernel wins where: the streaming and the staged kernel on the same layers, batches and
sparsities, through escoin.sconv with and without the filter's tile program. It checks the
dispatcher's choices (the staged kernel at every batch, where its tile program is built).

    python benchmarks/kernel_choice.py --batches 8 16 32 --sparsities 0.8 0.9

Layers without a tile program (fewer than 16 output channels per group, rows too wide for
shared memory) run the streaming kernel only and are listed as such. Times are CUDA-graph
medians (gpu_timing.time_ms).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import escoin  # noqa: E402
from gpu_timing import time_ms  # noqa: E402
from suite import LAYERS, Layer, geomean, layers, output_size, pruned_weight  # noqa: E402


def compare(torch, layer: Layer, batch: int, sparsity: float, rng: np.random.Generator) -> Dict:
    weight = pruned_weight(layer, sparsity, rng)
    x = torch.from_numpy(rng.standard_normal(
        (batch, layer.in_channels, layer.size, layer.size), dtype=np.float32)).cuda()
    geometry = dict(stride=layer.stride, padding=layer.padding)
    filt = escoin.SparseFilter.from_dense(weight).cuda(x.device.index or 0)
    arrays = filt.device_pointers(tuple(x.shape), **geometry)
    oh = output_size(layer)
    out = torch.empty((batch, layer.out_channels, oh, oh), device="cuda")
    nbytes = escoin.workspace_size(tuple(x.shape), filt, **geometry)
    ws = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def run(program: int) -> None:
        # The stream is looked up per call: under graph capture it is the capturing stream.
        escoin.sconv(x.data_ptr(), out.data_ptr(), arrays.row_ptr, arrays.offsets,
                     arrays.values, 0, ws.data_ptr(), nbytes, tuple(x.shape), filt.shape,
                     stream=torch.cuda.current_stream().cuda_stream, tile_program_ptr=program,
                     **geometry)

    run(0)
    streaming_out = out.clone()
    row = dict(layer=layer.name, batch=batch, sparsity=sparsity,
               streaming=time_ms(torch, lambda: run(0)), staged=None, difference=None)
    if arrays.tile_program:
        run(arrays.tile_program)
        # The two kernels add in different orders: they agree to rounding, not bitwise.
        row["difference"] = float((out - streaming_out).norm() / streaming_out.norm())
        row["staged"] = time_ms(torch, lambda: run(arrays.tile_program))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    import torch

    torch.set_grad_enabled(False)
    rng = np.random.default_rng(0)
    rows: List[Dict] = [compare(torch, l, n, sp, rng) for sp in args.sparsities
                        for l in layers(args.nets) for n in args.batches]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernel_choice.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)
    print(f"{'layer':<13}{'N':>3}{'sp':>5}{'streaming':>11}{'staged':>9}{'speed-up':>10}"
          f"{'difference':>12}")
    for r in rows:
        staged = ("no program" if r["staged"] is None else
                  f"{r['staged']:9.4f}{r['streaming'] / r['staged']:9.2f}x"
                  f"{r['difference']:12.1e}")
        print(f"{r['layer']:<13}{r['batch']:>3}{r['sparsity']:>5.2f}{r['streaming']:>11.4f}"
              f" {staged}")
    for sp in args.sparsities:
        for n in args.batches:
            sel = [r for r in rows if r["sparsity"] == sp and r["batch"] == n and r["staged"]]
            if sel:
                print(f"sparsity {sp:.2f} batch {n}: staged over streaming, geometric mean over "
                      f"{len(sel)} layers with a program: "
                      f"{geomean(r['streaming'] / r['staged'] for r in sel):.2f}x, worst "
                      f"{min(r['streaming'] / r['staged'] for r in sel):.2f}x")
    differences = [r["difference"] for r in rows if r["difference"] is not None]
    if differences:
        print(f"largest relative difference between the kernels: {max(differences):.1e}")


if __name__ == "__main__":
    main()
