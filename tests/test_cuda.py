"""escoin on a GPU: the same random geometries as on the CPU, through CUDA arrays (PyTorch or
CuPy tensors), the raw-pointer API, streams, and the errors specific to device memory."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

import escoin
from escoin import EscoinError
from escoin.geometry import descriptor
from escoin.testing import conv2d_reference, relative_error
from escoin.testing.strategies import ConvCase, conv_cases
from geometry_strategies import PHASE_PLANE_CASES, phase_plane_case, staged_conv_cases
from gpu_helpers import DeviceArrays, gpu_error

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def dev() -> DeviceArrays:
    return DeviceArrays()


@settings(max_examples=150, deadline=None)
@given(case=conv_cases(max_batch=9))
def test_random_geometry_matches_reference(dev, case: ConvCase) -> None:
    assert gpu_error(dev, case) <= 1e-5


@settings(max_examples=100, deadline=None)
@given(case=staged_conv_cases())
def test_random_geometry_on_the_staged_kernel(dev, case: ConvCase) -> None:
    """Random geometries on the staged kernel, whose program pays for all of them."""
    filt = escoin.SparseFilter.from_dense(case.weight.astype(np.float32), groups=case.groups)
    desc = descriptor(case.x.shape, filt.shape, case.groups, case.stride, case.padding,
                      case.dilation)
    assert filt._store.program("tile", desc) is not None
    assert gpu_error(dev, case) <= 1e-5


@settings(max_examples=60, deadline=None)
@given(case=staged_conv_cases(block=4))
def test_block_pruned_filters_on_the_staged_kernel(dev, case: ConvCase) -> None:
    """Filters pruned in blocks of four output channels take the program's row-group form (each
    input value a thread loads feeds four channels' FMAs), here with a residual: random
    geometries, partial blocks at a group's end, every launch shape and split."""
    filt = escoin.SparseFilter.from_dense(case.weight.astype(np.float32), groups=case.groups)
    form = filt.tile_form(case.x.shape, case.stride, case.padding, case.dilation)
    if (case.weight.shape[0] // case.groups) % 4 == 0:
        # Every four rows the program groups are then one block. Where a group's last block is
        # cut short, four rows may straddle two groups or hold most of a sparse filter's
        # nonzeros (one partial block kept, 17 channels: as many union entries as nonzeros),
        # and the rows form, which costs less there, is rightly chosen.
        assert form == "row groups"
    assert gpu_error(dev, case, with_residual=True) <= 1e-5


@pytest.mark.parametrize("blocks", [False, True])
def test_a_nan_reaches_only_the_channels_that_read_it(dev, monkeypatch: pytest.MonkeyPatch,
                                                      blocks: bool) -> None:
    """Only stored nonzeros read x (escoin.h): a NaN in x reaches the outputs of the channels
    whose weights read its input channel, as on the CPU, whichever form the staged kernel's
    program takes. With blocks of four channels sharing each pattern it is the row-group form;
    channels whose unions would be smaller but not shared (here 0.5 entries per nonzero) keep
    the rows form, since a row group's zero weight would multiply the NaN."""
    monkeypatch.delenv("ESCOIN_TILE_FORM", raising=False)
    weight = np.zeros((32, 8, 1, 1), np.float32)
    if blocks:
        weight[:16, 0] = np.arange(1, 17).reshape(16, 1, 1)  # channels 0-15 read input 0
        weight[16:, 1] = np.arange(1, 17).reshape(16, 1, 1)  # channels 16-31 read input 1
    else:
        weight[0::4, 0], weight[1::4, 1], weight[2::4, 1], weight[3::4, 1] = 1, 2, 3, 4
    x = np.random.default_rng(9).standard_normal((8, 8, 8, 8)).astype(np.float32)
    x[0, 1, 3, 3] = np.nan
    filt = escoin.SparseFilter.from_dense(weight)
    assert filt.tile_form(x.shape) == ("row groups" if blocks else "rows")
    out = dev.full(x.shape[:1] + (32, 8, 8), np.inf)  # poison
    escoin.conv2d(dev.put(x), filt, out=out)
    actual, expected = dev.get(out), escoin.conv2d(x, filt)
    reads = weight[:, 1, 0, 0] != 0
    assert np.array_equal(np.isnan(actual), np.isnan(expected))
    assert np.isnan(actual[0, reads, 3, 3]).all() and np.isfinite(actual[0, ~reads]).all()
    assert np.allclose(np.nan_to_num(actual), np.nan_to_num(expected), rtol=1e-6, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(case=conv_cases(max_batch=9))
def test_residual_added_before_the_relu(dev, case: ConvCase) -> None:
    """y = relu(conv + bias + residual) on whichever kernel the case runs, split sums too."""
    assert gpu_error(dev, case, with_residual=True) <= 1e-5


@settings(max_examples=60, deadline=None)
@given(case=staged_conv_cases())
def test_residual_on_the_staged_kernel(dev, case: ConvCase) -> None:
    assert gpu_error(dev, case, with_residual=True) <= 1e-5


@pytest.mark.parametrize("shape", [(5, 64, 40, 37, 48, 3, 1), (4, 96, 30, 30, 40, 3, 2),
                                   (6, 40, 33, 33, 24, 1, 1), (4, 300, 16, 16, 20, 3, 1),
                                   (9, 64, 40, 37, 48, 3, 1), (8, 96, 30, 30, 40, 3, 2),
                                   (8, 40, 33, 33, 24, 1, 1), (8, 300, 16, 16, 20, 3, 1),
                                   (8, 24, 57, 61, 20, 5, 1), (32, 8, 60, 60, 128, 3, 1),
                                   (3, 48, 28, 28, 40, 1, 1), (8, 48, 28, 28, 40, 1, 1)])
@pytest.mark.parametrize("form", ["rows", "groups"])
def test_network_sized_layers(dev, monkeypatch: pytest.MonkeyPatch, shape: tuple,
                              form: str) -> None:
    """Planes of several thousand positions and channel counts spanning several chunks, on the
    staged kernel ((32, 8, 60, ...) has a grid of thousands of blocks), in both forms of its
    program (rows, and row groups with zeros where a row has no nonzero). The 28x28 1x1 cases
    read x without stretching it, and the staged kernel's last tile runs past the end of x."""
    monkeypatch.setenv("ESCOIN_TILE_FORM", form)
    n, c, h, w, m, k, stride = shape
    rng = np.random.default_rng(sum(shape))
    weight = rng.standard_normal((m, c, k, k)) * (rng.random((m, c, k, k)) < 0.1)
    x = rng.standard_normal((n, c, h, w))
    bias = rng.standard_normal(m)
    filt = escoin.SparseFilter.from_dense(weight.astype(np.float32))
    out = dev.full(escoin.output_shape(x.shape, filt, stride, k // 2), np.nan)
    escoin.conv2d(dev.put(x.astype(np.float32)), filt, dev.put(bias.astype(np.float32)),
                  stride=stride, padding=k // 2, relu=True, out=out)
    pad = k // 2
    expected = conv2d_reference(x, weight, bias, (stride, stride), (pad,) * 4, (1, 1), 1, True)
    assert relative_error(dev.get(out), expected) <= 1e-5


@pytest.mark.parametrize("kernel, stride, dilation, phases", PHASE_PLANE_CASES)
@pytest.mark.parametrize("batch", [1, 8])
def test_layouts_with_fewer_phase_planes(dev, kernel: tuple, stride: tuple, dilation: tuple,
                                         phases: tuple, batch: int) -> None:
    """Stretched layouts that keep one phase plane per axis where the filter reads only that one
    (ResNet's 1x1 downsampling at stride 2 first), on both CUDA kernels: the staged one (64 input
    channels, several chunks) and the streaming one (8 output channels)."""
    for out_channels in (64, 8):
        case = phase_plane_case(kernel, stride, dilation, batch, 64, out_channels, 30,
                                batch + out_channels)
        assert gpu_error(dev, case) <= 1e-5


def test_grouped_filter_on_a_large_grid(dev) -> None:
    """A large grid (thousands of blocks) with two groups: each block of output channels reads
    only its group's input channels."""
    rng = np.random.default_rng(21)
    weight = rng.standard_normal((128, 8, 3, 3)) * (rng.random((128, 8, 3, 3)) < 0.2)
    x = rng.standard_normal((32, 16, 60, 60))
    bias = rng.standard_normal(128)
    filt = escoin.SparseFilter.from_dense(weight.astype(np.float32), groups=2)
    out = dev.full(escoin.output_shape(x.shape, filt, 1, 1), np.nan)
    escoin.conv2d(dev.put(x.astype(np.float32)), filt, dev.put(bias.astype(np.float32)),
                  padding=1, out=out)
    expected = conv2d_reference(x, weight, bias, (1, 1), (1, 1, 1, 1), (1, 1), 2)
    assert relative_error(dev.get(out), expected) <= 1e-5


def test_release_geometries_frees_device_arrays_and_programs(dev) -> None:
    """A release returns the host offsets, their device copy and the staged kernel's program of
    each geometry called; the next calls upload them again and compute the same."""
    rng = np.random.default_rng(22)
    weight = rng.standard_normal((64, 16, 3, 3)) * (rng.random((64, 16, 3, 3)) < 0.2)
    filt = escoin.SparseFilter.from_dense(weight.astype(np.float32)).cuda()
    shapes = [(4, 16, 20, 20), (2, 16, 13, 17)]
    xs = [rng.standard_normal(s) for s in shapes]

    def check(x: np.ndarray) -> None:
        out = dev.full(escoin.output_shape(x.shape, filt, 1, 1), np.nan)
        escoin.conv2d(dev.put(x.astype(np.float32)), filt, padding=1, out=out)
        expected = conv2d_reference(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
        assert relative_error(dev.get(out), expected) <= 1e-5

    for x in xs:
        check(x)
    programs = sum(filt.tile_program(s, padding=1).nbytes for s in shapes)
    assert filt.release_geometries() == 2 * (2 * 4 * filt.nnz) + programs
    for x in xs:
        check(x)
    dev.synchronize()


@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("size", [7, 14, 28])
def test_small_batch_launch_shapes(dev, batch: int, size: int) -> None:
    """The staged kernel's launch differs from its plan at small batches, with the same tile
    program: a block holds 4 images on a 7x7 plane and 2 on a 28x28 one, and a smaller batch
    launches blocks of only the images it has; where the grid is small, tiles of half the plan's
    positions (14x14: one tile, whole channels, cut in two; 28x28: 4 positions per thread down to
    2). Each image right, nothing written past the batch (the output is poisoned and exactly the
    batch's size)."""
    rng = np.random.default_rng(31 + batch + size)
    weight = rng.standard_normal((64, 48, 3, 3)) * (rng.random((64, 48, 3, 3)) < 0.1)
    x = rng.standard_normal((batch, 48, size, size))
    bias = rng.standard_normal(64)
    filt = escoin.SparseFilter.from_dense(weight.astype(np.float32))
    out = dev.full(escoin.output_shape(x.shape, filt, 1, 1), np.nan)
    escoin.conv2d(dev.put(x.astype(np.float32)), filt, dev.put(bias.astype(np.float32)),
                  padding=1, out=out)
    expected = conv2d_reference(x, weight, bias, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    y = dev.get(out)
    for n in range(batch):
        assert relative_error(y[n], expected[n]) <= 1e-5


@pytest.mark.parametrize("batch, size, stride", [(1, 7, 1), (2, 7, 1), (32, 7, 1), (1, 14, 1),
                                                 (3, 28, 1), (8, 56, 1), (5, 28, 2)])
@pytest.mark.parametrize("density", [0.03, 0.5])
def test_one_by_one_filters_read_as_one_run(dev, batch: int, size: int, stride: int,
                                            density: float) -> None:
    """1x1 filters: each warp reads its rows' entries of a chunk as one run, 32 at a time, with
    every launch shape (7, 4 or 2 positions a thread, one to four images, split chunks at small
    batches), x read in place or stretched (stride 2, 7x7 planes), one group or two, with a
    residual added before the ReLU. At density 0.5 a warp's run is hundreds of entries and its
    rows end inside batches of 32; at 0.03 some rows have none."""
    rng = np.random.default_rng(int(batch * 100 + size + stride + density * 10))
    for out_channels, groups in ((96, 1), (128, 2)):
        shape = (out_channels, 96 // groups, 1, 1)
        weight = rng.standard_normal(shape) * (rng.random(shape) < density)
        x = rng.standard_normal((batch, 96, size, size))
        bias = rng.standard_normal(out_channels)
        filt = escoin.SparseFilter.from_dense(weight.astype(np.float32), groups=groups)
        shape = escoin.output_shape(x.shape, filt, stride, 0)
        residual = rng.standard_normal(shape).astype(np.float32)  # a ResNet block's shortcut
        out = dev.full(shape, np.nan)
        escoin.conv2d(dev.put(x.astype(np.float32)), filt, dev.put(bias.astype(np.float32)),
                      stride=stride, relu=True, out=out, residual=dev.put(residual))
        expected = conv2d_reference(x, weight, bias, (stride, stride), (0,) * 4, (1, 1), groups,
                                    True, residual)
        assert relative_error(dev.get(out), expected) <= 1e-5


@pytest.mark.parametrize("batch", [1, 3, 4, 5, 32])
def test_stride_two_every_image_computed(dev, batch: int) -> None:
    """The PyTorch port computed only the first image at stride > 1; every image must be right."""
    rng = np.random.default_rng(batch)
    weight = rng.standard_normal((16, 8, 3, 3)) * (rng.random((16, 8, 3, 3)) < 0.1)
    x = rng.standard_normal((batch, 8, 23, 23))
    filt = escoin.SparseFilter.from_dense(weight.astype(np.float32))
    y = dev.get(escoin.conv2d(dev.put(x.astype(np.float32)), filt, stride=2, padding=1))
    expected = conv2d_reference(x, weight, None, (2, 2), (1, 1, 1, 1), (1, 1), 1)
    for n in range(batch):
        assert relative_error(y[n], expected[n]) <= 1e-5


def test_returns_device_array_without_out(dev) -> None:
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    x = rng.standard_normal((2, 4, 9, 9)).astype(np.float32)
    y = escoin.conv2d(dev.put(x), escoin.SparseFilter.from_dense(weight), padding=1)
    assert isinstance(y, escoin.DeviceArray) and y.shape == (2, 6, 9, 9)
    assert "cuda:" in repr(y) and y.__cuda_array_interface__["shape"] == (2, 6, 9, 9)
    expected = conv2d_reference(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert relative_error(y.numpy(), expected) <= 1e-5


def test_torch_stream_and_caller_workspace(dev) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    weight = rng.standard_normal((8, 4, 3, 3)) * (rng.random((8, 4, 3, 3)) < 0.3)
    x = rng.standard_normal((3, 4, 12, 10))
    filt = escoin.SparseFilter.from_dense(weight.astype(np.float32)).cuda(0)
    stream = torch.cuda.Stream()
    xs = dev.put(x.astype(np.float32))
    nbytes = escoin.workspace_size(x.shape, filt, padding=1)
    with torch.cuda.stream(stream):
        ws = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        out = torch.full((3, 8, 12, 10), float("nan"), device="cuda")
        escoin.conv2d(xs, filt, padding=1, out=out, workspace=ws, stream=stream)
    stream.synchronize()
    expected = conv2d_reference(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert relative_error(out.cpu().numpy(), expected) <= 1e-5


def test_sconv_raw_pointers(dev) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    weight = rng.standard_normal((5, 3, 3, 2)) * (rng.random((5, 3, 3, 2)) < 0.5)
    x = rng.standard_normal((4, 3, 11, 13))
    bias = rng.standard_normal(5)
    filt = escoin.SparseFilter.from_dense(weight.astype(np.float32))
    geometry = dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    offsets = escoin.stretch_offsets(filt, x.shape, **geometry)
    n, m, oh, ow = escoin.output_shape(x.shape, filt, **geometry)
    xs = torch.from_numpy(x.astype(np.float32)).cuda()
    ys = torch.full((n, m, oh, ow), float("nan"), device="cuda")
    row_ptr = torch.tensor(filt.row_ptr, device="cuda")  # copies: the filter's arrays are
    offs = torch.tensor(offsets, device="cuda")          # read-only, which from_numpy warns of
    vals = torch.tensor(filt.values, device="cuda")
    b = torch.from_numpy(bias.astype(np.float32)).cuda()
    nbytes = escoin.workspace_size(x.shape, filt, **geometry)
    ws = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    escoin.sconv(xs.data_ptr(), ys.data_ptr(), row_ptr.data_ptr(), offs.data_ptr(),
                 vals.data_ptr(), b.data_ptr(), ws.data_ptr(), nbytes, x.shape, filt.shape,
                 relu=True, stream=torch.cuda.current_stream(), **geometry)
    torch.cuda.synchronize()
    expected = conv2d_reference(x, weight, bias, (2, 1), (1, 1, 0, 0), (1, 2), 1, relu=True)
    assert relative_error(ys.cpu().numpy(), expected) <= 1e-5


def test_dlpack_input(dev) -> None:
    """A producer offering only DLPack (as JAX does) is read through __dlpack__."""
    torch = pytest.importorskip("torch")

    class DLPackOnly:
        def __init__(self, tensor):
            self.tensor = tensor

        def __dlpack__(self, stream=None):
            return self.tensor.__dlpack__(stream=stream)

        def __dlpack_device__(self):
            return self.tensor.__dlpack_device__()

    rng = np.random.default_rng(10)
    weight = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    x = rng.standard_normal((2, 2, 8, 8)).astype(np.float32)
    y = escoin.conv2d(DLPackOnly(torch.from_numpy(x).cuda()),
                      escoin.SparseFilter.from_dense(weight))
    expected = conv2d_reference(x, weight, None, (1, 1), (0, 0, 0, 0), (1, 1), 1)
    assert relative_error(y.numpy(), expected) <= 1e-5


def test_float64_input_is_rejected_on_gpu(dev) -> None:
    torch = pytest.importorskip("torch")
    filt = escoin.SparseFilter.from_dense(np.ones((2, 2, 3, 3), np.float32))
    with pytest.raises(EscoinError, match="x must be float32, float16 or bfloat16 on CUDA"):
        escoin.conv2d(torch.ones(1, 2, 5, 5, dtype=torch.float64, device="cuda"), filt)


def test_non_contiguous_gpu_input_is_rejected(dev) -> None:
    torch = pytest.importorskip("torch")
    filt = escoin.SparseFilter.from_dense(np.ones((2, 2, 3, 3), np.float32))
    x = torch.ones(1, 2, 6, 10, device="cuda")[..., ::2]
    with pytest.raises(EscoinError, match="x must be C-contiguous"):
        escoin.conv2d(x, filt)


def test_out_of_wrong_shape_on_gpu(dev) -> None:
    torch = pytest.importorskip("torch")
    filt = escoin.SparseFilter.from_dense(np.ones((2, 2, 3, 3), np.float32))
    x = torch.ones(1, 2, 5, 5, device="cuda")
    with pytest.raises(EscoinError,
                       match=r"out must be a C-contiguous float32 CUDA array of shape"):
        escoin.conv2d(x, filt, out=torch.empty(1, 2, 5, 5, device="cuda"))


def test_workspace_too_small(dev) -> None:
    torch = pytest.importorskip("torch")
    filt = escoin.SparseFilter.from_dense(np.ones((2, 2, 3, 3), np.float32))
    x = torch.ones(1, 2, 5, 5, device="cuda")
    with pytest.raises(EscoinError, match="workspace must be a contiguous CUDA array"):
        escoin.conv2d(x, filt, workspace=torch.empty(8, dtype=torch.uint8, device="cuda"))


def test_cuda_error_becomes_exception() -> None:
    with pytest.raises(EscoinError, match="device must be in"):
        # (addresses apart, as the operand checks before the device's want them; none is read)
        escoin.sconv(0x1000, 0x2000, 8, 8, 8, 0, 0x3000, 10**9, (1, 1, 4, 4), (1, 1, 3, 3),
                     device=999)


def test_filter_device_index_checked() -> None:
    filt = escoin.SparseFilter.from_dense(np.ones((2, 2, 3, 3), np.float32))
    with pytest.raises(EscoinError, match="device must be a CUDA device index"):
        filt.cuda(escoin.cuda_device_count())


# (batch, in, out, height, width, kernel, padding, dilation, groups): stride-1 layers on rows of
# a multiple of 4, which Hopper copies from x padded by the copy engine (no stretch).
TENSOR_COPY_CASES = [
    (3, 20, 40, 17, 24, 3, 1, 1, 1),       # the last block of images part-empty, odd height
    (1, 40, 64, 9, 8, 3, 1, 1, 1),         # one tile: whole channels; batch 1 splits
    (5, 12, 48, 30, 28, 4, "same", 1, 2),  # asymmetric padding (1 left, 2 right), two groups
    (2, 16, 32, 20, 36, 3, 2, 2, 1),       # dilation 2
    (4, 70, 33, 28, 28, 3, 1, 1, 1),       # a part-full last chunk, a part-full block of rows
    (2, 8, 32, 12, 224, 3, 1, 1, 1),       # rows of 228 after rounding: a box side near 256
    # whole channels in one full tile: the last output row's right padding must not be read
    # past the chunk's last channel (rows hold their padding there)
    (32, 64, 64, 8, 8, 3, 1, 1, 1),
    (16, 32, 32, 4, 4, 3, 1, 1, 1),
    (32, 64, 64, 8, 12, 3, 1, 1, 1),
]


@pytest.mark.parametrize("case", TENSOR_COPY_CASES)
@pytest.mark.parametrize("misaligned", [False, True])
def test_tensor_copy_geometries(dev, case: tuple, misaligned: bool) -> None:
    """x copied padded by the copy engine on Hopper, or stretched into the staged kernel's
    layout (rows of a multiple of 4) where x starts off a 16-byte boundary: both match
    float64."""
    torch = pytest.importorskip("torch")
    batch, cin, cout, height, width, kernel, padding, dilation, groups = case
    rng = np.random.default_rng(sum(case[:6]) + misaligned)
    shape = (cout, cin // groups, kernel, kernel)
    weight = rng.standard_normal(shape) * (rng.random(shape) < 0.3)
    x = rng.standard_normal((batch, cin, height, width))
    bias = rng.standard_normal(cout)
    filt = escoin.SparseFilter.from_dense(weight.astype(np.float32), groups=groups)
    flat = torch.from_numpy(x.astype(np.float32).ravel()).cuda()
    if misaligned:  # one float in: 4-byte aligned only
        flat = torch.cat([torch.zeros(1, device="cuda"), flat])[1:]
    xs = flat.view(x.shape)
    y = dev.get(escoin.conv2d(xs, filt, dev.put(bias.astype(np.float32)), padding=padding,
                              dilation=dilation, relu=True))
    pads = escoin.geometry.padding_sides(padding, (kernel, kernel), (1, 1),
                                         (dilation, dilation))
    expected = conv2d_reference(x, weight, bias, (1, 1), pads, (dilation, dilation), groups,
                                relu=True)
    assert relative_error(y, expected) <= 1e-5


def runs_hopper_code(torch) -> bool:
    """Whether the GPU runs this build's Hopper code, read from the build's architectures as the
    driver chooses: the build's SASS for the GPU's major version and a minor at or below its own,
    else its newest PTX at or below the GPU's compute capability, compiled at load; "a" code only
    on its own compute capability, "f" code only within its major version. That code is Hopper's
    where its architecture is 9.0 or newer. (A build for 80-virtual alone runs its Ampere code on
    an H100.)"""
    major, minor = torch.cuda.get_device_capability()
    device = 10 * major + minor
    sass, ptx = [], []
    for arch in escoin.build_info()["cuda_architectures"]:
        name, _, kind = arch.partition("-")
        digits = name.rstrip("af")
        if not digits.isdigit():  # native, all, all-major: resolved by CMake, not recorded
            pytest.skip(f"which code the GPU runs cannot be read from the architecture {arch!r}")
        number, suffix = int(digits), name[len(digits):]
        same_major = number // 10 == major and number <= device
        if suffix == "a":
            sass_fits = ptx_fits = number == device
        elif suffix == "f":
            sass_fits = ptx_fits = same_major
        else:
            sass_fits, ptx_fits = same_major, number <= device
        if kind in ("real", "") and sass_fits:
            sass.append(number)
        if kind in ("virtual", "") and ptx_fits:
            ptx.append(number)
    return (max(sass) if sass else max(ptx, default=0)) >= 90


@pytest.mark.parametrize("misaligned", [False, True])
def test_tensor_copy_leaves_the_workspace_unstretched(dev, misaligned: bool) -> None:
    """Where the GPU runs Hopper code an aligned x is copied by the copy engine, so nothing
    stretches it into the caller's workspace (its first bytes stay as they were); x off a 16-byte
    boundary is stretched there. Elsewhere (older GPUs, or a build without Hopper code) the
    stretch always runs."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(77)
    weight = rng.standard_normal((32, 16, 3, 3)) * (rng.random((32, 16, 3, 3)) < 0.3)
    x = rng.standard_normal((4, 16, 12, 16))
    filt = escoin.SparseFilter.from_dense(weight.astype(np.float32))
    flat = torch.from_numpy(x.astype(np.float32).ravel()).cuda()
    if misaligned:
        flat = torch.cat([torch.zeros(1, device="cuda"), flat])[1:]
    nbytes = escoin.workspace_size(x.shape, filt, padding=1)
    ws = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device="cuda")
    y = escoin.conv2d(flat.view(x.shape), filt, padding=1, workspace=ws)
    expected = conv2d_reference(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert relative_error(dev.get(y), expected) <= 1e-5
    untouched = bool((ws[:64] == 0xFF).all())
    tensor_copy = runs_hopper_code(torch) and not misaligned
    assert untouched == tensor_copy


@pytest.mark.parametrize("batch, channels, size, misaligned",
                         [(1, 24, 7, False), (32, 24, 7, False), (3, 24, 7, True),
                          (2, 20, 7, False), (5, 512, 5, False), (4, 40, 13, False)])
def test_one_by_one_filters_copy_x_itself_on_any_small_plane(dev, batch: int, channels: int,
                                                              size: int,
                                                              misaligned: bool) -> None:
    """A 1x1 filter on a plane that is not a multiple of 4 elements (7x7, 5x5) reads x itself
    where one tile covers the plane, the channels are a multiple of 8 and x is 16-byte aligned:
    the workspace's stretched part stays as it was. Otherwise (x off 16 bytes, 20 channels, a
    13x13 plane that takes three tiles) x is stretched first. Every case matches float64."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(batch + channels + size + misaligned)
    weight = rng.standard_normal((64, channels, 1, 1)) * (rng.random((64, channels, 1, 1)) < 0.2)
    x = rng.standard_normal((batch, channels, size, size))
    filt = escoin.SparseFilter.from_dense(weight.astype(np.float32))
    flat = torch.from_numpy(x.astype(np.float32).ravel()).cuda()
    if misaligned:
        flat = torch.cat([torch.zeros(1, device="cuda"), flat])[1:]
    nbytes = escoin.workspace_size(x.shape, filt)
    ws = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device="cuda")
    out = torch.full((batch, 64, size, size), float("nan"), device="cuda")
    escoin.conv2d(flat.view(x.shape), filt, out=out, workspace=ws)
    expected = conv2d_reference(x, weight, None, (1, 1), (0,) * 4, (1, 1), 1)
    assert relative_error(dev.get(out), expected) <= 1e-5
    reads_x = not misaligned and channels % 8 == 0 and size * size <= 64
    assert bool((ws[:64] == 0xFF).all()) == reads_x


@pytest.mark.parametrize("batch, size", [(1, 7), (2, 7), (8, 14)])
def test_small_plane_split_is_correct_and_deterministic(dev, batch: int, size: int) -> None:
    """A small plane gives too few blocks, so each channel's nonzeros are split and the partial
    sums reduced in a fixed order: right, and bitwise the same on every run (batch 8 on a 14x14
    plane runs the staged kernel, which splits its chunks too)."""
    rng = np.random.default_rng(11 + batch)
    weight = rng.standard_normal((96, 160, 3, 3)) * (rng.random((96, 160, 3, 3)) < 0.1)
    x = rng.standard_normal((batch, 160, size, size))
    bias = rng.standard_normal(96)
    filt = escoin.SparseFilter.from_dense(weight.astype(np.float32))
    xs, bs = dev.put(x.astype(np.float32)), dev.put(bias.astype(np.float32))
    first = dev.get(escoin.conv2d(xs, filt, bs, padding=1, relu=True))
    second = dev.get(escoin.conv2d(xs, filt, bs, padding=1, relu=True))
    expected = conv2d_reference(x, weight, bias, (1, 1), (1, 1, 1, 1), (1, 1), 1, relu=True)
    assert relative_error(first, expected) <= 1e-5
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("kernel, padding, size", [(3, 1, 7), (1, 0, 8)])
def test_split_sums_with_a_reused_poisoned_workspace(dev, kernel: int, padding: int,
                                                     size: int) -> None:
    """Batch 1 on a small plane splits the staged kernel's chunks, their partial sums kept in the
    workspace (with a stretch, after it; a 1x1 layer is read in place). A caller's workspace
    full of 0xff bytes (NaN everywhere), reused across calls, must give the reference, bitwise
    the same each time: nothing may read a part of it that this call did not write."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(40 + kernel)
    shape = (96, 160, kernel, kernel)
    weight = rng.standard_normal(shape) * (rng.random(shape) < 0.1)
    x = rng.standard_normal((1, 160, size, size))
    bias = rng.standard_normal(96)
    filt = escoin.SparseFilter.from_dense(weight.astype(np.float32))
    xs, bs = dev.put(x.astype(np.float32)), dev.put(bias.astype(np.float32))
    nbytes = escoin.workspace_size(x.shape, filt, padding=padding)
    ws = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device="cuda")
    runs = []
    for _ in range(3):
        out = torch.full((1, 96, size, size), float("nan"), device="cuda")
        escoin.conv2d(xs, filt, bs, padding=padding, relu=True, out=out, workspace=ws)
        runs.append(out.cpu().numpy())
    expected = conv2d_reference(x, weight, bias, (1, 1), (padding,) * 4, (1, 1), 1, relu=True)
    assert relative_error(runs[0], expected) <= 1e-5
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], runs[2])


@pytest.mark.parametrize("batch, stride, staged", [(3, 1, True), (3, 1, False), (9, 1, True),
                                                   (9, 1, False), (9, 2, True), (9, 2, False)])
def test_sconv_with_the_filters_device_pointers(dev, batch: int, stride: int,
                                                staged: bool) -> None:
    """sconv with the pointers of SparseFilter.device_pointers, with and without the staged
    kernel's program (without it the streaming kernel runs)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12 + batch)
    weight = rng.standard_normal((20, 4, 3, 3)) * (rng.random((20, 4, 3, 3)) < 0.3)
    x = rng.standard_normal((batch, 4, 30, 45))
    filt = escoin.SparseFilter.from_dense(weight.astype(np.float32)).cuda(0)
    arrays = filt.device_pointers(x.shape, stride=stride, padding=1)
    # 20 output channels: the staged kernel pays, at every batch from tile_min_batch up
    assert (arrays.tile_program != 0) == (batch >= escoin._core.tile_min_batch())
    nbytes = escoin.workspace_size(x.shape, filt, stride=stride, padding=1)
    xs = torch.from_numpy(x.astype(np.float32)).cuda()
    ys = torch.full(escoin.output_shape(x.shape, filt, stride, 1), float("nan"), device="cuda")
    ws = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    escoin.sconv(xs.data_ptr(), ys.data_ptr(), arrays.row_ptr, arrays.offsets, arrays.values, 0,
                 ws.data_ptr(), nbytes, x.shape, filt.shape, stride=stride, padding=1,
                 tile_program_ptr=arrays.tile_program if staged else 0)
    torch.cuda.synchronize()
    expected = conv2d_reference(x, weight, None, (stride, stride), (1, 1, 1, 1), (1, 1), 1)
    assert relative_error(ys.cpu().numpy(), expected) <= 1e-5


@pytest.mark.parametrize("kernel, size, batch", [(1, 8, 4), (1, 7, 32), (3, 16, 4), (3, 16, 1)])
def test_out_may_be_x(dev, kernel: int, size: int, batch: int) -> None:
    """out=x: the kernels that read x in place (1x1 filters; the copy engine's padded copies)
    would read outputs other blocks already wrote, so x is stretched first, as on the CPU."""
    rng = np.random.default_rng(kernel * size + batch)
    shape = (64, 64, kernel, kernel)
    weight = rng.standard_normal(shape) * (rng.random(shape) < 0.2)
    x = rng.standard_normal((batch, 64, size, size))
    filt = escoin.SparseFilter.from_dense(weight.astype(np.float32))
    xs = dev.put(x.astype(np.float32))
    y = escoin.conv2d(xs, filt, padding=kernel // 2, out=xs)
    assert y is xs
    pads = (kernel // 2,) * 4
    expected = conv2d_reference(x, weight, None, (1, 1), pads, (1, 1), 1)
    assert relative_error(dev.get(xs), expected) <= 1e-5


def test_bias_overlapping_the_output_is_refused_on_the_gpu(dev) -> None:
    filt = escoin.SparseFilter.from_dense(np.ones((4, 3, 3, 3), np.float32))
    out = dev.full((2, 4, 6, 6), 0.0)
    bias = out.reshape(-1)[:4]
    with pytest.raises(EscoinError, match="bias must not overlap y"):
        escoin.conv2d(dev.full((2, 3, 8, 8), 1.0), filt, bias=bias, out=out)


@pytest.mark.parametrize("size, kernel, padding, stride", [
    (8, 3, 1, (9, 2)), (4, 4, 0, (100, 100)), (16, 1, 0, (10_000, 1)),
    (12, 3, 0, (2 ** 31 - 1, 11))])
def test_a_stride_past_the_input(dev, size: int, kernel: int, padding: int, stride: tuple) -> None:
    """A stride past the input's last window start is taken as the input's extent (one output);
    with an extent of 1 that is stride 1, which the copy engine's plans may then take."""
    rng = np.random.default_rng(size + kernel)
    shape = (32, 16, kernel, kernel)
    weight = rng.standard_normal(shape) * (rng.random(shape) < 0.3)
    x = rng.standard_normal((3, 16, size, size))
    filt = escoin.SparseFilter.from_dense(weight.astype(np.float32))
    expected = conv2d_reference(x, weight, None, stride, (padding,) * 4, (1, 1), 1)
    out = dev.full(expected.shape, np.nan)
    escoin.conv2d(dev.put(x.astype(np.float32)), filt, stride=stride, padding=padding, out=out)
    assert relative_error(dev.get(out), expected) <= 1e-5


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("float16", 2.0 ** -10),
                                              ("bfloat16", 2.0 ** -7)])
@pytest.mark.parametrize("batch, channels, out_channels, size, kernel, stride, groups", [
    (1, 64, 64, 224, 3, 1, 1), (32, 128, 128, 28, 3, 1, 1), (4, 64, 64, 56, 3, 1, 4),
    (5, 64, 128, 40, 1, 1, 1), (3, 64, 128, 112, 1, 2, 1), (3, 64, 24, 112, 1, 1, 1),
    (1, 128, 128, 112, 3, 1, 1), (1, 512, 512, 28, 3, 1, 1), (1, 512, 2048, 7, 1, 1, 1),
    (1, 135, 75, 36, 3, 2, 3), (3, 68, 54, 29, 3, 1, 2), (3, 27, 79, 34, 3, 1, 1)])
def test_uneven_launch_on_a_full_gpu(dev, batch: int, channels: int, out_channels: int,
                                     size: int, kernel: int, stride: int, groups: int,
                                     dtype: str, tolerance: float) -> None:
    """Grids whose blocks are not a multiple of the GPU's SMs run their first jobs as the even
    form does, as far as whole rounds of the SMs, and the rest (the tail) in more blocks, whose
    partial sums a second kernel adds and finishes (StagedLaunch's uneven form). For an H100's
    132 SMs, unsplit: VGG's conv1_2 at batch 1, 400 jobs; ResNet's conv2 3x3 at batch 32, images
    two a block, 448; a grouped layer, 432; a 1x1 layer at batch 5 (x read in place in float32),
    its last block of two images half past the batch, 300; a 1x1 layer at stride 2, 300; one of
    24 output channels, 294. Split (the reduction adds the lead jobs' splits and the tail's,
    found by their place in y): VGG's conv2_2 and conv4_2 at batch 1 (2 and 4 splits, the tail
    in 8 and 6); ResNet's conv4 1x1 at batch 1 (5, 10); groups of 25 output channels at stride
    2 (8, 15); groups of 27 at batch 3, the tail in the last image (6, 12); 79 output channels
    at batch 3 (5, 9).
    Right with residual and ReLU in each output type, with a bias in the 16-bit ones and none
    in float32 (whose finish then never looks up an output's channel), and bitwise the same on
    every run through a reused workspace poisoned with 0xff bytes (NaN): nothing reads a partial
    sum this call did not write."""
    torch = pytest.importorskip("torch")
    kind = getattr(torch, dtype)
    device = torch.cuda.current_device()
    if torch.cuda.get_device_capability(device)[0] != 9:
        pytest.skip("the uneven launch checked here is the one for Hopper's 4 blocks an SM")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    shape = (out_channels, channels // groups, kernel, kernel)
    padding = kernel // 2
    layer = descriptor((batch, channels, size, size), shape, groups, stride, padding)
    if escoin._core.staged_launch(layer, sms, 4)["tail_splits"] == 0:
        pytest.skip(f"on {sms} SMs this layer's blocks fill every SM evenly")
    rng = np.random.default_rng(size + channels + out_channels)
    rounded = lambda a: torch.from_numpy(a.astype(np.float32)).to(kind)  # noqa: E731
    weight = rounded(rng.standard_normal(shape) * (rng.random(shape) < 0.1))
    filt = escoin.SparseFilter.from_dense(weight.float().numpy(), groups=groups)
    x = rounded(rng.standard_normal((batch, channels, size, size)))
    bias = None if dtype == "float32" else rounded(rng.standard_normal(out_channels))
    out_shape = escoin.output_shape(tuple(x.shape), filt, stride, padding)
    residual = rounded(rng.standard_normal(out_shape))
    nbytes = escoin.workspace_size(tuple(x.shape), filt, stride, padding)
    workspace = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device="cuda")
    runs = []
    for _ in range(3):
        out = torch.full(out_shape, float("nan"), dtype=kind, device="cuda")
        escoin.conv2d(x.cuda(), filt, None if bias is None else bias.cuda(), stride=stride,
                      padding=padding, relu=True, out=out, workspace=workspace,
                      residual=residual.cuda())
        runs.append(out.float().cpu().numpy())
    as64 = lambda t: None if t is None else t.double().numpy()  # noqa: E731
    expected = conv2d_reference(as64(x), as64(weight), as64(bias), (stride, stride),
                                (padding,) * 4, (1, 1), groups, relu=True,
                                residual=as64(residual))
    assert relative_error(runs[0], expected) <= tolerance
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], runs[2])
