// stretch.hpp -- the index arithmetic of the stretched input layout, shared by the CPU loop and
// the CUDA kernel so both fill the workspace identically.
//
// The workspace is a sequence of rows of plane_w elements: for each image n, channel c, phase
// (a, b) and plane row i, one row. Row i of phase (a, b) copies input row ih = i*stride_h + a -
// pad_top at columns iw = j*stride_w + b - pad_left (zero where ih or iw falls outside the input).
#pragma once

#include <cstdint>

#include "geometry.hpp"

#if defined(__CUDACC__)
#define ESCOIN_HOST_DEVICE __host__ __device__
#else
#define ESCOIN_HOST_DEVICE
#endif

namespace escoin {

struct StretchRow {
  int64_t source;  // index in x of the input row's first element, or -1 for a padding row
  int64_t first_column;  // iw of the row's element j = 0 (then iw advances by stride_w)
};

struct StretchRows {
  int64_t rows;  // stretched rows of the whole batch
  int64_t rows_per_channel, plane_h, stride_h, stride_w, pad_top, pad_left, in_height, in_width;

  ESCOIN_HOST_DEVICE StretchRow row(int64_t r) const {
    const int64_t image_channel = r / rows_per_channel;  // n * C + c
    const int64_t rest = r % rows_per_channel;
    const int64_t phase = rest / plane_h, i = rest % plane_h;
    const int64_t ih = i * stride_h + phase / stride_w - pad_top;
    const int64_t first_column = phase % stride_w - pad_left;
    if (ih < 0 || ih >= in_height) return StretchRow{-1, first_column};
    return StretchRow{(image_channel * in_height + ih) * in_width, first_column};
  }
};

inline StretchRows stretch_rows(const Geometry& g) {
  const escoin_conv_desc_t& d = g.d;
  const int64_t per_channel = d.stride_h * d.stride_w * g.layout.plane_h;
  return StretchRows{d.batch * d.in_channels * per_channel, per_channel, g.layout.plane_h,
                     d.stride_h, d.stride_w, d.pad_top, d.pad_left, d.in_height, d.in_width};
}

}  // namespace escoin
