"""One convolution of LeNet5, pruned 60%, computed by escoin and checked against dense float64.

    python examples/single_layer_check.py        # prints SUCCESS, or exits with status 1

The reference is the same dense layer in float64, so the printed error is escoin's own rounding
(a few float32 ulps), not the difference between two float32 computations.
"""
from __future__ import annotations

import copy
import sys

import torch
from torch import nn
from torch.nn.utils import prune

import escoin_torch
from escoin_torch.bench.models import build
from escoin_torch.seed import relative_error
from verdict import verdict

TOLERANCE = 1e-5  # float32 rounding of a 150-term dot product is ~1e-7


def main() -> int:
    lenet = build("lenet5", seed=0)
    conv = next(m for m in lenet.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 6)
    prune.l1_unstructured(conv, "weight", amount=0.6)
    layer = escoin_torch.SparseConv2d.from_dense(conv).eval()   # folds the pruning mask
    reference = copy.deepcopy(layer).double()
    reference.inference_path = "dense"
    x = torch.randn(4, 6, 14, 14, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        error = relative_error(layer(x), reference(x.double()))
    return 0 if verdict(f"conv 6->16 5x5, density {layer.density:.2f}", error, TOLERANCE) else 1


if __name__ == "__main__":
    sys.exit(main())
