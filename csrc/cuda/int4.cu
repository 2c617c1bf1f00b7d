// INT4 (Stable-SPAM's formats) on CUDA, bit for bit lowbit/backends/ref/int4.py (rules: ref/__init__.py,
// "INT4"). One warp per 1 x g group: lanes stride over the group, min / max / top-2 are warp
// reductions (top-2 ties go to the lowest position, as the spec says), and every fp32 step is one
// _rn intrinsic, never contracted into an FMA nor flushed to zero. The ops take lowbit._C's
// argument lists (csrc/cpu/int4.cpp) and register themselves into lowbit._C_cuda (lowbit/registry.h).
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>
#include <cstdint>

#include "common.cuh"
#include "lowbit/int4.h"
#include "lowbit/registry.h"

namespace lowbit {
namespace cuda {
namespace int4 {
namespace {

constexpr int kWarps = 8;  // groups per block
constexpr int kTopK = kInt4TopK;
constexpr uint32_t kNanBits = 0x7FC00000u;
constexpr uint32_t kFull = 0xFFFFFFFFu;

// round(v) of the spec: |v| to the integer grid (ties to even, or up iff frac > u), then v's sign.
__device__ __forceinline__ float round_int(float v, bool sr, uint32_t r) {
  const float a = fabsf(v);
  const float n = floorf(a);
  const float frac = __fsub_rn(a, n);
  const bool odd = __fsub_rn(n, __fmul_rn(2.0f, floorf(__fmul_rn(n, 0.5f)))) == 1.0f;
  const bool up = sr ? frac > uniform_from_bits(r) : (frac > 0.5f || (frac == 0.5f && odd));
  const float m = __fadd_rn(n, up ? 1.0f : 0.0f);
  return v < 0.0f ? -m : m;
}

__device__ __forceinline__ float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// The larger |x| wins; equal |x|, the lower position (the spec's tie rule).
__device__ __forceinline__ void warp_best(float& a, int& j) {
  for (int o = 16; o; o >>= 1) {
    const float oa = __shfl_xor_sync(kFull, a, o);
    const int oj = __shfl_xor_sync(kFull, j, o);
    if (oa > a || (oa == a && oj < j)) a = oa, j = oj;
  }
}

template <int IN, bool WEIGHT>
__global__ void quantize_kernel(const typename InTraits<IN>::Storage* __restrict__ x, int64_t n_groups, int64_t G,
                                int64_t K, int64_t g, bool sr, uint64_t seed, int64_t inner, bool pack,
                                uint8_t* __restrict__ codes, float* __restrict__ rec) {
  const int lane = threadIdx.x & 31;
  for (int64_t grp = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32; grp < n_groups; grp += (int64_t)gridDim.x * kWarps) {
    const int64_t r = grp / G, c = grp % G;
    const auto* xg = x + r * K + c * g;
    bool bad = false;
    float mx = -INFINITY, mn = INFINITY, best = -1.0f;
    int at = INT_MAX;
    for (int64_t j = lane; j < g; j += 32) {
      const float v = to_f32<IN>(xg[j]);
      bad |= !isfinite(v);
      mx = fmaxf(mx, v);
      mn = fminf(mn, v);
      if (fabsf(v) > best) best = fabsf(v), at = (int)j;  // j ascends: the first of equals stays
    }
    bad = __any_sync(kFull, bad);
    float* rc = rec + grp * (WEIGHT ? 2 : 1 + 2 * kTopK);
    float s = 0.0f, z = 0.0f, t = 0.0f;
    int i0 = -1, i1 = -1;
    if (!bad && WEIGHT) {
      for (int o = 16; o; o >>= 1) {
        mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, o));
        mn = fminf(mn, __shfl_xor_sync(kFull, mn, o));
      }
      float d = __fsub_rn(mx, mn);
      d = d < 1e-5f ? 1e-5f : d;
      s = __fdiv_rn(d, 15.0f);
      z = clampf(-round_int(__fdiv_rn(mn, s), false, 0u), 0.0f, 15.0f);
      z = z == 0.0f ? 0.0f : z;  // +0, never -0
    } else if (!bad) {
      warp_best(best, at);
      i0 = at;
      best = -1.0f, at = INT_MAX;
      for (int64_t j = lane; j < g; j += 32) {
        const float a = fabsf(to_f32<IN>(xg[j]));
        if (j != i0 && a > best) best = a, at = (int)j;
      }
      warp_best(best, at);
      i1 = at;
      for (int64_t j = lane; j < g; j += 32)
        if (j != i0 && j != i1) s = fmaxf(s, fabsf(to_f32<IN>(xg[j])));
      for (int o = 16; o; o >>= 1) s = fmaxf(s, __shfl_xor_sync(kFull, s, o));
      s = s < 1e-6f ? 1e-6f : s;
      t = __fmul_rn(__fdiv_rn(1.0f, s), 7.0f);
    }
    auto code = [&](int64_t j) -> uint32_t {
      if (bad) return 0u;
      const float v = to_f32<IN>(xg[j]);
      const uint32_t bits = sr ? random_bits(seed, element_index(r, c * g + j, K, inner)) : 0u;
      if (WEIGHT) return (uint32_t)clampf(__fadd_rn(round_int(__fdiv_rn(v, s), sr, bits), z), 0.0f, 15.0f);
      const float y = (j == i0 || j == i1) ? 0.0f : v;
      return (uint32_t)((int)clampf(round_int(__fmul_rn(y, t), sr, bits), -8.0f, 7.0f) & 0xF);
    };
    if (pack) {  // g even: byte pairs never straddle a group
      uint8_t* out = codes + r * (K / 2) + c * (g / 2);
      for (int64_t p = lane; p < g / 2; p += 32) out[p] = (uint8_t)(code(2 * p) | (code(2 * p + 1) << 4));
    } else {
      for (int64_t j = lane; j < g; j += 32) codes[r * K + c * g + j] = (uint8_t)code(j);
    }
    if (lane == 0) {
      const float nan = __uint_as_float(kNanBits);
      if (WEIGHT) {
        rc[0] = bad ? nan : s;
        rc[1] = z;
      } else {
        rc[0] = bad ? nan : s;
        rc[1] = bad ? nan : to_f32<IN>(xg[i0]);
        rc[2] = bad ? nan : to_f32<IN>(xg[i1]);
        rc[3] = bad ? 0.0f : (float)i0;
        rc[4] = bad ? 1.0f : (float)i1;
      }
    }
  }
}

__global__ void dequantize_kernel(const uint8_t* __restrict__ data, const float* __restrict__ rec, int64_t n, int64_t K,
                                  int64_t g, bool weight, float* __restrict__ out) {
  const int64_t G = K / g;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / K, k = i % K;
    out[i] = int4_decode((data[r * (K / 2) + k / 2] >> (4 * (k & 1))) & 0xF,
                         rec + (r * G + k / g) * int4_record_floats(weight), k % g, g, weight);
  }
}

void check_args(const at::Tensor& t, const char* name, int64_t K, int64_t g, bool weight) {
  TORCH_CHECK(t.defined() && t.is_cuda(), name, ": expected a CUDA tensor");
  TORCH_CHECK(t.dim() == 2, name, ": expected a 2-D tensor, got ", t.dim(), " dims");
  TORCH_CHECK(g >= (weight ? 1 : kTopK), "g: expected a group of at least ", weight ? 1 : kTopK, ", got ", g);
  TORCH_CHECK(K % g == 0, "g: the quantized dimension has size ", K, ", not divisible by the group ", g);
  TORCH_CHECK(K % 2 == 0, "x: INT4 packs two elements per byte; the last dim must be even, got ", K);
}

template <int IN>
void launch_quantize(const at::Tensor& x, bool weight, int64_t R, int64_t K, int64_t g, bool sr, uint64_t seed,
                     int64_t inner, bool pack, at::Tensor& codes, at::Tensor& rec) {
  using S = typename InTraits<IN>::Storage;
  const int64_t n_groups = R * (K / g);
  const unsigned blocks = grid_for(n_groups, kWarps);
  const auto stream = at::cuda::getCurrentCUDAStream().stream();
  const S* xp = reinterpret_cast<const S*>(x.data_ptr());
  if (weight)
    quantize_kernel<IN, true><<<blocks, 32 * kWarps, 0, stream>>>(xp, n_groups, K / g, K, g, sr, seed, inner, pack,
                                                                  codes.data_ptr<uint8_t>(), rec.data_ptr<float>());
  else
    quantize_kernel<IN, false><<<blocks, 32 * kWarps, 0, stream>>>(xp, n_groups, K / g, K, g, sr, seed, inner, pack,
                                                                   codes.data_ptr<uint8_t>(), rec.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int4_quantize(const at::Tensor& x_in, bool weight, int64_t g,
                                                             int64_t rounding, int64_t seed, int64_t inner) {
  const int64_t R = x_in.dim() == 2 ? x_in.size(0) : 0, K = x_in.dim() == 2 ? x_in.size(1) : 0;
  check_args(x_in, "x", K, g, weight);
  TORCH_CHECK(rounding == kRoundNearest || rounding == kRoundStochastic, "rounding: expected 0 or 1, got ", rounding);
  TORCH_CHECK(inner >= 1, "inner: expected >= 1, got ", inner);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const bool pack = g % 2 == 0;  // odd groups: one code per byte first, paired below
  at::Tensor codes = at::empty({R, pack ? K / 2 : K}, x.options().dtype(at::kByte));
  at::Tensor rec = at::empty({R, K / g, weight ? 2 : 1 + 2 * kTopK}, x.options().dtype(at::kFloat));
  if (R > 0 && K > 0) {
    const bool sr = rounding == kRoundStochastic;
    switch (x.scalar_type()) {
      case at::kFloat: launch_quantize<kInF32>(x, weight, R, K, g, sr, (uint64_t)seed, inner, pack, codes, rec); break;
      case at::kBFloat16: launch_quantize<kInBF16>(x, weight, R, K, g, sr, (uint64_t)seed, inner, pack, codes, rec); break;
      case at::kHalf: launch_quantize<kInF16>(x, weight, R, K, g, sr, (uint64_t)seed, inner, pack, codes, rec); break;
      default: TORCH_CHECK(false, "x: expected float32, bfloat16 or float16, got ", x.scalar_type());
    }
  }
  if (!pack) codes = codes.slice(1, 0, K, 2) + codes.slice(1, 1, K, 2) * 16;  // low nibble first; no carry
  return {codes, rec, at::ones({}, x.options().dtype(at::kFloat))};
}

at::Tensor int4_dequantize(const at::Tensor& data_in, const at::Tensor& rec_in, bool weight, int64_t g, int64_t K) {
  check_args(data_in, "data", K, g, weight);
  const int64_t R = data_in.size(0), F = weight ? 2 : 1 + 2 * kTopK;
  TORCH_CHECK(data_in.scalar_type() == at::kByte && data_in.size(1) == K / 2, "data: expected uint8 [R, ", K / 2, "]");
  TORCH_CHECK(rec_in.is_cuda() && rec_in.device() == data_in.device() && rec_in.scalar_type() == at::kFloat &&
                  rec_in.numel() == R * (K / g) * F,
              "scale: expected an fp32 record [", R, ", ", K / g, ", ", F, "] on ", data_in.device());
  const c10::cuda::CUDAGuard guard(data_in.device());
  const at::Tensor data = data_in.contiguous(), rec = rec_in.contiguous();
  at::Tensor out = at::empty({R, K}, data.options().dtype(at::kFloat));
  if (R > 0 && K > 0) {
    dequantize_kernel<<<grid_for(R * K), kThreads, 0, at::cuda::getCurrentCUDAStream().stream()>>>(
        data.data_ptr<uint8_t>(), rec.data_ptr<float>(), R * K, K, g, weight, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

const Bindings<CudaExt> kInt4Bindings([](pybind11::module_& m) {
  using pybind11::arg;
  m.def("int4_quantize", &int4_quantize, "INT4 quantize of x [R, K] in 1 x g groups (weight: asymmetric uint4)",
        arg("x"), arg("weight"), arg("g"), arg("rounding"), arg("seed"), arg("inner"));
  m.def("int4_dequantize", &int4_dequantize, "INT4 decode to fp32 [R, K]", arg("data"), arg("scale"), arg("weight"),
        arg("g"), arg("K"));
});

}  // namespace
}  // namespace int4
}  // namespace cuda
}  // namespace lowbit
