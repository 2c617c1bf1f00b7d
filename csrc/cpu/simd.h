// 8-lane (AVX2) pieces shared by the CPU kernels that encode fp32 values: Philox words for a run of
// flat indices, and round-to-nearest-even / stochastic rounding of 8 lanes onto an element grid,
// code for code the scalar rules of lowbit/formats.h. Internal to lowbit._C.
#pragma once

#include <cstdint>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "lowbit/formats.h"
#include "lowbit/rng.h"

namespace lowbit {
namespace cpu {

#ifdef __AVX2__
// 32-bit high and low halves of m * c in each of 8 lanes (_mm256_mul_epu32 multiplies the even lanes).
inline void mulhilo8(__m256i m, __m256i c, __m256i& hi, __m256i& lo) {
  const __m256i pe = _mm256_mul_epu32(c, m);
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
}

// random_bits4 for the 8 counters q .. q + 7, one per lane: the 32 words r(seed, 4q ..), in order.
inline void philox8_avx2(uint64_t seed, uint64_t q, uint32_t* out) {
  alignas(32) uint32_t lo[8], hi[8];
  for (int l = 0; l < 8; ++l) {  // the counter's high word can step inside the vector
    lo[l] = (uint32_t)(q + (uint64_t)l);
    hi[l] = (uint32_t)((q + (uint64_t)l) >> 32);
  }
  __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
  __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  const __m256i m0 = _mm256_set1_epi32((int)kPhiloxM0), m1 = _mm256_set1_epi32((int)kPhiloxM1);
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(m0, c0, hi0, lo0);
    mulhilo8(m1, c2, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32((int)k0));
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32((int)k1));
    c1 = lo1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  // 4 x 8 transpose: lane l's words go to out[4l .. 4l + 3].
  const __m256i a = _mm256_unpacklo_epi32(c0, c1), b = _mm256_unpackhi_epi32(c0, c1);
  const __m256i c = _mm256_unpacklo_epi32(c2, c3), d = _mm256_unpackhi_epi32(c2, c3);
  const __m256i e = _mm256_unpacklo_epi64(a, c), f = _mm256_unpackhi_epi64(a, c);  // lanes 0|4, 1|5
  const __m256i g = _mm256_unpacklo_epi64(b, d), h = _mm256_unpackhi_epi64(b, d);  // lanes 2|6, 3|7
  __m256i* o = reinterpret_cast<__m256i*>(out);
  _mm256_storeu_si256(o + 0, _mm256_permute2x128_si256(e, f, 0x20));
  _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(g, h, 0x20));
  _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(e, f, 0x31));
  _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(g, h, 0x31));
}
#endif

// Philox words r(seed, i) for i in [base, base + n), contiguous. Returns a pointer into scratch.
inline const uint32_t* contiguous_bits(uint64_t seed, uint64_t base, int64_t n, std::vector<uint32_t>& scratch) {
  const uint64_t q0 = base >> 2;
  const int64_t n4 = (int64_t)(((base + (uint64_t)n + 3) >> 2) - q0);
  scratch.resize((size_t)(4 * n4));
  uint32_t* out = scratch.data();
  int64_t j = 0;
#ifdef __AVX2__
  for (; j + 8 <= n4; j += 8) philox8_avx2(seed, q0 + (uint64_t)j, out + 4 * j);
#endif
  for (; j < n4; ++j) {
    const Philox4 p = random_bits4(seed, q0 + (uint64_t)j);
    out[4 * j + 0] = p.w[0];
    out[4 * j + 1] = p.w[1];
    out[4 * j + 2] = p.w[2];
    out[4 * j + 3] = p.w[3];
  }
  return out + (base - 4 * q0);
}

#ifdef __AVX2__
// The end of both 8-lane encoders: saturate, Inf, sign bit, canonical NaN (xb: input bits, ab: |xb|).
template <class T>
inline __m256i finish_code_avx2(__m256i code, __m256i xb, __m256i ab) {
  code = _mm256_min_epu32(code, _mm256_set1_epi32((int)T::kMaxCode));
  if (T::kHasInf) {
    const __m256i inf = _mm256_cmpeq_epi32(ab, _mm256_set1_epi32((int)kF32Inf));
    code = _mm256_blendv_epi8(code, _mm256_set1_epi32((int)T::kInfCode), inf);
  }
  code = _mm256_or_si256(code, _mm256_slli_epi32(_mm256_srli_epi32(xb, 31), T::kBits - 1));
  const __m256i nan = _mm256_cmpgt_epi32(ab, _mm256_set1_epi32((int)kF32Inf));
  return _mm256_blendv_epi8(code, _mm256_set1_epi32((int)T::kNanCode), nan);
}

