"""What escoin's own tests check it with, for the tests of code built on it (the adapters', a
user's): a float64 NumPy reference for ``torch.nn.functional.conv2d`` that shares no code with
escoin's kernels, the relative-norm error used against it, and (``escoin.testing.strategies``,
which needs hypothesis) random convolution problems of every geometry."""
from escoin.testing.reference import conv2d_reference, relative_error

__all__ = ["conv2d_reference", "relative_error"]
