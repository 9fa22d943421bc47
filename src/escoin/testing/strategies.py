"""Hypothesis strategies for random convolution problems of every geometry conv2d allows (the
core's CPU and GPU tests and the adapters' use them). Needs hypothesis."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
from hypothesis import strategies as st


@dataclass
class ConvCase:
    """One conv2d problem: float64 operands and conv2d's arguments."""
    x: np.ndarray
    weight: np.ndarray
    bias: Optional[np.ndarray]
    stride: Tuple[int, int]
    padding: Union[str, Tuple[int, int]]
    pads: Tuple[int, int, int, int]  # (top, bottom, left, right) the padding resolves to
    dilation: Tuple[int, int]
    groups: int
    relu: bool


def resolved_pads(padding: Union[str, Tuple[int, int]], kernel: Tuple[int, int],
                  dilation: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) that conv2d's padding (a pair, 'valid' or 'same') resolves to
    for a kernel and dilation ('same': the odd one at the bottom and right, as torch's)."""
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        th, tw = dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
        return th // 2, th - th // 2, tw // 2, tw - tw // 2
    return padding[0], padding[0], padding[1], padding[1]


def kept_mask(rng: np.random.Generator, groups: int, per_group_out: int,
              window: Tuple[int, ...], density: float, block: int = 1) -> np.ndarray:
    """Which weights of a (groups * per_group_out, *window) filter a random pruning keeps, each
    with probability `density`; with block > 1 in blocks of output channels: a group's channels
    block * k .. block * k + block - 1 keep weights at the same places (the group's last block
    cut short where block does not divide per_group_out)."""
    kept = rng.random((groups, -(-per_group_out // block), *window)) < density
    return np.repeat(kept, block, axis=1)[:, :per_group_out].reshape(-1, *window)


@st.composite
def conv_cases(draw: st.DrawFn, max_batch: int = 5) -> ConvCase:
    """Non-square inputs and kernels, stride 1-3, dilation 1-3, padding pairs/'same'/'valid',
    groups including depthwise, batch 0..max_batch, density 0..1 (empty rows, all-zero filters)."""
    # 1x1 filters often: their warps read the entries of their rows as one run
    kernel = draw(st.just((1, 1)) | st.tuples(st.integers(1, 5), st.integers(1, 5)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    choices = ["pair", "valid"] + (["same"] if stride == (1, 1) else [])
    kind = draw(st.sampled_from(choices))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3))) if kind == "pair" else kind
    pads = resolved_pads(padding, kernel, dilation)
    extent = [dilation[i] * (kernel[i] - 1) + 1 for i in range(2)]
    h = draw(st.integers(max(1, extent[0] - pads[0] - pads[1]), extent[0] + 14))
    w = draw(st.integers(max(1, extent[1] - pads[2] - pads[3]), extent[1] + 14))
    groups_kind = draw(st.sampled_from(["one", "several", "depthwise"]))
    per_group_in = 1 if groups_kind == "depthwise" else draw(st.integers(1, 5))
    groups = 1 if groups_kind == "one" else draw(st.integers(2, 6))
    per_group_out = draw(st.integers(1, 4))
    batch = draw(st.integers(0, max_batch))
    density = draw(st.sampled_from([0.0, 0.05, 0.2, 0.5, 1.0]) | st.floats(0.0, 1.0))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((groups * per_group_out, per_group_in, *kernel))
    weight *= rng.random(weight.shape) < density
    x = rng.standard_normal((batch, groups * per_group_in, h, w))
    bias = rng.standard_normal(groups * per_group_out) if draw(st.booleans()) else None
    return ConvCase(x, weight, bias, stride, padding, pads, dilation, groups, draw(st.booleans()))
