// Unscaled saturating cast of fp32 / bf16 / fp16 to bf16, fp16, E4M3 or E5M2 with nearest-even or
// stochastic rounding (ref.cast); the random bits of element i are r(seed, i), i the flat index.
#include "common.cuh"

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
void launch(const void* x, int64_t n, bool stochastic, uint64_t seed, void* y, cudaStream_t stream) {
  using S = typename InTraits<IN>::Storage;
  using C = typename CodeStorage<T>::type;
  const unsigned grid = grid_for(ceil_div(n, 4));
  const S* xp = reinterpret_cast<const S*>(x);
  C* yp = reinterpret_cast<C*>(y);
  if (stochastic) {
    cast_kernel<IN, T, true><<<grid, kThreads, 0, stream>>>(xp, n, seed, yp);
  } else {
    cast_kernel<IN, T, false><<<grid, kThreads, 0, stream>>>(xp, n, seed, yp);
  }
}

template <class T>
void dispatch_in(int in, const void* x, int64_t n, bool stochastic, uint64_t seed, void* y, cudaStream_t stream) {
  switch (in) {
    case kInF32: launch<kInF32, T>(x, n, stochastic, seed, y, stream); break;
    case kInBF16: launch<kInBF16, T>(x, n, stochastic, seed, y, stream); break;
    default: launch<kInF16, T>(x, n, stochastic, seed, y, stream); break;
  }
}

}  // namespace

cudaError_t launch_cast(int in, int elem, bool stochastic, const void* x, int64_t n, uint64_t seed, void* y,
                        cudaStream_t stream) {
  switch (elem) {
    case kBF16: dispatch_in<BF16>(in, x, n, stochastic, seed, y, stream); break;
    case kFP16: dispatch_in<FP16>(in, x, n, stochastic, seed, y, stream); break;
    case kE4M3: dispatch_in<E4M3>(in, x, n, stochastic, seed, y, stream); break;
    default: dispatch_in<E5M2>(in, x, n, stochastic, seed, y, stream); break;
  }
  return launch_status();
}

}  // namespace cuda
}  // namespace lowbit
