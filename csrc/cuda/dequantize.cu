// Decode FP8 / MX / NVFP4 [R, K] data with its tile scales (ref.dequantize):
// FP8 q * d, MX q * 2^e, NVFP4 q * s_blk / s_enc, each one fp32 operation, then the output dtype
// (fp32, or bf16 / fp16 rounded to nearest even).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "ops.h"
#include "tensor_checks.h"

namespace lowbit {
namespace cuda {
namespace {

enum Kind : int { kFP8 = 0, kMX = 1, kNVFP4 = 2 };
enum OutType : int { kOutF32 = 0, kOutBF16 = 1, kOutF16 = 2 };

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

struct DequantArgs {
  const uint8_t* data;
  const void* scale;
  const float* gs;
  int64_t R, K, br, bk;
  void* out;
  cudaStream_t stream;
};

template <class T, int KIND, int V, int OUT>
void launch(const DequantArgs& a) {
  using O = typename OutTraits<OUT>::Storage;
  dequant_kernel<T, KIND, V, OUT><<<grid_for(a.R * (a.K / V)), kThreads, 0, a.stream>>>(
      a.data, a.scale, a.gs, a.R, a.K, a.br, a.bk, reinterpret_cast<O*>(a.out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T, int KIND, int OUT>
void dispatch_v(const DequantArgs& a, int V) {
  if constexpr (KIND != kFP8) {
    launch<T, KIND, 8, OUT>(a);
  } else {
    switch (V) {
      case 8: launch<T, KIND, 8, OUT>(a); break;
      case 4: launch<T, KIND, 4, OUT>(a); break;
      case 2: launch<T, KIND, 2, OUT>(a); break;
      default: launch<T, KIND, 1, OUT>(a); break;
    }
  }
}

template <class T, int KIND>
void dispatch_out(const DequantArgs& a, int V, int out) {
  switch (out) {
    case kOutF32: dispatch_v<T, KIND, kOutF32>(a, V); break;
    case kOutBF16: dispatch_v<T, KIND, kOutBF16>(a, V); break;
    default: dispatch_v<T, KIND, kOutF16>(a, V); break;
  }
}

}  // namespace

at::Tensor dequantize(const at::Tensor& data_in, const at::Tensor& scale_in, const at::Tensor& global_scale,
                      const std::string& kind, const std::string& elem, int64_t br, int64_t bk, int64_t K,
                      const std::string& out_dtype) {
  check_cuda(data_in, "data");
  check_cuda(scale_in, "scale");
  check_cuda(global_scale, "global_scale");
  check_same_device(scale_in, data_in, "scale");
  check_same_device(global_scale, data_in, "global_scale");
  TORCH_CHECK(data_in.dim() == 2, "data: expected a 2-D tensor, got ", data_in.dim(), " dims");
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
  int out;
  at::ScalarType out_type;
  if (out_dtype == "float32") {
    out = kOutF32;
    out_type = at::kFloat;
  } else if (out_dtype == "bfloat16") {
    out = kOutBF16;
    out_type = at::kBFloat16;
  } else if (out_dtype == "float16") {
    out = kOutF16;
    out_type = at::kHalf;
  } else {
    TORCH_CHECK(false, "out_dtype: expected 'float32', 'bfloat16' or 'float16', got '", out_dtype, "'");
  }
  const at::ScalarType want_data =
      packed ? at::kByte : (elem == "e4m3" ? at::ScalarType::Float8_e4m3fn : at::ScalarType::Float8_e5m2);
  TORCH_CHECK(data_in.scalar_type() == want_data || data_in.scalar_type() == at::kByte, "data: expected ", want_data,
              " codes for ", kind, "/", elem, ", got ", data_in.scalar_type());
  const at::ScalarType want_scale =
      k_id == kFP8 ? at::kFloat : (k_id == kMX ? at::kByte : at::ScalarType::Float8_e4m3fn);
  TORCH_CHECK(scale_in.scalar_type() == want_scale, "scale: expected ", want_scale, " for ", kind, ", got ",
              scale_in.scalar_type());
  TORCH_CHECK(global_scale.scalar_type() == at::kFloat && global_scale.numel() == 1,
              "global_scale: expected one float32 value, got ", global_scale.scalar_type(), " with ",
              global_scale.numel(), " elements");
  const int64_t R = data_in.size(0);
  TORCH_CHECK(K >= 0 && data_in.size(1) == (packed ? K / 2 : K) && (!packed || K % 2 == 0), "data: expected ",
              packed ? "[R, K / 2] packed FP4 codes" : "[R, K] codes", " for K = ", K, ", got shape ", data_in.sizes());
  TORCH_CHECK(br > 0 && bk > 0, "block: expected positive (br, bk), got (", br, ", ", bk, ")");
  TORCH_CHECK(R % br == 0 && K % bk == 0, "block: (", br, ", ", bk, ") does not tile [", R, ", ", K, "]");
  if (k_id == kMX) TORCH_CHECK(br == 1 && bk == 32, "block: mx takes (1, 32), got (", br, ", ", bk, ")");
  if (k_id == kNVFP4)
    TORCH_CHECK((br == 1 || br == 16) && bk == 16, "block: nvfp4 takes (1, 16) or (16, 16), got (", br, ", ", bk, ")");
  TORCH_CHECK(scale_in.numel() == (R / br) * (K / bk), "scale: expected ", (R / br) * (K / bk), " values for ", R, "x",
              K, " in (", br, ", ", bk, ") blocks, got ", scale_in.numel());

  const c10::cuda::CUDAGuard guard(data_in.device());
  at::Tensor result = at::empty({R, K}, data_in.options().dtype(out_type));
  if (R * K == 0) return result;
  const at::Tensor data = aligned_contiguous(data_in);
  const at::Tensor scale = scale_in.contiguous();
  const at::Tensor gs = global_scale.reshape({1}).contiguous();

  DequantArgs a;
  a.data = reinterpret_cast<const uint8_t*>(data.data_ptr());
  a.scale = scale.data_ptr();
  a.gs = gs.data_ptr<float>();
  a.R = R;
  a.K = K;
  a.br = br;
  a.bk = bk;
  a.out = result.data_ptr();
  a.stream = c10::cuda::getCurrentCUDAStream().stream();
  const int V = bk % 8 == 0 ? 8 : bk % 4 == 0 ? 4 : bk % 2 == 0 ? 2 : 1;

  if (k_id == kFP8) {
    if (elem == "e4m3") {
      dispatch_out<E4M3, kFP8>(a, V, out);
    } else {
      dispatch_out<E5M2, kFP8>(a, V, out);
    }
  } else if (k_id == kMX) {
    if (elem == "e4m3") {
      dispatch_out<E4M3, kMX>(a, V, out);
    } else if (elem == "e5m2") {
      dispatch_out<E5M2, kMX>(a, V, out);
    } else {
      dispatch_out<E2M1, kMX>(a, V, out);
    }
  } else {
    dispatch_out<E2M1, kNVFP4>(a, V, out);
  }
  return result;
}

}  // namespace cuda
}  // namespace lowbit
