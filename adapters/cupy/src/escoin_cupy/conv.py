"""conv2d on CuPy arrays: escoin's CUDA forward with CuPy's stream and memory pool."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import escoin
from escoin.geometry import IntPair, Padding

if TYPE_CHECKING:  # (for the annotations: escoin-cupy imports CuPy only where it runs)
    import cupy


def conv2d(x: "cupy.ndarray", filt: escoin.SparseFilter, bias: Optional[object] = None,
           stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1, relu: bool = False,
           out: Optional["cupy.ndarray"] = None, residual: Optional["cupy.ndarray"] = None,
           stream: Optional["cupy.cuda.Stream"] = None) -> "cupy.ndarray":
    """``relu(conv2d(x, filt.to_dense(), bias) + residual)`` with torch.nn.functional.conv2d's
    semantics, from the filter's nonzeros, as a CuPy array on x's device.

    x is a float32 or float16 (N, C, H, W) or (C, H, W) cupy.ndarray (made C-contiguous if it
    is not; float16 is computed in float32, each output rounded once), and the output has its
    dtype.
    Work is queued on `stream` (default: CuPy's current stream on x's device); the output (unless
    `out` is given) and the workspace are allocated from CuPy's memory pool on that stream (its
    free lists are per stream, so the workspace's reuse is ordered after this call; a custom CuPy
    allocator must be stream-aware too). bias is a CuPy array of M values of x's dtype, or a
    host array (copied synchronously: pass a CuPy array in hot loops); residual has the
    output's shape and dtype and is added before the ReLU.
    """
    import cupy

    if not isinstance(x, cupy.ndarray):
        raise escoin.EscoinError(f"x must be a cupy.ndarray, got {type(x).__name__}")
    if not isinstance(filt, escoin.SparseFilter):
        raise escoin.EscoinError(f"filt must be an escoin.SparseFilter, got {type(filt).__name__}")
    if x.dtype not in (cupy.float32, cupy.float16):
        raise escoin.EscoinError(f"x must be float32 or float16, got {x.dtype}")
    if x.ndim not in (3, 4):
        raise escoin.EscoinError(f"x must have 3 or 4 dimensions (N, C, H, W), got {x.shape}")
    with x.device:
        stream = cupy.cuda.get_current_stream() if stream is None else stream
        with stream:
            x = cupy.ascontiguousarray(x)
            batched = x if x.ndim != 3 else x[None]
            shape = escoin.output_shape(batched.shape, filt, stride, padding, dilation)
            if x.ndim == 3:
                shape = shape[1:]
            if out is None:
                out = cupy.empty(shape, x.dtype)
            workspace = cupy.empty(
                escoin.workspace_size(batched.shape, filt, stride, padding, dilation, x.dtype),
                cupy.uint8)
            escoin.conv2d(x, filt, bias, stride=stride, padding=padding, dilation=dilation,
                          relu=relu, out=out, workspace=workspace, stream=stream,
                          residual=residual)
    return out
