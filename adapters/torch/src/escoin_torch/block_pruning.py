"""Pruning in blocks of output channels: the sparsity structure escoin's GPU kernel turns into
speed beyond what unstructured pruning can reach.

escoin's staged CUDA kernel computes four output channels per warp. Where channels 4k..4k+3 of a
group keep weights at the same places (input channel and tap), one input value loaded from shared
memory feeds four multiply-adds instead of one, and the layers run 1.75x faster than the same
sparsity unstructured (on an H100 at 90% sparsity and batch 32: 3.30x the arithmetic floor
instead of 5.77x, on par with TF32 cuDNN; the kernel finds the structure by itself,
``docs/performance.md``). These functions produce that structure with ``torch.nn.utils.prune``:
a mask is registered (``weight_orig``, ``weight_mask``), fine-tuning keeps it, and
:func:`escoin_torch.sparsify` folds it::

    block_prune(conv, amount=0.9)                        # one layer, like prune.l1_unstructured
    global_block_prune(model, amount=0.9)                # every Conv2d, one threshold
    sparse, report = escoin_torch.sparsify(model.eval())

A block is ``block`` consecutive output channels of one group at one (input channel, row,
column) of the filter; a group's last block is shorter where ``block`` does not divide its
output channels. Blocks are ranked by the root mean square of their weights (or of
``importance_scores``), so blocks of different lengths and layers compare fairly.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn.utils import prune

__all__ = ["ChannelBlockPruning", "block_prune", "global_block_prune"]

ESCOIN_BLOCK = 4  # the staged kernel's output channels per warp


class ChannelBlockPruning(prune.BasePruningMethod):
    """Prunes the fraction ``amount`` (a float in [0, 1], or a count of blocks) of a conv
    weight's still-unpruned blocks of ``block`` output channels, those of smallest root mean
    square. Applied on top of earlier pruning (``torch.nn.utils.prune``'s container), it keeps
    the earlier mask and ranks only the blocks that still hold a weight."""

    PRUNING_TYPE = "global"  # the container passes the whole tensor: blocks span channels

    def __init__(self, amount: Union[int, float], block: int = ESCOIN_BLOCK, groups: int = 1
                 ) -> None:
        prune._validate_pruning_amount_init(amount)
        _check_block(block, groups)
        self.amount, self.block, self.groups = amount, block, groups

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        scores = block_scores(t * default_mask, self.groups, self.block)
        alive = block_scores(default_mask, self.groups, self.block) > 0
        keep = blocks_kept(scores, alive, self.amount)
        return default_mask * expand_blocks(keep, t.shape, self.groups, self.block).to(
            default_mask.dtype)


def block_prune(module: nn.Conv2d, amount: Union[int, float], block: int = ESCOIN_BLOCK,
                name: str = "weight", importance_scores: Optional[torch.Tensor] = None
                ) -> nn.Conv2d:
    """Prunes ``module.<name>`` in blocks of ``block`` output channels of each group (see the
    module's text), as ``torch.nn.utils.prune.l1_unstructured`` prunes single weights: registers
    ``<name>_orig`` and ``<name>_mask`` and returns the module."""
    if not isinstance(module, nn.Conv2d):
        raise TypeError(f"block_prune prunes an nn.Conv2d, got {type(module).__name__}")
    ChannelBlockPruning.apply(module, name, amount, block, module.groups,
                              importance_scores=importance_scores)
    return module


def global_block_prune(model: Union[nn.Module, Iterable[nn.Conv2d]], amount: Union[int, float],
                       block: int = ESCOIN_BLOCK,
                       importance_scores: Optional[Dict[nn.Conv2d, torch.Tensor]] = None
                       ) -> None:
    """Prunes the fraction ``amount`` (a float in [0, 1], or a count of blocks) of the unpruned
    blocks of all the ``nn.Conv2d`` of ``model`` (or of the given convs) together, by one
    threshold on the blocks' root mean square (as ``torch.nn.utils.prune.global_unstructured``
    does for single weights): layers end up with different sparsities. ``importance_scores``
    maps a conv to scores of its weight's shape to rank by instead of the weight (e.g.
    ``torch.rand_like`` for random pruning)."""
    prune._validate_pruning_amount_init(amount)
    convs = _convs(model)
    scores = importance_scores or {}
    ranked: List[torch.Tensor] = []
    alive: List[torch.Tensor] = []
    for conv in convs:
        mask = _current_mask(conv)
        weight = scores.get(conv, conv.weight).detach()
        if weight.shape != conv.weight.shape:
            raise ValueError(f"importance_scores of a conv must have its weight's shape "
                             f"{tuple(conv.weight.shape)}, got {tuple(weight.shape)}")
        _check_block(block, conv.groups)
        ranked.append(block_scores(weight * mask, conv.groups, block))
        alive.append(block_scores(mask, conv.groups, block) > 0)
    keep = blocks_kept(torch.cat([r.cpu().flatten() for r in ranked]),
                       torch.cat([a.cpu().flatten() for a in alive]), amount)
    start = 0
    for conv, part in zip(convs, alive):
        kept = keep[start:start + part.numel()].view(part.shape).to(conv.weight.device)
        start += part.numel()
        mask = expand_blocks(kept, conv.weight.shape, conv.groups, block)
        prune.custom_from_mask(conv, "weight", mask.to(conv.weight.dtype))


def blocks_kept(scores: torch.Tensor, alive: torch.Tensor, amount: Union[int, float]
                ) -> torch.Tensor:
    """Of the ``alive`` blocks, those left after pruning ``amount`` of them (a fraction of the
    alive ones, or a count), the smallest ``scores`` first."""
    remaining = int(alive.sum())
    prune._validate_pruning_amount(amount, remaining)
    count = prune._compute_nparams_toprune(amount, remaining)
    keep = alive.clone()
    if count:
        ranked = torch.where(alive, scores, torch.full_like(scores, float("inf")))
        keep.view(-1)[torch.topk(ranked.view(-1), count, largest=False).indices] = False
    return keep


def block_scores(weight: torch.Tensor, groups: int, block: int) -> torch.Tensor:
    """The root mean square of each block of a (M, C/groups, kh, kw) tensor: a tensor of
    (groups, blocks per group, C/groups * kh * kw)."""
    view, rows = _blocks(weight, groups, block)
    return (view.float().square().sum(dim=2) / rows).sqrt()


def expand_blocks(keep: torch.Tensor, shape: torch.Size, groups: int, block: int
                  ) -> torch.Tensor:
    """A per-block tensor (groups, blocks per group, rest) back to the weight's shape, each
    block's value on its ``block`` channels (a group's last block cut to the group)."""
    per_group = shape[0] // groups
    return (keep.unsqueeze(2).expand(-1, -1, block, -1)
            .reshape(groups, -1, keep.shape[-1])[:, :per_group].reshape(shape))


def _blocks(weight: torch.Tensor, groups: int, block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The weight as (groups, blocks, block, rest), zero rows past a group's channels, and each
    block's count of real rows, shaped to divide a sum over dim 2."""
    per_group = weight.shape[0] // groups
    blocks = -(-per_group // block)
    view = weight.reshape(groups, per_group, -1)
    missing = blocks * block - per_group
    if missing:
        view = torch.cat([view, view.new_zeros(groups, missing, view.shape[-1])], dim=1)
    rows = torch.full((blocks, 1), float(block), device=weight.device)
    rows[-1] = block - missing
    return view.reshape(groups, blocks, block, -1), rows


def _check_block(block: int, groups: int) -> None:
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ValueError(f"block must be a positive int (output channels), got {block!r}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")


def _convs(model: Union[nn.Module, Iterable[nn.Conv2d]]) -> List[nn.Conv2d]:
    convs = ([m for m in model.modules() if isinstance(m, nn.Conv2d)]
             if isinstance(model, nn.Module) else list(model))
    if not convs:
        raise ValueError("no nn.Conv2d to prune")
    for conv in convs:
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"global_block_prune prunes nn.Conv2d modules, got "
                            f"{type(conv).__name__}")
    return convs


def _current_mask(conv: nn.Conv2d) -> torch.Tensor:
    """The conv's pruning mask so far (all ones where it was never pruned)."""
    mask = getattr(conv, "weight_mask", None)
    return mask if mask is not None else torch.ones_like(conv.weight)
