"""torch.func transforms of the op and of SparseConv2d: grad, jacrev, jvp, jacfwd, hessian, vmap,
and per-sample gradients (vmap of grad over torch.func.functional_call), against dense float64
references."""
from __future__ import annotations

import copy
from typing import Dict, Optional

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

from torch_helpers import SeenOps, count_calls, relative_error, sparse_weight
import escoin
from escoin_torch import SparseConv2d, sparse_conv2d
from escoin_torch import csr as csr_lib

# The CPU kernels in float64; CUDA computes float32 (its relative error ~1e-7 per output).
DEVICES = [("cpu", torch.float64, 1e-12),
           pytest.param("cuda", torch.float32, 1e-5, marks=pytest.mark.cuda)]
GEOMETRY = dict(stride=2, padding=1, groups=2)


def _operands(device: str, dtype: torch.dtype, seed: int = 0) -> tuple:
    """x (5 images), a sparse weight of two groups, its CSR, a bias and a residual."""
    gen = torch.Generator().manual_seed(seed)
    weight = sparse_weight((8, 3, 3, 3), 0.4, gen, torch.float64)
    x = torch.randn(5, 6, 9, 9, generator=gen, dtype=torch.float64)
    bias = torch.randn(8, generator=gen, dtype=torch.float64)
    residual = torch.randn(5, 8, 5, 5, generator=gen, dtype=torch.float64)
    to = dict(device=device, dtype=dtype)
    weight, x, bias, residual = (t.to(**to) for t in (weight, x, bias, residual))
    return x, weight, csr_lib.from_dense(weight, groups=2), bias, residual


@pytest.mark.parametrize("device, dtype, tol", DEVICES)
def test_grad_of_the_op_matches_autograd_on_the_dense_conv(device: str, dtype: torch.dtype,
                                                           tol: float) -> None:
    x, weight, csr, bias, residual = _operands(device, dtype)

    def loss(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
             residual: torch.Tensor) -> torch.Tensor:
        y = sparse_conv2d(x, csr._replace(values=values), bias, relu=True, residual=residual,
                          stride=2, padding=1)
        return (y * y).sum()

    got = grad(loss, argnums=(0, 1, 2, 3))(x, csr.values, bias, residual)
    # vjp gives the same, from a cotangent of its own
    y, pullback = vjp(lambda *a: loss(*a).reshape(1), x, csr.values, bias, residual)
    for g, pulled in zip(got, pullback(torch.ones_like(y))):
        assert relative_error(pulled, g) < tol
    dense = [t.detach().double().cpu().requires_grad_() for t in (x, weight, bias, residual)]
    y = F.conv2d(dense[0], dense[1], dense[2], **GEOMETRY) + dense[3]
    (y.relu() ** 2).sum().backward()
    wanted = [dense[0].grad, dense[1].grad.reshape(-1)[csr.flat_index().cpu()], dense[2].grad,
              dense[3].grad]
    for name, g, w in zip(("x", "values", "bias", "residual"), got, wanted):
        assert relative_error(g, w) < tol, name


