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
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common.cuh"
#include "ops.h"
#include "tensor_checks.h"

namespace lowbit {
namespace cuda {
namespace {

enum Kind : int { kFP8 = 0, kMX = 1, kNVFP4 = 2 };

// ------------------------------------------------------------------------------ amax
// amax_bits[tile] = max over the tile of |x| as fp32 bits (>= Inf bits when it holds NaN / Inf).
// blockIdx.x: tile, blockIdx.y: split of the tile's vectors. amax_bits starts at 0.
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
// iteration so the G-lane shuffles always have all their lanes.
template <int IN, class T, int KIND, bool STOCH>
__global__ void __launch_bounds__(kThreads)
    row_block_quant_kernel(const typename InTraits<IN>::Storage* __restrict__ x, int64_t R, int64_t K, int G,
                           const float* __restrict__ s_enc_ptr, int mode, uint64_t seed, int64_t inner,
                           uint8_t* __restrict__ data, void* __restrict__ scale) {
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
struct QuantArgs {
  const void* x;
  int64_t R, K, br, bk;
  const float* s_enc;  // NVFP4 only (device pointer)
  int mode;
  uint64_t seed;
  int64_t inner;
  uint8_t* data;
  void* scale;
  cudaStream_t stream;
};

template <int IN, int V>
void launch_tile_amax(const void* x, int64_t R, int64_t K, int64_t br, int64_t bk, uint32_t* amax_bits,
                      cudaStream_t stream) {
  using S = typename InTraits<IN>::Storage;
  const int64_t nr = R / br, nk = K / bk;
  const int64_t tiles = nr * nk;
  TORCH_CHECK(tiles < (int64_t)1 << 31, "quantize: too many blocks (", tiles, ")");
  const int64_t nvec = br * (bk / V);
  const int64_t splits = std::min<int64_t>(65535, std::max<int64_t>(1, ceil_div(nvec, (int64_t)kThreads * 16)));
  const dim3 grid((unsigned)tiles, (unsigned)splits);
  tile_amax_kernel<IN, V><<<grid, kThreads, 0, stream>>>(reinterpret_cast<const S*>(x), K, br, bk, nk, amax_bits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int IN>
void dispatch_tile_amax(const void* x, int64_t R, int64_t K, int64_t br, int64_t bk, int V, uint32_t* amax_bits,
                        cudaStream_t stream) {
  switch (V) {
    case 8: launch_tile_amax<IN, 8>(x, R, K, br, bk, amax_bits, stream); break;
    case 4: launch_tile_amax<IN, 4>(x, R, K, br, bk, amax_bits, stream); break;
    case 2: launch_tile_amax<IN, 2>(x, R, K, br, bk, amax_bits, stream); break;
    default: launch_tile_amax<IN, 1>(x, R, K, br, bk, amax_bits, stream); break;
  }
}

void tile_amax(int in, const void* x, int64_t R, int64_t K, int64_t br, int64_t bk, int V, uint32_t* amax_bits,
               cudaStream_t stream) {
  switch (in) {
    case kInF32: dispatch_tile_amax<kInF32>(x, R, K, br, bk, V, amax_bits, stream); break;
    case kInBF16: dispatch_tile_amax<kInBF16>(x, R, K, br, bk, V, amax_bits, stream); break;
    default: dispatch_tile_amax<kInF16>(x, R, K, br, bk, V, amax_bits, stream); break;
  }
}

template <int IN, class T, int KIND, bool STOCH>
void launch_row_block(const QuantArgs& a) {
  using S = typename InTraits<IN>::Storage;
  const int G = (int)(a.bk / 8);
  const int64_t total = a.R * (a.K / 8);
  row_block_quant_kernel<IN, T, KIND, STOCH><<<grid_for(total), kThreads, 0, a.stream>>>(
      reinterpret_cast<const S*>(a.x), a.R, a.K, G, a.s_enc, a.mode, a.seed, a.inner, a.data, a.scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int IN, class T, int KIND, int V, bool STOCH>
void launch_tile(const QuantArgs& a, const uint32_t* amax_bits) {
  using S = typename InTraits<IN>::Storage;
  const int64_t total = a.R * (a.K / V);
  tile_quant_kernel<IN, T, KIND, V, STOCH><<<grid_for(total), kThreads, 0, a.stream>>>(
      reinterpret_cast<const S*>(a.x), a.R, a.K, a.br, a.bk, amax_bits, a.s_enc, a.mode, a.seed, a.inner, a.data,
      a.scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int IN, class T, int KIND, bool STOCH>
void run_quant(const QuantArgs& a, bool row_block, int V, const uint32_t* amax_bits) {
  if (row_block) {
    launch_row_block<IN, T, KIND, STOCH>(a);
    return;
  }
  if constexpr (KIND != kFP8) {  // MX / NVFP4 tiles are 16 or 32 wide: V = 8
    launch_tile<IN, T, KIND, 8, STOCH>(a, amax_bits);
  } else {
    switch (V) {
      case 8: launch_tile<IN, T, KIND, 8, STOCH>(a, amax_bits); break;
      case 4: launch_tile<IN, T, KIND, 4, STOCH>(a, amax_bits); break;
      case 2: launch_tile<IN, T, KIND, 2, STOCH>(a, amax_bits); break;
      default: launch_tile<IN, T, KIND, 1, STOCH>(a, amax_bits); break;
    }
  }
}

template <class T, int KIND, bool STOCH>
void run_quant_in(int in, const QuantArgs& a, bool row_block, int V, const uint32_t* amax_bits) {
  switch (in) {
    case kInF32: run_quant<kInF32, T, KIND, STOCH>(a, row_block, V, amax_bits); break;
    case kInBF16: run_quant<kInBF16, T, KIND, STOCH>(a, row_block, V, amax_bits); break;
    default: run_quant<kInF16, T, KIND, STOCH>(a, row_block, V, amax_bits); break;
  }
}

template <class T, int KIND>
void run_quant_round(int in, bool stochastic, const QuantArgs& a, bool row_block, int V, const uint32_t* amax_bits) {
  if (stochastic) {
    run_quant_in<T, KIND, true>(in, a, row_block, V, amax_bits);
  } else {
    run_quant_in<T, KIND, false>(in, a, row_block, V, amax_bits);
  }
}

int largest_vector(int64_t bk) {
  return bk % 8 == 0 ? 8 : bk % 4 == 0 ? 4 : bk % 2 == 0 ? 2 : 1;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const at::Tensor& x_in, const std::string& kind,
                                                        const std::string& elem, int64_t br, int64_t bk,
                                                        const std::string& rounding, int64_t seed,
                                                        const std::string& scale_mode,
                                                        const c10::optional<at::Tensor>& global_amax,
                                                        int64_t hadamard_block, int64_t inner) {
  check_cuda(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2, "x: expected a 2-D [R, K] tensor, got ", x_in.dim(), " dims");
  int in = input_type(x_in, "x");
  const int64_t R = x_in.size(0), K = x_in.size(1);

  int k_id;
  if (kind == "fp8") {
    k_id = kFP8;
    TORCH_CHECK(elem == "e4m3" || elem == "e5m2", "elem: fp8 takes 'e4m3' or 'e5m2', got '", elem, "'");
  } else if (kind == "mx") {
    k_id = kMX;
    TORCH_CHECK(elem == "e4m3" || elem == "e5m2" || elem == "e2m1", "elem: mx takes 'e4m3', 'e5m2' or 'e2m1', got '",
                elem, "'");
  } else if (kind == "nvfp4") {
    k_id = kNVFP4;
    TORCH_CHECK(elem == "e2m1", "elem: nvfp4 takes 'e2m1', got '", elem, "'");
  } else {
    TORCH_CHECK(false, "kind: expected 'fp8', 'mx' or 'nvfp4', got '", kind, "'");
  }
  const bool packed = elem == "e2m1";
  const bool stochastic = is_rounding(rounding);
  int mode;
  if (scale_mode == "exact") {
    mode = kScaleExact;
  } else if (scale_mode == "floor") {
    mode = kScaleFloor;
  } else if (scale_mode == "rceil") {
    mode = kScaleRceil;
  } else {
    TORCH_CHECK(false, "scale_mode: expected 'exact', 'floor' or 'rceil', got '", scale_mode, "'");
  }
  TORCH_CHECK(k_id != kMX || mode != kScaleExact, "scale_mode: mx takes 'floor' or 'rceil', got 'exact'");
  TORCH_CHECK(k_id != kNVFP4 || mode == kScaleExact, "scale_mode: nvfp4 takes 'exact', got '", scale_mode, "'");
  TORCH_CHECK(br > 0 && bk > 0, "block: expected positive (br, bk), got (", br, ", ", bk, ")");
  TORCH_CHECK(R % br == 0, "block: ", R, " rows are not divisible by the block height ", br);
  TORCH_CHECK(K % bk == 0, "block: the quantized dimension has size ", K, ", not divisible by the block size ", bk);
  if (k_id == kMX) TORCH_CHECK(br == 1 && bk == 32, "block: mx takes (1, 32), got (", br, ", ", bk, ")");
  if (k_id == kNVFP4)
    TORCH_CHECK((br == 1 || br == 16) && bk == 16, "block: nvfp4 takes (1, 16) or (16, 16), got (", br, ", ", bk, ")");
  TORCH_CHECK(inner >= 1, "inner: expected >= 1, got ", inner);
  TORCH_CHECK(!packed || K % 2 == 0, "x: FP4 packs two elements per byte; the last dim must be even, got ", K);
  if (hadamard_block) check_hadamard_block(hadamard_block, K, "hadamard_block");
  if (global_amax.has_value()) {
    TORCH_CHECK(k_id == kNVFP4, "global_amax: only nvfp4 has a per-tensor amax");
    check_cuda(*global_amax, "global_amax");
    check_same_device(*global_amax, x_in, "global_amax");
    TORCH_CHECK(global_amax->numel() == 1, "global_amax: expected one value, got ", global_amax->numel());
  }

  const c10::cuda::CUDAGuard guard(x_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::ScalarType data_dtype =
      packed ? at::kByte : (elem == "e4m3" ? at::ScalarType::Float8_e4m3fn : at::ScalarType::Float8_e5m2);
  const at::ScalarType scale_dtype =
      k_id == kFP8 ? at::kFloat : (k_id == kMX ? at::kByte : at::ScalarType::Float8_e4m3fn);
  const auto opts = x_in.options();
  at::Tensor data = at::empty({R, packed ? K / 2 : K}, opts.dtype(data_dtype));
  at::Tensor scale = at::empty({R / br, K / bk}, opts.dtype(scale_dtype));
  at::Tensor global_scale = at::ones({}, opts.dtype(at::kFloat));
  if (R * K == 0) return {data, scale, global_scale};

  at::Tensor x = aligned_contiguous(x_in);
  if (hadamard_block) {
    x = hadamard_transform(x, hadamard_block, true, (uint64_t)seed, false);
    in = kInF32;
  }

  const bool row_block = br == 1 && bk % 8 == 0 && is_pow2(bk / 8) && bk / 8 <= 32;
  const int V = largest_vector(bk);

  QuantArgs a;
  a.x = x.data_ptr();
  a.R = R;
  a.K = K;
  a.br = br;
  a.bk = bk;
  a.s_enc = nullptr;
  a.mode = mode;
  a.seed = (uint64_t)seed;
  a.inner = inner;
  a.data = reinterpret_cast<uint8_t*>(data.data_ptr());
  a.scale = scale.data_ptr();
  a.stream = stream;

  if (k_id == kNVFP4) {
    at::Tensor ga;
    at::Tensor reduced;
    if (global_amax.has_value()) {
      ga = global_amax->to(at::kFloat).contiguous();
    } else {
      reduced = at::zeros({1}, opts.dtype(at::kInt));
      tile_amax(in, a.x, R, K, R, K, largest_vector(K), reinterpret_cast<uint32_t*>(reduced.data_ptr<int32_t>()),
                stream);
    }
    nvfp4_global_scale_kernel<<<1, 1, 0, stream>>>(
        ga.defined() ? ga.data_ptr<float>() : nullptr,
        reduced.defined() ? reinterpret_cast<const uint32_t*>(reduced.data_ptr<int32_t>()) : nullptr,
        global_scale.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    a.s_enc = global_scale.data_ptr<float>();
  }

  at::Tensor amax;
  const uint32_t* amax_bits = nullptr;
  if (!row_block) {
    amax = at::zeros({(R / br) * (K / bk)}, opts.dtype(at::kInt));
    tile_amax(in, a.x, R, K, br, bk, V, reinterpret_cast<uint32_t*>(amax.data_ptr<int32_t>()), stream);
    amax_bits = reinterpret_cast<const uint32_t*>(amax.data_ptr<int32_t>());
  }

  if (k_id == kFP8) {
    if (elem == "e4m3") {
      run_quant_round<E4M3, kFP8>(in, stochastic, a, row_block, V, amax_bits);
    } else {
      run_quant_round<E5M2, kFP8>(in, stochastic, a, row_block, V, amax_bits);
    }
  } else if (k_id == kMX) {
    if (elem == "e4m3") {
      run_quant_round<E4M3, kMX>(in, stochastic, a, row_block, V, amax_bits);
    } else if (elem == "e5m2") {
      run_quant_round<E5M2, kMX>(in, stochastic, a, row_block, V, amax_bits);
    } else {
      run_quant_round<E2M1, kMX>(in, stochastic, a, row_block, V, amax_bits);
    }
  } else {
    run_quant_round<E2M1, kNVFP4>(in, stochastic, a, row_block, V, amax_bits);
  }
  return {data, scale, global_scale};
}

}  // namespace cuda
}  // namespace lowbit
