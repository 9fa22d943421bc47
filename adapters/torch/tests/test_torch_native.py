"""The op's C++ CUDA kernel (csrc/native_kernel.cpp): built and registered; on a GPU, the calls it
runs itself match float64 and those it must not run (unseen keys, rewritten or freed CSR
tensors, other layouts, bad arguments) go to the Python kernel."""
from __future__ import annotations

import math
import subprocess
import sys
from typing import Callable, Optional

import pytest
import torch

from torch_helpers import reference_conv, relative_error, sparse_weight, tolerance
import escoin_torch
from escoin_torch import csr as csr_lib
from escoin_torch import ops


def test_the_cpp_kernels_are_built_and_are_the_ops_cuda_and_autograd_kernels() -> None:
    """The extension loads (a build that silently fell back to the Python kernels fails here)
    and the dispatcher's CUDA and autograd kernels for the op are its C++ functions, not Python
    ones; conv2d_with_filter's plain CUDA calls take the C++ one too."""
    assert ops._native is not None
    dump = torch._C._dispatch_dump("escoin::sparse_conv2d").splitlines()
    for key in ("CUDA:", "Autograd[alias]:"):
        kernel = [line for line in dump if line.startswith(key)]
        assert len(kernel) == 1 and "native_kernel.cpp" in kernel[0] and "unboxed" in kernel[0]
    assert ops._cuda_kernel is ops._native.sparse_conv2d_cuda


def test_the_cpp_entry_takes_the_arguments_as_the_plain_path_passes_them() -> None:
    """conv2d_with_filter's plain calls call the C++ function with the op's arguments: lists
    for int[], the residual left out. (On the CPU it hands x to the Python kernel, which
    computes it there, so the conversion is checked without a GPU.)"""
    weight, x, bias = _case(GEOMETRIES[0], torch.float32, seed=20)
    csr = csr_lib.from_dense(weight)
    y = ops._native.sparse_conv2d_cuda(x, csr.row_ptr, csr.col_idx, csr.values, [16, 8, 3, 3],
                                       bias, [1, 1], [1, 1], [1, 1], 1, True)
    assert relative_error(y, torch.relu(reference_conv(x, weight, bias, padding=1))) <= 1e-5


def test_an_escoin_whose_calls_it_cannot_read_leaves_the_python_kernel_with_a_warning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """remember failing (escoin and escoin-torch of different versions) warns once and stops
    remembering, and the call it came from still returns its result."""
    def refuses(*args: object) -> None:
        raise RuntimeError("native_arguments() has another form")
    monkeypatch.setattr(ops._native, "remember", refuses)
    monkeypatch.setattr(ops, "_native_remembers", True)
    monkeypatch.setattr(ops, "_native_trains", ops._native_trains)  # (put back afterwards)
    native = escoin_torch.set_native_training(False)
    monkeypatch.setattr(ops._native, "set_training_calls", lambda on: None)
    weight, x, bias = _case(GEOMETRIES[0], torch.float32, seed=19)
    csr = csr_lib.from_dense(weight)
    args = (x, csr.row_ptr, csr.col_idx, csr.values, [16, 8, 3, 3], bias, [1, 1], [1, 1],
            [1, 1], 1, False)
    with pytest.warns(RuntimeWarning, match="cannot use this escoin"):
        y = ops._sparse_conv2d_cuda(*args)  # (the Python kernel computes CPU tensors too)
    assert not ops._native_remembers and not ops._native_trains
    assert relative_error(y, reference_conv(x, weight, bias, padding=1)) <= 1e-5
    monkeypatch.undo()
    escoin_torch.set_native_training(native)


