// conv_cpu.cpp -- the CPU forward entry: validate, stretch the input, run the best kernel variant.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_kernels.hpp"
#include "error.hpp"
#include "forward_checks.hpp"
#include "stretch.hpp"

namespace escoin {
namespace {

// Each stretched row is zeros, then the columns j in [begin, end) whose input column
// first_column + j * stride_w lies inside x's row, then zeros to the row's extent (the alignment
// gap included): one copy of a run of x where stride_w is 1, a strided gather elsewhere, and no
// test per element (one per element made the stretch half of a 1x1 layer's time on a 28x28
// plane: 130 of 280 us).
template <typename T>
void stretch_input(const Geometry& g, const T* x, T* ws) {
  const StretchRows rows = stretch_rows(g);
  // The first j >= 0 whose column first_column + j * stride_w is at least `column`.
  auto first_at = [&rows](int64_t first_column, int64_t column) -> int64_t {
    const int64_t ahead = column - first_column;
    return ahead <= 0 ? 0 : (ahead + rows.stride_w - 1) / rows.stride_w;
  };
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows.rows; ++r) {
    const StretchRow row = rows.row(r);
    T* dst = ws + rows.destination(r);
    const int64_t extent = rows.extent(r);
    int64_t begin = 0, end = 0;  // an empty run for a padding row
    if (row.source >= 0) {
      begin = std::min(rows.plane_w, first_at(row.first_column, 0));
      end = std::max(begin, std::min(rows.plane_w, first_at(row.first_column, rows.in_width)));
    }
    std::fill(dst, dst + begin, T(0));
    if (end > begin) {
      const T* src = x + row.source + row.first_column + begin * rows.stride_w;
      if (rows.stride_w == 1)
        std::copy(src, src + (end - begin), dst + begin);
      else
        for (int64_t j = begin; j < end; ++j) dst[j] = src[(j - begin) * rows.stride_w];
    }
    std::fill(dst + end, dst + extent, T(0));
  }
  std::memset(ws + rows.elements(), 0, g.tail_slack * sizeof(T));
}

bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(ESCOIN_HAVE_X86_VARIANTS)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(ESCOIN_HAVE_X86_VARIANTS)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

template <typename T>
void run_kernel(const CpuConvArgs<T>& args) {
#if defined(ESCOIN_HAVE_X86_VARIANTS)
  static const bool avx512 = cpu_has_avx512(), avx2 = cpu_has_avx2();
  if (avx512) return avx512::sparse_conv(args);
  if (avx2) return avx2::sparse_conv(args);
#endif
  portable::sparse_conv(args);
}

template <typename T>
void forward(const Geometry& g, const T* x, const int64_t* row_ptr, const int32_t* offsets,
             const T* values, const T* bias, const T* residual, bool relu, T* y, T* ws) {
  stretch_input(g, x, ws);
  run_kernel(CpuConvArgs<T>{&g, ws, row_ptr, offsets, values, bias, residual, relu, y});
}

}  // namespace
}  // namespace escoin

extern "C" escoin_status_t escoin_conv2d_forward_cpu(const escoin_conv_desc_t* desc,
                                                     escoin_dtype_t dtype, const void* x,
                                                     const int64_t* row_ptr,
                                                     const int32_t* offsets, const void* values,
                                                     const void* bias, const void* residual,
                                                     int relu, void* y, void* workspace,
                                                     size_t workspace_bytes) {
  return escoin::guarded([&] {
    const escoin::Geometry g = escoin::make_geometry(desc);
    escoin::check_forward_operands(g, dtype, x, row_ptr, y, residual, workspace,
                                   workspace_bytes);
    if (g.d.batch == 0) return;
    // Host arrays can be checked cheaply, so the CPU path never trusts them.
    escoin::check_csr_for_geometry(g, row_ptr, offsets, values);
    if (dtype == ESCOIN_FLOAT32)
      escoin::forward(g, static_cast<const float*>(x), row_ptr, offsets,
                      static_cast<const float*>(values), static_cast<const float*>(bias),
                      static_cast<const float*>(residual), relu != 0, static_cast<float*>(y),
                      static_cast<float*>(workspace));
    else
      escoin::forward(g, static_cast<const double*>(x), row_ptr, offsets,
                      static_cast<const double*>(values), static_cast<const double*>(bias),
                      static_cast<const double*>(residual), relu != 0, static_cast<double*>(y),
                      static_cast<double*>(workspace));
  });
}
