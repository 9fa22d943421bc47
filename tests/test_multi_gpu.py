"""escoin on two GPUs: every call runs on its input's device (whatever the caller's current device)
and leaves the caller's current device as it was; one filter serves several devices (its CSR is
uploaded once per device); a filter pinned to one device refuses input on another."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import escoin
from escoin import EscoinError
from escoin.testing import conv2d_reference, relative_error

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(escoin.cuda_device_count() < 2 or torch.cuda.device_count() < 2,
                       reason="needs 2 CUDA devices"),
]


def _case(seed: int = 3):
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((8, 4, 3, 3)) * (rng.random((8, 4, 3, 3)) < 0.3))
    x = rng.standard_normal((3, 4, 11, 9))
    bias = rng.standard_normal(8)
    expected = conv2d_reference(x, weight, bias, (1, 1), (1, 1, 1, 1), (1, 1), 1, relu=True)
    return weight.astype(np.float32), x.astype(np.float32), bias.astype(np.float32), expected


def test_runs_on_the_input_device_and_restores_the_current_one() -> None:
    weight, x, bias, expected = _case()
    filt = escoin.SparseFilter.from_dense(weight)
    for current, target in ((0, 1), (1, 0)):
        with torch.cuda.device(current):
            xs = torch.from_numpy(x).to(f"cuda:{target}")
            bs = torch.from_numpy(bias).to(f"cuda:{target}")
            out = torch.empty(3, 8, 11, 9, device=f"cuda:{target}")
            stream = torch.cuda.Stream(device=target)
            stream.wait_stream(torch.cuda.current_stream(target))
            escoin.conv2d(xs, filt, bias=bs, padding=1, relu=True, out=out, stream=stream)
            assert torch.cuda.current_device() == current
            returned = escoin.conv2d(xs, filt, bias=bs, padding=1, relu=True)
            assert returned.device == target and torch.cuda.current_device() == current
            stream.synchronize()
            assert relative_error(out.cpu().numpy(), expected) <= 1e-5
            assert relative_error(returned.numpy(), expected) <= 1e-5
    # one upload per device, shared by the calls
    assert set(filt._store.device_values) == set(filt._store.pattern.device_row_ptr) == {0, 1}


def test_pinned_filter_refuses_input_on_another_device() -> None:
    weight, x, _, _ = _case()
    filt = escoin.SparseFilter.from_dense(weight).cuda(0)
    with pytest.raises(EscoinError, match=r"filter lives on cuda:0 but x is on cuda:1"):
        escoin.conv2d(torch.from_numpy(x).to("cuda:1"), filt, padding=1)
    assert filt.device == "cuda:0" and filt.cuda(1).device == "cuda:1"


def test_out_workspace_and_bias_on_another_device_are_refused() -> None:
    weight, x, bias, _ = _case()
    filt = escoin.SparseFilter.from_dense(weight)
    xs = torch.from_numpy(x).to("cuda:1")
    with pytest.raises(EscoinError, match="out is on cuda:0 but x is on cuda:1"):
        escoin.conv2d(xs, filt, padding=1, out=torch.empty(3, 8, 11, 9, device="cuda:0"))
    with pytest.raises(EscoinError, match="bias is on cuda:0 but x is on cuda:1"):
        escoin.conv2d(xs, filt, padding=1, bias=torch.from_numpy(bias).to("cuda:0"))
    nbytes = escoin.workspace_size(x.shape, filt, padding=1)
    with pytest.raises(EscoinError, match="workspace must be a contiguous CUDA array on cuda:1"):
        escoin.conv2d(xs, filt, padding=1,
                      workspace=torch.empty(nbytes, dtype=torch.uint8, device="cuda:0"))


def test_one_filter_two_devices_two_threads() -> None:
    """Two threads, one per device, share one unpinned filter: its per-device uploads and
    per-geometry offsets are built concurrently and every result is right."""
    weight, x, bias, expected = _case(5)
    filt = escoin.SparseFilter.from_dense(weight)
    errors = []

    def work(device: int) -> None:
        try:
            xs = torch.from_numpy(x).to(f"cuda:{device}")
            bs = torch.from_numpy(bias).to(f"cuda:{device}")
            for _ in range(20):
                y = escoin.conv2d(xs, filt, bias=bs, padding=1, relu=True)
                assert relative_error(y.numpy(), expected) <= 1e-5
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(d,)) for d in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
