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
from typing import Callable, Optional

import torch

from escoin_torch.layer import Path, SparseConv2d

__all__ = ["GRAPH_CALLS", "PathTimes", "capture_graph", "time_call", "time_paths"]


@dataclass(frozen=True)
class PathTimes:
    """Median seconds per forward of each path of one layer."""

    sparse_s: float
    dense_s: float

    @property
    def faster(self) -> Path:
        return "sparse" if self.sparse_s <= self.dense_s else "dense"


def time_call(fn: Callable[[], object], device: torch.device, repeats: int = 20,
              warmup: int = 3, graphs: bool = False, back_to_back: int = 1) -> float:
    """Median seconds of ``fn()`` on ``device`` after ``warmup`` untimed calls (which also build
    caches: the CSR, escoin's filter upload and stretched offsets).

    With ``graphs`` (CUDA only) each sample is one replay of a CUDA graph of
    ``GRAPH_CALLS`` back-to-back calls, divided by that count: the time per call that a model
    captured in a CUDA graph (or compiled with ``mode="reduce-overhead"``) sees, without the
    launch cost that eager calls pay. Eagerly, each sample is ``back_to_back`` calls in a row,
    divided by that count: with more than one, the time a call costs among others, as a layer's
    does in a model's eager forward, where the host issues the next call while the GPU runs
    this one (the larger of the call's host and GPU time, where one call alone between two
    events shows its launch latency and its kernels).
    """
    for name, value, least in (("repeats", repeats, 1), ("warmup", warmup, 0),
                               ("back_to_back", back_to_back, 1)):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    if graphs:
        if device.type != "cuda":
            raise ValueError(f"graphs=True times CUDA graphs, but the device is {device}")
        graph = capture_graph(fn, device, GRAPH_CALLS, warmup)
        return time_call(graph.replay, device, repeats, warmup=1) / GRAPH_CALLS
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for _ in range(back_to_back):
                fn()
            end.record(stream)
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / back_to_back)
    else:
        for _ in range(repeats):
            start_s = time.perf_counter()
            for _ in range(back_to_back):
                fn()
            samples.append((time.perf_counter() - start_s) / back_to_back)
    return statistics.median(samples)


GRAPH_CALLS = 10  # calls captured per graph by time_call(graphs=True)


def capture_graph(fn: Callable[[], object], device: torch.device, calls: int = 1,
                  warmup: int = 3) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` back-to-back calls of ``fn``. ``warmup`` calls (at least one)
    run first on a side stream, as PyTorch asks before a capture: they build what must not happen
    inside one (escoin's per-geometry filter upload and stretched offsets, cuDNN's algorithm
    choice, allocator pools)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def time_paths(layer: SparseConv2d, x: torch.Tensor, repeats: int = 20,
               warmup: int = 3, graphs: bool = False,
               residual: Optional[torch.Tensor] = None) -> PathTimes:
    """Times ``layer``'s sparse and dense forward on ``x`` (and ``residual``, for a layer that
    adds one: the dense path then pays its add, as in the model), without autograd as in
    inference: inside CUDA graphs (``graphs``) or eagerly, on a GPU ``GRAPH_CALLS`` calls in a
    row a sample (see :func:`time_call`; on the CPU a call ends before the next starts, so one
    call a sample measures the same)."""
    args = (x,) if residual is None else (x, residual)
    back_to_back = GRAPH_CALLS if x.device.type == "cuda" else 1
    with torch.no_grad():
        return PathTimes(
            time_call(lambda: layer.sparse_forward(*args), x.device, repeats, warmup, graphs,
                      back_to_back),
            time_call(lambda: layer.dense_forward(*args), x.device, repeats, warmup, graphs,
                      back_to_back))
