"""SparseFilter.prepare: a call derived once and run on addresses, on the CPU and on a GPU."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

import escoin
from escoin import EscoinError
from escoin.geometry import descriptor
from escoin.testing import conv2d_reference, relative_error
from escoin.testing.strategies import ConvCase, conv_cases
from geometry_strategies import staged_conv_cases


def _expected(case: ConvCase, residual=None) -> np.ndarray:
    return conv2d_reference(case.x, case.weight, case.bias, case.stride, case.pads,
                            case.dilation, case.groups, case.relu, residual)


def _run_on_host(case: ConvCase, dtype) -> np.ndarray:
    """The case through a call prepared for the CPU, into a poisoned output."""
    filt = escoin.SparseFilter.from_dense(case.weight.astype(dtype), groups=case.groups)
    call = filt.prepare(case.x.shape, case.stride, case.padding, case.dilation, dtype=dtype)
    assert call.output_shape == _expected(case).shape
    x = np.ascontiguousarray(case.x, dtype)
    residual = np.linspace(-1, 1, int(np.prod(call.output_shape))).reshape(call.output_shape)
    residual = residual.astype(dtype)
    bias = None if case.bias is None else case.bias.astype(dtype)
    y = np.full(call.output_shape, np.nan, dtype)
    workspace = np.empty(call.workspace_bytes, np.uint8)
    call.run(x.ctypes.data, y.ctypes.data, workspace.ctypes.data,
             0 if bias is None else bias.ctypes.data, residual.ctypes.data, case.relu)
    return y, _expected(case, residual.astype(np.float64))


@settings(max_examples=80, deadline=None)
@given(case=conv_cases())
def test_a_prepared_host_call_matches_the_reference(case: ConvCase) -> None:
    y, expected = _run_on_host(case, np.float32)
    assert relative_error(y, expected) <= 1e-5


@settings(max_examples=30, deadline=None)
@given(case=conv_cases())
def test_a_prepared_float64_host_call_matches_the_reference(case: ConvCase) -> None:
    y, expected = _run_on_host(case, np.float64)
    assert relative_error(y, expected) <= 1e-12


def _small_call(**geometry):
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((4, 3, 3, 3)) * (rng.random((4, 3, 3, 3)) < 0.5))
    filt = escoin.SparseFilter.from_dense(weight.astype(np.float32))
    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)
    return filt, x, filt.prepare(x.shape, padding=1, **geometry)


def test_run_names_a_bad_address() -> None:
    _, x, call = _small_call()
    y = np.empty(call.output_shape, np.float32)
    ws = np.empty(call.workspace_bytes, np.uint8)
    good = dict(x=x.ctypes.data, y=y.ctypes.data, workspace=ws.ctypes.data)
    for name in ("x", "y", "workspace", "bias", "residual"):
        for bad in (-1, True, "0x10", 1.5, 2 ** 64):
            with pytest.raises(EscoinError, match=f"^{name} must be a non-negative int pointer"):
                call.run(**{**good, name: bad})
    with pytest.raises(EscoinError, match="stream must be 0 for a call prepared for the CPU"):
        call.run(**good, stream=7)
    with pytest.raises(EscoinError, match="^relu must be a bool, got ndarray"):
        call.run(**good, relu=np.array([True, False]))


def test_prepare_names_a_bad_argument() -> None:
    filt, x, _ = _small_call()
    with pytest.raises(EscoinError, match="stride must be >= 1"):
        filt.prepare(x.shape, stride=0)
    with pytest.raises(EscoinError, match="x has 4 channels but the filter expects 3"):
        filt.prepare((2, 4, 6, 5))
    with pytest.raises(EscoinError, match="dtype must be"):
        filt.prepare(x.shape, dtype="int8")
    for device in ("gpu", -1, True, 1.5):
        with pytest.raises(EscoinError, match="device must be a CUDA device index or 'cpu'"):
            filt.prepare(x.shape, device=device)
    with pytest.raises(EscoinError, match="float64 runs on the CPU only"):
        filt.prepare(x.shape, dtype="float64", device=0)


def test_prepare_names_bad_values() -> None:
    """values are a CUDA call's: a host call or host memory is refused by name, before any
    device is touched (so this runs without one)."""
    filt, x, _ = _small_call()
    with pytest.raises(EscoinError, match="values must be None for a call on the cpu"):
        filt.prepare(x.shape, padding=1, values=filt.values)
    for values in (filt.values, list(filt.values), 3.0):
        with pytest.raises(EscoinError, match="values must be a CUDA array"):
            filt.prepare(x.shape, padding=1, device=0, values=values)


def test_a_call_refuses_to_run_after_its_filter_released_its_geometries() -> None:
    """release_geometries frees the arrays a prepared call points at: the call says so instead
    of reading freed memory, and a call prepared again computes as before."""
    filt, x, call = _small_call()
    y = np.full(call.output_shape, np.nan, np.float32)
    ws = np.empty(call.workspace_bytes, np.uint8)
    call.run(x.ctypes.data, y.ctypes.data, ws.ctypes.data)
    before = y.copy()
    assert call.current
    filt.release_geometries()
    assert not call.current
    with pytest.raises(EscoinError, match="release_geometries"):
        call.run(x.ctypes.data, y.ctypes.data, ws.ctypes.data)
    again = filt.prepare(x.shape, padding=1)
    y[...] = np.nan
    again.run(x.ctypes.data, y.ctypes.data, ws.ctypes.data)
    np.testing.assert_array_equal(y, before)


def test_native_arguments_are_what_run_hands_the_core() -> None:
    """native_arguments (for compiled callers of the C entry) gives the descriptor the geometry
    derives, the dtype and device, the filter's own array addresses, the workspace size and
    where the filter's generation is in memory (which release_geometries moves on); and refuses,
    as run does, once the filter released its arrays."""
    from escoin.geometry import descriptor

    import ctypes

    filt, x, call = _small_call(stride=2, dilation=1)
    (desc, dtype, device, row_ptr, offsets, values, program, workspace, generation_at,
     generation) = call.native_arguments()
    assert desc == descriptor(x.shape, filt.shape, filt.groups, 2, 1, 1)
    assert (dtype, device, program, workspace) == (0, -1, 0, call.workspace_bytes)
    assert (row_ptr, offsets, values) == tuple(filt.host_pointers(x.shape, 2, 1, 1))
    assert ctypes.c_int64.from_address(generation_at).value == generation
    filt.release_geometries()
    assert ctypes.c_int64.from_address(generation_at).value == generation + 1
    with pytest.raises(EscoinError, match="release_geometries"):
        call.native_arguments()


@pytest.mark.cuda
@settings(max_examples=40, deadline=None)
@given(case=staged_conv_cases())
def test_a_prepared_cuda_call_matches_the_reference(case: ConvCase) -> None:
    """On a GPU, on the current stream of PyTorch, into a poisoned output, with a residual."""
    torch = pytest.importorskip("torch")
    filt = escoin.SparseFilter.from_dense(case.weight.astype(np.float32),
                                          groups=case.groups).cuda(0)
    call = filt.prepare(case.x.shape, case.stride, case.padding, case.dilation)
    residual = torch.linspace(-1, 1, int(np.prod(call.output_shape)), device="cuda")
    residual = residual.reshape(call.output_shape)
    x = torch.from_numpy(case.x.astype(np.float32)).cuda()
    bias = None if case.bias is None else torch.from_numpy(case.bias.astype(np.float32)).cuda()
    y = torch.full(call.output_shape, float("nan"), device="cuda")
    workspace = torch.empty(call.workspace_bytes, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        call.run(x.data_ptr(), y.data_ptr(), workspace.data_ptr(),
                 0 if bias is None else bias.data_ptr(), residual.data_ptr(), case.relu,
                 stream.cuda_stream)
    stream.synchronize()
    expected = _expected(case, residual.cpu().double().numpy())
    assert relative_error(y.cpu().numpy(), expected) <= 1e-5


def _new_values_case(case: ConvCase, torch):
    """A filter of the case's weight, other values on its pattern (never zero: the pattern
    stays), the dense weight they make, and those values as a CUDA tensor."""
    filt = escoin.SparseFilter.from_dense(case.weight.astype(np.float32), groups=case.groups)
    rng = np.random.default_rng(filt.nnz)
    values = (rng.standard_normal(filt.nnz) + 3.0).astype(np.float32)
    weight = filt.with_values(values).to_dense().astype(np.float64)
    return filt, weight, torch.from_numpy(values).cuda()


@pytest.mark.cuda
@settings(max_examples=40, deadline=None)
@given(case=staged_conv_cases() | conv_cases())
def test_a_call_on_device_values_computes_with_them(case: ConvCase) -> None:
    """prepare(values=...): the call computes with the caller's device values, through the
    program written for them on the stream (staged cases) or the values alone (the rest), and
    the filter's own values never reach the device."""
    torch = pytest.importorskip("torch")
    filt, weight, values = _new_values_case(case, torch)
    stream = torch.cuda.Stream()
    call = filt.cuda(0).prepare(case.x.shape, case.stride, case.padding, case.dilation,
                                values=values, stream=stream)
    x = torch.from_numpy(case.x.astype(np.float32)).cuda()
    bias = None if case.bias is None else torch.from_numpy(case.bias.astype(np.float32)).cuda()
    y = torch.full(call.output_shape, float("nan"), device="cuda")
    workspace = torch.empty(call.workspace_bytes, dtype=torch.uint8, device="cuda")
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call.run(x.data_ptr(), y.data_ptr(), workspace.data_ptr(),
                 0 if bias is None else bias.data_ptr(), 0, case.relu, stream.cuda_stream)
    stream.synchronize()
    expected = conv2d_reference(case.x, weight, case.bias, case.stride, case.pads,
                                case.dilation, case.groups, case.relu)
    assert relative_error(y.cpu().numpy(), expected) <= 1e-5
    assert not filt._store.device_values
    # Bound to its stream: its program was written there.
    assert call.stream == stream.cuda_stream
    with pytest.raises(EscoinError, match="stream must be .*the stream this call was prepared"):
        call.run(x.data_ptr(), y.data_ptr(), workspace.data_ptr(), 0, 0, False, 0)


