// cuda_tiled_kernel.cuh -- the shared-memory tiled direct sparse convolution (CUDA).
//
// Why: the streaming kernel reads every input value from global memory; a block's inputs (all
// input channels around its positions, for several images) do not fit in L1, so nearly every
// load went to L2 and the kernel ran at ~21x the arithmetic floor. Here a block owns kTiledThreads
// consecutive stretched positions q (one per thread), IMAGES images and kTiledChannels output
// channels of one group, and walks the group's input channels in chunks: each chunk's input
// (with its halo) is copied once into shared memory, the block's nonzeros that fall into the
// chunk are converted once into (value, shared-memory index) pairs, and every thread then runs
// acc[m][b] += value * tile[b][index + thread] from shared memory. Partial sums stay in registers
// across chunks (the channel loop is unrolled, so they are not spilled).
//
// Requires each CSR row's columns in non-decreasing input-channel order (SparseFilter guarantees
// it; the C header states it for the CUDA entry); a row's entries of earlier channels would be
// skipped rather than read out of bounds.
#pragma once

#include <cstdint>

#include "geometry.hpp"

namespace escoin {

constexpr int kTiledThreads = 256;   // positions per block, one per thread
constexpr int kTiledChannels = 16;   // output channels per block (accumulators per image)

struct TiledParams {
  int64_t batch, out_channels, group_out, groups, channel_blocks, position_blocks;
  int64_t group_in, phases, plane, plane_w, plane_q, out_width, out_plane;
  int64_t image_stride, group_span;
  int64_t span;            // shared-memory elements per (image, channel, phase) row
  int64_t tile_floats;     // IMAGES * chunk_channels * phases * span, rounded up to even so the
                           // (value, index) float2 staging area after it is 8-byte aligned
  int64_t chunk_channels;  // input channels per chunk
  int64_t stage_capacity;  // staged entries per output channel per chunk
  int relu;
};

// Shared memory: tile[IMAGES][chunk_channels * phases][span] floats, then per output channel a
// staging area of stage_capacity (value, index) pairs and the count staged.
template <int IMAGES>
__global__ void __launch_bounds__(kTiledThreads)
sparse_conv_tiled_kernel(const float* __restrict__ ws, const int64_t* __restrict__ row_ptr,
                         const int32_t* __restrict__ offsets, const float* __restrict__ values,
                         const float* __restrict__ bias, float* __restrict__ y, TiledParams p) {
  extern __shared__ float shared[];
  const int64_t rows_per_image = p.chunk_channels * p.phases;
  float* tile = shared;
  float2* stage = reinterpret_cast<float2*>(tile + p.tile_floats);
  int* stage_count = reinterpret_cast<int*>(stage + kTiledChannels * p.stage_capacity);
  __shared__ int64_t cursor[kTiledChannels];

  const int64_t position_block = blockIdx.x % p.position_blocks;
  const int64_t q0 = position_block * kTiledThreads;
  const int64_t channel_item = blockIdx.x / p.position_blocks;
  const int64_t group = channel_item / p.channel_blocks;
  const int64_t m_begin = group * p.group_out + (channel_item % p.channel_blocks) * kTiledChannels;
  const int64_t left = (group + 1) * p.group_out - m_begin;
  const int channels = int(left < kTiledChannels ? left : kTiledChannels);
  const int64_t n0 = int64_t(blockIdx.y) * IMAGES;
  const int t = threadIdx.x;

  if (t < kTiledChannels) cursor[t] = t < channels ? row_ptr[m_begin + t] : 0;
  float acc[kTiledChannels][IMAGES];
#pragma unroll
  for (int m = 0; m < kTiledChannels; ++m)
#pragma unroll
    for (int b = 0; b < IMAGES; ++b) acc[m][b] = 0.f;

  const float* group_in = ws + group * p.group_span;
  const int warp = t / 32, lane = t % 32;
  for (int64_t c0 = 0; c0 < p.group_in; c0 += p.chunk_channels) {
    __syncthreads();  // the previous chunk's tile and stage are consumed; cursors are visible
    // Copy the chunk: one (image, channel, phase) row of `span` positions per warp at a time.
    const int64_t rows = IMAGES * rows_per_image;
    for (int64_t r = warp; r < rows; r += kTiledThreads / 32) {
      const int64_t b = r / rows_per_image, cp = r % rows_per_image;
      const int64_t n = n0 + b, c = c0 + cp / p.phases;
      const bool real = n < p.batch && c < p.group_in;
      const float* src = group_in + n * p.image_stride + (c0 * p.phases + cp) * p.plane + q0;
      float* dst = tile + r * p.span;
      for (int64_t k = lane; k < p.span; k += 32)
        dst[k] = (real && q0 + k < p.plane) ? __ldg(src + k) : 0.f;
    }
    // Stage the block's nonzeros of this chunk, all threads at once: candidate e of channel m is
    // entry cursor[m] + e. Rows list input channels in order, so a channel's entries inside the
    // chunk are a prefix of its candidates and each lands at its own position e.
    if (t < kTiledChannels) stage_count[t] = 0;
    __syncthreads();
    const int64_t chunk_begin = c0 * p.phases * p.plane;
    const int64_t chunk_end = (c0 + p.chunk_channels) * p.phases * p.plane;
    for (int64_t k = t; k < channels * p.stage_capacity; k += kTiledThreads) {
      const int m = int(k / p.stage_capacity), e = int(k % p.stage_capacity);
      const int64_t j = cursor[m] + e;
      if (j >= row_ptr[m_begin + m + 1]) continue;
      const int64_t off = offsets[j];
      if (off >= chunk_end || off < chunk_begin) continue;  // later chunk / out of order
      const int64_t row = off / p.plane;  // channel * phases + phase
      const int64_t index = (row - c0 * p.phases) * p.span + (off - row * p.plane);
      stage[m * p.stage_capacity + e] = make_float2(values[j], __int_as_float(int(index)));
      atomicMax(stage_count + m, e + 1);
    }
    __syncthreads();
    if (t < channels) cursor[t] += stage_count[t];
    __syncthreads();
    if (q0 + t < p.plane_q) {
#pragma unroll
      for (int m = 0; m < kTiledChannels; ++m) {
        if (m >= channels) break;
        const float2* entries = stage + m * p.stage_capacity;
        const int count = stage_count[m];
        for (int e = 0; e < count; ++e) {
          const float2 entry = entries[e];
          const float* in = tile + __float_as_int(entry.y) + t;
#pragma unroll
          for (int b = 0; b < IMAGES; ++b)
            acc[m][b] = fmaf(entry.x, in[b * rows_per_image * p.span], acc[m][b]);
        }
      }
    }
  }

  const int64_t q = q0 + t, oh = q / p.plane_w, ow = q % p.plane_w;
  if (q >= p.plane_q || ow >= p.out_width) return;
#pragma unroll
  for (int m = 0; m < kTiledChannels; ++m) {
    if (m >= channels) break;
    const float b0 = bias ? bias[m_begin + m] : 0.f;
#pragma unroll
    for (int b = 0; b < IMAGES; ++b) {
      if (n0 + b >= p.batch) break;
      const float r = acc[m][b] + b0;
      y[((n0 + b) * p.out_channels + m_begin + m) * p.out_plane + oh * p.out_width + ow] =
          (p.relu && r < 0.f) ? 0.f : r;  // NaN passes, as in torch
    }
  }
}

}  // namespace escoin
