// conv_cuda_kernels.hpp -- the CUDA launches the forward entry (conv_cuda.cu) chooses between.
#pragma once

#include <cstdint>

#include <cuda.h>  // CUtensorMap
#include <cuda_runtime.h>

#include "element_type.cuh"
#include "escoin/escoin.h"
#include "fast_divide.cuh"
#include "geometry.hpp"

namespace escoin {

// What the tensor-core kernel does to each finished sum before writing it: adds the output
// channel's bias and the residual's element at the output's place (a shortcut added before the
// ReLU, as in ResNet's blocks), then the ReLU. bias and residual may be null.
struct Epilogue {
  const float* bias;      // out_channels values
  const float* residual;  // y's shape; never overlaps y (check_forward_operands)
  int relu;
};

// A forward call's output: y and its epilogue's operands (as Epilogue's), all of y's element
// type (dtype: float32, float16 or bfloat16; element_type.cuh). The convolution kernels finish
// the float32 sums and write y in its type themselves, unless they split their work; split sums
// are added, finished and rounded by the reduction kernel.
struct Output {
  void* y;
  const void* bias;
  const void* residual;
  int relu;
  escoin_dtype_t dtype;
};

// The epilogue of one output: bias, then ReLU (NaN passes, as in torch).
__device__ __forceinline__ float bias_relu(float sum, float bias, int relu) {
  const float r = sum + bias;
  return (relu && r < 0.f) ? 0.f : r;
}

// `sum` plus element i of the residual (of y's element type T), if there is one.
template <typename T>
__device__ __forceinline__ float with_residual(float sum, const T* residual, int64_t i) {
  return residual ? sum + to_float(__ldg(residual + i)) : sum;
}

// A split output's finished sum into y[i] (of element type T): plus its output channel's bias
// (bias may be null; channel() gives the channel, called only where there is a bias: working
// it out for every output made layers without a bias 4-7% slower on an H100) and the
// residual's element i, then the ReLU, rounded once to T.
template <typename T, typename Channel>
__device__ __forceinline__ void write_finished(float sum, T* y, int64_t i, const T* bias,
                                               Channel channel, const T* residual, int relu) {
  const float b = bias ? to_float(__ldg(bias + channel())) : 0.f;
  y[i] = from_float<T>(bias_relu(with_residual(sum, residual, i), b, relu));
}

// The sum of `count` partial sums (at most kGpuMaxSplits) `stride` apart from `first`, added in
// split order (deterministic). Every load is issued before the first add: at batch 1 a layer's
// outputs are few and the adding waits on load latency. A count known at compile time leaves
// only its own loads.
__device__ __forceinline__ float sum_in_split_order(const float* first, int64_t stride,
                                                    int count) {
  float part[kGpuMaxSplits];
#pragma unroll
  for (int k = 0; k < int(kGpuMaxSplits); ++k)
    part[k] = k < count ? __ldg(first + k * stride) : 0.f;
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < int(kGpuMaxSplits); ++k)
    if (k < count) sum += part[k];
  return sum;
}

// The uneven staged launch's tail where its lead jobs split (StagedLaunch; blocks of one image
// there): the reduction adds the lead jobs' partial sums and, for the tail jobs' outputs, the
// tail's instead (sums null: no tail). Jobs are numbered tile fastest, then by their row: image
// x items + item, which with one image a block follows y's order of planes. So the tail's
// outputs are the planes of rows past the tail's first (from y's element past_first_row on),
// and that row's planes (from first on) from its first tile's place in the plane on.
struct SplitTail {
  const float* sums;  // [tail block][job_outputs]: kStagedRows channels x tile positions
  int64_t first, past_first_row;
  int first_offset, lead_jobs, tail_splits, job_outputs, tiles, items, items_per_group;
  int tile_positions, plane_w, out_plane, out_width;
  FastDivisor by_out_plane, by_out_channels, by_group_out, by_out_width, by_tile_positions;
};