def test_the_cpp_training_path_is_on_by_default_and_leaves_cpu_calls_alone() -> None:
    """set_native_training switches it and returns the previous setting; switched on, a CPU
    training step is still the Python path's (the C++ path takes CUDA calls only), and its
    gradients match float64."""
    assert ops._native_trains
    assert escoin_torch.set_native_training(False) is True  # (on until switched off)
    assert escoin_torch.set_native_training(True) is False
    try:
        before = ops._native.training_stats()
        weight, x, bias = _case(GEOMETRIES[1], torch.float32, seed=21)
        layer = escoin_torch.SparseConv2d(8, 16, 3, stride=2, padding=1, groups=2)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        layer.sparse_training = True
        layer.train()
        for _ in range(2):  # (the second: the pattern known, were it a GPU's)
            layer.zero_grad()
            x.grad = None
            y = layer(x.requires_grad_())
            y.square().sum().backward()
        after = ops._native.training_stats()
        assert after["native_forwards"] == before["native_forwards"]
        assert after["patterns"] == before["patterns"]
        x64 = x.detach().double().requires_grad_()
        w64 = weight.double().requires_grad_()
        y64 = torch.nn.functional.conv2d(x64, w64, bias.double(), 2, 1, 1, 2)
        y64.square().sum().backward()
        assert relative_error(y, y64) <= 1e-5
        assert relative_error(x.grad, x64.grad) <= 1e-5
        assert relative_error(layer.weight.grad, w64.grad * (weight != 0)) <= 1e-5
    finally:
        escoin_torch.set_native_training(True)


# Run in a fresh interpreter whose import of the extension fails (as where it was built for
# another torch): escoin-torch must warn, register its Python kernels, and keep every behaviour.
_WITHOUT_THE_EXTENSION = """
import importlib.abc, sys, warnings

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "escoin_torch._native":
            raise ImportError("blocked by the test")
        return None

sys.meta_path.insert(0, Blocked())
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from escoin_torch import csr as csr_lib, ops
assert ops._native is None
assert any("C++ kernel did not load" in str(w.message) for w in caught), caught
assert "native_kernel.cpp" not in torch._C._dispatch_dump("escoin::sparse_conv2d")

class Seen(TorchDispatchMode):
    names = []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))

gen = torch.Generator().manual_seed(3)
weight = torch.randn(8, 4, 3, 3, generator=gen, dtype=torch.float64)
weight[torch.rand(weight.shape, generator=gen) < 0.7] = 0
csr = csr_lib.from_dense(weight)
x = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64, requires_grad=True)
call = lambda x: torch.ops.escoin.sparse_conv2d(
    x, csr.row_ptr, csr.col_idx, csr.values, [8, 4, 3, 3], None, [1, 1], [1, 1], [1, 1], 1,
    False)
error = lambda got, want: float((got - want).norm() / want.norm())
reference = F.conv2d(x, weight, padding=1)
y = call(x)
grad = torch.randn(y.shape, generator=gen, dtype=torch.float64)
got, = torch.autograd.grad(y, x, grad)
want, = torch.autograd.grad(reference, x, grad)
assert y.grad_fn is not None and error(got, want) < 1e-12
with torch.no_grad(), Seen():
    plain = call(x)
assert plain.grad_fn is None and "escoin.sparse_conv2d.default" in Seen.names
assert error(plain, reference.detach()) < 1e-12
tangent = torch.randn(x.shape, generator=gen, dtype=torch.float64)
with torch.no_grad(), forward_ad.dual_level():
    out = forward_ad.unpack_dual(call(forward_ad.make_dual(x.detach(), tangent))).tangent
assert out is not None and error(out, F.conv2d(tangent, weight, padding=1)) < 1e-12
print("every check held")
"""


