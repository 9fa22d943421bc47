// cpu_kernels.hpp -- the CPU sparse convolution kernel, compiled once per instruction set.
//
// cpu_kernels.cpp is compiled several times (see CMakeLists.txt), each time with different
// vector-ISA flags and ESCOIN_CPU_ISA naming the namespace, so one source yields an AVX-512, an
// AVX2 and a portable variant; conv_cpu.cpp picks one at run time from what the CPU supports.
#pragma once

#include <cstdint>

#include "geometry.hpp"

namespace escoin {

// One forward call's operands, with the input already stretched into `stretched`.
template <typename T>
struct CpuConvArgs {
  const Geometry* geometry;
  const T* stretched;
  const int64_t* row_ptr;
  const int32_t* offsets;
  const T* values;
  const T* bias;      // may be null
  const T* residual;  // y's shape, added before the ReLU; may be null
  bool relu;
  T* y;
};

#define ESCOIN_DECLARE_CPU_KERNELS(isa)                       \
  namespace isa {                                             \
  void sparse_conv(const CpuConvArgs<float>& args);           \
  void sparse_conv(const CpuConvArgs<double>& args);          \
  }

ESCOIN_DECLARE_CPU_KERNELS(avx512)
ESCOIN_DECLARE_CPU_KERNELS(avx2)
ESCOIN_DECLARE_CPU_KERNELS(portable)

}  // namespace escoin
