// INT4 (Stable-SPAM's formats) on CPU, bit for bit lowbit/backends/ref/int4.py (rules: ref/__init__.py, "INT4").
// x [R, K] (fp32, bf16 or fp16, read in place) in 1 x g groups along K. Rows are spread over OpenMP
// threads; a group's result depends only on its values and its elements' random words, so the
// thread count never changes a bit. Registered into lowbit._C through lowbit/registry.h.
#include <omp.h>

#include <cmath>

#include "common.h"
#include "lowbit/int4.h"
#include "lowbit/registry.h"
#include "simd.h"

namespace lowbit {
namespace cpu {
namespace {

constexpr float kWeightEps = 1e-5f;  // the fp32 nearest 1e-5 (0x3727C5AC)
constexpr float kActEps = 1e-6f;     // the fp32 nearest 1e-6 (0x358637BD)
constexpr int kTopK = kInt4TopK;
constexpr uint32_t kNanBits = 0x7FC00000u;

// round(v) of the spec: |v| to the integer grid (ties to even, or up iff frac > u), then v's sign.
inline float round_int(float v, bool stochastic, uint32_t r) {
  const float a = std::fabs(v);
  const float n = std::floor(a);
  const float frac = a - n;
  const bool up = stochastic ? frac > uniform_from_bits(r) : (frac > 0.5f || (frac == 0.5f && std::fmod(n, 2.0f) == 1.0f));
  const float m = n + (up ? 1.0f : 0.0f);
  return (v < 0.0f ? -m : m) + 0.0f;  // -0 -> +0
}

inline float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// One weight group v[0..g): codes q (0..15) and the record (s, z).
void weight_group(const float* v, int64_t g, bool sr, const uint32_t* bits, uint8_t* q, float* rec) {
  float mx = v[0], mn = v[0];
  bool bad = false;
  for (int64_t j = 0; j < g; ++j) {
    bad |= !std::isfinite(v[j]);
    mx = v[j] > mx ? v[j] : mx;
    mn = v[j] < mn ? v[j] : mn;
  }
  if (bad) {
    for (int64_t j = 0; j < g; ++j) q[j] = 0;
    rec[0] = bits_f32(kNanBits);
    rec[1] = 0.0f;
    return;
  }
  float d = mx - mn;
  d = d < kWeightEps ? kWeightEps : d;
  const float s = d / 15.0f;
  const float z = clampf(-round_int(mn / s, false, 0u), 0.0f, 15.0f) + 0.0f;
  for (int64_t j = 0; j < g; ++j) q[j] = (uint8_t)clampf(round_int(v[j] / s, sr, sr ? bits[j] : 0u) + z, 0.0f, 15.0f);
  rec[0] = s;
  rec[1] = z;
}

// One activation group: codes q (-8..7 as nibbles) and the record (s, v0, v1, i0, i1).
void act_group(const float* v, int64_t g, bool sr, const uint32_t* bits, uint8_t* q, float* rec) {
  bool bad = false;
  for (int64_t j = 0; j < g; ++j) bad |= !std::isfinite(v[j]);
  if (bad) {
    for (int64_t j = 0; j < g; ++j) q[j] = 0;
    rec[0] = rec[1] = rec[2] = bits_f32(kNanBits);
    rec[3] = 0.0f;
    rec[4] = 1.0f;
    return;
  }
  int64_t idx[kTopK];
  for (int k = 0; k < kTopK; ++k) {  // the largest |x| not yet kept; a strict > keeps the lowest position
    int64_t best = -1;
    float best_a = -1.0f;
    for (int64_t j = 0; j < g; ++j) {
      bool taken = false;
      for (int p = 0; p < k; ++p) taken |= idx[p] == j;
      const float a = std::fabs(v[j]);
      if (!taken && a > best_a) best = j, best_a = a;
    }
    idx[k] = best;
  }
  float s = 0.0f;
  for (int64_t j = 0; j < g; ++j) {
    const float a = (j == idx[0] || j == idx[1]) ? 0.0f : std::fabs(v[j]);
    s = a > s ? a : s;
  }
  s = s < kActEps ? kActEps : s;
  const float t = (1.0f / s) * 7.0f;
  for (int64_t j = 0; j < g; ++j) {
    const float y = (j == idx[0] || j == idx[1]) ? 0.0f : v[j];
    const int c = (int)clampf(round_int(y * t, sr, sr ? bits[j] : 0u), -8.0f, 7.0f);
    q[j] = (uint8_t)(c & 0xF);
  }
  rec[0] = s;
  for (int k = 0; k < kTopK; ++k) {
    rec[1 + k] = v[idx[k]];
    rec[1 + kTopK + k] = (float)idx[k];
  }
}

template <class In>
void quantize_rows(const In* x, int64_t R, int64_t K, int64_t g, bool weight, bool sr, uint64_t seed, int64_t inner,
                   uint8_t* data, float* record) {
  const int64_t G = K / g, F = weight ? 2 : 1 + 2 * kTopK;
#pragma omp parallel
  {
    std::vector<float> buf((size_t)K);
    std::vector<uint8_t> q((size_t)K);
    std::vector<uint32_t> scratch, strided;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      load_row<In>(x + r * K, buf.data(), K);
      const uint32_t* bits = nullptr;
      if (sr) {  // r(seed, i), i = the element's flat index in the caller's tensor (ref's element_index)
        const uint64_t base = (uint64_t)(r / inner) * (uint64_t)K * (uint64_t)inner + (uint64_t)(r % inner);
        if (inner == 1) {
          bits = contiguous_bits(seed, base, K, scratch);
        } else {
          strided.resize((size_t)K);
          for (int64_t k = 0; k < K; ++k) strided[(size_t)k] = random_bits(seed, base + (uint64_t)k * (uint64_t)inner);
          bits = strided.data();
        }
      }
      for (int64_t c = 0; c < G; ++c) {
        float* rec = record + (r * G + c) * F;
        const uint32_t* b = sr ? bits + c * g : nullptr;
        if (weight) weight_group(buf.data() + c * g, g, sr, b, q.data() + c * g, rec);
        else act_group(buf.data() + c * g, g, sr, b, q.data() + c * g, rec);
      }
      uint8_t* d = data + r * (K / 2);
      for (int64_t j = 0; j < K / 2; ++j) d[j] = (uint8_t)(q[2 * j] | (q[2 * j + 1] << 4));
    }
  }
}

void check_group(const at::Tensor& t, int64_t K, int64_t g, bool weight) {
  TORCH_CHECK(g >= (weight ? 1 : kTopK), "g: expected a group of at least ", weight ? 1 : kTopK, ", got ", g);
  TORCH_CHECK(K % g == 0, "g: the quantized dimension has size ", K, ", not divisible by the group ", g);
  TORCH_CHECK(K % 2 == 0, "x: INT4 packs two elements per byte; the last dim must be even, got ", K);
  TORCH_CHECK(t.device().is_cpu(), "expected CPU tensors, got one on ", t.device());
}

// x [R, K] -> (codes [R, K / 2] uint8, record [R, K / g, F] fp32, global scale 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor> int4_quantize(const at::Tensor& x_in, bool weight, int64_t g,
                                                             int64_t rounding, int64_t seed, int64_t inner) {
  TORCH_CHECK(x_in.dim() == 2, "x: expected a 2-D [R, K] tensor, got ", x_in.dim(), " dims");
  TORCH_CHECK(rounding == kRoundNearest || rounding == kRoundStochastic, "rounding: expected 0 or 1, got ", rounding);
  TORCH_CHECK(inner >= 1, "inner: expected >= 1, got ", inner);
  const int64_t R = x_in.size(0), K = x_in.size(1);
  check_group(x_in, K, g, weight);
  const at::Tensor x = x_in.contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor data = at::empty({R, K / 2}, x.options().dtype(at::kByte));
  at::Tensor record = at::empty({R, K / g, weight ? 2 : 1 + 2 * kTopK}, f32);
  const bool sr = rounding == kRoundStochastic;
  const uint64_t s = (uint64_t)seed;
  if (x.scalar_type() == at::kFloat)
    quantize_rows(x.data_ptr<float>(), R, K, g, weight, sr, s, inner, data.data_ptr<uint8_t>(), record.data_ptr<float>());
  else if (x.scalar_type() == at::kBFloat16)
    quantize_rows(x.data_ptr<c10::BFloat16>(), R, K, g, weight, sr, s, inner, data.data_ptr<uint8_t>(),
                  record.data_ptr<float>());
  else if (x.scalar_type() == at::kHalf)
    quantize_rows(x.data_ptr<c10::Half>(), R, K, g, weight, sr, s, inner, data.data_ptr<uint8_t>(),
                  record.data_ptr<float>());
  else
    TORCH_CHECK(false, "x: expected float32, bfloat16 or float16, got ", x.scalar_type());
  return {data, record, at::ones({}, f32)};
}

// (codes, record) -> fp32 [R, K]: (q - z) * s, or q * s / 7 with the kept values put back.
at::Tensor int4_dequantize(const at::Tensor& data_in, const at::Tensor& record_in, bool weight, int64_t g, int64_t K) {
  TORCH_CHECK(data_in.dim() == 2 && data_in.scalar_type() == at::kByte, "data: expected a 2-D uint8 tensor");
  const int64_t R = data_in.size(0), G = K / g, F = weight ? 2 : 1 + 2 * kTopK;
  check_group(data_in, K, g, weight);
  TORCH_CHECK(data_in.size(1) == K / 2, "data: expected [R, ", K / 2, "], got ", data_in.sizes());
  TORCH_CHECK(record_in.scalar_type() == at::kFloat && record_in.numel() == R * G * F,
              "scale: expected an fp32 record [", R, ", ", G, ", ", F, "], got ", record_in.sizes());
  const at::Tensor data = data_in.contiguous(), record = record_in.contiguous();
  at::Tensor out = at::empty({R, K}, data.options().dtype(at::kFloat));
  const uint8_t* d = data.data_ptr<uint8_t>();
  const float* rec = record.data_ptr<float>();
  float* o = out.data_ptr<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = 0; k < K; ++k)
      o[r * K + k] = int4_decode((d[r * (K / 2) + k / 2] >> (4 * (k & 1))) & 0xF, rec + (r * G + k / g) * F, k % g, g,
                                 weight);
  return out;
}

const Bindings<CpuExt> kInt4Bindings([](pybind11::module_& m) {
  using pybind11::arg;
  m.def("int4_quantize", &int4_quantize, "INT4 quantize of x [R, K] in 1 x g groups (weight: asymmetric uint4)",
        arg("x"), arg("weight"), arg("g"), arg("rounding"), arg("seed"), arg("inner"));
  m.def("int4_dequantize", &int4_dequantize, "INT4 decode to fp32 [R, K]", arg("data"), arg("scale"), arg("weight"),
        arg("g"), arg("K"));
});

}  // namespace
}  // namespace cpu
}  // namespace lowbit
