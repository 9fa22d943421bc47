"""float16 and bfloat16: stored in 16 bits, computed in float32, each output rounded once (to
nearest even), on every CPU kernel variant this machine can run and on a GPU."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import Dict, Optional

import numpy as np
import pytest
from hypothesis import given, settings

import escoin
from escoin import _core
from escoin.geometry import descriptor
from escoin.testing import conv2d_reference, relative_error
from escoin.testing.strategies import ConvCase, conv_cases
from geometry_strategies import staged_conv_cases

try:  # NumPy's bfloat16 (the dtype JAX uses); the torch adapter's tests cover bfloat16 without it
    import ml_dtypes
    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:
    BFLOAT16 = None

needs_ml_dtypes = pytest.mark.skipif(BFLOAT16 is None, reason="ml_dtypes is not installed")
HALF_DTYPES = [pytest.param(np.dtype(np.float16), id="float16"),
               pytest.param(BFLOAT16, id="bfloat16", marks=needs_ml_dtypes)]
# Mantissa bits after the leading one: a rounding step is 2^-bits relative.
MANTISSA_BITS = {"float16": 10, "bfloat16": 7}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def tolerance(dtype: np.dtype) -> float:
    """Relative-norm error allowed against float64 on the dtype's inputs: the output's one
    rounding (half a step) with room for float32 sums that land near a rounding boundary."""
    return 2.0 ** -MANTISSA_BITS[dtype.name]


def convolve(device: str, x: np.ndarray, filt: escoin.SparseFilter,
             bias: Optional[np.ndarray] = None, residual: Optional[np.ndarray] = None,
             stride: object = 1, padding: object = 0, dilation: object = 1,
             relu: bool = False) -> np.ndarray:
    """escoin.conv2d of 16-bit NumPy operands on `device`, into an output of x's dtype poisoned
    with NaN (an unwritten element stays NaN), returned as a NumPy array. On a GPU the operands
    travel as torch tensors of the same dtype (through float32, which holds them exactly)."""
    geometry = dict(stride=stride, padding=padding, dilation=dilation, relu=relu)
    shape = escoin.output_shape(x.shape, filt, stride, padding, dilation)
    if device == "cpu":
        out = np.full(shape, np.nan, x.dtype)
        assert escoin.conv2d(x, filt, bias, out=out, residual=residual, **geometry) is out
        return out
    torch = pytest.importorskip("torch")
    kind = getattr(torch, x.dtype.name)
    put = lambda a: None if a is None else torch.from_numpy(  # noqa: E731
        np.ascontiguousarray(a, np.float32)).cuda().to(kind)
    out = torch.full(shape, float("nan"), dtype=kind, device="cuda")
    assert escoin.conv2d(put(x), filt, put(bias), out=out, residual=put(residual),
                         **geometry) is out
    return out.float().cpu().numpy().astype(x.dtype)


def run_case(case: ConvCase, dtype: np.dtype, with_residual: bool, device: str = "cpu") -> float:
    """escoin's relative error on the case in `dtype` on `device`, against float64 computed from
    the same 16-bit inputs, with the output poisoned first."""
    x = case.x.astype(dtype)
    filt = escoin.SparseFilter.from_dense(case.weight.astype(dtype), groups=case.groups)
    bias = None if case.bias is None else case.bias.astype(dtype)
    shape = escoin.output_shape(x.shape, filt, case.stride, case.padding, case.dilation)
    residual = (np.random.default_rng(case.x.size).standard_normal(shape).astype(dtype)
                if with_residual else None)
    expected = conv2d_reference(x.astype(np.float64), filt.to_dense().astype(np.float64),
                                None if bias is None else bias.astype(np.float64), case.stride,
                                case.pads, case.dilation, case.groups, case.relu,
                                None if residual is None else residual.astype(np.float64))
    out = convolve(device, x, filt, bias, residual, case.stride, case.padding, case.dilation,
                   case.relu)
    assert out.dtype == dtype
    return relative_error(out.astype(np.float64), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@settings(max_examples=60, deadline=None)
@given(case=conv_cases())
def test_random_geometry(device: str, dtype: np.dtype, case: ConvCase) -> None:
    assert run_case(case, dtype, with_residual=False, device=device) <= tolerance(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@settings(max_examples=30, deadline=None)
@given(case=conv_cases())
def test_residual_added_before_the_relu(device: str, dtype: np.dtype, case: ConvCase) -> None:
    assert run_case(case, dtype, with_residual=True, device=device) <= tolerance(dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@settings(max_examples=40, deadline=None)
@given(case=staged_conv_cases())
def test_random_geometry_on_the_staged_kernel(dtype: np.dtype, case: ConvCase) -> None:
    """The staged kernel's geometries on a GPU, a residual added: its 16-bit kernels finish and
    round their sums, or the reduction kernel does where the launch splits the work."""
    assert run_case(case, dtype, with_residual=True, device="cuda") <= tolerance(dtype)


def identity_filter(dtype: np.dtype, out_channels: int = 1) -> escoin.SparseFilter:
    """A 1x1 filter of weight 1 from one input channel to `out_channels` copies of it (16 or
    more: the staged kernel's form on a GPU, which fewer leave to the streaming kernel)."""
    return escoin.SparseFilter.from_dense(np.ones((out_channels, 1, 1, 1), dtype))


def bit_patterns(dtype: np.dtype) -> np.ndarray:
    """All 65536 values of a 16-bit dtype, as a (1, 1, 256, 256) image."""
    return np.arange(65536, dtype=np.uint16).view(dtype).reshape(1, 1, 256, 256)


@pytest.mark.parametrize("out_channels", [1, 16])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_every_value_comes_back_exactly(device: str, dtype: np.dtype, out_channels: int) -> None:
    """A 1x1 filter of weight 1 widens each of the 65536 inputs to float32 and rounds it back:
    every value, subnormals and infinities included, must come back unchanged (NaN as NaN), in
    every output channel."""
    x = bit_patterns(dtype)
    y = convolve(device, x, identity_filter(dtype, out_channels))
    assert y.shape == (1, out_channels, 256, 256)
    with np.errstate(invalid="ignore"):  # ml_dtypes warns as it casts NaNs
        wide_x, wide_y = x.astype(np.float64), y.astype(np.float64)
    nan = np.isnan(wide_x)
    assert nan.sum() > 0
    for channel in range(out_channels):
        copy = wide_y[:, channel:channel + 1]
        assert np.array_equal(np.isnan(copy), nan)
        assert np.array_equal(copy[~nan], wide_x[~nan])


@pytest.mark.parametrize("out_channels", [1, 16])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_outputs_round_to_nearest_even(device: str, dtype: np.dtype, out_channels: int) -> None:
    """Two channels of weight 1 sum a value and a smaller one; where the float32 sum is exact
    (nearly everywhere), its rounding to the dtype must be NumPy's (round to nearest, ties to
    even), ties included."""
    rng = np.random.default_rng(7)
    count = 1 << 16
    bits = MANTISSA_BITS[dtype.name]
    big = rng.standard_normal(count).astype(dtype).astype(np.float64)
    big[big == 0] = 1.0
    half_step = 2.0 ** (np.floor(np.log2(np.abs(big))) - bits - 1)
    # One or three half steps of `big` (ties), two (one step), or a random few steps.
    ties = rng.choice([-1.0, 1.0], count) * half_step * rng.integers(1, 4, count)
    small = np.where(rng.random(count) < 0.5, ties,
                     big * rng.uniform(-3, 3, count) * 2.0 ** -bits).astype(dtype)
    x = np.stack([big.astype(dtype), small]).reshape(1, 2, 256, 256)
    filt = escoin.SparseFilter.from_dense(np.ones((out_channels, 2, 1, 1), dtype))
    y = convolve(device, x, filt)
    exact = x[0, 0].astype(np.float64) + x[0, 1].astype(np.float64)
    in_float32 = exact.astype(np.float32).astype(np.float64) == exact
    assert in_float32.mean() > 0.9
    expected = exact.astype(dtype).astype(np.float64)[in_float32]
    for channel in range(out_channels):
        assert np.array_equal(y[0, channel].astype(np.float64)[in_float32], expected)


def test_16bit_workspace_is_float32() -> None:
    filt = escoin.SparseFilter.from_dense(np.ones((2, 3, 3, 3), np.float16))
    shape = (2, 3, 9, 9)
    assert (escoin.workspace_size(shape, filt, dtype=np.float16)
            == escoin.workspace_size(shape, filt, dtype=np.float32)
            == escoin.workspace_size(shape, filt, dtype="bfloat16"))


def test_16bit_filter_keeps_its_dtype_and_values() -> None:
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float16)
    weight[rng.random(weight.shape) < 0.7] = 0
    filt = escoin.SparseFilter.from_dense(weight)
    assert filt.dtype == np.float16 and np.array_equal(filt.to_dense(), weight)
    assert filt.nnz == np.count_nonzero(weight)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_16bit_filter_saves_and_loads(dtype: np.dtype, tmp_path) -> None:
    rng = np.random.default_rng(9)
    weight = rng.standard_normal((3, 2, 3, 3)).astype(dtype)
    weight[rng.random(weight.shape) < 0.5] = 0
    filt = escoin.SparseFilter.from_dense(weight)
    filt.save(tmp_path / "filter.npz")
    loaded = escoin.SparseFilter.load(tmp_path / "filter.npz")
    assert loaded.dtype == dtype
    assert np.array_equal(loaded.to_dense().astype(np.float32), weight.astype(np.float32))


