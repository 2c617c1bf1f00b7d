// Quantize [R, K] into FP8 (fp32 scales on any (br, bk) tile), MX (E8M0 per 1 x 32) and NVFP4
// (E4M3 per 1 x 16 or 16 x 16 and an fp32 per-tensor scale), nearest or stochastic rounding, with
// an optional random Hadamard transform of the rows first. Rules: lowbit/backends/ref.py.
//
// Paths:
//  * row blocks (br = 1, bk = 8 * G with G a power of two <= 32; MX, NVFP4 1x16, FP8 1x128 ...):
//    one kernel; each thread loads 8 consecutive elements, the G threads of a block combine
//    their amax with warp shuffles, compute the scale, round and store.
//  * any other tile (tensor-wise, row-wise, (n, n), NVFP4 16x16): a tile-amax kernel (integer
//    max of |x| bits, so the order of the reduction cannot change the result) and an element
//    kernel that reads the tile's amax.
// NVFP4 first reduces the whole tensor's amax (unless global_amax is given) into s_enc on device.
#include <algorithm>

#include "common.cuh"
#include "fwht.cuh"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kFP8 = kKindFP8, kMX = kKindMX, kNVFP4 = kKindNVFP4;

// ------------------------------------------------------------------------------ amax
// amax_bits[tile] = max over the tile of |x| as fp32 bits (>= Inf bits when it holds NaN / Inf).
// blockIdx.x: tile, blockIdx.y: split of the tile's vectors; blockDim.x a multiple of 32, at most
// kThreads. amax_bits starts at 0.
template <int IN, int V>
__global__ void __launch_bounds__(kThreads)
    tile_amax_kernel(const typename InTraits<IN>::Storage* __restrict__ x, int64_t K, int64_t br, int64_t bk,
                     int64_t nk, uint32_t* __restrict__ amax_bits) {
  const int64_t tile = blockIdx.x;
  const int64_t tr = tile / nk, tk = tile % nk;
  const int64_t vpr = bk / V;
  const int64_t nvec = br * vpr;
  uint32_t m = 0;
  for (int64_t i = (int64_t)blockIdx.y * blockDim.x + threadIdx.x; i < nvec; i += (int64_t)gridDim.y * blockDim.x) {
    const int64_t r = tr * br + i / vpr, k = tk * bk + (i % vpr) * V;
    float f[V];
    load_f32<IN, V>(x + r * K + k, f);
#pragma unroll
    for (int j = 0; j < V; ++j) m = amax_accumulate(m, f[j]);
  }
  m = __reduce_max_sync(0xffffffffu, m);
  __shared__ uint32_t partial[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) partial[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0u;
    m = __reduce_max_sync(0xffffffffu, m);
    if (lane == 0 && m != 0u) atomicMax(amax_bits + tile, m);
  }
}

// s_enc = 2688 / amax (NVFP4 per-tensor scale) from a given fp32 amax or from reduced amax bits.
__global__ void nvfp4_global_scale_kernel(const float* __restrict__ given, const uint32_t* __restrict__ reduced,
                                          float* __restrict__ s_enc) {
  const float amax = given != nullptr ? *given : amax_finalize(*reduced);
  *s_enc = nvfp4_global_scale_rn(amax);
}

// ------------------------------------------------------------------------------ per-block math
// The scale of a tile from its amax: writes the stored scale value and returns what elements
// are multiplied by (MX: 2^-e), divided by (FP8: d), or for NVFP4 the decoded block scale.
template <class T, int KIND>
struct BlockScale {
  float factor;    // FP8: d; MX: 2^-e; NVFP4: s_blk
  uint32_t store;  // FP8: bits of d; MX: E8M0 byte; NVFP4: E4M3 code
};

template <class T, int KIND>
__device__ __forceinline__ BlockScale<T, KIND> block_scale(float amax, int mode, float s_enc) {
  BlockScale<T, KIND> s;
  if constexpr (KIND == kFP8) {
    s.factor = fp8_scale_rn(amax, T::kMax, mode);
    s.store = f32_bits(s.factor);
  } else if constexpr (KIND == kMX) {
    const int32_t e = mx_exponent_rn(amax, T::kEmax, T::kMax, mode);
    s.store = (uint32_t)(e + 127);
    s.factor = e8m0_inverse(s.store);
  } else {
    s.store = nvfp4_block_scale_code_rn(amax, s_enc);
    s.factor = decode<E4M3>(s.store);
  }
  return s;
}

