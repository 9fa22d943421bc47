"""fuse_for_inference: BatchNorms folded into convolutions, ReLUs into SparseConv2d."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_helpers import relative_error, sparse_conv
from escoin_torch import SparseConv2d, fuse_for_inference, sparsify


def _norm(channels: int, affine: bool = True) -> nn.BatchNorm2d:
    """A BatchNorm with random statistics and affine parameters (an identity one would let a
    wrong fold pass)."""
    norm = nn.BatchNorm2d(channels, affine=affine)
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        if affine:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-1, 1)
    return norm


class Blocks(nn.Module):
    """Each pattern fuse_for_inference meets in real networks, and the ones it must leave."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_bn_relu = sparse_conv(3, 16, 3, padding=1)  # -> bn -> nn.ReLU
        self.bn1, self.relu1 = _norm(16), nn.ReLU(inplace=True)
        self.conv_bn_frelu = sparse_conv(16, 16, 3, padding=1, bias=False)  # -> bn -> F.relu
        self.bn2 = _norm(16, affine=False)
        self.conv_relu = sparse_conv(16, 16, 1)  # -> torch.relu, no BatchNorm
        self.conv_bn_add = sparse_conv(16, 16, 3, padding=1, stride=2)  # -> bn -> + -> relu
        self.bn3 = _norm(16)
        self.shortcut = sparse_conv(16, 16, 1, stride=2)
        self.shared = sparse_conv(16, 16, 3, padding=1)  # called twice: left alone
        self.bn4 = _norm(16)
        self.dense = nn.Conv2d(16, 8, 3)  # kept dense by sparsify: folded, its ReLU stays
        self.bn5, self.relu5 = _norm(8), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv_bn_relu(x)))
        x = F.relu(self.bn2(self.conv_bn_frelu(x)))
        x = torch.relu(self.conv_relu(x))
        x = torch.relu(self.bn3(self.conv_bn_add(x)) + self.shortcut(x))
        x = self.bn4(self.shared(self.shared(x)))
        return self.relu5(self.bn5(self.dense(x)))


def test_folds_and_fuses_what_it_may_and_computes_the_same() -> None:
    torch.manual_seed(0)
    model, _ = sparsify(Blocks().eval(), min_sparsity=0.5)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model.double()(x.double())
        model.float()
    fused = fuse_for_inference(model)
    convs = dict(fused.named_modules())
    norms = [name for name, m in convs.items() if isinstance(m, nn.BatchNorm2d)]
    assert norms == ["bn4"]  # the shared convolution's
    relu = {name: m.relu for name, m in convs.items() if isinstance(m, SparseConv2d)}
    assert relu == {"conv_bn_relu": True, "conv_bn_frelu": True, "conv_relu": True,
                    "conv_bn_add": False, "shortcut": False, "shared": False}
    assert type(convs["dense"]) is nn.Conv2d and isinstance(convs["relu5"], nn.ReLU)
    for name in ("conv_bn_relu", "conv_bn_frelu", "conv_bn_add", "dense"):
        before = dict(model.named_modules())[name].weight
        assert torch.equal(convs[name].weight != 0, before != 0), name  # as sparse as before
        assert convs[name].bias is not None
    assert model.bn1 is not None and model.conv_bn_relu.relu is False  # the input is intact
    with torch.no_grad():
        assert relative_error(fused(x), expected) < 1e-5


class Unfoldable(nn.Module):
    """Patterns whose BatchNorm or ReLU must stay: each fold here would change the output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_relu_bn = SparseConv2d.from_dense(sparse_conv(3, 8, 3, padding=1), relu=True)
        self.bn1 = _norm(8)  # after a ReLU: does not commute with it
        self.read_too = sparse_conv(8, 8, 3, padding=1)  # its weight is also read directly
        self.bn2 = _norm(8)
        self.hooked = sparse_conv(8, 8, 1)  # has a forward hook
        self.bn3 = _norm(8)
        self.batch_stats = sparse_conv(8, 8, 1)
        self.bn4 = _norm(8)  # left in training mode: normalises with the batch's statistics
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv_relu_bn(x))
        x = self.bn2(self.read_too(x)) + 0.1 * F.conv2d(x, self.read_too.weight, padding=1)
        x = self.bn3(self.hooked(x))
        return torch.relu(self.bn4(self.batch_stats(x)))


def test_leaves_what_it_may_not_fold_and_keeps_the_csr() -> None:
    torch.manual_seed(2)
    model, _ = sparsify(Unfoldable().eval(), min_sparsity=0.5)
    model.bn4.train()

    def count(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        model.seen += 1
    model.hooked.register_forward_hook(count)
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
        fused = fuse_for_inference(model)
        twice = fuse_for_inference(fused)  # fusing again changes nothing
        for result in (fused, twice):
            modules = dict(result.named_modules())
            assert all(name in modules for name in ("bn1", "bn2", "bn3", "bn4")), result
            assert relative_error(result(x), expected) < 1e-5
    assert model.seen == 3  # the hook still fires: once for expected, once per fused model
    assert dict(fused.named_modules())["batch_stats"].relu is False  # its BatchNorm is between
    compiled = torch.compile(fused, fullgraph=True, backend="eager")  # needs every CSR built
    with torch.no_grad():
        assert relative_error(compiled(x), expected) < 1e-5


def test_needs_eval_mode() -> None:
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        fuse_for_inference(nn.Sequential(sparse_conv(3, 4, 3), nn.BatchNorm2d(4)))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = sparse_conv(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.sum() > 0 else x


def test_untraceable_model_is_refused_clearly() -> None:
    with pytest.raises(TypeError, match="torch.fx can trace.*DataDependent"):
        fuse_for_inference(DataDependent().eval())


@pytest.mark.cuda
def test_fused_network_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(1)
    model, _ = sparsify(Blocks().eval(), min_sparsity=0.5)
    x = torch.randn(4, 3, 20, 20)
    with torch.no_grad():
        expected = model.double()(x.double())
        fused = fuse_for_inference(model.float().cuda())
        assert relative_error(fused(x.cuda()), expected) < 1e-5
