"""escoin-torch's one compiled part: escoin_torch._native, the op's CUDA kernel in C++ for calls
it has seen (csrc/native_kernel.cpp) and a training step's calls recorded for autograd in C++
(csrc/native_training.cpp). Built against the installed torch and escoin (pip install
--no-build-isolation), as every torch C++ extension must be: its binary interface is that torch
version's. Metadata and the Python package are in pyproject.toml."""
from setuptools import setup

try:
    import escoin
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as missing:
    raise SystemExit(
        f"escoin-torch builds against the installed torch and escoin ({missing.name} is not "
        "importable here): install them first, then this package with pip's "
        "--no-build-isolation, e.g. pip install --no-build-isolation ./adapters/torch") from None

setup(
    ext_modules=[CppExtension("escoin_torch._native",
                              ["csrc/native_kernel.cpp", "csrc/native_training.cpp"],
                              depends=["csrc/native_calls.h"],
                              include_dirs=[escoin.get_include()],
                              extra_compile_args=["-O2", "-g0"])],
    cmdclass={"build_ext": BuildExtension},
)