// Where the tail's partial sums of y's element i (i >= t.first) start, or -1 where it is not a
// tail job's. (y's elements fit 32 bits where there is a tail: staged_launch.)
__device__ __forceinline__ int64_t tail_place(const SplitTail& t, int i) {
  const int plane = int(t.by_out_plane.divide(uint32_t(i)));  // image x out_channels + channel
  const int offset = i - plane * t.out_plane;
  if (i < t.past_first_row && offset < t.first_offset) return -1;
  const int n = int(t.by_out_channels.divide(uint32_t(plane)));
  const int m = plane - n * int(t.by_out_channels.divisor);
  const int group = int(t.by_group_out.divide(uint32_t(m)));
  const int channel = m - group * int(t.by_group_out.divisor);  // in the group
  const int row = n * t.items + group * t.items_per_group + channel / int(kStagedRows);
  const int oh = int(t.by_out_width.divide(uint32_t(offset)));
  const int q = oh * t.plane_w + offset - oh * t.out_width;  // its stretched position
  const int tile = int(t.by_tile_positions.divide(uint32_t(q)));
  const int tail_job = row * t.tiles + tile - t.lead_jobs;
  const int e = channel % int(kStagedRows) * t.tile_positions + q - tile * t.tile_positions;
  return int64_t(tail_job) * t.tail_splits * t.job_outputs + e;
}

// Where split partial sums go: after the stretched input and its slack in the workspace.
inline float* partial_sums(const Geometry& g, float* ws) {
  return ws + stretched_input_elements(g) + g.tail_slack;
}

// Writes x's stretched copy into the workspace (stretch.hpp's layout: g.layout, or for the staged
// kernel g.staged.layout, whose rows start g.staged.lead zeros earlier), widened to float32 from
// x's dtype, and zeroes the tail slack after it.
void launch_stretch(const Geometry& g, bool for_staged_kernel, const void* x,
                    escoin_dtype_t dtype, float* ws, cudaStream_t stream);

// The same stretch into the tensor-core kernel's layout (g.mma_layout), each element written as
// its bf16 hi and lo parts in one 32-bit word, as that kernel reads it (mma_program.hpp).
void launch_split_stretch(const Geometry& g, const float* x, float* ws, cudaStream_t stream);

// Adds `splits` partial sums per output in split order (deterministic), then the epilogue, and
// writes y in its dtype; a tail job's outputs, where `tail` has one, from the tail's sums.
void launch_reduce_splits(const Geometry& g, const float* partial, int64_t splits,
                          const Output& out, cudaStream_t stream, const SplitTail& tail = {});

// Whether the staged kernel can run g: a channel fits in shared memory and the grid holds it.
bool tile_kernel_fits(const Geometry& g);

// Whether the staged kernel can copy by tensor maps on the current device (the running code is
// Hopper's).
bool staged_kernel_copies_tensors();

// Fills x_map, the tensor map through which the staged kernel copies x's chunks padded (no
// stretch), where g's plan has tensor copies (StagedPlan::tensor_copy), the staged kernel can
// copy by tensor maps here and x is 16-byte aligned; returns false elsewhere (tensor_copy.cu).
bool encode_tensor_copy(const Geometry& g, const float* x, CUtensorMap* x_map);

// The staged kernel (tile_kernel.cu) on the stretched input in the plan's layout (the
// workspace, or x itself where input_already_stretched), of which `slack` elements past the
// batch may be read, or with x_map on x through that tensor map; with a tile program built for
// g; ws holds the split partial sums (and a 16-bit output's sums: Output).
void launch_tile_conv(const Geometry& g, const float* input, int64_t slack, float* ws,
                      const CUtensorMap* x_map, const int32_t* program, const Output& out,
                      cudaStream_t stream);

// The tensor-core kernel (mma_kernel.cu) on the split stretched input in the workspace, with an
// MMA program built for g.
void launch_mma_conv(const Geometry& g, const uint32_t* input, const uint32_t* program,
                     const Epilogue& epilogue, float* y, cudaStream_t stream);

}  // namespace escoin
