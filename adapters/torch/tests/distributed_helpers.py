"""What the distributed tests run in each process: sparse fine-tuning of a small pruned CNN under
DistributedDataParallel, and the same steps in one process on the full batch.

A module of its own (not the test file) so that ``torch.multiprocessing.spawn`` children import
only this and ``torch_helpers``, both on the ``sys.path`` the parent hands them.
"""
from __future__ import annotations

import gc
import os
import socket
from datetime import timedelta
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import escoin_torch
from torch_helpers import pruned_small_cnn

GLOBAL_BATCH = 8
STEPS = 3
LR = 0.1
MOMENTUM = 0.9


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sparse_model(device: torch.device) -> nn.Module:
    """The pruned SmallCNN with every conv a SparseConv2d trained sparsely (same on every rank:
    seeded, and DDP broadcasts rank 0's parameters anyway)."""
    model, report = escoin_torch.sparsify(pruned_small_cnn(0.7), min_sparsity=0.5)
    assert all(r.path == "sparse" for r in report), report
    for layer in model.modules():
        if isinstance(layer, escoin_torch.SparseConv2d):
            layer.sparse_training = True
    return model.to(device).train()


def batch(step: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The global batch of one step (identical in every process)."""
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 3, 12, 12, generator=generator)
    y = torch.randint(0, 5, (GLOBAL_BATCH,), generator=generator)
    return x.to(device), y.to(device)


def masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: (m.weight != 0).cpu() for name, m in model.named_modules()
            if isinstance(m, escoin_torch.SparseConv2d)}


def train(model: nn.Module, trained: nn.Module, device: torch.device, rank: int = 0,
          world_size: int = 1) -> None:
    """STEPS SGD steps; ``model`` is what is called (the DDP wrapper or the plain model) and
    ``trained`` owns the parameters. Each rank takes its contiguous share of the global batch."""
    optimizer = torch.optim.SGD(trained.parameters(), lr=LR, momentum=MOMENTUM)
    share = GLOBAL_BATCH // world_size
    for step in range(STEPS):
        x, y = batch(step, device)
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        loss = F.cross_entropy(model(x), y)  # mean over the share; DDP averages over ranks
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def single_process_run(device: torch.device) -> Dict[str, object]:
    """The reference: the same steps in one process on the full batch."""
    model = sparse_model(device)
    before = masks(model)
    train(model, model, device)
    return {"state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "masks_before": before, "masks_after": masks(model)}


def ddp_worker(rank: int, world_size: int, port: int, backend: str, out_path: str) -> None:
    """One rank: DDP sparse fine-tuning, then every rank's parameters and masks all-gathered;
    rank 0 saves them to ``out_path``."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if backend == "nccl":
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # forced, whatever the caller's environment says
        torch.cuda.set_device(rank)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        device = torch.device("cuda", rank)
    else:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    try:
        model = sparse_model(device)
        before = masks(model)
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[rank] if device.type == "cuda" else None)
        train(ddp, model, device, rank, world_size)
        names = list(model.state_dict())
        flat = torch.cat([v.detach().reshape(-1).double() for v in model.state_dict().values()])
        mask = torch.cat([m.reshape(-1).double() for m in masks(model).values()]).to(device)
        gathered_flat: List[torch.Tensor] = [torch.empty_like(flat) for _ in range(world_size)]
        gathered_mask: List[torch.Tensor] = [torch.empty_like(mask) for _ in range(world_size)]
        dist.all_gather(gathered_flat, flat)
        dist.all_gather(gathered_mask, mask)
        if rank == 0:
            torch.save({"names": names,
                        "state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                        "flat": [t.cpu() for t in gathered_flat],
                        "mask": [t.cpu() for t in gathered_mask],
                        "masks_before": before, "masks_after": masks(model)}, out_path)
        dist.barrier()
        del ddp
    finally:
        # What still holds the process group is collected now, while the process is whole, and
        # the gloo backend goes with destroy_process_group. Left to the interpreter's exit, gloo's
        # threads aborted a rank ("terminate called without an active exception") in 3 of 57 runs
        # on a 2-core machine, 1 of 21 with `del ddp` alone (so some of it sits in reference
        # cycles), none of 110 with the collection (80 of the worker alone, 30 of the test).
        gc.collect()
        dist.destroy_process_group()
