"""Hypothesis strategies for the problems particular GPU kernels take (the staged and
tensor-core kernels), and the phase-plane geometries; the general ones are
escoin.testing.strategies."""
from __future__ import annotations

from typing import Tuple

import numpy as np
from hypothesis import strategies as st

from escoin.testing.strategies import ConvCase, kept_mask, resolved_pads


@st.composite
def staged_conv_cases(draw: st.DrawFn, block: int = 1) -> ConvCase:
    """Problems the GPU's staged kernel takes: batch 8-10 and at least 16 output channels per
    group; otherwise random kernels (1x1 often), strides, dilation, padding, groups, planes from
    a few positions to a few thousand, channel counts that leave partial blocks of 32 output
    channels and span several shared-memory chunks, and density; pruned in blocks of `block`
    output channels (kept_mask)."""
    # 1x1 filters often: their warps read the entries of their rows as one run
    kernel = draw(st.just((1, 1)) | st.tuples(st.integers(1, 5), st.integers(1, 5)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    pads = resolved_pads(padding, kernel, dilation)
    extent = [dilation[i] * (kernel[i] - 1) + 1 for i in range(2)]
    h = draw(st.integers(max(1, extent[0] - 2 * pads[0]), 40))
    w = draw(st.integers(max(1, extent[1] - 2 * pads[2]), 70))
    groups = draw(st.integers(1, 3))
    per_group_in = draw(st.integers(1, 8) | st.integers(40, 120))
    per_group_out = draw(st.integers(16, 40))
    batch = draw(st.integers(8, 10))
    density = draw(st.floats(0.05, 1.0))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weight = rng.standard_normal((groups * per_group_out, per_group_in, *kernel))
    weight *= kept_mask(rng, groups, per_group_out, weight.shape[1:], density, block)
    x = rng.standard_normal((batch, groups * per_group_in, h, w))
    bias = rng.standard_normal(groups * per_group_out) if draw(st.booleans()) else None
    return ConvCase(x, weight, bias, stride, padding, pads, dilation, groups, draw(st.booleans()))


@st.composite
def tensor_core_conv_cases(draw: st.DrawFn) -> ConvCase:
    """Problems the GPU's tensor-core kernel takes: one group, one phase plane (stride 1, or a
    stride every tap's shift is a multiple of); random kernels, dilation, padding, batch 1-4,
    planes from one position to rows wider than a block's 256 positions (so a chunk holds few
    channels and the channels span several chunks), output channels that leave a partial tile
    of 32, and density (empty rows, all-zero filters)."""
    kernel = draw(st.just((1, 1)) | st.tuples(st.integers(1, 5), st.integers(1, 5)))
    # a 1x1 filter at stride 2 reads one phase plane
    stride = (1, 1) if kernel != (1, 1) else (draw(st.integers(1, 2)),) * 2
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    pads = resolved_pads(padding, kernel, dilation)
    extent = [dilation[i] * (kernel[i] - 1) + 1 for i in range(2)]
    wide = draw(st.booleans())  # rows wider than a block: few channels a chunk, short planes
    h_min, w_min = max(1, extent[0] - 2 * pads[0]), max(1, extent[1] - 2 * pads[2])
    h = draw(st.integers(h_min, max(h_min, 6) if wide else 24))
    w = draw(st.integers(600, 900) if wide else st.integers(w_min, 40))
    channels = draw(st.integers(1, 12) | st.integers(30, 80))
    out_channels = draw(st.integers(1, 80))
    batch = draw(st.integers(1, 4))
    density = draw(st.floats(0.0, 1.0))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weight = rng.standard_normal((out_channels, channels, *kernel))
    weight *= rng.random(weight.shape) < density
    x = rng.standard_normal((batch, channels, h, w))
    bias = rng.standard_normal(out_channels) if draw(st.booleans()) else None
    return ConvCase(x, weight, bias, stride, padding, pads, dilation, 1, draw(st.booleans()))


# Geometries whose stretched layout keeps fewer phase planes than stride_h x stride_w (one per
# axis where every tap's shift is a multiple of the stride), with the planes per axis it keeps:
# (kernel, stride, dilation, (phases_h, phases_w)).
PHASE_PLANE_CASES = [((1, 1), (2, 2), (1, 1), (1, 1)),  # ResNet's downsampling shortcut
                     ((3, 3), (2, 2), (1, 1), (2, 2)),
                     ((3, 3), (2, 2), (2, 2), (1, 1)),
                     ((2, 3), (3, 2), (3, 1), (1, 2)),
                     ((1, 3), (2, 3), (1, 2), (1, 3))]


def phase_plane_case(kernel: Tuple[int, int], stride: Tuple[int, int],
                     dilation: Tuple[int, int], batch: int, channels: int,
                     out_channels: int, size: int, seed: int) -> ConvCase:
    """A PHASE_PLANE_CASES geometry with padding 1 on a size x size input, 30% dense."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((out_channels, channels, *kernel))
    weight *= rng.random(weight.shape) < 0.3
    x = rng.standard_normal((batch, channels, size, size))
    bias = rng.standard_normal(out_channels)
    return ConvCase(x, weight, bias, stride, (1, 1), (1, 1, 1, 1), dilation, 1, True)
