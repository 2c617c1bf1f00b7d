// Decode FP8 / MX / NVFP4 [R, K] data with its tile scales (ref.dequantize):
// FP8 q * d, MX q * 2^e, NVFP4 q * s_blk / s_enc, each one fp32 operation, then the output dtype
// (fp32, or bf16 / fp16 rounded to nearest even).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kFP8 = kKindFP8, kMX = kKindMX, kNVFP4 = kKindNVFP4;

template <int OUT>
struct OutTraits {
  using Storage = float;
};
template <>
struct OutTraits<kOutBF16> {
  using Storage = uint16_t;
};
template <>
struct OutTraits<kOutF16> {
  using Storage = uint16_t;
};

template <int OUT>
__device__ __forceinline__ typename OutTraits<OUT>::Storage from_f32(float v) {
  if constexpr (OUT == kOutF32) {
    return v;
  } else if constexpr (OUT == kOutBF16) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else {
    return __half_as_ushort(__float2half_rn(v));
  }
}

template <class T, int KIND, int V, int OUT>
__global__ void __launch_bounds__(kThreads)
    dequant_kernel(const uint8_t* __restrict__ data, const void* __restrict__ scale, const float* __restrict__ gs,
                   int64_t R, int64_t K, int64_t br, int64_t bk, typename OutTraits<OUT>::Storage* __restrict__ out) {
  using O = typename OutTraits<OUT>::Storage;
  const int64_t chunks_per_row = K / V;
  const int64_t total = R * chunks_per_row;
  const int64_t nk = K / bk;
  const float s_enc = KIND == kNVFP4 ? *gs : 1.0f;
  for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < total; c += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = c / chunks_per_row;
    const int64_t k = (c % chunks_per_row) * V;
    const int64_t tile = (r / br) * nk + k / bk;
    float s;
    if constexpr (KIND == kFP8) {
      s = reinterpret_cast<const float*>(scale)[tile];
    } else if constexpr (KIND == kMX) {
      s = e8m0_decode(reinterpret_cast<const uint8_t*>(scale)[tile]);
    } else {
      s = decode<E4M3>(reinterpret_cast<const uint8_t*>(scale)[tile]);
    }
    const int64_t off = r * K + k;
    uint32_t code[V];
    if constexpr (T::kBits == 4) {
      static_assert(V % 2 == 0, "FP4 packs pairs of elements");
      const Pack<uint8_t, V / 2> in = *reinterpret_cast<const Pack<uint8_t, V / 2>*>(data + off / 2);
#pragma unroll
      for (int j = 0; j < V; j += 2) {
        code[j] = unpack_fp4_lo(in.v[j / 2]);
        code[j + 1] = unpack_fp4_hi(in.v[j / 2]);
      }
    } else {
      const Pack<uint8_t, V> in = *reinterpret_cast<const Pack<uint8_t, V>*>(data + off);
#pragma unroll
      for (int j = 0; j < V; ++j) code[j] = in.v[j];
    }
    Pack<O, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float q = decode<T>(code[j]);
      float v;
      if constexpr (KIND == kNVFP4) {
        v = div_rn(mul_rn(q, s), s_enc);
      } else {
        v = mul_rn(q, s);
      }
      o.v[j] = from_f32<OUT>(v);
    }
    *reinterpret_cast<Pack<O, V>*>(out + off) = o;
  }
}

template <class T, int KIND, int V, int OUT>
void launch(const DequantizeLaunch& a, cudaStream_t stream) {
  using O = typename OutTraits<OUT>::Storage;
  dequant_kernel<T, KIND, V, OUT><<<grid_for(a.R * (a.K / V)), kThreads, 0, stream>>>(
      a.data, a.scale, a.global_scale, a.R, a.K, a.br, a.bk, reinterpret_cast<O*>(a.y));
}

template <class T, int KIND, int OUT>
void dispatch_v(const DequantizeLaunch& a, cudaStream_t stream) {
  if constexpr (KIND != kFP8) {
    launch<T, KIND, 8, OUT>(a, stream);
  } else {
    switch (a.V) {
      case 8: launch<T, KIND, 8, OUT>(a, stream); break;
      case 4: launch<T, KIND, 4, OUT>(a, stream); break;
      case 2: launch<T, KIND, 2, OUT>(a, stream); break;
      default: launch<T, KIND, 1, OUT>(a, stream); break;
    }
  }
}

template <class T, int KIND>
void dispatch_out(const DequantizeLaunch& a, cudaStream_t stream) {
  switch (a.out) {
    case kOutF32: dispatch_v<T, KIND, kOutF32>(a, stream); break;
    case kOutBF16: dispatch_v<T, KIND, kOutBF16>(a, stream); break;
    default: dispatch_v<T, KIND, kOutF16>(a, stream); break;
  }
}

}  // namespace

cudaError_t launch_dequantize(const DequantizeLaunch& a, cudaStream_t stream) {
  if (a.kind == kKindFP8) {
    if (a.elem == kE4M3) {
      dispatch_out<E4M3, kFP8>(a, stream);
    } else {
      dispatch_out<E5M2, kFP8>(a, stream);
    }
  } else if (a.kind == kKindMX) {
    if (a.elem == kE4M3) {
      dispatch_out<E4M3, kMX>(a, stream);
    } else if (a.elem == kE5M2) {
      dispatch_out<E5M2, kMX>(a, stream);
    } else {
      dispatch_out<E2M1, kMX>(a, stream);
    }
  } else {
    dispatch_out<E2M1, kNVFP4>(a, stream);
  }
  return launch_status();
}

}  // namespace cuda
}  // namespace lowbit
