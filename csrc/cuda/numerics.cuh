// Element rounding, code decoding and scale rules of lowbit/backends/ref.py, as integer bit
// operations and single IEEE fp32 operations (round-to-nearest, no contraction), callable from
// device code and, for testing, from host code.
#pragma once

#include <stdint.h>
#include <string.h>

#include <lowbit/rng.h>

#if defined(__CUDACC__)
#define LOWBIT_CUDA_HD __host__ __device__ __forceinline__
#else
#define LOWBIT_CUDA_HD inline
#endif

namespace lowbit {
namespace cuda {

// ---------------------------------------------------------------- fp32 arithmetic, one rounding each
LOWBIT_CUDA_HD float f32_mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  volatile float r = a * b;
  return r;
#endif
}
LOWBIT_CUDA_HD float f32_div(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  volatile float r = a / b;
  return r;
#endif
}
LOWBIT_CUDA_HD float f32_add(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  volatile float r = a + b;
  return r;
#endif
}
LOWBIT_CUDA_HD float f32_sub(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  volatile float r = a - b;
  return r;
#endif
}

LOWBIT_CUDA_HD uint32_t f32_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}
LOWBIT_CUDA_HD float f32_from_bits(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}
LOWBIT_CUDA_HD int clz32(uint32_t x) {
#ifdef __CUDA_ARCH__
  return __clz(x);
#else
  return x ? __builtin_clz(x) : 32;
#endif
}

LOWBIT_CUDA_HD bool f32_isnan(float f) { return (f32_bits(f) & 0x7FFFFFFFu) > 0x7F800000u; }
LOWBIT_CUDA_HD bool f32_isinf(float f) { return (f32_bits(f) & 0x7FFFFFFFu) == 0x7F800000u; }

constexpr uint32_t kNonFiniteAmax = 0x7FC00000u;  // an fp32 NaN, above every finite |x| as uint32
constexpr float kFltMax = 3.4028234663852886e38f;

// |x| as ordered uint32 bits; NaN and Inf map to kNonFiniteAmax (a block holding them has amax NaN).
LOWBIT_CUDA_HD uint32_t amax_key(float x) {
  const uint32_t a = f32_bits(x) & 0x7FFFFFFFu;
  return a >= 0x7F800000u ? kNonFiniteAmax : a;
}

// floor(log2(a)) and ceil(log2(a)) of a positive finite fp32 value (subnormals included), exactly.
LOWBIT_CUDA_HD int floor_log2(float a) {
  const uint32_t b = f32_bits(a) & 0x7FFFFFFFu;
  const uint32_t e = b >> 23;
  return e ? (int)e - 127 : -149 + (31 - clz32(b));
}
LOWBIT_CUDA_HD int ceil_log2(float a) {
  const uint32_t b = f32_bits(a) & 0x7FFFFFFFu;
  const bool pow2 = (b >> 23) ? (b & 0x7FFFFFu) == 0 : (b & (b - 1)) == 0;
  return floor_log2(a) + (pow2 ? 0 : 1);
}
// 2^e as fp32 for e in [-149, 127] (exact).
LOWBIT_CUDA_HD float pow2f(int e) {
  return e >= -126 ? f32_from_bits((uint32_t)(e + 127) << 23) : f32_from_bits(1u << (e + 149));
}

// ---------------------------------------------------------------- element formats
// code_mag = ((exp - emin) << mbits) + n for a grid value n * 2^(exp - mbits), exp >= emin.
struct E4M3 {
  static constexpr int mbits = 3, emin = -6;
  static constexpr uint32_t max_code = 0x7E, inf_code = 0x7E, nan_code = 0x7F, sign_bit = 0x80;
};
struct E5M2 {
  static constexpr int mbits = 2, emin = -14;
  static constexpr uint32_t max_code = 0x7B, inf_code = 0x7C, nan_code = 0x7F, sign_bit = 0x80;
};
struct E2M1 {  // no NaN: a NaN value encodes as code 0
  static constexpr int mbits = 1, emin = 0;
  static constexpr uint32_t max_code = 0x7, inf_code = 0x7, nan_code = 0x0, sign_bit = 0x8;
};
struct BF16 {
  static constexpr int mbits = 7, emin = -126;
  static constexpr uint32_t max_code = 0x7F7F, inf_code = 0x7F80, nan_code = 0x7FC0, sign_bit = 0x8000;
};
struct FP16 {
  static constexpr int mbits = 10, emin = -14;
  static constexpr uint32_t max_code = 0x7BFF, inf_code = 0x7C00, nan_code = 0x7E00, sign_bit = 0x8000;
};

