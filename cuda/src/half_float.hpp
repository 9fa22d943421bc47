// half_float.hpp -- the 16-bit float storage types of the CPU path and their conversions.
//
// float16 (IEEE binary16) and bfloat16 tensors are stored in 16 bits and computed in float32:
// the CPU stretch widens x into the float32 workspace, the kernel accumulates in float32, and
// the epilogue narrows each output once, rounding to nearest even as PyTorch and NumPy do.
//
// The conversions are written once, for any "lanes" type: a scalar (uint32_t / float) or a GCC
// vector of them, with selects instead of branches. The same code then converts a vector
// register at a time on every instruction set the CPU kernel is compiled for, with no
// intrinsics and no compiler support for _Float16 (GCC 12 converts _Float16 one element at a
// time even with F16C), and the scalar form, which converts run tails, is the same arithmetic.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace escoin {

// A float16 or bfloat16 value as its bit pattern (the CPU never computes in either).
struct Float16 {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// What a storage type is computed in: float32 for the 16-bit types, itself otherwise.
template <typename S>
struct ComputeOf {
  using type = S;
};
template <>
struct ComputeOf<Float16> {
  using type = float;
};
template <>
struct ComputeOf<BFloat16> {
  using type = float;
};
template <typename S>
using Compute = typename ComputeOf<S>::type;

// Reinterprets the bits of one lanes type as another of the same size.
template <typename To, typename From>
inline To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of one size");
  To to;
  std::memcpy(&to, &from, sizeof to);
  return to;
}

// `mask ? a : b` per lane, where `mask` is a comparison result: a bool for scalars, a vector of
// all-ones / all-zeros lanes for vectors (GCC's vector conditional).
template <typename M, typename U>
inline U select(M mask, U a, U b) {
  return mask ? a : b;
}

// float16 bits (in the low half of each U lane) to float32, exactly: normals rebias the
// exponent, infinities and NaNs keep an all-ones exponent (and the payload), and subnormals are
// renormalised by one float subtraction (the "magic number" method).
template <typename U, typename F>
inline F float16_to_float(U h) {
  const U exponent_mask = U{} + (0x7c00u << 13);
  U bits = (h & 0x7fffu) << 13;  // exponent and mantissa in float32's places
  const U exponent = bits & exponent_mask;
  bits += (127u - 15u) << 23;
  bits = select(exponent == exponent_mask, U(bits + ((128u - 16u) << 23)), bits);
  const auto subnormal = exponent == 0;
  F value = bit_cast<F>(select(subnormal, U(bits + (1u << 23)), bits));
  const F magic = F{} + bit_cast<float>(113u << 23);
  value = bit_cast<F>(select(subnormal, bit_cast<U>(F(value - magic)), bit_cast<U>(value)));
  return bit_cast<F>(bit_cast<U>(value) | ((h & 0x8000u) << 16));
}

// float32 to float16 bits, rounded to nearest even: overflow gives infinity, NaN a quiet NaN,
// results below float16's normal range are rounded by one float addition that lines the
// mantissa up with float16's subnormal step.
template <typename U, typename F>
inline U float_to_float16(F value) {
  U bits = bit_cast<U>(value);
  const U sign = bits & 0x80000000u;
  bits ^= sign;
  const U overflow = select(bits > 0x7f800000u, U{} + 0x7e00u, U{} + 0x7c00u);
  // 2^-1: adding it leaves a float16 subnormal's bits at the bottom of the mantissa, rounded.
  constexpr uint32_t subnormal_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const U subnormal =
      bit_cast<U>(F(bit_cast<F>(bits) + bit_cast<float>(subnormal_magic))) - subnormal_magic;
  const U odd = (bits >> 13) & 1u;
  const U normal = (bits + ((15u - 127u) << 23) + 0xfffu + odd) >> 13;
  const U result = select(bits >= ((127u + 16u) << 23), overflow,
                          select(bits < (113u << 23), subnormal, normal));
  return result | (sign >> 16);
}

// bfloat16 bits to float32: the upper half of a float32.
template <typename U, typename F>
inline F bfloat16_to_float(U h) {
  return bit_cast<F>(U(h << 16));
}

// float32 to bfloat16 bits, rounded to nearest even; NaN gives the quiet NaN 0x7fc0 (as
// PyTorch does).
template <typename U, typename F>
inline U float_to_bfloat16(F value) {
  const U bits = bit_cast<U>(value);
  const U rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return select((bits & 0x7fffffffu) > 0x7f800000u, U{} + 0x7fc0u, rounded);
}

// The conversions of the 16-bit type S, for any lanes type (above).
template <typename S, typename U, typename F>
inline F bits_to_float(U h) {
  static_assert(std::is_same_v<S, Float16> || std::is_same_v<S, BFloat16>, "a 16-bit type");
  if constexpr (std::is_same_v<S, Float16>)
    return float16_to_float<U, F>(h);
  else
    return bfloat16_to_float<U, F>(h);
}
template <typename S, typename U, typename F>
inline U float_to_bits(F v) {
  static_assert(std::is_same_v<S, Float16> || std::is_same_v<S, BFloat16>, "a 16-bit type");
  if constexpr (std::is_same_v<S, Float16>)
    return float_to_float16<U, F>(v);
  else
    return float_to_bfloat16<U, F>(v);
}

// Scalar conversions between a storage type and its compute type.
template <typename S>
inline Compute<S> widen(S v) {
  if constexpr (sizeof(S) == 2)
    return bits_to_float<S, uint32_t, float>(v.bits);
  else
    return v;
}
template <typename S>
inline S narrow(Compute<S> v) {
  if constexpr (sizeof(S) == 2)
    return S{uint16_t(float_to_bits<S, uint32_t, float>(v))};
  else
    return v;
}

}  // namespace escoin
