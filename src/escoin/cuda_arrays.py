"""CUDA memory without a framework: reading other libraries' device arrays (the CUDA array
interface, DLPack), owning device memory, and the stream handles callers pass in."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

from escoin import _core
from escoin._errors import EscoinError
from escoin.dtypes import numpy_dtype


@dataclass(frozen=True)
class CudaView:
    """A borrowed view of a device array: where it is and what it holds."""
    ptr: int
    shape: Tuple[int, ...]
    dtype: np.dtype
    device: int
    contiguous: bool
    owner: Any  # keeps the producer (and any DLPack capsule) alive while the view is used


def _has_cai(obj: object) -> bool:
    """Whether obj offers the CUDA array interface (some producers raise for a dtype the
    interface cannot describe, such as PyTorch's bfloat16 in some versions: then it does not)."""
    try:
        return getattr(obj, "__cuda_array_interface__", None) is not None
    except Exception:  # noqa: BLE001 -- whatever the producer raises means "not through here"
        return False


def is_cuda_array(obj: object) -> bool:
    """True for objects that expose device memory through the CUDA array interface or DLPack."""
    if _has_cai(obj):
        return True
    if hasattr(obj, "__dlpack_device__"):
        try:
            device_type, _ = obj.__dlpack_device__()
            return int(device_type) in (_DL_CUDA, _DL_CUDA_MANAGED)
        except Exception:  # a producer that cannot say is not a CUDA array to us
            return False
    return False


def cuda_view(obj: object, name: str, stream: int = 0) -> CudaView:
    """Reads obj's device pointer, shape and dtype; `name` is used in error messages. The CUDA
    array interface has no bfloat16: PyTorch has described one as opaque 2-byte items ("<V2"),
    as "<f2" (float16's typestr) and by raising, by version. So 2-byte items are read through
    DLPack, which names the type, wherever the object offers it."""
    if _has_cai(obj):
        view = _from_cai(obj, name)
        if view.dtype.itemsize != 2 or not hasattr(obj, "__dlpack__"):
            return view
    if hasattr(obj, "__dlpack__"):
        return _from_dlpack(obj, name, stream)
    raise EscoinError(f"{name} must be a CUDA array (__cuda_array_interface__ or __dlpack__)")


def stream_handle(stream: object) -> int:
    """A cudaStream_t as an int from None (legacy default stream), an int, or an object with
    .cuda_stream (PyTorch) or .ptr (CuPy)."""
    if stream is None:
        return 0
    for attribute in ("cuda_stream", "ptr"):
        if hasattr(stream, attribute):
            stream = getattr(stream, attribute)
            break
    if isinstance(stream, (int, np.integer)) and not isinstance(stream, bool) and stream >= 0:
        return int(stream)
    raise EscoinError(
        f"stream must be None, a non-negative int handle, or an object with .cuda_stream or .ptr, "
        f"got {stream!r}")


class DeviceBuffer:
    """Device memory owned by escoin.

    Per-call memory (workspaces, outputs) is allocated stream-ordered on `stream` and freed on it.
    Long-lived copies made by :meth:`from_host` (a filter's CSR on a device) are read by work on
    whatever streams their users pick, so they are allocated and freed with the synchronous
    cudaMalloc/cudaFree: cudaFree waits for the device's queued work, so a filter dropped while a
    kernel on a side stream still reads it is not freed under that kernel.
    """

    def __init__(self, nbytes: int, device: int, stream: int = 0, *,
                 stream_ordered: bool = True) -> None:
        self.nbytes = int(nbytes)
        self.device = int(device)
        self.stream = int(stream)
        self.stream_ordered = stream_ordered
        if stream_ordered:
            self.ptr = _core.cuda_malloc_async(self.device, self.nbytes, self.stream)
        else:
            self.ptr = _core.cuda_malloc(self.device, self.nbytes)

    @classmethod
    def from_host(cls, array: np.ndarray, device: int) -> "DeviceBuffer":
        """A device copy of a host array (synchronous, complete on return)."""
        host = np.ascontiguousarray(array)
        buffer = cls(host.nbytes, device, stream_ordered=False)
        _core.cuda_memcpy(device, buffer.ptr, host.ctypes.data, host.nbytes, _HOST_TO_DEVICE)
        _core.cuda_stream_synchronize(device, 0)
        return buffer

    def __del__(self) -> None:
        ptr, self.ptr = getattr(self, "ptr", 0), 0
        if ptr:
            try:
                if getattr(self, "stream_ordered", True):
                    _core.cuda_free_async(self.device, ptr, self.stream)
                else:
                    _core.cuda_free(self.device, ptr)
            except EscoinError:
                pass  # the context is being torn down at exit; nothing left to free into


class DeviceArray:
    """An escoin-allocated device array (returned by conv2d when no `out` is given).

    Any framework can adopt it without a copy through __cuda_array_interface__ (version 3), e.g.
    torch.as_tensor(arr, device="cuda") or cupy.asarray(arr); numpy() copies it to the host.
    """

    def __init__(self, shape: Tuple[int, ...], dtype: np.dtype, device: int, stream: int) -> None:
        self.shape = tuple(int(v) for v in shape)
        self.dtype = np.dtype(dtype)
        self.device = int(device)
        self._stream = int(stream)
        self._buffer = DeviceBuffer(int(np.prod(self.shape)) * self.dtype.itemsize, device, stream)

    @property
    def ptr(self) -> int:
        return self._buffer.ptr

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False),
                "version": 3, "strides": None,
                "stream": self._stream or 1}  # 1 names the legacy default stream

    def numpy(self) -> np.ndarray:
        """A host copy; waits for the work queued on the array's stream."""
        host = np.empty(self.shape, self.dtype)
        _core.cuda_stream_synchronize(self.device, self._stream)
        _core.cuda_memcpy(self.device, host.ctypes.data, self.ptr, host.nbytes, _DEVICE_TO_HOST)
        return host

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, device='cuda:{self.device}')"


