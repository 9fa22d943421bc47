// conv_cuda_kernels.hpp -- the CUDA launches the forward entry (conv_cuda.cu) chooses between.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "geometry.hpp"

namespace escoin {

// The epilogue of one output: bias, then ReLU (NaN passes, as in torch).
__device__ __forceinline__ float bias_relu(float sum, float bias, int relu) {
  const float r = sum + bias;
  return (relu && r < 0.f) ? 0.f : r;
}

// Where split partial sums go: after the stretched input and its slack in the workspace.
inline float* partial_sums(const Geometry& g, float* ws) {
  return ws + g.d.batch * g.layout.image_stride + g.tail_slack;
}

// Writes x's stretched copy into the workspace (stretch.hpp's layout) and zeroes the tail slack
// after it.
void launch_stretch(const Geometry& g, const float* x, float* ws, cudaStream_t stream);

// Adds `splits` partial sums per output in split order (deterministic), then bias and ReLU.
void launch_reduce_splits(const Geometry& g, const float* partial, int64_t splits,
                          const float* bias, bool relu, float* y, cudaStream_t stream);

// Whether the staged kernel can run g: a channel fits in shared memory and the grid holds it.
bool tile_kernel_fits(const Geometry& g);

// The staged kernel (tile_kernel.cu) on the stretched input (the workspace, or x itself where
// input_already_stretched), of which `slack` elements past the batch may be read, with a tile
// program built for g; ws holds the split partial sums.
void launch_tile_conv(const Geometry& g, const float* input, int64_t slack, float* ws,
                      const int32_t* program, const float* bias, bool relu, float* y,
                      cudaStream_t stream);

}  // namespace escoin
