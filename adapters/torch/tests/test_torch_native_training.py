"""The C++ training path (csrc/native_training.cpp): a training step's calls on a known pattern
recorded and differentiated without Python, checked against float64 and against the Python path
it stands in for, and the cases it leaves to that path."""
from __future__ import annotations

from typing import Iterator, Optional

import pytest
import torch
import torch.nn.functional as F

from torch_helpers import SeenOps, relative_error, sparse_conv, strict_fp32_cudnn
import escoin_torch
from escoin_torch import SparseConv2d, ops, sparse_conv2d
from escoin_torch import csr as csr_lib

pytestmark = pytest.mark.cuda

# (in, out, kernel, stride, padding, dilation, groups, bias, relu, residual)
GEOMETRIES = [
    (8, 32, 3, 1, 1, 1, 1, True, True, False),
    (16, 32, 3, 2, 1, 1, 1, False, True, True),
    (12, 24, 3, 1, 2, 2, 3, True, False, False),
    (32, 16, 1, 1, 0, 1, 1, False, False, True),
    (8, 16, 5, 2, 0, 1, 2, True, True, False),
    (8, 16, 3, 3, 4, 1, 1, True, False, False),  # padding past the kernel: the gradient crops
]


def _stats() -> dict:
    return ops._native.training_stats()


@pytest.fixture
def native_training(request: pytest.FixtureRequest) -> Iterator[bool]:
    """The C++ training path on (True) or off (False: the Python path it stands in for)."""
    if ops._native is None or not ops._native_trains:
        pytest.skip("escoin-torch's C++ training path is not built")
    on = getattr(request, "param", True)
    previous = escoin_torch.set_native_training(on)
    try:
        with strict_fp32_cudnn():  # (the weight gradients are held to float64 at 1e-5)
            yield on
    finally:
        escoin_torch.set_native_training(previous)


def _layer(geometry: tuple, dtype: torch.dtype = torch.float32) -> SparseConv2d:
    c_in, c_out, k, stride, padding, dilation, groups, bias, relu, _ = geometry
    conv = sparse_conv(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation,
                       groups=groups, bias=bias)
    layer = SparseConv2d.from_dense(conv, relu=relu, sparse_training=True)
    return layer.to("cuda", dtype).train()


def _inputs(layer: SparseConv2d, geometry: tuple, dtype: torch.dtype, seed: int) -> tuple:
    generator = torch.Generator("cuda").manual_seed(seed)
    x = torch.randn(4, layer.in_channels, 13, 11, device="cuda", dtype=dtype,
                    generator=generator)
    with torch.no_grad():
        shape = F.conv2d(x.float(), layer.weight.float(), None, layer.stride, layer.padding,
                         layer.dilation, layer.groups).shape
    residual = (torch.randn(shape, device="cuda", dtype=dtype, generator=generator)
                if geometry[-1] else None)
    upstream = torch.randn(shape, device="cuda", dtype=dtype, generator=generator)
    return x, residual, upstream


def _step(layer: SparseConv2d, x: torch.Tensor, residual: Optional[torch.Tensor],
          upstream: torch.Tensor) -> tuple:
    """One forward and backward: the output and the gradients of x, weight, bias, residual."""
    for p in layer.parameters():
        p.grad = None
    x = x.detach().requires_grad_()
    residual = None if residual is None else residual.detach().requires_grad_()
    y = layer(x) if residual is None else layer(x, residual)
    (y * upstream).sum().backward()
    return (y.detach(), x.grad, layer.weight.grad,
            None if layer.bias is None else layer.bias.grad,
            None if residual is None else residual.grad)


def _float64_step(layer: SparseConv2d, x: torch.Tensor, residual: Optional[torch.Tensor],
                  upstream: torch.Tensor) -> tuple:
    """_step's results from F.conv2d in float64, the weight gradient kept at the pattern."""
    x64 = x.detach().double().requires_grad_()
    w64 = layer.weight.detach().double().requires_grad_()
    b64 = None if layer.bias is None else layer.bias.detach().double().requires_grad_()
    r64 = None if residual is None else residual.detach().double().requires_grad_()
    y = F.conv2d(x64, w64, b64, layer.stride, layer.padding, layer.dilation, layer.groups)
    if r64 is not None:
        y = y + r64
    if layer.relu:
        y = F.relu(y)
    (y * upstream.double()).sum().backward()
    mask = layer.weight.detach() != 0
    return (y.detach(), x64.grad, w64.grad * mask, None if b64 is None else b64.grad,
            None if r64 is None else r64.grad)


