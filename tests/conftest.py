"""Shared fixtures: the `cuda` marker skips cleanly where no CUDA device is usable."""
from __future__ import annotations

import os
import sys

import pytest

# (tests import geometry_strategies.py, gpu_helpers.py and benchmark_modules.py)
sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    import escoin

    if escoin.cuda_available():
        return
    reason = ("no usable CUDA device" if escoin.build_info()["cuda"]
              else "escoin was built without CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
