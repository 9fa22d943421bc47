"""escoin.conv2d on the CPU against the float64 NumPy reference, over random geometry."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

import escoin
from escoin import _core
from escoin.geometry import descriptor
from escoin.testing import conv2d_reference, relative_error
from escoin.testing.strategies import ConvCase, conv_cases
from geometry_strategies import PHASE_PLANE_CASES, phase_plane_case

TOLERANCE = {np.float32: 1e-5, np.float64: 1e-12}


def run_case(case: ConvCase, dtype: type, with_residual: bool = False) -> float:
    """escoin's relative error on the case; with_residual adds a random array of the output's
    shape before the ReLU (y = relu(conv + bias + residual)). Every operand is in `dtype`, and
    the float64 reference computes from those values: the error is escoin's own, not the
    rounding of float64 inputs (which a sum that cancels to near zero magnifies)."""
    filt = escoin.SparseFilter.from_dense(case.weight.astype(dtype), groups=case.groups)
    shape = escoin.output_shape(case.x.shape, filt, case.stride, case.padding, case.dilation)
    residual = (np.random.default_rng(case.x.size).standard_normal(shape).astype(dtype)
                if with_residual else None)
    x = case.x.astype(dtype)
    bias = None if case.bias is None else case.bias.astype(dtype)
    expected = conv2d_reference(x, filt.to_dense(), bias, case.stride, case.pads,
                                case.dilation, case.groups, case.relu, residual)
    out = np.full(expected.shape, np.nan, dtype)  # poison: an unwritten element stays NaN
    result = escoin.conv2d(x, filt, bias, stride=case.stride,
                           padding=case.padding, dilation=case.dilation, relu=case.relu, out=out,
                           residual=residual)
    assert result is out
    return relative_error(out, expected)


# A case hypothesis found: one output left by the ReLU, 0.0014 from -0.597 * -1.309 - 0.780.
# Its float64 inputs rounded to float32 move it by 1.7e-5 relative; escoin's error on the
# float32 inputs is 5.4e-6.
CANCELLING = ConvCase(
    x=np.array([[[[0.93702226, 1.24257235, 1.04710721, 0.77800248, -1.30941573]],
                 [[0.75630245, -2.86961555, 1.77374148, 0.89334666, 0.0941185]]]]),
    weight=np.array([[[[-0.59698707]], [[0.0]]]]), bias=np.array([-0.78027718]), stride=(1, 1),
    padding=(0, 0), pads=(0, 0, 0, 0), dilation=(1, 1), groups=1, relu=True)


@settings(max_examples=120, deadline=None)
@given(case=conv_cases())
@example(case=CANCELLING)
def test_random_geometry_float32(case: ConvCase) -> None:
    assert run_case(case, np.float32) <= TOLERANCE[np.float32]


@settings(max_examples=60, deadline=None)
@given(case=conv_cases())
def test_random_geometry_float64(case: ConvCase) -> None:
    assert run_case(case, np.float64) <= TOLERANCE[np.float64]


@settings(max_examples=60, deadline=None)
@given(case=conv_cases())
def test_residual_added_before_the_relu_float32(case: ConvCase) -> None:
    assert run_case(case, np.float32, with_residual=True) <= TOLERANCE[np.float32]


@settings(max_examples=30, deadline=None)
@given(case=conv_cases())
def test_residual_added_before_the_relu_float64(case: ConvCase) -> None:
    assert run_case(case, np.float64, with_residual=True) <= TOLERANCE[np.float64]


def test_network_sized_layer_float32() -> None:
    """A VGG-like layer at 90% sparsity: large planes exercise the widest vector tiles."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((32, 24, 3, 3)) * (rng.random((32, 24, 3, 3)) < 0.1)
    x = rng.standard_normal((2, 24, 40, 37))
    bias = rng.standard_normal(32)
    filt = escoin.SparseFilter.from_dense(weight.astype(np.float32))
    y = escoin.conv2d(x.astype(np.float32), filt, bias, padding=1, relu=True)
    expected = conv2d_reference(x, filt.to_dense(), bias, (1, 1), (1, 1, 1, 1), (1, 1), 1, True)
    assert relative_error(y, expected) <= 1e-5


