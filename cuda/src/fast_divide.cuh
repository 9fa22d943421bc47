// fast_divide.cuh -- division by a divisor fixed at launch time, as a multiply-high, an add and a
// shift (Granlund & Montgomery's magic numbers). A 32-bit integer division by a runtime value
// compiles to about 20 instructions on the GPU; index arithmetic that divides per element (the
// stretch, the staged kernel's chunk copy) is issue-bound on those.
#pragma once

#include <cstdint>

namespace escoin {

struct FastDivisor {
  uint32_t divisor, magic, shift;

  // The divisor d, 1 <= d < 2^31. shift is the smallest s with 2^s >= d, and
  // magic = floor(2^32 * (2^s - d) / d) + 1, which fits 32 bits because 2^(s-1) < d.
  static FastDivisor of(int64_t d) {
    uint32_t shift = 0;
    while ((int64_t(1) << shift) < d) ++shift;
    const uint64_t magic = ((uint64_t(1) << 32) * ((uint64_t(1) << shift) - uint64_t(d))) /
                               uint64_t(d) + 1;
    return FastDivisor{uint32_t(d), uint32_t(magic), shift};
  }

  // n / divisor, exact for 0 <= n < 2^31 (umulhi(n, magic) <= n, so the sum fits 32 bits). On
  // the GPU in CUDA sources, on the host in C++ ones (the CPU forward's check of the offsets).
#if defined(__CUDACC__)
  __device__ __forceinline__ uint32_t divide(uint32_t n) const {
    return (__umulhi(n, magic) + n) >> shift;
  }
#else
  uint32_t divide(uint32_t n) const {
    return (uint32_t((uint64_t(n) * magic) >> 32) + n) >> shift;
  }
#endif
};

}  // namespace escoin
