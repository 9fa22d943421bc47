"""The API of the seed PyTorch port (``import sparse_conv as sp``), on top of escoin_torch.

Users switch by changing only the import line (``import escoin_torch.seed as sp``); names keep
the seed's spelling on purpose. What the seed got wrong is not reproduced: Test mode compares with
a relative-norm tolerance (not exact equality) and raises instead of exiting, every dtype escoin
supports works, and any batch size and stride work.
"""
from __future__ import annotations

import enum
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from escoin_torch.layer import SparseConv2d
from escoin_torch.timing import PathTimes, time_paths

__all__ = ["Sparse_modes", "SparseConv2D", "SparseModel", "set_mode", "initialize"]

_IntOrPair = Union[int, Sequence[int]]


class Sparse_modes(enum.Enum):  # noqa: N801 -- the seed's name
    """How the sparse layers of a model compute (see :func:`set_mode`)."""

    Training = "training"                    # dense, autograd as nn.Conv2d
    Inference_Vanilla = "inference_vanilla"  # dense
    Inference_Sparse = "inference_sparse"    # escoin
    Test = "test"                            # escoin, checked against dense on every forward
    Benchmark = "benchmark"                  # escoin; both paths timed and printed per forward
    Calibration = "calibration"              # next forward times both and keeps the faster


