"""The tiled CUDA kernel's tile program, built on the host: decoded here and checked entry by
entry against the CSR it came from, so the layout the kernel relies on is tested without a GPU."""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import escoin
from escoin import EscoinError, _core
from escoin.geometry import descriptor

MAGIC, HEADER_WORDS = 0x45534354, 4
CHANNELS, POSITIONS, WINDOW = 8, 8, 16  # cuda/src/geometry.hpp, tile_program.hpp
SHIFTS = WINDOW - POSITIONS + 1


def decode(words: np.ndarray) -> Tuple[int, List[List[Tuple[int, int, float]]]]:
    """Per item, the (offset, channel, value) of each entry, from the windows' bases and cases."""
    magic, items, windows, entries = (int(v) for v in words[:HEADER_WORDS])
    assert magic == MAGIC
    item_first = words[HEADER_WORDS:HEADER_WORDS + items + 1]
    windows_at = (HEADER_WORDS + items + 2) // 2 * 2
    window_pairs = words[windows_at:windows_at + 2 * (windows + 1)].reshape(-1, 2)
    entry_pairs = words[windows_at + 2 * (windows + 1):].reshape(-1, 2)
    assert entry_pairs.shape[0] == entries + 1  # one padding entry for the read-ahead
    assert window_pairs[-1, 1] == entries
    decoded = []
    for item in range(items):
        found = []
        for w in range(item_first[item], item_first[item + 1]):
            base, first = window_pairs[w]
            last = window_pairs[w + 1, 1]
            assert base % 4 == 0 and last > first  # aligned, never empty
            for case, bits in entry_pairs[first:last]:
                channel, shift = divmod(int(case), SHIFTS)
                assert channel < CHANNELS
                found.append((int(base) + shift, channel,
                              float(np.array(bits, np.int32).view(np.float32))))
        decoded.append(found)
    return items, decoded


@settings(max_examples=40, deadline=None)
@given(out_channels=st.integers(1, 30), in_channels=st.integers(1, 12),
       kernel=st.integers(2, 5), dilation=st.integers(1, 2), groups=st.sampled_from([1, 2, 3]),
       width=st.integers(24, 40), density=st.floats(0.5, 1.0), seed=st.integers(0, 2**32 - 1))
def test_every_nonzero_appears_once_in_its_tile(out_channels: int, in_channels: int,
                                                kernel: int, dilation: int, groups: int,
                                                width: int, density: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (out_channels * groups, in_channels, kernel, kernel)
    weight = (rng.standard_normal(shape) * (rng.random(shape) < density)).astype(np.float32)
    weight[..., :2] = 1.0  # two neighbouring taps in every row: >= 2 nonzeros per window
    filt = escoin.SparseFilter.from_dense(weight, groups=groups)
    x_shape = (2, in_channels * groups, 40, width)  # >= 1000 positions: warps >= 80% busy
    desc = descriptor(x_shape, filt.shape, groups, 1, "same", dilation)
    program = filt._store.tile_program(desc)
    assert program is not None  # wide planes and >= 2 nonzeros per window: the tiled kernel pays
    items, decoded = decode(program.view(np.int32))
    tiles = -(-out_channels // CHANNELS)
    assert items == groups * tiles
    offsets = filt._store.offsets(desc)
    expected: Dict[int, List[Tuple[int, int, float]]] = {}
    for m in range(filt.out_channels):
        group, local = divmod(m, out_channels)
        item = group * tiles + local // CHANNELS
        for j in range(filt.row_ptr[m], filt.row_ptr[m + 1]):
            expected.setdefault(item, []).append(
                (int(offsets[j]), local % CHANNELS, float(filt.values[j])))
    for item in range(items):
        got = decoded[item]
        assert [e[0] for e in got] == sorted(e[0] for e in got)  # windows walk the input in order
        assert sorted(got) == sorted(expected.get(item, []))


@pytest.mark.parametrize("kernel, stride, size", [(1, 1, 32), (3, 2, 32), (3, 1, 7)])
def test_no_program_where_the_tiled_kernel_would_be_slower(kernel: int, stride: int,
                                                           size: int) -> None:
    """1x1 and stride-2 filters put about one nonzero in a window; a 7x7 plane fills a quarter
    of a warp: the streaming kernel is faster there, so no program is built."""
    rng = np.random.default_rng(kernel + stride + size)
    shape = (16, 32, kernel, kernel)
    weight = (rng.standard_normal(shape) * (rng.random(shape) < 0.1)).astype(np.float32)
    filt = escoin.SparseFilter.from_dense(weight)
    desc = descriptor((8, 32, size, size), filt.shape, 1, stride, kernel // 2, 1)
    assert filt._store.tile_program(desc) is None
    offsets = filt._store.offsets(desc)
    values = filt.values.astype(np.float32)
    program = np.empty(1 << 16, np.uint8)
    with pytest.raises(EscoinError, match="does not pay"):
        _core.tile_program_build(desc, filt.row_ptr.ctypes.data, offsets.ctypes.data,
                                 values.ctypes.data, program.ctypes.data, program.nbytes)


def test_program_rejects_an_offset_outside_the_input() -> None:
    weight = np.ones((2, 3, 3, 3), np.float32)
    filt = escoin.SparseFilter.from_dense(weight)
    desc = descriptor((1, 3, 30, 30), filt.shape, 1, 1, 1, 1)
    offsets = filt._store.offsets(desc).copy()
    offsets[5] = 1 << 30
    values = filt.values.astype(np.float32)
    with pytest.raises(EscoinError, match="offset"):
        _core.tile_program_size(desc, filt.row_ptr.ctypes.data, offsets.ctypes.data,
                                values.ctypes.data)


def test_program_buffer_too_small_is_refused() -> None:
    filt = escoin.SparseFilter.from_dense(np.ones((2, 3, 3, 3), np.float32))
    desc = descriptor((1, 3, 30, 30), filt.shape, 1, 1, 1, 1)
    values = filt.values.astype(np.float32)
    offsets = filt._store.offsets(desc)
    nbytes = _core.tile_program_size(desc, filt.row_ptr.ctypes.data, offsets.ctypes.data,
                                     values.ctypes.data)
    program = np.empty(nbytes, np.uint8)
    with pytest.raises(EscoinError, match="program has"):
        _core.tile_program_build(desc, filt.row_ptr.ctypes.data, offsets.ctypes.data,
                                 values.ctypes.data, program.ctypes.data, nbytes - 4)
