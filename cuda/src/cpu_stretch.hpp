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

// dst[i] = src[i * stride] widened, for i < n: one converted copy at stride 1. Stride 2 (every
// stride-2 layer) is written with a constant stride, which the compiler vectorizes (loads and
// permutes); with the stride a variable it gathers one element at a time.
template <typename S, typename C>
void strided_run(const S* src, int64_t stride, C* dst, int64_t n) {
  if (stride == 1) {
    widen_run(src, dst, n);
    return;
  }
  if (stride == 2) {
    for (int64_t i = 0; i < n; ++i) dst[i] = widen(src[2 * i]);
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = widen(src[i * stride]);
}

// Each stretched row is zeros, then the columns j in [begin, end) whose input column
// first_column + j * stride_w lies inside x's row (a strided run of x), then zeros to the row's
// end; a channel's rows end with the alignment gap. No test per element (one per element made
// the stretch half of a 1x1 layer's time on a 28x28 plane: 130 of 280 us). The rows are walked
// as nested loops, each phase's columns found once: a division per row cost a quarter of a
// stride-2 stretch, whose rows are short.
template <typename S>
void stretch_input(const Geometry& g, const S* x, Compute<S>* ws) {
  using C = Compute<S>;
  const StretchRows rows = stretch_rows(g);
  // The first j >= 0 whose column first_column + j * stride_w is at least `column`.
  auto first_at = [&rows](int64_t first_column, int64_t column) -> int64_t {
    const int64_t ahead = column - first_column;
    return ahead <= 0 ? 0 : (ahead + rows.stride_w - 1) / rows.stride_w;
  };
  const int64_t in_plane = rows.in_height * rows.in_width;
  const int64_t rows_per_channel = rows.phases_h * rows.phases_w * rows.plane_h;
  const int64_t gap = rows.channel_stride - rows_per_channel * rows.plane_w;
#pragma omp parallel for schedule(static) if (cpu_threads_usable())
  for (int64_t plane = 0; plane < rows.planes; ++plane) {
    C* dst = ws + plane * rows.channel_stride;
    for (int64_t a = 0; a < rows.phases_h; ++a) {
      for (int64_t b = 0; b < rows.phases_w; ++b) {
        const int64_t first_column = b - rows.pad_left;
        const int64_t begin = std::min(rows.plane_w, first_at(first_column, 0));
        const int64_t end =
            std::max(begin, std::min(rows.plane_w, first_at(first_column, rows.in_width)));
        const S* src = x + plane * in_plane + first_column + begin * rows.stride_w;
        int64_t ih = a - rows.pad_top;
        for (int64_t i = 0; i < rows.plane_h; ++i, ih += rows.stride_h, dst += rows.plane_w) {
          const bool inside = ih >= 0 && ih < rows.in_height && end > begin;
          const int64_t run_begin = inside ? begin : 0, run_end = inside ? end : 0;
          std::fill(dst, dst + run_begin, C(0));
          if (inside)
            strided_run(src + ih * rows.in_width, rows.stride_w, dst + begin, end - begin);
          std::fill(dst + run_end, dst + rows.plane_w, C(0));
        }
      }
    }
    std::fill(dst, dst + gap, C(0));  // the alignment gap before the next channel
  }
  std::memset(ws + rows.elements(), 0, g.tail_slack * sizeof(C));
}

}  // namespace ESCOIN_CPU_ISA
}  // namespace escoin