// The value rounded onto the element grid: FP8 x / d, MX x * 2^-e, NVFP4 x * s_enc / s_blk.
template <int KIND>
__device__ __forceinline__ float scaled_value(float x, float factor, float s_enc) {
  if constexpr (KIND == kFP8) {
    return div_rn(x, factor);
  } else if constexpr (KIND == kMX) {
    return mul_rn(x, factor);
  } else {
    return div_rn(mul_rn(x, s_enc), factor);
  }
}

template <int KIND>
__device__ __forceinline__ void store_scale(void* scale, int64_t idx, uint32_t v) {
  if constexpr (KIND == kFP8) {
    reinterpret_cast<uint32_t*>(scale)[idx] = v;
  } else {
    reinterpret_cast<uint8_t*>(scale)[idx] = (uint8_t)v;
  }
}

// Round V consecutive elements (r, k .. k + V - 1) and store their codes.
template <class T, int KIND, int V, bool STOCH>
__device__ __forceinline__ void round_store(const float (&f)[V], float factor, float s_enc, int64_t r, int64_t k,
                                            int64_t K, int64_t inner, uint64_t seed, uint8_t* __restrict__ data) {
  uint32_t bits[V];
  if constexpr (STOCH) {
    uint64_t idx[V];
#pragma unroll
    for (int j = 0; j < V; ++j) idx[j] = element_index(r, k + j, K, inner);
    rounding_bits<V>(seed, idx, bits);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) bits[j] = 0u;
  }
  float v[V];
#pragma unroll
  for (int j = 0; j < V; ++j) v[j] = scaled_value<KIND>(f[j], factor, s_enc);
  const int64_t off = r * K + k;
  if constexpr (T::kBits == 4) {
    static_assert(V % 2 == 0, "FP4 packs pairs of elements");
    Pack<uint8_t, V / 2> out;
#pragma unroll
    for (int j = 0; j < V; j += 2) {
      if constexpr (STOCH) {
        out.v[j / 2] = pack_fp4(round_code_bits<T, true>(f32_bits(v[j]), bits[j]),
                                round_code_bits<T, true>(f32_bits(v[j + 1]), bits[j + 1]));
      } else {
        out.v[j / 2] = (uint8_t)e2m1x2_rn(v[j], v[j + 1]);
      }
    }
    *reinterpret_cast<Pack<uint8_t, V / 2>*>(data + off / 2) = out;
  } else {
    uint32_t code[V];
#pragma unroll
    for (int j = 0; j < V; ++j) code[j] = round_code_bits<T, STOCH>(f32_bits(v[j]), bits[j]);
    Pack<uint8_t, V> out;
#pragma unroll
    for (int j = 0; j < V; ++j) out.v[j] = (uint8_t)code[j];
    *reinterpret_cast<Pack<uint8_t, V>*>(data + off) = out;
  }
}

// ------------------------------------------------------------------------------ row-block kernel
// br = 1, bk = 8 * G. Chunk c (8 elements) belongs to block c / G; whole warps run every
// iteration so the G-lane shuffles always have all their lanes. With hb > 0 the rows are first
// transformed in place by the random Hadamard transform of block hb <= 256 (hb / 8 lanes per
// transform block), with the same operations as hadamard.cu.
template <int IN, class T, int KIND, bool STOCH>
__global__ void __launch_bounds__(kThreads)
    row_block_quant_kernel(const typename InTraits<IN>::Storage* __restrict__ x, int64_t R, int64_t K, int G,
                           const float* __restrict__ s_enc_ptr, int mode, uint64_t seed, int64_t inner,
                           uint8_t* __restrict__ data, void* __restrict__ scale, int hb,
                           const uint32_t* __restrict__ signs, float norm) {
  constexpr int V = 8;
  const int64_t chunks_per_row = K / V;
  const int64_t total = R * chunks_per_row;
  const int64_t rounded = (total + 31) / 32 * 32;
  const float s_enc = KIND == kNVFP4 ? *s_enc_ptr : 1.0f;
  for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < rounded; c += (int64_t)gridDim.x * blockDim.x) {
    const bool valid = c < total;
    const int64_t r = valid ? c / chunks_per_row : 0;
    const int64_t k = valid ? (c % chunks_per_row) * V : 0;
    float f[V];
    if (valid) {
      load_f32<IN, V>(x + r * K + k, f);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) f[j] = 0.0f;
    }
    if (hb) {
      const int j0 = (int)(((c % chunks_per_row) * V) % hb);
      fwht_signs<V>(f, signs, j0);
      fwht_thread_stages<V>(f);
      fwht_warp_stages<V>(f, j0 / V, hb);
      fwht_scale<V>(f, norm);
    }
    uint32_t m = 0;
