// Quantize on CPU, bit for bit the rules of lowbit/backends/ref.py.
// Layout: a contiguous [R, K] input (fp32, bf16 or fp16, read in place), blocks (br, bk) tiling it.
// Rows are spread over OpenMP threads; every element's result depends only on its value, its
// block's scale and its own random word, so the thread count never changes a bit.
#include <omp.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <cstring>

#include "common.h"
#include "lowbit/codes.h"
#include "simd.h"

namespace lowbit {
namespace cpu {
namespace {

struct QArgs {
  int64_t R, K, br, bk;
  int mode;
  float gs;
  uint64_t seed;
  int64_t inner;
  int64_t hblock;  // fused Hadamard block (row blocks or tensor-wise), 0 = none
  const float* signs;
  float norm;
};

// |x| as an fp32 bit pattern, straight from the storage type.
template <class In>
inline uint32_t abs_bits(In v);
template <>
inline uint32_t abs_bits<float>(float v) { return f32_bits(v) & kF32AbsMask; }
template <>
inline uint32_t abs_bits<c10::BFloat16>(c10::BFloat16 v) { return (uint32_t)(v.x & 0x7FFFu) << 16; }
template <>
inline uint32_t abs_bits<c10::Half>(c10::Half v) { return fp16_to_f32_bits(v.x) & kF32AbsMask; }

template <class In>
inline uint32_t amax_bits(const In* x, int64_t n) {
  uint32_t acc = 0;
  for (int64_t k = 0; k < n; ++k) acc = umax32(acc, abs_bits<In>(x[k]));
  return acc;
}

// fp16 |x| bits order like the values, so the max is taken on them and converted once.
template <>
inline uint32_t amax_bits<c10::Half>(const c10::Half* x, int64_t n) {
  uint32_t acc = 0;
  for (int64_t k = 0; k < n; ++k) acc = umax32(acc, x[k].x & 0x7FFFu);
  return fp16_to_f32_bits((uint16_t)acc);
}

template <class In>
float tensor_amax(const In* x, int64_t R, int64_t K) {
  uint32_t acc = 0;
#pragma omp parallel for schedule(static) reduction(max : acc)
  for (int64_t r = 0; r < R; ++r) acc = umax32(acc, amax_bits<In>(x + r * K, K));
  return amax_finalize(acc);
}

// Amax of every (br, bk) tile, as fp32 bit patterns, [nR * nK].
template <class In>
void tile_amax(const In* x, int64_t R, int64_t K, int64_t br, int64_t bk, uint32_t* amax) {
  const int64_t nR = R / br, nK = K / bk;
  const int threads = omp_get_max_threads();
  if (nR >= threads || nK < threads) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < nR; ++i) {
      uint32_t* a = amax + i * nK;
      for (int64_t c = 0; c < nK; ++c) a[c] = 0;
      for (int64_t rr = 0; rr < br; ++rr) {
        const In* row = x + (i * br + rr) * K;
        for (int64_t c = 0; c < nK; ++c) a[c] = umax32(a[c], amax_bits<In>(row + c * bk, bk));
      }
    }
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < nK; ++c) {
      for (int64_t i = 0; i < nR; ++i) {
        uint32_t acc = 0;
        for (int64_t rr = 0; rr < br; ++rr) acc = umax32(acc, amax_bits<In>(x + (i * br + rr) * K + c * bk, bk));
        amax[i * nK + c] = acc;
      }
    }
  }
}

// Tensor amax after the Hadamard transform, transforming each row again in a buffer rather
// than writing the transformed tensor out (the row pass transforms it a second time).
template <class In>
float tensor_amax_transformed(const In* x, const QArgs& a) {
  uint32_t acc = 0;
#pragma omp parallel reduction(max : acc)
  {
    std::vector<float> buf((size_t)a.K);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a.R; ++r) {
      load_row<In>(x + r * a.K, buf.data(), a.K);
      hadamard_row(buf.data(), a.K, a.hblock, a.signs, a.norm, false);
      acc = umax32(acc, amax_bits<float>(buf.data(), a.K));
    }
  }
  return amax_finalize(acc);
}

