// element_type.cuh -- the element types a CUDA forward call's x, y, bias and residual may have,
// as the kernels that touch them in memory see them: float32, and the 16-bit float16 and
// bfloat16, which are stored in 16 bits and computed in float32. The stretch widens x into the
// float32 workspace; the convolution kernel's epilogue, or the split reduction where the work
// was split, finishes the float32 sums (bias, residual, ReLU) and rounds each output once, to
// nearest even, as the CPU path (half_float.hpp) and PyTorch do.
#pragma once

#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "error.hpp"
#include "escoin/escoin.h"

namespace escoin {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// v rounded to T, to nearest even.
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}

// Calls f(T{}) with T the element type of dtype (float, __half or __nv_bfloat16), so that a
// launch picks its kernel's instantiation from a runtime dtype in one place.
template <typename F>
decltype(auto) with_element_type(escoin_dtype_t dtype, F&& f) {
  switch (dtype) {
    case ESCOIN_FLOAT32:
      return f(float{});
    case ESCOIN_FLOAT16:
      return f(__half{});
    case ESCOIN_BFLOAT16:
      return f(__nv_bfloat16{});
    default:
      fail_invalid("no CUDA element type for dtype ", static_cast<int>(dtype));
  }
}

}  // namespace escoin
