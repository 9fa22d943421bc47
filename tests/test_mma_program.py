"""The tensor-core kernel's MMA program, built on the host: decoded here fragment by fragment
(A's split parts, the 2:4 metadata, the B rows' shared-memory offsets) and checked against the
CSR it came from, so the layout the kernel relies on (cuda/src/mma_program.hpp) is tested
without a GPU."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings

import escoin
from benchmark_modules import benchmark_module
from escoin import _core
from escoin.geometry import descriptor
from escoin.testing.strategies import ConvCase
from geometry_strategies import tensor_core_conv_cases

MAGIC, HEADER_WORDS = 0x45534D31, 4
ROWS, POSITIONS, STEP_WORDS, SHARED_WORDS = 32, 128, 24, 24576  # mma_program.hpp: kMma*


class Plan(NamedTuple):
    plane_w: int  # the kernel's rows: the public layout's rounded up to a multiple of 8
    span: int
    span_stride: int
    chunk_channels: int


def plan_of(desc: tuple, layout: dict) -> Plan:
    """geometry.cpp's mma_layout and mma_program.cpp's mma_plan, restated: the decoder must not
    trust the program's view."""
    _, c, _, _, _, kh, kw, sh, sw, _, _, _, _, dh, dw, _ = desc
    plane_w = -(-layout["plane_w"] // 8) * 8
    reach = (kh - 1) * dh // sh * plane_w + (kw - 1) * dw // sw
    span = -(-(POSITIONS + reach) // 4) * 4
    span_stride = span + (40 - span % 32) % 32  # 8 words past a multiple of 32
    fits = SHARED_WORDS // 2 // span_stride
    return Plan(plane_w, span, span_stride, min(fits // 32 * 32 if fits >= 32 else fits, c))


def bf16_to_float(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def bf16_round(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to bf16 (nearest, ties to even), as floats."""
    bits = np.asarray(values, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint32)
    return bf16_to_float(rounded)


def decode(program: np.ndarray, desc: tuple) -> np.ndarray:
    """The weights the program multiplies, hi + lo parts added, as a dense (M, C, within) array
    (within: the tap's shift in a channel of the public stretched layout); checks the header,
    the metadata's form and every offset's bounds on the way."""
    layout = _core.conv_layout(desc)
    plan = plan_of(desc, layout)
    m, c = desc[4], desc[1]
    words = program.view(np.uint32)
    magic, tiles, chunks, steps = (int(v) for v in words[:HEADER_WORDS])
    assert magic == MAGIC
    assert tiles == -(-m // ROWS) and chunks == -(-c // plan.chunk_channels)
    begins = words[HEADER_WORDS:HEADER_WORDS + tiles * chunks + 1].astype(np.int64)
    assert begins[0] == 0 and begins[-1] == steps and np.all(np.diff(begins) >= 0)
    steps_at = -(-(HEADER_WORDS + tiles * chunks + 1) // 4) * 4
    assert words.size == steps_at + steps * STEP_WORDS * 32
    # [step][16-byte group][lane][4] -> [step][lane][word]
    lanes = words[steps_at:].reshape(steps, STEP_WORDS // 4, 32, 4).transpose(0, 2, 1, 3)
    lanes = lanes.reshape(steps, 32, STEP_WORDS)
    assert np.all(lanes[:, :, 22:] == 0)
    weights = np.zeros((tiles * ROWS, c, layout["channel_stride"]))
    for tile in range(tiles):
        for chunk in range(chunks):
            for step in range(begins[tile * chunks + chunk], begins[tile * chunks + chunk + 1]):
                decode_step(lanes[step], tile, chunk, plan, layout["plane_w"], weights)
    return weights[:m]


def decode_step(lane_words: np.ndarray, tile: int, chunk: int, plan: Plan, public_w: int,
                weights: np.ndarray) -> None:
    """Adds one step's weights into `weights` at their (row, channel, within), within moved
    from the kernel's rows (plan.plane_w) to the public layout's (public_w)."""
    # Offsets of the 32 columns: lane t's word 18 + i holds columns 8i + 2t and 8i + 2t + 1.
    offsets = np.zeros(32, np.int64)
    for t in range(4):
        for i in range(4):
            word = int(lane_words[t, 18 + i])
            offsets[8 * i + 2 * t], offsets[8 * i + 2 * t + 1] = word & 0xFFFF, word >> 16
        assert np.all(lane_words[t::4, 18:22] == lane_words[t, 18:22])  # every g alike
    assert np.all(offsets < plan.chunk_channels * plan.span_stride)
    for half in range(2):
        # The compressed 16 x 16 matrix (hi + lo) from the m16n8k16 A layout.
        compressed = np.zeros((16, 16))
        for lane in range(32):
            g, t = divmod(lane, 4)
            for low in range(2):
                regs = lane_words[lane, 8 * half + 4 * low:8 * half + 4 * low + 4]
                for reg, (row, col) in enumerate(((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8),
                                                  (g + 8, 2 * t + 8))):
                    pair = np.array([int(regs[reg]) & 0xFFFF, int(regs[reg]) >> 16])
                    compressed[row, col:col + 2] += bf16_to_float(pair)
        # Metadata: lane 4g + t (t < 2) holds groups 4t..4t+3 of row g (low) and g + 8 (high).
        nibbles = np.zeros((16, 8), np.int64)
        for g in range(8):
            for t in range(2):
                word = int(lane_words[4 * g + t, 16 + half])
                for k in range(4):
                    nibbles[g, 4 * t + k] = (word >> (4 * k)) & 0xF
                    nibbles[g + 8, 4 * t + k] = (word >> (16 + 4 * k)) & 0xF
            for t in range(2, 4):
                assert lane_words[4 * g + t, 16 + half] == 0
        first, second = nibbles & 3, nibbles >> 2
        assert np.all(first < second), "each group's two kept columns, in order"
        for row in range(16):
            for k in range(8):
                for i, kept in enumerate((first[row, k], second[row, k])):
                    value = compressed[row, 2 * k + i]
                    if value == 0:
                        continue
                    offset = int(offsets[4 * k + kept])
                    channel = chunk * plan.chunk_channels + offset // plan.span_stride
                    within = offset % plan.span_stride
                    assert within + POSITIONS <= plan.span, "a read past the channel's span"
                    tap_row, tap_column = divmod(within, plan.plane_w)
                    assert tap_column < public_w
                    weights[tile * ROWS + 16 * half + row, channel,
                            tap_row * public_w + tap_column] += value


def expected_weights(filt: escoin.SparseFilter, desc: tuple) -> np.ndarray:
    layout = _core.conv_layout(desc)
    offsets = filt._store.offsets(desc).astype(np.int64)
    rows = np.repeat(np.arange(filt.out_channels), np.diff(filt.row_ptr))
    dense = np.zeros((filt.out_channels, desc[1], layout["channel_stride"]))
    np.add.at(dense, (rows, offsets // layout["channel_stride"],
                      offsets % layout["channel_stride"]), filt.values.astype(np.float64))
    return dense


def check_program(case: ConvCase) -> None:
    filt = escoin.SparseFilter.from_dense(case.weight.astype(np.float32))
    desc = descriptor(case.x.shape, filt.shape, 1, case.stride, case.padding, case.dilation)
    program = filt._store.program("mma", desc)
    assert program is not None
    decoded = decode(program, desc)
    expected = expected_weights(filt, desc)
    # hi = bf16(w) and lo = bf16(w - hi): within 2^-17 of w, relative
    np.testing.assert_allclose(decoded, expected, rtol=2.0 ** -16, atol=0)
    hi = bf16_round(filt.values)
    assert np.all(np.abs(filt.values - hi) <= np.abs(filt.values) * 2.0 ** -8)


@settings(max_examples=80, deadline=None)
@given(case=tensor_core_conv_cases())
def test_program_holds_every_weight_once(case: ConvCase) -> None:
    check_program(case)


@pytest.mark.parametrize("shape", [(1, 70, 8, 700, 40, 3), (2, 64, 14, 14, 96, 3),
                                   (1, 256, 7, 7, 33, 1)])
def test_programs_of_several_chunks_and_tiles(shape: tuple) -> None:
    """Rows wider than a block (few channels a chunk: several chunks), partial tiles."""
    n, c, h, w, m, k = shape
    rng = np.random.default_rng(sum(shape))
    weight = rng.standard_normal((m, c, k, k)) * (rng.random((m, c, k, k)) < 0.15)
    case = ConvCase(rng.standard_normal((n, c, h, w)), weight, None, (1, 1), (k // 2, k // 2),
                    (k // 2,) * 4, (1, 1), 1, False)
    check_program(case)


def test_size_is_what_build_writes() -> None:
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((48, 20, 3, 3)) * (rng.random((48, 20, 3, 3)) < 0.2)
    filt = escoin.SparseFilter.from_dense(weight.astype(np.float32))
    program = filt.mma_program((2, 20, 9, 11), padding=1)
    desc = descriptor((2, 20, 9, 11), filt.shape, 1, 1, 1, 1)
    offsets = filt._store.offsets(desc)
    values = filt._store.values_as(np.dtype(np.float32))
    args = (desc, filt.row_ptr.ctypes.data, offsets.ctypes.data, values.ctypes.data)
    assert _core.program_size("mma", *args) == program.nbytes
    with pytest.raises(escoin.EscoinError, match="program has"):
        _core.program_build("mma", *args, np.empty(8, np.uint8).ctypes.data, 8)


@pytest.mark.parametrize("groups, stride, kernel", [(2, 1, 3), (1, 2, 3), (1, 3, 2)])
def test_no_program_where_the_kernel_cannot_run(groups: int, stride: int, kernel: int) -> None:
    weight = np.ones((32, 8 // groups, kernel, kernel), np.float32)
    filt = escoin.SparseFilter.from_dense(weight, groups=groups)
    assert filt.mma_program((1, 8, 12, 12), stride=stride) is None


def test_one_by_one_at_stride_two_has_a_program() -> None:
    """ResNet's downsampling shortcut reads one phase plane: the kernel runs it."""
    weight = np.ones((32, 8, 1, 1), np.float32)
    filt = escoin.SparseFilter.from_dense(weight)
    assert filt.mma_program((1, 8, 12, 12), stride=2) is not None


def test_only_tensor_core_calls_pay_for_its_longer_rows() -> None:
    """The tensor-core kernel's workspace holds the batch in its layout (rows rounded up to 8
    words: 58 -> 64 on a padded 56-wide plane); the default kernels' workspace does not grow
    for it."""
    filt = escoin.SparseFilter.from_dense(np.ones((64, 64, 3, 3), np.float32))
    shape = (32, 64, 56, 56)
    default = escoin.workspace_size(shape, filt, padding=1)
    either = escoin.workspace_size(shape, filt, padding=1, tensor_cores=True)
    desc = descriptor(shape, filt.shape, 1, 1, 1, 1)
    assert default == _core.workspace_size(desc, "float32")
    assert default < 32 * 64 * 58 * 64 * 4  # the public layout's rows: 58 elements
    assert either == _core.mma_workspace_size(desc) >= 32 * 64 * 58 * 64 * 4


def test_loads_read_about_one_word_per_bank() -> None:
    """The packing and arrangement's purpose (mma_program.hpp): a B load's four columns on four
    bank groups. On a VGG-like layer at 90% the loads average under 1.5 wavefronts (2.7-4.0 in
    offset order, ~2 at random)."""
    stats = benchmark_module("mma_program_stats")
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((128, 128, 3, 3)) * (rng.random((128, 128, 3, 3)) < 0.1)
    filt = escoin.SparseFilter.from_dense(weight.astype(np.float32))
    program = filt.mma_program((1, 128, 28, 28), padding=1)
    assert stats.wavefronts(stats.step_offsets(program)) < 1.5
