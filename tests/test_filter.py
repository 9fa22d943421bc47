"""SparseFilter: compression, description, conversion, persistence."""
from __future__ import annotations

import re
import warnings
from typing import Optional

import numpy as np
import pytest

import escoin
from escoin.filter import MANY_GEOMETRIES
from escoin.testing import conv2d_reference, relative_error


def pruned(shape, density, seed=0, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * (rng.random(shape) < density)).astype(dtype)


def test_from_dense_round_trip_and_description() -> None:
    weight = pruned((8, 6, 3, 5), 0.25)
    filt = escoin.SparseFilter.from_dense(weight, groups=2)
    np.testing.assert_array_equal(filt.to_dense(), weight)
    assert filt.shape == (8, 6, 3, 5)
    assert ((filt.out_channels, filt.in_channels, filt.kernel_size, filt.groups)
            == (8, 12, (3, 5), 2))
    assert filt.nnz == np.count_nonzero(weight)
    assert filt.density == pytest.approx(filt.nnz / weight.size)
    assert filt.nbytes == 9 * 8 + filt.nnz * (4 + 4)
    assert filt.dtype == np.float32
    assert filt.device == "cpu"
    assert filt.row_ptr.dtype == np.int64 and filt.col_idx.dtype == np.int32


def test_threshold_drops_small_weights() -> None:
    weight = np.array([0.5, -0.05, 0.0, 2.0, -1.0, 0.1], np.float64).reshape(1, 1, 2, 3)
    filt = escoin.SparseFilter.from_dense(weight, threshold=0.1)
    assert filt.nnz == 3
    np.testing.assert_array_equal(filt.col_idx, [0, 3, 4])


def test_nan_weights_are_kept() -> None:
    weight = np.array([np.nan, 0.0, 1.0], np.float32).reshape(1, 1, 1, 3)
    assert escoin.SparseFilter.from_dense(weight, threshold=0.5).nnz == 2


def test_from_csr_matches_from_dense() -> None:
    weight = pruned((5, 3, 3, 3), 0.3, seed=3, dtype=np.float64)
    ref = escoin.SparseFilter.from_dense(weight)
    filt = escoin.SparseFilter.from_csr(ref.row_ptr, ref.col_idx, ref.values, weight.shape)
    np.testing.assert_array_equal(filt.to_dense(), weight)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_save_load_round_trip(tmp_path, dtype) -> None:
    weight = pruned((6, 2, 3, 3), 0.4, seed=4, dtype=dtype)
    filt = escoin.SparseFilter.from_dense(weight, groups=3)
    path = tmp_path / "layer.npz"
    filt.save(path)
    loaded = escoin.SparseFilter.load(path)
    assert (loaded.shape, loaded.groups, loaded.dtype, loaded.nnz) == (
        filt.shape, filt.groups, filt.dtype, filt.nnz)
    np.testing.assert_array_equal(loaded.to_dense(), weight)
    x = np.random.default_rng(5).standard_normal((2, 6, 7, 7)).astype(dtype)
    np.testing.assert_array_equal(escoin.conv2d(x, loaded), escoin.conv2d(x, filt))


def test_save_and_load_take_the_same_path_without_its_suffix(tmp_path) -> None:
    """save appends .npz where the path lacks it (np.savez does), and load finds it there."""
    filt = escoin.SparseFilter.from_dense(pruned((4, 2, 3, 3), 0.4, seed=14))
    filt.save(tmp_path / "layer")
    assert (tmp_path / "layer.npz").exists()
    np.testing.assert_array_equal(escoin.SparseFilter.load(tmp_path / "layer").to_dense(),
                                  filt.to_dense())


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, "bfloat16"])
def test_a_filter_pickles_and_copies_as_its_csr(dtype) -> None:
    """pickle, deepcopy and copy give an equal filter (arrays, shape, groups, device) that
    computes the same outputs: a filter can go to spawned workers and into copied objects."""
    import copy
    import pickle

    dtype = escoin.dtypes.numpy_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    weight = pruned((6, 2, 3, 3), 0.4, seed=16).astype(dtype)
    filt = escoin.SparseFilter.from_dense(weight, groups=3)
    x = np.random.default_rng(17).standard_normal((2, 6, 7, 7)).astype(dtype)
    want = escoin.conv2d(x, filt)
    for copied in (pickle.loads(pickle.dumps(filt)), copy.deepcopy(filt), copy.copy(filt)):
        assert (copied.shape, copied.groups, copied.dtype, copied.device) == (
            filt.shape, filt.groups, filt.dtype, filt.device)
        for name in ("row_ptr", "col_idx", "values"):
            np.testing.assert_array_equal(getattr(copied, name), getattr(filt, name))
        np.testing.assert_array_equal(escoin.conv2d(x, copied), want)


