"""Timing the sparse and dense paths of a layer, for calibration and benchmarking.

Which path is faster depends on the layer's geometry, density, batch and device, so it is measured
on the real input rather than predicted. GPU work is timed with CUDA events on the current stream
(host timers would measure launch, not execution); CPU work with ``time.perf_counter``. The median
of several runs is used because single runs are noisy (allocator warm-up, frequency scaling).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from escoin_torch.layer import Path, SparseConv2d

__all__ = ["PathTimes", "time_call", "time_paths"]


@dataclass(frozen=True)
class PathTimes:
    """Median seconds per forward of each path of one layer."""

    sparse_s: float
    dense_s: float

    @property
    def faster(self) -> Path:
        return "sparse" if self.sparse_s <= self.dense_s else "dense"


def time_call(fn: Callable[[], object], device: torch.device, repeats: int = 20,
              warmup: int = 3) -> float:
    """Median seconds of ``fn()`` on ``device`` after ``warmup`` untimed calls (which also build
    caches: the CSR, escoin's filter upload and stretched offsets)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            start_s = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start_s)
    return statistics.median(samples)


def time_paths(layer: SparseConv2d, x: torch.Tensor, repeats: int = 20,
               warmup: int = 3) -> PathTimes:
    """Times ``layer``'s sparse and dense forward on ``x`` (without autograd, as in inference)."""
    with torch.no_grad():
        return PathTimes(time_call(lambda: layer.sparse_forward(x), x.device, repeats, warmup),
                         time_call(lambda: layer.dense_forward(x), x.device, repeats, warmup))
