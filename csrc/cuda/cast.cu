// Unscaled saturating cast of fp32 / bf16 / fp16 to bf16, fp16, E4M3 or E5M2 with nearest-even or
// stochastic rounding (ref.cast); the random bits of element i are r(seed, i), i the flat index.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common.cuh"
#include "ops.h"
#include "tensor_checks.h"

namespace lowbit {
namespace cuda {
namespace {

template <class T>
struct CodeStorage {
  using type = uint8_t;
};
template <>
struct CodeStorage<BF16> {
  using type = uint16_t;
};
template <>
struct CodeStorage<FP16> {
  using type = uint16_t;
};

// Each thread rounds 4 consecutive elements (one Philox call serves them all); the last chunk
// of a tensor whose size is not a multiple of 4 goes element by element.
template <int IN, class T, bool STOCH>
__global__ void __launch_bounds__(kThreads)
    cast_kernel(const typename InTraits<IN>::Storage* __restrict__ x, int64_t n, uint64_t seed,
                typename CodeStorage<T>::type* __restrict__ out) {
  constexpr int V = 4;
  using C = typename CodeStorage<T>::type;
  const int64_t chunks = (n + V - 1) / V;
  for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < chunks; c += (int64_t)gridDim.x * blockDim.x) {
    const int64_t base = c * V;
    const bool full = base + V <= n;
    float f[V];
    if (full) {
      load_f32<IN, V>(x + base, f);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) f[j] = base + j < n ? to_f32<IN>(x[base + j]) : 0.0f;
    }
    uint32_t bits[V] = {0u, 0u, 0u, 0u};
    if constexpr (STOCH) {
      const Philox4 p = random_bits4(seed, (uint64_t)base >> 2);
#pragma unroll
      for (int j = 0; j < V; ++j) bits[j] = p.w[j];
    }
    Pack<C, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = (C)round_code_bits<T, STOCH>(f32_bits(f[j]), bits[j]);
    if (full) {
      *reinterpret_cast<Pack<C, V>*>(out + base) = o;
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (base + j < n) out[base + j] = o.v[j];
    }
  }
}

template <int IN, class T>
void launch(const at::Tensor& x, at::Tensor& out, bool stochastic, uint64_t seed, cudaStream_t stream) {
  using S = typename InTraits<IN>::Storage;
  using C = typename CodeStorage<T>::type;
  const int64_t n = x.numel();
  const unsigned grid = grid_for(ceil_div(n, 4));
  const S* xp = reinterpret_cast<const S*>(x.data_ptr());
  C* op = reinterpret_cast<C*>(out.data_ptr());
  if (stochastic) {
    cast_kernel<IN, T, true><<<grid, kThreads, 0, stream>>>(xp, n, seed, op);
  } else {
    cast_kernel<IN, T, false><<<grid, kThreads, 0, stream>>>(xp, n, seed, op);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T>
void dispatch_in(int in, const at::Tensor& x, at::Tensor& out, bool stochastic, uint64_t seed, cudaStream_t stream) {
  switch (in) {
    case kInF32: launch<kInF32, T>(x, out, stochastic, seed, stream); break;
    case kInBF16: launch<kInBF16, T>(x, out, stochastic, seed, stream); break;
    default: launch<kInF16, T>(x, out, stochastic, seed, stream); break;
  }
}

}  // namespace

at::Tensor cast(const at::Tensor& x_in, const std::string& dtype, const std::string& rounding, int64_t seed) {
  check_cuda(x_in, "x");
  const int in = input_type(x_in, "x");
  const bool stochastic = is_rounding(rounding);
  at::ScalarType out_type;
  if (dtype == "bfloat16") {
    out_type = at::kBFloat16;
  } else if (dtype == "float16") {
    out_type = at::kHalf;
  } else if (dtype == "float8_e4m3fn") {
    out_type = at::ScalarType::Float8_e4m3fn;
  } else if (dtype == "float8_e5m2") {
    out_type = at::ScalarType::Float8_e5m2;
  } else {
    TORCH_CHECK(false, "dtype: expected 'bfloat16', 'float16', 'float8_e4m3fn' or 'float8_e5m2', got '", dtype, "'");
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor out = at::empty(x_in.sizes(), x_in.options().dtype(out_type));
  if (x_in.numel() == 0) return out;
  const at::Tensor x = aligned_contiguous(x_in);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const uint64_t key = (uint64_t)seed;
  if (out_type == at::kBFloat16) {
    dispatch_in<BF16>(in, x, out, stochastic, key, stream);
  } else if (out_type == at::kHalf) {
    dispatch_in<FP16>(in, x, out, stochastic, key, stream);
  } else if (out_type == at::ScalarType::Float8_e4m3fn) {
    dispatch_in<E4M3>(in, x, out, stochastic, key, stream);
  } else {
    dispatch_in<E5M2>(in, x, out, stochastic, key, stream);
  }
  return out;
}

}  // namespace cuda
}  // namespace lowbit
