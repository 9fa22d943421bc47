"""benchmarks/sass_loops.py reads cuobjdump's SASS listing: kernels, loops (backward branches),
never-run padding and ptxas's resource lines, on a listing written here (no nvcc needed)."""
from __future__ import annotations

from benchmark_modules import benchmark_module

sass_loops = benchmark_module("sass_loops")
kernels, loops, resource_lines = sass_loops.kernels, sass_loops.loops, sass_loops.resource_lines

LISTING = """
\tcode for sm_90
\t\tFunction : first_kernel
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;               /* 0x00000a00ff017b82 */
        /*0010*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;  /* 0x0 */
        /*0020*/                   LDS R8, [R9+0x20] ;                  /* 0x0 */
        /*0030*/              @!PT LDS RZ, [RZ] ;                       /* 0x0 */
        /*0040*/                   HMMA.SP.16832.F32.BF16 R12, R4, R8, RZ, R16, 0x0 ;  /* 0x0 */
        /*0050*/               @P0 BRA 0x20 ;                           /* 0x0 */
        /*0060*/                   BRA 0x70 ;                           /* 0x0 */
        /*0070*/                   EXIT ;                               /* 0x0 */
\t\tFunction : second_kernel
        /*0000*/                   FFMA R1, R2, R3, R1 ;                /* 0x0 */
        /*0010*/              @!P1 BRA 0x0 ;                            /* 0x0 */
        /*0020*/                   EXIT ;                               /* 0x0 */
"""

REPORT = """ptxas info    : Compiling entry function 'first_kernel' for 'sm_90'
ptxas info    : Function properties for first_kernel
    8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers
ptxas info    : Compiling entry function 'second_kernel' for 'sm_90'
ptxas info    : Function properties for second_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers
"""


def test_kernels_are_split_and_padding_dropped():
    found = kernels(LISTING)
    assert list(found) == ["first_kernel", "second_kernel"]
    first = found["first_kernel"]
    assert [op for _, op, _ in first] == [
        "LDC", "LDG.E.128.CONSTANT", "LDS", "HMMA.SP.16832.F32.BF16", "BRA", "BRA", "EXIT"]
    assert first[3][0] == 0x40


def test_only_backward_branches_are_loops():
    found = kernels(LISTING)
    assert loops(found["first_kernel"]) == [(0x20, 0x50)]
    assert loops(found["second_kernel"]) == [(0x0, 0x10)]


def test_resource_lines_per_kernel():
    lines = resource_lines(REPORT)
    assert "8 bytes spill stores" in lines["first_kernel"]
    assert "Used 128 registers" in lines["first_kernel"]
    assert "Used 32 registers" in lines["second_kernel"]
    assert "128" not in lines["second_kernel"]
