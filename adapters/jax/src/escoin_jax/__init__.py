"""escoin-jax: escoin's sparse (CSR) convolution inside JAX programs.

    import escoin, escoin_jax
    filt = escoin.SparseFilter.from_dense(pruned_weight)      # (M, C/groups, kh, kw), NumPy
    y = jax.jit(lambda x: escoin_jax.conv2d(x, filt, bias, padding=1, relu=True))(x)

The convolution runs as an XLA FFI call on the array's device (the CPU, or a CUDA GPU on the
computation's stream); derivatives with respect to x, bias and residual (forward and reverse
mode) come from a custom JVP whose linear part is XLA's dense convolution.
"""
from escoin_jax.conv import conv2d

__all__ = ["conv2d"]
