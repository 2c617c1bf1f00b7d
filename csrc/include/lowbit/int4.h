// INT4 as lowbit/formats.py defines it, shared by the CPU and CUDA extensions: the layout of a group's
// record and the decode of one element. Plain fp32 operations with nothing to contract into a fused
// multiply-add, and IEEE division in both compilers (no fast-math flags), so both give ref's bits.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LOWBIT_HOST_DEVICE __host__ __device__
#else
#define LOWBIT_HOST_DEVICE
#endif

namespace lowbit {

constexpr int kInt4TopK = 2;  // formats.INT4_TOPK: activation values kept exactly per group

// Floats in a group's record: weights (scale, zero point); activations (scale, the kept values,
// their positions in the group).
LOWBIT_HOST_DEVICE constexpr int int4_record_floats(bool weight) { return weight ? 2 : 1 + 2 * kInt4TopK; }

// Element j of a group of g from its 4-bit code and the group's record: (q - z) * s for weights,
// q * s / 7 for activations (q two's complement), or the kept value where the record puts one at j
// (the later one wins, as ref writes them in order; a position outside the group is ignored).
LOWBIT_HOST_DEVICE inline float int4_decode(int nib, const float* rc, int64_t j, int64_t g, bool weight) {
  if (weight) return ((float)nib - rc[1]) * rc[0];
  float v = ((float)(nib >= 8 ? nib - 16 : nib) * rc[0]) / 7.0f;
  for (int p = 0; p < kInt4TopK; ++p) {
    const float pos = rc[1 + kInt4TopK + p];
    if (pos >= 0.0f && pos < (float)g && (int64_t)pos == j) v = rc[1 + p];
  }
  return v;
}

}  // namespace lowbit
