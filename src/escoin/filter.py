"""SparseFilter: a pruned convolution weight in CSR form, with its per-geometry caches."""
from __future__ import annotations

import numbers
import os
import zipfile
from typing import Dict, NamedTuple, Optional, Tuple, Union

import numpy as np

from escoin import _core
from escoin._errors import EscoinError
from escoin.cuda_arrays import cuda_view, is_cuda_array, stream_handle
from escoin.dtypes import compute_dtype, dtype_name, numpy_dtype
from escoin.filter_caches import MANY_GEOMETRIES, CsrStore, DevicePointers
from escoin.geometry import ints


# The staged kernel's program forms, by the magic word that starts a program
# (cuda/src/tile_program.hpp: kTileProgramMagic, kGroupedTileProgramMagic).
TILE_FORMS = {0x45534336: "rows", 0x45534736: "row groups"}

__all__ = ["DevicePointers", "HostPointers", "MANY_GEOMETRIES", "SparseFilter", "TILE_FORMS"]


def cuda_device(device: object, dtype: str) -> int:
    """`device` as a CUDA device index for a call in `dtype` (escoin's name), checked."""
    if isinstance(device, bool) or not isinstance(device, numbers.Integral) or device < 0:
        raise EscoinError(f"device must be a CUDA device index or 'cpu', got {device!r}")
    if dtype == "float64":
        raise EscoinError("dtype float64 runs on the CPU only (device='cpu'); CUDA computes "
                          "float32, float16 and bfloat16")
    return int(device)


class HostPointers(NamedTuple):
    """Host addresses of a filter's arrays for one geometry and dtype, as
    ``escoin.sconv(..., device="cpu")`` takes them."""

    row_ptr: int  # int64, out_channels + 1
    offsets: int  # int32 stretched offsets, one per nonzero
    values: int   # the dtype's compute type (float64 for float64, else float32), one per nonzero


