// Block-sparse attention on CPU (lowbit.backends.cpu_attention): each query block reads only its
// selected key blocks, in place, so work and memory traffic scale with the block density.
//
// One task per (batch, head, query block). Its selected key blocks (ascending; the diagonal is the
// last one when causal) are scored into a [rows, c * bs] buffer with one small GEMM per block
// (oneDNN brgemm through ATen), soft-maxed row by row in fp32, and P @ V is accumulated straight
// into the output with one GEMM per block. K arrives pre-transposed per block ([D, bs], zero-padded)
// so every GEMM is a plain row-major A[M, K] @ B[K, N].
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "lowbit/registry.h"

namespace {

// exp(x) for x <= 0 (scores minus their row max), -inf -> 0. Cephes' single-precision polynomial
// (relative error ~2 ulp), written branch-free so the compiler vectorises the loop.
inline float exp_nonpositive(float x) {
  const bool underflow = x < -87.0f;
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return underflow ? 0.0f : p * scale;
}

torch::Tensor block_sparse_attention_f32(const torch::Tensor& q, const torch::Tensor& kt, const torch::Tensor& v,
                                         const torch::Tensor& counts, const torch::Tensor& cols, int64_t bs,
                                         bool causal, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && kt.dtype() == torch::kFloat32 && v.dtype() == torch::kFloat32,
              "block_sparse_attention: expected fp32 q, kt, v");
  TORCH_CHECK(q.is_contiguous() && kt.is_contiguous() && v.is_contiguous() && counts.is_contiguous() &&
                  cols.is_contiguous(), "block_sparse_attention: expected contiguous tensors");
  TORCH_CHECK(counts.dtype() == torch::kInt32 && cols.dtype() == torch::kInt32,
              "block_sparse_attention: expected int32 block lists");
  TORCH_CHECK(q.dim() == 4 && kt.dim() == 5 && v.dim() == 4, "block_sparse_attention: bad ranks");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  const int64_t Hk = kt.size(1), n = kt.size(2), Dv = v.size(3);
  TORCH_CHECK(kt.size(3) == D && kt.size(4) == bs && n == (S + bs - 1) / bs && H % Hk == 0 && v.size(2) == S,
              "block_sparse_attention: inconsistent shapes");
  TORCH_CHECK(counts.numel() == B * H * n && cols.numel() == B * H * n * n,
              "block_sparse_attention: block lists do not match the blocks");
  const int64_t g = H / Hk;
  auto out = torch::empty({B, H, S, Dv}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* ktp = kt.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int32_t* cnt = counts.data_ptr<int32_t>();
  const int32_t* cl = cols.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const float ninf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, B * H * n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf, inv;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % n, bh = row / n, b = bh / H, h = bh % H, kvh = b * Hk + h / g;
      const int64_t r0 = i * bs, m = std::min(bs, S - r0);
      const int64_t c = cnt[row], ld = c * bs;
      buf.resize(static_cast<size_t>(m * ld));
      float* s = buf.data();
      const float* qb = qp + (bh * S + r0) * D;
      for (int64_t t = 0; t < c; ++t) {
        const int64_t j = cl[row * n + t], nk = std::min(bs, S - j * bs);
        at::native::cpublas::brgemm(m, nk, D, D, bs, ld, false, qb, ktp + (kvh * n + j) * D * bs, s + t * bs, false);
        for (int64_t r = 0; r < m; ++r) {
          float* sr = s + r * ld + t * bs;
          for (int64_t col = nk; col < bs; ++col) sr[col] = ninf;  // past the end of the sequence
          if (causal && j == i)
            for (int64_t col = r + 1; col < nk; ++col) sr[col] = ninf;
        }
      }
      inv.resize(static_cast<size_t>(m));
      for (int64_t r = 0; r < m; ++r) {
        float* sr = s + r * ld;
        float mx = ninf;
#pragma omp simd reduction(max : mx)
        for (int64_t col = 0; col < ld; ++col) mx = std::max(mx, sr[col]);
        float sum = 0.0f;
        // softmax of scale * s: the max of s is the max of scale * s (scale > 0); -inf -> 0
#pragma omp simd reduction(+ : sum)
        for (int64_t col = 0; col < ld; ++col) {
          sr[col] = exp_nonpositive((sr[col] - mx) * sc);
          sum += sr[col];
        }
        inv[r] = 1.0f / sum;
      }
      float* ob = op + (bh * S + r0) * Dv;
      for (int64_t t = 0; t < c; ++t) {
        const int64_t j = cl[row * n + t], nk = std::min(bs, S - j * bs);
        at::native::cpublas::brgemm(m, Dv, nk, ld, Dv, Dv, t > 0, s + t * bs, vp + (kvh * S + j * bs) * Dv, ob, false);
      }
      for (int64_t r = 0; r < m; ++r)
        for (int64_t d = 0; d < Dv; ++d) ob[r * Dv + d] *= inv[r];
    }
    at::native::cpublas::brgemm_release(false);
  });
  return out;
}

const lowbit::Bindings<lowbit::CpuExt> kAttention([](pybind11::module_& m) {
  m.def("block_sparse_attention_f32", &block_sparse_attention_f32,
        "Block-sparse attention over per-row lists of selected key blocks (fp32; K pre-transposed per block)",
        pybind11::arg("q"), pybind11::arg("kt"), pybind11::arg("v"), pybind11::arg("counts"), pybind11::arg("cols"),
        pybind11::arg("block_size"), pybind11::arg("causal"), pybind11::arg("scale"));
});

}  // namespace
