"""Runs one suite layer through escoin a few times, for a profiler (ncu) to attach to.

    ncu --clock-control none -k regex:sparse_conv python benchmarks/profile_layer.py vgg.c3_2 32
    ncu --clock-control none -k regex:mma_conv python benchmarks/profile_layer.py vgg.c3_2 32 \
        0.9 tensor-cores
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import escoin  # noqa: E402
from suite import LAYERS, output_size, pruned_weight  # noqa: E402


def main() -> None:
    import torch

    name, batch = sys.argv[1], int(sys.argv[2])
    sparsity = float(sys.argv[3]) if len(sys.argv) > 3 else 0.9
    tensor_cores = len(sys.argv) > 4 and sys.argv[4] == "tensor-cores"
    layer = next(l for net in LAYERS.values() for l in net if l.name == name)
    rng = np.random.default_rng(0)
    filt = escoin.SparseFilter.from_dense(pruned_weight(layer, sparsity, rng)).cuda(0)
    x = torch.randn(batch, layer.in_channels, layer.size, layer.size, device="cuda")
    oh = output_size(layer)
    out = torch.empty(batch, layer.out_channels, oh, oh, device="cuda")
    for _ in range(3):
        escoin.conv2d(x, filt, stride=layer.stride, padding=layer.padding, out=out,
                      tensor_cores=tensor_cores)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