def _filter_file(path, **changes) -> None:
    """A filter file as save writes it, with `changes` to its arrays."""
    filt = escoin.SparseFilter.from_dense(pruned((4, 2, 3, 3), 0.4, seed=15))
    arrays = dict(row_ptr=filt.row_ptr, col_idx=filt.col_idx, values=filt.values,
                  values_dtype=np.array("float32"), shape=np.array(filt.shape, np.int64),
                  groups=np.array(1, np.int64), format=np.array("escoin-csr-1"))
    arrays.update(changes)
    np.savez(path, **arrays)


@pytest.mark.parametrize("contents, message", [
    (b"", "is not an escoin filter file"),
    (b"\x00garbage" * 10, r"is not an escoin filter file \(.*\): it is not an .npz archive$"),
    ("truncated", "is not an escoin filter file"),
    ("one array", "it is not an .npz archive"),  # (an .npy file)
    # Damage inside one member, which an .npz reads only when asked for it.
    ("flipped value byte", "is not an escoin filter file"),
    ("garbled header", "is not an escoin filter file"),
    (dict(values=np.array([1.0, 2.0], dtype=object)), "is not an escoin filter file"),
    (dict(values=np.ones(1, np.float16), values_dtype=np.array("bfloat16")),
     "tags its values bfloat16 but stores float16"),
    (dict(values_dtype=np.array("float16")), "tags its values float16 but stores float32"),
    (dict(shape=np.ones((2, 2), np.int64)), "holds a shape of"),
    (dict(groups=np.ones(1, np.int64)), "holds a shape of"),
    (dict(shape=np.array([4.0, 2.5, 3, 3])), "holds a shape of"),
])
def test_a_corrupt_filter_file_is_refused_by_name(tmp_path, contents: object,
                                                  message: str) -> None:
    """Whatever a damaged or foreign file holds, load says which file and what is wrong, and
    never reinterprets stored values under a tag they do not match."""
    path = tmp_path / "bad.npz"
    if isinstance(contents, dict):
        _filter_file(path, **contents)
    elif contents == "truncated":
        _filter_file(path)
        path.write_bytes(path.read_bytes()[:100])
    elif contents in ("flipped value byte", "garbled header"):
        _filter_file(path)
        data = bytearray(path.read_bytes())
        # (np.savez stores its members uncompressed: their bytes lie in the file as they are.)
        values = escoin.SparseFilter.from_dense(pruned((4, 2, 3, 3), 0.4, seed=15)).values
        at = data.index(values.tobytes() if contents == "flipped value byte" else b"'descr'")
        data[at + 1] ^= 0x5A
        path.write_bytes(bytes(data))
    elif contents == "one array":
        np.save(path, np.ones(3))
        path = tmp_path / "bad.npz.npy"
    else:
        path.write_bytes(contents)
    with pytest.raises(escoin.EscoinError, match=message):
        escoin.SparseFilter.load(path)


