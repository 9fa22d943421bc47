"""One benchmark case: build a network, prune it, convert it with escoin, check it, time it.

The check comes before any timing: a fast wrong answer is worth nothing. The reference is the
dense network in float64, not in float32: two float32 networks differ by rounding that grows
through the layers, which says nothing about either one's correctness, whereas float64 is exact
enough to show each path's own error.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import escoin_torch
from escoin_torch.layer import SparseConv2d

from escoin_torch.bench.layers import LayerResult, tensor_bytes, time_layers
from escoin_torch.bench.models import build, input_shape
from escoin_torch.bench.paths import (ESCOIN, ESCOIN_HALF, ESCOIN_PATHS, PathResult, measure,
                                      network_paths, precision)
from escoin_torch.bench.prune import Method, prune_convs

__all__ = ["Case", "NetworkResult", "run_case"]


@dataclass(frozen=True)
class Case:
    """What to run: one network at one batch size, and how to prune, time and check it."""

    net: str
    batch: int
    device: torch.device
    sparsity: float = 0.9
    prune: Method = "magnitude"
    size: Optional[int] = None         # input side; None: the network's standard size
    graphs: Tuple[bool, ...] = (False,)  # CUDA graph modes to time (GPU only)
    repeats: int = 10
    warmup: int = 2
    rtol: float = 1e-4
    half_rtol: float = 1e-2  # for ESCOIN_HALF
    seed: int = 0
    block: int = 1  # pruned in blocks of this many output channels (1: single weights)


@dataclass
class NetworkResult:
    """What one case measured; ``passed`` says whether each escoin path's output is within its
    tolerance: ``rtol`` in float32, ``half_rtol`` in float16."""

    net: str
    batch: int
    input_shape: Tuple[int, ...]
    conv_density: float
    output_norm: float  # of the float64 reference: shows the comparison was not against zeros
    rtol: float
    half_rtol: float
    paths: List[PathResult]
    layers: List[LayerResult]
    weights: Dict[str, int]
    kept_dense: Dict[str, str] = field(default_factory=dict)  # conv name -> why not converted
    # converted convs that calibration kept on escoin, per timing mode ("eager", "graphs")
    calibrated_sparse: Dict[str, int] = field(default_factory=dict)

    def within_tolerance(self, path: PathResult) -> bool:
        """Whether one of escoin's paths is within its tolerance (False for NaN too)."""
        return path.rel_error <= (self.half_rtol if path.path == ESCOIN_HALF else self.rtol)

    @property
    def escoin_error(self) -> float:
        """The largest error of escoin's float32 paths."""
        return max(p.rel_error for p in self.paths
                   if p.path in ESCOIN_PATHS and p.path != ESCOIN_HALF)

    @property
    def half_error(self) -> Optional[float]:
        """The largest error of escoin's float16 path (None where it did not run: the CPU)."""
        return max((p.rel_error for p in self.paths if p.path == ESCOIN_HALF), default=None)

    @property
    def passed(self) -> bool:
        return all(self.within_tolerance(p) for p in self.paths if p.path in ESCOIN_PATHS)

    def speedup(self, path: PathResult, ours_name: str = ESCOIN) -> float:
        """How many times faster escoin (``ours_name``: all convs on escoin, or calibrated) is
        than ``path``, with the same CUDA graph setting."""
        ours = next(p for p in self.paths if p.path == ours_name and p.graphs == path.graphs)
        return path.ms / ours.ms


def run_case(case: Case, step: Callable[[str], None] = lambda _: None) -> NetworkResult:
    """Runs ``case``; ``step(description)`` is called before each phase (for a progress bar)."""
    step("build and prune")
    dense = prune_convs(build(case.net, case.seed), case.sparsity, case.prune, case.seed,
                        case.block)
    generator = torch.Generator().manual_seed(case.seed + 1)
    x = torch.randn(input_shape(case.net, case.batch, case.size), generator=generator)
    sparse, report = escoin_torch.sparsify(dense)  # a converted copy; `dense` stays dense
    # Both prepared for inference alike: BatchNorms folded into the convolutions (and, on
    # escoin's side, ReLUs into its epilogue); the reference is the unfolded network.
    folded = escoin_torch.fuse_for_inference(dense).to(case.device)
    sparse = escoin_torch.fuse_for_inference(sparse)
    dense, sparse, x = dense.to(case.device), sparse.to(case.device), x.to(case.device)
    step("float64 reference")
    reference = _float64_output(dense, x)
    results = []
    calibrated_sparse: Dict[str, int] = {}
    for graphs in case.graphs:
        mode = "graphs" if graphs else "eager"
        step(f"calibrate ({mode})")
        calibrated = copy.deepcopy(sparse)
        # Calibrated the way it is then timed: in CUDA graphs or eagerly, and strict fp32 (the
        # calibrated path runs strict, below; under PyTorch's default TF32 convolutions,
        # calibration kept layers dense that the strict run then made slower than escoin).
        with precision(False):
            timings = escoin_torch.calibrate(calibrated, x, repeats=case.repeats,
                                             warmup=case.warmup, graphs=graphs)
        calibrated_sparse[mode] = sum(t.path == "sparse" for t in timings)
        for path in network_paths(folded, sparse, calibrated, x):
            step(f"{path.name}{' graph' if graphs else ''}")
            results.append(measure(path, graphs, reference, case.repeats, case.warmup))
    step("per layer")
    layers = time_layers(sparse, x, case.repeats, case.warmup)
    convs = [m for m in dense.modules() if isinstance(m, nn.Conv2d)]
    density = sum(int(torch.count_nonzero(c.weight)) for c in convs) / sum(c.weight.numel()
                                                                           for c in convs)
    return NetworkResult(
        case.net, case.batch, tuple(x.shape), density,
        float(torch.linalg.vector_norm(reference)), case.rtol, case.half_rtol, results, layers,
        _weight_bytes(dense, sparse),
        {r.name: r.reason for r in report if r.path == "dense"},
        calibrated_sparse)


def _float64_output(dense: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The dense network's output computed in float64 (on a temporary copy)."""
    with torch.no_grad():
        reference = copy.deepcopy(dense).double()(x.double())
    if not torch.count_nonzero(reference):
        raise RuntimeError("the float64 reference output is all zero: comparing with it would "
                           "prove nothing")
    return reference


def _weight_bytes(dense: nn.Module, sparse: nn.Module) -> Dict[str, int]:
    """Parameter memory: conv weights and all parameters, dense against escoin's deployment
    (converted convs stored as CSR only; ``SparseConv2d`` also keeps its dense weight in memory as
    the source of truth, which is not counted here)."""
    conv_dense = tensor_bytes(*(m.weight for m in dense.modules() if isinstance(m, nn.Conv2d)))
    converted = [m for m in sparse.modules() if isinstance(m, SparseConv2d)]
    converted_dense = tensor_bytes(*(m.weight for m in converted))
    converted_csr = sum(tensor_bytes(c.row_ptr, c.col_idx, c.values)
                        for c in (m.csr for m in converted))
    all_dense = tensor_bytes(*dense.parameters())
    saved = converted_dense - converted_csr
    return {"conv_dense": conv_dense, "conv_escoin": conv_dense - saved,
            "all_dense": all_dense, "all_escoin": all_dense - saved}