class SparseFilter:
    """A pruned conv weight of shape (M, C/groups, kh, kw) stored as CSR.

    Rows are output channels; columns index (c_local, kh, kw) within the channel's group. Build
    one with :meth:`from_dense` or :meth:`from_csr`; pass it to :func:`escoin.conv2d`. Its arrays
    (``row_ptr``, ``col_idx``, ``values``, the stretched offsets) are read-only: to change a
    filter, build a new one (:meth:`with_values` where only the values change, ``from_csr``
    with modified copies otherwise).
    """

    def __init__(self, store: CsrStore, device: Optional[int] = None) -> None:
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
        if (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
                or not threshold >= 0):
            raise EscoinError(f"threshold must be a real number >= 0, got {threshold!r}")
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
        return cls(CsrStore.of(row_ptr, col_idx, values.astype(stored, copy=False),
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
        return cls(CsrStore.of(row_ptr, np.ascontiguousarray(col_idx),
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

    # Views of the immutable arrays (filter_caches.frozen), so that changing a returned array's
    # flags or shape leaves the filter's untouched.
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
        """This filter with its values in `dtype` (its pattern shared, as :meth:`with_values`
        shares it)."""
        return self.with_values(self._store.values.astype(numpy_dtype(dtype)))

    def with_values(self, values: object) -> "SparseFilter":
        """A filter of this one's nonzero pattern and new `values`: ``values[j]`` takes the
        place of ``self.values[j]`` (the same length and order; any escoin dtype, copied).

        What only the pattern decides is shared rather than derived again: the stretched
        offsets of each input geometry, their device copies, and the layout of the staged
        CUDA kernel's program. So where a training loop changes a layer's weights but not its
        pattern, a new filter costs a copy of the values and, per geometry it is called with
        on a GPU, a copy of that program with the new weights written in, instead of what
        :meth:`from_csr` and a new program cost. Releasing either filter's geometries
        (:meth:`release_geometries`) releases the shared arrays for both."""
        array = np.array(values, copy=True)
        if array.ndim != 1 or array.size != self.nnz:
            raise EscoinError(f"values must be a 1-d array of the filter's {self.nnz} nonzeros, "
                              f"got shape {array.shape}")
        dtype_name(array.dtype, "values")
        return SparseFilter(self._store.with_values(array), self._device)

    def __reduce__(self) -> tuple:
        """Pickled and copied as its CSR arrays, shape, groups and device: the copy derives its
        per-geometry arrays (stretched offsets, device copies, programs) again on first use."""
        s = self._store
        return (_rebuilt, (s.row_ptr, s.col_idx, s.values, s.shape, s.groups, self._device))

    def cuda(self, device: int = 0) -> "SparseFilter":
        """This filter, living on CUDA device `device` (the CSR is uploaded on first use)."""
        from escoin.info import build_info, cuda_device_count

        count = cuda_device_count()
        if not isinstance(device, int) or not 0 <= device < count:
            why = ("" if build_info()["cuda"] else
                   " (escoin was built without CUDA; rebuild with nvcc available, ESCOIN_CUDA=ON)")
            raise EscoinError(f"device must be a CUDA device index in [0, {count}), got "
                              f"{device!r}{why}")
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
                device: Union[int, str, None] = None, values: object = None,
                stream: object = None) -> "_core.PreparedCall":
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
        :meth:`release_geometries` the call refuses to run: prepare it again.

        ``values`` (CUDA calls only): a CUDA array (``__cuda_array_interface__`` or DLPack) of
        the filter's nnz float32 values on `device`, contiguous, in the order of
        :attr:`values`, which the call computes with instead of the filter's own (those never
        reach the device). For values that change while the pattern stays (a training step's):
        the staged kernel's program for them is written on the device, queued on `stream`
        (None: the legacy default stream), so the call costs no host copy of the values and no
        synchronisation once the pattern's layout for this geometry is on the device (the first
        such call uploads it). The call reads `values` in place and keeps the array alive:
        values written later need a new prepare, since the program holds the old ones. The
        program's memory is allocated on `stream` and freed on it when the call goes, so the call
        is bound to `stream` (``call.stream``): run() on another stream is an EscoinError (it
        would not be ordered after the program's write, nor the free after it)."""
        name = dtype_name(dtype)
        if device is None:
            device = "cpu" if self._device is None else self._device
        desc, output_shape, workspace_bytes = self._call_geometry(input_shape, stride, padding,
                                                                  dilation, name)
        if device == "cpu":
            if values is not None:
                raise EscoinError("values must be None for a call on the cpu: a host call "
                                  "computes with the filter's own values (with_values makes a "
                                  "filter of others)")
            arrays = self._host_pointers(desc, name)  # (desc validated above)
            return _core.prepared_call(desc, name, -1, arrays.row_ptr, arrays.offsets,
                                      arrays.values, 0, workspace_bytes, output_shape,
                                      self._store)
        device = cuda_device(device, name)
        if values is not None:
            return self._prepare_with_values(desc, name, device, values, stream,
                                             workspace_bytes, output_shape)
        pointers = self._store.device_arrays(device, desc)  # (desc validated above)
        return _core.prepared_call(desc, name, device, pointers.row_ptr, pointers.offsets,
                                  pointers.values, pointers.tile_program, workspace_bytes,
                                  output_shape, self._store)

    def prepare_for_values(self, input_shape: Tuple[int, ...], stride: object = 1,
                           padding: object = 0, dilation: object = 1, dtype: object = "float32",
                           device: Optional[int] = None) -> "_core.PreparedCall":
        """A CUDA call of this filter's pattern on inputs of `input_shape`, for compiled code
        that passes each launch's values itself (escoin-torch's C++ training path, through
        :func:`escoin.c_api`): what ``prepare(values=...)`` derives once per geometry, without
        values. ``native_arguments()`` gives 0 for the values and the program, and
        ``native_program_layout()`` what each launch's program is written from: a launch passes
        float32 values of this pattern in the order of :attr:`values` and, where the layout is
        not 0, the program ``escoin_tile_program_write_weights`` wrote for them, queued ahead of
        it on the launch's stream. run() refuses (the call has no values). The first such call
        of a geometry uploads the pattern's layout for it, kept until
        :meth:`release_geometries`, after which the call is stale (``current`` is False)."""
        name = dtype_name(dtype)
        if device is None:
            device = self._device
        if device is None or isinstance(device, str):
            raise EscoinError(f"device must be a CUDA device index (prepare_for_values prepares "
                              f"CUDA calls only), got {device!r}")
        device = cuda_device(device, name)
        desc, output_shape, workspace_bytes = self._call_geometry(input_shape, stride, padding,
                                                                  dilation, name)
        row_ptr, offsets = self._store.pattern.device_arrays(device, desc)
        layout = (self._store.device_tile_layout(device, desc)
                  if desc[0] >= _core.tile_min_batch() else None)
        program_layout = ((0, 0, 0, self.nnz) if layout is None else
                          (layout.program.ptr, layout.program.nbytes, layout.slots.ptr, self.nnz))
        return _core.prepared_call(desc, name, device, row_ptr, offsets, 0, 0, workspace_bytes,
                                  output_shape, self._store, program_layout=program_layout)

    def _call_geometry(self, input_shape: Tuple[int, ...], stride: object, padding: object,
                       dilation: object, dtype: str) -> Tuple[tuple, Tuple[int, ...], int]:
        """A call's descriptor (validated), output shape and workspace bytes."""
        from escoin.geometry import descriptor

        desc = descriptor(input_shape, self.shape, self.groups, stride, padding, dilation)
        layout = _core.conv_layout(desc)  # validates the geometry before anything is uploaded
        output_shape = (desc[0], desc[4], layout["out_height"], layout["out_width"])
        return desc, output_shape, _core.workspace_size(desc, dtype)

    def _prepare_with_values(self, desc: tuple, dtype: str, device: int, values: object,
                             stream: object, workspace_bytes: int,
                             output_shape: Tuple[int, ...]) -> "_core.PreparedCall":
        """prepare's CUDA call on the caller's device `values` (prepare's docstring)."""
        queue = stream_handle(stream)
        if not is_cuda_array(values):
            raise EscoinError(f"values must be a CUDA array (__cuda_array_interface__ or "
                              f"__dlpack__) on device {device}, got {type(values).__name__}")
        view = cuda_view(values, "values", queue)
        if view.shape != (self.nnz,) or view.dtype != np.float32 or not view.contiguous:
            raise EscoinError(f"values must be a contiguous 1-d float32 array of the filter's "
                              f"{self.nnz} nonzeros, got shape {view.shape} of {view.dtype}"
                              f"{'' if view.contiguous else ', not contiguous'}")
        if self.nnz and view.device != device:
            raise EscoinError(f"values must be on CUDA device {device}, got device "
                              f"{view.device}")
        row_ptr, offsets = self._store.pattern.device_arrays(device, desc)
        program = None
        if desc[0] >= _core.tile_min_batch():
            program = self._store.program_of_device_values(device, desc, view.ptr, queue)
        return _core.prepared_call(desc, dtype, device, row_ptr, offsets, view.ptr,
                                  0 if program is None else program.ptr, workspace_bytes,
                                  output_shape, self._store, borrowed=(view, program),
                                  stream=queue)

    def release_geometries(self) -> int:
        """Frees what the filter keeps per input geometry (the stretched offsets and their
        device copies, the CUDA kernels' programs) and returns the bytes that held; the CSR and
        its device copies stay. The next call of each geometry derives them again. For models
        fed many input sizes, whose filters would otherwise keep every size's arrays (a
        RuntimeWarning says so past MANY_GEOMETRIES). Filters sharing this one's pattern
        (:meth:`with_values`, :meth:`astype`) share its offsets and program layouts: those are
        released for them too (their own programs stay until they are released).

        Pointers from :meth:`device_pointers` and :meth:`host_pointers` are invalid afterwards,
        and so is any CUDA graph captured with this filter or one sharing its pattern: capture
        it again. Queued kernels are
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
        return self._host_pointers(desc, dtype_name(dtype))

    def _host_pointers(self, desc: tuple, dtype: str) -> HostPointers:
        """host_pointers for a validated descriptor and escoin's name of the dtype."""
        offsets = self._store.offsets(desc)
        values = self._store.values_as(compute_dtype(dtype))
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
        .npz has no bfloat16 type); ".npz" is appended to a path without it, as NumPy does, and
        :meth:`load` finds the file by the same path."""
        s = self._store
        bfloat16 = s.values.dtype.name == "bfloat16"
        np.savez(path, row_ptr=s.row_ptr, col_idx=s.col_idx,
                 values=s.values.view(np.uint16) if bfloat16 else s.values,
                 values_dtype=np.array(s.values.dtype.name),
                 shape=np.array(s.shape, np.int64), groups=np.array(s.groups, np.int64),
                 format=np.array("escoin-csr-1"))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SparseFilter":
        """Reads a filter written by :meth:`save` (at the path given to save), validating it."""
        path = os.fspath(path)
        if not os.path.exists(path) and os.path.exists(path + ".npz"):
            path += ".npz"  # (save's np.savez appended it)
        def not_a_filter_file(why: str) -> EscoinError:
            return EscoinError(f"{path} is not an escoin filter file (an .npz written by "
                               f"SparseFilter.save): {why}")

        if os.path.isfile(path) and not zipfile.is_zipfile(path):
            # (np.load would take it for a pickle and suggest allow_pickle, which load has not)
            raise not_a_filter_file("it is not an .npz archive")
        try:
            data = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise not_a_filter_file(str(error)) from None
        with data:
            # Every member read now: an .npz reads each when asked, and a damaged one (a bad
            # CRC, a garbled header, an object array) fails there, with whatever error the
            # reading raises.
            try:
                arrays = {key: data[key] for key in data.files}
            except Exception as error:
                raise not_a_filter_file(f"{type(error).__name__}: {error}") from None
        if "format" not in arrays or str(arrays["format"]) != "escoin-csr-1":
            raise EscoinError(f"{path} is not an escoin filter file")
        missing = [key for key in ("row_ptr", "col_idx", "values", "shape", "groups")
                   if key not in arrays]
        if missing:
            raise EscoinError(f"{path} lacks the arrays {missing}: not a whole escoin "
                              "filter file")
        values = _stored_values(arrays, path)
        shape, groups = arrays["shape"], arrays["groups"]
        if (shape.shape != (4,) or groups.shape != ()
                or not all(np.issubdtype(a.dtype, np.integer) for a in (shape, groups))):
            raise EscoinError(f"{path} holds a shape of {shape.shape} {shape.dtype} and "
                              f"groups of {groups.shape} {groups.dtype}: escoin writes 4 "
                              "integers and one integer")
        return cls.from_csr(arrays["row_ptr"], arrays["col_idx"], values,
                            tuple(int(v) for v in shape), int(groups))


def _stored_values(data: Dict[str, np.ndarray], path: str) -> np.ndarray:
    """A filter file's values in their dtype: bfloat16 is stored as its bits (uint16), tagged;
    a tag that does not match what is stored is a corrupt file, not a dtype to reinterpret."""
    values = data["values"]
    tag = str(data["values_dtype"]) if "values_dtype" in data else values.dtype.name
    if tag == "bfloat16":
        if values.dtype != np.uint16:
            raise EscoinError(f"{path} tags its values bfloat16 but stores {values.dtype} "
                              "(save writes bfloat16 as uint16 bits)")
        return values.view(numpy_dtype("bfloat16"))
    if tag != values.dtype.name:
        raise EscoinError(f"{path} tags its values {tag} but stores {values.dtype}")
    return values


def _shape4(shape: object) -> Tuple[int, int, int, int]:
    items = ints(shape, "shape", 4, "(M, C/groups, kh, kw)")
    if min(items) < 1:
        raise EscoinError(f"shape must be 4 positive ints (M, C/groups, kh, kw), got {shape!r}")
    # A row's columns are int32 (col_idx), and the rows an int64 count.
    if items[1] * items[2] * items[3] > np.iinfo(np.int32).max or items[0] >= 2**62:
        raise EscoinError(f"shape {tuple(items)} is too large: a row's C/groups * kh * kw "
                          f"columns must fit int32 (col_idx)")
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


def _rebuilt(row_ptr: np.ndarray, col_idx: np.ndarray, values: np.ndarray,
             shape: Tuple[int, int, int, int], groups: int,
             device: Optional[int]) -> SparseFilter:
    """A pickled SparseFilter (its __reduce__), checked as from_csr checks any CSR."""
    filt = SparseFilter.from_csr(row_ptr, col_idx, values, shape, groups)
    return filt if device is None else filt.cuda(device)
