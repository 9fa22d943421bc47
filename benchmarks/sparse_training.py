"""What a training step costs when a pruned network trains sparse (``sparse_training=True``:
escoin's op forward and for the input gradient, only the stored nonzeros updated) against the
same network training dense, and how much of the sparse step is the host rebuilding escoin's
filters after each optimiser step.

    python3 benchmarks/sparse_training.py [--net resnet50] [--batch 32] [--size 224]
                                          [--steps 10] [--sparsity 0.9] [--device cuda]
                                          [--profile]

Each step is forward, cross-entropy loss, backward and an SGD step with momentum (which writes
every weight in place, as any optimiser does). Reported per step, medians over --steps timed
steps after two untimed ones: dense (PyTorch's default precision), sparse, and sparse without
the optimiser step (forward and backward only: the weights do not change, so no layer rebuilds
its filters; the difference to the full sparse step is the optimiser's step plus the rebuilds),
and sparse with ``escoin_torch.refresh_csrs`` after each optimiser step (every layer's pattern
checked at once, one synchronisation, instead of one per layer in its forward). Where
escoin-torch has its C++ training path, the sparse rows run with it switched on
(``escoin_torch.set_native_training(True)``), and the refresh_csrs row runs again with it off
(ops.py's autograd.Function and Python kernel, the path before it). Only public escoin-torch
calls, so that two builds can be timed side by side (PYTHONPATH=the other build's site).
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import statistics
import time
from typing import Callable, List, Tuple

import torch
from torch import nn
import torch.nn.functional as F

import escoin_torch
from escoin_torch.bench import models
from escoin_torch.bench.prune import prune_convs


def step_ms(step: Callable[[], object], steps: int,
            device: torch.device) -> Tuple[List[float], List[float]]:
    """Times of `steps` calls of `step` (after two untimed ones), milliseconds each,
    synchronised around each call so queued GPU work is counted; and the host's part of each:
    until `step` returned, its GPU work queued (where that is most of the step, the host's
    work bounds the step, not the GPU's)."""
    for _ in range(2):
        step()
    times, host = [], []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        host.append((time.perf_counter() - start) * 1e3)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times, host


def training_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                  update: bool = True, refresh: bool = False) -> Callable[[], object]:
    """One step; with `update` False, no optimiser step (the weights stay as they are); with
    `refresh`, escoin_torch.refresh_csrs after the optimiser step."""
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> object:
        optimiser.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        if update:
            optimiser.step()
        if refresh:
            escoin_torch.refresh_csrs(model)
        return loss
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="resnet50", choices=["resnet50", "vgg16", "alexnet",
                                                                "lenet5"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true",
                        help="also cProfile three steps of the last sparse row with updates")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    dense = prune_convs(models.build(args.net), args.sparsity, "random").to(device).train()
    sparse, report = escoin_torch.sparsify(copy.deepcopy(dense))
    for layer in sparse.modules():
        if isinstance(layer, escoin_torch.SparseConv2d):
            layer.sparse_training = True
    x = torch.randn(models.input_shape(args.net, args.batch, args.size), device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    print(f"{args.net}, batch {args.batch}, {args.sparsity:.0%} random, {device}, "
          f"{sum(r.path == 'sparse' for r in report)} sparse layers")
    # (name, model, optimiser step, refresh_csrs, C++ training path)
    cases = [("dense", dense, True, False, True), ("sparse", sparse, True, False, True),
             ("sparse, weights unchanged", sparse, False, False, True)]
    if hasattr(escoin_torch, "refresh_csrs"):  # (builds before it have none)
        cases.insert(2, ("sparse, refresh_csrs", sparse, True, True, True))
    native = device.type == "cuda" and hasattr(escoin_torch, "set_native_training")
    if native:
        escoin_torch.set_native_training(True)
        native = escoin_torch.set_native_training(True)  # (True: the C++ path is built)
    if native:
        cases.insert(3, ("sparse, refresh, Python", sparse, True, True, False))
    rows = []
    for name, model, update, refresh, native_row in cases:
        if native:
            escoin_torch.set_native_training(native_row)
        rows.append((name, step_ms(training_step(model, x, labels, update, refresh),
                                   args.steps, device)))
    for name, (times, host) in rows:
        print(f"{name:26s} {statistics.median(times):9.2f} ms a step "
              f"(min {min(times):.2f}, max {max(times):.2f}; host {statistics.median(host):.2f})")
    if args.profile:
        name, model, update, refresh, native_row = cases[2]
        if native:
            escoin_torch.set_native_training(native_row)
        step = training_step(model, x, labels, update, refresh)
        step()
        profile = cProfile.Profile()
        profile.runcall(lambda: [step() for _ in range(3)])
        print(f"-- the host's time in 3 steps of {name!r}, by own time")
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
