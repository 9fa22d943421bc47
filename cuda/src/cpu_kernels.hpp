// cpu_kernels.hpp -- the CPU sparse convolution kernel, compiled once per instruction set.
//
// cpu_kernels.cpp is compiled several times (see CMakeLists.txt), each time with different
// vector-ISA flags and ESCOIN_CPU_ISA naming the namespace, so one source yields an AVX-512, an
// AVX2 and a portable variant; conv_cpu.cpp picks one at run time from what the CPU supports.
#pragma once

#include <cstdint>

#include "geometry.hpp"
#include "half_float.hpp"

namespace escoin {

// One forward call's operands, stored as S (float, double, Float16 or BFloat16) and computed in
// Compute<S>: the input is stretched into `workspace`, widened, and the weights come widened.
template <typename S>
struct CpuConvArgs {
  const Geometry* geometry;
  const S* x;
  Compute<S>* workspace;
  const int64_t* row_ptr;
  const int32_t* offsets;
  const Compute<S>* values;
  const S* bias;      // may be null
  const S* residual;  // y's shape, added before the ReLU; may be null
  bool relu;
  S* y;
  // x itself where the kernel reads it in place (all images but the last); set by the kernel.
  const Compute<S>* x_in_place = nullptr;
};

#define ESCOIN_DECLARE_CPU_KERNELS(isa)                       \
  namespace isa {                                             \
  void sparse_conv(const CpuConvArgs<float>& args);           \
  void sparse_conv(const CpuConvArgs<double>& args);          \
  void sparse_conv(const CpuConvArgs<Float16>& args);         \
  void sparse_conv(const CpuConvArgs<BFloat16>& args);        \
  }

ESCOIN_DECLARE_CPU_KERNELS(avx512)
ESCOIN_DECLARE_CPU_KERNELS(avx2)
ESCOIN_DECLARE_CPU_KERNELS(portable)

}  // namespace escoin