// Random words of row r of the [R, K] view: i = (r / inner) * K * inner + k * inner + r % inner.
const uint32_t* row_bits(uint64_t seed, int64_t r, int64_t K, int64_t inner, std::vector<uint32_t>& scratch) {
  const uint64_t base = (uint64_t)(r / inner) * (uint64_t)K * (uint64_t)inner + (uint64_t)(r % inner);
  if (inner == 1) return contiguous_bits(seed, base, K, scratch);
  scratch.resize((size_t)K);
  for (int64_t k = 0; k < K; ++k) scratch[(size_t)k] = random_bits(seed, base + (uint64_t)k * (uint64_t)inner);
  return scratch.data();
}

// The value rounded onto the element grid: x / d (FP8), x * 2^-e (MX), x * s_enc / s_blk (NVFP4).
template <int KIND>
inline float scaled_value(float x, float p, float gs) {
  if (KIND == kKindFP8) return x / p;
  if (KIND == kKindMX) return x * p;
  return x * gs / p;
}

#ifdef __AVX2__
template <int KIND>
inline __m256 scaled_avx2(__m256 x, __m256 p, __m256 gs) {
  if (KIND == kKindFP8) return _mm256_div_ps(x, p);
  if (KIND == kKindMX) return _mm256_mul_ps(x, p);
  return _mm256_div_ps(_mm256_mul_ps(x, gs), p);
}

// 8 values widened to fp32 in registers, so bf16 / fp16 rows are read in place (no fp32 copy).
template <class In>
inline __m256 load8(const In* x);
template <>
inline __m256 load8<float>(const float* x) { return _mm256_loadu_ps(x); }
template <>
inline __m256 load8<c10::BFloat16>(const c10::BFloat16* x) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
template <>
inline __m256 load8<c10::Half>(const c10::Half* x) {
  // exact, subnormals and NaN payloads included, like fp16_to_f32_bits (see load_row)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}
#endif

// Codes of n values x[k] scaled by (p, gs), round-to-nearest-even.
template <class T, int KIND, class In>
inline void encode_rne(const In* __restrict x, int64_t n, float p, float gs, uint8_t* __restrict out) {
  int64_t k = 0;
#ifdef __AVX2__
  const __m256 pv = _mm256_set1_ps(p), gv = _mm256_set1_ps(gs);
  for (; k + 8 <= n; k += 8) store_codes8(rne_avx2<T>(scaled_avx2<KIND>(load8<In>(x + k), pv, gv)), out + k);
#endif
  for (; k < n; ++k) out[k] = (uint8_t)round_code_rne<T>(f32_bits(scaled_value<KIND>(load_f32<In>(x[k]), p, gs)));
}

// Codes of n values x[k] scaled by (p, gs), stochastic rounding with the words rb[k].
template <class T, int KIND, class In>
inline void encode_sr(const In* __restrict x, int64_t n, float p, float gs, const uint32_t* __restrict rb,
                      uint8_t* __restrict out) {
  int64_t k = 0;
#ifdef __AVX2__
  const __m256 pv = _mm256_set1_ps(p), gv = _mm256_set1_ps(gs);
  for (; k + 8 <= n; k += 8)
    store_codes8(sr_avx2<T>(scaled_avx2<KIND>(load8<In>(x + k), pv, gv),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb + k))),
                 out + k);
#endif
  for (; k < n; ++k) out[k] = (uint8_t)encode<T, true>(scaled_value<KIND>(load_f32<In>(x[k]), p, gs), rb[k]);
}

// E4M3 code -> fp32, built once.
inline const float* e4m3_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(256);
    for (uint32_t c = 0; c < 256; ++c) t[c] = decode<lowbit::E4M3>(c);
    return t;
  }();
  return table.data();
}

// Scale of a block from its amax: stores it at scales[idx], returns the per-element factor p.
template <class T, int KIND>
inline float block_param(float amax, int mode, float gs, void* scales, int64_t idx) {
  if (KIND == kKindFP8) {
    const float d = fp8_scale(amax, T::kMax, mode);
    static_cast<float*>(scales)[idx] = d;
    return d;
  } else if (KIND == kKindMX) {
    const uint8_t b = mx_scale_byte<T>(amax, mode);
    static_cast<uint8_t*>(scales)[idx] = b;
    return e8m0_inverse(b);
  } else {
    const uint32_t code = nvfp4_block_scale_code(amax, gs);
    static_cast<uint8_t*>(scales)[idx] = (uint8_t)code;
    return e4m3_table()[code];
  }
}


