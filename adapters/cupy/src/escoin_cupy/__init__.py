"""escoin-cupy: escoin's sparse (CSR) convolution on CuPy arrays.

    import cupy, escoin, escoin_cupy
    filt = escoin.SparseFilter.from_dense(pruned_weight)     # (M, C/groups, kh, kw), NumPy
    y = escoin_cupy.conv2d(x, filt, bias, padding=1, relu=True)  # x: a float32 cupy.ndarray

Work runs on x's device, on CuPy's current stream; the output and the workspace come from CuPy's
memory pool.
"""
from escoin_cupy.conv import conv2d

__all__ = ["conv2d"]
