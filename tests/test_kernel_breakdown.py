"""The kernel-breakdown tool's naming of the kernels it lists (no GPU needed)."""
from __future__ import annotations

import pytest

from benchmark_modules import benchmark_module


@pytest.mark.parametrize("kernel, name", [
    ("void escoin::(anonymous namespace)::staged_conv_kernel<1, 7, true, false>"
     "(float const*, int const*, float const*, float*, escoin::(anonymous namespace)::"
     "StagedParams, CUtensorMap_st)", "staged_conv_kernel"),
    ("void escoin::(anonymous namespace)::reduce_splits_kernel<3>(float const*, "
     "escoin::Epilogue, float*, long, long, long)", "reduce_splits_kernel"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(int)",
     "vectorized_elementwise_kernel"),
    ("memset", "memset"),
])
def test_short_name_keeps_the_kernels_own_name(kernel: str, name: str) -> None:
    assert benchmark_module("kernel_breakdown").short_name(kernel) == name