def test_long_rows_are_summed_in_blocks() -> None:
    """4096 input channels, 3x3, 90% pruned: ~3,700 products per output. One running float32
    sum over them had a relative error of 9.0e-7 (3x torch's oneDNN); each pass over a chunk
    of channels summed from zero and then added gives 2.0e-7 (AVX-512, AVX2) to 2.2e-7
    (portable)."""
    rng = np.random.default_rng(5)
    shape = (8, 4096, 3, 3)
    weight = (rng.standard_normal(shape) * (rng.random(shape) < 0.1)).astype(np.float32)
    x = rng.standard_normal((2, 4096, 6, 6)).astype(np.float32)
    y = escoin.conv2d(x, escoin.SparseFilter.from_dense(weight), padding=1)
    expected = conv2d_reference(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert relative_error(y, expected) <= 4e-7


# A parent that ran escoin's CPU kernels (on OpenMP threads where built with them), then a
# child forked from it that runs them again: GNU OpenMP's pool does not survive fork(), so
# without the core's fork handler the child hangs in its first parallel region.
_FORKED_CHILD = """
import multiprocessing, numpy as np, escoin
rng = np.random.default_rng(7)
weight = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
weight[rng.random(weight.shape) < 0.9] = 0
filt = escoin.SparseFilter.from_dense(weight)
x = rng.standard_normal((4, 32, 28, 28)).astype(np.float32)
def child(_):
    return escoin.conv2d(x, filt, padding=1), escoin.build_info()["openmp_threads"]
parent = escoin.conv2d(x, filt, padding=1)
with multiprocessing.get_context("fork").Pool(1) as pool:
    y, threads = pool.map_async(child, [0]).get(timeout=120)[0]
assert np.array_equal(y, parent) and threads == 1, threads
print("the child computed on one thread")
"""


def test_a_forked_child_computes_on_one_thread() -> None:
    """A process forked after escoin ran its CPU kernels computes the same result, on one
    thread (it hung in its first call before the core's fork handler), and reports so."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FORKED_CHILD], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "the child computed" in done.stdout


def test_unbatched_input_like_torch() -> None:
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((4, 3, 3, 3))
    x = rng.standard_normal((3, 9, 8))
    filt = escoin.SparseFilter.from_dense(weight)
    y = escoin.conv2d(x, filt, padding="same")
    assert y.shape == (4, 9, 8)
    expected = conv2d_reference(x[None], weight, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)[0]
    assert relative_error(y, expected) <= 1e-12


def test_empty_batch_returns_empty_output() -> None:
    filt = escoin.SparseFilter.from_dense(np.ones((5, 2, 3, 3), np.float32))
    y = escoin.conv2d(np.zeros((0, 2, 8, 8), np.float32), filt, padding=1)
    assert y.shape == (0, 5, 8, 8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_zero_filter_gives_bias(dtype: type) -> None:
    rng = np.random.default_rng(3)
    filt = escoin.SparseFilter.from_dense(np.zeros((3, 2, 3, 3), dtype))
    bias = rng.standard_normal(3)
    y = escoin.conv2d(rng.standard_normal((2, 2, 6, 7)).astype(dtype), filt, bias)
    assert filt.nnz == 0
    np.testing.assert_allclose(y, np.broadcast_to(bias[None, :, None, None], y.shape), rtol=1e-6)


@pytest.mark.parametrize("kernel, stride, dilation, phases", PHASE_PLANE_CASES)
def test_layout_keeps_only_the_phase_planes_taps_read(kernel: tuple, stride: tuple,
                                                      dilation: tuple, phases: tuple) -> None:
    case = phase_plane_case(kernel, stride, dilation, 3, 5, 7, 13, sum(kernel + stride))
    layout = _core.conv_layout(descriptor(case.x.shape, case.weight.shape, 1, stride, (1, 1),
                                          dilation))
    assert (layout["phases_h"], layout["phases_w"]) == phases
    planes = phases[0] * phases[1] * layout["plane_h"] * layout["plane_w"]
    assert layout["channel_stride"] == -(-planes // 4) * 4
    for dtype in (np.float32, np.float64):
        assert run_case(case, dtype) <= TOLERANCE[dtype]


def test_strided_numpy_input_is_read_correctly() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 8, 10, 12))[:, ::2, :, ::-1]  # non-contiguous view
    weight = rng.standard_normal((5, 4, 3, 3)) * (rng.random((5, 4, 3, 3)) < 0.4)
    filt = escoin.SparseFilter.from_dense(weight)
    y = escoin.conv2d(x, filt, stride=2, padding=1)
    expected = conv2d_reference(x, weight, None, (2, 2), (1, 1, 1, 1), (1, 1), 1)
    assert relative_error(y, expected) <= 1e-12


def test_filter_dtype_follows_input() -> None:
    """A float64 filter applied to float32 input computes in float32 and returns float32."""
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((4, 3, 3, 3))
    x = rng.standard_normal((1, 3, 7, 7))
    filt = escoin.SparseFilter.from_dense(weight)
    y = escoin.conv2d(x.astype(np.float32), filt)
    assert y.dtype == np.float32
    expected = conv2d_reference(x, weight, None, (1, 1), (0, 0, 0, 0), (1, 1), 1)
    assert relative_error(y, expected) <= 1e-5


def test_caller_workspace_and_reuse_across_geometries() -> None:
    """The CPU path uses a caller's workspace, or one per thread reused across calls and
    geometries: stale contents from a larger call must not leak into a smaller one."""
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((6, 3, 3, 3)) * (rng.random((6, 3, 3, 3)) < 0.5)
    filt = escoin.SparseFilter.from_dense(weight)
    big = rng.standard_normal((4, 3, 30, 30))
    small = rng.standard_normal((1, 3, 5, 7))
    escoin.conv2d(big, filt, padding=2)
    y = escoin.conv2d(small, filt, padding=1)
    expected = conv2d_reference(small, weight, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert relative_error(y, expected) <= 1e-12
    workspace = np.full(escoin.workspace_size(small.shape, filt, padding=1, dtype=np.float64),
                        255, np.uint8)  # garbage (NaN patterns) the call must overwrite
    y2 = escoin.conv2d(small, filt, padding=1, workspace=workspace)
    np.testing.assert_array_equal(y, y2)


# ---- 1x1 filters at stride 1 without padding read x in place ----

@st.composite
def in_place_cases(draw: st.DrawFn) -> tuple:
    """1x1, stride 1, no padding, planes of a multiple of 4 elements: x is already the stretched
    layout, and the kernel reads it where it lies (the last image's last tile excepted)."""
    h = draw(st.integers(1, 20))
    w = draw(st.sampled_from([v for v in range(1, 21) if (h * v) % 4 == 0] or [4]))
    groups = draw(st.integers(1, 3))
    per_group_in, per_group_out = draw(st.integers(1, 6)), draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weight = rng.standard_normal((groups * per_group_out, per_group_in, 1, 1))
    weight *= rng.random(weight.shape) < draw(st.sampled_from([0.1, 0.5, 1.0]))
    x = rng.standard_normal((draw(st.integers(1, 4)), groups * per_group_in, h, w))
    bias = rng.standard_normal(weight.shape[0]) if draw(st.booleans()) else None
    residual = (rng.standard_normal((x.shape[0], weight.shape[0], h, w))
                if draw(st.booleans()) else None)
    return x, weight, bias, groups, residual, draw(st.booleans())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=60, deadline=None)
@given(case=in_place_cases())
def test_1x1_layers_read_x_in_place(dtype: type, case: tuple) -> None:
    x, weight, bias, groups, residual, relu = case
    filt = escoin.SparseFilter.from_dense(weight.astype(dtype), groups=groups)
    expected = conv2d_reference(x, filt.to_dense(), bias, (1, 1), (0, 0, 0, 0), (1, 1), groups,
                                relu, residual)
    out = np.full(expected.shape, np.nan, dtype)
    escoin.conv2d(x.astype(dtype), filt, bias, relu=relu, out=out, residual=residual)
    if np.abs(expected).max() > 0:
        assert relative_error(out, expected) <= TOLERANCE[dtype]
    else:
        assert not np.any(out)


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">f2"])
def test_byte_swapped_input_is_read_as_its_values(dtype: str) -> None:
    rng = np.random.default_rng(13)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    x = rng.standard_normal((1, 3, 5, 5)).astype(dtype)
    y = escoin.conv2d(x, escoin.SparseFilter.from_dense(weight), padding=1)
    expected = conv2d_reference(x.astype(np.float64), weight, None, (1, 1), (1, 1, 1, 1),
                                (1, 1), 1)
    assert y.dtype.isnative and y.dtype == np.dtype(dtype).newbyteorder("=")
    limit = 2.0 ** -10 if np.dtype(dtype).itemsize == 2 else 1e-5
    assert relative_error(y.astype(np.float64), expected) <= limit


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_1x1_layer_may_write_over_its_input(dtype: type) -> None:
    """out=x: 64 output channels are written by blocks while other blocks still read x, so x is
    then copied first, as for any other filter."""
    rng = np.random.default_rng(12)
    weight = rng.standard_normal((64, 64, 1, 1)).astype(dtype)
    x = rng.standard_normal((2, 64, 6, 6)).astype(dtype)
    expected = conv2d_reference(x, weight, None, (1, 1), (0, 0, 0, 0), (1, 1), 1)
    y = escoin.conv2d(x, escoin.SparseFilter.from_dense(weight), out=x)
    assert y is x and relative_error(x, expected) <= TOLERANCE[dtype]


