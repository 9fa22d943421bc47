"""SparseConv2d as a drop-in nn.Conv2d: results, paths, state_dict, CSR refresh, compile."""
from __future__ import annotations

import copy
import io

import escoin
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_helpers import (SeenOps, check_compiled_sparse_training, check_refresh_csrs,
                           check_training_steps_keep_the_pattern, count_calls, pruned_small_cnn,
                           reference_conv, relative_error, sparse_conv, tolerance)
import escoin_torch
from escoin_torch import SparseConv2d, sparsify
from escoin_torch import csr as csr_lib


def test_from_dense_matches_and_shares_parameters() -> None:
    conv = sparse_conv(4, 6, 3, stride=2, padding=1, groups=2)
    layer = SparseConv2d.from_dense(conv).eval()
    assert layer.weight is conv.weight and layer.bias is conv.bias
    x = torch.randn(3, 4, 11, 9)
    assert relative_error(layer(x), reference_conv(x, conv.weight, conv.bias, stride=2,
                                                   padding=1, groups=2)) < 1e-5


def test_from_dense_of_a_sparse_layer_keeps_its_settings() -> None:
    """A SparseConv2d converted again computes what it computed: its relu, sparse_training and
    inference_path carry over (they were reset to the defaults), unless given."""
    source = SparseConv2d.from_dense(sparse_conv(4, 6, 3, padding=1), relu=True,
                                     sparse_training=True, inference_path="dense").eval()
    again = SparseConv2d.from_dense(source).eval()
    assert (again.relu, again.sparse_training, again.inference_path) == (True, True, "dense")
    x = torch.randn(2, 4, 7, 7)
    assert relative_error(again(x), source(x)) < 1e-6
    plain = SparseConv2d.from_dense(source, relu=False, sparse_training=False,
                                    inference_path="sparse")
    assert (plain.relu, plain.sparse_training, plain.inference_path) == (False, False, "sparse")


def test_constructor_like_conv2d_and_padding_mode_error() -> None:
    layer = SparseConv2d(3, 4, (3, 5), stride=(1, 2), padding=1, bias=False)
    assert isinstance(layer, nn.Conv2d) and layer.bias is None
    with pytest.raises(ValueError, match="padding_mode='zeros' only"):
        SparseConv2d(3, 4, 3, padding_mode="reflect")


