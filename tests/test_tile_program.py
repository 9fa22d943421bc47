"""The staged CUDA kernel's tile program, built on the host: decoded here and checked entry by
entry against the CSR it came from, so the layout the kernel relies on (cuda/src/tile_program.hpp)
is tested without a GPU."""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import escoin
from escoin import EscoinError, _core
from escoin.geometry import descriptor
from escoin.testing.strategies import kept_mask

# cuda/src/tile_program.hpp, restated: the decoder must not trust the library's view
MAGIC, GROUPED_MAGIC, HEADER_WORDS = 0x45534336, 0x45534736, 4
ROWS, ROWS_PER_WARP, PRODUCTS, SHARED_FLOATS = 32, 4, 8, 12256  # cuda/src/geometry.hpp: kStaged*
MAX_SPLITS, SMALL_GRID_BLOCKS = 16, 128  # cuda/src/geometry.cpp
BOX_MAX = 256  # cuda/src/geometry.hpp: kTensorBoxMax


class Plan(NamedTuple):
    images: int
    phases: int
    phase_plane: int
    segment: int
    chunk_channels: int
    whole_channels: bool
    tensor_copy: bool
    plane_w: int  # the plan's layout: the public one, or with tensor copies rows rounded to 4
    channel_stride: int
    lead: int  # tensor copies: zero columns before each row, so that a box starts on 16 bytes
    copy_align: int  # segments are copied from a multiple of this many elements


