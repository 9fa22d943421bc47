// conv_cuda_kernels.hpp -- the CUDA launches the forward entry (conv_cuda.cu) chooses between.
#pragma once

#include <cstdint>

#include <cuda.h>  // CUtensorMap
#include <cuda_runtime.h>

#include "element_type.cuh"
#include "escoin/escoin.h"
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

// A split output's finished sum into y[i] (of element type T): plus channel m's bias (bias may
// be null) and the residual's element i, then the ReLU, rounded once to T.
template <typename T>
__device__ __forceinline__ void write_finished(float sum, T* y, int64_t i, const T* bias,
                                               int64_t m, const T* residual, int relu) {
  const float b = bias ? to_float(__ldg(bias + m)) : 0.f;
  y[i] = from_float<T>(bias_relu(with_residual(sum, residual, i), b, relu));
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
// writes y in its dtype.
void launch_reduce_splits(const Geometry& g, const float* partial, int64_t splits,
                          const Output& out, cudaStream_t stream);

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