_HOST_TO_DEVICE, _DEVICE_TO_HOST = 0, 1
_DL_CUDA, _DL_CUDA_MANAGED = 2, 13


def _from_cai(obj: object, name: str) -> CudaView:
    cai = obj.__cuda_array_interface__
    try:
        shape = tuple(int(v) for v in cai["shape"])
        dtype = np.dtype(cai["typestr"])
        ptr = int(cai["data"][0])
        strides = cai.get("strides")
        contiguous = strides is None or _c_contiguous(shape, tuple(int(v) for v in strides),
                                                      dtype.itemsize)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        raise EscoinError(f"{name} has a malformed __cuda_array_interface__ "
                          f"({type(error).__name__}: {error}); expected a dict with 'shape', "
                          "'typestr' and 'data' (pointer, read-only), as its version 3 "
                          "describes") from None
    device = _core.cuda_pointer_device(ptr) if ptr else 0
    return CudaView(ptr, shape, dtype, device, contiguous, obj)


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


_get_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_capsule_pointer.restype = ctypes.c_void_p
_get_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_DL_FLOAT, _DL_BFLOAT = 2, 4


def _from_dlpack(obj: object, name: str, stream: int) -> CudaView:
    # The legacy (unversioned) capsule: every producer still offers it. We only read the tensor
    # and leave the capsule unconsumed, so its destructor releases the producer's reference.
    try:
        try:
            capsule = obj.__dlpack__(stream=stream if stream else 1)
        except TypeError:  # a producer without the stream argument
            capsule = obj.__dlpack__()
    except Exception as error:  # noqa: BLE001 -- named as the argument's, the producer's chained
        raise EscoinError(f"{name}.__dlpack__() raised {type(error).__name__}: {error}"
                          ) from error
    tensor = _DLTensor.from_address(_get_capsule_pointer(capsule, b"dltensor"))
    if tensor.device.device_type not in (_DL_CUDA, _DL_CUDA_MANAGED):
        raise EscoinError(f"{name} is a DLPack tensor on device type {tensor.device.device_type},"
                          " not a CUDA device")
    code, bits = tensor.dtype.code, tensor.dtype.bits
    if not ((code == _DL_FLOAT and bits in (16, 32, 64)) or (code == _DL_BFLOAT and bits == 16)) \
            or tensor.dtype.lanes != 1:
        raise EscoinError(f"{name} must hold floating-point values (DLPack dtype code "
                          f"{code}, {bits} bits)")
    shape = tuple(tensor.shape[i] for i in range(tensor.ndim))
    # bfloat16 as ml_dtypes' NumPy dtype (escoin.dtypes): an error names the package if missing.
    dtype = numpy_dtype("bfloat16") if code == _DL_BFLOAT else np.dtype(f"float{bits}")
    contiguous = not tensor.strides or _c_contiguous(
        shape, tuple(tensor.strides[i] * dtype.itemsize for i in range(tensor.ndim)),
        dtype.itemsize)
    ptr = (tensor.data or 0) + tensor.byte_offset
    return CudaView(ptr, shape, dtype, tensor.device.device_id, contiguous, (obj, capsule))


def _c_contiguous(shape: Tuple[int, ...], strides: Tuple[int, ...], itemsize: int) -> bool:
    """Row-major without gaps; the stride of an axis of extent 1 does not matter."""
    if any(v == 0 for v in shape):
        return True
    step = itemsize
    for extent, stride in zip(reversed(shape), reversed(strides)):
        if extent != 1 and stride != step:
            return False
        step *= extent
    return True


def optional_view(obj: Optional[object], name: str, stream: int) -> Optional[CudaView]:
    return None if obj is None else cuda_view(obj, name, stream)