def plan_on(desc: tuple, layout: dict, tensor_copy: bool, lead: int, multiple: int = 1) -> Plan:
    """geometry.cpp's staged_plan_on, restated: the decoder must not trust the program's view."""
    _, c, _, _, m, kh, kw, sh, sw, _, _, _, _, dh, dw, groups = desc
    plane_w, channel_stride = layout["plane_w"], layout["channel_stride"]
    plane_q = layout["out_height"] * plane_w
    padded = {p: -(-plane_q // (32 * p)) * 32 * p for p in (8, 7, 4, 2)}
    fewest = min(padded[p] for p in (8, 4, 2))
    positions = next(p for p in (8, 4, 2) if padded[p] * 10 <= fewest * 11)
    if padded[7] * 100 < padded[positions] * 97:  # 7 where it leaves 3% fewer positions
        positions = 7
    reach = (kh - 1) * dh // sh * plane_w + (kw - 1) * dw // sw + lead
    # phase planes per axis: one where every tap's shift is a multiple of the stride
    phases = (1 if kh == 1 or dh % sh == 0 else sh) * (1 if kw == 1 or dw % sw == 0 else sw)
    images = PRODUCTS // positions
    share = SHARED_FLOATS // images // 32 * 32  # image shares start 128-byte aligned
    phase_plane = layout["plane_h"] * plane_w
    copy_align = 8 if channel_stride % 8 == 0 else 4  # a 32-byte sector where channels allow
    shifted = phases > 1 and phase_plane % copy_align != 0
    if tensor_copy:  # whole rows from the row of the tile's first position
        segment = -(-(plane_w - 4 + 32 * positions + reach) // plane_w) * plane_w
    else:
        segment = -(-(32 * positions + reach + (copy_align - 1 if shifted else 0)) // 4) * 4
    chunk_channels = min(c // groups, share // (phases * segment))
    # one tile over the whole plane: chunks copied whole, channel_stride apart in shared memory
    overrun = max(0, (phases - 1) * phase_plane + reach + 32 * positions - channel_stride)
    whole = (share - overrun) // channel_stride
    is_whole = padded[positions] == 32 * positions and whole > 0
    if is_whole:
        segment, chunk_channels = channel_stride, min(c // groups, whole)
    # small batch-1 grids: chunks cut so that their splits reach SMALL_GRID_BLOCKS blocks
    image_blocks = padded[positions] // (32 * positions) * groups * -(-(m // groups) // ROWS)
    wanted_chunks = min(MAX_SPLITS, -(-SMALL_GRID_BLOCKS // image_blocks))
    if chunk_channels > 0:  # in multiples of `multiple`, at least one where one fits
        wanted = max(-(-(c // groups) // wanted_chunks), multiple)
        chunk_channels = min(chunk_channels, wanted) // multiple * multiple
    return Plan(images, phases, phase_plane, segment, chunk_channels, is_whole, tensor_copy,
                plane_w, channel_stride, lead, copy_align)


def staged_plan(desc: tuple) -> Plan:
    """geometry.cpp's staged_plan: x's own layout where a 1x1 filter can read it, else tensor
    copies where the geometry allows them."""
    layout = dict(_core.conv_layout(desc))
    _, c, h, w, _, kh, kw, sh, sw, pt, pb, pl, pr, _, _, groups = desc
    unpadded_1x1 = kh == kw == sh == sw == 1 and pt == pb == pl == pr == 0
    if unpadded_1x1 and layout["channel_stride"] == h * w:  # x is the public layout
        return plan_on(desc, layout, False, 0)
    if unpadded_1x1 and c % 8 == 0 and (c // groups) % 8 == 0:  # x's channels, h * w apart
        plan = plan_on(desc, dict(layout, channel_stride=h * w), False, 0, multiple=8)
        if plan.whole_channels and plan.chunk_channels > 0:
            return plan
    box_left = -(-pl // 4) * 4  # rows: box_left zeros, x's row, zeros to a multiple of 4
    lead = box_left - pl
    if sh == sw == 1 and w % 4 == 0:
        for right in (0, pr):  # rows that leave their right padding to the next row, or hold it
            row = max(box_left + w + right, w + pr, layout["out_width"])
            rounded = dict(layout, plane_w=-(-row // 4) * 4)
            rounded["channel_stride"] = rounded["plane_h"] * rounded["plane_w"]
            if (rounded["plane_w"] > BOX_MAX
                    or rounded["channel_stride"] > (2**31 - 1) // (c // groups)):
                break  # no box that wide, or a group's span past 32-bit offsets
            plan = plan_on(desc, rounded, True, lead)
            wraps = box_left + w + pr > plan.plane_w
            if (0 < plan.chunk_channels <= BOX_MAX and plan.segment // plan.plane_w <= BOX_MAX
                    and not (plan.whole_channels and wraps)):
                return plan
    # the public layout, channels a multiple of 8 apart (32-byte sectors) where a group's span
    # still fits 32-bit offsets
    sector_aligned = -(-layout["channel_stride"] // 8) * 8
    if sector_aligned > (2**31 - 1) // (c // groups):
        sector_aligned = layout["channel_stride"]
    return plan_on(desc, dict(layout, channel_stride=sector_aligned), False, 0)


def staged_offset(offset: int, plan: Plan, layout: dict) -> int:
    """tile_program.cpp's staged_within, restated: a public-layout offset in the plan's layout,
    whose rows start with plan.lead more zeros and may be longer (or, with tensor copies,
    shorter: a tap may read the next row's leading zeros as its right padding)."""
    channel, within = divmod(offset, layout["channel_stride"])
    phase, d = divmod(within, layout["plane_h"] * layout["plane_w"])
    row, column = divmod(d, layout["plane_w"])
    return (channel * plan.channel_stride + phase * plan.phase_plane + row * plan.plane_w
            + plan.lead + column)


def decode(words: np.ndarray, plan: Plan
           ) -> Tuple[int, Dict[Tuple[int, int], List[Tuple[int, float]]]]:
    """Per (item, row of the item), the (stretched offset in the plan's layout, value) of each
    entry, from either form: rows, or row groups (a warp's ROWS_PER_WARP rows list their union
    once, each entry with a weight per row; 0 where a row has no nonzero there)."""
    magic, items, chunks, entries = (int(v) for v in words[:HEADER_WORDS])
    assert magic in (MAGIC, GROUPED_MAGIC)
    grouped = magic == GROUPED_MAGIC
    begins = words[HEADER_WORDS:HEADER_WORDS + items * chunks * ROWS + 1]
    entries_at = (HEADER_WORDS + begins.size + 1) // 2 * 2
    if grouped:
        shared_offsets = words[entries_at:entries_at + entries]
        weights_at = -(-(entries_at + entries) // 4) * 4  # 16-byte aligned float4s
        weights = words[weights_at:].view(np.float32).reshape(-1, ROWS_PER_WARP)
        assert weights.shape[0] == entries
        assert np.all(words[entries_at + entries:weights_at] == 0)
    else:
        pairs = words[entries_at:].reshape(-1, 2)
        assert pairs.shape[0] == entries
    assert entries == begins[-1]
    assert np.all(np.diff(begins) >= 0)
    decoded: Dict[Tuple[int, int], List[Tuple[int, float]]] = {}
    for key in range(items * chunks * ROWS):
        item, rest = divmod(key, chunks * ROWS)
        chunk, row = divmod(rest, ROWS)
        run = range(begins[key], begins[key + 1])
        if grouped and row % ROWS_PER_WARP:  # the warp's run is listed under its first row
            assert len(run) == 0
            continue
        for e in run:
            shared = int(shared_offsets[e] if grouped else pairs[e, 0])
            # (no tap here reads past its channel: the tests' outputs have several rows)
            if plan.whole_channels:  # channels lie in shared memory as in the input
                channel, within = divmod(shared, plan.segment)
                assert within < plan.phases * plan.phase_plane
            else:
                channel, rest = divmod(shared, plan.phases * plan.segment)
                phase, shifted = divmod(rest, plan.segment)
                d = shifted - phase * plan.phase_plane % plan.copy_align  # segments' starts
                assert 0 <= d < (plan.segment if plan.tensor_copy else plan.phase_plane)
                within = phase * plan.phase_plane + d
            assert channel < plan.chunk_channels
            offset = (chunk * plan.chunk_channels + channel) * plan.channel_stride + within
            if grouped:
                assert np.any(weights[e] != 0)  # an entry of the union: some row's nonzero
                for r, value in enumerate(weights[e]):
                    if value != 0:
                        decoded.setdefault((item, row + r), []).append((offset, float(value)))
            else:
                decoded.setdefault((item, row), []).append(
                    (offset, float(np.array(pairs[e, 1], np.int32).view(np.float32))))
    return items, decoded


@settings(max_examples=40, deadline=None)
@given(out_channels=st.integers(16, 70), in_channels=st.integers(1, 40),
       kernel=st.integers(1, 5), stride=st.integers(1, 2), dilation=st.integers(1, 2),
       groups=st.sampled_from([1, 2, 3]), size=st.integers(8, 60),
       density=st.floats(0.05, 1.0), seed=st.integers(0, 2**32 - 1))
def test_every_nonzero_appears_once_in_its_row_and_chunk(
        out_channels: int, in_channels: int, kernel: int, stride: int, dilation: int,
        groups: int, size: int, density: float, seed: int) -> None:
    check_program(out_channels, in_channels, kernel, stride, dilation, groups, size, density,
                  seed)


@pytest.mark.parametrize("size, stride, whole, tensor_copy",
                         [(7, 1, True, False), (13, 2, True, False), (40, 1, False, False),
                          (40, 2, False, False), (5, 1, True, True), (41, 1, False, True),
                          (41, 2, False, False)])
def test_every_copy_layout(size: int, stride: int, whole: bool, tensor_copy: bool) -> None:
    """Planes one tile covers are staged as whole channels, larger ones as segments; at stride 1
    on rows of a multiple of 4 (width size + 3), on rows rounded up to 4 for tensor copies."""
    plan = check_program(40, 24, 3, stride, 1, 1, size, 0.3, size + stride)
    assert (plan.whole_channels, plan.tensor_copy) == (whole, tensor_copy)


@pytest.mark.parametrize("in_channels, size, reads_x", [(24, 7, True), (20, 7, False),
                                                       (24, 3, True), (24, 39, False)])
def test_1x1_filters_copy_x_as_it_lies(in_channels: int, size: int, reads_x: bool) -> None:
    """A 1x1 filter at stride 1 on a plane that is not a multiple of 4 elements (size x size + 3)
    reads x's own channels, h * w apart, where one tile covers the plane and the channels are a
    multiple of 8 (so that an image's chunk starts on a 32-byte sector); elsewhere the public
    layout's, rounded up to 8."""
    plan = check_program(40, in_channels, 1, 1, 1, 1, size, 0.3, size)
    plane = size * (size + 3)
    assert plan.channel_stride == (plane if reads_x else -(-plane // 8) * 8)
    assert plan.chunk_channels % 8 == 0 or not reads_x


def pruned(out_channels: int, in_channels: int, kernel: int, groups: int, density: float,
           rng: np.random.Generator, block: int = 1) -> np.ndarray:
    """A random float32 filter of `groups` groups of out_channels, pruned as kept_mask does."""
    window = (in_channels, kernel, kernel)
    mask = kept_mask(rng, groups, out_channels, window, density, block)
    weight = (rng.standard_normal(mask.shape) * mask).astype(np.float32)
    weight[:, 0, 0, 0] = 1.0  # never an all-zero filter
    return weight


def check_program(out_channels: int, in_channels: int, kernel: int, stride: int, dilation: int,
                  groups: int, size: int, density: float, seed: int, block: int = 1,
                  form: Optional[bool] = None) -> Plan:
    """Builds the program of a random filter (pruned in blocks of `block` channels) and checks it
    entry by entry, and its form where `form` is given (True: row groups); returns its plan."""
    rng = np.random.default_rng(seed)
    weight = pruned(out_channels, in_channels, kernel, groups, density, rng, block)
    filt = escoin.SparseFilter.from_dense(weight, groups=groups)
    x_shape = (8, in_channels * groups, size, size + 3)
    desc = descriptor(x_shape, filt.shape, groups, stride, "same" if stride == 1 else 1,
                      dilation)
    program = filt._store.program("tile", desc)
    assert program is not None  # >= 16 output channels per group: the staged kernel pays
    plan = staged_plan(desc)
    items, decoded = decode(program.view(np.int32), plan)
    if form is not None:
        assert (program.view(np.int32)[0] == GROUPED_MAGIC) == form
    layout = dict(_core.conv_layout(desc))
    items_per_group = -(-out_channels // ROWS)
    assert items == groups * items_per_group
    offsets = filt._store.offsets(desc)
    expected: Dict[Tuple[int, int], List[Tuple[int, float]]] = {}
    for m in range(filt.out_channels):
        group, local = divmod(m, out_channels)
        key = (group * items_per_group + local // ROWS, local % ROWS)
        for j in range(filt.row_ptr[m], filt.row_ptr[m + 1]):
            expected.setdefault(key, []).append(
                (staged_offset(int(offsets[j]), plan, layout), float(filt.values[j])))
    assert {k: sorted(v) for k, v in decoded.items()} == {k: sorted(v) for k, v in expected.items()}
    # Other values on the same pattern: the pattern's program with those weights written in at
    # its weight slots is, byte for byte, the program built for them.
    values = rng.standard_normal(filt.nnz).astype(np.float32)
    built = escoin.SparseFilter.from_csr(filt.row_ptr, filt.col_idx, values, filt.shape, groups)
    np.testing.assert_array_equal(filt.with_values(values)._store.program("tile", desc),
                                  built._store.program("tile", desc))
    return plan


@pytest.mark.parametrize("out_channels, groups, kernel", [(64, 1, 3), (70, 1, 3), (18, 2, 1),
                                                          (40, 3, 5)])
def test_block_pruned_filters_take_the_row_group_form(out_channels: int, groups: int,
                                                      kernel: int) -> None:
    """Channels pruned in blocks of four share their pattern: the program lists it once per
    warp's four rows (four weights an entry), also where a group's last block has fewer rows
    (70 = 17 * 4 + 2, 18 = 4 * 4 + 2) or the warp rows past a group's channels."""
    check_program(out_channels, 24, kernel, 1, 1, groups, 20, 0.1, out_channels, block=4,
                  form=True)


@pytest.mark.parametrize("density, block, form", [(0.1, 1, False), (0.5, 1, False),
                                                  (0.1, 2, False), (0.1, 4, True),
                                                  (0.5, 8, True)])
def test_row_groups_only_where_a_warps_channels_share_their_pattern(density: float, block: int,
                                                                   form: bool) -> None:
    """Row groups where each warp's four channels share their pattern exactly (blocks of four,
    or of eight), so no channel multiplies an input its weights do not read. Random filters
    (whose unions at 50% would cost less: ~0.47 entries per nonzero) and blocks of two keep
    rows."""
    check_program(64, 48, 3, 1, 1, 1, 20, density, 7, block=block, form=form)


def test_one_weight_off_the_blocks_pattern_keeps_rows() -> None:
    """A block-pruned filter with one weight pruned inside a block: that block's union has an
    entry one of its channels does not read, so the whole program keeps the rows form."""
    rng = np.random.default_rng(5)
    weight = pruned(64, 48, 3, 1, 0.1, rng, block=4)
    x_shape = (8, 48, 20, 23)
    assert escoin.SparseFilter.from_dense(weight).tile_form(x_shape, 1, "same") == "row groups"
    weight[5, 0, 0, 0] = 0.0
    assert escoin.SparseFilter.from_dense(weight).tile_form(x_shape, 1, "same") == "rows"


def test_no_form_where_the_staged_kernel_would_not_pay() -> None:
    depthwise = escoin.SparseFilter.from_dense(np.ones((32, 1, 3, 3), np.float32), groups=32)
    assert depthwise.tile_form((1, 32, 8, 8), padding=1) is None


@pytest.mark.parametrize("forced, block", [("groups", 1), ("rows", 4)])
def test_the_form_can_be_forced(monkeypatch: pytest.MonkeyPatch, forced: str, block: int) -> None:
    monkeypatch.setenv("ESCOIN_TILE_FORM", forced)
    check_program(40, 24, 3, 2, 1, 1, 30, 0.1, 11, block=block, form=forced == "groups")


@pytest.mark.parametrize("width, channel_stride", [(11, 16), (2**30 - 4, 2**30 - 4)])
def test_sector_aligned_channels_where_a_group_fits_32_bit_offsets(width: int,
                                                                   channel_stride: int) -> None:
    """The staged kernel's stretched layout rounds channels up to 8 elements (32-byte sectors),
    except where a group of them would pass the 2^31 elements 32-bit offsets address (two
    channels of 2^30 - 4 elements fit, two of 2^30 would not): the workspace holds each image in
    the wider of the public layout (channels of 12 and 2^30 - 4) and the staged kernel's."""
    weight_shape = (32, 2, 1, 3)  # a 1x3 filter over one row: channels of `width` elements
    per_batch = [_core.workspace_size(descriptor((batch, 2, 1, width), weight_shape, 1),
                                      "float32") for batch in (1, 2)]
    assert per_batch[1] - per_batch[0] == 2 * channel_stride * 4
    assert staged_plan(descriptor((1, 2, 1, width), weight_shape, 1)).channel_stride == \
        channel_stride


def test_no_tensor_copy_layout_past_32_bit_offsets() -> None:
    """A plane whose tensor-copy rows (252 + 4 columns) would take a channel past 2^31 elements
    keeps the public layout's rows (254 columns, which make_geometry checked), its channels
    rounded up to 8 elements; the mirror agrees."""
    x_shape, weight_shape = (1, 1, 8_400_000, 252), (8, 1, 3, 3)
    per_batch = [_core.workspace_size(descriptor((batch, *x_shape[1:]), weight_shape, 1, 1, 1),
                                      "float32") for batch in (1, 2)]
    plan = staged_plan(descriptor(x_shape, weight_shape, 1, 1, 1))
    assert not plan.tensor_copy
    sector_aligned = -(-8_400_002 * 254 // 8) * 8  # 8 400 002 rows of 254, rounded up to 8
    assert per_batch[1] - per_batch[0] == plan.channel_stride * 4 == sector_aligned * 4


@pytest.mark.parametrize("out_channels, groups, width", [(8, 1, 32), (32, 32, 32), (32, 1, 9000)])
def test_no_program_where_the_staged_kernel_would_not_pay(out_channels: int, groups: int,
                                                          width: int) -> None:
    """Fewer than 16 output channels per group leave most of a block's 32 idle (8 channels, or
    depthwise); a 9000-wide row's segment does not fit in shared memory: no program then."""
    rng = np.random.default_rng(out_channels + groups + width)
    shape = (out_channels, 32 // groups, 3, 3)
    weight = (rng.standard_normal(shape) * (rng.random(shape) < 0.5)).astype(np.float32)
    filt = escoin.SparseFilter.from_dense(weight, groups=groups)
    desc = descriptor((8, 32, 4, width), filt.shape, groups, 1, 1, 1)
    assert filt._store.program("tile", desc) is None
    offsets = filt._store.offsets(desc)
    values = filt.values.astype(np.float32)
    program = np.empty(1 << 16, np.uint8)
    with pytest.raises(EscoinError, match="does not pay"):
        _core.program_build("tile", desc, filt.row_ptr.ctypes.data, offsets.ctypes.data,
                                 values.ctypes.data, program.ctypes.data, program.nbytes)


def test_program_rejects_an_offset_outside_the_input() -> None:
    weight = np.ones((32, 3, 3, 3), np.float32)
    filt = escoin.SparseFilter.from_dense(weight)
    desc = descriptor((1, 3, 30, 30), filt.shape, 1, 1, 1, 1)
    offsets = filt._store.offsets(desc).copy()
    offsets[5] = 1 << 30
    values = filt.values.astype(np.float32)
    with pytest.raises(EscoinError, match="offset"):
        _core.program_size("tile", desc, filt.row_ptr.ctypes.data, offsets.ctypes.data,
                                values.ctypes.data)


def test_program_rejects_an_offset_past_the_groups_channels() -> None:
    """With a one-row output the range bound reaches the offset one past the group's last
    channel; the CSR checks must refuse it (the builder would index a chunk that does not
    exist, the CPU kernel read the next group)."""
    filt = escoin.SparseFilter.from_dense(np.ones((32, 3, 3, 3), np.float32))
    desc = descriptor((1, 3, 3, 30), filt.shape, 1, 1, 0, 1)
    offsets = filt._store.offsets(desc).copy()
    values = filt.values.astype(np.float32)
    nbytes = _core.program_size("tile", desc, filt.row_ptr.ctypes.data, offsets.ctypes.data,
                                     values.ctypes.data)
    offsets[5] = 3 * _core.conv_layout(desc)["channel_stride"]
    program = np.empty(nbytes, np.uint8)
    with pytest.raises(EscoinError, match="input channel 3 of a group of 3"):
        _core.program_size("tile", desc, filt.row_ptr.ctypes.data, offsets.ctypes.data,
                                values.ctypes.data)
    with pytest.raises(EscoinError, match="input channel 3 of a group of 3"):
        _core.program_build("tile", desc, filt.row_ptr.ctypes.data, offsets.ctypes.data,
                                 values.ctypes.data, program.ctypes.data, program.nbytes)


@settings(max_examples=40, deadline=None)
@given(kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       dilation=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       pad=st.tuples(st.integers(0, 2), st.integers(0, 2)),
       size=st.tuples(st.integers(1, 9), st.integers(1, 9)))
def test_the_csr_check_accepts_exactly_the_taps(kernel: Tuple[int, int], stride: Tuple[int, int],
                                                dilation: Tuple[int, int], pad: Tuple[int, int],
                                                size: Tuple[int, int]) -> None:
    """Every element of a 2-channel group, offered as a filter's one offset: the check accepts
    the offsets escoin_stretch_offsets gives the filter window's columns and refuses every other
    one (between taps, in a phase plane's or channel's padding, past the group), so that no
    kernel reads past a staged segment or the workspace."""
    kh, kw = kernel
    h = max(size[0], dilation[0] * (kh - 1) + 1 - 2 * pad[0])
    w = max(size[1], dilation[1] * (kw - 1) + 1 - 2 * pad[1])
    desc = descriptor((1, 2, h, w), (1, 2, kh, kw), 1, stride, pad, dilation)
    window = 2 * kh * kw
    taps = np.empty(window, np.int32)
    _core.stretch_offsets(desc, np.arange(window, dtype=np.int32).ctypes.data, window,
                          taps.ctypes.data)
    row_ptr = np.array([0, 1], np.int64)
    value = np.ones(1, np.float32)
    span = 2 * _core.conv_layout(desc)["channel_stride"]
    accepted = set()
    for offset in range(-1, span + 2):
        one = np.array([offset], np.int32)
        try:
            _core.program_size("tile", desc, row_ptr.ctypes.data, one.ctypes.data,
                                    value.ctypes.data)
            accepted.add(offset)
        except EscoinError as error:
            assert f"offsets[0] = {offset} is" in str(error)
    assert accepted == set(taps.tolist())


@pytest.mark.parametrize("stride", [1, 2])
def test_the_csr_check_on_channels_too_large_for_its_bitmap(stride: int) -> None:
    """Channels of over 2^24 stretched elements are checked by arithmetic instead of a bitmap of
    the taps' elements: the same answers."""
    desc = descriptor((1, 1, 4200 * stride, 4200 * stride), (1, 1, 3, 3), 1, stride, 1, 1)
    layout = _core.conv_layout(desc)
    assert layout["channel_stride"] > 1 << 24
    taps = np.empty(9, np.int32)
    _core.stretch_offsets(desc, np.arange(9, dtype=np.int32).ctypes.data, 9, taps.ctypes.data)
    plane_w, plane = layout["plane_w"], layout["plane_h"] * layout["plane_w"]
    others = {3, plane_w - 1, plane_w + 3, 2 * plane_w + 3, 3 * plane_w, plane - 1,
              layout["channel_stride"] - 1} - set(taps.tolist())
    row_ptr, value = np.array([0, 1], np.int64), np.ones(1, np.float32)

    def accepted(offset: int) -> bool:
        one = np.array([offset], np.int32)
        try:
            _core.program_size("tile", desc, row_ptr.ctypes.data, one.ctypes.data,
                                    value.ctypes.data)
            return True
        except EscoinError as error:
            assert f"offsets[0] = {offset} is" in str(error)
            return False

    assert all(accepted(int(t)) for t in taps)
    assert not any(accepted(o) for o in others)


def test_program_buffer_too_small_is_refused() -> None:
    filt = escoin.SparseFilter.from_dense(np.ones((32, 3, 3, 3), np.float32))
    desc = descriptor((1, 3, 30, 30), filt.shape, 1, 1, 1, 1)
    values = filt.values.astype(np.float32)
    offsets = filt._store.offsets(desc)
    nbytes = _core.program_size("tile", desc, filt.row_ptr.ctypes.data, offsets.ctypes.data,
                                     values.ctypes.data)
    program = np.empty(nbytes, np.uint8)
    with pytest.raises(EscoinError, match="program has"):
        _core.program_build("tile", desc, filt.row_ptr.ctypes.data, offsets.ctypes.data,
                                 values.ctypes.data, program.ctypes.data, nbytes - 4)


def test_weight_slots_are_checked_as_the_program_is() -> None:
    """The slots' count must be the filter's nonzeros, and a geometry the staged kernel would
    not run has no slots, as it has no program."""
    filt = escoin.SparseFilter.from_dense(np.ones((32, 3, 3, 3), np.float32))
    desc = descriptor((1, 3, 30, 30), filt.shape, 1, 1, 1, 1)
    offsets = filt._store.offsets(desc)
    slots = np.zeros(filt.nnz, np.int64)
    with pytest.raises(EscoinError, match=f"slots has room for {filt.nnz - 1} entries, the "
                                          f"filter has {filt.nnz} nonzeros"):
        _core.tile_program_weight_slots(desc, filt.row_ptr.ctypes.data, offsets.ctypes.data,
                                        slots.ctypes.data, filt.nnz - 1)
    _core.tile_program_weight_slots(desc, filt.row_ptr.ctypes.data, offsets.ctypes.data,
                                    slots.ctypes.data, filt.nnz)
    assert len(set(slots.tolist())) == filt.nnz  # one word each (no column repeats in a row)
    depthwise = escoin.SparseFilter.from_dense(np.ones((32, 1, 3, 3), np.float32), groups=32)
    desc = descriptor((1, 32, 8, 8), depthwise.shape, 32, 1, 1, 1)
    offsets = depthwise._store.offsets(desc)
    with pytest.raises(EscoinError, match="does not pay"):
        _core.tile_program_weight_slots(desc, depthwise.row_ptr.ctypes.data,
                                        offsets.ctypes.data, slots.ctypes.data, depthwise.nnz)