GUARDED_READS = """
import ctypes, mmap, sys
import numpy as np
import escoin

def ending_at_a_page_nothing_may_read(shape, dtype):
    # An array whose last byte is the last of a page, followed by a page with no access: a read
    # past its end is a segmentation fault, not a silent read of someone else's memory.
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    pages = -(-nbytes // mmap.PAGESIZE) + 1
    buffer = mmap.mmap(-1, pages * mmap.PAGESIZE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    guard = address + (pages - 1) * mmap.PAGESIZE
    assert libc.mprotect(guard, mmap.PAGESIZE, 0) == 0
    start = (pages - 1) * mmap.PAGESIZE - nbytes
    array = np.frombuffer(buffer, dtype, int(np.prod(shape)), start).reshape(shape)
    return array, buffer

rng = np.random.default_rng(3)
for dtype in (np.float32, np.float64):
    for batch, channels, h, w in ((1, 5, 14, 14), (3, 4, 6, 6), (2, 3, 10, 10), (1, 2, 28, 28),
                                  (2, 1, 2, 2), (2, 4, 2, 2), (2, 2, 2, 4), (5, 1, 4, 4)):
        x, keep = ending_at_a_page_nothing_may_read((batch, channels, h, w), dtype)
        x[...] = rng.standard_normal(x.shape)
        weight = rng.standard_normal((7, channels, 1, 1)).astype(dtype)
        y = escoin.conv2d(x, escoin.SparseFilter.from_dense(weight))
        expected = np.einsum("nchw,mc->nmhw", x.astype(np.float64), weight[:, :, 0, 0])
        assert np.linalg.norm(y - expected) <= 1e-5 * np.linalg.norm(expected)
print("ok")
"""


def test_reads_stay_inside_x() -> None:
    """x placed just before a page that faults on any access: the in-place reads of 1x1 layers
    (tile overruns included, images smaller than a tile too) must stay inside x (run in a
    subprocess: a fault would kill it)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", GUARDED_READS], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr)
