"""The verdict the behaviour checks print: the error against float64, then SUCCESS or FAILURE."""
from __future__ import annotations


def verdict(what: str, error: float, tolerance: float) -> bool:
    """Prints `what`'s relative error against the dense float64 result and whether it passes."""
    print(f"{what}: ||escoin - dense fp64|| / ||dense fp64|| = {error:.2e} "
          f"(tolerance {tolerance:.0e})")
    passed = error <= tolerance  # False for NaN as well
    print("SUCCESS" if passed else "FAILURE")
    return passed
