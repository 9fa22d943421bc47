"""Pruning in blocks of output channels (escoin_torch.block_pruning): the blocks, the ranking
against a NumPy restatement, composition with torch.nn.utils.prune, and that the result takes
the staged kernel's row-group form."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import escoin
from escoin_torch import block_prune, global_block_prune, sparsify
from torch_helpers import relative_error


def block_rms(weight: np.ndarray, groups: int, block: int) -> np.ndarray:
    """Per (group, block, column) the root mean square of the block's weights, written out."""
    out_channels = weight.shape[0]
    per_group = out_channels // groups
    flat = weight.reshape(out_channels, -1).astype(np.float64)
    blocks = -(-per_group // block)
    rms = np.zeros((groups, blocks, flat.shape[1]))
    for g in range(groups):
        for b in range(blocks):
            rows = flat[g * per_group + b * block:g * per_group + min((b + 1) * block, per_group)]
            rms[g, b] = np.sqrt((rows ** 2).mean(axis=0))
    return rms


def assert_blocks_shared(mask: np.ndarray, groups: int, block: int) -> np.ndarray:
    """Every block's channels have one mask; returns the per-block mask."""
    per_group = mask.shape[0] // groups
    flat = mask.reshape(mask.shape[0], -1)
    blocks = []
    for g in range(groups):
        for start in range(0, per_group, block):
            rows = flat[g * per_group + start:g * per_group + min(start + block, per_group)]
            assert np.all(rows == rows[0]), "a block's channels differ"
            blocks.append(rows[0])
    return np.stack(blocks)


@pytest.mark.parametrize("out_channels, groups, block", [(64, 1, 4), (70, 1, 4), (36, 2, 4),
                                                         (48, 3, 2), (40, 1, 8)])
def test_blocks_of_smallest_rms_are_pruned(out_channels: int, groups: int, block: int) -> None:
    """A group's last block is shorter where block does not divide its channels (70, 36 / 2 =
    18); blocks never cross groups; exactly round(amount * blocks) blocks go, the smallest."""
    torch.manual_seed(out_channels + groups)
    conv = nn.Conv2d(24 * groups, out_channels, 3, groups=groups)
    original = conv.weight.detach().numpy().copy()
    block_prune(conv, amount=0.9, block=block)
    mask = conv.weight_mask.numpy()
    kept_blocks = assert_blocks_shared(mask, groups, block)
    total = kept_blocks.size
    assert total - kept_blocks.sum() == round(0.9 * total)
    rms = block_rms(original, groups, block).reshape(-1)
    kept = kept_blocks.reshape(-1) == 1  # in the same (group, block, column) order
    assert rms[kept].min() >= rms[~kept].max()
    assert np.array_equal(conv.weight.detach().numpy(), original * mask)


def test_pruning_again_prunes_the_remaining_blocks() -> None:
    """As torch.nn.utils.prune composes: the second call's amount is of the blocks still kept,
    and the first call's blocks stay pruned (also after unstructured pruning in between)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3)
    block_prune(conv, amount=0.5)
    first = conv.weight_mask.clone()
    block_prune(conv, amount=0.5)
    kept = assert_blocks_shared(conv.weight_mask.numpy(), 1, 4)
    assert kept.sum() == kept.size - round(0.5 * kept.size) - round(0.5 * round(0.5 * kept.size))
    assert torch.all(conv.weight_mask <= first)
    prune.l1_unstructured(conv, "weight", amount=0.1)  # a few weights inside kept blocks
    before = conv.weight_mask.clone()
    block_prune(conv, amount=0.5)
    assert torch.all(conv.weight_mask <= before)


def test_global_pruning_ranks_blocks_across_layers() -> None:
    """One threshold over every conv's blocks: a layer of small weights loses more of them."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(8, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3, groups=2))
    with torch.no_grad():
        model[2].weight.mul_(0.5)
    global_block_prune(model, amount=0.8)
    kept = [assert_blocks_shared(m.weight_mask.numpy(), m.groups, 4)
            for m in (model[0], model[2])]
    total = sum(k.size for k in kept)
    assert total - sum(k.sum() for k in kept) == round(0.8 * total)
    assert kept[1].mean() < kept[0].mean()
    # the pruned blocks are the smallest across both layers
    rms = [block_rms(m.weight_orig.detach().numpy(), m.groups, 4).reshape(-1)
           for m in (model[0], model[2])]
    all_rms, all_kept = np.concatenate(rms), np.concatenate([k.reshape(-1) for k in kept]) == 1
    assert all_rms[all_kept].min() >= all_rms[~all_kept].max()


def test_importance_scores_rank_instead_of_the_weights() -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 16, 1)
    scores = torch.zeros_like(conv.weight)
    scores[:4] = 1.0  # only the first block matters
    block_prune(conv, amount=3, importance_scores=scores)  # 8 * 4 blocks, prune 3 of them
    assert conv.weight_mask[:4].all()
    global_block_prune([conv], amount=1, importance_scores={conv: scores})  # a count: 1 block
    assert (~conv.weight_mask.bool()).sum() == 4 * 4 and conv.weight_mask[:4].all()
    global_block_prune([conv], amount=1.0, importance_scores={conv: scores})  # a fraction: all
    assert not conv.weight_mask.any()


def test_block_pruned_layers_take_the_row_group_form() -> None:
    """sparsify folds the masks, the outputs match, and the staged kernel's program of a block-
    pruned filter is the row-group form (each loaded input value feeds four channels)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 64, 3, padding=1))
    global_block_prune(model, amount=0.9)
    x = torch.randn(2, 3, 12, 12)
    expected = model(x)
    sparse, report = sparsify(model.eval())
    assert report[1].path == "sparse"  # (the first conv's larger weights keep more blocks)
    assert relative_error(sparse(x), expected) < 1e-5
    weight = sparse[2].weight.detach().numpy()
    filt = escoin.SparseFilter.from_dense(weight)
    assert filt.tile_form((8, 32, 28, 28), padding=1) == "row groups"


def test_bad_arguments_are_named() -> None:
    conv = nn.Conv2d(4, 8, 3)
    with pytest.raises(ValueError, match="block must be a positive int"):
        block_prune(conv, 0.5, block=0)
    with pytest.raises(TypeError, match="prunes an nn.Conv2d"):
        block_prune(nn.Linear(4, 4), 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="amount"):
        block_prune(conv, 1.5)
    with pytest.raises(ValueError, match="amount"):
        global_block_prune(conv, 2.0)
    with pytest.raises(ValueError, match="amount"):
        global_block_prune(conv, 10_000)  # more blocks than the conv has
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        global_block_prune(nn.Linear(4, 4), 0.5)
    with pytest.raises(ValueError, match="weight's shape"):
        global_block_prune(conv, 0.5, importance_scores={conv: torch.ones(3)})