// Round fp32 v onto Elem's grid (satfinite) and return its code.
// stochastic: round away from zero iff frac > u24 * 2^-24; nearest: ties to even.
template <typename Elem>
LOWBIT_CUDA_HD uint32_t round_code(float v, bool stochastic, uint32_t u24) {
  const uint32_t b = f32_bits(v);
  const uint32_t sign = (b >> 31) ? Elem::sign_bit : 0u;
  const uint32_t a = b & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return Elem::nan_code;
  if (a == 0x7F800000u) return sign | Elem::inf_code;
  if (a == 0) return sign;
  // a = M * 2^E0 exactly, M < 2^24.
  const uint32_t ef = a >> 23;
  const uint32_t M = ef ? ((a & 0x7FFFFFu) | 0x800000u) : a;
  const int E0 = ef ? (int)ef - 150 : -149;
  const int ea = ef ? (int)ef - 127 : -149 + (31 - clz32(a));
  const int ex = ea < Elem::emin ? Elem::emin : ea;
  const int s = ex - Elem::mbits - E0;  // bits below the grid spacing; >= 13 for every element here
  uint32_t n, low;
  if (s >= 32) {
    n = 0;
    low = M;
  } else {
    n = M >> s;
    low = M & ((1u << s) - 1u);
  }
  bool up;
  if (!stochastic) {
    if (s > 24) {
      up = false;  // low < 2^24 <= half the spacing
    } else {
      const uint32_t half = 1u << (s - 1);
      up = low > half || (low == half && (n & 1u));
    }
  } else if (s <= 24) {
    up = ((uint64_t)low << (24 - s)) > (uint64_t)u24;  // low / 2^s > u24 / 2^24
  } else {
    const int d = s - 24;
    up = u24 == 0 ? low != 0 : (d < 24 && (uint64_t)low > ((uint64_t)u24 << d));
  }
  uint32_t mag = ((uint32_t)(ex - Elem::emin) << Elem::mbits) + n + (up ? 1u : 0u);
  if (mag > Elem::max_code) mag = Elem::max_code;
  return sign | mag;
}

// Codes -> fp32 values (exact).
LOWBIT_CUDA_HD float decode_e4m3(uint32_t c) {
  const uint32_t sign = (c & 0x80u) << 24;
  const uint32_t e = (c >> 3) & 0xFu, m = c & 7u;
  if ((c & 0x7Fu) == 0x7Fu) return f32_from_bits(0x7FC00000u);
  const float mag = e ? f32_from_bits(((e + 120u) << 23) | (m << 20)) : (float)m * 0.001953125f;
  return f32_from_bits(f32_bits(mag) | sign);
}
LOWBIT_CUDA_HD float decode_e5m2(uint32_t c) {
  const uint32_t sign = (c & 0x80u) << 24;
  const uint32_t e = (c >> 2) & 0x1Fu, m = c & 3u;
  if (e == 31u) return f32_from_bits(sign | (m ? 0x7FC00000u : 0x7F800000u));
  const float mag = e ? f32_from_bits(((e + 112u) << 23) | (m << 21)) : (float)m * 1.52587890625e-05f;
  return f32_from_bits(f32_bits(mag) | sign);
}
LOWBIT_CUDA_HD float decode_e2m1(uint32_t c) {
  const uint32_t m = c & 7u;
  // 0, 0.5, 1, 1.5, 2, 3, 4, 6
  const float mag = m < 2 ? 0.5f * (float)m : f32_from_bits(((126u + (m >> 1)) << 23) | ((m & 1u) << 22));
  return (c & 8u) ? -mag : mag;
}

