// The elementwise Stable-SPAM step of lowbit/optim/kernels.py (its spec), shared by the CPU kernels that
// run it: optim.cpp (fp32 moments) and optim_lowprec.cpp (bf16 / fp8 / int8 moments, decoded per block).
// Every fp32 operation is rounded on its own (the build uses -ffp-contract=off); sqrt and division are
// IEEE correctly rounded, scalar and vectorised alike.
#pragma once

#include <cmath>
#include <cstdint>

namespace lowbit::cpu::optim {

constexpr int kScalarCount = 14;  // lowbit.optim.kernels.SCALARS

// The per-tensor scalars, in the order of lowbit.optim.kernels.SCALARS, as fp32. `skip`: the tensor
// is left untouched (its gradient held NaN / Inf), its gradient not even read.
struct Scalars {
  bool clip, zero, skip;
  float mh, r, f, b1, omb1, b2, omb2, inv_sbc2, eps, decay, step;
};

// One row of 14 fp64 values (each fp32-exact) -> Scalars.
inline Scalars scalars_from_row(const double* row) {
  return {row[0] != 0.0, row[12] != 0.0, row[13] != 0.0, static_cast<float>(row[1]), static_cast<float>(row[2]),
          static_cast<float>(row[3]), static_cast<float>(row[4]), static_cast<float>(row[5]),
          static_cast<float>(row[6]), static_cast<float>(row[7]), static_cast<float>(row[8]),
          static_cast<float>(row[9]), static_cast<float>(row[10]), static_cast<float>(row[11])};
}

template <bool kClip, bool kZero>
inline void adam_range(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
                       int64_t n, const Scalars& s) {
  for (int64_t i = 0; i < n; ++i) {
    float x = g[i];
    if (kClip) x = std::fabs(x) > s.mh ? x * s.r : x;
    x = x * s.f;
    float mm = kZero ? 0.f : m[i];
    float vv = kZero ? 0.f : v[i];
    mm = mm * s.b1 + x * s.omb1;
    vv = vv * s.b2 + (x * x) * s.omb2;
    const float u = mm / (std::sqrt(vv) * s.inv_sbc2 + s.eps);
    p[i] = p[i] * s.decay - u * s.step;
    m[i] = mm;
    v[i] = vv;
  }
}

// The step over n elements with the variant the scalars select; nothing at all where skip is set.
inline void adam_step_range(float* p, const float* g, float* m, float* v, int64_t n, const Scalars& s) {
  if (s.skip) return;
  if (s.clip)
    s.zero ? adam_range<true, true>(p, g, m, v, n, s) : adam_range<true, false>(p, g, m, v, n, s);
  else
    s.zero ? adam_range<false, true>(p, g, m, v, n, s) : adam_range<false, false>(p, g, m, v, n, s);
}

}  // namespace lowbit::cpu::optim
