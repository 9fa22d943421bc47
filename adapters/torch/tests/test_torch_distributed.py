"""DistributedDataParallel with sparse fine-tuning (SparseConv2d, sparse_training=True): two
processes end with identical weights and masks, equal to one process on the full batch, and the
pruned zeros stay zero. Gloo on the CPU runs everywhere; NCCL needs two GPUs."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_helpers as helpers

WORLD_SIZE = 2


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    scale = torch.linalg.vector_norm(expected).item()
    return torch.linalg.vector_norm(actual - expected).item() / max(scale, 1e-30)


def _run_ddp(backend: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> dict:
    # Children inherit the environment: one OpenMP thread each (2 ranks on few cores), and
    # NVLink multicast off for NCCL, forced even if the caller set it.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    out_path = str(tmp_path / f"ddp_{backend}.pt")
    mp.spawn(helpers.ddp_worker, args=(WORLD_SIZE, helpers.free_port(), backend, out_path),
             nprocs=WORLD_SIZE, join=True)
    return torch.load(out_path)


def _check(result: dict, reference: dict, rtol: float) -> None:
    # Every rank holds the same weights and masks, bit for bit.
    for rank in range(1, WORLD_SIZE):
        assert torch.equal(result["flat"][rank], result["flat"][0]), f"rank {rank} diverged"
        assert torch.equal(result["mask"][rank], result["mask"][0]), f"rank {rank} mask differs"
    # Training moved the weights, and they match one process on the full batch.
    moved = False
    for name, expected in reference["state"].items():
        actual = result["state"][name]
        error = _relative(actual, expected)
        assert error <= rtol, f"{name}: relative error {error:.3e} > {rtol}"
        moved |= not torch.equal(actual, helpers.sparse_model(torch.device("cpu"))
                                 .state_dict()[name])
    assert moved
    # The sparsity pattern is exactly the pruned one, in DDP and in the reference.
    for name, before in result["masks_before"].items():
        assert torch.equal(result["masks_after"][name], before), f"{name}: zeros filled in"
        assert torch.equal(reference["masks_after"][name], before)
        assert torch.equal(reference["masks_before"][name], before)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_gloo_cpu_matches_single_process(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _run_ddp("gloo", tmp_path, monkeypatch)
    reference = helpers.single_process_run(torch.device("cpu"))
    _check(result, reference, rtol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.skipif(not dist.is_available() or not dist.is_nccl_available(),
                    reason="torch.distributed with NCCL is not available")
def test_ddp_nccl_matches_single_gpu(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _run_ddp("nccl", tmp_path, monkeypatch)
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        reference = helpers.single_process_run(torch.device("cuda", 0))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    # cuDNN picks its algorithms per batch size, so the half batches round differently.
    _check(result, reference, rtol=1e-5)