// NVFP4 block scales of n blocks from their amax bits: codes into sc, decoded scales into p.
// Eight blocks at a time: the per-block scalar work would otherwise cost as much as the
// 16 elements of the block.
inline void nv_block_scales(const uint32_t* am, int64_t n, float gs, uint8_t* sc, float* p) {
  int64_t c = 0;
#ifdef __AVX2__
  const float* table = e4m3_table();
  const __m256 g = _mm256_set1_ps(gs);
  for (; c + 8 <= n; c += 8) {
    __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(am + c));
    const __m256i bad = _mm256_cmpgt_epi32(a, _mm256_set1_epi32((int)kF32Inf - 1));
    a = _mm256_blendv_epi8(a, _mm256_set1_epi32((int)kF32CanonicalNaN), bad);
    __m256 t = _mm256_mul_ps(_mm256_div_ps(_mm256_castsi256_ps(a), _mm256_set1_ps(6.0f)), g);
    // max/min return their second operand when either is NaN, so NaN passes as in torch.clamp
    t = _mm256_min_ps(_mm256_set1_ps(448.0f), _mm256_max_ps(_mm256_set1_ps(0.015625f), t));
    const __m256i code = rne_avx2<lowbit::E4M3>(t);
    store_codes8(code, sc + c);
    _mm256_storeu_ps(p + c, _mm256_i32gather_ps(table, code, 4));
  }
#endif
  for (; c < n; ++c) {
    const uint32_t code = nvfp4_block_scale_code(amax_finalize(am[c]), gs);
    sc[c] = (uint8_t)code;
    p[c] = e4m3_table()[code];
  }
}

// The blocks of one row r (fp32, bf16 or fp16, widened as it is read); BK is the block width
// when known at compile time (0: a.bk).
template <class T, int KIND, bool SR, int BK, class In>
inline void row_blocks(const In* xr, int64_t r, const QArgs& a, const float* params, void* scales,
                       const uint32_t* rb, uint8_t* codes) {
  const int64_t bk = BK ? BK : a.bk, nK = a.K / bk;
  const bool fused = a.br == 1;
  const float gs = a.gs;
  if (KIND == kKindNVFP4 && fused && BK != 0) {
    constexpr int64_t kChunk = 64;
    uint32_t am[kChunk];
    float pc[kChunk];
    for (int64_t c0 = 0; c0 < nK; c0 += kChunk) {
      const int64_t m = nK - c0 < kChunk ? nK - c0 : kChunk;
      for (int64_t j = 0; j < m; ++j) {
        am[j] = amax_bits<In>(xr + (c0 + j) * bk, bk);
      }
      nv_block_scales(am, m, gs, static_cast<uint8_t*>(scales) + r * nK + c0, pc);
      for (int64_t j = 0; j < m; ++j) {
        const int64_t c = c0 + j;
        if (SR) {
          encode_sr<T, KIND, In>(xr + c * bk, bk, pc[j], gs, rb + c * bk, codes + c * bk);
        } else {
          encode_rne<T, KIND, In>(xr + c * bk, bk, pc[j], gs, codes + c * bk);
        }
      }
    }
    return;
  }
  for (int64_t c = 0; c < nK; ++c) {
    const In* __restrict xb = xr + c * bk;
    uint8_t* __restrict cb = codes + c * bk;
    float p;
    if (fused) {
      p = block_param<T, KIND>(amax_finalize(amax_bits<In>(xb, bk)), a.mode, gs, scales, r * nK + c);
    } else {
      p = params[(r / a.br) * nK + c];
    }
    if (SR) {
      encode_sr<T, KIND, In>(xb, bk, p, gs, rb + c * bk, cb);
    } else {
      encode_rne<T, KIND, In>(xb, bk, p, gs, cb);
    }
  }
}

// Compile-time widths for the MX / NVFP4 blocks, so their short loops unroll.
template <class T, int KIND, bool SR, class In>
inline void row_blocks_w(const In* xr, int64_t r, const QArgs& a, const float* params, void* scales,
                         const uint32_t* rb, uint8_t* codes) {
  if (a.bk == 16) row_blocks<T, KIND, SR, 16, In>(xr, r, a, params, scales, rb, codes);
  else if (a.bk == 32) row_blocks<T, KIND, SR, 32, In>(xr, r, a, params, scales, rb, codes);
  else row_blocks<T, KIND, SR, 0, In>(xr, r, a, params, scales, rb, codes);
}

