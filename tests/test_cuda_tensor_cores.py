"""The tensor-core kernel (escoin.conv2d(..., tensor_cores=True)) on a GPU: random geometries it
runs, network-sized layers with the longest filter windows of the benchmark suite, the fall-back
where it cannot run, and the raw-pointer call. Its products are of split bf16 parts, each within
~3 * 2^-18 of the float32 product, so its error is measured against the norm of the products'
magnitudes (gpu_error) and held to 1e-5 of it, not to strict float32's bound."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

import escoin
from escoin import EscoinError
from escoin.geometry import descriptor
from escoin.testing import conv2d_reference, relative_error
from escoin.testing.strategies import ConvCase
from geometry_strategies import tensor_core_conv_cases
from gpu_helpers import DeviceArrays, gpu_error

pytestmark = pytest.mark.cuda

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def dev() -> DeviceArrays:
    return DeviceArrays()


def runs_on_tensor_cores(case: ConvCase) -> bool:
    filt = escoin.SparseFilter.from_dense(case.weight.astype(np.float32))
    return filt.mma_program(case.x.shape, case.stride, case.padding, case.dilation) is not None


@settings(max_examples=120, deadline=None)
@given(case=tensor_core_conv_cases())
def test_random_geometry_on_the_tensor_cores(dev, case: ConvCase) -> None:
    assert runs_on_tensor_cores(case)
    assert gpu_error(dev, case, tensor_cores=True, against_magnitudes=True) <= TOLERANCE


@settings(max_examples=40, deadline=None)
@given(case=tensor_core_conv_cases())
def test_residual_on_the_tensor_cores(dev, case: ConvCase) -> None:
    assert gpu_error(dev, case, with_residual=True, tensor_cores=True,
                     against_magnitudes=True) <= TOLERANCE


@pytest.mark.parametrize("shape", [(2, 512, 14, 14, 512, 3), (4, 256, 28, 28, 256, 3),
                                   (1, 128, 56, 56, 128, 3), (8, 1024, 14, 14, 256, 1),
                                   (2, 64, 112, 112, 64, 3), (3, 200, 30, 45, 70, 5)])
def test_network_sized_layers_on_the_tensor_cores(dev, shape: tuple) -> None:
    """VGG- and ResNet-sized layers at 90% sparsity, ReLU outputs as inputs (non-negative, as
    in a network): the error grows with the filter window (4608 columns for the first)."""
    n, c, h, w, m, k = shape
    rng = np.random.default_rng(sum(shape))
    weight = rng.standard_normal((m, c, k, k)) * (rng.random((m, c, k, k)) < 0.1)
    x = np.maximum(rng.standard_normal((n, c, h, w)), 0)
    case = ConvCase(x, weight, rng.standard_normal(m), (1, 1), (k // 2, k // 2),
                    (k // 2,) * 4, (1, 1), 1, True)
    assert runs_on_tensor_cores(case)
    assert gpu_error(dev, case, tensor_cores=True, against_magnitudes=True) <= TOLERANCE


@pytest.mark.parametrize("groups, stride", [(2, 1), (1, 2)])
def test_geometries_it_cannot_run_fall_back(dev, groups: int, stride: int) -> None:
    """Two groups, or a 3x3 filter at stride 2 (phase planes), run the other kernels, in strict
    float32."""
    rng = np.random.default_rng(groups * 10 + stride)
    weight = rng.standard_normal((32, 16 // groups, 3, 3)) * (rng.random((32, 16 // groups, 3, 3))
                                                               < 0.3)
    x = rng.standard_normal((2, 16, 20, 20))
    case = ConvCase(x, weight, None, (stride, stride), (1, 1), (1, 1, 1, 1), (1, 1), groups,
                    False)
    filt = escoin.SparseFilter.from_dense(weight.astype(np.float32), groups=groups)
    assert filt.mma_program(x.shape, stride, 1) is None
    assert gpu_error(dev, case, tensor_cores=True) <= 1e-6


def test_sconv_with_an_mma_program(dev) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    weight = rng.standard_normal((40, 24, 3, 3)) * (rng.random((40, 24, 3, 3)) < 0.2)
    x = rng.standard_normal((3, 24, 17, 19))
    bias = rng.standard_normal(40)
    filt = escoin.SparseFilter.from_dense(weight.astype(np.float32))
    program = torch.from_numpy(filt.mma_program(x.shape, padding=1)).cuda()
    out_shape = escoin.output_shape(x.shape, filt, padding=1)
    ys = torch.full(out_shape, float("nan"), device="cuda")
    nbytes = escoin.workspace_size(x.shape, filt, padding=1, tensor_cores=True)
    ws = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    xs = torch.from_numpy(x.astype(np.float32)).cuda()
    b = torch.from_numpy(bias.astype(np.float32)).cuda()
    escoin.sconv(xs.data_ptr(), ys.data_ptr(), 0, 0, 0, b.data_ptr(), ws.data_ptr(), nbytes,
                 x.shape, filt.shape, padding=1, relu=True,
                 stream=torch.cuda.current_stream(), mma_program_ptr=program.data_ptr())
    torch.cuda.synchronize()
    expected = conv2d_reference(x, weight, bias, (1, 1), (1, 1, 1, 1), (1, 1), 1, relu=True)
    assert relative_error(ys.cpu().numpy(), expected) <= TOLERANCE
    desc = descriptor(x.shape, filt.shape, 1, 1, 1, 1)
    with pytest.raises(EscoinError, match="mma_program"):  # the C entry's own check
        escoin._core.forward_cuda_mma(desc, xs.data_ptr(), 0, 0, 0, False, ys.data_ptr(),
                                      ws.data_ptr(), nbytes, 0, 0)
    with pytest.raises(EscoinError, match="cannot run this geometry"):
        escoin.sconv(xs.data_ptr(), ys.data_ptr(), 0, 0, 0, 0, ws.data_ptr(), nbytes, x.shape,
                     filt.shape, padding=1, stride=2, stream=torch.cuda.current_stream(),
                     mma_program_ptr=program.data_ptr())