@pytest.mark.parametrize("device, dtype, tol", DEVICES)
def test_vmap_of_the_forward(device: str, dtype: torch.dtype, tol: float) -> None:
    """vmap over x (one call: the mapped dimension folded into the batch), over x with a residual
    mapped or not, and over the weights' values too (one call per sample)."""
    x, weight, csr, bias, residual = _operands(device, dtype)
    xs = x.reshape(5, 1, 6, 9, 9)

    def conv(x: torch.Tensor, values: torch.Tensor,
             residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return sparse_conv2d(x, csr._replace(values=values), bias, residual=residual, stride=2,
                             padding=1)

    def dense(i: int, w: torch.Tensor, r: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = F.conv2d(x[i:i + 1].double(), w.double(), bias.double(), **GEOMETRY)
        return y if r is None else y + r.double()

    def calls(mode: SeenOps) -> int:
        return sum("escoin.sparse_conv2d" in name for name in mode.names)

    with SeenOps() as folded:
        y = vmap(conv, in_dims=(0, None))(xs, csr.values)
    assert calls(folded) == 1
    assert relative_error(y, torch.stack([dense(i, weight) for i in range(5)])) < tol
    rs = residual.reshape(5, 1, 8, 5, 5)
    y = vmap(conv, in_dims=(0, None, 0))(xs, csr.values, rs)
    assert relative_error(y, torch.stack([dense(i, weight, rs[i]) for i in range(5)])) < tol
    y = vmap(conv, in_dims=(0, None, None))(xs, csr.values, rs[0])
    assert relative_error(y, torch.stack([dense(i, weight, rs[0]) for i in range(5)])) < tol
    scales = torch.arange(1, 6, device=device, dtype=dtype)
    values = scales[:, None] * csr.values  # a weight per sample
    with SeenOps() as per_sample:
        y = vmap(conv, in_dims=(0, 0))(xs, values)
    assert calls(per_sample) == 5
    assert relative_error(y, torch.stack([dense(i, weight * scales[i]) for i in range(5)])) < tol


@pytest.mark.parametrize("device, dtype, tol", DEVICES)
def test_jacrev_matches_the_dense_jacobian(device: str, dtype: torch.dtype, tol: float) -> None:
    x, weight, csr, bias, _ = _operands(device, dtype)
    got = jacrev(lambda t: sparse_conv2d(t, csr, bias, stride=2, padding=1))(x[:1])
    wanted = jacrev(lambda t: F.conv2d(t, weight.double(), bias.double(), **GEOMETRY))(
        x[:1].double())
    assert relative_error(got, wanted) < tol


def _forward_mode_case(device: str, dtype: torch.dtype) -> tuple:
    """The sparse function of (x, values, bias, residual), relu(conv + residual), its dense
    float64 twin, the primals and random tangents for them, and the CSR weight."""
    x, weight, csr, bias, residual = _operands(device, dtype)
    index = csr.flat_index()

    def sparse(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
               residual: torch.Tensor) -> torch.Tensor:
        return sparse_conv2d(x, csr._replace(values=values), bias, relu=True, residual=residual,
                             stride=2, padding=1)

    def dense(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
              residual: torch.Tensor) -> torch.Tensor:
        w = torch.zeros(weight.numel(), dtype=values.dtype, device=values.device)
        w = w.index_put((index,), values).reshape(weight.shape)
        return (F.conv2d(x, w, bias, **GEOMETRY) + residual).relu()

    primals = (x, csr.values, bias, residual)
    gen = torch.Generator().manual_seed(3)
    tangents = tuple(torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t)
                     for t in primals)
    return sparse, dense, primals, tangents, csr


@pytest.mark.parametrize("device, dtype, tol", DEVICES)
def test_forward_mode_matches_the_dense_conv(device: str, dtype: torch.dtype, tol: float) -> None:
    """jvp in every argument at once (x, the values, the bias, the residual; through the ReLU),
    and jacfwd against jacrev."""
    sparse, dense, primals, tangents, csr = _forward_mode_case(device, dtype)
    y, tangent = jvp(sparse, primals, tangents)
    y_ref, tangent_ref = jvp(dense, tuple(t.double() for t in primals),
                             tuple(t.double() for t in tangents))
    assert relative_error(y, y_ref) < tol and relative_error(tangent, tangent_ref) < tol
    x, bias = primals[0], primals[2]

    def conv(t: torch.Tensor) -> torch.Tensor:
        return sparse_conv2d(t, csr, bias, stride=2, padding=1)

    assert relative_error(jacfwd(conv)(x[:1]), jacrev(conv)(x[:1]).double()) < tol


@pytest.mark.parametrize("device, dtype, tol", DEVICES)
@pytest.mark.parametrize("grad_mode", [False, True])
def test_dual_tensors_of_forward_ad_carry_their_tangents(device: str, dtype: torch.dtype,
                                                         tol: float, grad_mode: bool) -> None:
    """torch.autograd.forward_ad's dual tensors (no torch.func transform: plain tensors with a
    tangent, which need not require a gradient) through the op, with gradients on and off:
    the result carries the tangent the dense function's has, none dropped by a shortcut that
    runs the kernel alone."""
    sparse, dense, primals, tangents, _ = _forward_mode_case(device, dtype)
    wide = tuple(t.double() for t in primals)
    # (torch.func.jvp cannot run inside a dual level: the references first.) Each argument's
    # tangent alone, then all of them.
    singles = [jvp(dense, wide, tuple(t.double() if i == which else torch.zeros_like(t.double())
                                      for i, t in enumerate(tangents)))[1]
               for which in range(len(primals))]
    tangent_ref = jvp(dense, wide, tuple(t.double() for t in tangents))[1]
    with torch.set_grad_enabled(grad_mode), forward_ad.dual_level():
        duals = [forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)]
        for which, single in enumerate(singles):
            args = [d if i == which else p for i, (p, d) in enumerate(zip(primals, duals))]
            got = forward_ad.unpack_dual(sparse(*args)).tangent
            assert got is not None and relative_error(got, single) < tol
        got = forward_ad.unpack_dual(sparse(*duals)).tangent
        assert got is not None and relative_error(got, tangent_ref) < tol


