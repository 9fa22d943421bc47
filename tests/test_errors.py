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


@pytest.mark.parametrize("call", [
    # Padded extents near 2^32 on both axes: their product passes int64.
    lambda: escoin.conv2d(np.ones((1, 1, 2, 2), np.float32),
                          escoin.SparseFilter.from_dense(np.ones((1, 1, 1, 1), np.float32)),
                          padding=2 ** 31 - 1),
    lambda: escoin.conv2d(np.ones((1, 1, 2, 2), np.float32),
                          escoin.SparseFilter.from_dense(np.ones((1, 1, 3, 3), np.float32)),
                          padding="same", dilation=2 ** 31 - 1),
    lambda: escoin.workspace_size((1, 1, 2, 2),
                                  escoin.SparseFilter.from_dense(np.ones((1, 1, 3, 3),
                                                                         np.float32)),
                                  padding="same", dilation=1_600_000_000),
])
def test_planes_past_int64_are_refused(call) -> None:
    with pytest.raises(EscoinError, match="32-bit offsets"):
        call()


def test_out_wrong_shape(filt, x) -> None:
    with pytest.raises(EscoinError, match=r"out must be a NumPy array of shape \(2, 4, 6, 6\)"):
        escoin.conv2d(x, filt, out=np.empty((2, 4, 8, 8), np.float32))


def test_out_wrong_dtype(filt, x) -> None:
    with pytest.raises(EscoinError, match="out must be .* dtype float32"):
        escoin.conv2d(x, filt, out=np.empty((2, 4, 6, 6), np.float64))


def test_out_of_the_other_byte_order_is_named(filt, x) -> None:
    """A big-endian x computes (converted first), but its output must be in native order: the
    error says so, where 'dtype float32' alone reads the same for both."""
    swapped = x.astype(x.dtype.newbyteorder("S"))
    np.testing.assert_allclose(escoin.conv2d(swapped, filt), escoin.conv2d(x, filt))
    with pytest.raises(EscoinError, match="dtype float32 in native byte order, got .* "
                                          "\\(byte order '[<>]'\\)"):
        escoin.conv2d(swapped, filt, out=np.empty((2, 4, 6, 6), swapped.dtype))


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
    with pytest.raises(EscoinError, match="threshold must be a real number >= 0"):
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
    # A host pointer with device left out (the CUDA path, which finds x's device from it):
    with pytest.raises(EscoinError, match=r"x_ptr must be CUDA device memory where device is "
                                          r"not given \(device='cpu' for host memory\)"):
        escoin.sconv(x.ctypes.data, 0, 0, 0, 0, 0, 0, 0, x.shape, filt.shape)


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
    with pytest.raises(EscoinError,
                       match="device must be given for a filter that lives on the cpu"):
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


@pytest.mark.parametrize("array", ["row_ptr", "offsets", "values"])
@pytest.mark.parametrize("written", ["y", "workspace"])
@pytest.mark.parametrize("trusted", [False, True])
def test_cpu_entry_rejects_a_filter_array_the_call_writes(filt, x, array: str, written: str,
                                                          trusted: bool) -> None:
    """The call reads the filter's arrays while it writes y and the workspace: an offset that y
    overwrote mid-call would send reads anywhere (it crashed), a value the stretch overwrote
    gave a wrong answer. Each filter array placed inside y or the workspace is refused, on the
    entry that checks the offsets and on the one that trusts them."""
    from escoin import _core

    desc = escoin.geometry.descriptor(x.shape, filt.shape, 1)
    nbytes = _core.workspace_size(desc, "float32")
    filter_arrays = {"row_ptr": filt.row_ptr, "offsets": escoin.stretch_offsets(filt, x.shape),
                     "values": filt.values}
    y = np.zeros((2, 4, 6, 6), np.float32)
    ws = np.zeros(nbytes, np.uint8)
    host = y if written == "y" else ws
    source = filter_arrays[array]
    assert source.nbytes <= host.nbytes
    inside = host.reshape(-1).view(np.uint8)[-source.nbytes:].view(source.dtype)
    inside[:] = source  # the right contents, in the wrong place
    filter_arrays[array] = inside
    with pytest.raises(EscoinError, match=f"{written} must not overlap {array}"):
        _core.forward_cpu(desc, "float32", x.ctypes.data, filter_arrays["row_ptr"].ctypes.data,
                          filter_arrays["offsets"].ctypes.data,
                          filter_arrays["values"].ctypes.data, 0, 0, False, y.ctypes.data,
                          ws.ctypes.data, nbytes, offsets_trusted=trusted)