template <typename Elem>
LOWBIT_CUDA_HD float decode(uint32_t c);
template <>
LOWBIT_CUDA_HD float decode<E4M3>(uint32_t c) { return decode_e4m3(c); }
template <>
LOWBIT_CUDA_HD float decode<E5M2>(uint32_t c) { return decode_e5m2(c); }
template <>
LOWBIT_CUDA_HD float decode<E2M1>(uint32_t c) { return decode_e2m1(c); }

template <typename Elem>
struct ElemInfo;
template <>
struct ElemInfo<E4M3> {
  static constexpr float max = 448.0f;
  static constexpr int emax = 8;
};
template <>
struct ElemInfo<E5M2> {
  static constexpr float max = 57344.0f;
  static constexpr int emax = 15;
};
template <>
struct ElemInfo<E2M1> {
  static constexpr float max = 6.0f;
  static constexpr int emax = 2;
};

// ---------------------------------------------------------------- scales
enum ScaleMode : int { kScaleExact = 0, kScaleFloor = 1, kScaleRceil = 2 };

// FP8 fp32 scale d (x ~ q * d) from the block amax.
LOWBIT_CUDA_HD float fp8_scale(float amax, float max_elem, int mode) {
  float d = f32_div(amax, max_elem);
  if (amax == 0.0f) d = 1.0f;
  if (d < 1.1754943508222875e-38f) d = 1.1754943508222875e-38f;  // NaN passes
  if (mode != kScaleExact && !f32_isnan(d)) d = pow2f(mode == kScaleRceil ? ceil_log2(d) : floor_log2(d));
  return d;
}

// Unbiased E8M0 exponent of an MX block (128 = NaN block, byte 0xFF).
LOWBIT_CUDA_HD int mx_exponent(float amax, float max_elem, int emax_elem, int mode) {
  if (f32_isnan(amax)) return 128;
  if (amax == 0.0f) return -127;
  int e;
  if (mode == kScaleRceil) {
    const float ratio = f32_div(amax, max_elem);
    e = ratio == 0.0f ? -127 : ceil_log2(ratio);
  } else {
    e = floor_log2(amax) - emax_elem;
  }
  return e < -127 ? -127 : (e > 127 ? 127 : e);
}

// 2^e of an E8M0 byte as fp32 (byte 0xFF -> NaN).
LOWBIT_CUDA_HD float e8m0_value(uint32_t byte) {
  return byte == 0xFFu ? f32_from_bits(0x7FC00000u) : pow2f((int)byte - 127);
}

// NVFP4 per-tensor encode scale s_enc = 2688 / amax.
LOWBIT_CUDA_HD float nvfp4_global_scale(float amax) {
  float s = f32_div(2688.0f, amax);
  if (amax == 0.0f) s = 1.0f;
  if (f32_isinf(s)) s = kFltMax;
  return s;
}

// NVFP4 E4M3 block-scale code from the block amax and s_enc (round-to-nearest-even).
LOWBIT_CUDA_HD uint32_t nvfp4_block_scale_code(float amax, float s_enc) {
  float t = f32_mul(f32_div(amax, 6.0f), s_enc);
  if (!f32_isnan(t)) {
    if (t < 0.015625f) t = 0.015625f;
    if (t > 448.0f) t = 448.0f;
  }
  return round_code<E4M3>(t, false, 0u);
}

// Flat index, in the caller's tensor, of element (r, k) of the [R, K] working view.
LOWBIT_CUDA_HD uint64_t element_index(int64_t r, int64_t k, int64_t K, int64_t inner) {
  return (uint64_t)((r / inner) * K * inner + k * inner + (r % inner));
}

}  // namespace cuda
}  // namespace lowbit
