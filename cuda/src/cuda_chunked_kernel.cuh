// cuda_chunked_kernel.cuh -- the channel-chunked direct sparse convolution (CUDA).
//
// Why: the streaming kernel lets every output channel walk all input channels, so a block's
// loads span the whole input of its positions and images; that does not fit in L1 and the
// kernel ran bound by L2 bandwidth (85% of it busy, L1 hit rate 28%, on an H100 at batch 32).
// Here a block owns kChunkedThreads consecutive stretched positions q (one per thread), IMAGES
// images and kChunkedChannels output channels of one group, and walks the group's input
// channels in chunks sized so that the chunk's input for the block stays in L1. For each chunk
// the block's nonzeros inside it are staged once in shared memory as (value, offset) pairs; every
// thread then runs acc[m][b] += value * input[offset + q] (image b) through L1. Partial sums stay
// in registers across chunks (the channel loop is unrolled, so they are not spilled).
// (A variant that copied each chunk into shared memory spent as many instructions on the copy
// as on the products and was slower than the streaming kernel on most layers.)
//
// Requires each CSR row's columns in non-decreasing input-channel order with no column twice
// (SparseFilter guarantees it; the C header states it); entries of an earlier channel than the
// chunk are skipped rather than read, so a violation cannot read out of bounds.
#pragma once

#include <cstdint>

#include "geometry.hpp"

namespace escoin {

constexpr int kChunkedThreads = 256;   // positions per block, one per thread
constexpr int kChunkedChannels = 16;   // output channels per block (accumulators per image)

struct ChunkedParams {
  int64_t batch, out_channels, group_out, groups, channel_blocks, position_blocks;
  int64_t group_in, plane_w, plane_q, out_width, out_plane, image_stride, group_span;
  int64_t chunk_span;      // stretched elements of one chunk of input channels
  int64_t stage_capacity;  // staged entries per output channel per chunk
  int relu;
};

// Shared memory: per output channel a staging area of stage_capacity (value, offset) pairs.
template <int IMAGES>
__global__ void __launch_bounds__(kChunkedThreads)
sparse_conv_chunked_kernel(const float* __restrict__ ws, const int64_t* __restrict__ row_ptr,
                           const int32_t* __restrict__ offsets, const float* __restrict__ values,
                           const float* __restrict__ bias, float* __restrict__ y,
                           ChunkedParams p) {
  extern __shared__ float2 stage[];
  __shared__ int64_t cursor[kChunkedChannels];
  __shared__ int stage_count[kChunkedChannels];

  const int64_t q0 = (blockIdx.x % p.position_blocks) * kChunkedThreads;
  const int64_t channel_item = blockIdx.x / p.position_blocks;
  const int64_t group = channel_item / p.channel_blocks;
  const int64_t m_begin = group * p.group_out + (channel_item % p.channel_blocks) * kChunkedChannels;
  const int64_t left = (group + 1) * p.group_out - m_begin;
  const int channels = int(left < kChunkedChannels ? left : kChunkedChannels);
  const int64_t n0 = int64_t(blockIdx.y) * IMAGES;
  const int t = threadIdx.x;
  const int64_t q = q0 + t;
  // Images past the batch read image 0 again (in bounds) and are never written.
  const float* in = ws + group * p.group_span + q;
  int64_t image_offset[IMAGES];
#pragma unroll
  for (int b = 0; b < IMAGES; ++b) image_offset[b] = (n0 + b < p.batch ? n0 + b : 0) * p.image_stride;

  if (t < kChunkedChannels) cursor[t] = t < channels ? row_ptr[m_begin + t] : 0;
  float acc[kChunkedChannels][IMAGES];
#pragma unroll
  for (int m = 0; m < kChunkedChannels; ++m)
#pragma unroll
    for (int b = 0; b < IMAGES; ++b) acc[m][b] = 0.f;

  const int64_t group_end = p.group_span + p.plane_w;  // beyond every legal offset
  for (int64_t chunk_begin = 0; chunk_begin < group_end; chunk_begin += p.chunk_span) {
    const int64_t chunk_end = chunk_begin + p.chunk_span;
    __syncthreads();  // the previous chunk's stage is consumed; cursors are visible
    if (t < kChunkedChannels) stage_count[t] = 0;
    __syncthreads();
    // Stage the block's nonzeros of this chunk, all threads at once: candidate e of channel m is
    // entry cursor[m] + e. Rows list input channels in order, so a channel's entries inside the
    // chunk are a prefix of its candidates and each lands at its own position e.
    for (int64_t k = t; k < channels * p.stage_capacity; k += kChunkedThreads) {
      const int m = int(k / p.stage_capacity), e = int(k % p.stage_capacity);
      const int64_t j = cursor[m] + e;
      if (j >= row_ptr[m_begin + m + 1]) continue;
      const int64_t off = offsets[j];
      if (off >= chunk_end || off < chunk_begin) continue;  // later chunk / out of order
      stage[m * p.stage_capacity + e] = make_float2(values[j], __int_as_float(int(off)));
      atomicMax(stage_count + m, e + 1);
    }
    __syncthreads();
    if (t < channels) cursor[t] += stage_count[t];
    if (q < p.plane_q) {
#pragma unroll
      for (int m = 0; m < kChunkedChannels; ++m) {
        if (m >= channels) break;
        const float2* entries = stage + m * p.stage_capacity;
        const int count = stage_count[m];
        // Unrolled so that several entries' loads are in flight at once: at two blocks per SM
        // (128 registers) a warp waits ~7 cycles per instruction on L1 latency otherwise.
#pragma unroll 4
        for (int e = 0; e < count; ++e) {
          const float2 entry = entries[e];
          const float* src = in + __float_as_int(entry.y);
#pragma unroll
          for (int b = 0; b < IMAGES; ++b)
            acc[m][b] = fmaf(entry.x, __ldg(src + image_offset[b]), acc[m][b]);
        }
      }
    }
  }

  const int64_t oh = q / p.plane_w, ow = q % p.plane_w;
  if (q >= p.plane_q || ow >= p.out_width) return;
#pragma unroll
  for (int m = 0; m < kChunkedChannels; ++m) {
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