@pytest.mark.parametrize("residual, message", [
    (np.zeros((2, 4, 6, 5), np.float32), r"residual must have the output's shape \(2, 4, 6, 6\)"),
    (np.zeros((2, 4, 6, 6), np.int32), "residual must be floating point"),
])
def test_residual_of_wrong_shape_or_type(filt, x, residual: np.ndarray, message: str) -> None:
    with pytest.raises(EscoinError, match=message):
        escoin.conv2d(x, filt, residual=residual)


def test_bias_overlapping_the_output_is_refused(filt, x) -> None:
    """The kernels read bias while they write y: a bias inside out would change as it is read."""
    out = np.empty((2, 4, 6, 6), np.float32)
    bias = out.reshape(-1)[:4]
    bias[:] = np.arange(4)
    with pytest.raises(EscoinError, match="bias must not overlap y"):
        escoin.conv2d(x, filt, bias=bias, out=out)


def test_workspace_overlapping_an_operand_is_refused(filt, x) -> None:
    nbytes = escoin.workspace_size(x.shape, filt)
    ws = np.zeros(nbytes + x.nbytes, np.uint8)
    inside = ws[:x.nbytes].view(np.float32).reshape(x.shape)
    inside[:] = x
    with pytest.raises(EscoinError, match="workspace must not overlap x"):
        escoin.conv2d(inside, filt, workspace=ws[:nbytes])
    out = ws[nbytes - 100:nbytes - 100 + 4 * 2 * 4 * 6 * 6].view(np.float32).reshape(2, 4, 6, 6)
    with pytest.raises(EscoinError, match="workspace must not overlap y"):
        escoin.conv2d(x, filt, workspace=ws[:nbytes], out=out)  # (its last 100 bytes)


@pytest.mark.parametrize("stride", [9, 10_000, 2 ** 31 - 1])
def test_a_stride_past_the_input_costs_no_more_than_one_output(filt, x, stride: int) -> None:
    """Any stride past the input's last window start gives one output along its axis: the
    workspace stays the input's size (it was stride^2 phase planes: 1.2 GB at 10,000)."""
    from escoin.testing import conv2d_reference, relative_error

    assert escoin.workspace_size(x.shape, filt, stride=stride, padding=1) <= \
        escoin.workspace_size(x.shape, filt, stride=3, padding=1)
    y = escoin.conv2d(x, filt, stride=(stride, 2), padding=1)
    expected = conv2d_reference(x.astype(np.float64), filt.to_dense().astype(np.float64), None,
                                (stride, 2), (1, 1, 1, 1), (1, 1), 1)
    assert y.shape == expected.shape == (2, 4, 1, 4)
    assert relative_error(y, expected) <= 1e-5


@pytest.mark.parametrize("call, message", [
    (lambda f, x: escoin.conv2d(x, f, stride=2 ** 31), "stride must be below 2.31"),
    (lambda f, x: escoin.conv2d(x, f, padding=(0, 2 ** 64)), "padding must be below 2.31"),
    (lambda f, x: escoin.workspace_size((2, 3, 8.5, 8), f), "input shape must be 4 ints"),
    (lambda f, x: escoin.workspace_size((2, 3, 2 ** 63, 8), f), "input shape must be 4 ints"),
    (lambda f, x: escoin.workspace_size((2, 3, 0, 8), f), "at least one channel, row and col"),
    (lambda f, x: escoin.workspace_size(x.shape, np.ones((4, 3, 3, 3))),
     "filt must be an escoin.SparseFilter"),
    (lambda f, x: escoin.stretch_offsets(None, x.shape), "filt must be an escoin.SparseFilter"),
    (lambda f, x: escoin.sconv(1, 1, 1, 1, 1, 0, 1, 64, x.shape, (4, 3, 3), device="cpu"),
     "weight_shape must be 4 ints"),
    (lambda f, x: escoin.sconv(1, 1, 1, 1, 1, 0, 1, 64, x.shape, (4, 0, 3, 3), groups=0,
                               device="cpu"), "weight_shape must be 4 positive ints"),
    (lambda f, x: escoin.sconv(1, 1, 1, 1, 1, 0, 1, 64, x.shape, (4, 3, 3, 3), groups=1.0,
                               device="cpu"), "groups must be a positive int"),
    (lambda f, x: escoin.sconv(2 ** 64, 1, 1, 1, 1, 0, 1, 64, x.shape, (4, 3, 3, 3),
                               device="cpu"), "x_ptr must be a non-negative int pointer"),
    (lambda f, x: escoin.sconv(1, 1, 1, 1, 1, 0, 1, 64.0, x.shape, (4, 3, 3, 3), device="cpu"),
     "workspace_bytes must be a non-negative int"),
    (lambda f, x: escoin.SparseFilter.from_csr([0, 0], [], [], (1, 1, 3.7, 3)),
     "shape must be 4 ints"),
])
def test_arguments_out_of_range_are_named(filt, x, call, message: str) -> None:
    with pytest.raises(EscoinError, match=message):
        call(filt, x)


