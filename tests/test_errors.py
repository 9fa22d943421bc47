"""Every kind of bad input raises EscoinError naming the argument; nothing crashes."""
from __future__ import annotations

import numpy as np
import pytest

import escoin
from escoin import EscoinError


@pytest.fixture
def filt() -> escoin.SparseFilter:
    rng = np.random.default_rng(0)
    return escoin.SparseFilter.from_dense(rng.standard_normal((4, 3, 3, 3)).astype(np.float32))


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)


def test_wrong_rank(filt, x) -> None:
    with pytest.raises(EscoinError, match="x must have 3 .* or 4 .* dimensions"):
        escoin.conv2d(x[0, 0], filt)


def test_channel_mismatch(filt) -> None:
    with pytest.raises(EscoinError, match="x has 5 channels but the filter expects 3"):
        escoin.conv2d(np.ones((1, 5, 8, 8), np.float32), filt)


def test_integer_input(filt) -> None:
    with pytest.raises(EscoinError, match="x must be float32, float64, float16 or bfloat16"):
        escoin.conv2d(np.ones((1, 3, 8, 8), np.int32), filt)


def test_not_an_array(filt) -> None:
    with pytest.raises(EscoinError, match="x must be a NumPy array or a CUDA array"):
        escoin.conv2d([[1.0]], filt)


def test_not_a_filter(x) -> None:
    with pytest.raises(EscoinError, match="filt must be an escoin.SparseFilter"):
        escoin.conv2d(x, np.ones((4, 3, 3, 3), np.float32))


@pytest.mark.parametrize("stride", [0, -1, (1, 0), (1, 2, 3), 1.5, "2"])
def test_bad_stride(filt, x, stride) -> None:
    with pytest.raises(EscoinError, match="stride"):
        escoin.conv2d(x, filt, stride=stride)


@pytest.mark.parametrize("dilation", [0, -2, (0, 1)])
def test_bad_dilation(filt, x, dilation) -> None:
    with pytest.raises(EscoinError, match="dilation"):
        escoin.conv2d(x, filt, dilation=dilation)


@pytest.mark.parametrize("padding", [-1, (0, -1), "full", 1.0])
def test_bad_padding(filt, x, padding) -> None:
    with pytest.raises(EscoinError, match="padding"):
        escoin.conv2d(x, filt, padding=padding)


def test_same_padding_needs_stride_one(filt, x) -> None:
    with pytest.raises(EscoinError, match="padding='same' needs stride 1"):
        escoin.conv2d(x, filt, padding="same", stride=2)


def test_kernel_larger_than_padded_input(filt) -> None:
    with pytest.raises(EscoinError, match="larger than the padded input"):
        escoin.conv2d(np.ones((1, 3, 2, 2), np.float32), filt, dilation=2)


def test_padding_too_large_for_32_bit_offsets(filt) -> None:
    with pytest.raises(EscoinError, match="32-bit offsets"):
        escoin.conv2d(np.ones((1, 3, 4, 4), np.float32), filt, padding=40000)


def test_out_wrong_shape(filt, x) -> None:
    with pytest.raises(EscoinError, match=r"out must be a NumPy array of shape \(2, 4, 6, 6\)"):
        escoin.conv2d(x, filt, out=np.empty((2, 4, 8, 8), np.float32))


def test_out_wrong_dtype(filt, x) -> None:
    with pytest.raises(EscoinError, match="out must be .* dtype float32"):
        escoin.conv2d(x, filt, out=np.empty((2, 4, 6, 6), np.float64))


def test_out_not_contiguous(filt, x) -> None:
    out = np.empty((2, 4, 6, 12), np.float32)[..., ::2]
    with pytest.raises(EscoinError, match="out must be C-contiguous"):
        escoin.conv2d(x, filt, out=out)


def test_bias_wrong_shape(filt, x) -> None:
    with pytest.raises(EscoinError, match=r"bias must have shape \(4,\)"):
        escoin.conv2d(x, filt, bias=np.ones(3, np.float32))


