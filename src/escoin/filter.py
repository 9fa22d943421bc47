"""SparseFilter: a pruned convolution weight in CSR form, with its per-geometry caches."""
from __future__ import annotations

import numbers
import os
import threading
import warnings
from typing import Dict, NamedTuple, Optional, Tuple, Union

import numpy as np

from escoin import _core
from escoin._errors import EscoinError
from escoin.cuda_arrays import DeviceBuffer
from escoin.dtypes import compute_dtype, dtype_name, numpy_dtype
from escoin.geometry import ints


# The staged kernel's program forms, by the magic word that starts a program
# (cuda/src/tile_program.hpp: kTileProgramMagic, kGroupedTileProgramMagic).
TILE_FORMS = {0x45534336: "rows", 0x45534736: "row groups"}

# A filter keeps what it derives per input geometry (stretched offsets, device copies, kernel
# programs: ~4 to ~20 bytes a nonzero each) for as long as it lives, since every call of that
# geometry reuses it. A model fed many input sizes grows these without bound; past this many
# geometries a filter says so, once, and names SparseFilter.release_geometries.
MANY_GEOMETRIES = 16


class DevicePointers(NamedTuple):
    """Device addresses of a filter's arrays for one geometry, as :func:`escoin.sconv` takes
    them."""

    row_ptr: int       # int64, out_channels + 1
    offsets: int       # int32 stretched offsets, one per nonzero
    values: int        # float32, one per nonzero
    tile_program: int  # the staged kernel's program; 0 where that kernel would not pay


class HostPointers(NamedTuple):
    """Host addresses of a filter's arrays for one geometry and dtype, as
    ``escoin.sconv(..., device="cpu")`` takes them."""

    row_ptr: int  # int64, out_channels + 1
    offsets: int  # int32 stretched offsets, one per nonzero
    values: int   # the dtype's compute type (float64 for float64, else float32), one per nonzero


