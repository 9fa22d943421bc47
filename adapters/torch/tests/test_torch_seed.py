"""The seed port's API: a LeNet5 written against `sparse_conv as sp` runs unchanged."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import escoin_torch.seed as sp
from torch_helpers import relative_error


class LeNet5(sp.SparseModel):
    def __init__(self, sparse_conv_flag: bool = True) -> None:
        super().__init__(sparse_conv_flag)
        self.c1 = self.conv(1, 6, 5, 1, 0, 1, True)  # seed positional order: ..., dilation, bias
        self.c3 = self.conv(6, 16, 5)
        self.c5 = self.conv(16, 120, 5)
        self.f6 = nn.Linear(120, 84)
        self.out = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.tanh(self.c1(x)), 2)
        x = F.max_pool2d(torch.tanh(self.c3(x)), 2)
        x = torch.tanh(self.c5(x)).flatten(1)
        return self.out(torch.tanh(self.f6(x)))


@pytest.fixture
def lenet() -> LeNet5:
    torch.manual_seed(0)
    model = LeNet5()
    convs = [(m, "weight") for m in model.modules() if isinstance(m, sp.SparseConv2D)]
    prune.global_unstructured(convs, pruning_method=prune.L1Unstructured, amount=0.6)
    for module, name in convs:
        prune.remove(module, name)
    return model


def test_lenet5_seed_flow(lenet: LeNet5) -> None:
    x = torch.randn(5, 1, 32, 32)
    # The reference is the dense network in float64: two float32 networks differ by rounding
    # that grows through the layers, which says nothing about either one's correctness.
    reference = copy.deepcopy(lenet).double()
    reference._set_sparse_layers_mode(sp.Sparse_modes.Inference_Vanilla)
    dense = reference(x.double())
    lenet._initialize_sparse_layers((1, 1, 32, 32))
    lenet._set_sparse_layers_mode(sp.Sparse_modes.Test)
    assert relative_error(lenet(x), dense) < 1e-5
    lenet._set_sparse_layers_mode(sp.Sparse_modes.Inference_Sparse)
    assert relative_error(lenet(x), dense) < 1e-5
    assert all(not m.training for m in lenet.modules() if isinstance(m, sp.SparseConv2D))


def test_flag_off_builds_plain_convs() -> None:
    model = LeNet5(sparse_conv_flag=False)
    assert type(model.c1) is nn.Conv2d and model.c1.bias is not None


def test_seed_positional_bias() -> None:
    for sparse in (True, False):  # the flag off builds nn.Conv2d from the same arguments
        layer = sp.SparseModel(sparse_conv_flag=sparse).conv(2, 4, 3, 1, 0, 1, False, 2)
        assert isinstance(layer, sp.SparseConv2D) == sparse and isinstance(layer, nn.Conv2d)
        assert layer.bias is None and layer.groups == 2



def test_test_mode_detects_divergence(lenet: LeNet5, monkeypatch: pytest.MonkeyPatch) -> None:
    lenet._set_sparse_layers_mode(sp.Sparse_modes.Test)
    real = lenet.c3.sparse_forward
    monkeypatch.setattr(lenet.c3, "sparse_forward", lambda x: real(x) * 1.001)
    with pytest.raises(RuntimeError, match=r"'c3' sparse output diverges.*= 1\.0\d+e-03 > rtol"):
        lenet(torch.randn(2, 1, 32, 32))


def test_benchmark_and_calibration(lenet: LeNet5, capsys: pytest.CaptureFixture) -> None:
    x = torch.randn(4, 1, 32, 32)
    lenet._set_sparse_layers_mode(sp.Sparse_modes.Benchmark, repeats=2, warmup=1)
    lenet(x)
    printed = capsys.readouterr().out
    assert printed.count("sparse speedup") == 3 and "c1:" in printed
    lenet._set_sparse_layers_mode(sp.Sparse_modes.Calibration, repeats=2, warmup=1)
    lenet(x)
    printed = capsys.readouterr().out
    assert printed.count(" -> ") == 3
    for layer in (lenet.c1, lenet.c3, lenet.c5):
        assert layer.sparse_mode in (sp.Sparse_modes.Inference_Sparse,
                                     sp.Sparse_modes.Inference_Vanilla)
        assert not layer._forward_hooks
    lenet(x)
    assert capsys.readouterr().out == ""


def test_training_mode_is_dense_and_trains(lenet: LeNet5) -> None:
    lenet._set_sparse_layers_mode(sp.Sparse_modes.Training)
    assert all(m.training for m in lenet.modules() if isinstance(m, sp.SparseConv2D))
    lenet(torch.randn(2, 1, 32, 32)).sum().backward()
    assert lenet.c1.weight.grad is not None
    with pytest.raises(TypeError, match="Sparse_modes"):
        sp.set_mode(lenet, "Test")
