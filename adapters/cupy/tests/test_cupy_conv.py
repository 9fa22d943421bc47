"""escoin_cupy.conv2d against the float64 reference on CuPy arrays: random geometries, CuPy's
current stream, poisoned outputs, residuals and bad input."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

import escoin
from escoin.testing import conv2d_reference, relative_error
from escoin.testing.strategies import ConvCase, conv_cases

pytestmark = pytest.mark.cuda


def cupy():
    import cupy as module
    return module


@settings(max_examples=40, deadline=None)
@given(case=conv_cases(max_batch=9))
def test_random_geometry_on_a_side_stream_matches_reference(case: ConvCase) -> None:
    cp = cupy()
    filt = escoin.SparseFilter.from_dense(case.weight.astype(np.float32), groups=case.groups)
    x = case.x.astype(np.float32)
    bias = None if case.bias is None else cp.asarray(case.bias, cp.float32)
    shape = escoin.output_shape(x.shape, filt, case.stride, case.padding, case.dilation)
    residual = np.random.default_rng(x.size).standard_normal(shape).astype(np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        out = cp.full(shape, cp.nan, cp.float32)  # poison: an unwritten element stays NaN
        import escoin_cupy
        y = escoin_cupy.conv2d(cp.asarray(x), filt, bias, case.stride, case.padding,
                               case.dilation, case.relu, out=out, residual=cp.asarray(residual))
    stream.synchronize()
    assert y is out
    expected = conv2d_reference(x, case.weight.astype(np.float32), case.bias, case.stride,
                                case.pads, case.dilation, case.groups, case.relu, residual)
    assert relative_error(cp.asnumpy(y), expected) <= 1e-5


def test_one_image_allocates_its_output() -> None:
    cp = cupy()
    import escoin_cupy
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((32, 8, 3, 3)) * (rng.random((32, 8, 3, 3)) < 0.1)).astype(
        np.float32)
    x = rng.standard_normal((8, 14, 14)).astype(np.float32)
    y = escoin_cupy.conv2d(cp.asarray(x), escoin.SparseFilter.from_dense(weight), padding="same")
    assert isinstance(y, cp.ndarray) and y.shape == (32, 14, 14)
    expected = conv2d_reference(x[None], weight, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)[0]
    assert relative_error(cp.asnumpy(y), expected) <= 1e-5


def test_float16_allocates_its_output_in_float16() -> None:
    """float16 in, float16 out, computed in float32 and rounded once: within a rounding step
    (2^-10) of float64 on the same 16-bit values; the bias and residual in float16 too."""
    cp = cupy()
    import escoin_cupy
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((16, 8, 3, 3)) * (rng.random((16, 8, 3, 3)) < 0.2)).astype(
        np.float16)
    x = rng.standard_normal((3, 8, 13, 13)).astype(np.float16)
    bias = rng.standard_normal(16).astype(np.float16)
    residual = rng.standard_normal((3, 16, 13, 13)).astype(np.float16)
    y = escoin_cupy.conv2d(cp.asarray(x), escoin.SparseFilter.from_dense(weight),
                           cp.asarray(bias), padding=1, relu=True,
                           residual=cp.asarray(residual))
    assert y.dtype == cp.float16
    expected = conv2d_reference(x.astype(np.float64), weight.astype(np.float64),
                                bias.astype(np.float64), (1, 1), (1, 1, 1, 1), (1, 1), 1,
                                relu=True, residual=residual.astype(np.float64))
    assert relative_error(cp.asnumpy(y).astype(np.float64), expected) <= 2.0 ** -10


def test_bad_input_is_named() -> None:
    cp = cupy()
    import escoin_cupy
    filt = escoin.SparseFilter.from_dense(np.ones((4, 2, 3, 3), np.float32))
    with pytest.raises(escoin.EscoinError, match="x must be a cupy.ndarray"):
        escoin_cupy.conv2d(np.ones((1, 2, 5, 5), np.float32), filt)
    with pytest.raises(escoin.EscoinError, match="x must be float32 or float16"):
        escoin_cupy.conv2d(cp.ones((1, 2, 5, 5), cp.float64), filt)
    with pytest.raises(escoin.EscoinError, match="x has 3 channels"):
        escoin_cupy.conv2d(cp.ones((1, 3, 5, 5), cp.float32), filt)
    with pytest.raises(escoin.EscoinError, match=r"x must have 3 or 4 dimensions .* \(5, 5\)"):
        escoin_cupy.conv2d(cp.ones((5, 5), cp.float32), filt)