// One pass over the rows. With br == 1 each block's amax and scale are computed here (fused),
// otherwise params holds the per-block factor computed from the tile amax beforehand.
template <class T, int KIND, bool SR, class In>
void quantize_rows(const In* x, const QArgs& a, const float* params, void* scales, uint8_t* out) {
  constexpr bool kPacked = T::kBits == 4;
  const int64_t K = a.K;
#pragma omp parallel
  {
    // Rows are read in their own type, except for the fused Hadamard transform and for the
    // element-by-element stochastic encode, where a vector widening pass beats a scalar
    // fp16 -> fp32 conversion per element.
    const bool widen = a.hblock != 0 || (SR && !std::is_same<In, float>::value);
    std::vector<float> xbuf(widen ? (size_t)K : 0);
    std::vector<uint32_t> rscratch;
    std::vector<uint8_t> cbuf(kPacked ? (size_t)K : 0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a.R; ++r) {
      const uint32_t* rb = SR ? row_bits(a.seed, r, K, a.inner, rscratch) : nullptr;
      uint8_t* codes = kPacked ? cbuf.data() : out + r * K;
      if (xbuf.empty()) {
        row_blocks_w<T, KIND, SR>(x + r * K, r, a, params, scales, rb, codes);
      } else {
        load_row<In>(x + r * K, xbuf.data(), K);
        if (a.hblock) hadamard_row(xbuf.data(), K, a.hblock, a.signs, a.norm, false);
        row_blocks_w<T, KIND, SR>(static_cast<const float*>(xbuf.data()), r, a, params, scales, rb, codes);
      }
      if (kPacked) {
        uint8_t* __restrict o = out + r * (K / 2);
        const uint8_t* __restrict cs = codes;
        for (int64_t j = 0; j < K / 2; ++j) o[j] = (uint8_t)(cs[2 * j] | (cs[2 * j + 1] << 4));
      }
    }
  }
}

template <class T, int KIND, bool SR, class In>
void quantize_typed(const In* x, const QArgs& a0, const c10::optional<float>& global_amax, void* scales,
                    uint8_t* out, float* gs_out) {
  QArgs a = a0;
  const int64_t nR = a.R / a.br, nK = a.K / a.bk;
  auto amax_all = [&] { return a.hblock ? tensor_amax_transformed<In>(x, a) : tensor_amax<In>(x, a.R, a.K); };
  if (KIND == kKindNVFP4) {
    a.gs = nvfp4_global_scale(global_amax.has_value() ? *global_amax : amax_all());
  }
  *gs_out = a.gs;
  std::vector<float> params;
  if (a.br != 1) {
    std::vector<uint32_t> amax((size_t)(nR * nK));
    if (nR == 1 && nK == 1) {
      amax[0] = f32_bits(amax_all());
    } else {
      TORCH_CHECK(a.hblock == 0, "quantize: internal error: tile amax of a transformed tensor");
      tile_amax<In>(x, a.R, a.K, a.br, a.bk, amax.data());
    }
    params.resize(amax.size());
    for (size_t i = 0; i < amax.size(); ++i)
      params[i] = block_param<T, KIND>(amax_finalize(amax[i]), a.mode, a.gs, scales, (int64_t)i);
  }
  quantize_rows<T, KIND, SR, In>(x, a, params.data(), scales, out);
}

template <class T, int KIND, class In>
void quantize_rounding(bool sr, const In* x, const QArgs& a, const c10::optional<float>& ga, void* scales,
                       uint8_t* out, float* gs) {
  if (sr) {
    quantize_typed<T, KIND, true, In>(x, a, ga, scales, out, gs);
  } else {
    quantize_typed<T, KIND, false, In>(x, a, ga, scales, out, gs);
  }
}

template <class In>
void quantize_dispatch(int kind, ElemId elem, bool sr, const In* x, const QArgs& a, const c10::optional<float>& ga,
                       void* scales, uint8_t* out, float* gs) {
  if (kind == kKindFP8) {
    if (elem == kE4M3) quantize_rounding<lowbit::E4M3, kKindFP8, In>(sr, x, a, ga, scales, out, gs);
    else quantize_rounding<lowbit::E5M2, kKindFP8, In>(sr, x, a, ga, scales, out, gs);
  } else if (kind == kKindMX) {
    if (elem == kE4M3) quantize_rounding<lowbit::E4M3, kKindMX, In>(sr, x, a, ga, scales, out, gs);
    else if (elem == kE5M2) quantize_rounding<lowbit::E5M2, kKindMX, In>(sr, x, a, ga, scales, out, gs);
    else quantize_rounding<lowbit::E2M1, kKindMX, In>(sr, x, a, ga, scales, out, gs);
  } else {
    quantize_rounding<lowbit::E2M1, kKindNVFP4, In>(sr, x, a, ga, scales, out, gs);
  }
}