def test_an_empty_filter_from_plain_lists() -> None:
    filt = escoin.SparseFilter.from_csr([0, 0], [], [], (1, 2, 3, 3))
    x = np.ones((1, 2, 4, 4), np.float32)
    assert filt.nnz == 0 and not escoin.conv2d(x, filt).any()


def test_a_filter_file_missing_arrays_is_named(tmp_path) -> None:
    path = tmp_path / "partial.npz"
    np.savez(path, format=np.array("escoin-csr-1"), row_ptr=np.zeros(2, np.int64))
    with pytest.raises(EscoinError, match="lacks the arrays .*'col_idx'"):
        escoin.SparseFilter.load(path)


class _FakeCudaArray:
    """An object whose __cuda_array_interface__ is the dict given (no device memory behind it)."""

    def __init__(self, interface: dict) -> None:
        self.__cuda_array_interface__ = interface


class _RefusingDLPack:
    """A DLPack producer on a CUDA device whose export fails."""

    def __dlpack__(self, stream: object = None) -> object:
        raise BufferError("cannot export this tensor")

    def __dlpack_device__(self) -> tuple:
        return (2, 0)  # kDLCUDA


@pytest.mark.parametrize("x, message", [
    (_FakeCudaArray({"shape": (1, 1, 2, 2), "data": (0, False), "version": 3}),
     "x has a malformed __cuda_array_interface__ .KeyError: 'typestr'"),
    (_FakeCudaArray({"shape": (1, 1, 2, 2), "typestr": "zz", "data": (0, False)}),
     "x has a malformed __cuda_array_interface__ .TypeError"),
    (_FakeCudaArray({"shape": ("a",), "typestr": "<f4", "data": (0, False)}),
     "x has a malformed __cuda_array_interface__ .ValueError"),
    (_RefusingDLPack(), r"x.__dlpack__\(\) raised BufferError: cannot export"),
])
def test_a_broken_device_array_is_named(x: object, message: str) -> None:
    """A producer's malformed interface or failing export is reported as the argument's."""
    filt = escoin.SparseFilter.from_dense(np.ones((2, 1, 1, 1), np.float32))
    with pytest.raises(EscoinError, match=message):
        escoin.conv2d(x, filt)


def test_a_flag_without_one_truth_value_is_named(filt, x) -> None:
    """relu given an array of several values: named, not NumPy's ambiguity error."""
    with pytest.raises(EscoinError, match="relu must be a bool, got ndarray"):
        escoin.conv2d(x, filt, relu=np.array([1, 0]))


def test_a_filter_moved_to_cuda_says_where_escoin_has_no_cuda(
        filt, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a build without CUDA, SparseFilter.cuda names the build as the reason, not only the
    empty device range."""
    import escoin.info

    monkeypatch.setattr(escoin.info, "build_info", lambda: {"cuda": False})
    monkeypatch.setattr(escoin.info, "cuda_device_count", lambda: 0)
    with pytest.raises(EscoinError, match=r"in \[0, 0\), got 0 \(escoin was built without CUDA"):
        filt.cuda(0)