def test_raw_host_pointers_match_conv2d() -> None:
    """escoin.sconv(device='cpu') on a filter's host pointers computes what conv2d does."""
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((8, 4, 3, 3)).astype(np.float16)
    weight[rng.random(weight.shape) < 0.8] = 0
    filt = escoin.SparseFilter.from_dense(weight)
    x = rng.standard_normal((2, 4, 10, 10)).astype(np.float16)
    bias = rng.standard_normal(8).astype(np.float16)
    geometry = dict(stride=(1, 2), padding=1, dilation=1)
    expected = escoin.conv2d(x, filt, bias, **geometry)
    arrays = filt.host_pointers(x.shape, dtype="float16", **geometry)
    nbytes = escoin.workspace_size(x.shape, filt, dtype="float16", **geometry)
    workspace = np.empty(nbytes, np.uint8)
    y = np.full_like(expected, np.nan)
    escoin.sconv(x.ctypes.data, y.ctypes.data, arrays.row_ptr, arrays.offsets, arrays.values,
                 bias.ctypes.data, workspace.ctypes.data, nbytes, x.shape, weight.shape,
                 device="cpu", dtype="float16", **geometry)
    assert np.array_equal(y, expected)


def test_dtypes_are_refused_where_they_do_not_run() -> None:
    dense = np.ones((2, 2), np.float32)
    with pytest.raises(escoin.EscoinError, match="FLOAT32 or ESCOIN_FLOAT64 for a dense matrix"):
        _core.csr_count(dense.ctypes.data, "float16", 2, 2, 0.0)
    desc = descriptor((1, 1, 4, 4), (1, 1, 1, 1), 1, 1, 0, 1)
    if _core.cuda_compiled():  # the CUDA entry checks the dtype before it touches a pointer
        with pytest.raises(escoin.EscoinError, match="float64 runs on the CPU entry"):
            _core.forward_cuda(desc, "float64", 0, 0, 0, 0, 0, 0, 0, False, 0, 0, 0, 0, 0)
    with pytest.raises(escoin.EscoinError, match="x must be float32, float64, float16 or bfloat16"):
        escoin.conv2d(np.ones((1, 1, 4, 4), np.int16), identity_filter(np.dtype(np.float32)))


