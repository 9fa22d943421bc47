"""escoin-jax's tests: the core's float64 reference and geometry strategies are shared from the
repository's tests/, and the GPU tests (marked ``cuda``) skip where jax has no GPU."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).parent
# reference.py and geometry_strategies.py: independent of escoin, shared by every suite.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(_HERE)), "..", "tests"))


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    import jax

    try:
        has_gpu = bool(jax.devices("gpu"))
    except RuntimeError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="jax has no GPU")
    for item in items:
        if "cuda" in item.keywords and _HERE in Path(str(item.path)).parents:
            item.add_marker(skip)
