"""SparseConv2d on two GPUs: it follows ``.to(device)``, keeps a CSR per device it computes on,
runs on its input's device whatever the current device is, and a model replicated on cuda:0 and
cuda:1 (copies, ``replicate``, ``DataParallel``) computes what it computes on one GPU."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_helpers import pruned_small_cnn, reference_conv, relative_error, sparse_conv
from escoin_torch import SparseConv2d, sparse_conv2d, sparsify
from escoin_torch import csr as csr_lib

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]

GEOMETRY = dict(stride=2, padding=1, groups=2)


def _layer() -> SparseConv2d:
    return SparseConv2d.from_dense(sparse_conv(8, 16, 3, **GEOMETRY)).eval()


def _model() -> nn.Module:
    model, _ = sparsify(pruned_small_cnn(0.7), min_sparsity=0.5)
    return model.eval()


def test_layer_follows_to_device_and_keeps_the_current_device() -> None:
    layer = _layer()
    x = torch.randn(2, 8, 13, 11)
    for device in ("cuda:0", "cuda:1", "cuda:0"):
        layer.to(device)
        for current in (0, 1):
            with torch.cuda.device(current), torch.no_grad():
                y = layer(x.to(device))
                assert torch.cuda.current_device() == current
            assert y.device == torch.device(device)
            assert layer.refresh_csr().values.device == torch.device(device)
            assert relative_error(y, reference_conv(x, layer.weight, layer.bias,
                                                    **GEOMETRY)) < 1e-5
        assert set(layer._compressed) == {torch.device(device)}  # the old device's CSR is gone


def test_replicas_keep_a_csr_per_device() -> None:
    layer = _layer().cuda(0)
    x = torch.randn(2, 8, 13, 11)
    replicas = nn.parallel.replicate(layer, [0, 1], detach=True)
    with torch.no_grad():
        outputs = [replica(x.to(f"cuda:{i}")) for i, replica in enumerate(replicas)]
    assert set(layer._compressed) >= {torch.device("cuda:0"), torch.device("cuda:1")}
    expected = reference_conv(x, layer.weight, layer.bias, **GEOMETRY)
    for i, y in enumerate(outputs):
        assert y.device == torch.device("cuda", i)
        assert relative_error(y, expected) < 1e-5


def test_model_copies_on_two_gpus_match_one_gpu() -> None:
    """The same model on cuda:0 and on cuda:1, run at the same time from two threads."""
    model0 = _model().cuda(0)
    model1 = copy.deepcopy(model0).to("cuda:1")
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = model0(x.cuda(0))
    results = {}

    def work(device: int, model: nn.Module) -> None:
        with torch.no_grad():
            results[device] = [model(x.to(f"cuda:{device}")) for _ in range(10)]

    threads = [threading.Thread(target=work, args=(d, m)) for d, m in ((0, model0), (1, model1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for device, outputs in results.items():
        for y in outputs:
            assert y.device == torch.device("cuda", device)
            assert relative_error(y, expected) < 1e-6
    assert len(results) == 2


def test_data_parallel_matches_one_gpu() -> None:
    model = _model().cuda(0)
    x = torch.randn(8, 3, 16, 16, device="cuda:0")
    with torch.no_grad():
        expected = model(x)
        parallel = nn.DataParallel(model, device_ids=[0, 1])
        for _ in range(3):  # replicas are rebuilt every call; the CSRs with them
            assert relative_error(parallel(x), expected) < 1e-5


def test_sparse_training_backward_on_the_second_gpu() -> None:
    """Autograd runs the backward of cuda:1 work on its own device thread."""
    layer = _layer().cuda(1).train()
    layer.sparse_training = True
    x = torch.randn(2, 8, 13, 11, device="cuda:1", requires_grad=True)
    with torch.cuda.device(0):
        layer(x).square().sum().backward()
    dense_x = x.detach().clone().requires_grad_()
    weight = layer.weight.detach().clone().requires_grad_()
    F.conv2d(dense_x, weight, layer.bias.detach(), **GEOMETRY).square().sum().backward()
    assert relative_error(x.grad, dense_x.grad) < 1e-4
    mask = layer.weight.detach() != 0
    assert relative_error(layer.weight.grad, weight.grad * mask) < 1e-4
    assert not layer.weight.grad[~mask].any()  # pruned entries get no gradient


def test_weights_on_another_gpu_are_a_clear_error() -> None:
    csr = csr_lib.from_dense(sparse_conv(3, 4, 3).weight.detach().cuda(0))
    with pytest.raises(ValueError, match=r"x is on cuda:1 but the weight/bias are on"):
        sparse_conv2d(torch.randn(1, 3, 5, 5, device="cuda:1"), csr)
