// stretch.hpp -- the stretched input layout, and its constants for the CPU stretch (the CUDA
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

// The layout's constants for walking the stretched rows: for each image and channel (`planes`
// of them), phases_h * phases_w phases of plane_h rows of plane_w elements.
struct StretchRows {
  int64_t planes;  // images x input channels
  int64_t phases_h, phases_w, plane_h, plane_w, channel_stride, stride_h, stride_w, pad_top,
      pad_left, in_height, in_width;

  // The workspace elements the rows cover (the batch's stretched input, gaps included).
  int64_t elements() const { return planes * channel_stride; }
};

inline StretchRows stretch_rows(const Geometry& g) {
  const escoin_conv_desc_t& d = g.d;
  const escoin_layout_t& L = g.layout;
  return StretchRows{d.batch * d.in_channels, L.phases_h, L.phases_w, L.plane_h, L.plane_w,
                     L.channel_stride, d.stride_h, d.stride_w, d.pad_top, d.pad_left,
                     d.in_height, d.in_width};
}

}  // namespace escoin
