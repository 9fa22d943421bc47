"""Model-wide conversion: ``sparsify`` swaps sparse-enough convolutions for ``SparseConv2d``;
``calibrate`` keeps, per layer, whichever path is faster on the real input."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, TypeVar

import torch
from torch import nn

from escoin_torch.layer import Path, SparseConv2d, _copy_hooks, folded, pruned_names
from escoin_torch.ops import has_kernels_for
from escoin_torch.timing import time_paths

__all__ = ["LayerReport", "LayerTiming", "sparsify", "calibrate"]

T = TypeVar("T")


@dataclass(frozen=True)
class LayerReport:
    """What :func:`sparsify` did with one ``nn.Conv2d``."""

    name: str
    shape: Tuple[int, ...]
    density: float
    path: Path           # "sparse": now a SparseConv2d; "dense": left as it was
    reason: str = ""     # why a layer stayed dense


@dataclass(frozen=True)
class LayerTiming:
    """What :func:`calibrate` measured for one ``SparseConv2d`` (median milliseconds)."""

    name: str
    sparse_ms: float
    dense_ms: float
    path: Path


def sparsify(model: nn.Module, min_sparsity: float = 0.5,
             filter_fn: Optional[Callable[[str, nn.Conv2d], bool]] = None,
             inplace: bool = False) -> Tuple[nn.Module, List[LayerReport]]:
    """Replaces every ``nn.Conv2d`` whose fraction of zero weights is at least ``min_sparsity``
    (and that ``filter_fn(name, conv)`` accepts) by an equivalent :class:`SparseConv2d`.

    ``torch.nn.utils.prune`` masks are folded into the weight, so the new layers have a plain
    ``weight`` and the same ``state_dict`` keys as an unpruned ``nn.Conv2d``. Hooks, device,
    dtype and training flag are kept; parameters of converted layers are shared with the input
    model when ``inplace=True`` (otherwise the model is deep-copied first). Only exact
    ``nn.Conv2d`` instances are converted: a subclass may compute something else in ``forward``.
    A module reachable under several names is converted once and replaced everywhere.

    Returns the model and a report with one entry per ``nn.Conv2d`` considered.
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if not inplace:
        model = _deepcopy(model)
    report: List[LayerReport] = []
    replacements: Dict[int, SparseConv2d] = {}
    folded_from: Dict[int, List[nn.Parameter]] = {}  # (_tie_folded)
    for name, module in model.named_modules():
        if type(module) is not nn.Conv2d:
            continue
        weight = folded(module, "weight")
        density = float(torch.count_nonzero(weight.detach())) / max(1, weight.numel())
        reason = _reason_to_keep_dense(name, module, weight, density, min_sparsity, filter_fn)
        if reason:
            report.append(LayerReport(name, tuple(weight.shape), density, "dense", reason))
            continue
        replacements[id(module)] = layer = SparseConv2d.from_dense(module)
        _tie_folded(name, module, layer, folded_from)
        _copy_hooks(module, layer, share=True)  # (the caller's handles reach the new layer)
        report.append(LayerReport(name, tuple(weight.shape), density, "sparse"))
    if id(model) in replacements:
        return replacements[id(model)], report
    for parent in model.modules():
        # _modules, not named_children(): the latter skips a module's second occurrence.
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    return model, report


