// Shared pieces of the CPU kernels (internal to lowbit._C).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "lowbit/formats.h"

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace lowbit {
namespace cpu {

// fp16 bits -> fp32 bits without touching denormal arithmetic (so FTZ/DAZ cannot change it).
inline uint32_t fp16_to_f32_bits(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;
  const uint32_t normal = (em << 13) + ((uint32_t)(127 - 15) << 23);
  const uint32_t sub = f32_bits((float)em * 5.9604644775390625e-08f);  // em * 2^-24
  const uint32_t special = 0x7F800000u | ((em & 0x3FFu) << 13);
  const uint32_t mag = em >= 0x7C00u ? special : (em < 0x400u ? sub : normal);
  return sign | mag;
}

template <class In>
inline float load_f32(In v);
template <>
inline float load_f32<float>(float v) { return v; }
template <>
inline float load_f32<c10::BFloat16>(c10::BFloat16 v) { return bits_f32((uint32_t)v.x << 16); }
template <>
inline float load_f32<c10::Half>(c10::Half v) { return bits_f32(fp16_to_f32_bits(v.x)); }

template <class In>
inline void load_row(const In* src, float* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = load_f32<In>(src[k]);
}

#ifdef __AVX2__
template <>
inline void load_row<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k));
    _mm256_storeu_ps(dst + k, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
  for (; k < n; ++k) dst[k] = load_f32<c10::BFloat16>(src[k]);
}
#endif

#ifdef __F16C__
// The hardware conversion is exact (subnormals included) and keeps NaN payloads like the scalar one.
template <>
inline void load_row<c10::Half>(const c10::Half* src, float* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
  for (; k < n; ++k) dst[k] = load_f32<c10::Half>(src[k]);
}
#endif

// The code of the fp32 value v on T's grid (satfinite): nearest-even, or stochastic with word r.
template <class T, bool SR>
inline uint32_t encode(float v, uint32_t r) {
  return SR ? round_code_bits<T, true>(f32_bits(v), r) : round_code_rne<T>(f32_bits(v));
}

// Random Hadamard transform pieces (hadamard.cpp).
constexpr int64_t kHadamardSegment = 2048;
// Signs s_j of the Philox key `seed` (all +1 without signs), repeated with period `block` to the
// length hadamard_row reads for rows of length K: max(block, min(K, kHadamardSegment)).
std::vector<float> hadamard_signs(int64_t block, bool with_signs, uint64_t seed, int64_t K);
float hadamard_norm(int64_t block);
// In-place transform of every 1 x block slice of a fp32 row of length K.
void hadamard_row(float* y, int64_t K, int64_t block, const float* signs, float norm, bool inverse);
void check_hadamard_block(int64_t block, int64_t K);

// The ops lowbit._C exposes (module.cpp); argument conventions in lowbit/enums.h.
at::Tensor hadamard(const at::Tensor& x, int64_t block, const c10::optional<int64_t>& seed, bool inverse);
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const at::Tensor& x, int64_t kind, int64_t elem, int64_t br,
                                                        int64_t bk, int64_t rounding, int64_t seed, int64_t scale_mode,
                                                        const c10::optional<at::Tensor>& global_amax,
                                                        int64_t hadamard_block, int64_t inner);
at::Tensor dequantize(const at::Tensor& data, const at::Tensor& scale, const at::Tensor& global_scale, int64_t kind,
                      int64_t elem, int64_t br, int64_t bk, int64_t K, int64_t out_dtype);
at::Tensor cast(const at::Tensor& x, int64_t elem, int64_t rounding, int64_t seed);

}  // namespace cpu
}  // namespace lowbit
