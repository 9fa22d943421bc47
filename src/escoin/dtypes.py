"""The element types escoin stores and computes in.

On the CPU a convolution's x, output, bias and residual may be float32, float64, float16 or
bfloat16; the 16-bit types are computed in float32 (the weights widened, each output rounded
once), float64 in float64. NumPy has no bfloat16 of its own: the ``bfloat16`` dtype of the
ml_dtypes package (which JAX uses) is recognised by its name, and frameworks pass it to
:func:`escoin.sconv` as the string ``"bfloat16"``. CUDA takes float32, float16 and bfloat16
(the 16-bit types computed in float32 as on the CPU), not float64.
"""
from __future__ import annotations

import numpy as np

from escoin._errors import EscoinError

#: Names of the dtypes the CPU path takes, widest first.
CPU_DTYPES = ("float64", "float32", "float16", "bfloat16")
#: Names of the dtypes the CUDA path takes.
CUDA_DTYPES = ("float32", "float16", "bfloat16")


def dtype_name(dtype: object, name: str = "dtype") -> str:
    """The escoin name of `dtype` (a NumPy dtype, a type, or one of CPU_DTYPES as a string),
    checked to be one escoin computes with; `name` is used in the error message."""
    if isinstance(dtype, str) and dtype in CPU_DTYPES:
        return dtype
    if dtype is None:  # (NumPy reads None as float64: no default is meant here)
        raise EscoinError(f"{name} must be float32, float64, float16 or bfloat16, got None")
    try:
        found = np.dtype(dtype).name
    except TypeError:
        found = repr(dtype)
    if found not in CPU_DTYPES:
        raise EscoinError(f"{name} must be float32, float64, float16 or bfloat16, got {found}")
    return found


def compute_dtype(name: str) -> np.dtype:
    """What a dtype is computed in, the dtype of the weights a forward call takes: float64 for
    float64, float32 otherwise."""
    return np.dtype(np.float64 if name == "float64" else np.float32)


def numpy_dtype(dtype: object) -> np.dtype:
    """The NumPy dtype of an escoin dtype (bfloat16: ml_dtypes' type, which must be installed)."""
    name = dtype_name(dtype)
    if name != "bfloat16":
        return np.dtype(name)
    try:
        import ml_dtypes
    except ImportError:
        raise EscoinError("bfloat16 NumPy arrays need the ml_dtypes package (pip install "
                          "ml_dtypes)") from None
    return np.dtype(ml_dtypes.bfloat16)
