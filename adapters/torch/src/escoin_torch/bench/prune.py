"""Global pruning of a network's convolutions, the way pruned CNNs are produced: of single
weights (unstructured), or in blocks of output channels (escoin_torch.global_block_prune).

Only ``nn.Conv2d`` weights are pruned: escoin computes convolutions, and the linear layers stay
dense in both the dense and the escoin model, so pruning them would change neither side's
relative work. (Their time still counts in the end-to-end numbers, which is what a user sees.)
Pruning is global, over all conv weights together, as ``torch.nn.utils.prune.global_unstructured``
does: layers end up with different sparsities, unlike a per-layer benchmark at one sparsity.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn.utils import prune

from escoin_torch.block_pruning import global_block_prune

__all__ = ["Method", "prune_convs"]

Method = Literal["magnitude", "random"]

_METHODS = {"magnitude": prune.L1Unstructured, "random": prune.RandomUnstructured}


def prune_convs(model: nn.Module, sparsity: float, method: Method, seed: int = 0,
                block: int = 1) -> nn.Module:
    """Zeroes the fraction ``sparsity`` of all conv weights of ``model`` (in place) and returns it.

    ``magnitude`` keeps the largest |w| across all convs; ``random`` keeps a uniform random subset
    (seeded). With ``block`` > 1 whole blocks of ``block`` output channels go (ranked by their
    root mean square, or by random scores). Each conv's surviving weights are then scaled back
    to its norm before pruning (:func:`_keep_scale`). The pruning is made permanent
    (``prune.remove``): a pruned module recomputes ``weight_orig * weight_mask`` in a
    pre-forward hook, which would add to every dense forward.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if method not in _METHODS:
        raise ValueError(f"prune method must be one of {sorted(_METHODS)}, got {method!r}")
    convs = [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("the model has no nn.Conv2d to prune")
    torch.manual_seed(seed)
    norms = [float(torch.linalg.vector_norm(m.weight.detach())) for m, _ in convs]
    if block == 1:
        prune.global_unstructured(convs, pruning_method=_METHODS[method], amount=sparsity)
    else:
        scores = ({m: torch.rand_like(m.weight) for m, _ in convs} if method == "random"
                  else None)
        global_block_prune([m for m, _ in convs], sparsity, block, importance_scores=scores)
    for (module, name), norm in zip(convs, norms):
        prune.remove(module, name)
        _keep_scale(module, norm)
    return model


def _keep_scale(conv: nn.Conv2d, norm: float) -> None:
    """Scales the weights that survived pruning back to the layer's norm before it, as the
    fine-tuning after pruning does: a conv's output variance is proportional to its weights'
    squared norm. Without it a randomly pruned VGG16 loses ~3.5x of its activations' scale a
    layer, to ~1e-7 at the end, under float16's smallest normal (6e-5): its 16-bit forward then
    computes almost nothing but subnormals and zeros (an error of 0.85 against float64), and
    times a network nobody would deploy."""
    with torch.no_grad():
        pruned = float(torch.linalg.vector_norm(conv.weight))
        if pruned > 0:
            conv.weight.mul_(norm / pruned)
