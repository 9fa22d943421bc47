"""conv2d and its helpers: torch.nn.functional.conv2d semantics, computed from a SparseFilter
on the CPU (NumPy arrays) or on a GPU (CUDA arrays), plus the raw-pointer call sconv."""
from __future__ import annotations

import numbers
import threading
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from escoin import _core
from escoin._errors import EscoinError
from escoin.cuda_arrays import (DeviceArray, DeviceBuffer, cuda_view, is_cuda_array,
                                stream_handle)
from escoin.dtypes import CPU_DTYPES, CUDA_DTYPES, compute_dtype, dtype_name
from escoin.filter import SparseFilter
from escoin.geometry import IntPair, Padding, descriptor

_HOST_TO_DEVICE = 0


def _require_filter(filt: object) -> None:
    if not isinstance(filt, SparseFilter):
        raise EscoinError(f"filt must be an escoin.SparseFilter, got {type(filt).__name__}")


def _filter_descriptor(input_shape: Sequence[int], filt: SparseFilter, stride: IntPair,
                       padding: Padding, dilation: IntPair) -> tuple:
    """The C descriptor of filt applied to an NCHW input shape; filt checked to be a filter."""
    _require_filter(filt)
    return descriptor(input_shape, filt.shape, filt.groups, stride, padding, dilation)


def output_shape(input_shape: Sequence[int], filt: SparseFilter, stride: IntPair = 1,
                 padding: Padding = 0, dilation: IntPair = 1) -> Tuple[int, int, int, int]:
    """(N, M, OH, OW) of conv2d for an NCHW input shape."""
    desc = _filter_descriptor(input_shape, filt, stride, padding, dilation)
    layout = _core.conv_layout(desc)
    return desc[0], desc[4], layout["out_height"], layout["out_width"]


def workspace_size(input_shape: Sequence[int], filt: SparseFilter, stride: IntPair = 1,
                   padding: Padding = 0, dilation: IntPair = 1, dtype: object = np.float32,
                   tensor_cores: bool = False) -> int:
    """Bytes of workspace a conv2d with this geometry and dtype of x needs (the stretched input,
    in the dtype's compute type); with tensor_cores, enough for either kernel conv2d's
    tensor_cores=True may run (the tensor-core kernel's layout has longer rows)."""
    desc = _filter_descriptor(input_shape, filt, stride, padding, dilation)
    nbytes = _core.workspace_size(desc, dtype_name(dtype))
    return max(nbytes, _core.mma_workspace_size(desc)) if tensor_cores else nbytes


def stretch_offsets(filt: SparseFilter, input_shape: Sequence[int], stride: IntPair = 1,
                    padding: Padding = 0, dilation: IntPair = 1) -> np.ndarray:
    """The filter's columns stretched for this geometry (int32, one per nonzero), as sconv takes.

    Cached on the filter: computing them again for the same geometry costs nothing.
    """
    desc = _filter_descriptor(input_shape, filt, stride, padding, dilation)
    return filt._store.offsets(desc).view()  # a view, as SparseFilter.row_ptr is


def conv2d(x: object, filt: SparseFilter, bias: Optional[object] = None, stride: IntPair = 1,
           padding: Padding = 0, dilation: IntPair = 1, relu: bool = False,
           out: Optional[object] = None, workspace: Optional[object] = None,
           stream: Optional[object] = None, residual: Optional[object] = None,
           tensor_cores: bool = False) -> object:
    """torch.nn.functional.conv2d(x, filt.to_dense(), bias, stride, padding, dilation,
    filt.groups), plus `residual` if given, optionally followed by ReLU, computed from the
    nonzeros only: relu(conv2d(...) + residual) in one pass over the output.

    A NumPy x (float32, float64, float16, or ml_dtypes' bfloat16: :mod:`escoin.dtypes`) runs on
    the CPU and returns a NumPy array of its dtype. A CUDA array x (float32, float16 or
    bfloat16, C-contiguous) runs on its device on `stream` and returns `out` or an escoin
    DeviceArray of its dtype. The 16-bit types are computed in float32 on both, each output
    rounded once. A 3-d x (C, H, W) is treated as one image, as F.conv2d does. `residual` (a
    residual network's shortcut) is an array of the output's shape and x's dtype on x's device
    (C-contiguous on CUDA), separate from `out`.

    ``tensor_cores=True`` runs a float32 CUDA call on the tensor-core kernel where it can run
    the geometry (one group; stride 1, or taps at multiples of the stride), else (other dtypes
    too) as usual: float32
    from split bf16 parts, with a relative error of a few 1e-6 instead of strict float32's
    ~1e-7 (TF32's is ~1e-3), for finite inputs (escoin.h, escoin_conv2d_forward_cuda_mma). The
    CPU computes in strict float32 either way.
    """
    _require_filter(filt)  # (before x is read as the filter's input)
    relu = _core.as_flag(relu, "relu")
    if is_cuda_array(x):
        return _conv2d_cuda(x, filt, bias, stride, padding, dilation, relu, out, workspace,
                            stream_handle(stream), residual,
                            _core.as_flag(tensor_cores, "tensor_cores"))
    if isinstance(x, np.ndarray):
        if stream is not None and stream_handle(stream) != 0:
            raise EscoinError(f"stream must be None or 0 for a NumPy x (the CPU call runs now), "
                              f"got {stream!r}")
        return _conv2d_cpu(x, filt, bias, stride, padding, dilation, relu, out, workspace,
                           residual)
    raise EscoinError(f"x must be a NumPy array or a CUDA array (__cuda_array_interface__ or "
                      f"__dlpack__), got {type(x).__name__}")


