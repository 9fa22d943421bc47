// tile_kernel.cu -- the register-tiled sparse convolution kernel (the filter as a tile program,
// tile_program.hpp): 8 output channels x 8 positions of accumulators per thread, input windows
// of 16 values in registers, nonzeros applied through a jump table (tile_dispatch.inc, generated).
#include <algorithm>
#include <cstdint>

#include "conv_cuda_kernels.hpp"
#include "cuda_check.cuh"
#include "error.hpp"
#include "tile_program.hpp"

namespace escoin {
namespace {

#include "tile_dispatch.inc"

constexpr int kChannels = int(kTileChannels);
constexpr int kPositions = int(kTilePositions);
constexpr int kWarps = int(kTileWarps);

struct TileParams {
  int batch, out_channels, group_out, tiles_per_group, items, splits;
  int plane_q, plane_w, out_width, out_plane;
  int64_t image_stride, group_span, windows_word;
  float* partial;  // splits > 1: partial sums [split][image][channel][out_plane]
  int relu;
};

// Block (x: 32 threads x kPositions consecutive positions, y: kWarps items (a tile of one group)
// times splits of their windows, z: the image). Warps of a block share positions, so the input
// windows one warp loads are in L1 for the others.
// Five blocks per SM (at most 102 registers): the loop is latency-bound, so occupancy pays.
__global__ void __launch_bounds__(32 * kWarps, 5)
tile_conv_kernel(const float* __restrict__ ws, const int32_t* __restrict__ program,
                 const float* __restrict__ bias, float* __restrict__ y, TileParams p) {
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int item_split = int(blockIdx.y) * kWarps + warp;
  if (item_split >= p.items * p.splits) return;
  const int item = item_split / p.splits, split = item_split % p.splits;
  const int group = item / p.tiles_per_group, tile = item % p.tiles_per_group;
  int q0 = (int(blockIdx.x) * 32 + lane) * kPositions;
  const bool live = q0 < p.plane_q;
  if (!live) q0 = 0;  // still walks the windows (uniform control flow), writes nothing

  const int32_t* item_first = program + kTileHeaderWords;
  const auto* windows = reinterpret_cast<const int2*>(program + p.windows_word);
  const auto* entries = windows + __ldg(program + 2) + 1;
  const int first = __ldg(item_first + item), count = __ldg(item_first + item + 1) - first;
  const int begin = first + int(int64_t(count) * split / p.splits);
  const int end = first + int(int64_t(count) * (split + 1) / p.splits);

  const int n = int(blockIdx.z);
  const float* in = ws + n * p.image_stride + group * p.group_span + q0;
  float acc[kChannels][kPositions];
#pragma unroll
  for (int c = 0; c < kChannels; ++c)
#pragma unroll
    for (int i = 0; i < kPositions; ++i) acc[c][i] = 0.f;
  auto load = [&](float (&x)[kTileWindow], int w) {
    const auto* src = reinterpret_cast<const float4*>(in + __ldg(&windows[w].x));
#pragma unroll
    for (int v = 0; v < kTileWindow / 4; ++v) {
      const float4 t = __ldg(src + v);
      x[4 * v] = t.x; x[4 * v + 1] = t.y; x[4 * v + 2] = t.z; x[4 * v + 3] = t.w;
    }
  };
  auto apply = [&](const float (&x)[kTileWindow], int w) {
    const int e0 = __ldg(&windows[w].y), e1 = __ldg(&windows[w + 1].y);
    run_tile_entries(acc, x, entries + e0, e1 - e0);
  };
  // One window in registers at a time: the 16 registers a second (prefetched) window took
  // buy a fifth block per SM, and other warps hide the window's load latency.
  for (int w = begin; w < end; ++w) {
    float x[kTileWindow];
    load(x, w);
    apply(x, w);
  }
  if (!live) return;
#pragma unroll
  for (int c = 0; c < kChannels; ++c) {
    const int channel = tile * kChannels + c;
    if (channel >= p.group_out) break;
    const int m = group * p.group_out + channel;
    const float b0 = bias ? __ldg(bias + m) : 0.f;
    const int64_t plane_base = (int64_t(n) * p.out_channels + m) * p.out_plane;
#pragma unroll
    for (int i = 0; i < kPositions; ++i) {
      const int q = q0 + i, oh = q / p.plane_w, ow = q % p.plane_w;
      if (q >= p.plane_q || ow >= p.out_width) continue;
      const int64_t out = plane_base + oh * p.out_width + ow;
      if (p.splits > 1) {
        p.partial[split * (int64_t(p.batch) * p.out_channels * p.out_plane) + out] = acc[c][i];
      } else {
        const float r = acc[c][i] + b0;
        y[out] = (p.relu && r < 0.f) ? 0.f : r;  // NaN passes, as in torch
      }
    }
  }
}

}  // namespace

bool tile_kernel_fits(const Geometry& g) {
  return g.d.batch <= 65535 &&
         (tile_items(g) * g.gpu_tile_splits + kWarps - 1) / kWarps <= 65535;
}

void launch_tile_conv(const Geometry& g, float* ws, const int32_t* program, const float* bias,
                      bool relu, float* y, cudaStream_t stream) {
  TileParams p;
  p.batch = int(g.d.batch);
  p.out_channels = int(g.d.out_channels);
  p.group_out = int(g.group_out);
  p.tiles_per_group = int(tiles_per_group(g));
  p.items = int(tile_items(g));
  p.splits = int(g.gpu_tile_splits);
  p.plane_w = int(g.layout.plane_w);
  p.plane_q = int(g.layout.out_height * g.layout.plane_w);
  p.out_width = int(g.layout.out_width);
  p.out_plane = int(g.out_plane);
  p.image_stride = g.layout.image_stride;
  p.group_span = g.group_span;
  p.windows_word = tile_windows_word(tile_items(g));
  p.partial = partial_sums(g, ws);
  p.relu = relu ? 1 : 0;
  const int64_t position_blocks = (p.plane_q + 32 * kPositions - 1) / (32 * kPositions);
  const int64_t item_blocks = (int64_t(p.items) * p.splits + kWarps - 1) / kWarps;
  if (item_blocks > 65535 || g.d.batch > 65535)  // tile_kernel_fits() keeps these out
    fail_invalid("the geometry is too large for the tiled CUDA kernel");
  const dim3 grid(unsigned(position_blocks), unsigned(item_blocks), unsigned(g.d.batch));
  tile_conv_kernel<<<grid, 32 * kWarps, 0, stream>>>(ws, program, bias, y, p);
  check_launch("tile_conv_kernel");
  if (p.splits > 1) launch_reduce_splits(g, p.partial, p.splits, bias, relu, y, stream);
}

}  // namespace escoin