def test_training_dense_eval_sparse(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = SparseConv2d.from_dense(sparse_conv(3, 4, 3, padding=1))
    calls = []
    monkeypatch.setattr(torch.ops.escoin, "sparse_conv2d",
                        _spy(torch.ops.escoin.sparse_conv2d, calls), raising=False)
    x = torch.randn(2, 3, 6, 6)
    layer.train()(x)
    assert calls == []
    layer.eval()(x)
    assert len(calls) == 1
    layer.inference_path = "dense"
    layer(x)
    assert len(calls) == 1


def test_plain_cpu_inference_uses_the_layers_filter_and_modes_still_see_the_op(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under no_grad a CPU call skips the op's dispatch and its filter cache (whose per-call
    comparison of the CSR with a snapshot costs O(nnz)) and runs with the filter the layer
    compressed its weight through, whose arrays are the CSR tensors; with a gradient to record,
    under a dispatch mode or a profiler it goes through the op. Every way gives the same
    result."""
    from escoin_torch import ops

    filters = []
    forward = ops._cpu_forward

    def counted(host_filter, *args):
        filters.append(host_filter)
        return forward(host_filter, *args)
    monkeypatch.setattr(ops, "_cpu_forward", counted)

    layer = SparseConv2d.from_dense(sparse_conv(8, 16, 3, stride=2, padding=1, groups=2)).eval()
    x = torch.randn(3, 8, 11, 9)
    expected = reference_conv(x, layer.weight, layer.bias, stride=2, padding=1, groups=2)
    state = layer._current()
    assert torch.equal(state.csr.values, torch.tensor(state.host_filter.filt.values))
    with torch.no_grad():
        plain = layer(x)
    assert filters == [state.host_filter]
    with torch.no_grad(), SeenOps() as mode:
        seen = layer(x)
    assert filters[1] is None and any("escoin.sparse_conv2d" in n for n in mode.names)
    with torch.no_grad(), torch.profiler.profile() as profiler:
        profiled = layer(x)
    assert filters[2] is None
    assert any("escoin::sparse_conv2d" in event.name for event in profiler.events())
    recorded = layer(x.requires_grad_())
    assert filters[3] is None and recorded.grad_fn is not None
    for y in (plain, seen, profiled, recorded):
        assert relative_error(y, expected) < 1e-5


def test_writes_into_the_returned_csr_do_not_reach_the_kernel() -> None:
    """refresh_csr() hands out copies: a row_ptr written past the nonzeros (which read past the
    offsets: a crash, when the CSR tensors were the filter's arrays) leaves eager CPU inference
    computing the weight's convolution, and a call through the op meets a clear error."""
    layer = SparseConv2d.from_dense(sparse_conv(4, 8, 3, padding=1)).eval()
    x = torch.randn(1, 4, 6, 6)
    csr = layer.refresh_csr()
    csr.row_ptr[-1] = 1 << 28
    with torch.no_grad():
        y = layer(x)
    assert relative_error(y, reference_conv(x, layer.weight, layer.bias, padding=1)) < 1e-5
    with pytest.raises(escoin.EscoinError, match=r"row_ptr\[8\] must equal nnz"):
        layer(x)  # a gradient to record: through the op, with these tensors


def _spy(op, calls: list):
    def wrapper(*args, **kwargs):
        calls.append(args)
        return op(*args, **kwargs)
    return wrapper


def test_writes_the_version_counter_misses() -> None:
    """Writes through .data (manual SGD, EMA) change neither the tensor nor its version: an
    explicit refresh_csr() sees them, and so does leaving training mode."""
    layer = SparseConv2d.from_dense(sparse_conv(3, 4, 3)).eval()
    x = torch.randn(2, 3, 6, 6)
    layer(x)
    layer.weight.data.mul_(2)
    layer.refresh_csr()
    assert relative_error(layer(x), reference_conv(x, layer.weight, layer.bias)) < 1e-5
    layer.train()
    layer.weight.data.sub_(0.1 * layer.weight.data.sign())  # zeros stay zeros
    layer.eval()
    assert relative_error(layer(x), reference_conv(x, layer.weight, layer.bias)) < 1e-5


@pytest.mark.parametrize("optimizer", [
    lambda params: torch.optim.AdamW(params, lr=0.1, fused=True),
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True),
    lambda params: torch.optim.Adam(params, lr=0.1)])
@pytest.mark.parametrize("sparse_training", [False, True])
def test_optimiser_steps_reach_the_csr(optimizer, sparse_training: bool) -> None:
    """Fused optimisers write the weight in place without bumping its version counter; each
    step's next forward still computes with the stepped weight (the layer in eval mode between
    steps, or training sparse)."""
    layer = SparseConv2d.from_dense(sparse_conv(8, 16, 3, padding=1),
                                    sparse_training=sparse_training)
    layer.train(sparse_training)
    x = torch.randn(2, 8, 10, 10)
    layer(x)
    step = optimizer(layer.parameters())
    for _ in range(3):
        step.zero_grad()
        layer(x).square().sum().backward()
        before = layer.weight.detach().clone()
        step.step()
        assert not torch.equal(layer.weight, before)
        expected = reference_conv(x, layer.weight, layer.bias, padding=1)
        assert relative_error(layer(x), expected) < 1e-5


def test_refresh_csrs_as_a_fused_optimisers_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sparse-training recipe with a fused optimiser: its own post-step hook
    (refresh_csrs) sees the fused step's write, so the next forward checks no pattern."""
    from escoin_torch import layer as layer_module

    model = nn.Sequential(*[SparseConv2d.from_dense(sparse_conv(8, 8, 3, padding=1),
                                                    sparse_training=True) for _ in range(2)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    optimizer.register_step_post_hook(lambda *_: escoin_torch.refresh_csrs(model))
    x = torch.randn(2, 8, 9, 9)
    for _ in range(3):
        optimizer.zero_grad()
        checks = count_calls(monkeypatch, layer_module, "_check_pattern")
        y = model(x)
        assert not checks  # the last step's hook left every CSR current
        hidden = reference_conv(x, model[0].weight, model[0].bias, padding=1)
        assert relative_error(y, reference_conv(hidden, model[1].weight, model[1].bias,
                                                padding=1)) < 1e-5
        y.square().mean().backward()
        optimizer.step()
        assert len(checks) == 2  # in the hook


def test_refresh_csrs_after_writes_the_version_counters_miss() -> None:
    """vector_to_parameters from a reused buffer sets each parameter's .data to a view of it:
    a later write into the buffer keeps storage, offset and version. refresh_csrs with
    unseen_writes checks every layer anyway."""
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    model = nn.Sequential(SparseConv2d.from_dense(sparse_conv(3, 8, 3, padding=1)),
                          SparseConv2d.from_dense(sparse_conv(8, 4, 3, padding=1))).eval()
    x = torch.randn(2, 3, 6, 6)
    vector = parameters_to_vector(model.parameters()).detach().clone()
    vector_to_parameters(vector, model.parameters())
    model(x)
    vector.mul_(-0.5)  # the weights' zeros stay zeros

    def expected() -> torch.Tensor:
        hidden = reference_conv(x, model[0].weight, model[0].bias, padding=1)
        return reference_conv(hidden, model[1].weight, model[1].bias, padding=1)

    assert escoin_torch.refresh_csrs(model) == 0  # the counters say nothing changed
    assert escoin_torch.refresh_csrs(model, unseen_writes=True) == 2
    assert relative_error(model(x), expected()) < 1e-5
    # Checked again with nothing written: no layer takes new values (each keeps its CSR).
    csrs = [layer.csr for layer in model]
    assert escoin_torch.refresh_csrs(model, unseen_writes=True) == 0
    assert all(layer.csr is csr for layer, csr in zip(model, csrs))
    vector[:model[0].weight.numel()].mul_(2.0)  # the first layer's weight only
    assert escoin_torch.refresh_csrs(model, unseen_writes=True) == 1
    assert relative_error(model(x), expected()) < 1e-5


def test_models_made_under_inference_mode() -> None:
    """Tensors made under torch.inference_mode keep no version counter, which the layer's
    stamps read: converting, fusing, copying and loading a model there work as nn.Conv2d's do,
    and its outputs match float64."""
    from escoin_torch import fuse_for_inference

    dense = nn.Sequential(sparse_conv(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          sparse_conv(8, 4, 3, padding=1)).eval()
    dense[1].running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 6, 6)
    with torch.inference_mode():
        expected = dense.double()(x.double())
        dense.float()
        model, _ = sparsify(dense)
        for made in (model, fuse_for_inference(model), copy.deepcopy(model),
                     torch.load(_saved(model), weights_only=False)):
            assert relative_error(made(x), expected) < 1e-5


@pytest.mark.parametrize("make", [copy.deepcopy, lambda m: m.half(),
                                  lambda m: torch.load(_saved(m), weights_only=False)])
def test_copies_and_moved_layers_compile_at_once(make) -> None:
    """A copy, a pickle or a converted layer has its CSR already: torch.compile, which cannot
    compress while it traces, takes it directly."""
    layer = make(SparseConv2d.from_dense(sparse_conv(3, 4, 3, padding=1)).eval())
    x = torch.randn(2, 3, 6, 6).to(layer.weight.dtype)
    y = torch.compile(layer, fullgraph=True)(x)
    assert relative_error(y, reference_conv(x, layer.weight, layer.bias, padding=1)) < \
        tolerance(layer.weight.dtype)


@pytest.mark.parametrize("trace", ["compile", "export"])
def test_a_loaded_state_dict_reaches_traced_forwards(trace: str) -> None:
    """Tracing cannot check whether the CSR is the weight's: load_state_dict compresses."""
    layer = SparseConv2d.from_dense(sparse_conv(3, 4, 3, padding=1)).eval()
    other = sparse_conv(3, 4, 3, padding=1)
    with torch.no_grad():
        other.weight.mul_(-2)
    layer.load_state_dict(other.state_dict())
    x = torch.randn(2, 3, 6, 6)
    traced = torch.compile(layer, fullgraph=True) if trace == "compile" else \
        torch.export.export(layer, (x,)).module()
    assert relative_error(traced(x), reference_conv(x, other.weight, other.bias, padding=1)) \
        < 1e-5


def _saved(module: nn.Module) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return buffer


def test_inference_path_is_checked() -> None:
    with pytest.raises(ValueError, match="inference_path must be 'sparse' or 'dense'"):
        SparseConv2d(3, 4, 3, inference_path="spars")
    layer = SparseConv2d(3, 4, 3)
    with pytest.raises(ValueError, match="got 'Dense'"):
        layer.inference_path = "Dense"


def test_state_dict_round_trip() -> None:
    conv = sparse_conv(3, 5, 3, padding=1)
    layer = SparseConv2d.from_dense(copy.deepcopy(conv))
    assert list(layer.state_dict()) == list(conv.state_dict()) == ["weight", "bias"]
    plain = nn.Conv2d(3, 5, 3, padding=1)
    plain.load_state_dict(layer.state_dict())
    fresh = SparseConv2d(3, 5, 3, padding=1).eval()
    fresh.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 7, 7)
    assert relative_error(fresh(x), reference_conv(x, conv.weight, conv.bias, padding=1)) < 1e-5


def test_csr_follows_weight_changes(monkeypatch) -> None:
    layer = SparseConv2d.from_dense(sparse_conv(3, 4, 3)).eval()
    x = torch.randn(2, 3, 6, 6)
    compressions: list = []
    monkeypatch.setattr(csr_lib, "compress", _spy(csr_lib.compress, compressions))
    layer(x), layer(x)
    assert not compressions  # unchanged weight: no recompression
    with torch.no_grad():
        layer.weight.mul_(-3)
    assert relative_error(layer(x), reference_conv(x, layer.weight, layer.bias)) < 1e-5
    layer.load_state_dict({"weight": torch.randn(4, 3, 3, 3), "bias": torch.randn(4)})
    assert relative_error(layer(x), reference_conv(x, layer.weight, layer.bias)) < 1e-5
    layer.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
    assert relative_error(layer(x), reference_conv(x, layer.weight, layer.bias)) < 1e-5
    layer.double()
    y = layer(x.double())
    assert y.dtype == torch.float64
    assert relative_error(y, reference_conv(x, layer.weight, layer.bias)) < 1e-12


@pytest.mark.parametrize("channels", [8, 2])
def test_a_weight_of_another_shape_is_compressed_anew(channels: int) -> None:
    """A weight of another shape put in the layer's place (output channels added or pruned
    away), whose nonzeros the old pattern's indices might still reach: compressed anew, not
    gathered at the old pattern."""
    layer = SparseConv2d.from_dense(sparse_conv(3, 4, 3, bias=False)).eval()
    x = torch.randn(2, 3, 6, 6)
    layer(x)
    other = torch.zeros(channels, 3, 3, 3)
    rows = min(channels, 4)
    other[:rows] = layer.weight.detach()[:rows]
    layer.weight = nn.Parameter(other)
    y = layer(x)
    assert y.shape == (2, channels, 4, 4)
    assert relative_error(y, reference_conv(x, other, None)) < 1e-5


def test_fused_relu_both_paths() -> None:
    layer = SparseConv2d.from_dense(sparse_conv(3, 4, 3), relu=True)
    x = torch.randn(2, 3, 6, 6)
    expected = reference_conv(x, layer.weight, layer.bias).relu()
    assert relative_error(layer.eval()(x), expected) < 1e-5
    assert relative_error(layer.train()(x), expected) < 1e-5


def test_sparse_training_gradients() -> None:
    """Sparse training updates only stored nonzeros, with the gradient dense conv would give."""
    conv = sparse_conv(4, 6, 3, stride=2, padding=1, groups=2).double()
    layer = SparseConv2d.from_dense(copy.deepcopy(conv), sparse_training=True).train()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    y, y_ref = layer(x), conv(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    gx = x.grad.clone()
    x.grad = None
    (y_ref * g).sum().backward()
    mask = conv.weight != 0
    assert relative_error(gx, x.grad) < 1e-12
    assert relative_error(layer.weight.grad[mask], conv.weight.grad[mask]) < 1e-12
    assert torch.all(layer.weight.grad[~mask] == 0)
    assert relative_error(layer.bias.grad, conv.bias.grad) < 1e-12


def test_sparse_training_step_keeps_pattern() -> None:
    layer = SparseConv2d.from_dense(sparse_conv(3, 4, 3), sparse_training=True).train()
    zeros = layer.weight == 0
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        optimizer.step()
    assert torch.all(layer.weight[zeros] == 0)
    assert relative_error(layer.eval()(x), reference_conv(x, layer.weight, layer.bias)) < 1e-5


def test_training_steps_keep_the_pattern(monkeypatch: pytest.MonkeyPatch) -> None:
    check_training_steps_keep_the_pattern(monkeypatch, "cpu")


def test_refresh_csrs_checks_every_layer_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    check_refresh_csrs(monkeypatch, "cpu")


def test_training_steps_leave_no_filters_behind() -> None:
    """Each step's filters (forward and transposed) replace the last step's in the op's caches:
    they do not pile up with the steps (each would keep its arrays, on a GPU device memory)."""
    from escoin_torch import ops

    layer = SparseConv2d.from_dense(sparse_conv(8, 32, 3, padding=1), sparse_training=True)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01)
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    sizes = []
    for step in range(30):
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        optimizer.step()
        if step in (4, 29):
            sizes.append((len(ops._filters), len(ops._transposes)))
    assert sizes[1][0] <= sizes[0][0] + 2 and sizes[1][1] <= sizes[0][1] + 2, sizes


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_validation_under_inference_mode_between_training_steps(device: str) -> None:
    """A sparse-training loop that validates under torch.inference_mode (eval() there
    compresses the weight again) goes on training afterwards, and its steps match float64."""
    torch.manual_seed(31)
    layer = SparseConv2d.from_dense(sparse_conv(4, 8, 3, padding=1), sparse_training=True)
    layer = layer.to(device)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    x = torch.randn(2, 4, 7, 7, device=device)
    for _ in range(3):
        layer.train()
        optimizer.zero_grad()
        y = layer(x)
        y.square().sum().backward()
        want = F.conv2d(x.double(), layer.weight.detach().double(), layer.bias.detach().double(),
                        padding=1)
        assert relative_error(y, want) < 1e-5
        optimizer.step()
        with torch.inference_mode():
            layer.eval()
            layer(x)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_a_dual_weight_carries_its_tangent(requires_grad: bool) -> None:
    """Forward-mode AD through the weight (a dual tensor put in by functional_call) gives the
    dense layer's tangent on the pattern: weight and bias tangents both reach the output."""
    import torch.autograd.forward_ad as forward_ad
    from torch.func import functional_call

    torch.manual_seed(32)
    conv = sparse_conv(4, 6, 3, padding=1).double()
    layer = SparseConv2d.from_dense(conv).eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    weight_tangent = torch.randn_like(conv.weight) * (conv.weight != 0)
    bias_tangent = torch.randn_like(conv.bias)
    with forward_ad.dual_level():
        weight = forward_ad.make_dual(conv.weight.detach().requires_grad_(requires_grad),
                                      weight_tangent)
        bias = forward_ad.make_dual(conv.bias.detach(), bias_tangent)
        params = {"weight": weight, "bias": bias}
        got = forward_ad.unpack_dual(functional_call(layer, params, (x,))).tangent
        want = forward_ad.unpack_dual(functional_call(conv, params, (x,))).tangent
    assert got is not None and relative_error(got, want) < 1e-12


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_a_deleted_model_leaves_nothing_derived_behind(device: str) -> None:
    """What escoin-torch derived from a model's CSRs (filters with their arrays, on a GPU device
    memory; transposed CSRs and patterns) goes when the model is deleted, with no later call
    needed: the op's caches, the live filters and on a GPU torch's allocated memory come back
    to where they were."""
    import gc
    from escoin_torch import ops

    caches = (ops._filters, ops._transposes, ops._patterns, ops._transpositions)

    def held() -> tuple:
        gc.collect()
        return (tuple(len(c) for c in caches), len(ops._prepared),
                torch.cuda.memory_allocated() if device == "cuda" else 0)

    before = held()
    model = nn.Sequential(sparse_conv(8, 16, 3, padding=1), nn.ReLU(),
                          sparse_conv(16, 8, 1)).to(device)
    model, _ = sparsify(model, inplace=True)
    for layer in model.modules():
        if isinstance(layer, SparseConv2d):
            layer.sparse_training = True
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(2, 8, 9, 9, device=device, requires_grad=True)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        model(x)
    # The functional form, whose filters the op's caches keep on either device:
    csr = csr_lib.from_dense(sparse_conv(8, 4, 3).weight.detach().to(device))
    csr = csr._replace(values=csr.values.clone().requires_grad_())
    escoin_torch.sparse_conv2d(x, csr, padding=1).square().mean().backward()
    grown = held()
    assert all(g > b for g, b in zip(grown[0], before[0])) and grown[1] > before[1]
    del model, optimizer, layer, csr, x
    assert held() == before


@pytest.mark.parametrize("sparse_training", [False, True])
def test_autocast_runs_the_layer_in_float32(sparse_training: bool) -> None:
    """Under autocast a float32 layer meets the 16-bit activations of the layers before it: the
    op casts them to float32 (its output is float32), in eval and in sparse training, and the
    input gradient flows back to the 16-bit tensor."""
    conv = sparse_conv(4, 6, 3, stride=2, padding=1, groups=2)
    layer = SparseConv2d.from_dense(conv, relu=True, sparse_training=sparse_training)
    layer.train(sparse_training)
    x = torch.randn(2, 4, 9, 9).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32
    expected = reference_conv(x, conv.weight, conv.bias, stride=2, padding=1, groups=2).relu()
    assert relative_error(y, expected) < 1e-5
    y.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


def test_eval_input_gradient() -> None:
    layer = SparseConv2d.from_dense(sparse_conv(3, 4, 3, padding=1).double()).eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_unbatched_and_same_padding() -> None:
    conv = sparse_conv(3, 4, 4, padding="same", dilation=1)
    layer = SparseConv2d.from_dense(conv).eval()
    x = torch.randn(3, 9, 8)
    assert relative_error(layer(x), conv(x)) < 1e-5
    # A residual that is a number (added as torch adds it), and x by nn.Conv2d's argument name.
    assert relative_error(layer(x, 1.5), conv(x) + 1.5) < 1e-5
    assert relative_error(layer(input=x), conv(x)) < 1e-5


def test_deepcopy_and_pickle() -> None:
    layer = SparseConv2d.from_dense(sparse_conv(3, 4, 3)).eval()
    x = torch.randn(2, 3, 6, 6)
    clone = copy.deepcopy(layer)
    with torch.no_grad():
        clone.weight.mul_(2)
    assert relative_error(clone(x), reference_conv(x, clone.weight, clone.bias)) < 1e-5
    assert relative_error(layer(x), reference_conv(x, layer.weight, layer.bias)) < 1e-5
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert relative_error(loaded(x), reference_conv(x, layer.weight, layer.bias)) < 1e-5


def test_channels_last_layer() -> None:
    layer = SparseConv2d.from_dense(sparse_conv(3, 4, 3, padding=1)).eval()
    x = torch.randn(2, 3, 7, 7).contiguous(memory_format=torch.channels_last)
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(y, reference_conv(x, layer.weight, layer.bias, padding=1)) < 1e-5


def test_unsupported_dtype_is_a_clear_error() -> None:
    layer = SparseConv2d(3, 4, 3).eval()
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(TypeError, match="one dtype"):
        layer(x.double())
    with pytest.raises(TypeError, match="float16 or bfloat16 weights"):
        layer.to(torch.complex64)(x.to(torch.complex64))


@pytest.mark.parametrize("inference_mode", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_cpu(inference_mode: bool, dtype: torch.dtype) -> None:
    model, _ = sparsify(pruned_small_cnn().eval().to(dtype))
    x = torch.randn(2, 3, 16, 16).to(dtype)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True)
    with torch.inference_mode(inference_mode):
        y = compiled(x)
    assert y.dtype == dtype
    # (The layers escoin does not replace may be fused differently once compiled.)
    assert relative_error(y, expected) < tolerance(dtype)


def test_compile_fullgraph_backward_cpu() -> None:
    model, _ = sparsify(pruned_small_cnn())
    for layer in model.modules():
        if isinstance(layer, SparseConv2d):
            layer.sparse_training = True
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    compiled(x).sum().backward()
    gx = x.grad.clone()
    x.grad = None
    model(x).sum().backward()
    assert relative_error(gx, x.grad) < 1e-5


def test_compiled_sparse_training_follows_the_optimiser() -> None:
    check_compiled_sparse_training("cpu", mode=None)


@pytest.mark.parametrize("trace", ["compile", "export"])
def test_a_new_weight_parameter_is_what_tracing_sees(trace: str) -> None:
    """layer.weight = nn.Parameter(...) compresses the new weight at once, so a model compiled
    or exported next computes with it (tracing cannot compress)."""
    torch.manual_seed(34)
    layer = SparseConv2d.from_dense(sparse_conv(4, 8, 3, padding=1)).eval()
    x = torch.randn(2, 4, 8, 8)
    layer(x)
    new = layer.weight.detach() * 3
    new[0] = 0
    layer.weight = nn.Parameter(new)
    traced = (torch.compile(layer, fullgraph=True) if trace == "compile"
              else torch.export.export(layer, (x,)).module())
    assert relative_error(traced(x), reference_conv(x, new, layer.bias, padding=1)) < 1e-5


def test_compile_and_export_need_a_csr() -> None:
    layer = SparseConv2d(3, 4, 3).eval()
    x = torch.randn(1, 3, 5, 5)
    with pytest.raises(Exception, match="no CSR for its weight on cpu yet"):
        torch.compile(layer, fullgraph=True)(x)
    with pytest.raises(Exception, match="no CSR for its weight on cpu yet"):
        torch.export.export(layer, (x,))
    # torch.compile's default mode falls back to the eager forward, which builds the CSR
    # (the compiler does not trace into escoin's host code, which it cannot).
    try:
        assert relative_error(torch.compile(layer)(x),
                              reference_conv(x, layer.weight, layer.bias)) < 1e-5
    finally:
        torch.compiler.reset()  # (the fallback leaves the forward's code marked to run eagerly)


def test_fx_symbolic_trace_keeps_the_layer_a_leaf() -> None:
    """torch.fx.symbolic_trace of a sparsified model calls each SparseConv2d as a module (as it
    does nn.Conv2d), residual and all, and the traced module computes the same."""
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = SparseConv2d.from_dense(sparse_conv(4, 4, 3, padding=1), relu=True)
            self.b = SparseConv2d.from_dense(sparse_conv(4, 4, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x), x)

    block = Block().eval()
    traced = torch.fx.symbolic_trace(block)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["a", "b"]
    x = torch.randn(2, 4, 6, 6)
    assert relative_error(traced(x), block(x)) < 1e-6


def test_a_layer_with_a_csr_gets_one_for_its_moved_weight() -> None:
    # (what lets a model sparsified on one device or dtype be compiled on another)
    layer = SparseConv2d.from_dense(sparse_conv(3, 4, 3, padding=1)).eval()
    for dtype in (torch.bfloat16, torch.float32):
        moved = layer.to(dtype)
        assert list(moved._compressed) == [torch.device("cpu")]
        compiled = torch.compile(moved, fullgraph=True)
        x = torch.randn(2, 3, 6, 6).to(moved.weight.dtype)
        expected = reference_conv(x, moved.weight, moved.bias, padding=1)
        assert relative_error(compiled(x), expected) < tolerance(moved.weight.dtype)
