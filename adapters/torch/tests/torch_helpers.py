"""Helpers shared by the escoin-torch tests: sparse random weights, the float64 reference and the
relative-norm check. (A uniquely named module, not conftest.py, so that importing it cannot pick
up another test suite's conftest when several run in one pytest session.)"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import escoin_torch  # also registers torch.ops.escoin
from escoin_torch import SparseConv2d


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 on the CPU (the two may live on different
    devices); expected must not be all zero."""
    expected = expected.detach().double().cpu()
    actual = actual.detach().cpu()
    scale = torch.linalg.vector_norm(expected).item()
    assert scale > 0, "reference is all zero: the comparison would prove nothing"
    return torch.linalg.vector_norm(actual.double() - expected).item() / scale


def tolerance(dtype: torch.dtype) -> float:
    """Relative-norm error allowed against float64 on the dtype's own inputs: the 16-bit types
    round each output once (half a step of 2^-10 or 2^-7), with room for float32 sums near a
    rounding boundary."""
    return {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2.0 ** -10,
            torch.bfloat16: 2.0 ** -7}[dtype]


@contextlib.contextmanager
def strict_fp32_cudnn() -> Iterator[None]:
    """cuDNN without TF32, the other flags as they are. A weight gradient is one dense cuDNN call
    (escoin has no sparse kernel for it), which follows PyTorch's TF32 setting, on by default:
    ~1e-3 relative error where cuDNN picks a tensor-core algorithm, which it may for one shape
    and not another, and from one run to the next. A float32 gradient held to float64 at 1e-5
    is computed under this."""
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                     deterministic=cudnn.deterministic, allow_tf32=False):
        yield