# ---- every CPU kernel variant ----

VARIANT_SCRIPT = """
import numpy as np, escoin
rng = np.random.default_rng(11)
weight = rng.standard_normal((24, 6, 3, 3))
weight[rng.random(weight.shape) < 0.85] = 0
x = rng.standard_normal((3, 6, 17, 23))
results = {"kernels": escoin.build_info()["cpu_kernels"]}
for name in ("float64", "float32", "float16"):
    filt = escoin.SparseFilter.from_dense(weight.astype(name))
    y = escoin.conv2d(x.astype(name), filt, stride=(1, 2), padding=1, relu=True)
    results[name] = y.astype(np.float64).tobytes().hex()
print(repr(results))
"""


def run_variant(variant: str) -> Dict[str, str]:
    env = dict(os.environ, ESCOIN_CPU_KERNELS=variant)
    done = subprocess.run([sys.executable, "-c", VARIANT_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return ast.literal_eval(done.stdout)


def test_every_kernel_variant_agrees_with_the_reference() -> None:
    """ESCOIN_CPU_KERNELS runs the portable variant (and AVX2 where the CPU has it, beside the
    default), whose results must match float64 as the default variant's do."""
    rng = np.random.default_rng(11)
    weight = rng.standard_normal((24, 6, 3, 3))
    weight[rng.random(weight.shape) < 0.85] = 0
    x = rng.standard_normal((3, 6, 17, 23))
    default = escoin.build_info()["cpu_kernels"]
    variants = {"portable", default} | ({"avx2"} if default == "avx512" else set())
    for variant in sorted(variants):
        results = run_variant(variant)
        assert results["kernels"] == variant
        for name, limit in (("float64", 1e-12), ("float32", 1e-5), ("float16", 2.0 ** -10)):
            wx, ww = x.astype(name).astype(np.float64), weight.astype(name).astype(np.float64)
            expected = conv2d_reference(wx, ww, None, (1, 2), (1, 1, 1, 1), (1, 1), 1, True)
            y = np.frombuffer(bytes.fromhex(results[name]), np.float64).reshape(expected.shape)
            assert relative_error(y, expected) <= limit, (variant, name)


def test_unknown_kernel_variant_is_named_in_the_error() -> None:
    env = dict(os.environ, ESCOIN_CPU_KERNELS="avx9000")
    done = subprocess.run([sys.executable, "-c", VARIANT_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert "ESCOIN_CPU_KERNELS is 'avx9000'" in done.stderr


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_raw_device_pointers_and_misaligned_ones(dtype: np.dtype) -> None:
    """escoin.sconv on a GPU with a 16-bit dtype, on the filter's device pointers (float32
    values; 16 output channels: the staged kernel), with a bias, a residual and the ReLU, is as
    accurate as one rounding against float64; an x, y, bias or residual not on a 2-byte
    boundary, or a workspace not on a 4-byte one, is refused by name before anything runs (the
    device would fault on it)."""
    torch = pytest.importorskip("torch")
    dtype_name = dtype.name
    kind = getattr(torch, dtype_name)
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((16, 4, 3, 3)).astype(dtype).astype(np.float32)
    weight[rng.random(weight.shape) < 0.8] = 0
    filt = escoin.SparseFilter.from_dense(weight)
    geometry = dict(stride=(1, 2), padding=1, dilation=1)
    x_host = rng.standard_normal((2, 4, 10, 10)).astype(dtype)
    bias_host = rng.standard_normal(16).astype(dtype)
    shape = escoin.output_shape(x_host.shape, filt, **geometry)
    residual_host = rng.standard_normal(shape).astype(dtype)
    x, bias, residual = (torch.from_numpy(a.astype(np.float32)).cuda().to(kind)
                         for a in (x_host, bias_host, residual_host))
    arrays = filt.device_pointers(x_host.shape, device=x.device.index, **geometry)
    nbytes = escoin.workspace_size(x_host.shape, filt, dtype=dtype_name, **geometry)
    workspace = torch.empty(nbytes + 16, dtype=torch.uint8, device="cuda")
    y = torch.full(shape, float("nan"), dtype=kind, device="cuda")
    pointers = dict(x=x.data_ptr(), y=y.data_ptr(), bias=bias.data_ptr(),
                    residual=residual.data_ptr(), workspace=workspace.data_ptr())

    def call(**changed: int) -> None:
        p = {**pointers, **changed}
        escoin.sconv(p["x"], p["y"], arrays.row_ptr, arrays.offsets, arrays.values, p["bias"],
                     p["workspace"], nbytes, x_host.shape, filt.shape, relu=True,
                     stream=torch.cuda.current_stream(), device=x.device.index,
                     tile_program_ptr=arrays.tile_program, residual_ptr=p["residual"],
                     dtype=dtype_name, **geometry)
    call()
    expected = conv2d_reference(x_host.astype(np.float64), weight.astype(np.float64),
                                bias_host.astype(np.float64), (1, 2), (1, 1, 1, 1), (1, 1), 1,
                                relu=True, residual=residual_host.astype(np.float64))
    error = relative_error(y.float().cpu().numpy().astype(np.float64), expected)
    assert error <= 2.0 ** -MANTISSA_BITS[dtype_name]
    for name, alignment in (("x", 2), ("y", 2), ("bias", 2), ("residual", 2), ("workspace", 4)):
        with pytest.raises(escoin.EscoinError,
                           match=f"{name} must be aligned to its {alignment}-byte"):
            call(**{name: pointers[name] + alignment // 2})
    torch.cuda.synchronize()  # nothing was launched that could fault
