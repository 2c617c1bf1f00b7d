// Bit-level element formats of lowbit, header-only, shared by the C++ and CUDA kernels.
// Every rule here is the one stated in lowbit/backends/ref.py (the executable spec):
// satfinite rounding onto E4M3 / E5M2 / E2M1 / bf16 / fp16 grids with nearest-even or
// stochastic rounding (round away from zero iff frac > u), canonical NaN codes, E8M0,
// FP8 and NVFP4 scale rules. Everything works on fp32 bit patterns with integer operations.
#pragma once

#include <stdint.h>

#include "lowbit/enums.h"
#include "lowbit/rng.h"

#include <string.h>  // memcpy: host-side bit casts (device code uses __float_as_uint)

namespace lowbit {

// ------------------------------------------------------------------------------ bit casts
LOWBIT_HD uint32_t f32_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

LOWBIT_HD float bits_f32(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

LOWBIT_HD int clz32(uint32_t x) {
#ifdef __CUDA_ARCH__
  return __clz((int)x);
#else
  return x ? __builtin_clz(x) : 32;
#endif
}

LOWBIT_HD int32_t imin32(int32_t a, int32_t b) { return a < b ? a : b; }
LOWBIT_HD int32_t imax32(int32_t a, int32_t b) { return a > b ? a : b; }
LOWBIT_HD uint32_t umin32(uint32_t a, uint32_t b) { return a < b ? a : b; }
LOWBIT_HD uint32_t umax32(uint32_t a, uint32_t b) { return a > b ? a : b; }

constexpr uint32_t kF32AbsMask = 0x7FFFFFFFu;
constexpr uint32_t kF32Inf = 0x7F800000u;
constexpr uint32_t kF32CanonicalNaN = 0x7FC00000u;  // torch's NaN (float('nan'))
constexpr uint32_t kF32Max = 0x7F7FFFFFu;

LOWBIT_HD bool f32_is_nan(float f) { return (f32_bits(f) & kF32AbsMask) > kF32Inf; }
LOWBIT_HD bool f32_is_inf(float f) { return (f32_bits(f) & kF32AbsMask) == kF32Inf; }

// 2^k as fp32 for k in [-149, 127] (exact, subnormals included).
LOWBIT_HD float pow2f(int32_t k) {
  return bits_f32(k >= -126 ? (uint32_t)(k + 127) << 23 : 1u << (uint32_t)(k + 149));
}

// floor(log2(a)) for a positive finite fp32 bit pattern (subnormals included).
LOWBIT_HD int32_t floor_log2_bits(uint32_t ab) {
  const int32_t e = (int32_t)(ab >> 23);
  return e ? e - 127 : (31 - clz32(ab)) - 149;
}

// ceil(log2(a)) for a positive finite fp32 bit pattern.
LOWBIT_HD int32_t ceil_log2_bits(uint32_t ab) {
  const int32_t e = (int32_t)(ab >> 23);
  const uint32_t m = ab & 0x7FFFFFu;
  const bool pow2 = e ? m == 0 : (m & (m - 1u)) == 0;
  return floor_log2_bits(ab) + (pow2 ? 0 : 1);
}

// ------------------------------------------------------------------------------ element types
// kEmin: exponent of the smallest normal; kMaxCode: largest finite magnitude code;
// kNanCode: the canonical NaN (FP4 has none: NaN encodes as code 0); kEmax: OCP MX emax_elem.
// kId: the element's code (enums.h).
struct E4M3 {
  static constexpr ElemId kId = kE4M3;
  static constexpr int kBits = 8, kEbits = 4, kMbits = 3, kBias = 7, kEmin = -6, kEmax = 8;
  static constexpr uint32_t kMaxCode = 0x7E, kNanCode = 0x7F, kInfCode = 0x7E;
  static constexpr bool kHasInf = false, kHasNan = true;
  static constexpr float kMax = 448.0f;
};

struct E5M2 {
  static constexpr ElemId kId = kE5M2;
  static constexpr int kBits = 8, kEbits = 5, kMbits = 2, kBias = 15, kEmin = -14, kEmax = 15;
  static constexpr uint32_t kMaxCode = 0x7B, kNanCode = 0x7F, kInfCode = 0x7C;
  static constexpr bool kHasInf = true, kHasNan = true;
  static constexpr float kMax = 57344.0f;
};

struct E2M1 {
  static constexpr ElemId kId = kE2M1;
  static constexpr int kBits = 4, kEbits = 2, kMbits = 1, kBias = 1, kEmin = 0, kEmax = 2;
  static constexpr uint32_t kMaxCode = 0x7, kNanCode = 0x0, kInfCode = 0x7;
  static constexpr bool kHasInf = false, kHasNan = false;
  static constexpr float kMax = 6.0f;
};

struct BF16 {
  static constexpr ElemId kId = kBF16;
  static constexpr int kBits = 16, kEbits = 8, kMbits = 7, kBias = 127, kEmin = -126, kEmax = 127;
  static constexpr uint32_t kMaxCode = 0x7F7F, kNanCode = 0x7FC0, kInfCode = 0x7F80;
  static constexpr bool kHasInf = true, kHasNan = true;
  static constexpr float kMax = 3.3895313892515355e38f;
};

struct FP16 {
  static constexpr ElemId kId = kFP16;
  static constexpr int kBits = 16, kEbits = 5, kMbits = 10, kBias = 15, kEmin = -14, kEmax = 15;
  static constexpr uint32_t kMaxCode = 0x7BFF, kNanCode = 0x7E00, kInfCode = 0x7C00;
  static constexpr bool kHasInf = true, kHasNan = true;
  static constexpr float kMax = 65504.0f;
};

// ------------------------------------------------------------------------------ rounding
// Round the fp32 value with bit pattern xb onto T's grid (satfinite) and return T's code, sign
// included. With kStochastic the value goes to the grid point away from zero iff
// frac > u = (r >> 8) * 2^-24; otherwise ties go to the even code. Branch-free, so loops over
// it vectorise.
//
// frac is compared through key = 2 * (top 24 bits of frac) + (any lower bit set): for a 24-bit
// threshold t, frac > t * 2^-24 iff key > 2t, and round-half-even is key > 2^24 - (lsb of lo).
template <class T, bool kStochastic>
LOWBIT_HD uint32_t round_code_bits(uint32_t xb, uint32_t r) {
  const uint32_t sign = xb >> 31;
  const uint32_t ab = xb & kF32AbsMask;
  const int32_t e = (int32_t)(ab >> 23);
  const uint32_t m = (ab & 0x7FFFFFu) | (e ? 0x800000u : 0u);
  // Binade of the grid spacing: the value's exponent, never below the element's smallest normal.
  const int32_t exp_c = imax32(e - 127, T::kEmin);
  // Bits of the 24-bit significand m below the grid spacing (>= 23 - kMbits >= 1).
  const int32_t s = (exp_c - T::kMbits) - (imax32(e, 1) - 150);
  const int32_t sc = imin32(s, 24);
  const uint32_t n = m >> sc;
  const uint32_t rem = m & ((1u << sc) - 1u);
  const int32_t rsh = imin32(imax32(s - 24, 0), 24);
  const uint32_t f24 = (rem << (24 - sc)) >> rsh;
  const uint32_t sticky = (rem & ((1u << rsh) - 1u)) != 0u ? 1u : 0u;
  const uint32_t key = 2u * f24 + sticky;
  const uint32_t thr = kStochastic ? 2u * (r >> 8) : (1u << 24) - (n & 1u);
  const uint32_t q = n + (key > thr ? 1u : 0u);
  uint32_t code = umin32(((uint32_t)(exp_c - T::kEmin) << T::kMbits) + q, T::kMaxCode);
  code = (T::kHasInf && ab == kF32Inf) ? T::kInfCode : code;
  code |= sign << (T::kBits - 1);
  return ab > kF32Inf ? T::kNanCode : code;
}

// Round-to-nearest-even with fewer operations than round_code_bits (same codes): the classic
// add-half-ulp carry on the fp32 bits, with the significand shifted further for values below the
// element's smallest normal. Integer only, so no compiler moves fp math under a branch.
template <class T>
LOWBIT_HD uint32_t round_code_rne(uint32_t xb) {
  constexpr int kShift = 23 - T::kMbits;
  const uint32_t sign = xb >> 31;
  const uint32_t ab = xb & kF32AbsMask;
  const uint32_t t = ab + ((1u << (kShift - 1)) - 1u) + ((ab >> kShift) & 1u);
  uint32_t code = (t >> kShift) - ((uint32_t)(127 - T::kBias) << T::kMbits);
  if (T::kEmin > -126) {
    const int32_t e = (int32_t)(ab >> 23);
    const uint32_t m = (ab & 0x7FFFFFu) | (e ? 0x800000u : 0u);
    // Bits below the subnormal grid spacing 2^(kEmin - kMbits); from 25 on everything rounds to 0.
    const int32_t s = imin32(imax32((T::kEmin - T::kMbits) - (imax32(e, 1) - 150), 1), 25);
    const uint32_t sub = (m + ((1u << (s - 1)) - 1u) + ((m >> s) & 1u)) >> s;
    code = ab < ((uint32_t)(T::kEmin + 127) << 23) ? sub : code;
  }
  code = umin32(code, T::kMaxCode);
  code = ab >= kF32Inf ? (T::kHasInf ? T::kInfCode : T::kMaxCode) : code;
  code |= sign << (T::kBits - 1);
  return ab > kF32Inf ? T::kNanCode : code;
}

template <class T>
LOWBIT_HD uint32_t round_nearest(float x) { return round_code_bits<T, false>(f32_bits(x), 0u); }

template <class T>
LOWBIT_HD uint32_t round_stochastic(float x, uint32_t r) { return round_code_bits<T, true>(f32_bits(x), r); }

// Runtime-dispatched form, for code that picks the element at run time.
LOWBIT_HD uint32_t round_code(ElemId elem, float x, bool stochastic, uint32_t r) {
  const uint32_t xb = f32_bits(x);
  switch (elem) {
    case kE4M3: return stochastic ? round_code_bits<E4M3, true>(xb, r) : round_code_bits<E4M3, false>(xb, r);
    case kE5M2: return stochastic ? round_code_bits<E5M2, true>(xb, r) : round_code_bits<E5M2, false>(xb, r);
    case kE2M1: return stochastic ? round_code_bits<E2M1, true>(xb, r) : round_code_bits<E2M1, false>(xb, r);
    case kBF16: return stochastic ? round_code_bits<BF16, true>(xb, r) : round_code_bits<BF16, false>(xb, r);
    default: return stochastic ? round_code_bits<FP16, true>(xb, r) : round_code_bits<FP16, false>(xb, r);
  }
}

// ------------------------------------------------------------------------------ decoding
// Code -> fp32. NaN codes keep their payload as torch's float8 -> float casts do
// (sign | quiet NaN | mantissa bits at the top); E4M3 has NaN only at 0x7F / 0xFF.
template <class T>
LOWBIT_HD float decode(uint32_t code) {
  constexpr uint32_t kMagMask = (1u << (T::kBits - 1)) - 1u;
  constexpr uint32_t kManMask = (1u << T::kMbits) - 1u;
  constexpr uint32_t kExpAll = (1u << T::kEbits) - 1u;
  const uint32_t sign = (code >> (T::kBits - 1)) & 1u;
  const uint32_t mag = code & kMagMask;
  const uint32_t ef = mag >> T::kMbits;
  const uint32_t mf = mag & kManMask;
  uint32_t bits;
  if (ef == 0) {
    bits = f32_bits((float)mf * pow2f(T::kEmin - T::kMbits));
  } else {
    bits = ((ef + (uint32_t)(127 - T::kBias)) << 23) | (mf << (23 - T::kMbits));
  }
  if (T::kId == kE4M3 && mag == 0x7Fu) bits = kF32CanonicalNaN | (mf << (23 - T::kMbits));
  if ((T::kId == kE5M2 || T::kId == kBF16 || T::kId == kFP16) && ef == kExpAll)
    bits = mf ? (kF32CanonicalNaN | (mf << (23 - T::kMbits))) : kF32Inf;
  return bits_f32(bits | (sign << 31));
}

// E2M1 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}, branch-free.
LOWBIT_HD float decode_e2m1(uint32_t code) { return decode<E2M1>(code & 0xFu); }

// ------------------------------------------------------------------------------ FP4 packing
// Element 2i in the low nibble, 2i+1 in the high nibble.
LOWBIT_HD uint8_t pack_fp4(uint32_t lo, uint32_t hi) { return (uint8_t)((lo & 0xFu) | ((hi & 0xFu) << 4)); }
LOWBIT_HD uint32_t unpack_fp4_lo(uint8_t b) { return b & 0xFu; }
LOWBIT_HD uint32_t unpack_fp4_hi(uint8_t b) { return b >> 4; }

// ------------------------------------------------------------------------------ block amax
// amax of a block as an fp32 bit pattern: integer max of |x| bits (exact; ordering of
// non-negative floats is that of their bits). A block holding NaN or Inf reads >= kF32Inf and
// is turned into the canonical NaN by amax_finalize.
LOWBIT_HD uint32_t amax_accumulate(uint32_t acc, float x) { return umax32(acc, f32_bits(x) & kF32AbsMask); }
LOWBIT_HD float amax_finalize(uint32_t acc) { return bits_f32(acc >= kF32Inf ? kF32CanonicalNaN : acc); }

// ------------------------------------------------------------------------------ scales
// mode: a ScaleMode (enums.h).
//
// FP8 fp32 scale d (x ~ q * d): amax / max, 1 when amax == 0, floored at 2^-126; NaN passes;
// optionally rounded to a power of two (floor: may saturate, rceil: nothing saturates).
LOWBIT_HD float fp8_scale(float amax, float max_elem, int mode) {
  float d = amax / max_elem;
  if (amax == 0.0f) d = 1.0f;
  if (d < 1.1754943508222875e-38f) d = 1.1754943508222875e-38f;
  if (mode != kScaleExact && !f32_is_nan(d)) {
    const uint32_t db = f32_bits(d);
    d = pow2f(mode == kScaleRceil ? ceil_log2_bits(db) : floor_log2_bits(db));
  }
  return d;
}

// Unbiased E8M0 exponent of an MX block (OCP MX v1.0): floor(log2(amax)) - emax_elem, or
// ceil(log2(amax / max_elem)) for rceil; clamped to [-127, 127]; zero block -127; NaN 128.
LOWBIT_HD int32_t mx_scale_exponent(float amax, int emax_elem, float max_elem, int mode) {
  if (f32_is_nan(amax)) return 128;
  if (amax == 0.0f) return -127;
  int32_t e;
  if (mode == kScaleRceil) {
    const float ratio = amax / max_elem;
    e = ratio == 0.0f ? -127 : ceil_log2_bits(f32_bits(ratio));
  } else {
    e = floor_log2_bits(f32_bits(amax)) - emax_elem;
  }
  return imin32(imax32(e, -127), 127);
}

template <class T>
LOWBIT_HD uint8_t mx_scale_byte(float amax, int mode) {
  return (uint8_t)(mx_scale_exponent(amax, T::kEmax, T::kMax, mode) + 127);
}

// E8M0 byte -> 2^(b - 127) as fp32; 0xFF is NaN.
LOWBIT_HD float e8m0_decode(uint32_t b) {
  return b == 0xFFu ? bits_f32(kF32CanonicalNaN) : pow2f((int32_t)b - 127);
}

// 2^-e for the E8M0 byte b = e + 127: the factor MX elements are multiplied by; NaN for 0xFF.
LOWBIT_HD float e8m0_inverse(uint32_t b) {
  return b == 0xFFu ? bits_f32(kF32CanonicalNaN) : pow2f(127 - (int32_t)b);
}

constexpr float kNvfp4Enc = 2688.0f;  // 448 * 6

// NVFP4 per-tensor encode scale s_enc = 2688 / amax; 1 when amax == 0; at most FLT_MAX.
LOWBIT_HD float nvfp4_global_scale(float amax) {
  float s = kNvfp4Enc / amax;
  if (amax == 0.0f) s = 1.0f;
  if (f32_is_inf(s)) s = bits_f32(kF32Max);
  return s;
}

// NVFP4 per-block E4M3 scale code: e4m3_rne(clamp(amax / 6 * s_enc, 2^-6, 448)); NaN -> 0x7F.
LOWBIT_HD uint32_t nvfp4_block_scale_code(float amax_blk, float s_enc) {
  float t = amax_blk / 6.0f * s_enc;
  if (!f32_is_nan(t)) {
    t = t < 0.015625f ? 0.015625f : t;
    t = t > 448.0f ? 448.0f : t;
  }
  return round_code_rne<E4M3>(f32_bits(t));
}

}  // namespace lowbit
