"""The tests' access to the tools in benchmarks/ (a folder of scripts, not a package)."""
from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks")


def benchmark_module(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module, imported with benchmarks/ on the path only meanwhile."""
    sys.path.insert(0, BENCHMARKS)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(BENCHMARKS)
