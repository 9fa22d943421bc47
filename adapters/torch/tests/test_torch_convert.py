"""sparsify (prune-mask folding, hooks, thresholds, report) and calibrate."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_helpers import SmallCNN, pruned_small_cnn, relative_error, sparse_conv
from escoin_torch import SparseConv2d, calibrate, sparsify
from escoin_torch.timing import time_call


def test_sparsify_folds_prune_masks() -> None:
    model = pruned_small_cnn(0.7)
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    converted, report = sparsify(model.eval())
    assert [r.path for r in report] == ["sparse"] * 4
    assert all(abs(r.density - 0.3) < 0.05 for r in report)
    assert report[0].name == "features.0" and report[0].shape == (8, 3, 3, 3)
    for module in converted.modules():
        if isinstance(module, nn.Conv2d):
            assert type(module) is SparseConv2d and not hasattr(module, "weight_orig")
            assert isinstance(module.weight, nn.Parameter) and not module._forward_pre_hooks
    assert not any(k.endswith(("_orig", "_mask")) for k in converted.state_dict())
    assert relative_error(converted(x), expected) < 1e-5
    assert hasattr(model.features[0], "weight_orig")  # not inplace: the input model is intact
    plain = SmallCNN()
    plain.load_state_dict(converted.state_dict())
    assert relative_error(plain.eval()(x), expected) < 1e-5


def test_fold_uses_current_orig() -> None:
    model = pruned_small_cnn(0.5)
    with torch.no_grad():  # after a training step, before the next forward
        model.features[0].weight_orig.mul_(2)
    converted, _ = sparsify(model)
    folded = model.features[0].weight_orig * model.features[0].weight_mask
    assert torch.equal(converted.features[0].weight, folded)


def test_thresholds_filter_and_padding_mode() -> None:
    model = nn.Sequential(sparse_conv(3, 4, 3, density=0.3), sparse_conv(4, 4, 3, density=0.9),
                          nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                          sparse_conv(4, 4, 1, density=0.2))
    with torch.no_grad():
        model[2].weight.mul_(model[2].weight.abs() > 0.3)
    converted, report = sparsify(model, min_sparsity=0.5, filter_fn=lambda name, m: name != "3")
    paths = {r.name: (r.path, r.reason) for r in report}
    assert paths["0"][0] == "sparse"
    assert paths["1"][0] == "dense" and "min_sparsity" in paths["1"][1]
    assert paths["2"][0] == "dense" and "padding_mode" in paths["2"][1]
    assert paths["3"] == ("dense", "rejected by filter_fn")
    assert [type(m) for m in converted] == [SparseConv2d, nn.Conv2d, nn.Conv2d, nn.Conv2d]


@pytest.mark.filterwarnings("ignore:.*is deprecated in favor of:FutureWarning")
def test_weights_computed_by_norm_hooks_stay_dense() -> None:
    """weight_norm and spectral_norm (the hook forms) compute the weight at each forward from
    other parameters: such a layer stays dense, its report says why, and the model still runs
    as before."""
    model = nn.Sequential(nn.utils.weight_norm(sparse_conv(3, 4, 3, density=0.2)),
                          nn.utils.spectral_norm(sparse_conv(4, 4, 3, density=0.2))).eval()
    x = torch.randn(1, 3, 8, 8)  # (eval: spectral_norm's power iteration stands still)
    with torch.no_grad():
        expected = model(x)
    converted, report = sparsify(model)
    assert [r.path for r in report] == ["dense", "dense"]
    assert all("pre-hook" in r.reason for r in report)
    with torch.no_grad():
        assert relative_error(converted(x), expected) < 1e-5


def test_hooks_inplace_shared_and_device_kept() -> None:
    shared = sparse_conv(3, 3, 3, padding=1)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    seen = []
    handle = shared.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    converted, report = sparsify(model, inplace=True)
    assert converted is model and len(report) == 1
    assert model[0] is model[2] and type(model[0]) is SparseConv2d
    assert model[0].weight is shared.weight and model[0].weight.device == shared.weight.device
    model.eval()(torch.randn(1, 3, 5, 5))
    assert len(seen) == 2
    handle.remove()  # the caller's handle removes the hook from the new layer
    model(torch.randn(1, 3, 5, 5))
    assert len(seen) == 2 and not model[0]._forward_hooks


def test_a_pruned_convs_hooks_keep_their_handles_and_lose_pruning() -> None:
    """sparsify folds a prune reparametrisation (its pre-hook goes) and keeps the user's hooks,
    which their handles still remove; the converted layer computes the pruned weight."""
    from torch.nn.utils import prune

    conv = nn.Conv2d(3, 4, 3, padding=1)
    prune.l1_unstructured(conv, "weight", amount=0.8)
    calls = []
    pre = conv.register_forward_pre_hook(lambda m, a: calls.append("pre"))
    post = conv.register_forward_hook(lambda m, a, o: calls.append("post"))
    model = nn.Sequential(conv)
    x = torch.randn(1, 3, 6, 6)
    want = F.conv2d(x, conv.weight.detach(), conv.bias.detach(), padding=1)
    sparsify(model, inplace=True)
    layer = model[0]
    assert type(layer) is SparseConv2d
    assert not any(isinstance(h, prune.BasePruningMethod)
                   for h in layer._forward_pre_hooks.values())
    assert relative_error(layer.eval()(x), want) < 1e-5 and calls == ["pre", "post"]
    pre.remove()
    post.remove()
    layer(x)
    assert calls == ["pre", "post"]


@pytest.mark.parametrize("same_mask", [True, False])
def test_a_tied_pruned_weight_stays_tied_where_the_masks_agree(same_mask: bool) -> None:
    """Two convs sharing one weight, each pruned by a mask: where the masks agree the converted
    layers share one folded Parameter and fine-tune as the pruned model does; where they
    differ a warning says each layer trains its own."""
    from torch.nn.utils import prune

    torch.manual_seed(35)
    shared = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(shared, nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    model[2].weight = shared.weight  # tied
    mask = (torch.rand(shared.weight.shape) < 0.2).float()
    prune.custom_from_mask(model[0], "weight", mask)
    prune.custom_from_mask(model[2], "weight",
                           mask if same_mask else (torch.rand(mask.shape) < 0.2).float())
    if not same_mask:
        with pytest.warns(RuntimeWarning, match="under another mask"):
            converted, _ = sparsify(model)
        assert converted[0].weight is not converted[2].weight
        return
    converted, _ = sparsify(model)
    assert converted[0].weight is converted[2].weight
    assert len(list(converted.parameters())) == len(list(model.parameters()))
    x = torch.randn(2, 4, 6, 6)
    for net in (model, converted):
        net.train()
        for layer in net.modules():
            if isinstance(layer, SparseConv2d):
                layer.sparse_training = True
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(2):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    assert relative_error(converted.eval()(x), model.eval()(x)) < 1e-5


def test_sparsify_single_conv_model() -> None:
    conv = sparse_conv(3, 4, 3)
    converted, report = sparsify(conv)
    assert type(converted) is SparseConv2d and report[0].name == ""


@pytest.mark.parametrize("have_tqdm", [True, False])
def test_calibrate(have_tqdm: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not have_tqdm:
        monkeypatch.setitem(sys.modules, "tqdm", None)
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    model, _ = sparsify(pruned_small_cnn(0.8).eval())
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    results = calibrate(model, x, repeats=3, warmup=1)
    assert [r.name for r in results] == ["features.0", "features.2", "features.4", "features.6"]
    layers = dict(model.named_modules())
    for r in results:
        assert r.sparse_ms > 0 and r.dense_ms > 0
        assert r.path == ("sparse" if r.sparse_ms <= r.dense_ms else "dense")
        assert layers[r.name].inference_path == r.path
    assert relative_error(model(x), expected) < 1e-5


def test_calibrate_leaves_a_training_model_as_it_was() -> None:
    """calibrate on a model in train mode runs its example forward as eval mode would (it
    updated BatchNorm's running statistics, and the layers got their training inputs) and
    leaves every module's mode as it was."""
    model = nn.Sequential(sparse_conv(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Dropout(0.5), sparse_conv(8, 4, 3, padding=1))
    model, _ = sparsify(model)
    model[3].eval()  # one module's own mode, kept too
    bn_state = {k: v.clone() for k, v in model[1].state_dict().items()}
    calibrate(model, torch.randn(2, 3, 9, 9), repeats=1, warmup=0)
    assert all(torch.equal(v, bn_state[k]) for k, v in model[1].state_dict().items())
    assert [m.training for m in model] == [True, True, True, False, True]


def test_timing_arguments_are_named() -> None:
    model, _ = sparsify(pruned_small_cnn(0.8).eval())
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        calibrate(model, torch.randn(1, 3, 16, 16), repeats=0)
    with pytest.raises(ValueError, match="warmup must be >= 0, got -1"):
        time_call(lambda: None, torch.device("cpu"), warmup=-1)


def test_calibrate_in_graphs_needs_cuda() -> None:
    model, _ = sparsify(pruned_small_cnn(0.8).eval())
    with pytest.raises(ValueError, match="example_input must be on a CUDA device"):
        calibrate(model, torch.randn(1, 3, 16, 16), repeats=1, warmup=0, graphs=True)
    with pytest.raises(ValueError, match="graphs=True times CUDA graphs, but the device is cpu"):
        time_call(lambda: None, torch.device("cpu"), graphs=True)


def test_calibrate_times_a_layer_with_the_residual_it_is_given(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer that fuse_for_inference gave the residual add is timed with that residual (its
    dense path then pays the add, as in the model): each layer gets the tensors the model passes
    it, the residual where there is one."""
    from escoin_torch import convert, fuse_for_inference

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = sparse_conv(8, 8, 3, padding=1)
            self.conv2 = sparse_conv(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)

    model, _ = sparsify(Residual().eval(), min_sparsity=0.5)
    fused = fuse_for_inference(model)
    x = torch.randn(2, 8, 12, 12)
    seen = {}
    timed = convert.time_paths

    def recording(layer, x, repeats, warmup, graphs, residual=None):
        seen[layer] = (tuple(x.shape), None if residual is None else tuple(residual.shape))
        return timed(layer, x, repeats, warmup, graphs, residual)
    monkeypatch.setattr(convert, "time_paths", recording)
    expected = fused(x)
    calibrate(fused, x, repeats=2, warmup=1)
    layers = dict(fused.named_modules())
    assert seen[layers["conv1"]] == ((2, 8, 12, 12), None)
    assert seen[layers["conv2"]] == ((2, 8, 12, 12), (2, 8, 12, 12))
    assert relative_error(fused(x), expected) < 1e-5


def test_time_call_back_to_back() -> None:
    """Each of `repeats` samples runs `back_to_back` calls, after `warmup` untimed ones, and the
    time is per call."""
    calls = []
    seconds = time_call(lambda: calls.append(1), torch.device("cpu"), repeats=3, warmup=2,
                        back_to_back=4)
    assert len(calls) == 2 + 3 * 4 and seconds >= 0
    with pytest.raises(ValueError, match="back_to_back must be >= 1"):
        time_call(lambda: None, torch.device("cpu"), back_to_back=0)
