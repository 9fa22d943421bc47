"""Runs one suite layer through escoin a few times, for a profiler (ncu) to attach to.

    ncu --clock-control none -k regex:sparse_conv python benchmarks/profile_layer.py vgg.c3_2 32
    ncu --clock-control none -k regex:mma_conv python benchmarks/profile_layer.py vgg.c3_2 32 \
        0.9 tensor-cores
    ncu --clock-control none -k regex:staged python benchmarks/profile_layer.py rn.l3.1x1dn 32 \
        --block 4   # pruned in blocks of four output channels
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import escoin  # noqa: E402
from suite import LAYERS, output_size, pruned_weight  # noqa: E402


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layer")
    parser.add_argument("batch", type=int)
    parser.add_argument("sparsity", type=float, nargs="?", default=0.9)
    parser.add_argument("kernel", nargs="?", choices=["tensor-cores"])
    parser.add_argument("--block", type=int, default=1,
                        help="prune in blocks of this many output channels (1: unstructured)")
    args = parser.parse_args()
    layer = next(l for net in LAYERS.values() for l in net if l.name == args.layer)
    tensor_cores, batch = args.kernel == "tensor-cores", args.batch
    rng = np.random.default_rng(0)
    weight = pruned_weight(layer, args.sparsity, rng, args.block)
    filt = escoin.SparseFilter.from_dense(weight).cuda(0)
    x = torch.randn(batch, layer.in_channels, layer.size, layer.size, device="cuda")
    oh = output_size(layer)
    out = torch.empty(batch, layer.out_channels, oh, oh, device="cuda")
    for _ in range(3):
        escoin.conv2d(x, filt, stride=layer.stride, padding=layer.padding, out=out,
                      tensor_cores=tensor_cores)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
