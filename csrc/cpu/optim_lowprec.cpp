// Fused Stable-SPAM step on low-precision moments (lowbit/optim/state.py: "bf16", "fp8", "int8"), bit for bit
// what the Python path does (decode every moment to fp32, lowbit._C.optim_adam_step, encode back), without a
// full-size fp32 temporary: each (carrier, chunk) work item streams its tensor block by block through
// a few stack buffers. A carrier is a parameter (one piece) or a ZeRO flat partition (several pieces, each
// with its own scalars); every element of a carrier is decoded and re-encoded, pieces or not, as the
// Python path re-encodes the whole carrier. A piece whose `skip` is set is not stepped (its elements are
// decoded and re-encoded like a gap between pieces); a carrier without a piece to step is not touched at
// all, as the Python path leaves it out.
//
// Per block of the carrier (flat, row-major index i):
//   decode   bf16: exact widening; fp8: code(E4M3 m / E5M2 v) * block scale; int8: book[code] * absmax
//   mask     fp8 / int8: m = 0 where the decoded v == 0 (state.load_moments)
//   step     per piece overlapping the block: adam.h with the piece's scalars, then m = v = 0 over the
//            piece where its zero_after flag is set
//   encode   bf16: stochastic rounding with word r(seed, i), the seed per (carrier, moment);
//            fp8: lowbit.quantize(..., block=(1, 128)) of the zero-padded blocks (amax, fp8_scale, x / d
//            rounded to nearest even); int8: absmax = max |x|, safe = absmax > 0 ? absmax : 1,
//            clamp(x / safe, lo, 1), index = number of midpoints m with !(m >= x) (torch.bucketize,
//            right=False, NaN last).
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/extension.h>

#include <algorithm>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "adam.h"
#include "common.h"
#include "lowbit/registry.h"
#include "simd.h"

namespace lowbit::cpu::optim {
namespace {

enum StateFmt : int { kStateBF16 = 0, kStateFP8 = 1, kStateInt8 = 2 };

constexpr int64_t kFp8Block = 128;   // state.FP8_BLOCK
constexpr int64_t kInt8Block = 256;  // state.INT8_BLOCK
constexpr int64_t kChunk = 1 << 15;  // elements per work item: a multiple of both blocks
constexpr int kScalarCols = kScalarCount + 1;  // SCALARS, then zero_after

struct Piece {
  int64_t start, len;
  const float* g;
  Scalars s;
  bool zero_after;
};

struct Carrier {
  float* p;
  int64_t n;
  void* m;
  void* v;
  float* m_scale;
  float* v_scale;
  uint64_t seed_m, seed_v;
  int64_t piece0, piece1;  // its pieces, sorted by start, in [piece0, piece1)
};

// torch.bucketize(x, mids) (right=False) over the 255 sorted midpoints: the number of midpoints m with
// !(m >= x), a prefix of them (NaN compares with nothing, so it lands after all of them, as in torch).
inline uint32_t bucket(const float* mids, float x) {
  uint32_t idx = 0;
  for (uint32_t s = 128; s >= 1; s >>= 1) idx += !(mids[idx + s - 1] >= x) ? s : 0u;
  return idx;
}

// A direct form of bucket() for y in [-1, 1]: y falls in one of kBuckets intervals by its sign, exponent
// and top 8 mantissa bits (all |y| < 2^-24 in one). Where the count takes at most two values over each
// interval, first[b] and first[b] + 1, it is first[b] + !(mids[first[b]] >= y) (mids padded with +inf):
// one table read and one compare instead of a search. Built from bucket() at the intervals' ends, so it
// gives its counts by construction; `ok` is false for a book with two midpoints in one interval.
constexpr int32_t kKeyExpMin = 103;                          // biased exponent of 2^-24
constexpr int32_t kKeyHalf = (127 - kKeyExpMin) * 256 + 1;   // the key of 1.0
constexpr int32_t kBuckets = 2 * kKeyHalf + 1;

inline int32_t bucket_index(uint32_t bits) {
  const uint32_t a = bits & kF32AbsMask;
  int32_t k = (int32_t)(a >> 23) < kKeyExpMin ? 0 : (int32_t)(a >> 15) - (kKeyExpMin << 8) + 1;
  k = k < kKeyHalf ? k : kKeyHalf;
  return kKeyHalf + ((bits >> 31) ? -k : k);
}

struct BucketTable {
  std::vector<int32_t> first;
  std::vector<float> mids;  // 255 midpoints and +inf
  bool ok = true;

