// Saturating cast of fp32 to E4M3 / E5M2 / bf16 / fp16 on CPU with nearest-even or stochastic
// rounding (ref.cast); the random word of element i is r(seed, i), i the flat index, so the
// chunking over OpenMP threads never changes a bit.
#include "common.h"
#include "lowbit/codes.h"
#include "simd.h"

namespace lowbit {
namespace cpu {
namespace {

template <class T, bool SR, class Out>
void cast_typed(const float* x, int64_t n, uint64_t seed, Out* out) {
  constexpr int64_t kChunk = 16384;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel
  {
    std::vector<uint32_t> scratch;
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t i0 = ch * kChunk;
      const int64_t m = n - i0 < kChunk ? n - i0 : kChunk;
      const float* __restrict xc = x + i0;
      Out* __restrict oc = out + i0;
      if (SR) {
        const uint32_t* __restrict rb = contiguous_bits(seed, (uint64_t)i0, m, scratch);
        for (int64_t k = 0; k < m; ++k) oc[k] = (Out)encode<T, true>(xc[k], rb[k]);
      } else {
        for (int64_t k = 0; k < m; ++k) oc[k] = (Out)encode<T, false>(xc[k], 0u);
      }
    }
  }
}

template <class T, class Out>
void cast_rounding(bool sr, const float* x, int64_t n, uint64_t seed, Out* out) {
  if (sr) cast_typed<T, true, Out>(x, n, seed, out);
  else cast_typed<T, false, Out>(x, n, seed, out);
}

}  // namespace

at::Tensor cast(const at::Tensor& x_in, int64_t elem_code, int64_t rounding, int64_t seed) {
  TORCH_CHECK(x_in.device().is_cpu(), "cast: expected a CPU tensor, got one on ", x_in.device());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "cast: expected float32 input, got ", x_in.scalar_type());
  const ElemId elem = check_cast_elem(elem_code);
  const bool stochastic = check_rounding(rounding);
  const auto dtype = elem == kE4M3 ? at::kFloat8_e4m3fn
                     : elem == kE5M2 ? at::kFloat8_e5m2
                     : elem == kBF16 ? at::kBFloat16 : at::kHalf;
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(dtype));
  const int64_t n = x.numel();
  if (n == 0) return out;
  const float* xp = x.data_ptr<float>();
  void* op = out.data_ptr();
  const uint64_t key = (uint64_t)seed;  // the 64 bits of the Philox key (enums.h)
  switch (elem) {
    case kE4M3: cast_rounding<lowbit::E4M3>(stochastic, xp, n, key, static_cast<uint8_t*>(op)); break;
    case kE5M2: cast_rounding<lowbit::E5M2>(stochastic, xp, n, key, static_cast<uint8_t*>(op)); break;
    case kBF16: cast_rounding<lowbit::BF16>(stochastic, xp, n, key, static_cast<uint16_t*>(op)); break;
    default: cast_rounding<lowbit::FP16>(stochastic, xp, n, key, static_cast<uint16_t*>(op)); break;
  }
  return out;
}

}  // namespace cpu
}  // namespace lowbit
