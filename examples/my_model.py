"""Your own pruned model through escoin: replace ``my_pruned_model()`` and ``example_batch()``.

    python examples/my_model.py                  # prints the reports, SUCCESS, then calibration

``sparsify`` swaps every convolution that is at least half zeros for an escoin ``SparseConv2d``
(folding ``torch.nn.utils.prune`` masks, if the model still carries them); ``calibrate`` times
both paths of each converted layer on the real input and keeps the faster one. The result is
checked against your dense model in float64 before it is trusted.
"""
from __future__ import annotations

import sys

import torch
from torch import nn
from torch.nn.utils import prune

import escoin_torch
from escoin_torch.seed import relative_error
from verdict import verdict

TOLERANCE = 1e-5


def my_pruned_model() -> nn.Module:
    """Stands for your model: a small CNN with strided, grouped and padded convolutions, pruned
    80% per layer and left with its pruning masks attached, as training code leaves it."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding="same", groups=4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            prune.l1_unstructured(module, "weight", amount=0.8)
    return model.eval()


def example_batch() -> torch.Tensor:
    """Stands for real inputs: the batch size and resolution you will run at."""
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def main() -> int:
    model, x = my_pruned_model(), example_batch()
    sparse, report = escoin_torch.sparsify(model)
    print("sparsify:")
    for layer in report:
        print(f"  {layer.name}: {'x'.join(map(str, layer.shape))}, density {layer.density:.2f}, "
              f"{layer.path}{' (' + layer.reason + ')' if layer.reason else ''}")
    with torch.no_grad():  # every converted layer runs escoin until calibrate chooses
        # sparsify converted a copy, so the original (still carrying its pruning masks) can
        # become the float64 reference in place; deepcopy refuses a model with masks attached.
        error = relative_error(sparse(x), model.double()(x.double()))
    if not verdict("your model", error, TOLERANCE):
        return 1
    # Calibrate only after the check: until then every converted layer ran escoin.
    print("calibrate (median ms per forward):")
    for timing in escoin_torch.calibrate(sparse, x):
        print(f"  {timing.name}: escoin {timing.sparse_ms:.3f}, dense {timing.dense_ms:.3f} "
              f"-> {timing.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