  explicit BucketTable(const float* m) : first(kBuckets), mids(m, m + 255) {
    mids.push_back(INFINITY);
    for (int32_t b = 0; b < kBuckets; ++b) {
      const int32_t k = b >= kKeyHalf ? b - kKeyHalf : kKeyHalf - b;
      const uint32_t lo = k == 0 ? 0u : (uint32_t)(k - 1 + (kKeyExpMin << 8)) << 15;
      const uint32_t hi = k == 0 ? ((uint32_t)kKeyExpMin << 23) - 1u : lo + 0x7FFFu;
      // the interval's ends; key 0 holds both signs of |y| < 2^-24
      const float y0 = k == 0 ? -bits_f32(hi) : b > kKeyHalf ? bits_f32(lo) : -bits_f32(hi);
      const float y1 = k == 0 ? bits_f32(hi) : b > kKeyHalf ? bits_f32(hi) : -bits_f32(lo);
      first[b] = (int32_t)bucket(mids.data(), y0);
      ok = ok && bucket(mids.data(), y1) <= (uint32_t)first[b] + 1u;
    }
  }
};

// int8 code books (state.dynamic_codebook as fp32) and their fp32 midpoints, as the Python path has them.
struct Books {
  const float* code_m;
  const float* mids_m;
  const float* code_v;
  const float* mids_v;
  const BucketTable* table_m;
  const BucketTable* table_v;
};

template <class T>
const float* decode_lut() {
  static const std::vector<float> lut = [] {
    std::vector<float> t(256);
    for (uint32_t c = 0; c < 256; ++c) t[c] = decode<T>(c);
    return t;
  }();
  return lut.data();
}

// ------------------------------------------------------------------------------------ bf16
inline void bf16_decode(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = bits_f32((uint32_t)src[k] << 16);
}

#ifdef __AVX2__
// round_code_bits<BF16, true> of 8 lanes, in fewer operations than sr_avx2<BF16>: bf16 shares fp32's
// exponent range, so the grid spacing is 2^16 fp32 ulps for every finite value (subnormals included)
// and the code is the top half of |x| plus one iff frac > u, i.e. (low 16 bits << 8) > (r >> 8);
// then satfinite, Inf, sign and canonical NaN as there.
inline __m256i sr_bf16_avx2(__m256i xb, __m256i r) {
  const __m256i ab = _mm256_and_si256(xb, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i frac = _mm256_slli_epi32(_mm256_and_si256(ab, _mm256_set1_epi32(0xFFFF)), 8);
  // both sides below 2^24, so the signed compare is the unsigned one
  const __m256i up = _mm256_cmpgt_epi32(frac, _mm256_srli_epi32(r, 8));
  return finish_code_avx2<lowbit::BF16>(_mm256_sub_epi32(_mm256_srli_epi32(ab, 16), up), xb, ab);
}
#endif

// lowbit.stochastic_round(x, bf16, seed): round_code_bits<BF16, true> with the words rb[k].
inline void bf16_encode_sr(const float* __restrict x, int64_t n, const uint32_t* __restrict rb,
                           uint16_t* __restrict out) {
  int64_t k = 0;
#ifdef __AVX2__
  for (; k + 8 <= n; k += 8) {
    const __m256i c = sr_bf16_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k)),
                                   _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb + k)));
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), w);
  }
#endif
  for (; k < n; ++k) out[k] = (uint16_t)round_code_bits<lowbit::BF16, true>(f32_bits(x[k]), rb[k]);
}

// ------------------------------------------------------------------------------------ fp8
inline void fp8_decode(const uint8_t* __restrict src, const float* __restrict lut, float s, float* __restrict dst,
                       int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = lut[src[k]] * s;
}

