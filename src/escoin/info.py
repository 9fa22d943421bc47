"""What this build of escoin contains, and whether a GPU is usable now."""
from __future__ import annotations

from escoin import _core


def build_info() -> dict:
    """Version, whether CUDA kernels were compiled in (and for which architectures), OpenMP, and
    the CPU kernel variant forward calls run (``ESCOIN_CPU_KERNELS`` may pick another)."""
    architectures = _core.cuda_architectures()
    return {
        "version": _core.version(),
        "cuda": _core.cuda_compiled(),
        "cuda_architectures": [a for a in architectures.split(",") if a],
        "openmp": _core.openmp_enabled(),
        "openmp_threads": _core.openmp_max_threads(),
        "cpu_kernels": _core.cpu_kernels(),
    }


def cuda_device_count() -> int:
    """CUDA devices usable by escoin right now (0 without CUDA, driver or device)."""
    return _core.cuda_device_count() if _core.cuda_compiled() else 0


def cuda_available() -> bool:
    """True when the CUDA kernels are compiled in and a device is usable at run time."""
    return cuda_device_count() > 0
