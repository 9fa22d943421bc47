"""Per-layer view of a sparse network: each escoin layer timed on the input it really receives,
and its weight memory dense against CSR.

End-to-end numbers mix escoin's layers with everything it does not replace (linear layers,
pooling, batch norm); the per-layer table shows where the speed-up is won or lost.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from escoin_torch.layer import SparseConv2d
from escoin_torch.timing import time_paths

from escoin_torch.bench.paths import precision

__all__ = ["LayerResult", "tensor_bytes", "time_layers"]


@dataclass(frozen=True)
class LayerResult:
    """One escoin layer: geometry, density, median times of both paths, weight bytes."""

    name: str
    weight_shape: Tuple[int, ...]
    input_shape: Tuple[int, ...]
    density: float
    dense_ms: float
    sparse_ms: float
    dense_bytes: int
    csr_bytes: int

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes the tensors' elements occupy."""
    return sum(t.numel() * t.element_size() for t in tensors)


def time_layers(model: nn.Module, x: torch.Tensor, repeats: int,
                warmup: int) -> List[LayerResult]:
    """Times the sparse and dense forward of every :class:`SparseConv2d` that ``model(x)`` reaches,
    on a copy of the input it receives there. On a GPU both run with TF32 off, so the two compute
    the same fp32 convolution, and inside CUDA graphs: timed eagerly one call at a time, a small
    layer's time is mostly the host's per-call cost (on an H100's host ~80 us for a dense
    convolution, ~160 us for escoin's), not the GPU's."""
    inputs = _layer_inputs(model, x)
    results = []
    on_gpu = x.device.type == "cuda"
    for name, layer in model.named_modules():
        if not isinstance(layer, SparseConv2d) or name not in inputs:
            continue
        layer_x = inputs[name]
        with precision(False if on_gpu else None):
            times = time_paths(layer, layer_x, repeats, warmup, graphs=on_gpu)
        csr = layer.csr
        results.append(LayerResult(
            name, tuple(layer.weight.shape), tuple(layer_x.shape), csr.density,
            times.dense_s * 1e3, times.sparse_s * 1e3, tensor_bytes(layer.weight),
            tensor_bytes(csr.row_ptr, csr.col_idx, csr.values)))
    return results


def _layer_inputs(model: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The input of each SparseConv2d in one forward of ``model``, cloned: in-place operations
    later in the forward (ReLU(inplace=True), residual additions) must not change it."""
    inputs: Dict[str, torch.Tensor] = {}

    def capture(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            inputs.setdefault(name, args[0].detach().clone())
        return hook

    handles = [m.register_forward_pre_hook(capture(name)) for name, m in model.named_modules()
               if isinstance(m, SparseConv2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return inputs
