"""Argument normalisation with torch.nn.functional.conv2d's conventions, and the C descriptor."""
from __future__ import annotations

import numbers

from typing import Sequence, Tuple, Union

from escoin._errors import EscoinError

IntPair = Union[int, Sequence[int]]
Padding = Union[int, Sequence[int], str]

# The C descriptor's geometry fields are below 2^31 (escoin.h); sizes are int64.
_FIELD_LIMIT = 2 ** 31
_INT64_LIMIT = 2 ** 63


def ints(values: object, name: str, count: int, expected: str) -> Tuple[int, ...]:
    """`values` as `count` Python ints: integers (not floats or bools) within int64."""
    try:
        items = tuple(values)  # type: ignore[arg-type]
    except TypeError:
        items = ()
    if len(items) != count or not all(_is_int(v) and -_INT64_LIMIT <= v < _INT64_LIMIT
                                      for v in items):
        raise EscoinError(f"{name} must be {count} ints {expected}, got {values!r}")
    return tuple(int(v) for v in items)


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
    if max(items) >= _FIELD_LIMIT:
        raise EscoinError(f"{name} must be below 2^31, got {value!r}")
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
    n, c, h, w = ints(input_shape, "the input shape", 4, "(N, C, H, W)")
    if n < 0 or min(c, h, w) < 1:
        raise EscoinError(f"x must have a batch >= 0 and at least one channel, row and column, "
                          f"got shape {tuple(input_shape)}")
    m, c_per_group, kh, kw = ints(weight_shape, "weight_shape", 4, "(M, C/groups, kh, kw)")
    if min(m, c_per_group, kh, kw) < 1:
        raise EscoinError(f"weight_shape must be 4 positive ints, got {tuple(weight_shape)}")
    if not _is_int(groups) or groups < 1:
        raise EscoinError(f"groups must be a positive int, got {groups!r}")
    if c != c_per_group * groups:
        raise EscoinError(
            f"x has {c} channels but the filter expects {c_per_group * groups} "
            f"({c_per_group} per group x {groups} groups)")
    s = pair(stride, "stride", 1)
    d = pair(dilation, "dilation", 1)
    top, bottom, left, right = padding_sides(padding, (kh, kw), s, d)
    return (n, c, h, w, m, kh, kw, s[0], s[1], top, bottom, left, right, d[0], d[1], int(groups))


def _is_int(value: object) -> bool:
    # type() first: a plain int is the common case, and the ABC check costs ~1 us a call
    # (a forward builds descriptors of ~30 values).
    return type(value) is int or (isinstance(value, numbers.Integral)
                                  and not isinstance(value, bool))