void check_input_float(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), what, ": expected a CPU tensor, got one on ", x.device());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              what, ": expected float32, bfloat16 or float16 input, got ", st);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const at::Tensor& x_in, int64_t kind_code, int64_t elem_code,
                                                        int64_t br, int64_t bk, int64_t rounding, int64_t seed,
                                                        int64_t scale_mode,
                                                        const c10::optional<at::Tensor>& global_amax,
                                                        int64_t hadamard_block, int64_t inner) {
  check_input_float(x_in, "quantize");
  TORCH_CHECK(x_in.dim() == 2, "quantize: expected a 2-D [R, K] tensor, got ", x_in.dim(), " dims");
  const auto [kind, elem] = check_format(kind_code, elem_code);
  const int mode = check_scale_mode(scale_mode, kind);
  const bool stochastic = check_rounding(rounding);
  const int64_t R = x_in.size(0), K = x_in.size(1);
  TORCH_CHECK(br > 0 && bk > 0, "block: expected positive sizes, got (", br, ", ", bk, ")");
  TORCH_CHECK(R % br == 0 && K % bk == 0, "block: (", br, ", ", bk, ") does not tile [", R, ", ", K, "]");
  TORCH_CHECK(inner >= 1 && R % inner == 0, "inner: expected a positive divisor of R = ", R, ", got ", inner);
  const bool packed = elem == kE2M1;
  TORCH_CHECK(!packed || bk % 2 == 0, "block: FP4 packs two elements per byte, so the block width must be even, got ", bk);
  if (hadamard_block) check_hadamard_block(hadamard_block, K);
  c10::optional<float> ga;
  if (check_global_amax(global_amax, kind)) ga = global_amax->to(at::kCPU).reshape({}).item<float>();
  const auto scale_dtype = kind == kKindFP8 ? at::kFloat : (kind == kKindMX ? at::kByte : at::kFloat8_e4m3fn);
  const auto data_dtype = packed ? at::kByte : (elem == kE4M3 ? at::kFloat8_e4m3fn : at::kFloat8_e5m2);
  const auto opts = x_in.options();
  at::Tensor data = at::empty({R, packed ? K / 2 : K}, opts.dtype(data_dtype));
  at::Tensor scale = at::empty({R / br, K / bk}, opts.dtype(scale_dtype));
  at::Tensor gs = at::ones({}, opts.dtype(at::kFloat));
  if (x_in.numel() == 0) return {data, scale, gs};

  at::Tensor x = x_in.contiguous();
  const uint64_t key = (uint64_t)seed;  // the 64 bits of the Philox key (enums.h)
  QArgs a{R, K, br, bk, mode, 1.0f, key, inner, 0, nullptr, 1.0f};
  std::vector<float> signs;
  if (hadamard_block) {
    signs = hadamard_signs(hadamard_block, true, key, K);
    a.norm = hadamard_norm(hadamard_block);
    if (br == 1 || (br == R && bk == K)) {
      a.hblock = hadamard_block;  // fused: rows are transformed in the amax and row passes
      a.signs = signs.data();
    } else {
      x = hadamard(x, hadamard_block, seed, false);  // tiles span rows: transform the tensor first
    }
  }
  void* sp = scale.data_ptr();
  uint8_t* dp = static_cast<uint8_t*>(data.data_ptr());
  float* gp = gs.data_ptr<float>();
  const auto st = x.scalar_type();
  if (st == at::kFloat) {
    quantize_dispatch<float>(kind, elem, stochastic, x.data_ptr<float>(), a, ga, sp, dp, gp);
  } else if (st == at::kBFloat16) {
    quantize_dispatch<c10::BFloat16>(kind, elem, stochastic, x.data_ptr<c10::BFloat16>(), a, ga, sp, dp, gp);
  } else {
    quantize_dispatch<c10::Half>(kind, elem, stochastic, x.data_ptr<c10::Half>(), a, ga, sp, dp, gp);
  }
  return {data, scale, gs};
}

}  // namespace cpu
}  // namespace lowbit
