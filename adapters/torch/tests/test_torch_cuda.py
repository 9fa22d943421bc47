"""The CUDA kernel: results, streams, channels_last, CUDA graphs, torch.compile, dtype errors."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from escoin.cuda_arrays import DeviceBuffer

from torch_helpers import (SeenOps, check_compiled_sparse_training, check_refresh_csrs,
                           check_release_geometries, check_training_steps_keep_the_pattern,
                           count_calls, pruned_small_cnn, reference_conv, relative_error,
                           sparse_conv, strict_fp32_cudnn)
import escoin_torch
from escoin_torch import SparseConv2d, calibrate, sparse_conv2d, sparsify
from escoin_torch.timing import GRAPH_CALLS, time_call
from escoin_torch import csr as csr_lib

pytestmark = pytest.mark.cuda


def _layer() -> SparseConv2d:
    return SparseConv2d.from_dense(sparse_conv(8, 16, 3, stride=2, padding=1, groups=2)).cuda()


def test_matches_conv2d_cuda() -> None:
    layer = _layer().eval()
    x = torch.randn(4, 8, 17, 15, device="cuda")
    y = layer(x)
    assert y.device == x.device
    assert relative_error(y, reference_conv(x, layer.weight, layer.bias, stride=2, padding=1,
                                            groups=2)) < 1e-5


def test_hypothesis_geometries_cuda() -> None:
    from test_torch_ops import check_against_reference, geometries
    from hypothesis import given, settings

    @settings(max_examples=60, deadline=None)
    @given(geometries())
    def run(g: dict) -> None:
        if g["dtype"] != torch.float64:  # float64 runs on the CPU only
            check_against_reference(g, "cuda")

    run()


def test_side_stream_and_channels_last() -> None:
    layer = _layer().eval()
    x = torch.randn(2, 8, 12, 12, device="cuda").contiguous(memory_format=torch.channels_last)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = layer(x)
    torch.cuda.current_stream().wait_stream(stream)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(y, reference_conv(x, layer.weight, layer.bias, stride=2, padding=1,
                                            groups=2)) < 1e-5


def test_cuda_graph_capture_and_replay() -> None:
    layer = _layer().eval()
    static_x = torch.randn(2, 8, 16, 16, device="cuda")
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer(static_x)  # warm-up: CSR, filter upload and stretched offsets exist
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.cuda.synchronize()
        assert relative_error(static_y, reference_conv(static_x, layer.weight, layer.bias,
                                                       stride=2, padding=1, groups=2)) < 1e-5


def test_calibrate_in_cuda_graphs() -> None:
    """calibrate(graphs=True) times each path inside CUDA graphs: every layer gets a path, the
    model's output is unchanged, and the model still runs eagerly and captured afterwards."""
    model, _ = sparsify(pruned_small_cnn(0.9).cuda().eval())
    x = torch.randn(2, 3, 16, 16, device="cuda")
    with torch.no_grad():
        expected = model(x)
        results = calibrate(model, x, repeats=3, warmup=1, graphs=True)
        assert [r.name for r in results] == ["features.0", "features.2", "features.4",
                                             "features.6"]
        layers = dict(model.named_modules())
        for r in results:
            assert r.sparse_ms > 0 and r.dense_ms > 0
            assert layers[r.name].inference_path == r.path
        assert relative_error(model(x), expected) < 1e-5


def test_time_call_in_a_graph_counts_each_call() -> None:
    """A graph of GRAPH_CALLS calls of a fixed-length kernel: the time per call is the eager
    kernel's time to within a factor that launch overhead cannot explain away (a graph's time
    not divided by its call count would be GRAPH_CALLS times larger)."""
    a = torch.randn(2048, 2048, device="cuda")
    eager = time_call(lambda: a @ a, a.device, repeats=5, warmup=2)
    graphed = time_call(lambda: a @ a, a.device, repeats=5, warmup=2, graphs=True)
    assert graphed < eager * GRAPH_CALLS / 3


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compile_fullgraph_cuda(mode: str) -> None:
    model, _ = sparsify(pruned_small_cnn().cuda().eval())
    x = torch.randn(2, 3, 16, 16, device="cuda")
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True, mode=mode)
        for _ in range(3):
            y = compiled(x)
    assert relative_error(y, expected) < 1e-5


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_sparse_training_cuda(mode: str) -> None:
    check_compiled_sparse_training("cuda", mode)


