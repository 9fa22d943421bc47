// stretch.hpp -- the stretched input layout, and its row arithmetic for the CPU stretch (the CUDA
// stretch, stretch_cuda.cu, maps single elements with fast divisions instead; the tests compare
// both with the same float64 reference).
//
// The workspace holds, for each image n and channel c, channel_stride elements: for each phase
// (a, b) (a < phases_h, b < phases_w: escoin_layout_t) and plane row i one row of plane_w
// elements, then a zeroed gap of up to 3 elements
// that keeps the next channel 16-byte aligned. Row i of phase (a, b) copies input row
// ih = i*stride_h + a - pad_top at columns iw = j*stride_w + b - pad_left (zero where ih or iw
// falls outside the input).
#pragma once

#include <cstdint>

#include "geometry.hpp"

namespace escoin {

struct StretchRow {
  int64_t source;  // index in x of the input row's first element, or -1 for a padding row
  int64_t first_column;  // iw of the row's element j = 0 (then iw advances by stride_w)
};

struct StretchRows {
  int64_t rows;  // stretched rows of the whole batch
  int64_t rows_per_channel, plane_h, plane_w, channel_stride, phases_w, stride_h, stride_w,
      pad_top, pad_left, in_height, in_width;

  // Where row r starts in the workspace.
  int64_t destination(int64_t r) const {
    return (r / rows_per_channel) * channel_stride + (r % rows_per_channel) * plane_w;
  }
  // Elements to write for row r: plane_w, and for a channel's last row also the alignment gap.
  int64_t extent(int64_t r) const {
    return r % rows_per_channel == rows_per_channel - 1
               ? channel_stride - (rows_per_channel - 1) * plane_w
               : plane_w;
  }
  // The workspace elements the rows cover (the batch's stretched input, gaps included).
  int64_t elements() const { return rows / rows_per_channel * channel_stride; }

  StretchRow row(int64_t r) const {
    const int64_t image_channel = r / rows_per_channel;  // n * C + c
    const int64_t rest = r % rows_per_channel;
    const int64_t phase = rest / plane_h, i = rest % plane_h;
    const int64_t ih = i * stride_h + phase / phases_w - pad_top;
    const int64_t first_column = phase % phases_w - pad_left;
    if (ih < 0 || ih >= in_height) return StretchRow{-1, first_column};
    return StretchRow{(image_channel * in_height + ih) * in_width, first_column};
  }
};

inline StretchRows stretch_rows(const Geometry& g) {
  const escoin_conv_desc_t& d = g.d;
  const escoin_layout_t& L = g.layout;
  const int64_t per_channel = L.phases_h * L.phases_w * L.plane_h;
  return StretchRows{d.batch * d.in_channels * per_channel, per_channel, L.plane_h, L.plane_w,
                     L.channel_stride, L.phases_w, d.stride_h, d.stride_w, d.pad_top,
                     d.pad_left, d.in_height, d.in_width};
}

}  // namespace escoin
