// cpu_vectors.hpp -- vector registers of the CPU kernel's instruction set, and runs of elements
// converted between a storage type and its compute type a register at a time.
//
// Included only by the per-instruction-set translation unit (cpu_kernels.cpp), which defines
// ESCOIN_VECTOR_BYTES: the same code is a 64-, 32- or 16-byte vector there.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "half_float.hpp"

#ifndef ESCOIN_VECTOR_BYTES
#error "ESCOIN_VECTOR_BYTES must give the variant's vector register width"
#endif

namespace escoin {
namespace ESCOIN_CPU_ISA {

// A vector of ESCOIN_VECTOR_BYTES (GCC/Clang vector extension): the accumulators are explicit
// registers, so the compiler cannot interchange the loops or keep the tile in memory (it did both
// when the tile was a plain array).
template <typename T>
struct Vector {
  typedef T type __attribute__((vector_size(ESCOIN_VECTOR_BYTES)));
  static constexpr int lanes = ESCOIN_VECTOR_BYTES / int(sizeof(T));
  static type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof v);  // one unaligned vector load
    return v;
  }
};

// A float32 register's worth of 16-bit patterns, and the same lanes widened to 32 bits.
typedef uint16_t Bits16Vector __attribute__((vector_size(ESCOIN_VECTOR_BYTES / 2)));
typedef uint32_t Bits32Vector __attribute__((vector_size(ESCOIN_VECTOR_BYTES)));

// dst[0, n) = the compute-type values of src[0, n).
template <typename S>
void widen_run(const S* src, Compute<S>* dst, int64_t n) {
  if constexpr (sizeof(S) != 2) {
    std::copy(src, src + n, dst);
  } else {
    using F = Vector<float>::type;
    constexpr int kLanes = Vector<float>::lanes;
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      Bits16Vector bits;
      std::memcpy(&bits, src + i, sizeof bits);
      const F values =
          bits_to_float<S, Bits32Vector, F>(__builtin_convertvector(bits, Bits32Vector));
      std::memcpy(dst + i, &values, sizeof values);
    }
    for (; i < n; ++i) dst[i] = widen(src[i]);
  }
}

// dst[0, n) = src[0, n) in the storage type (rounded to nearest even for the 16-bit types).
template <typename S>
void narrow_run(const Compute<S>* src, S* dst, int64_t n) {
  if constexpr (sizeof(S) != 2) {
    std::memcpy(dst, src, size_t(n) * sizeof(S));
  } else {
    using F = Vector<float>::type;
    constexpr int kLanes = Vector<float>::lanes;
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      const F values = Vector<float>::load(src + i);
      const Bits16Vector bits =
          __builtin_convertvector((float_to_bits<S, Bits32Vector>(values)), Bits16Vector);
      std::memcpy(dst + i, &bits, sizeof bits);
    }
    for (; i < n; ++i) dst[i] = narrow<S>(src[i]);
  }
}

}  // namespace ESCOIN_CPU_ISA
}  // namespace escoin
