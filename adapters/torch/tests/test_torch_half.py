"""float16 and bfloat16 on the CPU and on a GPU: layers, gradients and the op's registration in
the 16-bit types, against float64 on the same 16-bit inputs (each output is rounded once)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torch_helpers import (SmallCNN, reference_conv, relative_error, sparse_conv, sparse_weight,
                           tolerance)
from escoin_torch import SparseConv2d, sparse_conv2d, sparsify
from escoin_torch import csr as csr_lib

HALF_DTYPES = [torch.float16, torch.bfloat16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("relu", [False, True])
def test_layer_in_16_bits(device: str, dtype: torch.dtype, relu: bool) -> None:
    """A converted layer keeps its dtype (weights, CSR, output), and is as accurate as one
    rounding: no further from float64 than torch's own dense convolution in that dtype."""
    conv = sparse_conv(8, 16, 3, density=0.2, stride=2, padding=1).to(device, dtype)
    layer = SparseConv2d.from_dense(conv, relu=relu).eval()
    x = torch.randn(2, 8, 15, 13).to(device, dtype)
    with torch.no_grad():
        y = layer(x)
        dense = F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)
    assert y.dtype == dtype and y.device == x.device and layer.refresh_csr().values.dtype == dtype
    expected = reference_conv(x, conv.weight, conv.bias, stride=2, padding=1)
    if relu:
        expected, dense = expected.relu(), dense.relu()
    error = relative_error(y, expected)
    assert error <= tolerance(dtype)
    assert error <= relative_error(dense, expected) * 1.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_residual_and_channels_last_in_16_bits(device: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    weight = sparse_weight((6, 4, 3, 3), 0.3, gen, dtype).to(device)
    x = torch.randn(2, 4, 9, 9, generator=gen).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 6, 9, 9, generator=gen).to(device, dtype)
    y = sparse_conv2d(x, csr_lib.from_dense(weight), None, padding=1, relu=True,
                      residual=residual)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    before_relu = reference_conv(x, weight, None, padding=1) + residual.double().cpu()
    error = torch.linalg.vector_norm(y.double().cpu() - before_relu.relu()).item()
    assert error <= tolerance(dtype) * torch.linalg.vector_norm(before_relu).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_gradients_in_16_bits(device: str, dtype: torch.dtype) -> None:
    """Gradients of x, the stored values and the bias, in the dtype, against float64 autograd
    of the dense convolution on the same values (the backward rounds more often than the
    forward: the input gradient once more, the weight gradient in torch's dense kernel)."""
    gen = torch.Generator().manual_seed(8)
    weight = sparse_weight((8, 3, 3, 3), 0.3, gen, dtype)
    csr = csr_lib.from_dense(weight.to(device))
    x = torch.randn(2, 3, 10, 10, generator=gen).to(device, dtype).requires_grad_()
    values = csr.values.clone().requires_grad_()
    bias = torch.randn(8, generator=gen).to(device, dtype).requires_grad_()
    y = sparse_conv2d(x, csr._replace(values=values), bias, stride=2, padding=1)
    g = torch.randn(y.shape, generator=gen).to(device, dtype)
    gx, gv, gb = torch.autograd.grad(y, (x, values, bias), g)
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = weight.double().requires_grad_()
    b64 = bias.detach().double().cpu().requires_grad_()
    y64 = F.conv2d(x64, w64, b64, stride=2, padding=1)
    gx64, gw64, gb64 = torch.autograd.grad(y64, (x64, w64, b64), g.double().cpu())
    assert gx.dtype == gv.dtype == gb.dtype == dtype
    limit = 4 * tolerance(dtype)
    assert relative_error(gx, gx64) <= limit
    assert relative_error(gv, gw64.reshape(-1)[csr.flat_index().cpu()]) <= limit
    assert relative_error(gb, gb64) <= limit


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_in_16_bits(device: str, dtype: torch.dtype, requires_grad: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    weight = sparse_weight((4, 3, 3, 3), 0.4, gen, dtype)
    csr = csr_lib.from_dense(weight.to(device))
    t = lambda v: v.to(device, dtype).requires_grad_(requires_grad)  # noqa: E731
    x = t(torch.randn(2, 3, 8, 7, generator=gen))
    bias = t(torch.randn(4, generator=gen))
    torch.library.opcheck(torch.ops.escoin.sparse_conv2d.default,
                          (x, csr.row_ptr, csr.col_idx, t(csr.values), list(csr.shape), bias,
                           [2, 1], [1, 1], [1, 1], 1, True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_sparsified_network_in_16_bits(device: str, dtype: torch.dtype) -> None:
    """A whole model in the dtype: every convolution converted, the output close to float64."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():
        for conv in model.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.copy_(sparse_weight(tuple(conv.weight.shape), 0.3))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model.double()(x.double())
        converted, report = sparsify(model.to(device, dtype))
        y = converted(x.to(device, dtype))
    assert report and all(layer.path == "sparse" for layer in report) and y.dtype == dtype
    assert relative_error(y, expected) <= 8 * tolerance(dtype)
