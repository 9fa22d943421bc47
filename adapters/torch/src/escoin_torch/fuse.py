"""``fuse_for_inference``: an eval-mode model's BatchNorms folded into the convolutions before them
and its ReLUs into the ``SparseConv2d`` before them.

A BatchNorm in eval mode is an affine map per channel, so a convolution followed by one is the
same convolution with scaled weights and a new bias; scaling keeps every zero weight zero, so a
pruned filter stays as sparse. escoin's kernels add the bias and apply a ReLU as they write each
output, so the folded network makes one pass over each activation where it made three (the
convolution's output, the BatchNorm's, the ReLU's): on ResNet-50 at batch 32 those passes move
gigabytes.
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from escoin_torch.layer import SparseConv2d

__all__ = ["fuse_for_inference"]

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)


def fuse_for_inference(model: nn.Module) -> fx.GraphModule:
    """A copy of ``model`` (which must be in eval mode and symbolically traceable by
    ``torch.fx``) where every ``BatchNorm2d`` that alone reads an ``nn.Conv2d`` or
    ``SparseConv2d``'s output is folded into it, and every ReLU that alone reads a
    ``SparseConv2d``'s output (after any folding) is fused into it (``relu=True``). Other
    modules, and convolutions called more than once, are left as they are. Call it after
    :func:`escoin_torch.sparsify` (so that ReLUs find their ``SparseConv2d``) and before
    :func:`escoin_torch.calibrate`. The result computes what ``model`` computes, up to rounding.
    """
    if model.training:
        raise ValueError("fuse_for_inference folds BatchNorm running statistics, which only "
                         "eval mode uses: call model.eval() first")
    model = copy.deepcopy(model)
    try:
        traced = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as error:  # torch.fx raises several types for untraceable code
        raise TypeError(f"fuse_for_inference needs a model torch.fx can trace; tracing "
                        f"{type(model).__name__} failed: {error}") from error
    calls = Counter(node.target for node in traced.graph.nodes if node.op == "call_module")
    for node in list(traced.graph.nodes):
        conv = _module(traced, node, (nn.Conv2d,))
        if conv is None or calls[node.target] != 1:
            continue
        if type(conv) is not nn.Conv2d and not isinstance(conv, SparseConv2d):
            continue  # a subclass may compute something else in forward
        norm_node = _sole_user(node)
        norm = _module(traced, norm_node, (nn.BatchNorm2d,)) if norm_node else None
        if norm is not None and calls[norm_node.target] == 1 and _foldable(norm, conv):
            conv = _folded(conv, norm)
            norm_node.replace_all_uses_with(node)
            traced.graph.erase_node(norm_node)
        relu_node = _sole_user(node)
        if isinstance(conv, SparseConv2d) and not conv.relu and _is_relu(traced, relu_node):
            conv = _with_relu(conv)
            relu_node.replace_all_uses_with(node)
            traced.graph.erase_node(relu_node)
        _replace_module(traced, node.target, conv)
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with SparseConv2d a leaf like nn.Conv2d (its forward chooses a path and
    checks its input, which a trace cannot follow)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, SparseConv2d) or super().is_leaf_module(module, qualified_name)


def _module(traced: fx.GraphModule, node: Optional[fx.Node], kinds: tuple) -> Optional[nn.Module]:
    if node is None or node.op != "call_module":
        return None
    module = traced.get_submodule(node.target)
    return module if isinstance(module, kinds) else None


def _sole_user(node: fx.Node) -> Optional[fx.Node]:
    """The one node that reads ``node``'s value, if exactly one does and only as its input."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    return user if user.args[:1] == (node,) and node not in user.args[1:] else None


def _is_relu(traced: fx.GraphModule, node: Optional[fx.Node]) -> bool:
    if node is None:
        return False
    if node.op == "call_module":
        return type(traced.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _foldable(norm: nn.BatchNorm2d, conv: nn.Conv2d) -> bool:
    return (type(norm) is nn.BatchNorm2d and norm.running_mean is not None
            and norm.running_var is not None and norm.num_features == conv.out_channels)


def _folded(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    """``conv`` followed by ``norm`` (eval mode) as one convolution of the same type and path."""
    with torch.no_grad():
        scale = torch.rsqrt(norm.running_var + norm.eps)
        shift = -norm.running_mean * scale
        if norm.weight is not None:
            scale, shift = scale * norm.weight, shift * norm.weight
        if norm.bias is not None:
            shift = shift + norm.bias
        weight = conv.weight * scale.to(conv.weight.dtype).reshape(-1, 1, 1, 1)
        bias = shift if conv.bias is None else conv.bias * scale + shift
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, True, conv.padding_mode,
                      device="meta")
    plain.weight = nn.Parameter(weight, requires_grad=False)
    plain.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    plain.eval()
    if not isinstance(conv, SparseConv2d):
        return plain
    return SparseConv2d.from_dense(plain, relu=conv.relu, sparse_training=conv.sparse_training,
                                   inference_path=conv.inference_path)


def _with_relu(conv: SparseConv2d) -> SparseConv2d:
    return SparseConv2d.from_dense(conv, relu=True, sparse_training=conv.sparse_training,
                                   inference_path=conv.inference_path)


def _replace_module(traced: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    setattr(traced.get_submodule(parent_name) if parent_name else traced, name, module)