def _batched_shape(shape: Tuple[int, ...]) -> Tuple[Tuple[int, ...], bool]:
    if len(shape) == 3:
        return (1,) + tuple(shape), True
    if len(shape) != 4:
        raise EscoinError(f"x must have 3 (C, H, W) or 4 (N, C, H, W) dimensions, got shape "
                          f"{tuple(shape)}")
    return tuple(shape), False


def _conv2d_cpu(x: np.ndarray, filt: SparseFilter, bias: Optional[object], stride: IntPair,
                padding: Padding, dilation: IntPair, relu: bool, out: Optional[object],
                workspace: Optional[object], residual: Optional[object]) -> np.ndarray:
    if not x.dtype.isnative:  # the kernels read native byte order
        x = x.astype(x.dtype.newbyteorder("="))
    name = dtype_name(x.dtype, "x")
    shape, unbatched = _batched_shape(x.shape)
    desc = descriptor(shape, filt.shape, filt.groups, stride, padding, dilation)
    layout = _core.conv_layout(desc)
    y_shape = (desc[0], desc[4], layout["out_height"], layout["out_width"])
    result_shape = y_shape[1:] if unbatched else y_shape
    if out is None:
        y = np.empty(result_shape, x.dtype)
    else:
        y = out
        if not isinstance(y, np.ndarray) or y.shape != result_shape or y.dtype != x.dtype:
            raise EscoinError(f"out must be a NumPy array of shape {result_shape} and dtype "
                              f"{x.dtype} in native byte order, got {_describe(y)}"
                              + (f" (byte order {y.dtype.byteorder!r})"
                                 if isinstance(y, np.ndarray) and not y.dtype.isnative else ""))
        if not y.flags.c_contiguous or not y.flags.writeable:
            raise EscoinError("out must be C-contiguous and writeable")
    # A strided NumPy input is copied once: the kernels read it as dense NCHW.
    x_dense = np.ascontiguousarray(x)
    values = filt._store.values_as(compute_dtype(name))
    offsets = filt._store.offsets(desc)
    bias_array = _host_array(bias, "bias", (desc[4],), x.dtype)
    residual_array = _host_array(residual, "residual", result_shape, x.dtype, "the output's shape")
    nbytes = _core.workspace_size(desc, name)
    workspace = _host_workspace(workspace, nbytes)
    # The filter's cached offsets are escoin's own, in immutable memory: checking them again on
    # every call would cost as much as a small-plane convolution (row_ptr is still checked).
    _core.forward_cpu(desc, name, x_dense.ctypes.data, filt.row_ptr.ctypes.data,
                      offsets.ctypes.data, values.ctypes.data,
                      0 if bias_array is None else bias_array.ctypes.data,
                      0 if residual_array is None else residual_array.ctypes.data, relu,
                      y.ctypes.data, workspace.ctypes.data, nbytes, offsets_trusted=True)
    return y


class _ThreadWorkspace(threading.local):
    """Each thread's reusable host workspace. Allocating one per call cost the kernel's pages
    afresh every time (a fresh 100 MB array is page-faulted and zeroed by the OS on first
    touch); it only grows, like a framework's scratchpad."""

    buffer: np.ndarray = np.empty(0, np.uint8)


