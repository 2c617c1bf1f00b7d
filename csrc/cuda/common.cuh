// Pieces every lowbit CUDA kernel shares: IEEE fp32 operations with one rounding each, input
// loads for fp32 / bf16 / fp16, vector packs, the element-index rule of ref.py, launch sizes.
// The element formats, scale rules and Philox bits come from csrc/include/lowbit/{formats,rng}.h.
#pragma once

#include <stdint.h>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <lowbit/formats.h>
#include <lowbit/rng.h>

#include "launch.h"

namespace lowbit {
namespace cuda {

constexpr int kThreads = 256;

// fp32 arithmetic exactly as ref.py evaluates it: each a single correctly rounded operation
// (never contracted into an FMA, never approximated).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }

// FP8 scale, MX exponent, NVFP4 scales with the divisions and products forced to single
// IEEE operations (formats.h states the rules; these are the same expressions).
__device__ __forceinline__ float fp8_scale_rn(float amax, float max_elem, int mode) {
  float d = div_rn(amax, max_elem);
  if (amax == 0.0f) d = 1.0f;
  if (d < 1.1754943508222875e-38f) d = 1.1754943508222875e-38f;  // NaN passes
  if (mode != kScaleExact && !f32_is_nan(d)) {
    const uint32_t db = f32_bits(d);
    d = pow2f(mode == kScaleRceil ? ceil_log2_bits(db) : floor_log2_bits(db));
  }
  return d;
}

__device__ __forceinline__ int32_t mx_exponent_rn(float amax, int emax_elem, float max_elem, int mode) {
  if (f32_is_nan(amax)) return 128;
  if (amax == 0.0f) return -127;
  int32_t e;
  if (mode == kScaleRceil) {
    const float ratio = div_rn(amax, max_elem);
    e = ratio == 0.0f ? -127 : ceil_log2_bits(f32_bits(ratio));
  } else {
    e = floor_log2_bits(f32_bits(amax)) - emax_elem;
  }
  return imin32(imax32(e, -127), 127);
}

__device__ __forceinline__ float nvfp4_global_scale_rn(float amax) {
  float s = div_rn(kNvfp4Enc, amax);
  if (amax == 0.0f) s = 1.0f;
  if (f32_is_inf(s)) s = bits_f32(kF32Max);
  return s;
}

__device__ __forceinline__ uint32_t nvfp4_block_scale_code_rn(float amax_blk, float s_enc) {
  float t = mul_rn(div_rn(amax_blk, 6.0f), s_enc);
  if (!f32_is_nan(t)) {
    t = t < 0.015625f ? 0.015625f : t;
    t = t > 448.0f ? 448.0f : t;
  }
  return round_code_bits<E4M3, false>(f32_bits(t), 0u);
}

// Two fp32 values rounded to nearest-even E2M1 (satfinite) and packed into one byte, `lo` in the
// low nibble. On sm_100a and newer, finite values go through the hardware conversion
// cvt.rn.satfinite.e2m1x2.f32, which rounds them exactly as the spec does; NaN and Inf (where
// the spec wants code 0 and +-6) and every older GPU take the integer path of formats.h.
__device__ __forceinline__ uint32_t e2m1x2_rn(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1000 && \
    (defined(__CUDA_ARCH_SPECIFIC__) || defined(__CUDA_ARCH_FAMILY_SPECIFIC__))
  uint32_t packed;
  asm("{\n"
      ".reg .b8 pair;\n"
      "cvt.rn.satfinite.e2m1x2.f32 pair, %2, %1;\n"
      "mov.b32 %0, {pair, pair, pair, pair};\n"
      "}"
      : "=r"(packed)
      : "f"(lo), "f"(hi));
  packed &= 0xFFu;
  const uint32_t lb = f32_bits(lo), hb = f32_bits(hi);
  if ((lb & kF32Inf) == kF32Inf) packed = (packed & 0xF0u) | round_code_bits<E2M1, false>(lb, 0u);
  if ((hb & kF32Inf) == kF32Inf) packed = (packed & 0x0Fu) | (round_code_bits<E2M1, false>(hb, 0u) << 4);
  return packed;
#else
  return pack_fp4(round_code_bits<E2M1, false>(f32_bits(lo), 0u), round_code_bits<E2M1, false>(f32_bits(hi), 0u));
#endif
}

// Input element types (InType of launch.h), as the raw storage a kernel reads.
template <int IN>
struct InTraits {
  using Storage = float;
};
template <>
struct InTraits<kInBF16> {
  using Storage = uint16_t;
};
template <>
struct InTraits<kInF16> {
  using Storage = uint16_t;
};

template <int IN>
__device__ __forceinline__ float to_f32(typename InTraits<IN>::Storage v);
template <>
__device__ __forceinline__ float to_f32<kInF32>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<kInBF16>(uint16_t v) { return __uint_as_float((uint32_t)v << 16); }
template <>
__device__ __forceinline__ float to_f32<kInF16>(uint16_t v) { return __half2float(__ushort_as_half(v)); }

// V consecutive elements, loaded / stored as aligned vectors of at most 16 bytes.
template <typename S, int V>
struct alignas(sizeof(S) * V > 16 ? 16 : sizeof(S) * V) Pack {
  S v[V];
};

template <int IN, int V>
__device__ __forceinline__ void load_f32(const typename InTraits<IN>::Storage* p, float (&out)[V]) {
  using S = typename InTraits<IN>::Storage;
  const Pack<S, V> pk = *reinterpret_cast<const Pack<S, V>*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = to_f32<IN>(pk.v[j]);
}

// Flat index, in the caller's tensor, of element (r, k) of the [R, K] working view
// (ref.element_index): inner = product of the caller's dims after the quantization axis.
__device__ __forceinline__ uint64_t element_index(int64_t r, int64_t k, int64_t K, int64_t inner) {
  return (uint64_t)((r / inner) * K * inner + k * inner + (r % inner));
}

// Rounding bits r(seed, i) for V elements; neighbouring indices share one Philox call per 4.
template <int V>
__device__ __forceinline__ void rounding_bits(uint64_t seed, const uint64_t (&idx)[V], uint32_t (&out)[V]) {
  uint64_t cached_q = ~(uint64_t)0;
  Philox4 p{};
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const uint64_t q = idx[j] >> 2;
    if (q != cached_q) {
      p = random_bits4(seed, q);
      cached_q = q;
    }
    const uint32_t lane = (uint32_t)(idx[j] & 3u);
    out[j] = lane == 0 ? p.w[0] : lane == 1 ? p.w[1] : lane == 2 ? p.w[2] : p.w[3];
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Outcome of the launches just made (what the launch_* functions return).
inline cudaError_t launch_status() { return cudaGetLastError(); }

// Blocks for a grid-stride loop over `work` items, `per_block` per block and round.
inline unsigned grid_for(int64_t work, int64_t per_block = kThreads) {
  const int64_t g = ceil_div(work, per_block);
  return (unsigned)(g < 1 ? 1 : (g > (1 << 20) ? (1 << 20) : g));
}

}  // namespace cuda
}  // namespace lowbit
