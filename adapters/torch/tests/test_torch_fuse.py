"""fuse_for_inference: BatchNorms folded into convolutions, ReLUs and residual adds into
SparseConv2d."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_helpers import relative_error, sparse_conv
from escoin_torch import SparseConv2d, calibrate, fuse_for_inference, sparsify


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


def _pruned_and_fused(model: nn.Module, x: torch.Tensor) -> tuple:
    """The model sparsified at 50%, its float64 output on x, and its fused copy."""
    model, _ = sparsify(model.eval(), min_sparsity=0.5)
    with torch.no_grad():
        expected = model.double()(x.double())
        model.float()
    return model, expected, fuse_for_inference(model)


def test_folds_and_fuses_what_it_may_and_computes_the_same() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model, expected, fused = _pruned_and_fused(Blocks(), x)
    convs = dict(fused.named_modules())
    norms = [name for name, m in convs.items() if isinstance(m, nn.BatchNorm2d)]
    assert norms == ["bn4"]  # the shared convolution's
    relu = {name: m.relu for name, m in convs.items() if isinstance(m, SparseConv2d)}
    assert relu == {"conv_bn_relu": True, "conv_bn_frelu": True, "conv_relu": True,
                    "conv_bn_add": True, "shortcut": False, "shared": False}
    # relu(bn3(conv_bn_add(x)) + shortcut(x)): the sum is the layer's residual
    assert not [n for n in fused.graph.nodes if n.target in (operator.add, torch.add)]
    call = next(n for n in fused.graph.nodes if n.target == "conv_bn_add")
    assert [a.target for a in call.args] == ["conv_relu", "shortcut"]
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


class Bottleneck(nn.Module):
    """torchvision's residual block ends: the shortcut computed after the last convolution
    (the layer must move after it), added with +=; an identity shortcut; a shortcut that only
    broadcasts (added after the kernel at run time); and x.add_(conv(y)), which writes x and is
    left alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = sparse_conv(8, 16, 3, padding=1, bias=False), _norm(16)
        self.conv2, self.bn2 = sparse_conv(16, 16, 3, padding=1, bias=False), _norm(16)
        self.downsample = nn.Sequential(sparse_conv(8, 16, 1, bias=False), _norm(16))
        self.conv3, self.bn3 = sparse_conv(16, 16, 1, bias=False), _norm(16)
        self.conv4 = sparse_conv(16, 16, 3, padding=1)
        self.conv5 = sparse_conv(16, 16, 1)
        self.scale = nn.Parameter(torch.randn(1, 16, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = self.downsample(x)
        out += identity
        out = F.relu(out)
        out = torch.relu(self.bn3(self.conv3(out)) + out)  # identity shortcut
        out = self.conv4(out) + self.scale  # broadcasts: no relu, fused then added after
        kept = out * 2
        kept.add_(self.conv5(out))  # writes kept: left alone
        return kept


def test_fuses_residual_adds_and_computes_the_same() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 8, 12, 12)
    _, expected, fused = _pruned_and_fused(Bottleneck(), x)
    calls = {n.target: n for n in fused.graph.nodes if n.op == "call_module"}
    assert len(calls["conv2"].args) == 2 and calls["conv2"].args[1].target == "downsample.0"
    assert len(calls["conv3"].args) == 2 and len(calls["conv5"].args) == 1
    layers = dict(fused.named_modules())
    assert layers["conv2"].relu and layers["conv3"].relu and not layers["conv4"].relu
    fused.graph.lint()
    with torch.no_grad():
        assert relative_error(fused(x), expected) < 1e-5


class WritesBetween(nn.Module):
    """Residual adds fuse_for_inference must leave, or fuse so that nothing changes: a shortcut
    computed after the convolution by an in-place ReLU of its input; a shortcut scaled in place
    between the convolution and the add; an in-place add; a shortcut that is a Python number."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = sparse_conv(8, 8, 3, padding=1)
        self.conv1, self.relu = sparse_conv(8, 8, 3, padding=1), nn.ReLU(inplace=True)
        self.conv2, self.short = sparse_conv(8, 8, 1), sparse_conv(8, 8, 1)
        self.conv3, self.conv4 = sparse_conv(8, 8, 1), sparse_conv(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        out = self.conv1(x)
        x = out + self.relu(x)  # the ReLU writes conv1's input after conv1 read it
        shortcut = self.short(x)
        out = self.conv2(x)
        shortcut.mul_(2.0)  # written between conv2 and the add
        x = out + shortcut
        x = self.conv3(x).add_(x)  # in place: the sum keeps conv3's output's dtype and shape
        return self.conv4(x) + x.size(1)  # a number: added after the kernel


def test_leaves_residual_adds_it_may_not_fuse() -> None:
    torch.manual_seed(4)
    x = torch.randn(2, 8, 10, 10)
    _, expected, fused = _pruned_and_fused(WritesBetween(), x)
    calls = {n.target: n for n in fused.graph.nodes if n.op == "call_module"}
    assert [len(calls[f"conv{i}"].args) for i in range(1, 5)] == [1, 1, 1, 2]
    with torch.no_grad():
        assert relative_error(fused(x), expected) < 1e-5
    calibrate(fused, x, repeats=2, warmup=1)  # conv4's residual, a number, timed with it
    with torch.no_grad():
        assert relative_error(fused(x), expected) < 1e-5


class WritesThroughOutAndOps(nn.Module):
    """Shortcuts written in place between the convolution and the add through an ``out=``
    argument and through an ATen operator overload: both adds must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = sparse_conv(8, 8, 3, padding=1), sparse_conv(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 1.0
        out = self.conv1(x)
        torch.mul(x, 2.0, out=x)
        x = torch.relu(out + x)
        out = self.conv2(x)
        torch.ops.aten.mul_.Scalar(x, 3.0)
        return torch.relu(out + x)


def test_leaves_residual_adds_written_through_out_or_operator_overloads() -> None:
    torch.manual_seed(6)
    x = torch.randn(2, 8, 10, 10)
    _, expected, fused = _pruned_and_fused(WritesThroughOutAndOps(), x)
    calls = {n.target: n for n in fused.graph.nodes if n.op == "call_module"}
    assert [len(calls[f"conv{i}"].args) for i in (1, 2)] == [1, 1]
    with torch.no_grad():
        assert relative_error(fused(x), expected) < 1e-5


class PreActivation(nn.Module):
    """A BatchNorm after a residual add: bn(conv(x) + shortcut) scales the shortcut too, so once
    the add is the layer's residual the BatchNorm must not be folded into the layer (fusing the
    fused model again, or a layer the model calls with a residual itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.short, self.bn = sparse_conv(8, 8, 3, padding=1), sparse_conv(8, 8, 1), \
            _norm(8)
        self.direct, self.bn2 = sparse_conv(8, 8, 1), _norm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x) + self.short(x))
        return self.bn2(self.direct(x, x))


def test_no_batchnorm_folded_into_a_layer_with_a_residual() -> None:
    torch.manual_seed(5)
    x = torch.randn(2, 8, 10, 10)
    _, expected, fused = _pruned_and_fused(PreActivation(), x)
    twice = fuse_for_inference(fused)
    assert {name for name, m in twice.named_modules() if isinstance(m, nn.BatchNorm2d)} == \
        {"bn", "bn2"}
    with torch.no_grad():
        assert relative_error(fused(x), expected) < 1e-5
        assert relative_error(twice(x), expected) < 1e-5