class _CsrStore:
    """The CSR arrays and every cache derived from them, shared by a filter and its device copies.

    Caches (stretched offsets and tile programs per geometry, device copies per device, cast
    values per dtype) are filled under a lock so two threads may use one filter.
    """

    def __init__(self, row_ptr: np.ndarray, col_idx: np.ndarray, values: np.ndarray,
                 shape: Tuple[int, int, int, int], groups: int) -> None:
        # Read-only from here on: the kernels trust row_ptr[M] to be the length of the offsets
        # derived from col_idx (a larger one read past them: a crash), and the caches below
        # would not follow a changed array. A changed filter is a new filter.
        self.row_ptr, self.col_idx, self.values = (_frozen(a) for a in (row_ptr, col_idx, values))
        self.shape, self.groups = shape, groups
        self.lock = threading.Lock()
        self.host_offsets: Dict[tuple, np.ndarray] = {}
        self.host_values: Dict[np.dtype, np.ndarray] = {values.dtype: self.values}
        self.device_csr: Dict[int, Tuple[DeviceBuffer, DeviceBuffer]] = {}
        self.device_offsets: Dict[Tuple[int, tuple], DeviceBuffer] = {}
        # Per (kind, device, geometry): the staged kernel's ("tile") and the tensor-core
        # kernel's ("mma") programs, built when a call asks for that kernel. None: the kernel
        # would not pay for that geometry or cannot run it, so there is no program.
        self.device_programs: Dict[Tuple[str, int, tuple], Optional[DeviceBuffer]] = {}
        self.warned_of_geometries = False
        # Counts release_geometries calls: a prepared call (SparseFilter.prepare) holds the
        # per-geometry arrays' addresses and refuses to run once this moved on. The cell holds
        # the same count in memory, for compiled callers of a prepared call's arrays
        # (PreparedCall.native_arguments), which check it without Python.
        self.generation = 0
        self.generation_cell = np.zeros(1, np.int64)

    def offsets(self, desc: tuple) -> np.ndarray:
        key = _offsets_key(desc)
        warn = False
        with self.lock:
            found = self.host_offsets.get(key)
            if found is None:
                found = np.empty(self.col_idx.size, np.int32)
                _core.stretch_offsets(desc, self.col_idx.ctypes.data, self.col_idx.size,
                                      found.ctypes.data)
                found = self.host_offsets[key] = _frozen(found)
                warn = len(self.host_offsets) > MANY_GEOMETRIES and not self.warned_of_geometries
                self.warned_of_geometries |= warn
        if warn:
            # (Python's default filter shows it once per escoin call site, not once a filter)
            warnings.warn(f"an escoin filter now keeps offsets and programs for more than "
                          f"{MANY_GEOMETRIES} input geometries (one per input size it was "
                          f"called with); SparseFilter.release_geometries (escoin_torch."
                          f"release_geometries for PyTorch models) frees them",
                          RuntimeWarning, stacklevel=2)
        return found

    def release_geometries(self) -> int:
        """Drops every per-geometry cache (host and device offsets, device programs); returns
        the bytes they held. Device memory is freed by cudaFree, after the device's queued
        work."""
        with self.lock:
            # The generation first: compiled callers check the cell before each launch, so it
            # must have moved on before the arrays are freed.
            self.generation += 1
            self.generation_cell[0] = self.generation
            held = ([a.nbytes for a in self.host_offsets.values()]
                    + [b.nbytes for b in self.device_offsets.values()]
                    + [b.nbytes for b in self.device_programs.values() if b is not None])
            self.host_offsets.clear()
            self.device_offsets.clear()
            self.device_programs.clear()
            self.warned_of_geometries = False
        return sum(held)

    def values_as(self, dtype: np.dtype) -> np.ndarray:
        with self.lock:
            found = self.host_values.get(dtype)
            if found is None:
                found = self.host_values[dtype] = _frozen(self.values.astype(dtype))
            return found

    def program(self, kind: str, desc: tuple) -> Optional[np.ndarray]:
        """A CUDA kernel's program for this geometry (host bytes): the staged kernel's ("tile")
        or the tensor-core kernel's ("mma"); None where that kernel would not pay or run."""
        offsets = self.offsets(desc)
        values32 = self.values_as(np.dtype(np.float32))
        args = (desc, self.row_ptr.ctypes.data, offsets.ctypes.data, values32.ctypes.data)
        nbytes = _core.program_size(kind, *args)
        if nbytes == 0:
            return None
        program = np.empty(nbytes, np.uint8)
        _core.program_build(kind, *args, program.ctypes.data, nbytes)
        return program

    def device_program(self, kind: str, device: int, desc: tuple) -> int:
        """The device address of a CUDA kernel's program (`kind` as in program()) for desc on
        `device`, built and uploaded once per device and geometry; 0 where there is none."""
        key = (kind, device, _offsets_key(desc))
        with self.lock:
            missing = key not in self.device_programs
        if missing:  # built outside the lock (offsets() takes it); a racing thread builds the same
            host = self.program(kind, desc)
            built = None if host is None else DeviceBuffer.from_host(host, device)
            with self.lock:
                self.device_programs.setdefault(key, built)
        program = self.device_programs[key]
        return 0 if program is None else program.ptr

    def device_arrays(self, device: int, desc: tuple) -> DevicePointers:
        """The filter's device arrays for desc on `device`, uploaded once per device and geometry.
        The tile program (~8 bytes per nonzero) is built once a batch the staged kernel runs
        for asks (from _core.tile_min_batch() images: now 1, since the staged kernel beat the
        streaming one at batch 1 too)."""
        values32 = self.values_as(np.dtype(np.float32))
        key = (device, _offsets_key(desc))
        with self.lock:
            csr = self.device_csr.get(device)
            if csr is None:
                csr = self.device_csr[device] = (DeviceBuffer.from_host(self.row_ptr, device),
                                                 DeviceBuffer.from_host(values32, device))
            offsets = self.device_offsets.get(key)
        # Built outside the lock (offsets() takes it); a racing thread builds the same.
        if offsets is None:
            built = DeviceBuffer.from_host(self.offsets(desc), device)
            with self.lock:
                offsets = self.device_offsets.setdefault(key, built)
        wants_program = desc[0] >= _core.tile_min_batch()
        program = self.device_program("tile", device, desc) if wants_program else 0
        return DevicePointers(csr[0].ptr, offsets.ptr, csr[1].ptr, program)