def test_weight_wrong_rank() -> None:
    with pytest.raises(EscoinError, match="weight must have 4 dimensions"):
        escoin.SparseFilter.from_dense(np.ones((4, 3, 3), np.float32))


def test_weight_wrong_dtype() -> None:
    with pytest.raises(EscoinError, match="weight must be float32, float64, float16 or bfloat16"):
        escoin.SparseFilter.from_dense(np.ones((4, 3, 3, 3), np.int64))


def test_groups_must_divide_out_channels() -> None:
    with pytest.raises(EscoinError, match=r"groups \(3\) must divide the out_channels \(4\)"):
        escoin.SparseFilter.from_dense(np.ones((4, 3, 3, 3), np.float32), groups=3)


def test_negative_threshold() -> None:
    with pytest.raises(EscoinError, match="threshold must be >= 0"):
        escoin.SparseFilter.from_dense(np.ones((4, 3, 3, 3), np.float32), threshold=-1.0)


def test_csr_column_out_of_range() -> None:
    with pytest.raises(EscoinError, match=r"col_idx\[1\] = 27 is outside \[0, 27\)"):
        escoin.SparseFilter.from_csr([0, 1, 2], [0, 27], [1.0, 2.0], (2, 3, 3, 3))


def test_csr_negative_column() -> None:
    with pytest.raises(EscoinError, match=r"col_idx\[0\] = -1"):
        escoin.SparseFilter.from_csr([0, 1, 1], [-1], [1.0], (2, 3, 3, 3))


def test_csr_row_ptr_decreasing() -> None:
    with pytest.raises(EscoinError, match="row_ptr must be non-decreasing"):
        escoin.SparseFilter.from_csr([0, 2, 1], [0, 1], [1.0, 2.0], (2, 3, 3, 3))


def test_csr_row_ptr_wrong_end() -> None:
    with pytest.raises(EscoinError, match=r"row_ptr\[2\] must equal nnz \(2\)"):
        escoin.SparseFilter.from_csr([0, 1, 1], [0, 1], [1.0, 2.0], (2, 3, 3, 3))


def test_csr_row_ptr_wrong_length() -> None:
    with pytest.raises(EscoinError, match=r"row_ptr must have M \+ 1 = 3 entries"):
        escoin.SparseFilter.from_csr([0, 1], [0], [1.0], (2, 3, 3, 3))


def test_csr_repeated_column() -> None:
    with pytest.raises(EscoinError, match="col_idx repeats column 4 in row 0"):
        escoin.SparseFilter.from_csr([0, 2, 2], [4, 4], [1.0, 2.0], (2, 3, 3, 3))


def test_csr_lengths_differ() -> None:
    with pytest.raises(EscoinError, match="col_idx and values must have the same length"):
        escoin.SparseFilter.from_csr([0, 1, 2], [0, 1], [1.0], (2, 3, 3, 3))


def test_csr_column_beyond_int32() -> None:
    with pytest.raises(EscoinError, match="col_idx has values outside the int32 range"):
        escoin.SparseFilter.from_csr([0, 1, 1], [2**40], [1.0], (2, 3, 3, 3))


def test_load_rejects_foreign_file(tmp_path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, a=np.ones(3))
    with pytest.raises(EscoinError, match="is not an escoin filter file"):
        escoin.SparseFilter.load(path)


def test_bad_stream_handle(filt, x) -> None:
    with pytest.raises(EscoinError, match="stream must be None, a non-negative int handle"):
        escoin.sconv(0, 0, 0, 0, 0, 0, 0, 0, x.shape, filt.shape, stream=-5)


def test_sconv_rejects_non_int_pointer(filt, x) -> None:
    with pytest.raises(EscoinError, match="x_ptr must be a non-negative int pointer"):
        escoin.sconv("0x10", 0, 0, 0, 0, 0, 0, 0, x.shape, filt.shape, device=0)