def test_backward_cuda() -> None:
    """The weight gradient is one dense cuDNN call, which follows PyTorch's TF32 setting (TF32
    allowed by default, ~1e-3 relative error): checked against float64 with TF32 off."""
    layer = SparseConv2d.from_dense(sparse_conv(4, 6, 3, padding=1), sparse_training=True)
    layer = layer.cuda().train()
    x = torch.randn(2, 4, 9, 9, device="cuda", requires_grad=True)
    with strict_fp32_cudnn():
        layer(x).square().sum().backward()
    x_ref = x.detach().double().cpu().requires_grad_()
    w_ref = layer.weight.detach().double().cpu().requires_grad_()
    torch.nn.functional.conv2d(x_ref, w_ref, layer.bias.detach().double().cpu(),
                               padding=1).square().sum().backward()
    mask = (layer.weight != 0).cpu()
    assert relative_error(x.grad, x_ref.grad) < 1e-5
    assert relative_error(layer.weight.grad.cpu()[mask], w_ref.grad[mask]) < 1e-5


def test_opcheck_cuda() -> None:
    layer = _layer()
    csr = layer.refresh_csr()
    x = torch.randn(2, 8, 10, 10, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.escoin.sparse_conv2d.default,
                          (x, csr.row_ptr, csr.col_idx, csr.values.clone().requires_grad_(),
                           list(csr.shape), layer.bias.detach().clone().requires_grad_(),
                           [2, 2], [1, 1], [1, 1], csr.groups, True))


def test_autocast_on_cuda_runs_the_layer_in_float32() -> None:
    """A converted network under torch.autocast: the dense layers run in float16, the sparse
    one gets their float16 activation cast to float32 and returns float32."""
    layer = _layer().eval()
    x = torch.randn(4, 8, 17, 15, device="cuda").half()
    with torch.autocast("cuda", dtype=torch.float16):
        y = layer(x)
    assert y.dtype == torch.float32
    assert relative_error(y, reference_conv(x, layer.weight, layer.bias, stride=2, padding=1,
                                            groups=2)) < 1e-5


def test_float64_on_cuda_is_a_clear_error() -> None:
    weight = sparse_conv(3, 4, 3).weight.detach().double().cuda()
    with pytest.raises(TypeError, match="on cuda escoin computes in torch.float32"):
        sparse_conv2d(torch.randn(1, 3, 5, 5, device="cuda", dtype=torch.float64),
                      csr_lib.from_dense(weight))


def test_device_mismatch_is_a_clear_error() -> None:
    csr = csr_lib.from_dense(sparse_conv(3, 4, 3).weight.detach())
    with pytest.raises(ValueError, match="x is on cuda"):
        sparse_conv2d(torch.randn(1, 3, 5, 5, device="cuda"), csr)


def test_plain_inference_calls_skip_the_dispatch_and_modes_still_see_the_op(monkeypatch) -> None:
    """Under no_grad a CUDA call runs the kernel function directly (the op's dispatch costs ~50 us
    of host time a call); with a gradient to record, under a dispatch mode or a profiler (whose
    trace names the op), it goes through the op. Every way gives the same result."""
    from escoin_torch import ops

    direct_calls = count_calls(monkeypatch, ops, "_cuda_kernel")

    layer = _layer().eval()
    x = torch.randn(4, 8, 17, 15, device="cuda")
    expected = reference_conv(x, layer.weight, layer.bias, stride=2, padding=1, groups=2)
    with torch.no_grad():
        plain = layer(x)
    assert len(direct_calls) == 1
    with torch.no_grad(), SeenOps() as mode:
        seen = layer(x)
    assert len(direct_calls) == 1 and any("escoin.sparse_conv2d" in n for n in mode.names)
    with torch.no_grad(), torch.profiler.profile() as profiler:
        profiled = layer(x)
    assert len(direct_calls) == 1
    assert any("escoin::sparse_conv2d" in event.name for event in profiler.events())
    recorded = layer(x.requires_grad_())
    assert len(direct_calls) == 1 and recorded.grad_fn is not None
    for y in (plain, seen, profiled, recorded):
        assert relative_error(y, expected) < 1e-5


