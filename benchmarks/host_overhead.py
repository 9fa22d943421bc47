"""Where eager PyTorch's time goes at batch 1: per call of one layer small enough that the GPU
finishes each call before the host has issued the next (so time per call is host time), and
per forward of a whole pruned ResNet-50, escoin's against dense PyTorch's, then escoin's layer
call profiled.

    python3 benchmarks/host_overhead.py [--device cuda] [--calls 3000] [--no-network]
                                        [--compile [--graphs]] [--channels 256] [--size 14]

A call of the op itself is timed too (what torch.compile's code calls per layer). --compile
also times both under torch.compile's default mode (no CUDA graphs), which calls the escoin op
through PyTorch's dispatcher on every layer, with gradients off and in inference mode; --graphs
also in mode "reduce-overhead" (CUDA graphs, which replay the kernels without the host).
--channels and --size set the layer (on a CPU, 16 and 4 make its arithmetic small enough that
host time shows).

Only public escoin-torch calls: the script runs on older builds too, so that two builds can be
timed side by side (PYTHONPATH=the other build's site). Eager PyTorch users at small batch pay
this on every layer (CUDA graphs and torch.compile's "reduce-overhead" mode remove it);
docs/performance.md, "Per-call cost without CUDA graphs", has the history.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import io
import pstats
import time
from typing import Callable

import torch
from torch import nn

import escoin_torch


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


def grad_mode(mode: str) -> contextlib.AbstractContextManager:
    """torch.no_grad() for "no grad", torch.inference_mode() for "inference mode". (Not
    torch.inference_mode(False) for the first: that turns gradients back on.)"""
    return torch.inference_mode() if mode == "inference mode" else torch.no_grad()


def compiled_pair(label: str, dense: nn.Module, sparse: nn.Module, x: torch.Tensor, calls: int,
                  device: torch.device, unit: str, scale: float, mode: str = "default") -> None:
    """Prints the time of a call of torch.compile (in `mode`) of `dense` and of `sparse` on x,
    with gradients off (as the rest of the script) and then in inference mode (where the
    dispatcher skips autograd's layer)."""
    torch.compiler.reset()
    compiled = [torch.compile(dense, mode=mode), torch.compile(sparse, mode=mode)]
    for grads in ("no grad", "inference mode"):
        with grad_mode(grads):
            for model in compiled:
                for _ in range(3):  # compiles (once per grad mode); reduce-overhead records
                    model(x)
            dense_time, sparse_time = (per_call_us(lambda: model(x), calls, device) / scale
                                       for model in compiled)
        row = f"{label}, compiled{'' if mode == 'default' else ', ' + mode}, {grads}"
        print(f"{row:<66}{dense_time:>9.2f} {unit} dense"
              f"{sparse_time:>9.2f} {unit} escoin")


def op_call(layer: nn.Module, x: torch.Tensor, calls: int, device: torch.device) -> None:
    """Prints the time of a call of torch.ops.escoin.sparse_conv2d (what a compiled model calls
    per layer) on the layer's CSR, with gradients off and in inference mode."""
    csr = layer.csr
    geometry = ([int(v) for v in layer.stride], [int(v) for v in layer.padding],
                [int(v) for v in layer.dilation])
    args = (x, csr.row_ptr, csr.col_idx, csr.values, list(csr.shape), layer.bias, *geometry,
            layer.groups, False)
    op = torch.ops.escoin.sparse_conv2d
    times = []
    for mode in ("no grad", "inference mode"):
        with grad_mode(mode):
            times.append(per_call_us(lambda: op(*args), calls, device))
    row = "torch.ops.escoin.sparse_conv2d, a call"
    print(f"{row:<66}{times[0]:>9.2f} us no grad{times[1]:>9.2f} us inference mode")


def pruned_resnet50(device: torch.device) -> nn.Module:
    """torchvision's ResNet-50 with 90% of its conv weights pruned at random (globally), in eval
    mode; the dense network both sides start from."""
    from escoin_torch.bench.models import build
    from escoin_torch.bench.prune import prune_convs

    return prune_convs(build("resnet50"), 0.9, "random").to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--no-network", action="store_true", help="the layer only")
    parser.add_argument("--compile", action="store_true",
                        help="also under torch.compile (default mode)")
    parser.add_argument("--graphs", action="store_true",
                        help="with --compile on a GPU, also mode='reduce-overhead' (CUDA graphs)")
    parser.add_argument("--channels", type=int, default=256,
                        help="the layer's input and output channels")
    parser.add_argument("--size", type=int, default=14, help="the layer's input height and width")
    args = parser.parse_args()
    device = torch.device(args.device)
    compile_modes = ["default"] + (["reduce-overhead"] if args.graphs and device.type == "cuda"
                                   else [])
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"host time, {device} ({name}), torch {torch.__version__}, escoin-torch from "
          f"{escoin_torch.__file__.rsplit('/', 2)[0]}")

    # By default ResNet-50's layer3 3x3 at batch 1: ~9 us on an H100's GPU, well under the
    # host's cost.
    channels, size = args.channels, args.size
    dense = nn.Conv2d(channels, channels, 3, padding=1).to(device).eval()
    dense.weight.mul_(torch.rand_like(dense.weight) > 0.9)
    sparse = escoin_torch.SparseConv2d.from_dense(dense).eval()
    x = torch.randn(1, channels, size, size, device=device)
    sparse(x)
    layer = f"one layer ({channels} -> {channels}, 3x3, {size}x{size}), a call"
    print(f"{layer:<46}"
          f"{per_call_us(lambda: dense(x), args.calls, device):>9.1f} us nn.Conv2d"
          f"{per_call_us(lambda: sparse(x), args.calls, device):>9.1f} us SparseConv2d")
    op_call(sparse, x, args.calls, device)
    if args.compile:
        for mode in compile_modes:
            compiled_pair(layer, dense, sparse, x, args.calls, device, "us", 1.0, mode)

    if not args.no_network:
        model = pruned_resnet50(device)
        dense_net = escoin_torch.fuse_for_inference(copy.deepcopy(model))
        sparse_net, _ = escoin_torch.sparsify(model)
        sparse_net = escoin_torch.fuse_for_inference(sparse_net)
        image = torch.randn(1, 3, 224, 224, device=device)
        dense_net(image), sparse_net(image)
        forwards = max(20, args.calls // 60)
        print(f"{'ResNet-50 at 90%, batch 1, a forward':<46}"
              f"{per_call_us(lambda: dense_net(image), forwards, device) / 1e3:>9.2f} ms dense"
              f"{per_call_us(lambda: sparse_net(image), forwards, device) / 1e3:>12.2f} ms "
              "escoin")
        if args.compile:
            for mode in compile_modes:
                compiled_pair("ResNet-50 at 90%, batch 1, a forward", dense_net, sparse_net,
                              image, forwards, device, "ms", 1e3, mode)

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.calls):
        sparse(x)
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(14)
    print(f"\nSparseConv2d, {args.calls} calls under cProfile (tottime: in the function itself)")
    print("\n".join(line for line in text.getvalue().splitlines()[4:] if line.strip()))


if __name__ == "__main__":
    main()
