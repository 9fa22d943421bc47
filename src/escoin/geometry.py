"""Argument normalisation with torch.nn.functional.conv2d's conventions, and the C descriptor."""
from __future__ import annotations

import numbers

from typing import Sequence, Tuple, Union

from escoin._errors import EscoinError

IntPair = Union[int, Sequence[int]]
Padding = Union[int, Sequence[int], str]


def pair(value: IntPair, name: str, minimum: int) -> Tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair."""
    if _is_int(value):
        items = (value, value)
    elif isinstance(value, (tuple, list)):
        items = tuple(value)
    else:
        items = ()
    if len(items) != 2 or not all(_is_int(v) for v in items):
        raise EscoinError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(items) < minimum:
        raise EscoinError(f"{name} must be >= {minimum}, got {value!r}")
    return int(items[0]), int(items[1])


def padding_sides(padding: Padding, kernel: Tuple[int, int], stride: Tuple[int, int],
                  dilation: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding, as F.conv2d applies it.

    'same' puts the odd extra row/column at the end, as PyTorch does, and like PyTorch it needs
    stride 1.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            if stride != (1, 1):
                raise EscoinError(f"padding='same' needs stride 1, got stride {stride}")
            total_h, total_w = dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
            return total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2
        raise EscoinError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    ph, pw = pair(padding, "padding", 0)
    return ph, ph, pw, pw


def descriptor(input_shape: Sequence[int], weight_shape: Sequence[int], groups: int,
               stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1) -> tuple:
    """The 16-field C descriptor for an NCHW input and an (M, C/groups, kh, kw) weight."""
    if len(input_shape) != 4:
        raise EscoinError(f"x must have 4 dimensions (N, C, H, W), got shape {tuple(input_shape)}")
    n, c, h, w = (int(v) for v in input_shape)
    m, c_per_group, kh, kw = (int(v) for v in weight_shape)
    if c != c_per_group * groups:
        raise EscoinError(
            f"x has {c} channels but the filter expects {c_per_group * groups} "
            f"({c_per_group} per group x {groups} groups)")
    s = pair(stride, "stride", 1)
    d = pair(dilation, "dilation", 1)
    top, bottom, left, right = padding_sides(padding, (kh, kw), s, d)
    return (n, c, h, w, m, kh, kw, s[0], s[1], top, bottom, left, right, d[0], d[1], groups)


def _is_int(value: object) -> bool:
    # type() first: a plain int is the common case, and the ABC check costs ~1 us a call
    # (a forward builds descriptors of ~30 values).
    return type(value) is int or (isinstance(value, numbers.Integral)
                                  and not isinstance(value, bool))