// Round-to-nearest-even of 8 lanes onto T's grid (T = E4M3, E5M2, E2M1): the same codes as
// round_code_rne, written with intrinsics because the compiler will not vectorise the fp32 form
// of the subnormal rounding (|v| * 2^(kMbits - kEmin) + 2^23) under -ftrapping-math.
template <class T>
inline __m256i rne_avx2(__m256 v) {
  constexpr int kShift = 23 - T::kMbits;
  const __m256i xb = _mm256_castps_si256(v);
  const __m256i ab = _mm256_and_si256(xb, _mm256_set1_epi32(0x7FFFFFFF));
  __m256i t = _mm256_add_epi32(ab, _mm256_set1_epi32((1 << (kShift - 1)) - 1));
  t = _mm256_add_epi32(t, _mm256_and_si256(_mm256_srli_epi32(ab, kShift), _mm256_set1_epi32(1)));
  __m256i code = _mm256_sub_epi32(_mm256_srli_epi32(t, kShift), _mm256_set1_epi32((127 - T::kBias) << T::kMbits));
  const __m256 f = _mm256_add_ps(_mm256_mul_ps(_mm256_castsi256_ps(ab), _mm256_set1_ps(pow2f(T::kMbits - T::kEmin))),
                                 _mm256_set1_ps(8388608.0f));
  const __m256i sub = _mm256_sub_epi32(_mm256_castps_si256(f), _mm256_set1_epi32(0x4B000000));
  const __m256i below = _mm256_cmpgt_epi32(_mm256_set1_epi32((T::kEmin + 127) << 23), ab);
  code = _mm256_blendv_epi8(code, sub, below);
  return finish_code_avx2<T>(code, xb, ab);
}

// Stochastic rounding of 8 lanes with random words r: round_code_bits<T, true> lane for lane
// (every shift count stays below 32, so the AVX2 variable shifts agree with the scalar ones).
template <class T>
inline __m256i sr_avx2(__m256 v, __m256i r) {
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i xb = _mm256_castps_si256(v);
  const __m256i ab = _mm256_and_si256(xb, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i e = _mm256_srli_epi32(ab, 23);
  const __m256i normal = _mm256_cmpgt_epi32(e, _mm256_setzero_si256());
  const __m256i m = _mm256_or_si256(_mm256_and_si256(ab, _mm256_set1_epi32(0x7FFFFF)),
                                    _mm256_and_si256(normal, _mm256_set1_epi32(0x800000)));
  const __m256i exp_c = _mm256_max_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(127)), _mm256_set1_epi32(T::kEmin));
  const __m256i s = _mm256_sub_epi32(_mm256_sub_epi32(exp_c, _mm256_set1_epi32(T::kMbits)),
                                     _mm256_sub_epi32(_mm256_max_epi32(e, one), _mm256_set1_epi32(150)));
  const __m256i sc = _mm256_min_epi32(s, _mm256_set1_epi32(24));
  const __m256i n = _mm256_srlv_epi32(m, sc);
  const __m256i rem = _mm256_and_si256(m, _mm256_sub_epi32(_mm256_sllv_epi32(one, sc), one));
  const __m256i rsh = _mm256_min_epi32(_mm256_max_epi32(_mm256_sub_epi32(s, _mm256_set1_epi32(24)), _mm256_setzero_si256()),
                                       _mm256_set1_epi32(24));
  const __m256i f24 = _mm256_srlv_epi32(_mm256_sllv_epi32(rem, _mm256_sub_epi32(_mm256_set1_epi32(24), sc)), rsh);
  const __m256i lost = _mm256_and_si256(rem, _mm256_sub_epi32(_mm256_sllv_epi32(one, rsh), one));
  const __m256i sticky = _mm256_andnot_si256(_mm256_cmpeq_epi32(lost, _mm256_setzero_si256()), one);
  const __m256i key = _mm256_add_epi32(_mm256_add_epi32(f24, f24), sticky);
  const __m256i thr = _mm256_slli_epi32(_mm256_srli_epi32(r, 8), 1);
  // key and thr stay below 2^31, so the signed compare is the unsigned one
  const __m256i q = _mm256_sub_epi32(n, _mm256_cmpgt_epi32(key, thr));
  __m256i code = _mm256_add_epi32(_mm256_slli_epi32(_mm256_sub_epi32(exp_c, _mm256_set1_epi32(T::kEmin)), T::kMbits), q);
  return finish_code_avx2<T>(code, xb, ab);
}

inline void store_codes8(__m256i c, uint8_t* out) {
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(w, w));
}
#endif

}  // namespace cpu
}  // namespace lowbit
