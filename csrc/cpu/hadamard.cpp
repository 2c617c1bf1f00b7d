// Random Hadamard transform on CPU, in the evaluation order of lowbit/backends/ref.py:
// signs, butterfly stages h = 1, 2, ..., b/2 with (a + c, a - c), then the fp32(1/sqrt(b)) factor
// (the inverse: butterfly, factor, signs). Each stage pairs the same elements whatever the loop
// order, so chunking the early stages for the cache gives the same bits.
#include <cmath>

#include "common.h"

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace lowbit {
namespace cpu {

std::vector<float> hadamard_signs(int64_t block, bool with_signs, uint64_t seed, int64_t K) {
  const int64_t len = block >= kHadamardSegment ? block : (K < kHadamardSegment ? K : kHadamardSegment);
  std::vector<float> s((size_t)len, 1.0f);
  if (with_signs) {
    for (int64_t j = 0; j < block; ++j) s[(size_t)j] = hadamard_sign(seed, (uint32_t)j);
    for (int64_t j = block; j < len; ++j) s[(size_t)j] = s[(size_t)(j % block)];
  }
  return s;
}

float hadamard_norm(int64_t block) { return (float)(1.0 / std::sqrt((double)block)); }

void check_hadamard_block(int64_t block, int64_t K) {
  TORCH_CHECK(block >= 16 && block <= 32768 && (block & (block - 1)) == 0,
              "hadamard: block must be a power of two in [16, 32768], got ", block);
  TORCH_CHECK(K % block == 0, "hadamard: block ", block, " must divide the transformed dimension, which has size ", K);
}

// Stages h = 1, 2, 4 on consecutive groups of 8 (n a multiple of 8).
static void stages_up_to_4(float* y, int64_t n) {
#ifdef __AVX2__
  for (int64_t i = 0; i < n; i += 8) {
    __m256 v = _mm256_loadu_ps(y + i);
    __m256 s = _mm256_permute_ps(v, 0xB1);
    v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xAA);
    s = _mm256_permute_ps(v, 0x4E);
    v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xCC);
    s = _mm256_permute2f128_ps(v, v, 0x01);
    v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xF0);
    _mm256_storeu_ps(y + i, v);
  }
#else
  for (int64_t h = 1; h < 8; h *= 2) {
    for (int64_t j0 = 0; j0 < n; j0 += 2 * h) {
      for (int64_t j = j0; j < j0 + h; ++j) {
        const float a = y[j], c = y[j + h];
        y[j] = a + c;
        y[j + h] = a - c;
      }
    }
  }
#endif
}

static void stage(float* y, int64_t n, int64_t h) {
  for (int64_t j0 = 0; j0 < n; j0 += 2 * h) {
    float* __restrict a = y + j0;
    float* __restrict c = y + j0 + h;
    for (int64_t j = 0; j < h; ++j) {
      const float u = a[j], w = c[j];
      a[j] = u + w;
      c[j] = u - w;
    }
  }
}

static void butterfly(float* y, int64_t block) {
  constexpr int64_t kChunk = 2048;  // 8 KiB: the early stages run chunk by chunk in L1
  const int64_t chunk = block < kChunk ? block : kChunk;
  for (int64_t c0 = 0; c0 < block; c0 += chunk) {
    stages_up_to_4(y + c0, chunk);
    for (int64_t h = 8; h < chunk; h *= 2) stage(y + c0, chunk, h);
  }
  for (int64_t h = chunk; h < block; h *= 2) stage(y, block, h);
}

// Blocks below kHadamardSegment are transformed a whole segment of the row at a time: every
// stage h < block pairs elements inside the same block, so running it over many aligned blocks
// at once is the same arithmetic with long, vectorised loops.
void hadamard_row(float* y, int64_t K, int64_t block, const float* signs, float norm, bool inverse) {
  const int64_t seg = block >= kHadamardSegment ? block : (K < kHadamardSegment ? K : kHadamardSegment);
  for (int64_t s0 = 0; s0 < K; s0 += seg) {
    float* __restrict ys = y + s0;
    const int64_t n = K - s0 < seg ? K - s0 : seg;
    if (!inverse) {
      for (int64_t j = 0; j < n; ++j) ys[j] = ys[j] * signs[j];
    }
    if (block >= kHadamardSegment) {
      butterfly(ys, block);
    } else {
      stages_up_to_4(ys, n);
      for (int64_t h = 8; h < block; h *= 2) stage(ys, n, h);
    }
    for (int64_t j = 0; j < n; ++j) ys[j] = ys[j] * norm;
    if (inverse) {
      for (int64_t j = 0; j < n; ++j) ys[j] = ys[j] * signs[j];
    }
  }
}

template <class In>
static void hadamard_rows(const In* x, float* out, int64_t R, int64_t K, int64_t block, const float* signs,
                          float norm, bool inverse) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    float* y = out + r * K;
    load_row<In>(x + r * K, y, K);
    hadamard_row(y, K, block, signs, norm, inverse);
  }
}

// seed: the Philox key of the signs (enums.h), or none for the plain Sylvester transform.
at::Tensor hadamard(const at::Tensor& x_in, int64_t block, const c10::optional<int64_t>& seed, bool inverse) {
  TORCH_CHECK(x_in.device().is_cpu(), "hadamard: expected a CPU tensor, got one on ", x_in.device());
  TORCH_CHECK(x_in.dim() == 2, "hadamard: expected a 2-D [R, K] tensor, got ", x_in.dim(), " dims");
  const auto st = x_in.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "hadamard: expected float32, bfloat16 or float16 input, got ", st);
  const at::Tensor x = x_in.contiguous();
  const int64_t R = x.size(0), K = x.size(1);
  check_hadamard_block(block, K);
  at::Tensor out = at::empty({R, K}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return out;
  const std::vector<float> signs = hadamard_signs(block, seed.has_value(), (uint64_t)seed.value_or(0), K);
  const float norm = hadamard_norm(block);
  float* o = out.data_ptr<float>();
  if (st == at::kFloat) {
    hadamard_rows<float>(x.data_ptr<float>(), o, R, K, block, signs.data(), norm, inverse);
  } else if (st == at::kBFloat16) {
    hadamard_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), o, R, K, block, signs.data(), norm, inverse);
  } else {
    hadamard_rows<c10::Half>(x.data_ptr<c10::Half>(), o, R, K, block, signs.data(), norm, inverse);
  }
  return out;
}

}  // namespace cpu
}  // namespace lowbit