// One zero-padded block of kFp8Block values -> codes and its scale, as lowbit.quantize(fp8, block (1, 128)).
template <class T>
inline float fp8_encode_block(const float* __restrict x, uint8_t* __restrict out) {
  uint32_t acc = 0;
  for (int64_t k = 0; k < kFp8Block; ++k) acc = umax32(acc, f32_bits(x[k]) & kF32AbsMask);
  const float d = fp8_scale(amax_finalize(acc), T::kMax, kScaleExact);
  int64_t k = 0;
#ifdef __AVX2__
  const __m256 dv = _mm256_set1_ps(d);
  for (; k + 8 <= kFp8Block; k += 8) store_codes8(rne_avx2<T>(_mm256_div_ps(_mm256_loadu_ps(x + k), dv)), out + k);
#else
  for (; k < kFp8Block; ++k) out[k] = (uint8_t)round_code_rne<T>(f32_bits(x[k] / d));
#endif
  return d;
}

// ------------------------------------------------------------------------------------ int8
inline void int8_decode(const uint8_t* __restrict src, const float* __restrict code, float absmax,
                        float* __restrict dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = code[src[k]] * absmax;
}

// Codes of kInt8Block values from their bucket keys (see BucketTable); NaN -> 255. Kept scalar: the
// vectoriser would turn the table reads into gathers, which are slower on the CPUs measured.
__attribute__((optimize("no-tree-vectorize"))) inline void lookup_codes(const int32_t* __restrict first,
                                                                         const float* __restrict mids,
                                                                         const float* __restrict ys,
                                                                         const int32_t* __restrict keys,
                                                                         uint8_t* __restrict out) {
  for (int64_t k = 0; k < kInt8Block; ++k) {
    const float y = ys[k];
    const int32_t f = first[keys[k]];
    out[k] = (uint8_t)(y != y ? 255 : f + (!(mids[f] >= y) ? 1 : 0));
  }
}

// One zero-padded block of kInt8Block values -> codes and its absmax, as state.int8_encode.
template <bool kSigned>
inline float int8_encode_block(const float* __restrict x, const float* __restrict mids, const BucketTable& table,
                               uint8_t* __restrict out) {
  uint32_t acc = 0;
  for (int64_t k = 0; k < kInt8Block; ++k) acc = umax32(acc, f32_bits(x[k]) & kF32AbsMask);
  const float absmax = bits_f32(acc);  // a block holding NaN: NaN, as torch's amax
  const float safe = absmax > 0.f ? absmax : 1.f;
  constexpr float lo = kSigned ? -1.f : 0.f;
  int64_t k = 0;
#ifdef __AVX2__
  const __m256 sv = _mm256_set1_ps(safe), lov = _mm256_set1_ps(lo), one = _mm256_set1_ps(1.f);
  if (table.ok) {
    const int32_t* first = table.first.data();
    const float* padded = table.mids.data();
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF), half = _mm256_set1_epi32(kKeyHalf);
    // keys in vector registers, then the two table reads per value with scalar loads (faster than
    // AVX2 gathers here)
    alignas(32) float ys[kInt8Block];
    alignas(32) int32_t keys[kInt8Block];
    for (; k + 8 <= kInt8Block; k += 8) {
      __m256 y = _mm256_div_ps(_mm256_loadu_ps(x + k), sv);
      y = _mm256_blendv_ps(y, lov, _mm256_cmp_ps(y, lov, _CMP_LT_OQ));
      y = _mm256_blendv_ps(y, one, _mm256_cmp_ps(y, one, _CMP_GT_OQ));
      // bucket_index, 8 lanes
      const __m256i yb = _mm256_castps_si256(y);
      const __m256i a = _mm256_and_si256(yb, abs_mask);
      __m256i key = _mm256_add_epi32(_mm256_sub_epi32(_mm256_srli_epi32(a, 15), _mm256_set1_epi32(kKeyExpMin << 8)),
                                     _mm256_set1_epi32(1));
      key = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(kKeyExpMin), _mm256_srli_epi32(a, 23)), key);
      key = _mm256_min_epi32(key, half);
      const __m256i neg = _mm256_srai_epi32(yb, 31);
      key = _mm256_add_epi32(half, _mm256_sub_epi32(_mm256_xor_si256(key, neg), neg));
      _mm256_store_ps(ys + k, y);
      _mm256_store_si256(reinterpret_cast<__m256i*>(keys + k), key);
    }
    lookup_codes(first, padded, ys, keys, out);
    return absmax;
  }