def test_sconv_on_host_pointers_names_what_it_cannot_take(filt, x) -> None:
    with pytest.raises(EscoinError, match="stream, tile_program_ptr and mma_program_ptr must "
                                          "be 0 with device='cpu'"):
        escoin.sconv(0, 0, 0, 0, 0, 0, 0, 0, x.shape, filt.shape, device="cpu", stream=7)
    with pytest.raises(EscoinError, match="mma_program_ptr must be 0"):
        escoin.sconv(0, 0, 0, 0, 0, 0, 0, 0, x.shape, filt.shape, device="cpu",
                     mma_program_ptr=64)
    with pytest.raises(EscoinError, match="device must be a CUDA device index or 'cpu'"):
        escoin.sconv(0, 0, 0, 0, 0, 0, 0, 0, x.shape, filt.shape, device="gpu")
    with pytest.raises(EscoinError, match="dtype must be float32, float64, float16 or bfloat16"):
        escoin.sconv(0, 0, 0, 0, 0, 0, 0, 0, x.shape, filt.shape, device="cpu", dtype="int8")
    with pytest.raises(EscoinError, match="x must not be NULL"):
        escoin.sconv(0, 0, 0, 0, 0, 0, 0, 0, x.shape, filt.shape, device="cpu")


def test_cpu_entry_rejects_tampered_offsets(filt, x) -> None:
    """The C entry checks host offsets itself: a caller passing bad ones gets an error."""
    from escoin import _core

    desc = escoin.geometry.descriptor(x.shape, filt.shape, 1)
    offsets = np.array(escoin.stretch_offsets(filt, x.shape))
    offsets[0] = 10**8
    y = np.empty((2, 4, 6, 6), np.float32)
    nbytes = _core.workspace_size(desc, "float32")
    ws = np.empty(nbytes, np.uint8)
    with pytest.raises(EscoinError, match=r"offsets\[0\] = 100000000 is in input channel"):
        _core.forward_cpu(desc, "float32", x.ctypes.data, filt.row_ptr.ctypes.data,
                          offsets.ctypes.data, filt.values.ctypes.data, 0, 0, False,
                          y.ctypes.data, ws.ctypes.data, nbytes)


@pytest.mark.parametrize("nonzeros", [300, 40_000])  # checked on one thread, on every thread
@pytest.mark.parametrize("kind", ["negative", "past the group", "between taps",
                                  "in a channel's gap"])
