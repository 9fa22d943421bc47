// forward_checks.hpp -- operand checks shared by the CPU and CUDA forward entries.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "escoin/escoin.h"
#include "geometry.hpp"

namespace escoin {

// Whether the byte ranges [a, a + a_bytes) and [b, b + b_bytes) share memory.
inline bool memory_overlaps(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  const auto a0 = reinterpret_cast<uintptr_t>(a), b0 = reinterpret_cast<uintptr_t>(b);
  return a0 < b0 + b_bytes && b0 < a0 + a_bytes;
}

// Whether y shares memory with x: allowed (out=x), but then no kernel may read x in place, as
// parts of y are written while other blocks still read x; x is stretched (copied) first.
// element_bytes: x's and y's element size.
bool output_overlaps_input(const Geometry& g, size_t element_bytes, const void* x,
                           const void* y);

// Pointers present where the batch is non-empty (the filter's: row_ptr, or the tensor-core
// kernel's program, named filter_name in the error), dtype known, workspace at least `needed`
// bytes (workspace_bytes, or mma_workspace_bytes for the tensor-core kernel); bias and residual
// (optional) not overlapping y, which the kernels write while they read them, and the
// workspace's `needed` bytes overlapping none of x, y, bias and residual.
void check_forward_operands(const Geometry& g, escoin_dtype_t dtype, const void* x,
                            const void* filter, const char* filter_name, const void* y,
                            const void* bias, const void* residual, const void* workspace,
                            size_t workspace_size, size_t needed);

// The filter's arrays not overlapping y or the workspace's `needed` bytes, which the call writes
// while it reads the filter (an offset overwritten mid-call would send reads anywhere): row_ptr's
// out_channels + 1 entries, and offsets and values where nnz (row_ptr[out_channels]) is known,
// as in host memory; 0 where it is not (the CUDA entry's row_ptr is in device memory).
void check_filter_not_overwritten(const Geometry& g, escoin_dtype_t dtype,
                                  const int64_t* row_ptr, const int32_t* offsets,
                                  const void* values, int64_t nnz, const void* y,
                                  const void* workspace, size_t needed);

// Each non-null pointer a multiple of `bytes` (an element's size), as the GPU's loads and
// stores of the elements need (a misaligned one would fault the device, and the fault would
// stick to the caller's CUDA context); each is named in the error.
void check_alignment(size_t bytes,
                     std::initializer_list<std::pair<const void*, const char*>> pointers);

// Host-side CSR check against the geometry: row_ptr well formed, offsets and values present when
// there are nonzeros, and every stretched offset a tap of the geometry (as escoin_stretch_offsets
// gives them), so no read can leave the workspace or a staged tile's segment.
void check_csr_for_geometry(const Geometry& g, const int64_t* row_ptr, const int32_t* offsets,
                            const void* values);
// Only row_ptr and the pointers' presence, for offsets the caller vouches for
// (escoin_conv2d_forward_cpu_trusted).
void check_row_ptr(const Geometry& g, const int64_t* row_ptr, const int32_t* offsets,
                   const void* values);

}  // namespace escoin