def test_without_the_extension_the_python_kernels_serve_every_call() -> None:
    """Where the extension does not load, escoin-torch warns and its Python autograd and CUDA
    kernels are registered instead: gradients recorded, dispatch modes seeing no-grad calls and
    tangents carried as with the C++ kernels (a fresh interpreter, float64 against F.conv2d)."""
    done = subprocess.run([sys.executable, "-c", _WITHOUT_THE_EXTENSION], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "every check held" in done.stdout


def _fast_calls() -> int:
    return ops._native.stats()["fast_calls"]


def _poison_next_output(shape: tuple, dtype: torch.dtype) -> None:
    """Frees a NaN-filled block of the output's size, which the caching allocator hands to the
    next allocation of that size: elements a kernel leaves unwritten then show as NaN."""
    torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    torch.cuda.synchronize()


GEOMETRIES = [
    dict(stride=1, padding=1, dilation=1, groups=1, kernel=3),
    dict(stride=2, padding=1, dilation=1, groups=2, kernel=3),
    dict(stride=1, padding=2, dilation=2, groups=1, kernel=3),
    dict(stride=1, padding=0, dilation=1, groups=1, kernel=1),
]


def _case(g: dict, dtype: torch.dtype, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    weight = sparse_weight((16, 8 // g["groups"], g["kernel"], g["kernel"]), 0.2, gen, dtype)
    x = torch.randn(3, 8, 13, 11, generator=gen).to(dtype)
    bias = torch.randn(16, generator=gen).to(dtype)
    return weight, x, bias


def _cuda_case(seed: int, g: dict = GEOMETRIES[0]) -> tuple:
    """A float32 case's weight (on the CPU), its CSR, x and bias on the GPU."""
    weight, x, bias = _case(g, torch.float32, seed)
    return weight, csr_lib.from_dense(weight.cuda(), g["groups"]), x.cuda(), bias.cuda()


def _op(x: torch.Tensor, csr: csr_lib.CSRWeight, bias: Optional[torch.Tensor], g: dict,
        relu: bool, residual: Optional[torch.Tensor] = None,
        entry: Callable[..., torch.Tensor] = torch.ops.escoin.sparse_conv2d) -> torch.Tensor:
    """The op (or `entry`: the C++ function itself) on the case's CSR and geometry."""
    return entry(x, csr.row_ptr, csr.col_idx, csr.values, list(csr.shape), bias,
                 [g["stride"]] * 2, [g["padding"]] * 2, [g["dilation"]] * 2, csr.groups, relu,
                 residual)


def _expected(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], g: dict,
              relu: bool, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    y = reference_conv(x, weight, bias, stride=g["stride"], padding=g["padding"],
                       dilation=g["dilation"], groups=g["groups"])
    if residual is not None:
        y = y + residual.double().cpu()
    return torch.relu(y) if relu else y


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("g", GEOMETRIES)
def test_repeated_calls_run_in_cpp_and_match_float64(g: dict, dtype: torch.dtype) -> None:
    """The first call of a key runs the Python kernel, every later one the C++ kernel: each,
    into a poisoned output, with and without bias, ReLU and residual, matches float64."""
    weight, x, bias = _case(g, dtype, seed=21)
    csr = csr_lib.from_dense(weight.cuda(), g["groups"])
    x = x.cuda()
    expected_shape = _expected(x, weight, None, g, False).shape
    residual = torch.randn(expected_shape, generator=torch.Generator().manual_seed(3))
    residual = residual.to(dtype).cuda()
    first = True  # (the key is the filter's and x's, not the bias's, ReLU's or residual's)
    for b, relu, r in [(bias.cuda(), False, None), (None, True, None),
                       (bias.cuda(), True, residual)]:
        for _ in range(2):
            before = _fast_calls()
            _poison_next_output(expected_shape, dtype)
            with torch.no_grad():
                y = _op(x, csr, b, g, relu, r)
            torch.cuda.synchronize()
            assert _fast_calls() - before == (0 if first else 1)
            first = False
            assert relative_error(y, _expected(x, weight, b, g, relu, r)) <= tolerance(dtype)


@pytest.mark.cuda
def test_a_write_to_the_values_is_seen() -> None:
    """An in-place write bumps the values' version: the next call is a new key (the Python
    kernel builds the new filter) and computes with the new weights; the one after is fast."""
    g = GEOMETRIES[0]
    weight, csr, x, bias = _cuda_case(22)
    with torch.no_grad():
        _op(x, csr, bias, g, False)
        _op(x, csr, bias, g, False)
        csr.values.mul_(-2.0)
        before = _fast_calls()
        y = _op(x, csr, bias, g, False)
        assert _fast_calls() == before
        assert relative_error(y, _expected(x, -2.0 * weight, bias, g, False)) <= 1e-5
        y = _op(x, csr, bias, g, False)
        assert _fast_calls() == before + 1
        assert relative_error(y, _expected(x, -2.0 * weight, bias, g, False)) <= 1e-5


@pytest.mark.cuda
def test_new_tensors_where_freed_ones_were_are_not_mistaken_for_them() -> None:
    """CSR tensors freed and new ones of the same sizes allocated (the caching allocator gives
    them the freed blocks): the remembered call of the old ones does not serve the new ones."""
    g = GEOMETRIES[0]
    x = torch.randn(2, 8, 13, 11, device="cuda")
    for seed in range(4):
        gen = torch.Generator().manual_seed(40 + seed)
        weight = sparse_weight((16, 8, 3, 3), 0.2, gen)
        weight.view(-1)[:200] = 0.0  # (the same nonzero count is likelier with a shared prefix)
        csr = csr_lib.from_dense(weight.cuda())
        with torch.no_grad():
            for _ in range(2):
                assert relative_error(_op(x, csr, None, g, False),
                                      _expected(x, weight, None, g, False)) <= 1e-5
        del csr


@pytest.mark.cuda
def test_calls_the_cpp_kernel_does_not_take_still_match() -> None:
    """channels_last, strided and lazily negated inputs, a strided bias and a channels_last
    residual, handed to the C++ function itself (through the op, the dispatcher would negate a
    neg-bit x first), go to the Python kernel (no fast call) and match float64."""
    g = GEOMETRIES[1]
    weight, csr, x, bias = _cuda_case(23, g)
    residual = torch.randn_like(_op(x, csr, bias, g, False))
    _op(x, csr, bias, g, False)  # the key is remembered: only the layouts keep the calls away
    wide_bias = torch.stack([bias, bias], 1)[:, 0]
    cases = [
        (x.contiguous(memory_format=torch.channels_last), bias, None, x),
        (torch.cat([x, x], 3)[..., : x.shape[3]], bias, None, x),
        (torch._neg_view(-x), bias, None, x),
        (x, wide_bias, None, x),
        (x, bias, residual.contiguous(memory_format=torch.channels_last), x),
    ]
    with torch.no_grad():
        for given, b, r, values in cases:
            before = _fast_calls()
            y = _op(given, csr, b, g, True, r, entry=ops._native.sparse_conv2d_cuda)
            assert _fast_calls() == before
            assert relative_error(y, _expected(values, weight, bias, g, True, r)) <= 1e-5


@pytest.mark.cuda
def test_bad_arguments_after_a_remembered_call_get_the_python_kernels_errors() -> None:
    g = GEOMETRIES[0]
    weight, csr, x, bias = _cuda_case(24)
    with torch.no_grad():
        _op(x, csr, bias, g, False)
        _op(x, csr, bias, g, False)
        with pytest.raises(ValueError, match="bias must have shape"):
            _op(x, csr, bias[:-1], g, False)
        with pytest.raises(TypeError, match="must have one dtype"):
            _op(x, csr, bias.double(), g, False)
        with pytest.raises(ValueError, match="residual must be"):
            _op(x, csr, bias, g, False, torch.zeros(1, device="cuda"))


@pytest.mark.cuda
def test_release_geometries_forgets_the_remembered_calls() -> None:
    g = GEOMETRIES[0]
    weight, csr, x, bias = _cuda_case(25)
    with torch.no_grad():
        _op(x, csr, bias, g, False)
        assert ops._native.stats()["remembered"] > 0
        escoin_torch.release_geometries()
        assert ops._native.stats()["remembered"] == 0
        for _ in range(2):
            assert relative_error(_op(x, csr, bias, g, False),
                                  _expected(x, weight, bias, g, False)) <= 1e-5


@pytest.mark.cuda
def test_the_cpp_kernel_runs_on_the_current_stream() -> None:
    """x is written on a side stream behind a long kernel and the op called on that stream: a
    kernel queued on another stream would read x before the write and miss the reference."""
    g = GEOMETRIES[0]
    weight, csr, x, bias = _cuda_case(26)
    with torch.no_grad():
        _op(x, csr, bias, g, False)
        fresh = torch.randn_like(x)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        before = _fast_calls()
        with torch.cuda.stream(side):
            torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time before the write
            x.copy_(fresh)
            y = _op(x, csr, bias, g, False)
        torch.cuda.synchronize()
        assert _fast_calls() == before + 1
        assert relative_error(y, _expected(fresh, weight, bias, g, False)) <= 1e-5


@pytest.mark.cuda
def test_the_cpp_kernel_in_cuda_graphs_and_under_torch_compile() -> None:
    """Captured in a CUDA graph (replayed on new inputs) and called by torch.compile's code,
    the C++ kernel runs and matches float64."""
    layer = escoin_torch.SparseConv2d.from_dense(
        torch.nn.Conv2d(8, 16, 3, padding=1)).cuda().eval()
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) < 0.3)
    static_x = torch.randn(2, 8, 12, 12, device="cuda")
    compiled = torch.compile(layer)
    with torch.no_grad():
        layer(static_x)
        compiled(static_x)
        before = _fast_calls()
        y = compiled(static_x)
        assert _fast_calls() > before
        assert relative_error(y, reference_conv(static_x, layer.weight, layer.bias,
                                                padding=1)) <= 1e-5
    g = GEOMETRIES[0]
    weight, csr, _, bias = _cuda_case(27)
    with torch.no_grad():
        for _ in range(2):  # the key remembered before capture (its first call syncs)
            _op(static_x, csr, bias, g, False)
        before = _fast_calls()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = _op(static_x, csr, bias, g, False)
        assert _fast_calls() == before + 1
    for _ in range(2):
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.cuda.synchronize()
        assert relative_error(static_y, _expected(static_x, weight, bias, g, False)) <= 1e-5


def _dense(csr: csr_lib.CSRWeight) -> torch.Tensor:
    """The weight a CSR stands for, in float64 on the CPU."""
    weight = torch.zeros(math.prod(csr.shape), dtype=torch.float64)
    weight[csr.flat_index().cpu()] = csr.values.detach().double().cpu()
    return weight.reshape(csr.shape)


@pytest.mark.cuda
def test_strided_views_and_filters_released_by_escoin_are_not_mistaken() -> None:
    """Values that are views of one buffer at the same offset and length (one contiguous, one
    strided) are not one key; and a remembered call whose filter escoin itself released
    (SparseFilter.release_geometries, bypassing escoin_torch) is never launched: its arrays are
    gone. Every call matches float64."""
    g = GEOMETRIES[0]
    _, csr, x, bias = _cuda_case(28)
    nnz = csr.values.numel()
    buffer = torch.randn(2 * nnz, device="cuda")
    dense, strided = csr._replace(values=buffer[:nnz]), csr._replace(values=buffer[::2])
    with torch.no_grad():
        for _ in range(2):
            assert relative_error(_op(x, dense, bias, g, False),
                                  _expected(x, _dense(dense), bias, g, False)) <= 1e-5
        before = _fast_calls()
        assert relative_error(_op(x, strided, bias, g, False),
                              _expected(x, _dense(strided), bias, g, False)) <= 1e-5
        assert _fast_calls() == before
        ops.filter_of(dense).filt.release_geometries()
        for fast in (0, 1):
            before = _fast_calls()
            assert relative_error(_op(x, dense, bias, g, False),
                                  _expected(x, _dense(dense), bias, g, False)) <= 1e-5
            assert _fast_calls() == before + fast