@pytest.mark.parametrize("make, message", [
    (lambda: escoin.SparseFilter.from_csr([0, 0], [], np.array([], np.float32),
                                          (1, 2**40, 2**40, 1)), "too large"),
    (lambda: escoin.SparseFilter.from_dense(np.ones((2, 2, 1, 1), np.float32), threshold=None),
     "threshold must be a real number"),
    (lambda: escoin.SparseFilter.from_dense(np.ones((2, 2, 1, 1), np.float32),
                                            threshold=np.array([0.5])),
     "threshold must be a real number"),
    (lambda: escoin.SparseFilter.from_dense(np.ones((2, 2, 1, 1), np.float32)).astype(None),
     "got None"),
    (lambda: escoin.host_workspace(-5), "nbytes must be a non-negative int"),
    (lambda: escoin.conv2d(np.ones((1, 2, 3, 3), np.float32),
                           escoin.SparseFilter.from_dense(np.ones((2, 2, 1, 1), np.float32)),
                           stream=5), "stream must be None or 0 for a NumPy x"),
])
def test_bad_arguments_are_named(make, message: str) -> None:
    with pytest.raises(escoin.EscoinError, match=message):
        make()


def test_astype() -> None:
    filt = escoin.SparseFilter.from_dense(pruned((3, 3, 3, 3), 0.5, seed=6))
    doubled = filt.astype(np.float64)
    assert doubled.dtype == np.float64
    np.testing.assert_array_equal(doubled.to_dense(), filt.to_dense().astype(np.float64))