#endif
  // no AVX2, or a book the table cannot serve: the search itself
  for (; k < kInt8Block; ++k) {
    float y = x[k] / safe;
    y = y < lo ? lo : (y > 1.f ? 1.f : y);
    out[k] = (uint8_t)bucket(mids, y);
  }
  return absmax;
}

// ------------------------------------------------------------------------------------ the fused step
// The step of every piece overlapping the block [b0, b0 + nb) on its decoded moments mb, vb.
inline void step_block(const Carrier& c, const Piece* pieces, int64_t& pi, int64_t b0, int64_t nb, float* mb,
                       float* vb) {
  while (pi < c.piece1 && pieces[pi].start + pieces[pi].len <= b0) ++pi;
  for (int64_t j = pi; j < c.piece1 && pieces[j].start < b0 + nb; ++j) {
    const Piece& pc = pieces[j];
    const int64_t lo = std::max(pc.start, b0), hi = std::min(pc.start + pc.len, b0 + nb);
    if (lo >= hi || pc.s.skip) continue;  // a skipped piece is a gap: no step, no zeroing after it
    adam_step_range(c.p + lo, pc.g + (lo - pc.start), mb + (lo - b0), vb + (lo - b0), hi - lo, pc.s);
    if (pc.zero_after) {
      std::fill(mb + (lo - b0), mb + (hi - b0), 0.f);
      std::fill(vb + (lo - b0), vb + (hi - b0), 0.f);
    }
  }
}

inline void mask_m(float* __restrict mb, const float* __restrict vb, int64_t n) {
  for (int64_t k = 0; k < n; ++k) mb[k] = vb[k] == 0.f ? 0.f : mb[k];
}

void run_bf16(const Carrier& c, const Piece* pieces, int64_t begin, int64_t end, std::vector<uint32_t>& scratch) {
  constexpr int64_t B = 256;
  alignas(32) float mb[B], vb[B];
  uint16_t* m = static_cast<uint16_t*>(c.m);
  uint16_t* v = static_cast<uint16_t*>(c.v);
  int64_t pi = c.piece0;
  for (int64_t b0 = begin; b0 < end; b0 += B) {
    const int64_t nb = std::min(B, end - b0);
    bf16_decode(m + b0, mb, nb);
    bf16_decode(v + b0, vb, nb);
    step_block(c, pieces, pi, b0, nb, mb, vb);
    bf16_encode_sr(mb, nb, contiguous_bits(c.seed_m, (uint64_t)b0, nb, scratch), m + b0);
    bf16_encode_sr(vb, nb, contiguous_bits(c.seed_v, (uint64_t)b0, nb, scratch), v + b0);
  }
}

void run_fp8(const Carrier& c, const Piece* pieces, int64_t begin, int64_t end) {
  constexpr int64_t B = kFp8Block;
  alignas(32) float mb[B], vb[B];
  const float* lut_m = decode_lut<lowbit::E4M3>();
  const float* lut_v = decode_lut<lowbit::E5M2>();
  uint8_t* m = static_cast<uint8_t*>(c.m);
  uint8_t* v = static_cast<uint8_t*>(c.v);
  int64_t pi = c.piece0;
  for (int64_t b0 = begin; b0 < end; b0 += B) {
    const int64_t nb = std::min(B, end - b0), blk = b0 / B;
    fp8_decode(m + b0, lut_m, c.m_scale[blk], mb, nb);
    fp8_decode(v + b0, lut_v, c.v_scale[blk], vb, nb);
    std::fill(mb + nb, mb + B, 0.f);
    std::fill(vb + nb, vb + B, 0.f);
    mask_m(mb, vb, nb);
    step_block(c, pieces, pi, b0, nb, mb, vb);
    c.m_scale[blk] = fp8_encode_block<lowbit::E4M3>(mb, m + b0);
    c.v_scale[blk] = fp8_encode_block<lowbit::E5M2>(vb, v + b0);
  }
}