def _padded_3x3_case(seed: int, out_channels: int, x_shape: tuple) -> ConvCase:
    """A 3x3 convolution padded by 1 at stride 1, its weight 80% pruned at random."""
    rng = np.random.default_rng(seed)
    shape = (out_channels, x_shape[1], 3, 3)
    weight = rng.standard_normal(shape) * (rng.random(shape) < 0.2)
    return ConvCase(rng.standard_normal(x_shape), weight, None, (1, 1), (1, 1), (1, 1, 1, 1),
                    (1, 1), 1, False)


@pytest.mark.cuda
def test_the_program_written_on_the_device_is_the_one_built_on_the_host() -> None:
    """Byte for byte, for values other than those the pattern's layout was built with."""
    torch = pytest.importorskip("torch")
    case = _padded_3x3_case(seed=5, out_channels=48, x_shape=(8, 40, 14, 14))
    filt, _, values = _new_values_case(case, torch)
    desc = descriptor(case.x.shape, filt.shape, 1, 1, 1, 1)
    program = filt._store.program_of_device_values(0, desc, values.data_ptr(), 0)
    assert program is not None
    written = np.empty(program.nbytes, np.uint8)
    escoin._core.cuda_stream_synchronize(0, 0)
    escoin._core.cuda_memcpy(0, written.ctypes.data, program.ptr, program.nbytes, 1)
    built = filt.with_values(values.cpu().numpy())._store.program("tile", desc)
    np.testing.assert_array_equal(written, built)
    # The uploaded layout is the pattern's, per geometry: released with the rest, after which
    # a call prepared on device values refuses to run.
    call = filt.cuda(0).prepare(case.x.shape, padding=1, values=values)
    layout = filt._store.pattern.device_tile_layouts
    assert len(layout) == 1
    assert filt.release_geometries() >= 2 * (program.nbytes + 8 * filt.nnz)  # host and device
    assert not layout and not call.current


