"""A float64 NumPy reference for torch.nn.functional.conv2d (plus bias, residual and ReLU): direct
summation over the taps, sharing no code with escoin's kernels."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


def conv2d_reference(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray],
                     stride: Tuple[int, int], pads: Tuple[int, int, int, int],
                     dilation: Tuple[int, int], groups: int, relu: bool = False,
                     residual: Optional[np.ndarray] = None) -> np.ndarray:
    """Direct summation over kernel taps in float64. pads = (top, bottom, left, right); a
    residual (the output's shape) is added before the ReLU."""
    x = np.asarray(x, np.float64)
    weight = np.asarray(weight, np.float64)
    n, c, h, w = x.shape
    m, c_per_group, kh, kw = weight.shape
    top, bottom, left, right = pads
    padded = np.zeros((n, c, h + top + bottom, w + left + right))
    padded[:, :, top:top + h, left:left + w] = x
    oh = (h + top + bottom - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + left + right - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, m, oh, ow))
    m_per_group = m // groups
    for g in range(groups):
        xs = padded[:, g * c_per_group:(g + 1) * c_per_group]
        ws = weight[g * m_per_group:(g + 1) * m_per_group]
        for r in range(kh):
            for s in range(kw):
                r0, s0 = r * dilation[0], s * dilation[1]
                window = xs[:, :, r0:r0 + stride[0] * (oh - 1) + 1:stride[0],
                            s0:s0 + stride[1] * (ow - 1) + 1:stride[1]]
                out[:, g * m_per_group:(g + 1) * m_per_group] += np.einsum(
                    "nchw,mc->nmhw", window, ws[:, :, r, s])
    if bias is not None:
        out += np.asarray(bias, np.float64)[None, :, None, None]
    if residual is not None:
        out += np.asarray(residual, np.float64)
    return np.maximum(out, 0) if relu else out


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected||; NaN anywhere in actual (e.g. unwritten poison) is
    inf."""
    actual = np.asarray(actual, np.float64)
    if not np.all(np.isfinite(actual)):
        return float("inf")
    scale = np.linalg.norm(expected)
    diff = np.linalg.norm(actual - expected)
    return float(diff / scale) if scale > 0 else float(diff)
