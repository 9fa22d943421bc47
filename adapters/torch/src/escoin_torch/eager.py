"""SparseConv2d's fast path for plain eager inference: per input shape, the escoin call prepared
once (:meth:`escoin.SparseFilter.prepare`), so that a call costs the kernel's launch and a few
checks instead of the general path's argument normalisation, validation and lookups.

Eager PyTorch at small batch is bound by the host: every layer's Python cost is paid per call
(CUDA graphs and ``torch.compile(mode="reduce-overhead")`` remove it). The general path
(:func:`escoin_torch.ops.conv2d_with_filter`) still runs every call the fast path does not
take, and first for each input shape: a call is remembered only after the general path has
run it, and so validated it.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import escoin
import torch

from escoin_torch.ops import (PreparedFilter, _pair, escoin_dtype_name, run_call,
                              uninterposed)

__all__ = ["EagerCalls"]


class EagerCalls:
    """One compressed weight's prepared calls (its layer's ``_Compressed`` state holds them),
    per input shape, dtype and the layer's geometry. :meth:`forward` takes a call where it is a
    plain inference call: x, bias and residual plain contiguous tensors on the weight's device,
    the dtypes and shapes the call was prepared for, no gradient to record and nothing that must
    see the op (:func:`escoin_torch.ops.uninterposed`); anything else returns None, and the
    caller runs the general path."""

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: Dict[tuple, escoin.PreparedCall] = {}

    def forward(self, layer: torch.nn.Conv2d, x: torch.Tensor,
                residual: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The layer's output (plus residual, then its ReLU) through the prepared call for x,
        or None where there is none or the call is not a plain one."""
        if type(x) is not torch.Tensor:
            return None
        call = self._calls.get(_key(layer, x))
        if call is None or not call.current or not _plain(layer, x, residual,
                                                          call.output_shape):
            return None
        y = torch.empty(call.output_shape, dtype=x.dtype, device=x.device)
        run_call(call, x, y, layer.bias, residual, layer.relu)
        return y

    def remember(self, layer: torch.nn.Conv2d, x: torch.Tensor,
                 prepared: Callable[[], PreparedFilter]) -> None:
        """After the general path ran the layer on x: the call for x's key from `prepared()`
        (the filter that path used), unless one is kept already or the fast path cannot take
        such calls (a string padding, which the general path may apply by padding x; an empty
        batch; an x of another dtype than the weight, which that path cast; a trace)."""
        if torch.jit.is_tracing() or torch.jit.is_scripting():
            return  # (a traced shape holds tensors, and the trace must keep the op)
        if type(x) is not torch.Tensor or isinstance(layer.padding, str) or x.dim() != 4 \
                or x.shape[0] == 0 or x.dtype != layer.weight.dtype:
            return  # (another dtype: the general path cast x, as under autocast)
        key = _key(layer, x)
        found = self._calls.get(key)
        if found is not None and found.current:
            return
        stride, padding, dilation = (tuple(_pair(v, name, least)) for v, name, least in (
            (layer.stride, "stride", 1), (layer.padding, "padding", 0),
            (layer.dilation, "dilation", 1)))
        device = "cpu" if x.device.type == "cpu" else x.device.index
        call = prepared().launch(tuple(x.shape), device, escoin_dtype_name(x.dtype), stride,
                                 padding, dilation)
        if call.stream is None:  # (a call on device values is bound to its stream: not kept)
            self._calls[key] = call


def _key(layer: torch.nn.Conv2d, x: torch.Tensor) -> tuple:
    # The geometry too: nn.Conv2d's attributes may be reassigned between calls (as ints or
    # lists as well as the tuples it keeps; a list does not hash).
    return (x.shape, x.dtype, _hashable(layer.stride), _hashable(layer.padding),
            _hashable(layer.dilation))


def _hashable(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


def _plain(layer: torch.nn.Conv2d, x: torch.Tensor, residual: Optional[torch.Tensor],
           output_shape: tuple) -> bool:
    """Whether the prepared call computes exactly what the general path would for these
    arguments, and nothing needs to see the op."""
    weight, bias = layer.weight, layer.bias
    if not x.is_contiguous() or x.is_neg() or x.device != weight.device \
            or x.dtype != weight.dtype:
        return False
    if bias is not None and (type(bias) not in (torch.Tensor, torch.nn.Parameter)
                             or bias.shape != output_shape[1:2] or bias.dtype != x.dtype
                             or bias.device != x.device or not bias.is_contiguous()
                             or bias.is_neg()):
        return False
    if residual is not None and (type(residual) is not torch.Tensor
                                 or residual.shape != output_shape
                                 or residual.dtype != x.dtype or residual.device != x.device
                                 or not residual.is_contiguous() or residual.is_neg()):
        return False
    if torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad
            or (bias is not None and bias.requires_grad)
            or (residual is not None and residual.requires_grad)):
        return False
    tensors = [x, weight] + [t for t in (bias, residual) if t is not None]
    return uninterposed(x.device.type, tensors)
