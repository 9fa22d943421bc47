"""The whole-network paths a sparse model is compared with, and timing one of them end to end.

On a GPU a pruned network could run dense in several ways, and escoin must be compared with each:
fp32 with TF32 off (the same arithmetic as escoin), TF32 convolutions (PyTorch's default, less
precise), and fp16 in channels_last (tensor cores, what a deployment would pick); escoin runs in
fp32 and, against the last, in fp16 too (the model ``.half()``). On the CPU
PyTorch has one fp32 convolution (oneDNN). Every path runs eagerly or replayed from a CUDA graph
captured over the whole forward, which removes the per-layer launch cost that dominates small
batches and so shows what each path's kernels alone cost.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from escoin_torch.seed import relative_error
from escoin_torch.timing import capture_graph, time_call

__all__ = ["DENSE_HALF", "ESCOIN", "ESCOIN_CALIBRATED", "ESCOIN_HALF", "ESCOIN_PATHS", "Path",
           "PathResult", "measure", "network_paths", "precision"]

DENSE_HALF = "dense fp16"
ESCOIN = "escoin fp32"
# The same model after escoin_torch.calibrate kept, per layer, the faster of escoin and dense
# (as the Escoin port's benchmarks did): what a user deploys.
ESCOIN_CALIBRATED = "escoin calibrated"
# The same model in float16 (GPU only): activations, bias and outputs in 16 bits, computed in
# float32 and rounded once per layer, the weights' values in float32; checked against its own
# tolerance (Case.half_rtol), since each layer's output is rounded to 11 bits.
ESCOIN_HALF = "escoin fp16"
ESCOIN_PATHS = (ESCOIN, ESCOIN_CALIBRATED, ESCOIN_HALF)


@dataclass(frozen=True)
class Path:
    """One way of running the network: a model, its input, and the TF32 setting (GPU only)."""

    name: str
    model: nn.Module
    x: torch.Tensor
    tf32: Optional[bool] = None


@dataclass(frozen=True)
class PathResult:
    """Median milliseconds per forward of one path, and its output's error against float64."""

    path: str
    graphs: bool
    ms: float
    rel_error: float


def network_paths(dense: nn.Module, sparse: nn.Module, calibrated: nn.Module,
                  x: torch.Tensor) -> List[Path]:
    """The dense paths of ``x``'s device, then escoin's (always last)."""
    if x.device.type != "cuda":
        return [Path("dense fp32", dense, x), Path(ESCOIN, sparse, x),
                Path(ESCOIN_CALIBRATED, calibrated, x)]
    half = copy.deepcopy(dense).half().to(memory_format=torch.channels_last)
    return [Path("dense fp32 strict", dense, x, tf32=False),
            Path("dense tf32", dense, x, tf32=True),
            Path(DENSE_HALF, half, x.half().contiguous(memory_format=torch.channels_last),
                 tf32=True),
            # escoin is exact fp32; the layers it does not replace (linear, BN) run strict too.
            Path(ESCOIN, sparse, x, tf32=False),
            Path(ESCOIN_CALIBRATED, calibrated, x, tf32=False),
            # NCHW: escoin's layout (a channels_last input would be copied by every layer).
            Path(ESCOIN_HALF, copy.deepcopy(sparse).half(), x.half(), tf32=False)]


@contextlib.contextmanager
def precision(tf32: Optional[bool]) -> Iterator[None]:
    """Allows or forbids TF32 in cuDNN convolutions and cuBLAS matmuls for the block (``None``
    leaves the settings alone), restoring them afterwards. "TF32" means PyTorch's defaults: TF32
    convolutions, but fp32 matmuls."""
    if tf32 is None:
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def measure(path: Path, graphs: bool, reference: torch.Tensor, repeats: int,
            warmup: int) -> PathResult:
    """Times ``path`` end to end (median of ``repeats`` after ``warmup`` untimed forwards) and
    measures its output's relative-norm error against ``reference`` (the float64 dense output)."""
    with torch.no_grad(), precision(path.tf32):
        run, output = _graphed(path) if graphs else _eager(path)
        run()
        error = relative_error(output(), reference)
        seconds = time_call(run, path.x.device, repeats, warmup)
    return PathResult(path.name, graphs, seconds * 1e3, error)


def _eager(path: Path) -> Tuple[Callable[[], object], Callable[[], torch.Tensor]]:
    outputs: List[torch.Tensor] = []

    def run() -> None:
        outputs[:] = [path.model(path.x)]
    return run, lambda: outputs[0]


def _graphed(path: Path) -> Tuple[Callable[[], object], Callable[[], torch.Tensor]]:
    """A CUDA graph of the whole forward on a static copy of the input."""
    static_x = path.x.clone()
    outputs: List[torch.Tensor] = []

    def forward() -> None:
        outputs[:] = [path.model(static_x)]
    graph = capture_graph(forward, path.x.device)  # outputs[0]: the captured forward's output
    return graph.replay, lambda: outputs[0]
