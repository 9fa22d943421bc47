// conv_cuda_kernels.hpp -- the CUDA launches the forward entry (conv_cuda.cu) chooses between.
#pragma once

#include <cstdint>

#include <cuda.h>  // CUtensorMap
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
  return ws + stretched_input_elements(g) + g.tail_slack;
}

// Writes x's stretched copy into the workspace (stretch.hpp's layout: g.layout, or for the staged
// kernel g.staged.layout, whose rows start g.staged.lead zeros earlier) and zeroes the tail slack
// after it.
void launch_stretch(const Geometry& g, bool for_staged_kernel, const float* x, float* ws,
                    cudaStream_t stream);

// Adds `splits` partial sums per output in split order (deterministic), then bias and ReLU.
void launch_reduce_splits(const Geometry& g, const float* partial, int64_t splits,
                          const float* bias, bool relu, float* y, cudaStream_t stream);

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
// g; ws holds the split partial sums.
void launch_tile_conv(const Geometry& g, const float* input, int64_t slack, float* ws,
                      const CUtensorMap* x_map, const int32_t* program, const float* bias,
                      bool relu, float* y, cudaStream_t stream);

}  // namespace escoin
