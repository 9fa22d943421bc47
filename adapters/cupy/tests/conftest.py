"""escoin-cupy's tests need CuPy and a CUDA device (the float64 reference and the geometry
strategies are escoin's: escoin.testing)."""
from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def _cupy_device() -> str:
    """'' when CuPy can run here, else why not."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed"
    try:
        return "" if cupy.cuda.runtime.getDeviceCount() > 0 else "no CUDA device"
    except Exception as error:  # no driver: CuPy raises its runtime's error type
        return f"no usable CUDA device ({type(error).__name__})"


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    reason = _cupy_device()
    if not reason:
        return
    for item in items:
        if "cuda" in item.keywords and _HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.skip(reason=reason))