def _optimiser_step(layer: SparseConv2d) -> None:
    """A step that keeps the pattern (SGD on the weight's stored entries only: the weight's
    gradient is zero elsewhere), and the CSRs brought up to date."""
    with torch.no_grad():
        layer.weight.sub_(0.05 * layer.weight.grad)
        if layer.bias is not None:
            layer.bias.sub_(0.05 * layer.bias.grad)
    escoin_torch.refresh_csrs(layer)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_steps_after_the_first_run_in_cpp_and_match_float64(native_training: bool,
                                                            geometry: tuple,
                                                            dtype: torch.dtype) -> None:
    """The first step runs the Python path, which tells the C++ one the pattern; every later
    step's forward and backward run there, on that step's values, and agree with float64."""
    layer = _layer(geometry, dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for seed in range(4):
        x, residual, upstream = _inputs(layer, geometry, dtype, seed)
        before = _stats()
        results = _step(layer, x, residual, upstream)
        after = _stats()
        native = seed > 0  # (the first step's Python path taught it the pattern)
        assert after["native_forwards"] - before["native_forwards"] == int(native)
        assert after["native_backwards"] - before["native_backwards"] == int(native)
        expected = _float64_step(layer, x, residual, upstream)
        for name, got, want in zip(("y", "x", "weight", "bias", "residual"), results,
                                   expected):
            assert (got is None) == (want is None), name
            if got is not None:
                assert got.dtype == dtype, name
                assert relative_error(got, want) < tolerance, name
        _optimiser_step(layer)


@pytest.mark.parametrize("native_training", [False], indirect=True)
def test_the_switch_leaves_every_call_to_the_python_path(native_training: bool) -> None:
    layer = _layer(GEOMETRIES[0])
    before = _stats()
    for seed in range(3):
        _step(layer, *_inputs(layer, GEOMETRIES[0], torch.float32, seed))
        _optimiser_step(layer)
    assert _stats()["native_forwards"] == before["native_forwards"]


def test_the_cpp_path_computes_what_the_python_path_does(native_training: bool) -> None:
    """Two runs of the same steps from the same start, the C++ path off and on: the same
    outputs and gradients (the same kernels on the same values, in another order of host
    work)."""
    runs = []
    for on in (False, True):
        escoin_torch.set_native_training(on)
        layer = _layer(GEOMETRIES[1])
        results = []
        for seed in range(3):
            results.append(_step(layer, *_inputs(layer, GEOMETRIES[1], torch.float32, seed)))
            _optimiser_step(layer)
        runs.append(results)
    for python_step, native_step in zip(*runs):
        for got, want in zip(native_step, python_step):
            if want is not None:
                assert relative_error(got, want) < 1e-6


def test_a_double_backward_is_left_to_the_python_path(native_training: bool) -> None:
    """A backward that records its own graph (create_graph) gets ops.py's differentiable
    gradients: the gradient of a gradient's norm matches float64."""
    geometry = GEOMETRIES[2]  # (no ReLU: its mask would make the second derivative zero)
    layer = _layer(geometry)
    x, _, upstream = _inputs(layer, geometry, torch.float32, 0)
    _step(layer, x, None, upstream)
    _optimiser_step(layer)
    before = _stats()
    x = x.detach().requires_grad_()
    (grad_x,) = torch.autograd.grad((layer(x).square() * upstream).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad_x.square().sum(), x)
    assert _stats()["native_forwards"] > before["native_forwards"]
    assert _stats()["python_backwards"] > before["python_backwards"]
    x64 = x.detach().double().requires_grad_()
    y64 = F.conv2d(x64, layer.weight.detach().double(), layer.bias.detach().double(),
                   layer.stride, layer.padding, layer.dilation, layer.groups)
    (g64,) = torch.autograd.grad((y64.square() * upstream.double()).sum(), x64,
                                 create_graph=True)
    (second64,) = torch.autograd.grad(g64.square().sum(), x64)
    assert relative_error(grad_x, g64) < 1e-5
    assert relative_error(second, second64) < 1e-5


def test_calls_on_two_streams_each_write_their_program_there(native_training: bool) -> None:
    """A call's program is written on the stream it runs on: calls on two side streams, each
    with its own values, both match float64."""
    geometry = GEOMETRIES[0]
    layer = _layer(geometry)
    _step(layer, *_inputs(layer, geometry, torch.float32, 0))
    _optimiser_step(layer)
    x, _, upstream = _inputs(layer, geometry, torch.float32, 1)
    expected = _float64_step(layer, x, None, upstream)[0]
    before = _stats()["native_forwards"]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outputs = []
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            outputs.append(layer(x.detach().requires_grad_()))
        torch.cuda.current_stream().wait_stream(stream)
    assert _stats()["native_forwards"] - before == (2 if native_training else 0)
    for y in outputs:
        assert relative_error(y, expected) < 1e-5


def test_after_release_geometries_the_next_step_teaches_it_again(native_training: bool) -> None:
    layer = _layer(GEOMETRIES[2])
    for seed in range(2):
        _step(layer, *_inputs(layer, GEOMETRIES[2], torch.float32, seed))
        _optimiser_step(layer)
    escoin_torch.release_geometries()
    assert _stats()["patterns"] == 0 and _stats()["transpositions"] == 0
    for seed, native in ((2, False), (3, True)):
        x, residual, upstream = _inputs(layer, GEOMETRIES[2], torch.float32, seed)
        before = _stats()["native_forwards"]
        results = _step(layer, x, residual, upstream)
        assert _stats()["native_forwards"] - before == int(native)
        expected = _float64_step(layer, x, residual, upstream)
        for got, want in zip(results, expected):
            if want is not None:
                assert relative_error(got, want) < 1e-5
        _optimiser_step(layer)


def test_a_deleted_layer_leaves_nothing_in_the_cpp_maps(native_training: bool) -> None:
    """What the C++ kernel and training path learnt of a layer (its patterns, transposition and
    remembered calls, which hold device memory) goes as the layer is deleted, not at the next
    call that learns something; a live layer's entries stay."""
    import gc
    gc.collect()
    kept = _layer(GEOMETRIES[0])
    before = (_stats(), ops._native.stats()["remembered"], torch.cuda.memory_allocated())
    layer = _layer(GEOMETRIES[3])
    for seed in range(2):
        _step(layer, *_inputs(layer, GEOMETRIES[3], torch.float32, seed))
        _optimiser_step(layer)
    learnt = _stats()
    assert learnt["patterns"] > before[0]["patterns"]
    assert learnt["transpositions"] > before[0]["transpositions"]
    layer.eval()  # (a new CSR: the training one's entries go with it)
    x, residual, _ = _inputs(layer, GEOMETRIES[3], torch.float32, 9)
    with torch.no_grad():
        for _ in range(2):  # (the first call is remembered, the second runs in C++)
            layer(x, residual)
    del x, residual
    assert ops._native.stats()["remembered"] > before[1]
    del layer
    gc.collect()
    after = _stats()
    assert after["patterns"] == before[0]["patterns"]
    assert after["transpositions"] == before[0]["transpositions"]
    assert ops._native.stats()["remembered"] == before[1]
    assert torch.cuda.memory_allocated() == before[2]
    x, residual, upstream = _inputs(kept, GEOMETRIES[0], torch.float32, 0)
    assert relative_error(_step(kept, x, residual, upstream)[0],
                          _float64_step(kept, x, residual, upstream)[0]) < 1e-5


def test_calls_under_a_dispatch_mode_are_left_to_the_python_path(native_training: bool) -> None:
    """A TorchDispatchMode must see the op's calls: a known pattern's call under one is not
    taken by the C++ path."""
    layer = _layer(GEOMETRIES[0])
    x, residual, upstream = _inputs(layer, GEOMETRIES[0], torch.float32, 0)
    _step(layer, x, residual, upstream)
    _optimiser_step(layer)
    before = _stats()["native_forwards"]
    with SeenOps() as seen:
        layer(x.requires_grad_())
    assert _stats()["native_forwards"] == before
    assert any("escoin.sparse_conv2d" in name for name in seen.names)


def test_a_backward_under_a_dispatch_mode_is_left_to_the_python_path(
        native_training: bool) -> None:
    """A mode entered around the backward alone must see its calls too: the recorded call's
    backward is then ops.py's, whose input gradient calls the op through the dispatcher."""
    layer = _layer(GEOMETRIES[0])
    x, residual, upstream = _inputs(layer, GEOMETRIES[0], torch.float32, 0)
    _step(layer, x, residual, upstream)
    _optimiser_step(layer)
    before = _stats()
    y = layer(x.detach().requires_grad_())
    with SeenOps() as seen:
        (y * upstream).sum().backward()
    after = _stats()
    assert after["native_forwards"] - before["native_forwards"] == 1
    assert after["native_backwards"] == before["native_backwards"]
    assert after["python_backwards"] - before["python_backwards"] == 1
    assert any("escoin.sparse_conv2d" in name for name in seen.names)


@pytest.mark.parametrize("release_between", [False, True])
def test_checkpointed_steps_recompute_on_either_path(native_training: bool,
                                                     release_between: bool) -> None:
    """Non-reentrant activation checkpointing runs the forward again in the backward and hands
    what it saves to the first forward's node by position, so both paths save the same tensors
    in the same order. The first step's forward runs the Python path (which teaches the C++
    one) and its recomputation the C++ path; with release_geometries between a later step's
    forward and backward, the forward runs the C++ path and the recomputation Python. Every
    step matches float64."""
    from torch.utils.checkpoint import checkpoint

    geometry = GEOMETRIES[0]  # (bias and ReLU: the output is saved too)
    layer = _layer(geometry)
    for seed in range(3):
        x, _, upstream = _inputs(layer, geometry, torch.float32, seed)
        x = x.detach().requires_grad_()
        before = _stats()["native_forwards"]
        y = checkpoint(layer, x, use_reentrant=False)
        if release_between and seed == 2:
            escoin_torch.release_geometries()
        (y * upstream).sum().backward()
        # (recorded in C++: the first step's recomputation; later steps' forwards, and their
        # recomputations unless the pattern was released between)
        expected_native = 1 if seed == 0 or (release_between and seed == 2) else 2
        assert _stats()["native_forwards"] - before == expected_native
        expected = _float64_step(layer, x, None, upstream)
        results = (y.detach(), x.grad, layer.weight.grad, layer.bias.grad)
        for name, got, want in zip(("y", "x", "weight", "bias"), results, expected):
            assert relative_error(got, want) < 1e-5, name
        _optimiser_step(layer)
        layer.zero_grad()


def _op_steps(csr: csr_lib.CSRWeight, seeds: range) -> Iterator[tuple]:
    """Op calls on `csr`'s pattern as a training loop makes them, new values each: per step,
    the C++ path's recorded calls in it and the errors of y, x's and the values' gradients
    against float64."""
    for seed in seeds:
        generator = torch.Generator("cuda").manual_seed(seed)
        x = torch.randn(2, csr.shape[1], 9, 10, device="cuda", generator=generator)
        values = torch.randn(csr.values.shape, device="cuda", generator=generator)
        upstream = torch.randn(2, csr.shape[0], 9 + 3 - csr.shape[2], 10 + 3 - csr.shape[3],
                               device="cuda", generator=generator)  # (y's shape: padding 1)
        before = _stats()["native_forwards"]
        x.requires_grad_()
        values.requires_grad_()
        y = sparse_conv2d(x, csr._replace(values=values), padding=(1, 1))
        (y * upstream).sum().backward()
        recorded = _stats()["native_forwards"] - before
        x64 = x.detach().double().requires_grad_()
        dense = torch.zeros(csr.shape, device="cuda", dtype=torch.float64)
        dense.view(-1)[csr.flat_index()] = values.detach().double()
        w64 = dense.requires_grad_()
        y64 = F.conv2d(x64, w64, None, 1, (1, 1))
        (y64 * upstream.double()).sum().backward()
        yield recorded, [relative_error(y, y64), relative_error(x.grad, x64.grad),
                         relative_error(values.grad, w64.grad.view(-1)[csr.flat_index()])]


@pytest.mark.parametrize("in_order", [True, False])
def test_rows_listing_their_columns_out_of_order_stay_on_the_python_path(
        native_training: bool, in_order: bool) -> None:
    """escoin's filter sorts each row's columns, so a step's new values (in the tensors'
    order) cannot go to the C++ path's program as they come where a row was out of order:
    such a pattern's steps all run the Python path, and every step matches float64."""
    weight = sparse_conv(8, 16, 3).weight.detach().cuda()
    csr = csr_lib.from_dense(weight)
    if not in_order:  # each row's entries reversed
        rows = torch.repeat_interleave(torch.arange(16, device="cuda"), csr.row_ptr.diff())
        order = torch.argsort(rows * csr.nnz - torch.arange(csr.nnz, device="cuda"))
        csr = csr._replace(col_idx=csr.col_idx[order], values=csr.values[order])
    steps = list(_op_steps(csr, range(4)))
    assert [recorded for recorded, _ in steps] == ([0, 1, 1, 1] if in_order else [0] * 4)
    for _, errors in steps:
        assert max(errors) < 1e-5, errors


def test_one_pattern_read_as_two_weight_shapes_has_a_transposition_each(
        native_training: bool) -> None:
    """The same row_ptr and col_idx as a 3x3 and as a 1x9 weight (the same number of columns a
    row) transpose differently: steps alternating between the two each get their own input
    gradient pattern."""
    weight = sparse_conv(8, 16, 3).weight.detach().cuda()
    square = csr_lib.from_dense(weight)
    wide = square._replace(shape=(16, 8, 1, 9))
    for round_ in range(3):
        for csr in (square, wide):
            for recorded, errors in _op_steps(csr, range(round_, round_ + 1)):
                assert recorded == int(round_ > 0)  # (the first round taught it both)
                assert max(errors) < 1e-5, (csr.shape, errors)