@pytest.mark.parametrize("batch", [1, 8])
def test_residual_added_in_the_kernel(batch: int) -> None:
    """relu(conv(x) + residual) on CUDA: the direct inference call and the op with a gradient
    (whose residual gradient is the output's through the ReLU), against F.conv2d."""
    torch.manual_seed(batch)
    layer = SparseConv2d.from_dense(sparse_conv(32, 64, 3, padding=1), relu=True).cuda().eval()
    x = torch.randn(batch, 32, 14, 14, device="cuda")
    residual = torch.randn(batch, 64, 14, 14, device="cuda", requires_grad=True)
    expected = torch.relu(reference_conv(x, layer.weight, layer.bias, padding=1)
                          + residual.detach().double().cpu())
    with torch.no_grad():
        assert relative_error(layer(x, residual.detach()), expected) < 1e-5
    y = layer(x.requires_grad_(), residual)
    assert relative_error(y, expected) < 1e-5
    y.backward(torch.ones_like(y))
    assert torch.equal(residual.grad, (y > 0).float())


def test_network_benchmark_on_cuda(tmp_path) -> None:
    """The whole-network benchmark's GPU paths, float16 among them, each checked against float64
    in both timing modes."""
    import json
    from escoin_torch.bench import main

    assert main(["--nets", "lenet5", "--batches", "1", "2", "--device", "cuda", "--repeats", "2",
                 "--warmup", "1", "--out", str(tmp_path)]) == 0
    for run in json.loads((tmp_path / "networks.json").read_text())["runs"]:
        assert run["passed"]
        assert 0 < run["escoin_rel_error"] <= run["rtol"]
        # 16-bit rounding shows: the float16 path really ran in float16
        assert run["rtol"] < run["escoin_half_rel_error"] <= run["half_rtol"]
        names = [(p["path"], p["graphs"]) for p in run["paths"]]
        paths = ["dense fp32 strict", "dense tf32", "dense fp16", "escoin fp32",
                 "escoin calibrated", "escoin fp16"]
        assert names == [(p, graphs) for graphs in (False, True) for p in paths]


def test_release_geometries_cuda() -> None:
    check_release_geometries("cuda")


def test_training_steps_keep_the_pattern_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    with strict_fp32_cudnn():
        check_training_steps_keep_the_pattern(monkeypatch, "cuda")