@pytest.mark.parametrize("device, dtype, tol", DEVICES)
def test_hessian_matches_the_dense_conv(device: str, dtype: torch.dtype, tol: float) -> None:
    x, weight, csr, bias, _ = _operands(device, dtype)
    small = x[:1, :, :5, :5]
    got = hessian(lambda t: sparse_conv2d(t, csr, bias, relu=True, stride=2, padding=1)
                  .pow(2).sum())(small)
    wanted = hessian(lambda t: F.conv2d(t, weight.double(), bias.double(), **GEOMETRY).relu()
                     .pow(2).sum())(small.double())
    assert relative_error(got, wanted) < tol


def _layer_and_dense(device: str, dtype: torch.dtype) -> tuple:
    """An eval-mode SparseConv2d (its CSR built by one forward) and the same nn.Conv2d."""
    x, weight, _, bias, _ = _operands(device, dtype)
    conv = nn.Conv2d(6, 8, 3, **GEOMETRY, device=device, dtype=dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    layer = SparseConv2d.from_dense(conv).eval()
    with torch.no_grad():
        layer(x)
    return layer, conv.eval(), x


def _per_sample_grads(model: nn.Module, params: Dict[str, torch.Tensor], x: torch.Tensor,
                      params_mapped: bool = False) -> Dict[str, torch.Tensor]:
    """Per-sample gradients of a squared output, vmap of grad over functional_call; with
    params_mapped, the params are stacked, one set per sample (as in model ensembling)."""
    def loss(p: Dict[str, torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
        y = functional_call(model, p, (sample.unsqueeze(0),))
        return (y * y).sum()

    return vmap(grad(loss), in_dims=(0 if params_mapped else None, 0))(params, x)


@pytest.mark.parametrize("device, dtype, tol", DEVICES)
def test_per_sample_gradients_of_a_layer(device: str, dtype: torch.dtype, tol: float,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """vmap(grad) over functional_call, the torch.func recipe for per-sample gradients: the layer
    runs escoin (not its dense path) and its gradients are the dense layer's on the stored
    nonzeros (the sparsity pattern is fixed: elsewhere they are zero)."""
    layer, conv, x = _layer_and_dense(device, dtype)
    calls = _dense_calls(layer, monkeypatch)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    got = _per_sample_grads(layer, params, x)
    assert not calls
    wanted = _per_sample_grads(conv, {k: v.detach().double() for k, v in conv.named_parameters()},
                               x.double())
    pattern = conv.weight != 0
    assert got["weight"].shape == (5, 8, 3, 3, 3)
    assert relative_error(got["weight"][:, pattern], wanted["weight"][:, pattern]) < tol
    assert torch.all(got["weight"][:, ~pattern] == 0)
    assert relative_error(got["bias"], wanted["bias"]) < tol


@pytest.mark.parametrize("device, dtype, tol", DEVICES)
def test_transforms_of_a_layer_whose_weight_requires_grad(device: str, dtype: torch.dtype,
                                                         tol: float,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """vmap, jacfwd and hessian of the layer itself (its weight requiring a gradient, as a
    model's does), and jacfwd through its weight, run escoin and match the dense layer's: the
    attachment of the cached values to the weight has a vmap rule and a tangent."""
    layer, conv, x = _layer_and_dense(device, dtype)
    assert layer.weight.requires_grad
    calls = _dense_calls(layer, monkeypatch)
    dense = copy.deepcopy(conv).double()  # (conv.double() would convert the layer's too)
    xs, small = x.reshape(5, 1, 6, 9, 9), x[:1, :, :5, :5]
    assert relative_error(vmap(layer)(xs), vmap(dense)(xs.double())) < tol
    assert relative_error(jacfwd(lambda t: layer(t).sum((0, 1)))(x[:1]),
                          jacfwd(lambda t: dense(t).sum((0, 1)))(x[:1].double())) < tol
    assert relative_error(hessian(lambda t: layer(t).pow(2).sum())(small),
                          hessian(lambda t: dense(t).pow(2).sum())(small.double())) < tol
    through_weight = jacfwd(lambda w: functional_call(layer, {"weight": w}, (x[:1],)).sum())
    got = through_weight(layer.weight.detach())
    wanted = jacfwd(lambda w: functional_call(dense, {"weight": w}, (x[:1].double(),)).sum())(
        dense.weight.detach())
    pattern = conv.weight != 0
    assert relative_error(got[pattern], wanted[pattern]) < tol
    assert torch.all(got[~pattern] == 0)
    assert not calls


@pytest.mark.parametrize("device, dtype, tol", DEVICES)
@pytest.mark.parametrize("warmed", [False, True])
def test_transforms_through_a_frozen_layer(device: str, dtype: torch.dtype, tol: float,
                                           warmed: bool) -> None:
    """grad, jacrev, jvp and hessian with respect to a head after a frozen sparse layer, whose
    call sees only plain tensors inside the transform (a frozen backbone): the same as through
    the dense layer (the call crashed, its detached copies wrapped by the transform), also
    after an eager call remembered the layer's fast path."""
    layer, conv, x = _layer_and_dense(device, dtype)
    layer.eval().requires_grad_(False)
    if warmed:
        layer(x)
    dense = copy.deepcopy(conv).double().requires_grad_(False)
    head = torch.randn(8 * 5 * 5, dtype=dtype, device=device)

    def loss(model: nn.Module, x: torch.Tensor):
        return lambda w: (model(x).flatten(1) @ w).square().sum()

    for transform in (grad, jacrev, hessian):
        assert relative_error(transform(loss(layer, x))(head),
                              transform(loss(dense, x.double()))(head.double())) < tol
    _, tangent = jvp(loss(layer, x), (head,), (head,))
    _, wanted = jvp(loss(dense, x.double()), (head.double(),), (head.double(),))
    assert relative_error(tangent, wanted) < tol


@pytest.mark.parametrize("device, dtype, tol", DEVICES)
def test_grads_of_new_values_reuse_the_layers_filters(device: str, dtype: torch.dtype, tol: float,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """grad over functional_call with new weight values each call (a training loop in
    torch.func): after the first call, the forward's and the input gradient's escoin filters
    are derived from those of the layer's pattern, none built again; gradients match float64."""
    layer, conv, x = _layer_and_dense(device, dtype)
    builds = count_calls(monkeypatch, escoin.SparseFilter, "from_csr")
    stored = conv.weight.detach() != 0

    def loss(params: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, params, (x,)).square().sum()

    for step in range(3):
        if step == 1:
            builds.clear()  # (the first call built the forward's and the transpose's)
        weight = conv.weight.detach() * (1 + 0.1 * step)
        got_params, got_x = grad(loss, argnums=(0, 1))({"weight": weight,
                                                        "bias": conv.bias.detach()}, x)
        dense = [t.detach().double().cpu().requires_grad_() for t in (weight, x)]
        F.conv2d(dense[1], dense[0], conv.bias.detach().double().cpu(),
                 **GEOMETRY).square().sum().backward()
        assert relative_error(got_x, dense[1].grad) < tol
        assert relative_error(got_params["weight"][stored], dense[0].grad[stored.cpu()]) < tol
    assert not builds


def _dense_calls(layer: SparseConv2d, monkeypatch: pytest.MonkeyPatch) -> list:
    """Records the layer's calls of its dense path (still computing them)."""
    calls: list = []
    dense_forward = layer.dense_forward

    def recorded(*args: torch.Tensor) -> torch.Tensor:
        calls.append(args)
        return dense_forward(*args)

    monkeypatch.setattr(layer, "dense_forward", recorded)
    return calls


@pytest.mark.parametrize("device, dtype, tol", DEVICES)
@pytest.mark.parametrize("case", ["off the pattern", "no CSR yet", "mapped"])
def test_where_the_layer_cannot_gather_it_runs_dense(device: str, dtype: torch.dtype, tol: float,
                                                     case: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight given to functional_call with nonzeros where the layer's CSR has none, a layer
    that has built no CSR yet, or weights that vmap maps (one per sample, on the layer's pattern:
    a grad wrapper around a batched tensor): no single CSR holds the weight, so the layer
    computes it dense, exactly, gradients included."""
    layer, conv, x = _layer_and_dense(device, dtype)
    weight = conv.weight.detach().clone()
    mapped = case == "mapped"
    if case == "off the pattern":
        weight[2][weight[2] == 0] = 0.5  # output channel 2 dense
    elif case == "no CSR yet":
        layer = SparseConv2d(6, 8, 3, **GEOMETRY, device=device, dtype=dtype).eval()
        assert not layer._compressed
    else:
        scales = torch.arange(1, 6, device=device, dtype=dtype)
        weight = scales[:, None, None, None, None] * weight
    bias = conv.bias.detach()
    bias = bias.expand(5, -1).clone() if mapped else bias
    calls = _dense_calls(layer, monkeypatch)
    params = {"weight": weight, "bias": bias}
    got = _per_sample_grads(layer, params, x, params_mapped=mapped)
    assert calls
    conv_params = {"weight": weight.double(), "bias": bias.double()}
    wanted = _per_sample_grads(conv, conv_params, x.double(), params_mapped=mapped)
    for name in ("weight", "bias"):
        assert relative_error(got[name], wanted[name]) < tol, name
    if not mapped:
        y = functional_call(layer, params, (x,))
        assert relative_error(y, F.conv2d(x.double(), weight.double(), bias.double(),
                                          **GEOMETRY)) < tol
