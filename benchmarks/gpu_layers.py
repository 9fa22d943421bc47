"""GPU layer benchmark: escoin against cuDNN (fp32 strict, TF32, fp16 channels_last), cuSPARSE
lowered (im2col + CSR SpMM), the arithmetic floor and the memory floor, measured side by side in
one run.

    python benchmarks/gpu_layers.py --sparsities 0.8 0.9 0.95 --batches 1 32

Every case is checked against a float64 reference in the same run. Times are per call: medians of
CUDA events around replays of a CUDA graph of back-to-back calls (eager where a path cannot be
captured), after warm-up.
The arithmetic floor is 2 * nnz * N * OH * OW at the measured strict-fp32 rate; the memory floor
is x read once and y written once (float32) at the measured device-memory copy rate. Where x and
y fit the L2 cache together, calls back to back may move less than that through device memory,
so a layer's bound is the larger of the two floors only where they do not (an H100's L2 is 50 MB).
Writes JSON and a PNG (speed-up over TF32 cuDNN per layer and sparsity); prints a table last.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import Callable, Dict, List, NamedTuple, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import escoin  # noqa: E402
from gpu_timing import copy_rate, fp32_rate, time_ms  # noqa: E402
from suite import (LAYERS, Layer, geomean, layers, output_size, pruned_weight,  # noqa: E402
                   sparse_flops)

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety
    def tqdm(items, **_):  # type: ignore[no-redef]
        return items

ANCHORS = ["fp32", "tf32", "fp16", "cusparse"]


def cusparse_lowered(torch, F, x, w, layer: Layer) -> Callable[[], object]:
    n = x.shape[0]
    m, k = w.shape[0], layer.kernel
    oh = output_size(layer)
    csr = w.reshape(m, -1).to_sparse_csr()

    def run():
        cols = F.unfold(x, k, padding=layer.padding, stride=layer.stride)
        b = cols.transpose(0, 1).reshape(cols.shape[1], -1)
        return torch.sparse.mm(csr, b).view(m, n, oh, oh).transpose(0, 1).contiguous()
    return run


def relative_error(y, reference) -> float:
    """||y - reference|| / ||reference||, y (a CUDA tensor of any float dtype) taken in float64."""
    return float((y.double() - reference).norm() / reference.norm())


class EscoinCase(NamedTuple):
    """One prepared escoin call (escoin_case)."""
    run: Callable[[], None]  # the call, writing `out`
    rel_err: float  # of `out` after one call, against float64 F.conv2d of the same x and w
    nnz: int  # the filter's nonzeros
    out: object  # the output tensor, of x's dtype


def escoin_case(torch, F, layer: Layer, x, w, tensor_cores: bool = False) -> EscoinCase:
    """escoin's call of `layer` on the CUDA tensor x (float32, float16 or bfloat16) with the
    pruned weight w (of any of those dtypes; filter, output of x's dtype (poisoned with NaN) and
    workspace prepared once), on the tensor-core kernel or not, run once and checked."""
    s, p = layer.stride, layer.padding
    # A 16-bit weight widens to float32 exactly: the filter holds the values it holds.
    filt = escoin.SparseFilter.from_dense(w.float().cpu().numpy()).cuda(x.device.index or 0)
    oh = output_size(layer)
    out = torch.full((x.shape[0], layer.out_channels, oh, oh), float("nan"), dtype=x.dtype,
                     device="cuda")
    dtype = str(x.dtype).removeprefix("torch.")
    ws = torch.empty(escoin.workspace_size(x.shape, filt, s, p, dtype=dtype,
                                           tensor_cores=tensor_cores),
                     dtype=torch.uint8, device="cuda")

    def run() -> None:
        escoin.conv2d(x, filt, stride=s, padding=p, out=out, workspace=ws,
                      stream=torch.cuda.current_stream().cuda_stream, tensor_cores=tensor_cores)

    run()
    ref = F.conv2d(x.double(), w.double(), stride=s, padding=p)
    return EscoinCase(run, relative_error(out, ref), filt.nnz, out)


def gpu_operands(torch, layer: Layer, batch: int, sparsity: float, rng: np.random.Generator,
                 block: int = 1) -> Tuple[object, object]:
    """A float32 input of `batch` images and a weight pruned to `sparsity` (in blocks of `block`
    output channels: suite.pruned_weight), drawn from rng, on the GPU: (x, w)."""
    weight = pruned_weight(layer, sparsity, rng, block)
    x = rng.standard_normal((batch, layer.in_channels, layer.size, layer.size), dtype=np.float32)
    return torch.from_numpy(x).cuda(), torch.from_numpy(weight).cuda()


def measure(torch, F, layer: Layer, batch: int, sparsity: float, block: int, rate: float,
            bandwidth: float, l2_bytes: int, rng: np.random.Generator) -> Dict:
    x, w = gpu_operands(torch, layer, batch, sparsity, rng, block)
    s, p = layer.stride, layer.padding
    case = escoin_case(torch, F, layer, x, w)
    row = dict(layer=layer.name, batch=batch, sparsity=sparsity, block=block, nnz=case.nnz,
               rel_err=case.rel_err)
    row["escoin"] = time_ms(torch, case.run)
    # The tensor-core kernel where it runs the layer (else the same kernels as above).
    tc = escoin_case(torch, F, layer, x, w, tensor_cores=True)
    row["rel_err_tc"], row["escoin_tc"] = tc.rel_err, time_ms(torch, tc.run)
    torch.backends.cudnn.allow_tf32 = False
    row["fp32"] = time_ms(torch, lambda: F.conv2d(x, w, stride=s, padding=p))
    torch.backends.cudnn.allow_tf32 = True
    row["tf32"] = time_ms(torch, lambda: F.conv2d(x, w, stride=s, padding=p))
    torch.backends.cudnn.allow_tf32 = False
    xh = x.half().to(memory_format=torch.channels_last)
    wh = w.half().to(memory_format=torch.channels_last)
    row["fp16"] = time_ms(torch, lambda: F.conv2d(xh, wh, stride=s, padding=p))
    try:
        row["cusparse"] = time_ms(torch, cusparse_lowered(torch, F, x, w, layer), graph=False)
    except RuntimeError:  # out of memory on the largest lowered matrices
        row["cusparse"] = float("nan")
    row["floor"] = sparse_flops(case.nnz, batch, layer) / rate * 1e3
    row["memory_bytes"] = x.nbytes + case.out.nbytes
    row["memory"] = row["memory_bytes"] / bandwidth * 1e3
    # x and y move through device memory where they do not fit L2 together.
    row["memory_bound"] = row["memory_bytes"] > l2_bytes
    return row


def bound(row: Dict) -> float:
    """The case's lower bound on time: the arithmetic floor, or the memory floor where it is
    larger and x and y together do not fit the L2 cache (module docstring)."""
    return max(row["floor"], row["memory"] if row["memory_bound"] else 0.0)


def plot(rows: List[Dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    batches = sorted({r["batch"] for r in rows})
    prunings = sorted({(r["sparsity"], r["block"]) for r in rows})
    fig, axes = plt.subplots(len(batches), 1, figsize=(12, 4 * len(batches)), squeeze=False)
    for ax, batch in zip(axes[:, 0], batches):
        names = [r["layer"] for r in rows
                 if r["batch"] == batch and (r["sparsity"], r["block"]) == prunings[0]]
        width = 0.8 / len(prunings)
        for i, (sp, block) in enumerate(prunings):
            sel = {r["layer"]: r for r in rows
                   if r["batch"] == batch and (r["sparsity"], r["block"]) == (sp, block)}
            label = f"{sp:.0%}" + (f", blocks of {block}" if block > 1 else "")
            ax.bar(np.arange(len(names)) + i * width, [sel[n]["tf32"] / sel[n]["escoin"]
                                                       for n in names], width, label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=45, ha="right")
        ax.set_ylabel("speed-up over cuDNN TF32")
        ax.set_title(f"escoin fp32 vs cuDNN TF32 (PyTorch default), batch {batch}")
        ax.legend(title="sparsity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9])
    parser.add_argument("--blocks", nargs="+", type=int, default=[1],
                        help="prune in blocks of this many output channels (1: unstructured)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_grad_enabled(False)
    torch.backends.cudnn.benchmark = True
    rate, bandwidth = fp32_rate(torch), copy_rate(torch)
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; cuDNN "
          f"{torch.backends.cudnn.version()}; escoin {escoin.__version__}; strict fp32 matmul "
          f"{rate / 1e12:.1f} TFLOP/s; device-memory copy {bandwidth / 1e9:.0f} GB/s; L2 "
          f"{l2_bytes >> 20} MiB")
    rng = np.random.default_rng(0)
    cases = [(l, n, sp, b) for b in args.blocks for sp in args.sparsities
             for l in layers(args.nets) for n in args.batches]
    rows = [measure(torch, F, l, n, sp, b, rate, bandwidth, l2_bytes, rng)
            for l, n, sp, b in tqdm(cases, desc="cases", file=sys.stderr)]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_layers.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), fp32_rate=rate,
                       copy_rate=bandwidth, l2_bytes=l2_bytes, rows=rows), f, indent=1)
    plot(rows, os.path.join(args.out, "gpu_layers.png"))

    cols = ["escoin", "escoin_tc"] + ANCHORS + ["floor", "memory"]
    print(f"{'layer':<13}{'N':>3}{'sp':>5}{'blk':>4}" + "".join(f"{c:>10}" for c in cols)
          + f"{'err':>9}{'err_tc':>9}")
    for r in rows:
        print(f"{r['layer']:<13}{r['batch']:>3}{r['sparsity']:>5.2f}{r['block']:>4}"
              + "".join(f"{r[c]:>10.4f}" for c in cols)
              + f"{r['rel_err']:>9.1e}{r['rel_err_tc']:>9.1e}")
    print("\ngeometric means of time / floor (lower is better), and escoin's speed-up over each")
    print("(blk: pruned in blocks of that many output channels; 1: unstructured; bound: the")
    print("larger of the arithmetic and memory floors, its column the suite's geomean over the")
    print("floor; esc/bnd: escoin's time over it)")
    timed = cols[:-2]
    print(f"{'sp':>5}{'blk':>4}{'N':>4}" + "".join(f"{c:>10}" for c in timed)
          + "".join(f"{'x' + c:>9}" for c in ANCHORS) + f"{'bound':>7}{'esc/bnd':>8}"
          + f"{'worst/tf32':>16}")
    for b, sp, n in itertools.product(args.blocks, args.sparsities, args.batches):
        sel = [r for r in rows if (r["batch"], r["sparsity"], r["block"]) == (n, sp, b)]
        ratios = [geomean(r[c] / r["floor"] for r in sel) for c in timed]
        speedups = [geomean(r[c] / r["escoin"] for r in sel) for c in ANCHORS]
        bounds = geomean(bound(r) / r["floor"] for r in sel)
        over_bound = geomean(r["escoin"] / bound(r) for r in sel)
        worst = min(sel, key=lambda r: r["tf32"] / r["escoin"])
        print(f"{sp:>5.2f}{b:>4}{n:>4}" + "".join(f"{v:>10.2f}" for v in ratios)
              + "".join(f"{v:>9.2f}" for v in speedups) + f"{bounds:>7.2f}{over_bound:>8.2f}"
              + f"  {worst['layer']} {worst['tf32'] / worst['escoin']:.2f}x")
    for key, name in (("rel_err", "escoin"), ("rel_err_tc", "escoin_tc")):
        worst_err = max(r[key] for r in rows)
        print(f"{name}: max relative error vs float64 {worst_err:.2e} "
              f"({'PASS' if worst_err <= 1e-5 else 'FAIL'} at 1e-5)")


if __name__ == "__main__":
    main()