class SparseConv2D(SparseConv2d):
    """The seed's layer. Its positional order puts ``bias`` right after ``dilation`` (where
    ``nn.Conv2d`` has ``groups``), so a seed call like ``SparseConv2D(1, 6, 5, 1, 0, 1, False)``
    keeps meaning "no bias"; everything else is :class:`escoin_torch.SparseConv2d`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _IntOrPair,
                 stride: _IntOrPair = 1, padding: Union[str, _IntOrPair] = 0,
                 dilation: _IntOrPair = 1, bias: bool = True, groups: int = 1,
                 **kwargs: Any) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, **kwargs)


def dense_conv2d(in_channels: int, out_channels: int, kernel_size: _IntOrPair,
                 stride: _IntOrPair = 1, padding: Union[str, _IntOrPair] = 0,
                 dilation: _IntOrPair = 1, bias: bool = True, groups: int = 1,
                 **kwargs: Any) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` from :class:`SparseConv2D`'s arguments, in its positional order
    (``bias`` before ``groups``)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                     bias, **kwargs)


class SparseModel(nn.Module):
    """Base class of seed models: build convolutions with ``self.conv(...)``, which is
    :class:`SparseConv2D` when ``sparse_conv_flag`` is true and else makes an ``nn.Conv2d``
    from the same arguments (:func:`dense_conv2d`)."""

    def __init__(self, sparse_conv_flag: bool = True) -> None:
        super().__init__()
        self.sparse_conv_flag = sparse_conv_flag
        self.conv = SparseConv2D if sparse_conv_flag else dense_conv2d

    def _set_sparse_layers_mode(self, mode: Sparse_modes, **options: Any) -> None:
        set_mode(self, mode, **options)

    def _initialize_sparse_layers(self, input_shape: Sequence[int]) -> None:
        initialize(self, input_shape)


def set_mode(module: nn.Module, mode: Sparse_modes, *, rtol: Optional[float] = None,
             repeats: int = 20, warmup: int = 3) -> None:
    """Puts every :class:`SparseConv2d` in ``module`` (``module`` included) in ``mode``.

    Training sets the layers' training flag (dense compute), the others clear it. ``rtol`` is Test
    mode's bound on ``||sparse - dense|| / ||dense||`` (default by dtype, see
    :func:`default_rtol`); ``repeats``/``warmup`` are the timed runs of Benchmark and Calibration.
    """
    if not isinstance(mode, Sparse_modes):
        raise TypeError(f"mode must be a Sparse_modes member, got {mode!r}")
    for name, layer in module.named_modules():
        if isinstance(layer, SparseConv2d):
            _set_layer_mode(name or type(layer).__name__, layer, mode, rtol, repeats, warmup)


def initialize(module: nn.Module, input_shape: Sequence[int]) -> None:
    """Builds every sparse layer's CSR, then runs one sparse forward on a random input of
    ``input_shape`` so that escoin's per-geometry state (filter upload, stretched offsets) exists
    before the first real call (and before graph capture or torch.compile)."""
    layers = [m for m in module.modules() if isinstance(m, SparseConv2d)]
    for layer in layers:
        layer.refresh_csr()
    reference = next(module.parameters(), None)
    x = torch.randn(tuple(input_shape), device=None if reference is None else reference.device,
                    dtype=None if reference is None else reference.dtype)
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            module(x)
    finally:
        for m, flag in flags.items():
            m.training = flag


def default_rtol(dtype: torch.dtype, device: torch.device) -> float:
    """Test mode's default tolerance: a few hundred ulps of accumulated rounding, and TF32's
    precision when the dense reference runs on CUDA with TF32 allowed (PyTorch's default)."""
    if dtype == torch.float64:
        return 1e-10
    if device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return 1e-2
    return 1e-4


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (absolute when expected is zero)."""
    difference = torch.linalg.vector_norm((actual - expected).double()).item()
    scale = torch.linalg.vector_norm(expected.double()).item()
    return difference / scale if scale > 0 else difference


_Hook = Callable[[nn.Module, tuple, torch.Tensor], None]


def _set_layer_mode(name: str, layer: SparseConv2d, mode: Sparse_modes, rtol: Optional[float],
                    repeats: int, warmup: int) -> None:
    previous = layer.__dict__.pop("_seed_hook", None)
    if previous is not None:
        previous.remove()
    layer.sparse_mode = mode
    layer.train(mode is Sparse_modes.Training)
    layer.inference_path = "dense" if mode is Sparse_modes.Inference_Vanilla else "sparse"
    hook: Optional[_Hook] = None
    if mode is Sparse_modes.Test:
        hook = _test_hook(name, rtol)
    elif mode is Sparse_modes.Benchmark:
        hook = _timing_hook(name, repeats, warmup, keep_faster=False)
    elif mode is Sparse_modes.Calibration:
        hook = _timing_hook(name, repeats, warmup, keep_faster=True)
    if hook is not None:
        layer._seed_hook = layer.register_forward_hook(hook)


def _test_hook(name: str, rtol: Optional[float]) -> _Hook:
    def hook(layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        with torch.no_grad():
            expected = layer.dense_forward(*args)
        bound = default_rtol(output.dtype, output.device) if rtol is None else rtol
        error = relative_error(output.detach(), expected)
        if not error <= bound:  # also catches NaN
            absolute = torch.linalg.vector_norm((output - expected).double()).item()
            raise RuntimeError(
                f"escoin Test mode: layer {name!r} sparse output diverges from dense: "
                f"||sparse - dense|| / ||dense|| = {error:.3e} > rtol {bound:.1e} "
                f"(||sparse - dense|| = {absolute:.3e})")
    return hook


def _timing_hook(name: str, repeats: int, warmup: int, keep_faster: bool) -> _Hook:
    def hook(layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        assert isinstance(layer, SparseConv2d)
        times: PathTimes = time_paths(layer, args[0], repeats, warmup)
        line = (f"{name}: sparse {times.sparse_s * 1e3:.3f} ms, dense {times.dense_s * 1e3:.3f} "
                f"ms, sparse speedup {times.dense_s / max(times.sparse_s, 1e-12):.2f}x")
        if keep_faster:
            chosen = (Sparse_modes.Inference_Sparse if times.faster == "sparse"
                      else Sparse_modes.Inference_Vanilla)
            _set_layer_mode(name, layer, chosen, None, repeats, warmup)
            line += f" -> {times.faster}"
        print(line)
    return hook