void run_int8(const Carrier& c, const Piece* pieces, int64_t begin, int64_t end, const Books& books) {
  constexpr int64_t B = kInt8Block;
  alignas(32) float mb[B], vb[B];
  uint8_t* m = static_cast<uint8_t*>(c.m);
  uint8_t* v = static_cast<uint8_t*>(c.v);
  int64_t pi = c.piece0;
  for (int64_t b0 = begin; b0 < end; b0 += B) {
    const int64_t nb = std::min(B, end - b0), blk = b0 / B;
    int8_decode(m + b0, books.code_m, c.m_scale[blk], mb, nb);
    int8_decode(v + b0, books.code_v, c.v_scale[blk], vb, nb);
    std::fill(mb + nb, mb + B, 0.f);
    std::fill(vb + nb, vb + B, 0.f);
    mask_m(mb, vb, nb);
    step_block(c, pieces, pi, b0, nb, mb, vb);
    c.m_scale[blk] = int8_encode_block<true>(mb, books.mids_m, *books.table_m, m + b0);
    c.v_scale[blk] = int8_encode_block<false>(vb, books.mids_v, *books.table_v, v + b0);
  }
}

// ------------------------------------------------------------------------------------ checks
void check_cpu(const at::Tensor& t, at::ScalarType dtype, const char* what, int64_t i) {
  TORCH_CHECK(t.defined() && t.device().is_cpu(), what, "[", i, "]: expected a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, what, "[", i, "]: expected ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), what, "[", i, "]: expected a contiguous tensor");
}

StateFmt parse_state_dtype(const std::string& s) {
  if (s == "bf16") return kStateBF16;
  if (s == "fp8") return kStateFP8;
  if (s == "int8") return kStateInt8;
  TORCH_CHECK(false, "state_dtype: expected 'bf16', 'fp8' or 'int8', got '", s, "'");
  return kStateBF16;
}

