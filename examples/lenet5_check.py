"""All of LeNet5, its convolutions pruned 60% (globally, by magnitude), converted with
``escoin_torch.sparsify`` and checked against the dense network in float64.

    python examples/lenet5_check.py              # prints SUCCESS, or exits with status 1
"""
from __future__ import annotations

import copy
import sys

import torch

import escoin_torch
from escoin_torch.bench.models import build
from escoin_torch.bench.prune import prune_convs
from escoin_torch.seed import relative_error
from verdict import verdict

TOLERANCE = 1e-5  # a few float32 ulps per layer, through five layers


def main() -> int:
    dense = prune_convs(build("lenet5", seed=0), sparsity=0.6, method="magnitude")
    # min_sparsity=0: convert every conv, even one that global pruning left less than half empty.
    sparse, report = escoin_torch.sparsify(dense, min_sparsity=0.0)
    for layer in report:
        print(f"{layer.name}: {'x'.join(map(str, layer.shape))}, density {layer.density:.2f}, "
              f"{layer.path}")
    x = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        error = relative_error(sparse(x), copy.deepcopy(dense).double()(x.double()))
    return 0 if verdict("LeNet5 output", error, TOLERANCE) else 1


if __name__ == "__main__":
    sys.exit(main())
