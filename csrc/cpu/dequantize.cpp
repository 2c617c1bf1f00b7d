// Dequantize on CPU, bit for bit ref.dequantize: FP8 q * d, MX q * 2^e, NVFP4 q * s_blk / s_enc, each
// one fp32 operation; bf16 / fp16 outputs are the fp32 result rounded to nearest even.
#include "common.h"
#include "lowbit/codes.h"

namespace lowbit {
namespace cpu {
namespace {

template <class T>
std::vector<float> decode_table() {
  std::vector<float> lut(1u << T::kBits);
  for (uint32_t c = 0; c < lut.size(); ++c) lut[c] = decode<T>(c);
  return lut;
}

template <class T, int KIND>
void dequantize_rows(const uint8_t* data, const void* scale, float gs, int64_t R, int64_t K, int64_t br, int64_t bk,
                     float* out) {
  constexpr bool kPacked = T::kBits == 4;
  const std::vector<float> lut_v = decode_table<T>();
  const float* lut = lut_v.data();
  const int64_t nK = K / bk;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    const uint8_t* d = data + r * (kPacked ? K / 2 : K);
    float* o = out + r * K;
    for (int64_t c = 0; c < nK; ++c) {
      const int64_t idx = (r / br) * nK + c;
      float s;
      if (KIND == kKindFP8) s = static_cast<const float*>(scale)[idx];
      else if (KIND == kKindMX) s = e8m0_decode(static_cast<const uint8_t*>(scale)[idx]);
      else s = decode<lowbit::E4M3>(static_cast<const uint8_t*>(scale)[idx]);
      float* __restrict ob = o + c * bk;
      if (kPacked) {
        const uint8_t* __restrict db = d + c * bk / 2;
        for (int64_t j = 0; j < bk / 2; ++j) {
          const uint8_t b = db[j];
          const float lo = lut[b & 0xF], hi = lut[b >> 4];
          ob[2 * j] = KIND == kKindNVFP4 ? lo * s / gs : lo * s;
          ob[2 * j + 1] = KIND == kKindNVFP4 ? hi * s / gs : hi * s;
        }
      } else {
        const uint8_t* __restrict db = d + c * bk;
        for (int64_t k = 0; k < bk; ++k) ob[k] = KIND == kKindNVFP4 ? lut[db[k]] * s / gs : lut[db[k]] * s;
      }
    }
  }
}

}  // namespace

at::Tensor dequantize(const at::Tensor& data_in, const at::Tensor& scale_in, const at::Tensor& global_scale,
                      int64_t kind_code, int64_t elem_code, int64_t br, int64_t bk, int64_t K, int64_t out_dtype) {
  const auto [kind, elem] = check_format(kind_code, elem_code);
  const at::ScalarType out_type = out_scalar_type(check_out_dtype(out_dtype));
  TORCH_CHECK(data_in.device().is_cpu() && scale_in.device().is_cpu(), "dequantize: expected CPU tensors");
  TORCH_CHECK(data_in.dim() == 2, "dequantize: expected 2-D data, got ", data_in.dim(), " dims");
  TORCH_CHECK(data_in.element_size() == 1, "dequantize: expected 1-byte codes, got ", data_in.scalar_type());
  const bool packed = elem == kE2M1;
  const int64_t R = data_in.size(0);
  TORCH_CHECK(K >= 0 && data_in.size(1) == (packed ? K / 2 : K) && (!packed || K % 2 == 0),
              "dequantize: data has ", data_in.size(1), " columns, which does not match K = ", K);
  TORCH_CHECK(br > 0 && bk > 0 && R % br == 0 && K % bk == 0 && (!packed || bk % 2 == 0),
              "dequantize: block (", br, ", ", bk, ") does not tile [", R, ", ", K, "]");
  TORCH_CHECK(scale_in.numel() == (R / br) * (K / bk), "dequantize: expected ", (R / br) * (K / bk),
              " scales, got ", scale_in.numel());
  const auto want_scale = kind == kKindFP8 ? at::kFloat : (kind == kKindMX ? at::kByte : at::kFloat8_e4m3fn);
  TORCH_CHECK(scale_in.scalar_type() == want_scale, "dequantize: expected ", want_scale, " scales, got ",
              scale_in.scalar_type());
  at::Tensor out = at::empty({R, K}, data_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return out.to(out_type);
  float gs = 1.0f;
  if (kind == kKindNVFP4) {
    TORCH_CHECK(global_scale.numel() == 1, "dequantize: expected a single global scale");
    gs = global_scale.to(at::kCPU).to(at::kFloat).reshape({}).item<float>();
  }
  const at::Tensor data = data_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const uint8_t* d = static_cast<const uint8_t*>(data.data_ptr());
  const void* s = scale.data_ptr();
  float* o = out.data_ptr<float>();
  if (kind == kKindFP8) {
    if (elem == kE4M3) dequantize_rows<lowbit::E4M3, kKindFP8>(d, s, gs, R, K, br, bk, o);
    else dequantize_rows<lowbit::E5M2, kKindFP8>(d, s, gs, R, K, br, bk, o);
  } else if (kind == kKindMX) {
    if (elem == kE4M3) dequantize_rows<lowbit::E4M3, kKindMX>(d, s, gs, R, K, br, bk, o);
    else if (elem == kE5M2) dequantize_rows<lowbit::E5M2, kKindMX>(d, s, gs, R, K, br, bk, o);
    else dequantize_rows<lowbit::E2M1, kKindMX>(d, s, gs, R, K, br, bk, o);
  } else {
    dequantize_rows<lowbit::E2M1, kKindNVFP4>(d, s, gs, R, K, br, bk, o);
  }
  return out.to(out_type);  // torch's fp32 -> bf16 / fp16 rounding, as ref applies it
}

}  // namespace cpu
}  // namespace lowbit