def test_with_values_computes_with_the_new_values_on_the_shared_pattern() -> None:
    """A filter of new values on an old one's pattern computes with the new values (float64
    reference), leaves the old filter as it was, and shares its stretched offsets."""
    rng = np.random.default_rng(11)
    weight = pruned((16, 6, 3, 3), 0.3, seed=11)
    filt = escoin.SparseFilter.from_dense(weight)
    x = rng.standard_normal((2, 6, 9, 8)).astype(np.float32)
    before = escoin.conv2d(x, filt, padding=1)
    values = rng.standard_normal(filt.nnz).astype(np.float32)
    other = filt.with_values(values)
    new_weight = np.zeros_like(weight)
    new_weight[weight != 0] = values  # row-major order, as the CSR stores them
    np.testing.assert_array_equal(other.to_dense(), new_weight)
    expected = conv2d_reference(x.astype(np.float64), new_weight.astype(np.float64), None,
                                (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert relative_error(escoin.conv2d(x, other, padding=1), expected) <= 1e-5
    np.testing.assert_array_equal(escoin.conv2d(x, filt, padding=1), before)
    assert np.shares_memory(escoin.stretch_offsets(filt, x.shape, padding=1),
                            escoin.stretch_offsets(other, x.shape, padding=1))
    values[:] = 0  # copied: the caller's array stays the caller's
    assert relative_error(escoin.conv2d(x, other, padding=1), expected) <= 1e-5
    halves = filt.with_values(values.astype(np.float16) + np.float16(1.5))
    assert halves.dtype == np.float16 and halves.nnz == filt.nnz


@pytest.mark.parametrize("values, message", [
    (np.ones(3, np.float32), r"1-d array of the filter's \d+ nonzeros, got shape \(3,\)"),
    (np.ones((2, 2), np.float32), r"got shape \(2, 2\)"),
    (None, "values"),
])
def test_with_values_refuses_what_is_not_one_value_per_nonzero(values: Optional[np.ndarray],
                                                                message: str) -> None:
    filt = escoin.SparseFilter.from_dense(pruned((4, 3, 3, 3), 0.5, seed=12))
    if values is None:  # the right length in a dtype escoin does not compute
        values = np.arange(filt.nnz)
    with pytest.raises(escoin.EscoinError, match=message):
        filt.with_values(values)


def test_releasing_one_filter_of_a_pattern_releases_what_they_share() -> None:
    """Filters of one pattern share the per-geometry arrays: released through either, a call
    prepared with the other refuses to run (it would read freed offsets) until prepared again."""
    filt = escoin.SparseFilter.from_dense(pruned((8, 4, 3, 3), 0.5, seed=13))
    other = filt.with_values(np.arange(1, filt.nnz + 1, dtype=np.float32))
    x = np.random.default_rng(13).standard_normal((1, 4, 6, 6)).astype(np.float32)
    call = filt.prepare(x.shape, padding=1)
    assert other.release_geometries() == 4 * filt.nnz  # the shared int32 offsets
    assert not call.current
    y = np.full(call.output_shape, np.nan, np.float32)
    ws = np.empty(call.workspace_bytes, np.uint8)
    filt.prepare(x.shape, padding=1).run(x.ctypes.data, y.ctypes.data, ws.ctypes.data)
    np.testing.assert_array_equal(y, escoin.conv2d(x, filt, padding=1))


def test_stretch_offsets_are_cached_per_geometry() -> None:
    filt = escoin.SparseFilter.from_dense(pruned((4, 3, 3, 3), 0.5, seed=7))
    a = escoin.stretch_offsets(filt, (1, 3, 10, 10), padding=1)
    # The cached array, whatever the batch (views of it, read-only for good: the CPU kernel
    # trusts a filter's own offsets).
    assert np.shares_memory(escoin.stretch_offsets(filt, (8, 3, 10, 10), padding=1), a)
    with pytest.raises(ValueError):
        a.flags.writeable = True
    b = escoin.stretch_offsets(filt, (1, 3, 10, 10), padding=1, stride=2)
    assert not np.shares_memory(a, b) and b.shape == a.shape == (filt.nnz,)


def test_output_and_workspace_size() -> None:
    filt = escoin.SparseFilter.from_dense(pruned((4, 3, 3, 3), 0.5, seed=8))
    assert escoin.output_shape((2, 3, 11, 9), filt, stride=2, padding=1) == (2, 4, 6, 5)
    assert escoin.workspace_size((2, 3, 11, 9), filt, padding="same") > 2 * 3 * 11 * 9 * 4


def test_build_info() -> None:
    info = escoin.build_info()
    assert info["version"] == escoin.__version__
    assert isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)
    assert info["openmp_threads"] >= 1
    if info["cuda"]:
        assert info["cuda_architectures"]
    assert isinstance(escoin.cuda_available(), bool)


def test_from_csr_sorts_columns_within_rows() -> None:
    filt = escoin.SparseFilter.from_csr([0, 3, 4], [5, 1, 3, 0], [1.0, 2.0, 3.0, 4.0], (2, 1, 2, 3))
    np.testing.assert_array_equal(filt.col_idx, [1, 3, 5, 0])
    np.testing.assert_array_equal(filt.values, [2.0, 3.0, 1.0, 4.0])


def test_arrays_are_read_only() -> None:
    """The kernels trust row_ptr[M] to be the number of stretched offsets (a larger one read
    past them) and the caches derive from the arrays: a filter cannot be changed in place."""
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    filt = escoin.SparseFilter.from_dense(weight)
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    expected = escoin.conv2d(x, filt, padding=1)
    for array in (filt.row_ptr, filt.col_idx, filt.values,
                  escoin.stretch_offsets(filt, x.shape, padding=1)):
        with pytest.raises(ValueError, match="read-only"):
            array[-1] = 1 << 20
    np.testing.assert_array_equal(escoin.conv2d(x, filt, padding=1), expected)
    for copy in (filt.astype(np.float64), filt.cpu()):
        with pytest.raises(ValueError, match="read-only"):
            copy.values[0] = 0


def test_the_memory_behind_a_filters_arrays_cannot_be_made_writeable() -> None:
    """conv2d does not check a filter's own offsets on every call: neither the arrays a filter
    hands out nor the memory under them can be made writeable."""
    rng = np.random.default_rng(6)
    filt = escoin.SparseFilter.from_dense(rng.standard_normal((8, 4, 3, 3)).astype(np.float32))
    offsets = escoin.stretch_offsets(filt, (1, 4, 6, 6), padding=1)
    for array in (filt.row_ptr, filt.col_idx, filt.values, offsets):
        owner = array
        while isinstance(owner, np.ndarray):
            with pytest.raises(ValueError):
                owner.flags.writeable = True
            owner = owner.base

def test_tile_program_is_host_bytes_or_none() -> None:
    filt = escoin.SparseFilter.from_dense(pruned((32, 8, 3, 3), 0.2))
    program = filt.tile_program((2, 8, 12, 12), padding=1)
    assert program is not None and program.dtype == np.uint8 and program.size > 0
    # Built per call from the filter's arrays: the same bytes again.
    np.testing.assert_array_equal(filt.tile_program((2, 8, 12, 12), padding=1), program)
    depthwise = escoin.SparseFilter.from_dense(pruned((8, 1, 3, 3), 0.5), groups=8)
    assert depthwise.tile_program((1, 8, 12, 12)) is None  # under 16 output channels a group
    with pytest.raises(escoin.EscoinError, match="x has 9 channels"):
        filt.tile_program((1, 9, 12, 12))


def test_c_api_table_and_header_for_compiled_adapters() -> None:
    import ctypes
    import os

    assert os.path.isfile(os.path.join(escoin.get_include(), "escoin", "escoin.h"))
    capsule = escoin.c_api()
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = (ctypes.py_object, ctypes.c_char_p)
    table = get(capsule, b"escoin.c_api")
    # escoin_api_t starts with its version, then last_error: const char* (*)(void).
    assert ctypes.c_int32.from_address(table).value >= 2
    last_error = ctypes.CFUNCTYPE(ctypes.c_char_p).from_address(
        table + ctypes.sizeof(ctypes.c_void_p))
    with pytest.raises(escoin.EscoinError, match="larger than the padded input"):
        escoin.output_shape((1, 2, 2, 2), escoin.SparseFilter.from_dense(pruned((4, 2, 3, 3), 0.5)))
    # This thread's last failure in the core, read through the table.
    assert b"larger than the padded input" in last_error()
    # Version 2's entry, the eighth pointer: a null program is refused (or, in a build without
    # CUDA, the entry says so), never written to.
    pointer = ctypes.sizeof(ctypes.c_void_p)
    write_weights = ctypes.CFUNCTYPE(
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p).from_address(
            table + 8 * pointer)
    assert write_weights(None, None, 0, None, None, 0, 0, None) != 0
    assert re.search(rb"program|without CUDA", last_error())


def test_release_geometries_frees_what_each_geometry_derived() -> None:
    """The offsets of each input geometry go (their bytes returned); calls afterwards derive them
    again and compute the same."""
    rng = np.random.default_rng(9)
    weight = pruned((6, 4, 3, 3), 0.4, seed=9)
    filt = escoin.SparseFilter.from_dense(weight)
    shapes = [(2, 4, 9, 9), (1, 4, 12, 7)]
    xs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    for x in xs:
        escoin.conv2d(x, filt, padding=1)
    assert filt.release_geometries() == 2 * 4 * filt.nnz  # int32 offsets of two geometries
    assert filt.release_geometries() == 0
    for x in xs:
        expected = conv2d_reference(x.astype(np.float64), weight.astype(np.float64), None, (1, 1),
                                    (1, 1, 1, 1), (1, 1), 1)
        assert relative_error(escoin.conv2d(x, filt, padding=1), expected) <= 1e-5


def test_many_geometries_are_reported_once() -> None:
    """Past MANY_GEOMETRIES input sizes a filter warns, once, naming release_geometries; after a
    release it counts again."""
    filt = escoin.SparseFilter.from_dense(pruned((4, 2, 3, 3), 0.5, seed=10))
    sizes = [(1, 2, 5 + i, 5) for i in range(MANY_GEOMETRIES + 2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, shape in enumerate(sizes):
            escoin.stretch_offsets(filt, shape, padding=1)
            assert len(caught) == (1 if i >= MANY_GEOMETRIES else 0), i
        assert "release_geometries" in str(caught[0].message)
        assert caught[0].category is RuntimeWarning
        filt.release_geometries()
        for shape in sizes[:MANY_GEOMETRIES + 1]:
            escoin.stretch_offsets(filt, shape, padding=1)
        assert len(caught) == 2