def test_reentrant_checkpointing_makes_no_host_filters_cuda(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Reentrant checkpointing runs each step's forward first under no_grad, the layers in
    training mode: that pass computes with the step's values on the device, as the step's
    training calls do, and makes no filter of host values (each was a synchronisation a layer
    and step); the checkpointed steps still match float64."""
    import escoin
    from torch.utils.checkpoint import checkpoint

    model = torch.nn.Sequential(
        SparseConv2d.from_dense(sparse_conv(8, 16, 3, padding=1), sparse_training=True),
        torch.nn.ReLU(),
        SparseConv2d.from_dense(sparse_conv(16, 8, 3, padding=1), sparse_training=True))
    model = model.cuda().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(2, 8, 10, 10, device="cuda", requires_grad=True)

    def step() -> None:
        optimizer.zero_grad()
        y = checkpoint(model, x, use_reentrant=True)
        with torch.no_grad():
            w0, w1 = (model[i].weight.double() for i in (0, 2))
            y64 = F.conv2d(F.relu(F.conv2d(x.double(), w0, model[0].bias.double(), padding=1)),
                           w1, model[2].bias.double(), padding=1)
        assert relative_error(y, y64) < 1e-5
        y.square().mean().backward()
        optimizer.step()
        escoin_torch.refresh_csrs(model)

    with strict_fp32_cudnn():
        step()  # the patterns' first filters
        host_copies = count_calls(monkeypatch, escoin.SparseFilter, "with_values")
        for _ in range(3):
            step()
    assert not host_copies


def test_a_captured_training_step_trains_on_each_replays_weights() -> None:
    """A whole training step captured in a CUDA graph (forward, backward, optimiser step), as
    torch.cuda.graph's whole-network recipe does it: every replay updates the weights in place,
    unseen by their version counters, and each replay's forward must compute with the weights
    the previous replay left (not with the values the layers held at capture)."""
    model = torch.nn.Sequential(
        SparseConv2d.from_dense(sparse_conv(8, 16, 3, padding=1), sparse_training=True),
        torch.nn.ReLU(),
        SparseConv2d.from_dense(sparse_conv(16, 8, 3, padding=1), sparse_training=True))
    model = model.cuda().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)  # (at 0.5 the loss diverges)
    x = torch.randn(2, 8, 10, 10, device="cuda")
    target = torch.randn(2, 8, 10, 10, device="cuda")

    def step() -> torch.Tensor:
        y = model(x)
        F.mse_loss(y, target).backward()
        optimizer.step()
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the patterns' filters, the optimiser's state
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            step()
            escoin_torch.refresh_csrs(model)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        y = step()
    for _ in range(3):
        w0, b0, w1, b1 = (t.detach().double().clone() for t in (
            model[0].weight, model[0].bias, model[2].weight, model[2].bias))
        graph.replay()
        torch.cuda.synchronize()
        expected = F.conv2d(F.relu(F.conv2d(x.double(), w0, b0, padding=1)), w1, b1, padding=1)
        assert relative_error(y, expected) < 1e-5
    assert not torch.equal(model[0].weight.double(), w0)  # the replays did train


def test_refresh_csrs_checks_every_layer_at_once_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    check_refresh_csrs(monkeypatch, "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_training_steps_keep_what_they_hold_bounded(dtype: torch.dtype) -> None:
    """Each step's filters compute with that step's values on the device; the op's caches, the
    C++ kernel's remembered calls and the device memory the filters hold stay as they were after
    the first steps, however many steps follow (a filter holding its values, or a call holding
    its filter, would keep every step's)."""
    from escoin_torch import ops

    layer = SparseConv2d.from_dense(sparse_conv(8, 32, 3, padding=1), sparse_training=True)
    layer = layer.to("cuda", dtype).train()
    optimizer = torch.optim.SGD(layer.parameters(), lr=1e-3)
    x = torch.randn(4, 8, 12, 12, device="cuda", dtype=dtype)

    def steps(count: int) -> tuple:
        for _ in range(count):
            optimizer.zero_grad()
            layer(x).square().mean().backward()
            optimizer.step()
        torch.cuda.synchronize()
        gc.collect()
        remembered = ops._native.stats()["remembered"] if ops._native is not None else 0
        # escoin's own device memory (programs, uploaded arrays) is in its DeviceBuffers
        buffers = sum(isinstance(o, DeviceBuffer) for o in gc.get_objects())
        trained = ops._native.training_stats() if ops._native_trains else {}
        return (len(ops._filters), remembered, trained.get("patterns"),
                trained.get("transpositions"), buffers, torch.cuda.memory_allocated())

    # Other tests' entries go first (a purge of their dead ones during the steps would free
    # their buffers), and their remembered calls with them.
    for cache in (ops._filters, ops._transposes, ops._patterns, ops._transpositions):
        cache.clear()
    escoin_torch.release_geometries()
    held = steps(3)
    assert steps(12) == held


def test_training_calls_on_two_streams_match_float64() -> None:
    """A training step's filter computes with device values through a program written on the
    stream of its first call; calls on another stream get their own (a call is bound to the
    stream its program was written on), with and without gradients. (The Python path's filters:
    the C++ training path, which would take the calls with gradients, is switched off; its own
    streams are test_torch_native_training's.)"""
    from escoin_torch import ops

    native = escoin_torch.set_native_training(False)
    try:
        _check_training_calls_on_two_streams(ops)
    finally:
        escoin_torch.set_native_training(native)


def _check_training_calls_on_two_streams(ops: object) -> None:
    layer = SparseConv2d.from_dense(sparse_conv(8, 32, 3, padding=1), sparse_training=True)
    layer = layer.cuda().train()
    optimizer = torch.optim.SGD(layer.parameters(), lr=1e-2)
    x = torch.randn(4, 8, 12, 12, device="cuda")
    layer(x).square().mean().backward()
    optimizer.step()
    escoin_torch.refresh_csrs(layer)
    expected = reference_conv(x, layer.weight, layer.bias, padding=1)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outputs = []
    for grad in (True, False):
        for stream in streams:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.set_grad_enabled(grad):
                outputs.append(layer(x))
            torch.cuda.current_stream().wait_stream(stream)
    for y in outputs:
        assert relative_error(y, expected) < 1e-5
    launches = ops.filter_of(layer.csr).launches
    assert sorted(call.stream for call in launches.values()) == sorted(
        s.cuda_stream for s in streams)
