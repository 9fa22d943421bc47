"""Whole-network benchmark of escoin on pruned CNNs (VGG16, ResNet-50, AlexNet, LeNet5).

``python -m escoin_torch.bench`` (or ``escoin-bench``) prunes each network, converts it with
:func:`escoin_torch.sparsify`, checks it against the dense network in float64 and times it end to
end and per layer against every dense path PyTorch offers on the device.

Modules: ``models`` (the networks), ``prune`` (global pruning), ``paths`` (the whole-network paths
and their timing), ``layers`` (per-layer timing and memory), ``runner`` (one case),
``report`` (tables, JSON, chart), ``cli`` (the command line).
"""
from escoin_torch.bench.cli import main

__all__ = ["main"]