def test_cpu_entry_names_the_first_bad_offset(nonzeros: int, kind: str) -> None:
    """Every offset is checked, wherever it sits, and the message names the first bad one
    whichever thread met it."""
    from escoin import _core

    rng = np.random.default_rng(3)
    channels = -(-nonzeros // 72)  # 8 output channels x 9 taps per input channel, all kept
    weight = rng.standard_normal((8, channels, 3, 3)).astype(np.float32)
    dense = escoin.SparseFilter.from_dense(weight)
    x = rng.standard_normal((1, channels, 5, 5)).astype(np.float32)
    desc = escoin.geometry.descriptor(x.shape, dense.shape, 1, 1, 1)
    offsets = np.array(escoin.stretch_offsets(dense, x.shape, padding=1))
    layout = _core.conv_layout(desc)
    stride = dict(layout)["channel_stride"]
    # 5x5 padded to 7x7 planes, 52 elements a channel: taps read elements r * 7 + s (r, s < 3)
    # of a channel, element 3 is the fourth column of its first row, 49-51 the gap after it
    bad = {"negative": -5, "past the group": channels * stride + 1, "between taps": 3,
           "in a channel's gap": stride - 1}[kind]
    first = dense.nnz // 3  # in the first thread's half of the offsets where there are two
    offsets[first] = bad
    offsets[-1] = bad  # a later one, in the other half, which the message must not name
    y = np.empty((1, 8, 5, 5), np.float32)
    nbytes = _core.workspace_size(desc, "float32")
    ws = np.empty(nbytes, np.uint8)
    expected = {"negative": "is negative", "past the group": "is in input channel"}.get(
        kind, "is not a tap of this geometry")
    with pytest.raises(EscoinError, match=rf"offsets\[{first}\] = {bad} {expected}"):
        _core.forward_cpu(desc, "float32", x.ctypes.data, dense.row_ptr.ctypes.data,
                          offsets.ctypes.data, dense.values.ctypes.data, 0, 0, False,
                          y.ctypes.data, ws.ctypes.data, nbytes)


def test_cpu_entry_rejects_small_workspace(filt, x) -> None:
    from escoin import _core

    desc = escoin.geometry.descriptor(x.shape, filt.shape, 1)
    offsets = escoin.stretch_offsets(filt, x.shape)
    y = np.empty((2, 4, 6, 6), np.float32)
    ws = np.empty(16, np.uint8)
    with pytest.raises(EscoinError, match="workspace_bytes is 16 but this geometry needs"):
        _core.forward_cpu(desc, "float32", x.ctypes.data, filt.row_ptr.ctypes.data,
                          offsets.ctypes.data, filt.values.ctypes.data, 0, 0, False,
                          y.ctypes.data, ws.ctypes.data, 16)


def test_cpu_workspace_too_small(filt, x) -> None:
    with pytest.raises(EscoinError, match="workspace must be a writeable C-contiguous NumPy array"):
        escoin.conv2d(x, filt, workspace=np.empty(8, np.uint8))


def test_device_pointers_need_a_device(filt, x) -> None:
    with pytest.raises(EscoinError, match="device must be given for a filter that lives on the cpu"):
        filt.device_pointers(x.shape, padding=1)


def test_cpu_entry_rejects_missing_values(filt, x) -> None:
    """A caller of the C entry passing no values for a filter with nonzeros gets an error, not a
    read through a null pointer."""
    from escoin import _core

    desc = escoin.geometry.descriptor(x.shape, filt.shape, 1)
    offsets = escoin.stretch_offsets(filt, x.shape)
    y = np.empty((2, 4, 6, 6), np.float32)
    nbytes = _core.workspace_size(desc, "float32")
    ws = np.empty(nbytes, np.uint8)
    with pytest.raises(EscoinError, match="values must not be NULL"):
        _core.forward_cpu(desc, "float32", x.ctypes.data, filt.row_ptr.ctypes.data,
                          offsets.ctypes.data, 0, 0, 0, False, y.ctypes.data, ws.ctypes.data,
                          nbytes)


def test_cpu_entry_rejects_a_residual_overlapping_y(filt, x) -> None:
    """y = relu(conv + residual) is written while the residual is read: the C entry refuses a
    residual that shares memory with y, by a part as well as whole."""
    from escoin import _core

    desc = escoin.geometry.descriptor(x.shape, filt.shape, 1)
    offsets = escoin.stretch_offsets(filt, x.shape)
    y = np.empty((2, 4, 6, 6), np.float32)
    shifted = np.empty(y.size * 2, np.float32)
    nbytes = _core.workspace_size(desc, "float32")
    ws = np.empty(nbytes, np.uint8)
    for residual in (y.ctypes.data, shifted.ctypes.data + 4 * (y.size - 1)):
        target = y.ctypes.data if residual == y.ctypes.data else shifted.ctypes.data
        with pytest.raises(EscoinError, match="residual must not overlap y"):
            _core.forward_cpu(desc, "float32", x.ctypes.data, filt.row_ptr.ctypes.data,
                              offsets.ctypes.data, filt.values.ctypes.data, 0, residual, False,
                              target, ws.ctypes.data, nbytes)


@pytest.mark.parametrize("residual, message", [
    (np.zeros((2, 4, 6, 5), np.float32), r"residual must have the output's shape \(2, 4, 6, 6\)"),
    (np.zeros((2, 4, 6, 6), np.int32), "residual must be floating point"),
])
def test_residual_of_wrong_shape_or_type(filt, x, residual: np.ndarray, message: str) -> None:
    with pytest.raises(EscoinError, match=message):
        escoin.conv2d(x, filt, residual=residual)