#pragma unroll
    for (int j = 0; j < V; ++j) m = amax_accumulate(m, f[j]);
    for (int o = G >> 1; o > 0; o >>= 1) m = umax32(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (!valid) continue;
    const BlockScale<T, KIND> s = block_scale<T, KIND>(amax_finalize(m), mode, s_enc);
    if (c % G == 0) store_scale<KIND>(scale, c / G, s.store);
    round_store<T, KIND, V, STOCH>(f, s.factor, s_enc, r, k, K, inner, seed, data);
  }
}

// ------------------------------------------------------------------------------ tile kernel
template <int IN, class T, int KIND, int V, bool STOCH>
__global__ void __launch_bounds__(kThreads)
    tile_quant_kernel(const typename InTraits<IN>::Storage* __restrict__ x, int64_t R, int64_t K, int64_t br,
                      int64_t bk, const uint32_t* __restrict__ amax_bits, const float* __restrict__ s_enc_ptr,
                      int mode, uint64_t seed, int64_t inner, uint8_t* __restrict__ data, void* __restrict__ scale) {
  const int64_t chunks_per_row = K / V;
  const int64_t total = R * chunks_per_row;
  const int64_t nk = K / bk;
  const float s_enc = KIND == kNVFP4 ? *s_enc_ptr : 1.0f;
  for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < total; c += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = c / chunks_per_row;
    const int64_t k = (c % chunks_per_row) * V;
    const int64_t tile = (r / br) * nk + k / bk;
    float f[V];
    load_f32<IN, V>(x + r * K + k, f);
    const BlockScale<T, KIND> s = block_scale<T, KIND>(amax_finalize(amax_bits[tile]), mode, s_enc);
    if (r % br == 0 && k % bk == 0) store_scale<KIND>(scale, tile, s.store);
    round_store<T, KIND, V, STOCH>(f, s.factor, s_enc, r, k, K, inner, seed, data);
  }
}

// ------------------------------------------------------------------------------ launchers
template <int IN, int V>
void tile_amax(const void* x, int64_t R, int64_t K, int64_t br, int64_t bk, uint32_t* amax_bits, cudaStream_t stream) {
  using S = typename InTraits<IN>::Storage;
  const int64_t tiles = (R / br) * (K / bk);
  const int64_t nvec = br * (bk / V);
  // Small tiles (16 x 16, short rows) get one warp or a few, not kThreads mostly idle threads.
  int threads = 32;
  while (threads < kThreads && threads < nvec) threads <<= 1;
  const int64_t splits = std::min<int64_t>(65535, std::max<int64_t>(1, ceil_div(nvec, (int64_t)threads * 16)));
  const dim3 grid((unsigned)tiles, (unsigned)splits);
  tile_amax_kernel<IN, V><<<grid, threads, 0, stream>>>(reinterpret_cast<const S*>(x), K, br, bk, K / bk, amax_bits);
}

template <int IN>
void tile_amax_v(const void* x, int64_t R, int64_t K, int64_t br, int64_t bk, int V, uint32_t* amax_bits,
                 cudaStream_t stream) {
  switch (V) {
    case 8: tile_amax<IN, 8>(x, R, K, br, bk, amax_bits, stream); break;
    case 4: tile_amax<IN, 4>(x, R, K, br, bk, amax_bits, stream); break;
    case 2: tile_amax<IN, 2>(x, R, K, br, bk, amax_bits, stream); break;
    default: tile_amax<IN, 1>(x, R, K, br, bk, amax_bits, stream); break;
  }
}

