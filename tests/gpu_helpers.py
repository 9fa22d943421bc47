"""What the GPU tests share: device arrays from whichever framework is installed, and
escoin's error on a random case against the float64 reference."""
from __future__ import annotations

import numpy as np
import pytest

import escoin
from escoin.testing import conv2d_reference, relative_error
from escoin.testing.strategies import ConvCase


class DeviceArrays:
    """Moves NumPy arrays to the GPU and back with whichever framework is installed."""

    def __init__(self) -> None:
        try:
            import torch

            self.torch = torch
        except ImportError:
            self.torch = None
            self.cupy = pytest.importorskip("cupy")

    def put(self, array: np.ndarray) -> object:
        if self.torch is not None:
            return self.torch.from_numpy(np.ascontiguousarray(array)).cuda()
        return self.cupy.asarray(array)

    def full(self, shape: tuple, value: float) -> object:
        return self.put(np.full(shape, value, np.float32))

    def get(self, array: object) -> np.ndarray:
        if isinstance(array, escoin.DeviceArray):
            return array.numpy()
        if self.torch is not None:
            return array.cpu().numpy()
        return self.cupy.asnumpy(array)

    def synchronize(self) -> None:
        if self.torch is not None:
            self.torch.cuda.synchronize()
        else:
            self.cupy.cuda.Device().synchronize()


def gpu_error(dev: DeviceArrays, case: ConvCase, with_residual: bool = False,
              tensor_cores: bool = False, against_magnitudes: bool = False) -> float:
    """escoin's relative error on the case; with_residual adds a random array of the output's
    shape before the ReLU; tensor_cores as escoin.conv2d takes it. against_magnitudes: relative
    to the norm of the products' magnitudes, conv2d(|x|, |w|), plus the output's, instead of the
    output's alone: the tensor-core kernel's error is a fraction of each product (~3 * 2^-18),
    which a bias or residual that cancels the sum would otherwise magnify without bound."""
    filt = escoin.SparseFilter.from_dense(case.weight.astype(np.float32), groups=case.groups)
    shape = escoin.output_shape(case.x.shape, filt, case.stride, case.padding, case.dilation)
    residual = (np.random.default_rng(case.x.size).standard_normal(shape).astype(np.float32)
                if with_residual else None)
    expected = conv2d_reference(case.x, filt.to_dense(), case.bias, case.stride, case.pads,
                                case.dilation, case.groups, case.relu, residual)
    out = dev.full(expected.shape, np.nan)  # poison
    bias = None if case.bias is None else dev.put(case.bias.astype(np.float32))
    escoin.conv2d(dev.put(case.x.astype(np.float32)), filt, bias, stride=case.stride,
                  padding=case.padding, dilation=case.dilation, relu=case.relu, out=out,
                  residual=None if residual is None else dev.put(residual),
                  tensor_cores=tensor_cores)
    actual = dev.get(out)
    if not against_magnitudes:
        return relative_error(actual, expected)
    magnitudes = conv2d_reference(np.abs(case.x), np.abs(filt.to_dense()), None, case.stride,
                                  case.pads, case.dilation, case.groups)
    if not np.all(np.isfinite(actual)):
        return float("inf")
    # (plus the output's own norm: the float32 rounding of a bias or residual alone, as in an
    # all-zero filter's output, is a fraction of the output, not of the products)
    scale = np.linalg.norm(magnitudes) + np.linalg.norm(expected)
    return float(np.linalg.norm(actual - expected) / max(scale, 1e-30))