def sparse_weight(shape: tuple, density: float, generator: Optional[torch.Generator] = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random normal weight with about `density` of its entries kept and at least one nonzero."""
    weight = torch.randn(shape, generator=generator, dtype=torch.float64)
    keep = torch.rand(shape, generator=generator, dtype=torch.float64) < density
    keep.view(-1)[0] = True
    return (weight * keep).to(dtype)


def sparse_conv(in_channels: int, out_channels: int, kernel_size: int, density: float = 0.3,
                **kwargs: object) -> nn.Conv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, **kwargs)
    with torch.no_grad():
        conv.weight.copy_(sparse_weight(tuple(conv.weight.shape), density,
                                        dtype=conv.weight.dtype))
    return conv


def reference_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   **geometry: object) -> torch.Tensor:
    """F.conv2d in float64 on the CPU: the ground truth every escoin result is held to."""
    return F.conv2d(x.double().cpu(), weight.double().cpu(),
                    None if bias is None else bias.double().cpu(), **geometry)


class SmallCNN(nn.Module):
    """Strided, grouped, dilated and padded convolutions, as in real networks."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(16, 8, 1))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def pruned_small_cnn(amount: float = 0.7) -> SmallCNN:
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = SmallCNN()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            prune.l1_unstructured(module, "weight", amount=amount)
    return model


def count_calls(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list:
    """Replaces module.name by a wrapper that appends to the returned list on every call."""
    calls: list = []
    function = getattr(module, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return function(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)
    return calls


class SeenOps(TorchDispatchMode):
    """A dispatch mode that records the name of every op it sees (``names``)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def check_release_geometries(device: str) -> None:
    """escoin_torch.release_geometries frees what a layer's calls of two input sizes derived
    (bytes returned: at least their offsets; other tests' filters may add theirs), leaves no
    cached pointer to it, and the layer's later calls of both sizes derive it again and match
    the float64 reference."""
    layer = SparseConv2d.from_dense(sparse_conv(8, 16, 3, density=0.3, padding=1)).to(device)
    layer.eval()
    gen = torch.Generator().manual_seed(15)
    xs = [torch.randn(shape, generator=gen).to(device) for shape in [(2, 8, 9, 9), (1, 8, 6, 11)]]
    expected = [reference_conv(x, layer.weight, layer.bias, padding=1) for x in xs]
    with torch.no_grad():
        for x, want in zip(xs, expected):
            assert relative_error(layer(x), want) < 1e-5
        nnz = int(torch.count_nonzero(layer.weight))
        assert escoin_torch.release_geometries() >= 2 * 4 * nnz
        # Nothing keeps a pointer to what was freed: each prepared filter's launches (the
        # arrays' addresses) went with the arrays.
        for prepared in list(escoin_torch.ops._prepared):
            store = prepared.filt._store
            assert not prepared.launches
            pattern = store.pattern
            assert not (pattern.host_offsets or pattern.device_offsets or pattern.tile_layouts
                        or pattern.device_tile_layouts or store.device_programs)
        assert escoin_torch.release_geometries() == 0
        for x, want in zip(xs, expected):
            assert relative_error(layer(x), want) < 1e-5


def check_training_steps_keep_the_pattern(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """Sparse-training steps change the weight's values but not its pattern: the layer gathers
    the new values at its pattern (no compression) and the op derives each new filter, forward
    and for the input gradient, from its pattern's first (no from_csr); outputs and gradients
    match float64. A step that prunes a stored weight or grows a zero one compresses again."""
    import escoin

    from escoin_torch import csr as csr_lib

    layer = SparseConv2d.from_dense(sparse_conv(8, 32, 3, padding=1), sparse_training=True)
    layer = layer.to(device).train()
    # (no momentum: a weight pruned below then stays pruned, its gradient being 0)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(2, 8, 10, 10, generator=torch.Generator().manual_seed(22)).to(device)
    x.requires_grad_(True)

    def step_matches_float64() -> None:
        optimizer.zero_grad()
        x.grad = None
        y = layer(x)
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(23)).to(device)
        (y * grad).sum().backward()
        x64 = x.detach().double().cpu().requires_grad_(True)
        w64 = layer.weight.detach().double().cpu().requires_grad_(True)
        y64 = F.conv2d(x64, w64, layer.bias.detach().double().cpu(), padding=1)
        (y64 * grad.double().cpu()).sum().backward()
        stored = layer.weight.detach().cpu() != 0
        assert relative_error(y, y64) < 1e-5
        assert relative_error(x.grad, x64.grad) < 1e-5
        assert relative_error(layer.weight.grad.cpu()[stored], w64.grad[stored]) < 1e-5
        assert torch.all(layer.weight.grad.cpu()[~stored] == 0)
        optimizer.step()

    step_matches_float64()  # builds the pattern's filters (forward and transposed)
    first = layer.csr
    compressions = count_calls(monkeypatch, csr_lib, "compress")
    builds = count_calls(monkeypatch, escoin.SparseFilter, "from_csr")
    host_copies = count_calls(monkeypatch, escoin.SparseFilter, "with_values")
    on_device = count_calls(monkeypatch, escoin.SparseFilter, "_prepare_with_values")
    native = native_training_stats()
    for _ in range(3):
        step_matches_float64()
    assert not compressions and not builds
    # On a GPU the new values stay there and no filter of host values is made: each step's two
    # calls (forward, input gradient) are prepared on them, or where the C++ training path is
    # built (it learnt the pattern in the first step), run there with their programs written
    # on the device, forward and backward.
    if device == "cuda" and native is not None:
        now = native_training_stats()
        assert (len(host_copies), len(on_device)) == (0, 0)
        assert now["native_forwards"] - native["native_forwards"] == 3
        assert now["native_backwards"] - native["native_backwards"] == 3
    elif device == "cuda":
        assert (len(host_copies), len(on_device)) == (0, 6)
    else:
        assert len(host_copies) >= 6 and not on_device
    csr = layer.csr
    assert csr.row_ptr is first.row_ptr and csr.col_idx is first.col_idx
    fresh = csr_lib.from_dense(layer.weight.detach())
    assert torch.equal(csr.row_ptr, fresh.row_ptr) and torch.equal(csr.col_idx, fresh.col_idx)
    assert torch.equal(csr.values, fresh.values)
    compressions.clear()  # (from_dense's own)
    flat = layer.weight.data.view(-1)

    def prune() -> None:
        flat[int(torch.nonzero(flat)[-1])] = 0.0

    def grow() -> None:
        flat[int(torch.nonzero(flat == 0)[0])] = 1.5

    for changes, nnz in (((prune,), first.nnz - 1), ((grow,), first.nnz),
                         ((prune, grow), first.nnz)):  # (the last: as many nonzeros, moved)
        with torch.no_grad():
            for change in changes:
                change()
            layer.weight.add_(0.0)  # (a write the version counter sees, as an optimiser's)
        step_matches_float64()
        assert layer.csr.nnz == nnz
    assert len(compressions) == 3


def native_training_stats() -> Optional[dict]:
    """The C++ training path's counts (escoin_torch._native.training_stats), None where it is
    not built or switched off."""
    from escoin_torch import ops

    if ops._native is None or not ops._native_trains:
        return None
    stats = ops._native.training_stats()
    return stats if stats["enabled"] else None


def check_refresh_csrs(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """escoin_torch.refresh_csrs after an optimiser step checks every layer's pattern at once, so
    the step's forwards check none; a layer whose weight lost a stored value compresses again
    there; outputs match float64 throughout."""
    import escoin_torch
    from escoin_torch import layer as layer_module

    model = nn.Sequential(*[SparseConv2d.from_dense(sparse_conv(8, 8, 3, padding=1),
                                                    sparse_training=True) for _ in range(3)])
    model = model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    optimizer.register_step_post_hook(lambda *_: escoin_torch.refresh_csrs(model))
    x = torch.randn(2, 8, 9, 9, generator=torch.Generator().manual_seed(31)).to(device)
    checks = count_calls(monkeypatch, layer_module, "_check_pattern")

    def step() -> None:
        checks.clear()
        optimizer.zero_grad()
        y = model(x)
        y.square().mean().backward()
        assert not checks  # the last step's hook left every CSR current
        y64 = x.double().cpu()
        for layer in model:
            y64 = F.conv2d(y64, layer.weight.detach().double().cpu(),
                           layer.bias.detach().double().cpu(), padding=1)
        assert relative_error(y, y64) < 1e-5
        optimizer.step()
        assert len(checks) == 3  # all in the hook, together

    step()
    first = [layer.csr for layer in model]
    step()
    step()
    assert all(layer.csr.row_ptr is csr.row_ptr for layer, csr in zip(model, first))
    assert escoin_torch.refresh_csrs(model) == 0  # nothing changed since the hook
    with torch.no_grad():  # a stored value pruned: that layer compresses again
        flat = model[1].weight.view(-1)
        flat[int(torch.nonzero(flat)[0])] = 0.0
    assert escoin_torch.refresh_csrs(model) == 1
    assert model[1].csr.nnz == first[1].nnz - 1
    assert model[0].csr.row_ptr is first[0].row_ptr
    step()
    model[2].sparse_training = False  # its forwards run dense: refresh_csrs leaves it to them
    with torch.no_grad():
        model[2].weight.mul_(2.0)
    assert escoin_torch.refresh_csrs(model) == 0


def check_compiled_sparse_training(device: str, mode: Optional[str]) -> None:
    """A compiled sparse-training layer (no refresh_csrs hook) computes each step with the
    weight the last optimiser step left, and its output and weight gradient match float64."""
    torch.manual_seed(33)
    layer = SparseConv2d.from_dense(sparse_conv(4, 8, 3, padding=1), sparse_training=True)
    layer = layer.to(device)
    mask = layer.weight.detach() != 0
    compiled = torch.compile(layer, fullgraph=True, mode=mode)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(2, 4, 8, 8, device=device)
    for _ in range(3):
        optimizer.zero_grad()
        with strict_fp32_cudnn():
            y = compiled(x)
            y.square().sum().backward()
        weight = layer.weight.detach().double().requires_grad_()
        want = F.conv2d(x.double(), weight, layer.bias.detach().double(), padding=1)
        want.square().sum().backward()
        assert relative_error(y, want) < 1e-5
        assert relative_error(layer.weight.grad, weight.grad * mask) < 1e-5
        optimizer.step()
