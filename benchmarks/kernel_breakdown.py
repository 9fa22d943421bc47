"""Where a forward pass's time goes: each CUDA kernel escoin launches for a suite layer, with its
mean duration as the profiler (CUPTI, through torch.profiler) records it, beside the per-call
time of the whole pass in a CUDA graph (what gpu_layers.py reports). The sum of the kernels'
durations can exceed the graph time, since dependent launches overlap a kernel with the tail of
the one before; the difference from the graph time is what launches and gaps cost. A one-element
kernel's graph time is printed first: the least any launch costs.

    python benchmarks/kernel_breakdown.py --layers rn.l3.3x3 alex.c3 --batches 1 [--tensor-cores]
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from typing import Dict

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from escoin_times import SUITE, layer_call  # noqa: E402
from gpu_timing import time_ms  # noqa: E402

CALLS = 50  # profiled calls per case: the kernels' means are over these


def kernel_means_us(torch, run) -> Dict[str, float]:
    """Mean duration of each kernel name over CALLS calls of run, in microseconds."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            run()
        torch.cuda.synchronize()
    total: Dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type.name == "CUDA":
            total[event.name] += event.device_time
    return {name: us / CALLS for name, us in total.items()}


def short_name(kernel: str) -> str:
    """'void escoin::(anonymous namespace)::staged_conv_kernel<1, 7, true, false>(...)' ->
    'staged_conv_kernel'."""
    name = kernel.replace("(anonymous namespace)::", "").split("<")[0].split("(")[0]
    return name.split("::")[-1]


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", default=list(SUITE), choices=list(SUITE))
    parser.add_argument("--batches", nargs="+", type=int, default=[1])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--tensor-cores", action="store_true")
    args = parser.parse_args()
    tiny = torch.zeros(1, device="cuda")
    print(f"a one-element kernel per call in a graph (the launch floor): "
          f"{time_ms(torch, lambda: tiny.add_(1)) * 1e3:.2f} us")
    for batch in args.batches:
        for name in args.layers:
            run, _, _ = layer_call(torch, SUITE[name], batch, args.sparsity, 1,
                                   np.random.default_rng(0), args.tensor_cores)
            graph_us = time_ms(torch, run) * 1e3
            kernels = kernel_means_us(torch, run)
            parts = "  ".join(f"{short_name(k)} {v:.2f}"
                              for k, v in sorted(kernels.items(), key=lambda kv: -kv[1]))
            print(f"{name:<12} N={batch:<3} graph {graph_us:7.2f} us | kernels "
                  f"{sum(kernels.values()):7.2f} us: {parts}", flush=True)


if __name__ == "__main__":
    main()