def _frozen(array: np.ndarray) -> np.ndarray:
    """A copy of a 1-d array in immutable memory (bytes): no array over it, nor the memory's
    owner, can be made writeable, so what the CPU kernel trusts (a filter's own offsets, the
    count in row_ptr) stays as escoin made it."""
    return np.frombuffer(np.ascontiguousarray(array).tobytes(), array.dtype)


def _offsets_key(desc: tuple) -> tuple:
    # Offsets depend on everything but the batch (field 0) and the output channels (field 4).
    return desc[1:4] + desc[5:]


class SparseFilter:
    """A pruned conv weight of shape (M, C/groups, kh, kw) stored as CSR.

    Rows are output channels; columns index (c_local, kh, kw) within the channel's group. Build
    one with :meth:`from_dense` or :meth:`from_csr`; pass it to :func:`escoin.conv2d`. Its arrays
    (``row_ptr``, ``col_idx``, ``values``, the stretched offsets) are read-only: to change a
    filter, build a new one (``from_csr`` with modified copies).
    """

    def __init__(self, store: _CsrStore, device: Optional[int] = None) -> None:
        self._store = store
        self._device = device

    # ---- construction ----
    @classmethod
    def from_dense(cls, weight: object, groups: int = 1, threshold: float = 0.0) -> "SparseFilter":
        """Compresses a dense weight, keeping entries with |w| > threshold."""
        dense = np.asarray(weight)
        if dense.ndim != 4:
            raise EscoinError(f"weight must have 4 dimensions (M, C/groups, kh, kw), got shape "
                              f"{dense.shape}")
        stored = dense.dtype
        groups = _check_groups(groups, dense.shape[0])
        if not (threshold >= 0):
            raise EscoinError(f"threshold must be >= 0, got {threshold!r}")
        # A 16-bit weight is compressed widened (exactly) to float32, its values stored back.
        computed = compute_dtype(dtype_name(stored, "weight"))
        dense = np.ascontiguousarray(dense, computed)
        rows, cols = dense.shape[0], int(np.prod(dense.shape[1:]))
        nnz = _core.csr_count(dense.ctypes.data, computed.name, rows, cols, float(threshold))
        row_ptr = np.empty(rows + 1, np.int64)
        col_idx = np.empty(nnz, np.int32)
        values = np.empty(nnz, computed)
        _core.csr_compress(dense.ctypes.data, computed.name, rows, cols, float(threshold),
                           row_ptr.ctypes.data, col_idx.ctypes.data, values.ctypes.data)
        return cls(_CsrStore(row_ptr, col_idx, values.astype(stored, copy=False),
                             _shape4(dense.shape), groups))

    @classmethod
    def from_csr(cls, row_ptr: object, col_idx: object, values: object,
                 shape: Tuple[int, int, int, int], groups: int = 1) -> "SparseFilter":
        """Wraps existing CSR arrays (copied), after checking them against the shape."""
        shape = _shape4(shape)
        groups = _check_groups(groups, shape[0])
        row_ptr = _as_1d(row_ptr, np.int64, "row_ptr")
        col_idx = _as_1d(col_idx, np.int32, "col_idx")
        values = np.array(values, copy=True)
        if values.ndim != 1:
            raise EscoinError(f"values must be a 1-d array, got {values.ndim}-d")
        dtype_name(values.dtype, "values")
        if row_ptr.size != shape[0] + 1:
            raise EscoinError(f"row_ptr must have M + 1 = {shape[0] + 1} entries, got "
                              f"{row_ptr.size}")
        if col_idx.size != values.size:
            raise EscoinError(f"col_idx and values must have the same length, got "
                              f"{col_idx.size} and {values.size}")
        _core.csr_validate(shape[0], shape[1] * shape[2] * shape[3], row_ptr.ctypes.data,
                           col_idx.ctypes.data, col_idx.size)
        # A weight has one value per position, so a repeated column is a construction error.
        # Rows are sorted so that the CPU kernel's channel chunks see each row's nonzeros in
        # input-channel order (any order is correct; sorted is the fast one).
        rows = np.repeat(np.arange(shape[0]), np.diff(row_ptr))
        order = np.lexsort((col_idx, rows))
        col_idx, values = col_idx[order], values[order]
        repeated = (np.diff(col_idx) == 0) & (np.diff(rows) == 0)
        if repeated.any():
            at = int(np.argmax(repeated))
            raise EscoinError(f"col_idx repeats column {int(col_idx[at])} in row {int(rows[at])}")
        return cls(_CsrStore(row_ptr, np.ascontiguousarray(col_idx),
                             np.ascontiguousarray(values), shape, groups))

    # ---- description ----
    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return self._store.shape

    @property
    def groups(self) -> int:
        return self._store.groups

    @property
    def out_channels(self) -> int:
        return self.shape[0]

    @property
    def in_channels(self) -> int:
        return self.shape[1] * self.groups

    @property
    def kernel_size(self) -> Tuple[int, int]:
        return self.shape[2], self.shape[3]

    @property
    def nnz(self) -> int:
        return int(self._store.col_idx.size)

    @property
    def density(self) -> float:
        total = int(np.prod(self.shape))
        return self.nnz / total if total else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of the CSR arrays (row_ptr, col_idx, values)."""
        s = self._store
        return s.row_ptr.nbytes + s.col_idx.nbytes + s.values.nbytes

    @property
    def dtype(self) -> np.dtype:
        return self._store.values.dtype

    # Views of the immutable arrays (_frozen), so that changing a returned array's flags or shape
    # leaves the filter's untouched.
    @property
    def row_ptr(self) -> np.ndarray:
        return self._store.row_ptr.view()

    @property
    def col_idx(self) -> np.ndarray:
        return self._store.col_idx.view()

    @property
    def values(self) -> np.ndarray:
        return self._store.values.view()

    @property
    def device(self) -> str:
        return "cpu" if self._device is None else f"cuda:{self._device}"

    def __repr__(self) -> str:
        return (f"SparseFilter(shape={self.shape}, groups={self.groups}, nnz={self.nnz}, "
                f"density={self.density:.4f}, dtype={self.dtype}, device='{self.device}')")

    # ---- conversion ----
    def to_dense(self) -> np.ndarray:
        s = self._store
        dense = np.zeros((self.shape[0], int(np.prod(self.shape[1:]))), self.dtype)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(s.row_ptr))
        dense[rows, s.col_idx] = s.values
        return dense.reshape(self.shape)

    def astype(self, dtype: Union[str, np.dtype, type]) -> "SparseFilter":
        dtype = numpy_dtype(dtype)
        s = self._store
        return SparseFilter(_CsrStore(s.row_ptr, s.col_idx, s.values.astype(dtype), s.shape,
                                      s.groups), self._device)

    def cuda(self, device: int = 0) -> "SparseFilter":
        """This filter, living on CUDA device `device` (the CSR is uploaded on first use)."""
        from escoin.info import cuda_device_count

        count = cuda_device_count()
        if not isinstance(device, int) or not 0 <= device < count:
            raise EscoinError(f"device must be a CUDA device index in [0, {count}), got {device!r}")
        return SparseFilter(self._store, device)

    def cpu(self) -> "SparseFilter":
        return SparseFilter(self._store, None)

    def device_pointers(self, input_shape: Tuple[int, ...], stride: object = 1,
                        padding: object = 0, dilation: object = 1,
                        device: Optional[int] = None) -> DevicePointers:
        """Device addresses of the filter's arrays (row_ptr, stretched offsets, values, tile
        program) for an input of `input_shape` and this geometry on CUDA device `device` (default:
        the filter's device), as :func:`escoin.sconv` takes them. The first call per device and
        geometry uploads (synchronously, so not inside graph capture); the memory lives with the
        filter."""
        from escoin.geometry import descriptor

        if device is None:
            if self._device is None:
                raise EscoinError("device must be given for a filter that lives on the cpu")
            device = self._device
        desc = descriptor(input_shape, self.shape, self.groups, stride, padding, dilation)
        _core.conv_layout(desc)  # validates the geometry before anything is uploaded
        return self._store.device_arrays(int(device), desc)

    def prepare(self, input_shape: Tuple[int, ...], stride: object = 1, padding: object = 0,
                dilation: object = 1, dtype: object = "float32",
                device: Union[int, str, None] = None) -> "_core.PreparedCall":
        """A call of this filter on inputs of `input_shape` in `dtype` with this geometry, on
        CUDA device `device` (default: the filter's device, or the CPU for a host filter) or
        with ``device="cpu"`` on the host, derived and validated once, for callers that repeat
        the same call: ``call.run(x, y, workspace, bias=0, residual=0, relu=False, stream=0)``
        takes only addresses (as :func:`escoin.sconv` does) and costs the core's call and
        little else, where sconv builds and checks the descriptor each time.

        ``call.output_shape`` is y's (N, M, OH, OW) and ``call.workspace_bytes`` the size of
        the workspace each run needs. x, y, bias, residual and the workspace are memory of
        that device (host memory with ``device="cpu"``), y and residual contiguous NCHW of
        output_shape, x contiguous NCHW of input_shape, all in `dtype` but the workspace; the
        CUDA call is queued on `stream`, the CPU call runs now. After
        :meth:`release_geometries` the call refuses to run: prepare it again."""
        from escoin.geometry import descriptor

        name = dtype_name(dtype)
        if device is None:
            device = "cpu" if self._device is None else self._device
        desc = descriptor(input_shape, self.shape, self.groups, stride, padding, dilation)
        layout = _core.conv_layout(desc)  # validates the geometry before anything is uploaded
        output_shape = (desc[0], desc[4], layout["out_height"], layout["out_width"])
        workspace_bytes = _core.workspace_size(desc, name)
        if device == "cpu":
            arrays = self.host_pointers(input_shape, stride, padding, dilation, dtype=name)
            return _core.PreparedCall(desc, name, -1, arrays.row_ptr, arrays.offsets,
                                      arrays.values, 0, workspace_bytes, output_shape,
                                      self._store)
        if isinstance(device, bool) or not isinstance(device, numbers.Integral) or device < 0:
            raise EscoinError(f"device must be a CUDA device index or 'cpu', got {device!r}")
        if name == "float64":
            raise EscoinError("dtype float64 runs on the CPU only (device='cpu'); CUDA computes "
                              "float32, float16 and bfloat16")
        pointers = self._store.device_arrays(int(device), desc)  # (desc validated above)
        return _core.PreparedCall(desc, name, int(device), pointers.row_ptr, pointers.offsets,
                                  pointers.values, pointers.tile_program, workspace_bytes,
                                  output_shape, self._store)

    def release_geometries(self) -> int:
        """Frees what the filter keeps per input geometry (the stretched offsets and their
        device copies, the CUDA kernels' programs) and returns the bytes that held; the CSR and
        its device copies stay. The next call of each geometry derives them again. For models
        fed many input sizes, whose filters would otherwise keep every size's arrays (a
        RuntimeWarning says so past MANY_GEOMETRIES).

        Pointers from :meth:`device_pointers` and :meth:`host_pointers` are invalid afterwards,
        and so is any CUDA graph captured with this filter: capture it again. Queued kernels are
        safe (device memory is freed after the device's queued work), but no other thread may
        be in a call with this filter meanwhile."""
        return self._store.release_geometries()

    def host_pointers(self, input_shape: Tuple[int, ...], stride: object = 1,
                      padding: object = 0, dilation: object = 1,
                      dtype: object = "float32") -> HostPointers:
        """Host addresses of the filter's arrays (row_ptr, stretched offsets, values in the
        compute type of `dtype`) for an input of `input_shape` and this geometry, as
        ``escoin.sconv(..., device="cpu", dtype=dtype)`` takes them. Built once per geometry
        and compute type; the memory lives with the filter."""
        from escoin.geometry import descriptor

        desc = descriptor(input_shape, self.shape, self.groups, stride, padding, dilation)
        _core.conv_layout(desc)  # validates the geometry before the offsets are derived
        offsets = self._store.offsets(desc)
        values = self._store.values_as(compute_dtype(dtype_name(dtype)))
        return HostPointers(self.row_ptr.ctypes.data, offsets.ctypes.data, values.ctypes.data)

    def tile_program(self, input_shape: Tuple[int, ...], stride: object = 1, padding: object = 0,
                     dilation: object = 1) -> Optional[np.ndarray]:
        """The staged CUDA kernel's program for an input of `input_shape` and this geometry, as
        host bytes (uint8) for callers that upload it themselves (to 16-byte aligned device
        memory), or None where that kernel would not pay (then pass no program:
        :func:`escoin.sconv`'s tile_program_ptr 0). A new array on each call, the caller's to
        keep."""
        from escoin.geometry import descriptor

        desc = descriptor(input_shape, self.shape, self.groups, stride, padding, dilation)
        _core.conv_layout(desc)  # validates the geometry before the offsets are derived
        return self._store.program("tile", desc)

    def tile_form(self, input_shape: Tuple[int, ...], stride: object = 1, padding: object = 0,
                  dilation: object = 1) -> Optional[str]:
        """Which form the staged CUDA kernel's program takes for this geometry: "row groups"
        where each group's output channels 4k..4k+3 share their nonzero pattern exactly (block
        pruning: each input value the kernel loads then feeds the four channels), else "rows";
        None where that kernel would not pay. Builds the program on the host, as
        :meth:`tile_program` does (no GPU needed), so that a user can check that a block-pruned
        model's layers take the faster form."""
        program = self.tile_program(input_shape, stride, padding, dilation)
        return None if program is None else TILE_FORMS[int(program.view(np.int32)[0])]

    def mma_program(self, input_shape: Tuple[int, ...], stride: object = 1, padding: object = 0,
                    dilation: object = 1) -> Optional[np.ndarray]:
        """The tensor-core kernel's program for an input of `input_shape` and this geometry, as
        host bytes (uint8) for callers that upload it themselves (:func:`escoin.sconv`'s
        mma_program_ptr), or None where that kernel cannot run the geometry (groups, a stride
        that needs phase planes, rows too long). A new array on each call, the caller's to keep.
        """
        from escoin.geometry import descriptor

        desc = descriptor(input_shape, self.shape, self.groups, stride, padding, dilation)
        _core.conv_layout(desc)  # validates the geometry before the offsets are derived
        return self._store.program("mma", desc)

    # ---- persistence ----
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Writes the CSR arrays, shape and groups to an .npz file (bfloat16 values as their bits:
        .npz has no bfloat16 type)."""
        s = self._store
        bfloat16 = s.values.dtype.name == "bfloat16"
        np.savez(path, row_ptr=s.row_ptr, col_idx=s.col_idx,
                 values=s.values.view(np.uint16) if bfloat16 else s.values,
                 values_dtype=np.array(s.values.dtype.name),
                 shape=np.array(s.shape, np.int64), groups=np.array(s.groups, np.int64),
                 format=np.array("escoin-csr-1"))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SparseFilter":
        """Reads a filter written by :meth:`save`, validating it."""
        with np.load(path, allow_pickle=False) as data:
            if "format" not in data or str(data["format"]) != "escoin-csr-1":
                raise EscoinError(f"{path} is not an escoin filter file")
            missing = [key for key in ("row_ptr", "col_idx", "values", "shape", "groups")
                       if key not in data]
            if missing:
                raise EscoinError(f"{path} lacks the arrays {missing}: not a whole escoin "
                                  "filter file")
            values = data["values"]
            if "values_dtype" in data and str(data["values_dtype"]) == "bfloat16":
                values = values.view(numpy_dtype("bfloat16"))
            return cls.from_csr(data["row_ptr"], data["col_idx"], values,
                                tuple(int(v) for v in data["shape"]), int(data["groups"]))


def _shape4(shape: object) -> Tuple[int, int, int, int]:
    items = ints(shape, "shape", 4, "(M, C/groups, kh, kw)")
    if min(items) < 1:
        raise EscoinError(f"shape must be 4 positive ints (M, C/groups, kh, kw), got {shape!r}")
    return items  # type: ignore[return-value]


def _check_groups(groups: object, out_channels: int) -> int:
    if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups < 1:
        raise EscoinError(f"groups must be a positive int, got {groups!r}")
    if out_channels % groups:
        raise EscoinError(f"groups ({groups}) must divide the out_channels ({out_channels})")
    return int(groups)


def _as_1d(array: object, dtype: type, name: str) -> np.ndarray:
    result = np.asarray(array)
    if result.ndim == 1 and result.size == 0:
        result = result.astype(dtype)  # an empty list is float64 to NumPy
    if result.ndim != 1 or not np.issubdtype(result.dtype, np.integer):
        raise EscoinError(f"{name} must be a 1-d integer array, got {result.ndim}-d {result.dtype}")
    converted = result.astype(dtype)
    if not np.array_equal(converted, result):
        raise EscoinError(f"{name} has values outside the {np.dtype(dtype).name} range")
    return np.ascontiguousarray(converted)
