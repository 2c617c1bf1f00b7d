// The random Hadamard transform's per-thread pieces, shared by hadamard.cu and the fused
// transform of quantize.cu so both evaluate exactly the same fp32 operations as ref.hadamard:
// signs, butterfly stages h = 1, 2, 4, ... (lower index a + c, upper index a - c), then the
// multiply by fp32(1/sqrt(B)). A thread holds E consecutive values of a transform block.
#pragma once

#include <cmath>

#include "common.cuh"

namespace lowbit {
namespace cuda {

// v[e] *= s_(j0 + e); bit j of `signs` set means s_j = -1.
template <int E>
__device__ __forceinline__ void fwht_signs(float (&v)[E], const uint32_t* __restrict__ signs, int j0) {
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int j = j0 + e;
    const bool neg = (signs[j >> 5] >> (j & 31)) & 1u;
    v[e] = mul_rn(v[e], neg ? -1.0f : 1.0f);
  }
}

// Stages h = 1 .. E / 2: both values of every butterfly are in this thread.
template <int E>
__device__ __forceinline__ void fwht_thread_stages(float (&v)[E]) {
#pragma unroll
  for (int h = 1; h < E; h <<= 1) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      if ((e & h) == 0) {
        const float a = v[e], c = v[e + h];
        v[e] = add_rn(a, c);
        v[e + h] = sub_rn(a, c);
      }
    }
  }
}

// Stages h = E .. min(B, 32 E) / 2: the partner value is in lane ^ (h / E) of the same warp; t is
// the thread's position in its transform block (consecutive lanes hold consecutive positions).
// Every lane of the warp must call this.
template <int E>
__device__ __forceinline__ void fwht_warp_stages(float (&v)[E], int t, int B) {
  for (int h = E; h < B && h < 32 * E; h <<= 1) {
    const int lm = h / E;
    const bool upper = (t & lm) != 0;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const float o = __shfl_xor_sync(0xffffffffu, v[e], lm);
      v[e] = upper ? sub_rn(o, v[e]) : add_rn(v[e], o);
    }
  }
}

template <int E>
__device__ __forceinline__ void fwht_scale(float (&v)[E], float norm) {
#pragma unroll
  for (int e = 0; e < E; ++e) v[e] = mul_rn(v[e], norm);
}

// fp32(1/sqrt(B)), rounded from the double quotient exactly as ref.hadamard_norm does.
inline float fwht_norm(int B) { return (float)(1.0 / std::sqrt((double)B)); }

}  // namespace cuda
}  // namespace lowbit
