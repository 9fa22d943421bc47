"""One SparseConv2d called from two threads at once (CPU; CUDA with a stream per thread) gives
exactly what serial calls give: the layer's per-device CSR, the op's filter cache and escoin's
per-filter caches are filled under locks, and nothing else is shared."""
from __future__ import annotations

import copy
import functools
import pickle
import threading
from typing import Callable, List

import pytest
import torch

from torch_helpers import sparse_conv
from escoin_torch import SparseConv2d
from escoin_torch._cache import TensorCache

THREADS = 2
ITERATIONS = 40


def _layer(device: str) -> SparseConv2d:
    conv = sparse_conv(8, 16, 3, density=0.3, stride=2, padding=1, groups=2)
    layer = SparseConv2d(8, 16, 3, stride=2, padding=1, groups=2, relu=True)
    layer.load_state_dict(conv.state_dict())
    return layer.to(device).eval()  # no CSR yet: the threads race to build it


def _inputs(device: str) -> List[List[torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    # Different shapes too, so the threads also fill escoin's per-geometry caches concurrently.
    return [[torch.randn(1 + (i + t) % 3, 8, 9 + i % 4, 11, generator=generator).to(device)
             for i in range(ITERATIONS)] for t in range(THREADS)]


def _run_threads(work: Callable[[int], None]) -> None:
    errors: List[BaseException] = []
    start = threading.Barrier(THREADS)

    def target(index: int) -> None:
        try:
            start.wait()
            work(index)
        except BaseException as error:  # reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=target, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    if errors:
        raise errors[0]


def _check(layer: SparseConv2d, inputs: List[List[torch.Tensor]],
           concurrent: List[List[torch.Tensor]]) -> None:
    fresh = _layer(str(inputs[0][0].device))
    with torch.no_grad():
        for thread_inputs, thread_outputs in zip(inputs, concurrent):
            assert len(thread_outputs) == len(thread_inputs)
            for x, y in zip(thread_inputs, thread_outputs):
                assert torch.equal(y, fresh(x))   # serial, on a layer no thread touched
                assert torch.equal(y, layer(x))   # serial, on the layer the threads shared


def test_two_threads_one_layer_cpu() -> None:
    layer = _layer("cpu")
    inputs = _inputs("cpu")
    outputs: List[List[torch.Tensor]] = [[] for _ in range(THREADS)]

    def work(index: int) -> None:
        with torch.no_grad():
            for x in inputs[index]:
                outputs[index].append(layer(x))

    _run_threads(work)
    _check(layer, inputs, outputs)


def test_two_threads_sparse_training_backward_cpu() -> None:
    """Forward and backward of one sparsely trained layer from two threads: the gradients each
    thread computes equal the serial ones."""
    layer = _layer("cpu").train()
    layer.sparse_training = True
    inputs = [[x.requires_grad_() for x in thread] for thread in _inputs("cpu")]
    grads: List[List[torch.Tensor]] = [[] for _ in range(THREADS)]

    def work(index: int) -> None:
        for x in inputs[index]:
            y = layer(x)
            grads[index].append(torch.autograd.grad(y.square().sum(), (x, layer.weight)))

    _run_threads(work)
    for thread_inputs, thread_grads in zip(inputs, grads):
        for x, concurrent in zip(thread_inputs, thread_grads):
            serial = torch.autograd.grad(layer(x).square().sum(), (x, layer.weight))
            assert all(torch.equal(a, b) for a, b in zip(concurrent, serial))


def test_copies_and_pickles_get_their_own_lock_and_csr() -> None:
    layer = _layer("cpu")
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        expected = layer(x)
        for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert clone._csr_lock is not layer._csr_lock
            assert clone._compressed is not layer._compressed
            assert torch.equal(clone(x), expected)


def test_threads_that_build_the_same_entry_get_the_one_the_cache_keeps() -> None:
    """Two threads miss the op's filter cache together and both build: each must get the value
    the cache keeps. (A thread that kept its own, replaced in the cache by the other's, held the
    only reference to it: on a GPU the filter's device arrays were freed as the call let go of it,
    before its kernel read them, and one run in about 16 of the CUDA test above failed with
    cudaErrorInvalidAddressSpace.)"""
    cache: TensorCache[object] = TensorCache()
    row_ptr, values = torch.arange(5), torch.randn(4)
    both_building = threading.Barrier(THREADS)
    got: List[object] = [None] * THREADS

    def work(index: int) -> None:
        def build() -> object:
            both_building.wait(timeout=10)  # neither thread finds the other's entry
            return object()
        got[index] = cache.get((row_ptr, values), "extra", build)

    _run_threads(work)
    kept = cache.get((row_ptr, values), "extra", lambda: pytest.fail("the entry was lost"))
    assert got[0] is kept and got[1] is kept and len(cache) == 1


@pytest.mark.cuda
def test_two_threads_one_layer_own_streams_cuda() -> None:
    layer = _layer("cuda")
    inputs = _inputs("cuda")
    outputs: List[List[torch.Tensor]] = [[] for _ in range(THREADS)]
    streams = [torch.cuda.Stream() for _ in range(THREADS)]
    torch.cuda.synchronize()  # the inputs exist before any side stream reads them

    def work(index: int) -> None:
        stream = streams[index]
        with torch.no_grad(), torch.cuda.stream(stream):
            assert torch.cuda.current_stream() == stream
            for x in inputs[index]:
                outputs[index].append(layer(x))

    _run_threads(work)
    torch.cuda.synchronize()
    _check(layer, inputs, outputs)


def test_the_cache_holds_about_what_is_alive() -> None:
    """Entries of tensors that died are purged in amortised passes: many short-lived tensors
    (a training step's CSR values) leave at most about twice the live entries behind."""
    cache: TensorCache[object] = TensorCache()
    alive = [torch.randn(2) for _ in range(100)]
    for i, t in enumerate(alive):
        cache.get((t,), i, object)
    for i in range(2000):
        cache.get((torch.randn(2),), i, object)  # the tensor dies at once
    assert len(cache) <= 2 * max(TensorCache.FIRST_PURGE, 2 * len(alive))
    for i, t in enumerate(alive):  # the live ones are still there
        cache.get((t,), i, lambda: pytest.fail("a live entry was purged"))


def test_entries_leave_as_their_tensors_are_freed() -> None:
    """An entry goes as soon as one of its tensors is freed, no later insertion needed; one
    whose value holds the tensor of another entry takes that one along (the second tensor is
    freed while the first entry is dropped), and an entry whose tensors live stays."""
    cache: TensorCache[object] = TensorCache()
    kept, short, inner = torch.arange(3), torch.arange(4), torch.arange(5)
    cache.get((kept,), "kept", object)
    cache.get((inner,), "inner", object)
    # (The value, [inner], alone keeps `inner` alive.)
    cache.get((short,), "outer", functools.partial(list, (inner,)))
    del inner
    assert len(cache) == 3
    del short
    assert len(cache) == 1
    cache.get((kept,), "kept", lambda: pytest.fail("a live entry was dropped"))


def test_an_entry_of_a_group_replaces_the_groups_last() -> None:
    """With one_per, a new entry replaces the last one whose leading tensors are the same (a
    training step's CSR values, the last step's), though its tensors are still alive; other
    groups keep theirs."""
    cache: TensorCache[object] = TensorCache()
    pattern, other = torch.arange(5), torch.arange(6)
    old, new = torch.randn(4), torch.randn(4)
    kept = cache.get((other, old), "extra", object, one_per=1)
    first = cache.get((pattern, old), "extra", object, one_per=1)
    cache.get((pattern, new), "extra", object, one_per=1)
    assert len(cache) == 2
    assert cache.get((pattern, old), "extra", object, one_per=1) is not first  # built again
    assert cache.get((other, old), "extra", object, one_per=1) is kept