template <int IN, class T, int KIND, int V, bool STOCH>
void tile_quant(const QuantizeLaunch& a, cudaStream_t stream) {
  using S = typename InTraits<IN>::Storage;
  tile_quant_kernel<IN, T, KIND, V, STOCH><<<grid_for(a.R * (a.K / V)), kThreads, 0, stream>>>(
      reinterpret_cast<const S*>(a.x), a.R, a.K, a.br, a.bk, a.amax_bits, a.s_enc, a.mode, a.seed, a.inner, a.data,
      a.scale);
}

template <int IN, class T, int KIND, bool STOCH>
void quant(const QuantizeLaunch& a, cudaStream_t stream) {
  using S = typename InTraits<IN>::Storage;
  if (a.row_block) {
    row_block_quant_kernel<IN, T, KIND, STOCH><<<grid_for(a.R * (a.K / 8)), kThreads, 0, stream>>>(
        reinterpret_cast<const S*>(a.x), a.R, a.K, (int)(a.bk / 8), a.s_enc, a.mode, a.seed, a.inner, a.data,
        a.scale, a.hadamard_block, a.hadamard_signs, a.hadamard_block ? fwht_norm(a.hadamard_block) : 1.0f);
    return;
  }
  if constexpr (KIND != kFP8) {  // MX / NVFP4 tiles are 16 or 32 wide: V = 8
    tile_quant<IN, T, KIND, 8, STOCH>(a, stream);
  } else {
    switch (a.V) {
      case 8: tile_quant<IN, T, KIND, 8, STOCH>(a, stream); break;
      case 4: tile_quant<IN, T, KIND, 4, STOCH>(a, stream); break;
      case 2: tile_quant<IN, T, KIND, 2, STOCH>(a, stream); break;
      default: tile_quant<IN, T, KIND, 1, STOCH>(a, stream); break;
    }
  }
}

template <class T, int KIND, bool STOCH>
void quant_in(const QuantizeLaunch& a, cudaStream_t stream) {
  switch (a.in) {
    case kInF32: quant<kInF32, T, KIND, STOCH>(a, stream); break;
    case kInBF16: quant<kInBF16, T, KIND, STOCH>(a, stream); break;
    default: quant<kInF16, T, KIND, STOCH>(a, stream); break;
  }
}

template <class T, int KIND>
void quant_round(const QuantizeLaunch& a, cudaStream_t stream) {
  if (a.stochastic) {
    quant_in<T, KIND, true>(a, stream);
  } else {
    quant_in<T, KIND, false>(a, stream);
  }
}

}  // namespace

cudaError_t launch_tile_amax(int in, const void* x, int64_t R, int64_t K, int64_t br, int64_t bk, int V,
                             uint32_t* amax_bits, cudaStream_t stream) {
  switch (in) {
    case kInF32: tile_amax_v<kInF32>(x, R, K, br, bk, V, amax_bits, stream); break;
    case kInBF16: tile_amax_v<kInBF16>(x, R, K, br, bk, V, amax_bits, stream); break;
    default: tile_amax_v<kInF16>(x, R, K, br, bk, V, amax_bits, stream); break;
  }
  return launch_status();
}

cudaError_t launch_nvfp4_global_scale(const float* given, const uint32_t* reduced, float* s_enc, cudaStream_t stream) {
  nvfp4_global_scale_kernel<<<1, 1, 0, stream>>>(given, reduced, s_enc);
  return launch_status();
}

cudaError_t launch_quantize(const QuantizeLaunch& a, cudaStream_t stream) {
  if (a.kind == kKindFP8) {
    if (a.elem == kE4M3) {
      quant_round<E4M3, kFP8>(a, stream);
    } else {
      quant_round<E5M2, kFP8>(a, stream);
    }
  } else if (a.kind == kKindMX) {
    if (a.elem == kE4M3) {
      quant_round<E4M3, kMX>(a, stream);
    } else if (a.elem == kE5M2) {
      quant_round<E5M2, kMX>(a, stream);
    } else {
      quant_round<E2M1, kMX>(a, stream);
    }
  } else {
    quant_round<E2M1, kNVFP4>(a, stream);
  }
  return launch_status();
}

}  // namespace cuda
}  // namespace lowbit
