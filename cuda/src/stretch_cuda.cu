// stretch_cuda.cu -- the CUDA stretch: x (N, C, H, W) -> the workspace's padded, stride-phase-split
// channels (the layout stretch.hpp describes), widened to float32, and the zeroed tail slack
// after them.
#include <algorithm>
#include <cstdint>

#include <cuda_bf16.h>

#include "conv_cuda_kernels.hpp"
#include "cuda_check.cuh"
#include "dependent_launch.cuh"
#include "element_type.cuh"
#include "fast_divide.cuh"
#include "stretch.hpp"

namespace escoin {
namespace {

constexpr int kStretchThreads = 256;
// Channels (planes of one image and channel) a block row covers, chosen so that it spans at
// least this many workspace elements: a 7x7 channel is 84 elements, and a block per channel
// would leave most of its threads idle.
constexpr int64_t kStretchMinSpan = 2048;
// Block rows launched; each thread then walks the remaining plane groups with the same index
// arithmetic, so that arithmetic is paid once per thread instead of once per element.
constexpr int64_t kStretchTargetBlocks = 132 * 16;

struct StretchElements {
  int64_t planes;        // images x channels
  int64_t groups;        // ceil(planes / planes_per_group)
  int64_t in_plane;      // in_height * in_width
  int64_t channel_stride, rows_per_channel, plane_w, stride_h, stride_w, pad_top, pad_left,
      in_height, in_width;
  int64_t planes_per_group, span;  // span = planes_per_group * channel_stride < 2^31
  FastDivisor by_channel_stride, by_plane_w, by_plane_h, by_phases_w;
};

// A stretched element as the kernels read it: the float itself, or (SPLIT, for the tensor-core
// kernel) its two bf16 parts in one word, hi = bf16(v) in the low half and lo = bf16(v - hi) in
// the high half (mma_program.hpp). Zero is zero either way.
template <bool SPLIT>
__device__ __forceinline__ float stretched_value(float v) {
  if constexpr (SPLIT) {
    const __nv_bfloat16 hi = __float2bfloat16_rn(v);
    const __nv_bfloat16 lo = __float2bfloat16_rn(v - __bfloat162float(hi));
    return __uint_as_float(uint32_t(__bfloat16_as_ushort(hi)) |
                           (uint32_t(__bfloat16_as_ushort(lo)) << 16));
  } else {
    return v;
  }
}

// Block (x: kStretchThreads elements of a span of planes_per_group consecutive channels, y: plane
// groups, strided by gridDim.y). A thread maps its element of the span to (channel of the group,
// phase, plane row, column) once, with fast divisions, and copies that element for every group
// it visits. Zeroes for padding, for the alignment gap after each channel's rows, and for the
// tail slack (blocks of row 0). T is x's element type (element_type.cuh).
template <typename T, bool SPLIT>
__global__ void __launch_bounds__(kStretchThreads)
stretch_kernel(const T* __restrict__ x, float* __restrict__ ws, StretchElements s,
               int64_t tail_slack) {
  wait_for_previous_grid();  // x, and the workspace an earlier kernel may still read
  const uint32_t local = blockIdx.x * uint32_t(kStretchThreads) + threadIdx.x;
  if (blockIdx.y == 0) {
    float* tail = ws + s.planes * s.channel_stride;
    for (int64_t i = local; i < tail_slack; i += int64_t(gridDim.x) * kStretchThreads)
      tail[i] = 0.f;
  }
  if (local >= s.span) return;
  const uint32_t plane_in_group = s.by_channel_stride.divide(local);
  const uint32_t e = local - plane_in_group * uint32_t(s.channel_stride);
  const uint32_t phase_row = s.by_plane_w.divide(e);  // phase * plane_h + plane row
  bool inside = false;
  int64_t source = 0;  // element of x within its (image, channel) plane
  if (phase_row < s.rows_per_channel) {  // else: the alignment gap
    const uint32_t j = e - phase_row * uint32_t(s.plane_w);
    const uint32_t phase = s.by_plane_h.divide(phase_row);
    const uint32_t i = phase_row - phase * s.by_plane_h.divisor;
    const uint32_t a = s.by_phases_w.divide(phase);
    const uint32_t b = phase - a * uint32_t(s.by_phases_w.divisor);
    const int64_t ih = int64_t(i) * s.stride_h + a - s.pad_top;
    const int64_t iw = int64_t(j) * s.stride_w + b - s.pad_left;
    inside = ih >= 0 && ih < s.in_height && iw >= 0 && iw < s.in_width;
    source = ih * s.in_width + iw;
  }
  for (int64_t group = blockIdx.y; group < s.groups; group += gridDim.y) {
    const int64_t plane = group * s.planes_per_group + plane_in_group;
    if (plane >= s.planes) break;
    ws[plane * s.channel_stride + e] =
        inside ? stretched_value<SPLIT>(to_float(__ldg(x + plane * s.in_plane + source))) : 0.f;
  }
}

// Stretches x into layout L of g, whose rows start `lead` more zeros to the left.
template <typename T, bool SPLIT>
void stretch(const Geometry& g, const escoin_layout_t& L, int64_t lead, const T* x, float* ws,
             cudaStream_t stream) {
  const escoin_conv_desc_t& d = g.d;
  StretchElements s;
  s.planes = d.batch * d.in_channels;
  s.in_plane = d.in_height * d.in_width;
  s.channel_stride = L.channel_stride;
  s.rows_per_channel = L.phases_h * L.phases_w * L.plane_h;
  s.plane_w = L.plane_w;
  s.stride_h = d.stride_h;
  s.stride_w = d.stride_w;
  s.pad_top = d.pad_top;
  s.pad_left = d.pad_left + lead;
  s.in_height = d.in_height;
  s.in_width = d.in_width;
  // make_geometry keeps a channel's stretched elements below 2^31, so the span does too.
  s.planes_per_group = std::max<int64_t>(1, kStretchMinSpan / L.channel_stride);
  s.span = s.planes_per_group * L.channel_stride;
  s.groups = (s.planes + s.planes_per_group - 1) / s.planes_per_group;
  s.by_channel_stride = FastDivisor::of(L.channel_stride);
  s.by_plane_w = FastDivisor::of(L.plane_w);
  s.by_plane_h = FastDivisor::of(L.plane_h);
  s.by_phases_w = FastDivisor::of(L.phases_w);
  const int64_t blocks_x = (s.span + kStretchThreads - 1) / kStretchThreads;
  const int64_t blocks_y =
      std::min<int64_t>({s.groups, 65535, std::max<int64_t>(1, kStretchTargetBlocks / blocks_x)});
  launch_dependent(stretch_kernel<T, SPLIT>, dim3(unsigned(blocks_x), unsigned(blocks_y)),
                   dim3(kStretchThreads), 0, stream, "stretch_kernel", x, ws, s, g.tail_slack);
}

}  // namespace

void launch_stretch(const Geometry& g, bool for_staged_kernel, const void* x,
                    escoin_dtype_t dtype, float* ws, cudaStream_t stream) {
  with_element_type(dtype, [&](auto element) {
    using T = decltype(element);
    stretch<T, false>(g, for_staged_kernel ? g.staged.layout : g.layout,
                      for_staged_kernel ? g.staged.lead : 0, static_cast<const T*>(x), ws,
                      stream);
  });
}

void launch_split_stretch(const Geometry& g, const float* x, float* ws, cudaStream_t stream) {
  stretch<float, true>(g, g.mma_layout, 0, x, ws, stream);
}

}  // namespace escoin
