"""GPU timing for the benchmarks: CUDA-event medians, per-call times inside CUDA graphs, and the
measured strict-fp32 rate that defines the floor. Needs torch with CUDA, not escoin."""
from __future__ import annotations

import statistics
from typing import Callable


def event_median_ms(torch, fn: Callable[[], object], reps: int = 30) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times)


def time_ms(torch, fn: Callable[[], object], graph: bool = True) -> float:
    """Median GPU time of one call of fn, as in a network's stream of layers: a CUDA graph of
    `calls` back-to-back calls (enough for about 2 ms of work) is replayed and timed with
    events, and the time divided by `calls`. A graph of one call would count the graph launch's
    own launch latency into each call, which hides any kernel shorter than that latency."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    if graph:
        try:
            calls = max(1, min(200, round(2.0 / max(event_median_ms(torch, fn, reps=5), 1e-3))))
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(calls):
                    fn()
            for _ in range(3):
                g.replay()
            return event_median_ms(torch, g.replay, reps=10) / calls
        except RuntimeError:
            torch.cuda.synchronize()
    return event_median_ms(torch, fn)


def fp32_rate(torch) -> float:
    """Measured strict-fp32 FLOP/s of a large matmul (TF32 off): the floor's denominator."""
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(8192, 8192, device="cuda")
    b = torch.randn(8192, 8192, device="cuda")
    ms = time_ms(torch, lambda: a @ b, graph=False)
    return 2 * 8192**3 / (ms * 1e-3)


def copy_rate(torch, mib: int = 1024) -> float:
    """Measured device-memory bytes/s of a device-to-device copy of `mib` MiB (bytes read plus
    bytes written over its time): the memory floor's denominator. The buffers are 20x an H100's
    L2, so the copy streams through device memory."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(torch, lambda: dst.copy_(src), graph=False)
    return 2 * src.numel() / (ms * 1e-3)
