"""SparseConv2d's fast path for plain eager inference (escoin_torch.eager): which calls take the
prepared call, which run the general path, and that both compute the float64 reference's
result."""
from __future__ import annotations

from typing import List

import pytest
import torch

import escoin_torch
from escoin_torch import SparseConv2d, layer as layer_module
from torch_helpers import SeenOps, reference_conv, relative_error, sparse_conv, tolerance

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


class GeneralCalls:
    """Counts the calls that run the general path (conv2d_with_filter)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        general = layer_module.conv2d_with_filter

        def counted(*args: object, **kwargs: object) -> torch.Tensor:
            self.count += 1
            return general(*args, **kwargs)
        monkeypatch.setattr(layer_module, "conv2d_with_filter", counted)


def _layer(device: str, **geometry: object) -> SparseConv2d:
    conv = sparse_conv(8, 16, 3, density=0.3, **geometry)
    return SparseConv2d.from_dense(conv, relu=True).to(device).eval()


def _expected(layer: SparseConv2d, x: torch.Tensor, residual=None) -> torch.Tensor:
    y = reference_conv(x, layer.weight, layer.bias, stride=layer.stride, padding=layer.padding,
                       dilation=layer.dilation)
    if residual is not None:
        y = y + residual.double().cpu()
    return torch.relu(y)


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_plain_calls_take_the_prepared_call(device: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The first call of an input shape runs the general path; the next ones (and with a
    residual of the output's shape) the prepared call, into a fresh output each, with the same
    result to the bit."""
    general = GeneralCalls(monkeypatch)
    layer = _layer(device, stride=2, padding=1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 8, 13, 10, generator=gen).to(device)
    residual = torch.randn(3, 16, 7, 5, generator=gen).to(device)
    with torch.no_grad():
        first = layer(x)
        outputs = [layer(x) for _ in range(3)]
        with_residual = layer(x, residual)
    assert general.count == 1
    assert len({y.data_ptr() for y in outputs}) == 3  # no output handed out twice
    for y in outputs:
        assert torch.equal(y, first)
    assert relative_error(first, _expected(layer, x)) < 1e-5
    assert relative_error(with_residual, _expected(layer, x, residual)) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_other_calls_run_the_general_path(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each call the prepared one cannot stand for goes the general way, and computes what it
    should: a gradient to record, a channels_last or non-contiguous x, a residual that
    broadcasts, a dispatch mode; and a new input shape runs it once before its call is
    prepared."""
    general = GeneralCalls(monkeypatch)
    layer = _layer(device, padding=1)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 9, 9, generator=gen).to(device)
    with torch.no_grad():
        layer(x)
    cases: List[tuple] = []
    recorded = layer(x)  # grad enabled and the weight requires it
    assert recorded.grad_fn is not None
    cases.append((recorded, _expected(layer, x)))
    with torch.no_grad():
        last = x.contiguous(memory_format=torch.channels_last)
        y = layer(last)
        assert y.is_contiguous(memory_format=torch.channels_last)
        cases.append((y, _expected(layer, x)))
        strided = torch.randn(2, 8, 9, 18, generator=gen).to(device)[..., ::2]
        cases.append((layer(strided), _expected(layer, strided)))
        bias_like = torch.randn(1, 16, 1, 1, generator=gen).to(device)
        cases.append((layer(x, bias_like), _expected(layer, x, bias_like)))
        with SeenOps() as mode:
            cases.append((layer(x), _expected(layer, x)))
        assert any("escoin.sparse_conv2d" in name for name in mode.names)
        other = torch.randn(1, 8, 6, 7, generator=gen).to(device)
        cases.append((layer(other), _expected(layer, other)))
        cases.append((layer(other), _expected(layer, other)))
    assert general.count == 1 + 6
    for y, expected in cases:
        assert relative_error(y, expected) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_changes_between_calls_are_followed(device: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight written in place, a reassigned stride, and escoin_torch.release_geometries
    (which frees the arrays prepared calls point at) each send the next call the general way,
    and every result is the current layer's convolution."""
    general = GeneralCalls(monkeypatch)
    layer = _layer(device, padding=1)
    x = torch.randn(2, 8, 10, 11, generator=torch.Generator().manual_seed(5)).to(device)
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(-2.0)
        changed = layer(x)
        assert relative_error(changed, _expected(layer, x)) < 1e-5
        layer.stride = (2, 1)
        strided = layer(x)
        assert strided.shape[2:] == (5, 11)
        assert relative_error(strided, _expected(layer, x)) < 1e-5
        assert escoin_torch.release_geometries() > 0
        released = layer(x)
        assert relative_error(released, _expected(layer, x)) < 1e-5
        assert torch.equal(layer(x), released)
    assert general.count == 4


def test_a_wrong_bias_dtype_is_still_a_clear_error() -> None:
    """A bias of another dtype than x, set after the call was prepared, is the general path's
    TypeError, not a silently wrong fast call."""
    layer = _layer("cpu", padding=1)
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        layer(x)
        layer.bias = torch.nn.Parameter(layer.bias.double())
        with pytest.raises(TypeError, match="must have one dtype"):
            layer(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_the_prepared_call_in_other_dtypes(device: str, dtype: torch.dtype,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer in a 16-bit type (or float64, on the CPU) prepares its call in that type: the
    repeated call matches the first to the bit and the float64 reference to the type's
    tolerance."""
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("escoin computes float64 on the CPU only")
    general = GeneralCalls(monkeypatch)
    layer = _layer(device, padding=1).to(dtype)
    x = torch.randn(2, 8, 9, 7, generator=torch.Generator().manual_seed(6)).to(device, dtype)
    with torch.no_grad():
        first, again = layer(x), layer(x)
    assert general.count == 1 and again.dtype == dtype
    assert torch.equal(first, again)
    assert relative_error(again, _expected(layer, x)) < tolerance(dtype)


def test_what_the_general_path_refuses_stays_refused() -> None:
    """After a call was prepared: a bias of the wrong size is the general path's ValueError (the
    prepared call would read past it), and an x of another dtype than the weight its TypeError,
    also after an autocast call cast such an x to the weight's dtype."""
    layer = _layer("cpu", padding=1)
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        layer(x)
        layer.bias = torch.nn.Parameter(torch.arange(16.0)[:1])
        with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
            layer(x)
        layer.bias = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x.bfloat16()).dtype == torch.float32
        with pytest.raises(TypeError, match="must have one dtype"):
            layer(x.bfloat16())


def test_geometry_reassigned_as_ints_or_lists() -> None:
    """nn.Conv2d takes stride, padding and dilation reassigned as an int or a list, and so does
    the layer on both paths."""
    layer = _layer("cpu", padding=1)
    x = torch.randn(2, 8, 9, 10, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for stride, padding, dilation in [(2, [1, 2], 1), ([1, 2], 2, [2, 1])]:
            layer.stride, layer.padding, layer.dilation = stride, padding, dilation
            first, again = layer(x), layer(x)
            assert torch.equal(first, again)
            assert relative_error(again, _expected(layer, x)) < 1e-5


def test_a_traced_layer_keeps_the_op() -> None:
    """torch.jit.trace records escoin's op (the prepared call is not remembered while tracing,
    whose shapes are tensors), and the trace computes the layer's convolution."""
    layer = _layer("cpu", padding=1)
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        layer(x)
        traced = torch.jit.trace(layer, x, check_trace=False)
        assert "escoin" in str(traced.graph)
        assert relative_error(traced(x), _expected(layer, x)) < 1e-5


class _Logged(torch.Tensor):
    """A tensor subclass that records the escoin ops its __torch_function__ sees."""

    seen: List[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore
        if "escoin" in str(func):
            cls.seen.append(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_bias_subclass_sees_the_op() -> None:
    """A bias of a tensor subclass (a Parameter of one) takes the general path, so that its
    __torch_function__ sees escoin's op on every call."""
    layer = _layer("cpu", padding=1)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        layer(x)
        layer.bias = torch.nn.Parameter(layer.bias.detach().as_subclass(_Logged))
        _Logged.seen.clear()
        layer(x)
        layer(x)
    assert len(_Logged.seen) == 2
