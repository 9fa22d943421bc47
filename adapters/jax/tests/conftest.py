"""escoin-jax's tests (the float64 reference and the geometry strategies are escoin's:
escoin.testing): the GPU tests (marked ``cuda``) skip where jax has no GPU."""
from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


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