def calibrate(model: nn.Module, example_input: Any, repeats: int = 20,
              warmup: int = 3, graphs: bool = False) -> List[LayerTiming]:
    """Times each ``SparseConv2d``'s sparse and dense forward on the input it receives when
    ``model`` runs ``example_input`` (a tensor, or a tuple of positional arguments), and sets its
    ``inference_path`` to the faster one.

    Timing runs on the layer's real input because the answer depends on batch, resolution and
    device, not only on the weight. Layers that the example forward does not reach are left as
    they are and not reported. A layer given a residual (``fuse_for_inference``'s) is timed with
    it, so that its dense path pays the add it pays in the model. Calibrate the way the model
    will run: eagerly by default (on a GPU calls back to back, each costing the larger of its
    host and GPU time, as in an eager forward), or with ``graphs=True`` (CUDA) inside CUDA
    graphs, as a model captured with ``torch.cuda.graph`` or compiled with
    ``mode="reduce-overhead"`` runs, without the host's cost. The example forward runs in eval
    mode, whose path this sets (BatchNorm's running statistics are left alone), and every
    module's mode is left as it was.
    """
    first = example_input[0] if isinstance(example_input, tuple) else example_input
    if graphs and not (isinstance(first, torch.Tensor) and first.device.type == "cuda"):
        raise ValueError("graphs=True times CUDA graphs: example_input must be on a CUDA device")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, SparseConv2d)]
    # Each layer's x and residual (fuse_for_inference's layers add one), as the model passes them.
    # (A residual may be a Python number, which the layer adds as torch would.)
    inputs: Dict[str, Tuple[torch.Tensor, Any]] = {}

    def capture(name: str) -> Callable[[nn.Module, tuple, dict], None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["input"]
            residual = args[1] if len(args) > 1 else kwargs.get("residual")
            inputs.setdefault(name, (x.detach(), residual.detach()
                                     if isinstance(residual, torch.Tensor) else residual))
        return hook

    handles = [m.register_forward_pre_hook(capture(name), with_kwargs=True) for name, m in layers]
    # The example forward in eval mode, whatever the model's: the inputs eval mode gives the
    # layers (BatchNorm's running statistics, no dropout), which it leaves as they were.
    training = {module: module.training for module in model.modules()}
    try:
        with torch.no_grad():
            model.eval()
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in training.items():
            module.training = mode
    results = []
    for name, layer in _progress([(n, m) for n, m in layers if n in inputs], "calibrating"):
        x, residual = inputs[name]
        times = time_paths(layer, x, repeats, warmup, graphs, residual)
        layer.inference_path = times.faster
        results.append(LayerTiming(name, times.sparse_s * 1e3, times.dense_s * 1e3,
                                   times.faster))
    return results


def _tie_folded(name: str, module: nn.Module, layer: SparseConv2d,
                folded_from: Dict[int, List[nn.Parameter]]) -> None:
    """Keeps a pruned Parameter that several convs share (tied weights) one Parameter once
    folded: `layer` takes the Parameter an earlier conv's folding of the same ``_orig`` made,
    where the masks agree. Where they differ the folded tensors differ too, and each layer then
    trains its own (a warning says so). `folded_from`: the folded Parameters per ``_orig``."""
    for tensor_name in sorted(pruned_names(module)):
        original = getattr(module, tensor_name + "_orig")
        new = getattr(layer, tensor_name)
        earlier = folded_from.setdefault(id(original), [])
        same = next((p for p in earlier if p.shape == new.shape and torch.equal(p, new)), None)
        if same is not None:
            setattr(layer, tensor_name, same)
            continue
        if earlier:
            warnings.warn(f"sparsify: {name}.{tensor_name} shares its pruned parameter with "
                          "another conv under another mask; their converted layers train "
                          "separate tensors", RuntimeWarning, stacklevel=3)
        earlier.append(new)


def _deepcopy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works on pruned models.

    A pruned module's ``weight`` is ``weight_orig * weight_mask``, a non-leaf tensor that
    deepcopy refuses; pre-seeding the memo with detached copies sidesteps that (pruning recomputes
    the attribute at the next forward anyway, and :func:`folded` never reads it).
    """
    memo: Dict[int, Any] = {}
    for module in model.modules():
        for name in pruned_names(module):
            tensor = getattr(module, name)
            if not tensor.is_leaf:
                memo[id(tensor)] = tensor.detach().clone()
    return copy.deepcopy(model, memo)


def _reason_to_keep_dense(name: str, conv: nn.Conv2d, weight: torch.Tensor, density: float,
                          min_sparsity: float,
                          filter_fn: Optional[Callable[[str, nn.Conv2d], bool]]) -> str:
    if "weight" not in conv._parameters and "weight" not in pruned_names(conv):
        # torch.nn.utils.weight_norm / spectral_norm: a pre-hook computes the weight from other
        # parameters at each forward, which a compressed copy would not follow.
        return ("its weight is computed by a forward pre-hook (torch.nn.utils.weight_norm or "
                "spectral_norm: remove_weight_norm / remove_spectral_norm first)")
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (escoin pads with zeros only)"
    if not has_kernels_for(weight):
        return f"escoin has no {weight.dtype} kernels on {weight.device.type}"
    if 1.0 - density < min_sparsity:
        return f"sparsity {1.0 - density:.3f} < min_sparsity {min_sparsity}"
    if filter_fn is not None and not filter_fn(name, conv):
        return "rejected by filter_fn"
    return ""


def _progress(items: List[T], description: str) -> Iterable[T]:
    """A tqdm progress bar when tqdm is installed (it is optional), else the items as they are."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=description, unit="layer")
