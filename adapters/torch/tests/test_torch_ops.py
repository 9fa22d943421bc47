"""The op against F.conv2d (float64 reference), its memory formats, errors, opcheck, gradcheck."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from hypothesis import example, given, settings, strategies as st

from torch_helpers import (SeenOps, check_release_geometries, count_calls, reference_conv,
                           relative_error, sparse_weight, tolerance)
from escoin_torch import csr as csr_lib
from escoin_torch import sparse_conv2d


@st.composite
def geometries(draw: st.DrawFn) -> dict:
    groups = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 4)), draw(st.integers(0, 4)))
    # Inputs at least as large as the padded dilated kernel needs, so the output is >= 1x1.
    height = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 12))
    width = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 12))
    return dict(batch=draw(st.integers(1, 3)), groups=groups,
                in_per_group=draw(st.integers(1, 4)), out_per_group=draw(st.integers(1, 4)),
                kernel=(kh, kw), stride=stride, padding=padding, dilation=dilation,
                size=(height, width), density=draw(st.sampled_from([0.05, 0.3, 0.7, 1.0])),
                bias=draw(st.booleans()), relu=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.float16,
                                            torch.bfloat16])),
                seed=draw(st.integers(0, 2**31 - 1)))


def _case(g: dict, device: str = "cpu") -> tuple:
    gen = torch.Generator().manual_seed(g["seed"])
    weight = sparse_weight((g["groups"] * g["out_per_group"], g["in_per_group"], *g["kernel"]),
                           g["density"], gen, g["dtype"])
    x = torch.randn(g["batch"], g["groups"] * g["in_per_group"], *g["size"], generator=gen,
                    dtype=g["dtype"])
    bias = torch.randn(weight.shape[0], generator=gen, dtype=g["dtype"]) if g["bias"] else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x), to(weight), to(bias)


def check_against_reference(g: dict, device: str = "cpu") -> None:
    x, weight, bias = _case(g, device)
    geometry = dict(stride=g["stride"], padding=g["padding"], dilation=g["dilation"])
    y = sparse_conv2d(x, csr_lib.from_dense(weight, g["groups"]), bias, relu=g["relu"],
                      **geometry)
    before_relu = reference_conv(x, weight, bias, groups=g["groups"], **geometry)
    expected = before_relu.relu() if g["relu"] else before_relu
    assert y.shape == expected.shape and y.dtype == x.dtype and y.device == x.device
    if before_relu.abs().max() > 0:
        # Rounding is relative to the sums before the ReLU: when the ReLU zeroes nearly every
        # output, the few left can be small differences of large terms, so the error is measured
        # against the pre-ReLU norm (ReLU never increases it).
        error = torch.linalg.vector_norm(y.double().cpu() - expected).item()
        assert error < tolerance(g["dtype"]) * torch.linalg.vector_norm(before_relu).item()
    else:
        assert y.abs().max() == 0


@settings(max_examples=150, deadline=None)
@given(geometries())
@example({"batch": 3, "groups": 1, "in_per_group": 2, "out_per_group": 1, "kernel": (3, 3),
          "stride": (1, 1), "padding": (1, 2), "dilation": (2, 1), "size": (4, 1),
          "density": 0.05, "bias": True, "relu": True, "dtype": torch.float32, "seed": 38722})
def test_matches_conv2d_cpu(g: dict) -> None:
    check_against_reference(g)


@pytest.fixture
def case() -> tuple:
    gen = torch.Generator().manual_seed(1)
    weight = sparse_weight((6, 2, 3, 3), 0.3, gen)
    return (torch.randn(2, 4, 9, 7, generator=gen), csr_lib.from_dense(weight, groups=2), weight,
            torch.randn(6, generator=gen))


def test_channels_last_in_channels_last_out(case: tuple) -> None:
    x, csr, weight, bias = case
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y = sparse_conv2d(x_cl, csr, bias, padding=1, stride=2)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    expected = reference_conv(x, weight, bias, padding=1, stride=2, groups=2)
    assert relative_error(y, expected) < tolerance(torch.float32)


def test_non_contiguous_input(case: tuple) -> None:
    x, csr, weight, bias = case
    wide = torch.randn(2, 4, 9, 14)
    y = sparse_conv2d(wide[..., ::2], csr, bias)
    assert relative_error(y, reference_conv(wide[..., ::2], weight, bias, groups=2)) < 1e-5


@pytest.mark.parametrize("kernel,dilation", [(3, 1), (4, 1), (2, 3), (4, 2)])
def test_padding_same_and_valid(kernel: int, dilation: int) -> None:
    gen = torch.Generator().manual_seed(2)
    weight = sparse_weight((5, 3, kernel, kernel), 0.5, gen)
    x = torch.randn(2, 3, 10, 11, generator=gen)
    csr = csr_lib.from_dense(weight)
    for padding in ("same", "valid"):
        y = sparse_conv2d(x, csr, padding=padding, dilation=dilation)
        expected = reference_conv(x, weight, None, padding=padding, dilation=dilation)
        assert y.shape == expected.shape
        assert relative_error(y, expected) < tolerance(torch.float32)


def test_unbatched_input(case: tuple) -> None:
    x, csr, weight, bias = case
    y = sparse_conv2d(x[0], csr, bias, padding=(1, 2))
    expected = reference_conv(x[:1], weight, bias, padding=(1, 2), groups=2)[0]
    assert y.shape == expected.shape and relative_error(y, expected) < 1e-5


def test_empty_batch(case: tuple) -> None:
    x, csr, _, bias = case
    y = sparse_conv2d(x[:0], csr, bias, padding=1)
    assert y.shape == (0, 6, 9, 7)


def test_csr_round_trip_and_transpose(case: tuple) -> None:
    _, csr, weight, _ = case
    dense = torch.zeros(weight.numel()).index_put((csr.flat_index(),), csr.values)
    assert torch.equal(dense.view_as(weight), weight)
    flipped = csr_lib.transpose(csr)
    expected = weight.view(2, 3, 2, 3, 3).transpose(1, 2).flip(-1, -2).reshape(4, 3, 3, 3)
    dense_t = torch.zeros(expected.numel()).index_put((flipped.flat_index(),), flipped.values)
    assert torch.equal(dense_t.view_as(expected), expected)


@pytest.mark.parametrize("bad,match", [
    (lambda x, c, b: (x.to(torch.complex64), c, b), "computes in"),
    (lambda x, c, b: (x.int(), c, b), "computes in"),
    (lambda x, c, b: (x.double(), c, b), "one dtype"),
    (lambda x, c, b: (x[:, :3], c, b), "channels"),
    (lambda x, c, b: (x, c, b[:4]), "bias must have shape"),
    (lambda x, c, b: (x, c._replace(col_idx=c.col_idx.long()), b), "int32"),
    (lambda x, c, b: (x, c._replace(values=c.values[:-1]), b), "CSR shapes"),
])
def test_clear_errors(case: tuple, bad, match: str) -> None:
    x, csr, _, bias = case
    x, csr, bias = bad(x, csr, bias)
    with pytest.raises((TypeError, ValueError), match=match):
        sparse_conv2d(x, csr, bias)


def test_clear_errors_geometry(case: tuple) -> None:
    x, csr, _, _ = case
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        sparse_conv2d(x[..., :2, :2], csr)
    with pytest.raises(ValueError, match="needs stride 1"):
        sparse_conv2d(x, csr, padding="same", stride=2)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        sparse_conv2d(x[None], csr)
    with pytest.raises(ValueError, match="stride must be at least 1, got 0"):
        sparse_conv2d(x, csr, stride=0)


@pytest.mark.parametrize("arguments, error, match", [
    # (stride 0 beside a residual once divided by zero, reading the residual's shape)
    (dict(stride=0, residual=torch.zeros(2, 6, 9, 7)), ValueError, "stride must be at least 1"),
    (dict(dilation=(1, 0)), ValueError, "dilation must be at least 1"),
    (dict(padding=-1), ValueError, "padding must be at least 0"),
    (dict(stride=1.0), TypeError, "stride must be an int or a pair of ints, got 1.0"),
    (dict(stride=True), TypeError, "stride must be an int or a pair of ints"),
    (dict(padding=(1, 1, 1)), TypeError, "padding must be an int or a pair of ints"),
])
def test_geometry_arguments_are_named(case: tuple, arguments: dict, error: type,
                                      match: str) -> None:
    x, csr, _, _ = case
    with pytest.raises(error, match=match):
        sparse_conv2d(x, csr, **arguments)


def test_a_dense_weight_is_named(case: tuple) -> None:
    x, _, weight, _ = case
    with pytest.raises(TypeError, match="weight must be a CSRWeight .* got Parameter"):
        sparse_conv2d(x, torch.nn.Parameter(weight))


def test_numpy_integers_are_geometry_too(case: tuple) -> None:
    x, csr, weight, _ = case
    got = sparse_conv2d(x, csr, stride=np.int64(2), padding=(np.int32(1), 1))
    assert relative_error(got, reference_conv(x, weight, None, stride=2, padding=1,
                                              groups=2)) < 1e-5


def test_sees_in_place_and_data_writes(case: tuple) -> None:
    """The filter cache must never serve stale values: in-place ops bump the version counter,
    writes through .data do not (gradcheck perturbs that way) and are caught by the content
    check on the CPU."""
    x, csr, weight, _ = case
    values = csr.values.clone()
    csr = csr._replace(values=values)
    y0 = sparse_conv2d(x, csr)
    values.mul_(2)
    assert relative_error(sparse_conv2d(x, csr), 2 * y0) < 1e-6
    values.data[0] += 1.0
    expected = reference_conv(x, torch.zeros(weight.numel()).index_put(
        (csr.flat_index(),), values).view_as(weight), None, groups=2)
    assert relative_error(sparse_conv2d(x, csr), expected) < 1e-5


@pytest.mark.parametrize("in_order", [True, False])
def test_new_values_on_one_pattern_each_compute_their_own(case: tuple, in_order: bool) -> None:
    """Calls with one CSR's row_ptr and col_idx and new values each time (training steps): each
    computes with its values (float64 reference), also where a row lists its columns out of
    order (escoin's filter sorts them, so the values must follow)."""
    x, csr, weight, _ = case
    if not in_order:  # each row's entries reversed
        rows = torch.repeat_interleave(torch.arange(csr.shape[0]), csr.row_ptr.diff())
        order = torch.argsort(rows * csr.col_idx.numel() - torch.arange(csr.col_idx.numel()))
        csr = csr._replace(col_idx=csr.col_idx[order], values=csr.values[order])
    gen = torch.Generator().manual_seed(31)
    for _ in range(3):
        values = torch.randn(csr.values.shape, generator=gen, dtype=csr.values.dtype)
        dense = torch.zeros(weight.numel(), dtype=torch.float64)
        dense[csr.flat_index()] = values.double()
        expected = reference_conv(x, dense.view_as(weight), None, groups=2)
        assert relative_error(sparse_conv2d(x, csr._replace(values=values)), expected) < 1e-5


def _op_args(case: tuple, dtype: torch.dtype, relu: bool, requires_grad: bool) -> tuple:
    x, csr, _, bias = case
    t = lambda v: v.to(dtype).detach().requires_grad_(requires_grad)  # noqa: E731
    return (t(x), csr.row_ptr, csr.col_idx, t(csr.values), list(csr.shape), t(bias), [2, 1],
            [1, 2], [1, 2], csr.groups, relu)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(case: tuple, relu: bool, requires_grad: bool) -> None:
    torch.library.opcheck(torch.ops.escoin.sparse_conv2d.default,
                          _op_args(case, torch.float32, relu, requires_grad))


def _extension_loaded() -> bool:
    from escoin_torch import ops
    return ops._native is not None


def _calls_of(case: tuple) -> tuple:
    """The case's op call, with x and the CSR values as arguments, and its float64 result."""
    x, csr, weight, bias = case
    expected = reference_conv(x, weight, bias, stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                              groups=2)

    def call(x: torch.Tensor, values: torch.Tensor = csr.values,
             bias: torch.Tensor = bias) -> torch.Tensor:
        return torch.ops.escoin.sparse_conv2d(x, csr.row_ptr, csr.col_idx, values,
                                              list(csr.shape), bias, [2, 1], [1, 2], [1, 2],
                                              csr.groups, False)
    return call, expected


@pytest.mark.skipif(not _extension_loaded(), reason="escoin_torch._native did not load")
def test_autograd_kernel_records_only_what_autograd_must_see(case: tuple) -> None:
    """The op's autograd kernel (native_kernel.cpp's) hands a call to Python's _recorded only
    where a gradient is to be recorded (gradients on and any one tensor requiring one) or a
    tangent carried; elsewhere it goes on down the dispatcher, where a dispatch mode still sees
    the op and a lazily negated x is negated first. Every way gives F.conv2d's result."""
    from escoin_torch import ops

    call, expected = _calls_of(case)
    x, csr, _, bias = case
    wants = csr.values.clone().requires_grad_()
    recorded = lambda: ops._native.stats()["recorded_calls"]  # noqa: E731
    start = recorded()
    results = []
    with torch.no_grad():
        results.append(call(x, wants))  # a tensor requires a gradient, gradients off
        assert results[-1].grad_fn is None
    results.append(call(x))  # gradients on, nothing requires one
    with torch.no_grad(), SeenOps() as mode:
        results.append(call(x))
    assert "escoin.sparse_conv2d.default" in mode.names
    with torch.no_grad():
        negated = torch._neg_view(-x)
        assert negated.is_neg()
        results.append(call(negated))
    assert recorded() == start
    # Each tensor argument alone requiring a gradient is recorded, once (the recorded forward's
    # own call of the op runs with gradients off).
    for y in (call(x.clone().requires_grad_()), call(x, wants),
              call(x, bias=bias.clone().requires_grad_())):
        assert y.grad_fn is not None
        results.append(y.detach())
    assert recorded() == start + 3
    with torch.no_grad(), forward_ad.dual_level():
        dual = call(forward_ad.make_dual(x, torch.randn_like(x)))
        assert forward_ad.unpack_dual(dual).tangent is not None
        results.append(forward_ad.unpack_dual(dual).primal)
    assert recorded() == start + 4
    for y in results:
        assert relative_error(y, expected) < 1e-5


def test_the_python_autograd_kernel_records_only_what_autograd_must_see(
        case: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """_sparse_conv2d_autograd (registered where the extension did not load; a fresh
    interpreter without it: test_torch_native.py), called with the keys the dispatcher would
    hand it: _recorded only for a gradient to record or a tangent to carry, elsewhere on down
    the dispatcher to the CPU kernel."""
    from escoin_torch import ops

    recorded = count_calls(monkeypatch, ops, "_recorded")
    _, expected = _calls_of(case)
    x, csr, _, bias = case
    args = (x, csr.row_ptr, csr.col_idx, csr.values, list(csr.shape), bias, [2, 1], [1, 2],
            [1, 2], csr.groups, False)
    key = torch._C.DispatchKey
    keys = torch._C.DispatchKeySet(key.CPU) | torch._C.DispatchKeySet(key.AutogradCPU)
    kernel = ops._sparse_conv2d_autograd
    wants = x.clone().requires_grad_()
    with torch.no_grad():
        results = [kernel(keys, wants, *args[1:])]  # requires a gradient, gradients off
    results.append(kernel(keys, *args))  # gradients on, nothing requires one
    assert not recorded and all(y.grad_fn is None for y in results)
    results.append(kernel(keys, wants, *args[1:]))
    assert len(recorded) == 1 and results[-1].grad_fn is not None
    with torch.no_grad(), forward_ad.dual_level():
        dual = kernel(keys, forward_ad.make_dual(x, torch.randn_like(x)), *args[1:])
        assert forward_ad.unpack_dual(dual).tangent is not None
        results.append(forward_ad.unpack_dual(dual).primal)
    assert len(recorded) == 2
    for y in results:
        assert relative_error(y.detach(), expected) < 1e-5


def test_opcheck_channels_last(case: tuple) -> None:
    args = list(_op_args(case, torch.float32, False, True))
    args[0] = args[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.escoin.sparse_conv2d.default, tuple(args))


@pytest.mark.parametrize("geometry", [
    dict(stride=[1, 1], padding=[0, 0], dilation=[1, 1]),
    dict(stride=[2, 3], padding=[1, 0], dilation=[1, 1]),
    dict(stride=[2, 2], padding=[3, 4], dilation=[1, 1]),   # padding beyond the kernel extent
    dict(stride=[1, 2], padding=[2, 1], dilation=[2, 1]),
    dict(stride=[3, 1], padding=[0, 2], dilation=[2, 2]),
])
@pytest.mark.parametrize("relu", [False, True])
def test_gradcheck(geometry: dict, relu: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    weight = sparse_weight((4, 3, 3, 2), 0.4, gen, torch.float64)
    csr = csr_lib.from_dense(weight, groups=2)
    x = torch.randn(2, 6, 8, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    values = csr.values.clone().requires_grad_()
    bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.ops.escoin.sparse_conv2d(x, csr.row_ptr, csr.col_idx, values,
                                              list(csr.shape), bias, groups=2, relu=relu,
                                              **geometry)

    assert torch.autograd.gradcheck(fn, (x, values, bias))


def test_gradgradcheck() -> None:
    """Second derivatives through the op's recorded calls (the plain autograd.Function where no
    functorch transform is active): the backward is itself differentiable in x and the
    values."""
    gen = torch.Generator().manual_seed(4)
    weight = sparse_weight((4, 3, 3, 3), 0.4, gen, torch.float64)
    csr = csr_lib.from_dense(weight)
    x = torch.randn(2, 3, 7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    values = csr.values.clone().requires_grad_()

    def fn(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.ops.escoin.sparse_conv2d(x, csr.row_ptr, csr.col_idx, values,
                                              list(csr.shape), None, stride=[2, 1],
                                              padding=[1, 2], dilation=[1, 1], groups=1,
                                              relu=False)

    assert torch.autograd.gradgradcheck(fn, (x, values))


def test_gradients_match_dense_conv(case: tuple) -> None:
    """Against F.conv2d's autograd; the weight gradient is compared at the stored entries only."""
    x, csr, weight, bias = case
    x = x.double().requires_grad_()
    values = csr.values.double().requires_grad_()
    w_dense = weight.double().requires_grad_()
    y = sparse_conv2d(x, csr._replace(values=values), bias.double(), stride=2, padding=1)
    y_ref = F.conv2d(x, w_dense, bias.double(), stride=2, padding=1, groups=2)
    g = torch.randn_like(y)
    gx, gv = torch.autograd.grad(y, (x, values), g)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w_dense), g)
    assert relative_error(gx, gx_ref) < 1e-12
    assert relative_error(gv, gw_ref.reshape(-1)[csr.flat_index()]) < 1e-12


def _residual_for(args: tuple, requires_grad: bool) -> torch.Tensor:
    """A random residual of the op's output shape for these arguments."""
    with torch.no_grad():
        shape = torch.ops.escoin.sparse_conv2d(*(a.detach() if isinstance(a, torch.Tensor)
                                                 else a for a in args)).shape
    gen = torch.Generator().manual_seed(5)
    return torch.randn(shape, generator=gen, dtype=args[0].dtype).requires_grad_(requires_grad)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_with_residual(case: tuple, relu: bool, requires_grad: bool) -> None:
    args = _op_args(case, torch.float32, relu, requires_grad)
    torch.library.opcheck(torch.ops.escoin.sparse_conv2d.default,
                          args + (_residual_for(args, requires_grad),))


@pytest.mark.parametrize("relu", [False, True])
def test_gradcheck_with_residual(relu: bool) -> None:
    """The residual's gradient is the output's, through the ReLU; the others are unchanged."""
    gen = torch.Generator().manual_seed(4)
    weight = sparse_weight((4, 3, 3, 2), 0.4, gen, torch.float64)
    csr = csr_lib.from_dense(weight, groups=2)
    x = torch.randn(2, 6, 8, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    values = csr.values.clone().requires_grad_()
    residual = torch.randn(2, 4, 4, 8, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(x: torch.Tensor, values: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return torch.ops.escoin.sparse_conv2d(x, csr.row_ptr, csr.col_idx, values,
                                              list(csr.shape), None, [2, 1], [1, 1], [1, 1], 2,
                                              relu, residual)

    assert torch.autograd.gradcheck(fn, (x, values, residual))


@pytest.mark.parametrize("shape", [(2, 6, 5, 4), (1, 6, 1, 1), (6, 1, 1)])
@pytest.mark.parametrize("relu", [False, True])
def test_residual_matches_conv2d_plus_residual(case: tuple, shape: tuple, relu: bool) -> None:
    """relu(conv2d(x) + residual): added in the kernel at the output's shape, and where it only
    broadcasts to it (a per-channel term), added after the kernel as torch adds it."""
    x, csr, weight, bias = case
    residual = torch.randn(shape, dtype=torch.float64)
    y = sparse_conv2d(x.double(), csr._replace(values=csr.values.double()), bias.double(),
                      stride=2, padding=1, relu=relu, residual=residual)
    expected = reference_conv(x, weight, bias, stride=2, padding=1, groups=2) + residual
    assert relative_error(y, expected.relu() if relu else expected) < 1e-12


def test_residual_errors(case: tuple) -> None:
    x, csr, _, bias = case
    args = (x, csr.row_ptr, csr.col_idx, csr.values, list(csr.shape), bias, [2, 2], [1, 1],
            [1, 1], 2, False)
    for residual in (torch.zeros(2, 6, 5, 3), torch.zeros(2, 6, 5, 4, dtype=torch.float64)):
        with pytest.raises(ValueError, match="residual must be a torch.float32 tensor on cpu of "
                                             r"the output's shape \(2, 6, 5, 4\)"):
            torch.ops.escoin.sparse_conv2d(*args, residual)


def test_negated_views_are_read_as_their_values() -> None:
    """A tensor carrying torch's lazy negation (the neg bit) is read as the values it stands for,
    not as its memory: the kernels read raw pointers."""
    gen = torch.Generator().manual_seed(14)
    weight = sparse_weight((6, 4, 3, 3), 0.3, gen)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    bias = torch.randn(6, generator=gen)
    negated = torch._neg_view(-x)
    assert negated.is_neg()
    y = sparse_conv2d(negated, csr_lib.from_dense(weight), torch._neg_view(-bias), padding=1)
    assert relative_error(y, reference_conv(x, weight, bias, padding=1)) < 1e-5


def test_release_geometries() -> None:
    check_release_geometries("cpu")