def test_a_prepared_call_is_not_built_from_addresses() -> None:
    """Its CPU run() trusts the offsets escoin derived: the class itself refuses to be built
    from a caller's (a bad offset would read out of bounds), pointing to prepare and sconv."""
    filt, x, _ = _small_call()
    call = filt.prepare(x.shape, padding=1)
    fields = call.native_arguments()
    with pytest.raises(EscoinError, match="made by SparseFilter.prepare.*sconv"):
        escoin.PreparedCall(fields[0], "float32", -1, fields[3], fields[4], fields[5], 0,
                            call.workspace_bytes, call.output_shape, filt._store)


def test_prepare_for_values_names_a_device_that_is_not_a_cuda_one() -> None:
    filt, x, _ = _small_call()
    for device in (None, "cpu", -1):
        with pytest.raises(EscoinError, match="device must be a CUDA device index"):
            filt.prepare_for_values(x.shape, padding=1, device=device)


@pytest.mark.cuda
def test_a_call_prepared_for_values_is_what_a_caller_completes_per_launch() -> None:
    """prepare_for_values: no values nor program of its own (run() refuses), and a layout from
    which the program of any values is what prepare(values=...) writes, byte for byte; a launch
    through the core's entry with that program and those values computes with them."""
    torch = pytest.importorskip("torch")
    case = _padded_3x3_case(seed=6, out_channels=32, x_shape=(4, 24, 12, 12))
    filt, dense, values = _new_values_case(case, torch)
    template = filt.cuda(0).prepare_for_values(case.x.shape, padding=1)
    fields = template.native_arguments()
    assert fields[5] == 0 and fields[6] == 0  # values, tile program
    layout, nbytes, slots, count = template.native_program_layout()
    assert count == filt.nnz and layout != 0 and slots != 0 and nbytes > 0
    program = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    escoin._core.tile_program_write_weights(program.data_ptr(), layout, nbytes, slots,
                                            values.data_ptr(), count, 0, 0)
    desc = descriptor(case.x.shape, filt.shape, 1, 1, 1, 1)
    built = filt.with_values(values.cpu().numpy())._store.program("tile", desc)
    np.testing.assert_array_equal(program.cpu().numpy(), built)
    x = torch.from_numpy(case.x.astype(np.float32)).cuda()
    y = torch.full(template.output_shape, float("nan"), device="cuda")
    workspace = torch.empty(template.workspace_bytes, dtype=torch.uint8, device="cuda")
    escoin.sconv(x.data_ptr(), y.data_ptr(), fields[3], fields[4], values.data_ptr(), 0,
                 workspace.data_ptr(), template.workspace_bytes, case.x.shape, filt.shape,
                 padding=1, device=0, tile_program_ptr=program.data_ptr())
    expected = conv2d_reference(case.x, dense, None, (1, 1), (1, 1, 1, 1), (1, 1), 1, False)
    assert relative_error(y.cpu().numpy(), expected) <= 1e-5
    with pytest.raises(EscoinError, match="this call has no values"):
        template.run(x.data_ptr(), y.data_ptr(), workspace.data_ptr(), 0, 0, False, 0)
    with pytest.raises(EscoinError, match="only a call of SparseFilter.prepare_for_values"):
        filt.cuda(0).prepare(case.x.shape, padding=1).native_program_layout()
    filt.release_geometries()
    assert not template.current
    with pytest.raises(EscoinError, match="freed since this call was prepared"):
        template.native_program_layout()


@pytest.mark.cuda
def test_prepare_names_bad_device_values() -> None:
    torch = pytest.importorskip("torch")
    filt, x, _ = _small_call()
    good = torch.ones(filt.nnz, device="cuda")
    for bad, what in ((good[:-1], "shape"), (good.double(), "float64"),
                      (torch.ones(2 * filt.nnz, device="cuda")[::2], "not contiguous")):
        with pytest.raises(EscoinError, match=f"values must be a contiguous 1-d float32.*{what}"):
            filt.prepare(x.shape, padding=1, device=0, values=bad)
