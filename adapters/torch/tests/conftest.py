"""Skips this suite's GPU tests (marked ``cuda``) when torch has no CUDA device."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="torch.cuda is not available")
    for item in items:
        if "cuda" in item.keywords and _HERE in Path(str(item.path)).parents:
            item.add_marker(skip)
