// cpu_stretch.hpp -- the CPU stretch: x copied into the workspace's stretched layout
// (stretch.hpp), widened to the compute type on the way.
//
// Included only by the per-instruction-set translation unit (cpu_kernels.cpp), so that the
// 16-bit types widen a vector register at a time on every instruction set.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_threads.hpp"
#include "cpu_vectors.hpp"
#include "stretch.hpp"

namespace escoin {
namespace ESCOIN_CPU_ISA {

// Each stretched row is zeros, then the columns j in [begin, end) whose input column
// first_column + j * stride_w lies inside x's row, then zeros to the row's extent (the alignment
// gap included): one converted copy of a run of x where stride_w is 1, a strided gather
// elsewhere, and no test per element (one per element made the stretch half of a 1x1 layer's
// time on a 28x28 plane: 130 of 280 us).
template <typename S>
void stretch_input(const Geometry& g, const S* x, Compute<S>* ws) {
  using C = Compute<S>;
  const StretchRows rows = stretch_rows(g);
  // The first j >= 0 whose column first_column + j * stride_w is at least `column`.
  auto first_at = [&rows](int64_t first_column, int64_t column) -> int64_t {
    const int64_t ahead = column - first_column;
    return ahead <= 0 ? 0 : (ahead + rows.stride_w - 1) / rows.stride_w;
  };
#pragma omp parallel for schedule(static) if (cpu_threads_usable())
  for (int64_t r = 0; r < rows.rows; ++r) {
    const StretchRow row = rows.row(r);
    C* dst = ws + rows.destination(r);
    const int64_t extent = rows.extent(r);
    int64_t begin = 0, end = 0;  // an empty run for a padding row
    if (row.source >= 0) {
      begin = std::min(rows.plane_w, first_at(row.first_column, 0));
      end = std::max(begin, std::min(rows.plane_w, first_at(row.first_column, rows.in_width)));
    }
    std::fill(dst, dst + begin, C(0));
    if (end > begin) {
      const S* src = x + row.source + row.first_column + begin * rows.stride_w;
      if (rows.stride_w == 1)
        widen_run(src, dst + begin, end - begin);
      else
        for (int64_t j = begin; j < end; ++j) dst[j] = widen(src[(j - begin) * rows.stride_w]);
    }
    std::fill(dst + end, dst + extent, C(0));
  }
  std::memset(ws + rows.elements(), 0, g.tail_slack * sizeof(C));
}

}  // namespace ESCOIN_CPU_ISA
}  // namespace escoin