// One fused step over `params` (the carriers, fp32) and their stored moments, in place.
//   ms / vs            bf16 [n]; fp8 e4m3 / e5m2 [ceil(n / 128) * 128]; int8 uint8 [ceil(n / 256) * 256]
//   m_scales / v_scales  fp8 / int8: fp32 [number of blocks]; bf16: empty lists
//   grads              one fp32 tensor per piece, its length
//   pieces             int64 [P, 3]: (carrier index, start, length), non-overlapping within a carrier
//   scalars            fp64 [P, 15]: lowbit.optim.kernels.SCALARS (skip last), then zero_after (0 / 1)
//   seeds              int64 [C, 2]: stochastic-rounding seeds of (m, v) per carrier (bf16)
//   books              int8: code_m [256], mids_m [255], code_v [256], mids_v [255] (fp32); else empty
void lowprec_step(const std::string& state_dtype, const std::vector<at::Tensor>& params,
                  const std::vector<at::Tensor>& ms, const std::vector<at::Tensor>& m_scales,
                  const std::vector<at::Tensor>& vs, const std::vector<at::Tensor>& v_scales,
                  const std::vector<at::Tensor>& grads, const at::Tensor& pieces_t, const at::Tensor& scalars,
                  const at::Tensor& seeds, const std::vector<at::Tensor>& books_t) {
  const StateFmt fmt = parse_state_dtype(state_dtype);
  const int64_t nc = static_cast<int64_t>(params.size());
  TORCH_CHECK(ms.size() == params.size() && vs.size() == params.size(),
              "params, ms, vs: expected lists of the same length");
  const bool scaled = fmt != kStateBF16;
  if (scaled) {
    TORCH_CHECK(m_scales.size() == params.size() && v_scales.size() == params.size(),
                "m_scales, v_scales: expected one scale tensor per carrier");
  } else {
    TORCH_CHECK(m_scales.empty() && v_scales.empty(), "m_scales, v_scales: bf16 state has no scales");
  }
  TORCH_CHECK(pieces_t.device().is_cpu() && pieces_t.scalar_type() == at::kLong && pieces_t.dim() == 2 &&
                  pieces_t.size(1) == 3 && pieces_t.is_contiguous(),
              "pieces: expected a contiguous [P, 3] int64 CPU tensor");
  const int64_t np = pieces_t.size(0);
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == np, "grads: expected one gradient per piece (", np,
              "), got ", grads.size());
  TORCH_CHECK(scalars.device().is_cpu() && scalars.scalar_type() == at::kDouble && scalars.dim() == 2 &&
                  scalars.size(0) == np && scalars.size(1) == kScalarCols && scalars.is_contiguous(),
              "scalars: expected a contiguous [P, ", kScalarCols, "] fp64 CPU tensor");
  TORCH_CHECK(seeds.device().is_cpu() && seeds.scalar_type() == at::kLong && seeds.dim() == 2 &&
                  seeds.size(0) == nc && seeds.size(1) == 2 && seeds.is_contiguous(),
              "seeds: expected a contiguous [C, 2] int64 CPU tensor");
  Books books{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  std::unique_ptr<BucketTable> table_m, table_v;
  if (fmt == kStateInt8) {
    TORCH_CHECK(books_t.size() == 4, "books: int8 state needs (code_m, mids_m, code_v, mids_v)");
    for (int64_t i = 0; i < 4; ++i) {
      check_cpu(books_t[i], at::kFloat, "books", i);
      TORCH_CHECK(books_t[i].numel() == (i % 2 ? 255 : 256), "books[", i, "]: expected ", (i % 2 ? 255 : 256),
                  " values, got ", books_t[i].numel());
    }
    for (int64_t i = 1; i < 4; i += 2) {
      const float* mids = books_t[i].data_ptr<float>();
      for (int64_t j = 1; j < 255; ++j)
        TORCH_CHECK(mids[j - 1] < mids[j], "books[", i, "]: expected increasing midpoints");
    }
    table_m = std::make_unique<BucketTable>(books_t[1].data_ptr<float>());
    table_v = std::make_unique<BucketTable>(books_t[3].data_ptr<float>());
    books = {books_t[0].data_ptr<float>(), books_t[1].data_ptr<float>(), books_t[2].data_ptr<float>(),
             books_t[3].data_ptr<float>(), table_m.get(), table_v.get()};
  }

  const int64_t block = fmt == kStateFP8 ? kFp8Block : kInt8Block;
  const auto m_dtype = fmt == kStateBF16 ? at::kBFloat16 : fmt == kStateFP8 ? at::kFloat8_e4m3fn : at::kByte;
  const auto v_dtype = fmt == kStateBF16 ? at::kBFloat16 : fmt == kStateFP8 ? at::kFloat8_e5m2 : at::kByte;
  const int64_t* sd = seeds.data_ptr<int64_t>();
  std::vector<Carrier> carriers(nc);
  for (int64_t c = 0; c < nc; ++c) {
    check_cpu(params[c], at::kFloat, "params", c);
    check_cpu(ms[c], m_dtype, "ms", c);
    check_cpu(vs[c], v_dtype, "vs", c);
    const int64_t n = params[c].numel();
    const int64_t nblk = (n + block - 1) / block;
    const int64_t stored = scaled ? nblk * block : n;
    TORCH_CHECK(ms[c].numel() == stored && vs[c].numel() == stored, "ms, vs: carrier ", c, " of ", n,
                " elements needs ", stored, " stored values, got ", ms[c].numel(), " and ", vs[c].numel());
    Carrier& k = carriers[c];
    k = {params[c].data_ptr<float>(), n, ms[c].data_ptr(), vs[c].data_ptr(), nullptr, nullptr, 0, 0, 0, 0};
    if (scaled) {
      check_cpu(m_scales[c], at::kFloat, "m_scales", c);
      check_cpu(v_scales[c], at::kFloat, "v_scales", c);
      TORCH_CHECK(m_scales[c].numel() == nblk && v_scales[c].numel() == nblk, "m_scales, v_scales: carrier ", c,
                  " needs ", nblk, " block scales, got ", m_scales[c].numel(), " and ", v_scales[c].numel());
      k.m_scale = m_scales[c].data_ptr<float>();
      k.v_scale = v_scales[c].data_ptr<float>();
    }
    TORCH_CHECK(sd[2 * c] >= 0 && sd[2 * c + 1] >= 0, "seeds: expected non-negative seeds");
    k.seed_m = static_cast<uint64_t>(sd[2 * c]);
    k.seed_v = static_cast<uint64_t>(sd[2 * c + 1]);
  }
  for (int64_t c = 0; c < nc; ++c)
    for (int64_t d = c + 1; d < nc; ++d)
      TORCH_CHECK(!params[c].is_same(params[d]), "params: carrier ", c, " appears twice (as ", d, ")");

  // pieces, sorted by (carrier, start)
  const int64_t* pr = pieces_t.data_ptr<int64_t>();
  const double* sc = scalars.data_ptr<double>();
  std::vector<int64_t> order(np);
  std::iota(order.begin(), order.end(), 0);
  for (int64_t i = 0; i < np; ++i) {
    const int64_t c = pr[3 * i], start = pr[3 * i + 1], len = pr[3 * i + 2];
    TORCH_CHECK(c >= 0 && c < nc, "pieces: piece ", i, " names carrier ", c, " of ", nc);
    TORCH_CHECK(start >= 0 && len >= 0 && start + len <= carriers[c].n, "pieces: piece ", i, " [", start, ", ",
                start + len, ") lies outside its carrier of ", carriers[c].n, " elements");
    check_cpu(grads[i], at::kFloat, "grads", i);
    TORCH_CHECK(grads[i].numel() == len, "grads[", i, "]: expected ", len, " elements, got ", grads[i].numel());
  }
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return pr[3 * a] != pr[3 * b] ? pr[3 * a] < pr[3 * b] : pr[3 * a + 1] < pr[3 * b + 1];
  });
  std::vector<Piece> pieces(np);
  for (int64_t j = 0; j < np; ++j) {
    const int64_t i = order[j];
    const double* row = sc + kScalarCols * i;
    pieces[j] = {pr[3 * i + 1], pr[3 * i + 2], grads[i].data_ptr<float>(), scalars_from_row(row), row[kScalarCount] != 0.0};
  }
  std::vector<bool> live(nc, false);  // the carrier has a piece to step
  for (int64_t c = 0, j = 0; c < nc; ++c) {
    carriers[c].piece0 = j;
    int64_t end = 0;
    for (; j < np && pr[3 * order[j]] == c; ++j) {
      TORCH_CHECK(pieces[j].start >= end, "pieces: pieces of carrier ", c, " overlap");
      end = pieces[j].start + pieces[j].len;
      live[c] = live[c] || !pieces[j].s.skip;
    }
    carriers[c].piece1 = j;
  }

  struct Item {
    int64_t carrier, begin, end;
  };
  std::vector<Item> items;
  for (int64_t c = 0; c < nc; ++c) {
    if (!live[c]) continue;  // no work items: its moments keep their codes and scales
    for (int64_t b = 0; b < carriers[c].n; b += kChunk) items.push_back({c, b, std::min(carriers[c].n, b + kChunk)});
  }

  pybind11::gil_scoped_release nogil;
  const int64_t ni = static_cast<int64_t>(items.size());
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<uint32_t> scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < ni; ++i) {
      const Item& it = items[i];
      const Carrier& c = carriers[it.carrier];
      if (fmt == kStateBF16) run_bf16(c, pieces.data(), it.begin, it.end, scratch);
      else if (fmt == kStateFP8) run_fp8(c, pieces.data(), it.begin, it.end);
      else run_int8(c, pieces.data(), it.begin, it.end, books);
    }
  }
}

const lowbit::Bindings<lowbit::CpuExt> kLowprecBindings([](pybind11::module_& m) {
  m.def("optim_lowprec_step", &lowprec_step,
        "Fused Stable-SPAM step on bf16 / fp8 / int8 moments (decode, step, encode per block), in place",
        pybind11::arg("state_dtype"), pybind11::arg("params"), pybind11::arg("ms"), pybind11::arg("m_scales"),
        pybind11::arg("vs"), pybind11::arg("v_scales"), pybind11::arg("grads"), pybind11::arg("pieces"),
        pybind11::arg("scalars"), pybind11::arg("seeds"), pybind11::arg("books"));
});

}  // namespace
}  // namespace lowbit::cpu::optim