_thread_workspace = _ThreadWorkspace()


def host_workspace(nbytes: int) -> np.ndarray:
    """This thread's reusable host workspace, at least `nbytes` bytes: what conv2d uses on the
    CPU when no workspace is given, for callers of ``sconv(..., device="cpu")`` too. It grows and
    never shrinks; the next CPU call of the same thread may overwrite it."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral) or nbytes < 0:
        raise EscoinError(f"nbytes must be a non-negative int, got {nbytes!r}")
    if _thread_workspace.buffer.nbytes < nbytes:
        _thread_workspace.buffer = np.empty(nbytes, np.uint8)
    return _thread_workspace.buffer


def _host_workspace(workspace: Optional[object], nbytes: int) -> np.ndarray:
    if workspace is None:
        return host_workspace(nbytes)
    if (not isinstance(workspace, np.ndarray) or not workspace.flags.c_contiguous
            or not workspace.flags.writeable or workspace.nbytes < nbytes):
        raise EscoinError(f"workspace must be a writeable C-contiguous NumPy array of at least "
                          f"{nbytes} bytes for a NumPy x, got {_describe(workspace)}")
    return workspace


def _host_array(value: Optional[object], name: str, shape: Tuple[int, ...], dtype: np.dtype,
                shape_words: str = "shape") -> Optional[np.ndarray]:
    """A host operand (bias, residual) as a C-contiguous array of `dtype`, checked to have
    `shape` and a floating-point type."""
    if value is None:
        return None
    if is_cuda_array(value):
        raise EscoinError(f"{name} is a CUDA array but x is a NumPy array; put both on one "
                          "device")
    array = np.asarray(value)
    if array.shape != shape:
        raise EscoinError(f"{name} must have {shape_words} {shape}, got {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name in CPU_DTYPES):
        raise EscoinError(f"{name} must be floating point, got {array.dtype}")
    return np.ascontiguousarray(array, dtype)


def _conv2d_cuda(x: object, filt: SparseFilter, bias: Optional[object], stride: IntPair,
                 padding: Padding, dilation: IntPair, relu: bool, out: Optional[object],
                 workspace: Optional[object], stream: int, residual: Optional[object],
                 tensor_cores: bool) -> object:
    xv = cuda_view(x, "x", stream)
    name = xv.dtype.name
    if name not in CUDA_DTYPES:
        raise EscoinError(f"x must be float32, float16 or bfloat16 on CUDA, got {name}")
    if not xv.contiguous:
        raise EscoinError("x must be C-contiguous (NCHW); make it contiguous first")
    device = xv.device
    if filt._device is not None and filt._device != device:
        raise EscoinError(f"the filter lives on {filt.device} but x is on cuda:{device}; use "
                          f"filt.cuda({device}) or move x")
    shape, unbatched = _batched_shape(xv.shape)
    desc = descriptor(shape, filt.shape, filt.groups, stride, padding, dilation)
    layout = _core.conv_layout(desc)
    y_shape = (desc[0], desc[4], layout["out_height"], layout["out_width"])
    result_shape = y_shape[1:] if unbatched else y_shape
    if out is None:
        y = DeviceArray(result_shape, xv.dtype, device, stream)
        y_ptr = y.ptr
    else:
        y = out
        y_ptr = _cuda_output_like(out, "out", result_shape, xv.dtype, device, stream)
    mma_program = (filt._store.device_program("mma", device, desc)
                   if tensor_cores and name == "float32" else 0)
    nbytes = (_core.mma_workspace_size(desc) if mma_program else
              _core.workspace_size(desc, name))
    ws_ptr, ws_owner = _cuda_workspace(workspace, nbytes, device, stream)
    bias_ptr, bias_owner = _cuda_bias(bias, desc[4], xv.dtype, device, stream)
    residual_ptr = (0 if residual is None else
                    _cuda_output_like(residual, "residual", result_shape, xv.dtype, device,
                                      stream))
    if mma_program:
        _core.forward_cuda_mma(desc, xv.ptr, mma_program, bias_ptr, residual_ptr, relu, y_ptr,
                               ws_ptr, nbytes, device, stream)
    else:
        arrays = filt._store.device_arrays(device, desc)
        _core.forward_cuda(desc, name, xv.ptr, arrays.row_ptr, arrays.offsets,
                           arrays.values, arrays.tile_program, bias_ptr, residual_ptr, relu,
                           y_ptr, ws_ptr, nbytes, device, stream)
    del ws_owner, bias_owner  # stream-ordered frees: safe right after the launch
    return y


def _cuda_output_like(array: object, name: str, shape: Tuple[int, ...], dtype: np.dtype,
                      device: int, stream: int) -> int:
    """The device address of `array` (out, or a residual), checked to be laid out as the output:
    a C-contiguous CUDA array of its shape and x's dtype on x's device."""
    view = cuda_view(array, name, stream)
    if view.shape != shape or view.dtype != dtype or not view.contiguous:
        raise EscoinError(f"{name} must be a C-contiguous {dtype} CUDA array of shape {shape}, got "
                          f"shape {view.shape} {view.dtype}"
                          f"{'' if view.contiguous else ' (not contiguous)'}")
    if view.device != device:
        raise EscoinError(f"{name} is on cuda:{view.device} but x is on cuda:{device}")
    return view.ptr


def _cuda_workspace(workspace: Optional[object], nbytes: int, device: int,
                    stream: int) -> Tuple[int, object]:
    if workspace is None:
        buffer = DeviceBuffer(nbytes, device, stream)
        return buffer.ptr, buffer
    view = cuda_view(workspace, "workspace", stream)
    size = int(np.prod(view.shape)) * view.dtype.itemsize if view.shape else view.dtype.itemsize
    if size < nbytes or not view.contiguous or view.device != device:
        raise EscoinError(f"workspace must be a contiguous CUDA array on cuda:{device} of at least "
                          f"{nbytes} bytes, got {size} bytes on cuda:{view.device}")
    return view.ptr, view


def _cuda_bias(bias: Optional[object], channels: int, dtype: np.dtype, device: int,
               stream: int) -> Tuple[int, object]:
    """The bias in x's dtype on x's device: a CUDA array as it is, a host one copied there."""
    if bias is None:
        return 0, None
    if is_cuda_array(bias):
        view = cuda_view(bias, "bias", stream)
        if view.shape != (channels,) or view.dtype != dtype or not view.contiguous:
            raise EscoinError(f"bias must be a contiguous {dtype} array of shape ({channels},), "
                              f"got {view.shape} {view.dtype}")
        if view.device != device:
            raise EscoinError(f"bias is on cuda:{view.device} but x is on cuda:{device}")
        return view.ptr, view
    host = _host_array(bias, "bias", (channels,), dtype)
    buffer = DeviceBuffer(host.nbytes, device, stream)
    # The buffer is stream-ordered on `stream` (its memory may still be read by work queued
    # there before), while cuda_memcpy is a synchronous copy outside that stream: let `stream`
    # drain first. A host bias is a convenience; pass a CUDA array to avoid this wait.
    _core.cuda_stream_synchronize(device, stream)
    _core.cuda_memcpy(device, buffer.ptr, host.ctypes.data, host.nbytes, _HOST_TO_DEVICE)
    return buffer.ptr, buffer


def sconv(x_ptr: int, y_ptr: int, row_ptr_ptr: int, offsets_ptr: int, values_ptr: int,
          bias_ptr: int, workspace_ptr: int, workspace_bytes: int, input_shape: Sequence[int],
          weight_shape: Sequence[int], stride: IntPair = 1, padding: Padding = 0,
          dilation: IntPair = 1, groups: int = 1, relu: bool = False, stream: object = 0,
          device: Union[int, str, None] = None, tile_program_ptr: int = 0,
          residual_ptr: int = 0, dtype: str = "float32", offsets_trusted: bool = False,
          mma_program_ptr: int = 0) -> None:
    """The low-level call on raw pointers, for callers (frameworks) that own their memory.

    On a GPU (`device` a CUDA device index, default: the device of x_ptr) every pointer is
    device memory there, and x, y, bias and residual are in `dtype`
    (:data:`escoin.dtypes.CUDA_DTYPES`: float32, float16 or bfloat16, the 16-bit types computed
    in float32) and aligned to their elements: row_ptr (int64, M+1), offsets (int32, from
    :func:`stretch_offsets` for this geometry) and values (float32) are device arrays; bias_ptr
    may be 0, and so may residual_ptr (else an array of y's shape, not overlapping it, added
    before the ReLU). tile_program_ptr (0 for none) is the staged kernel's program for this
    geometry, 16-byte aligned, which every batch uses (from ``_core.tile_min_batch()`` images):
    take all four from :meth:`SparseFilter.device_pointers`. Work is queued on `stream`. A nonzero
    mma_program_ptr (the tensor-core kernel's program for this geometry, uploaded from
    :meth:`SparseFilter.mma_program`) runs that kernel instead (:func:`conv2d`'s
    tensor_cores; float32 only); the CSR pointers are then not read and may be 0.

    With ``device="cpu"`` every pointer is host memory and the call runs now, in `dtype`
    (:data:`escoin.dtypes.CPU_DTYPES`) for x, y, bias and residual; values are in the compute
    type (float64 for float64, else float32): take the three arrays from
    :meth:`SparseFilter.host_pointers`. `stream` and tile_program_ptr must then be 0. The CPU
    call checks every offset against the geometry unless ``offsets_trusted=True``, which only
    offsets from ``host_pointers`` of an unchanged filter may claim (their check costs as much as
    the convolution on small planes); wrong offsets are then undefined behaviour.

    Pointers carry no lengths, so no check can see an array shorter than the call reads: row_ptr
    must hold M + 1 entries (M from weight_shape) and offsets and values row_ptr[M] each (as a
    filter's own arrays do); a row_ptr[M] past them is read past them, the check included.

    The workspace needs :func:`workspace_size` bytes for this geometry and dtype (with
    ``tensor_cores=True`` where mma_program_ptr is given).
    """
    desc = descriptor(input_shape, weight_shape, groups, stride, padding, dilation)
    for name, value in (("x_ptr", x_ptr), ("y_ptr", y_ptr), ("row_ptr_ptr", row_ptr_ptr),
                        ("offsets_ptr", offsets_ptr), ("values_ptr", values_ptr),
                        ("bias_ptr", bias_ptr), ("workspace_ptr", workspace_ptr),
                        ("tile_program_ptr", tile_program_ptr), ("residual_ptr", residual_ptr),
                        ("mma_program_ptr", mma_program_ptr)):
        if not _is_below(value, 2 ** 64):
            raise EscoinError(f"{name} must be a non-negative int pointer, got {value!r}")
    if not _is_below(workspace_bytes, 2 ** 63):
        raise EscoinError(f"workspace_bytes must be a non-negative int, got {workspace_bytes!r}")
    relu = _core.as_flag(relu, "relu")
    offsets_trusted = _core.as_flag(offsets_trusted, "offsets_trusted")
    name = dtype_name(dtype)
    if device == "cpu":
        if stream or tile_program_ptr or mma_program_ptr:
            raise EscoinError("stream, tile_program_ptr and mma_program_ptr must be 0 with "
                              "device='cpu' (the CPU call runs now, without a program), got "
                              f"{stream!r}, {tile_program_ptr!r} and {mma_program_ptr!r}")
        _core.forward_cpu(desc, name, x_ptr, row_ptr_ptr, offsets_ptr, values_ptr, bias_ptr,
                          residual_ptr, relu, y_ptr, workspace_ptr, workspace_bytes,
                          offsets_trusted=offsets_trusted)
        return
    if device is None:
        try:
            device = _core.cuda_pointer_device(x_ptr) if x_ptr else 0
        except EscoinError as error:
            raise EscoinError(f"x_ptr must be CUDA device memory where device is not given "
                              f"(device='cpu' for host memory): {error}") from None
    elif isinstance(device, str):
        raise EscoinError(f"device must be a CUDA device index or 'cpu', got {device!r}")
    if mma_program_ptr:
        if name != "float32":
            raise EscoinError(f"dtype must be float32 for the tensor-core kernel "
                              f"(mma_program_ptr), got {name}")
        _core.forward_cuda_mma(desc, x_ptr, mma_program_ptr, bias_ptr, residual_ptr, relu, y_ptr,
                               workspace_ptr, workspace_bytes, device, stream_handle(stream))
        return
    _core.forward_cuda(desc, name, x_ptr, row_ptr_ptr, offsets_ptr, values_ptr,
                       tile_program_ptr, bias_ptr, residual_ptr, relu, y_ptr, workspace_ptr,
                       workspace_bytes, device, stream_handle(stream))


def _is_below(value: object, limit: int) -> bool:
    """Whether value is an int (not a bool) in [0, limit)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and \
        0 <= value < limit


def _describe(obj: object) -> str:
    if isinstance(obj, np.ndarray):
        return f"shape {obj.shape} dtype {obj.dtype}"
    return type(obj).__name__
