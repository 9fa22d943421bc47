"""Where an eager call's host time goes: an escoin layer's forward against nn.Conv2d's, per call,
on a layer small enough that the GPU finishes each call before the host has issued the next (so
time per call is host time), then the escoin call split into its parts and profiled.

    python3 benchmarks/host_overhead.py [--device cuda] [--calls 3000]

Eager PyTorch users at small batch see this cost on every layer (CUDA graphs and
torch.compile's "reduce-overhead" mode remove it); docs/performance.md, "Per-call cost without
CUDA graphs", has the history.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from typing import Callable, Dict

import torch
from torch import nn

import escoin
import escoin_torch
from escoin_torch import ops


def per_call_us(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Median over five runs of `calls` back-to-back calls, microseconds a call (synchronised
    before and after each run, so queued GPU work is counted)."""
    runs = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(runs)[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)

    # ResNet-50's layer3 3x3 at batch 1: ~9 us on an H100's GPU, well under the host's cost.
    dense = nn.Conv2d(256, 256, 3, padding=1).to(device).eval()
    with torch.no_grad():
        dense.weight.mul_(torch.rand_like(dense.weight) > 0.9)
    sparse = escoin_torch.SparseConv2d.from_dense(dense).eval()
    x = torch.randn(1, 256, 14, 14, device=device)
    sparse(x)  # compresses the weight and derives this shape's launch

    times: Dict[str, float] = {
        "nn.Conv2d (dense, cuDNN)": per_call_us(lambda: dense(x), args.calls, device),
        "SparseConv2d": per_call_us(lambda: sparse(x), args.calls, device),
    }
    # The layer's call, piece by piece (each alone, on the same arguments).
    state = sparse._current()
    csr, stride, padding, dilation = state.csr, [1, 1], [1, 1], [1, 1]
    shape_args = (x, csr.row_ptr, csr.col_idx, csr.values, list(csr.shape), sparse.bias,
                  stride, padding, dilation, csr.groups)
    kernel_fn = (ops._sparse_conv2d_cuda if device.type == "cuda"
                 else lambda *a: ops._cpu_forward(None, *a))
    pieces: Dict[str, Callable[[], object]] = {
        "  the op's kernel function": lambda: kernel_fn(*shape_args, False, None),
        "  _plain_call checks": lambda: ops._plain_call(device.type, x, csr.row_ptr, csr.col_idx,
                                                        csr.values, sparse.bias, None),
        "  _empty_output (checks, allocation)": lambda: ops._empty_output(*shape_args),
        "  _filter (cache lookup)": lambda: ops._filter(csr.row_ptr, csr.col_idx, csr.values,
                                                        list(csr.shape), csr.groups),
        "  weight stamp check": lambda: sparse._current(),
        "  torch.empty (workspace)": lambda: torch.empty(4096, dtype=torch.uint8, device=device),
    }
    if device.type == "cuda":
        pieces["  torch.cuda.current_stream"] = lambda: torch.cuda.current_stream(device)
        prepared = ops._filter(csr.row_ptr, csr.col_idx, csr.values, list(csr.shape), csr.groups)
        shape = tuple(x.shape)
        geometry = dict(stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation))
        nbytes, arrays = prepared.launch(shape, x.device.index, "float32", **geometry)
        out = torch.empty(1, 256, 14, 14, device=device)
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=device)
        stream = torch.cuda.current_stream(device).cuda_stream

        def sconv() -> None:
            escoin.sconv(x.data_ptr(), out.data_ptr(), arrays.row_ptr, arrays.offsets,
                         arrays.values, sparse.bias.data_ptr(), workspace.data_ptr(), nbytes,
                         shape, tuple(csr.shape), groups=1, relu=False, stream=stream,
                         device=x.device.index, tile_program_ptr=arrays.tile_program,
                         residual_ptr=0, dtype="float32", **geometry)
        pieces["  escoin.sconv (the C call and its launches)"] = sconv
    for name, fn in pieces.items():
        times[name] = per_call_us(fn, args.calls, device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"host time per call, {device} ({name}), torch {torch.__version__}")
    for piece, us in times.items():
        print(f"{piece:<46}{us:>9.1f} us")

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.calls):
        sparse(x)
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(18)
    print(f"\nSparseConv2d, {args.calls} calls under cProfile (tottime: in the function itself)")
    print("\n".join(line for line in text.getvalue().splitlines()[4:] if line.strip()))


if __name__ == "__main__":
    main()
