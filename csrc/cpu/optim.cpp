// Stable-SPAM step kernels for CPU: per-tensor statistics and the fused elementwise update, each one
// call over a list of tensors with OpenMP across (tensor, chunk) work items. Bit-exact with the spec in
// lowbit/backends/ref/optim.py: every fp32 operation rounded on its own (the build uses -ffp-contract=off),
// and sum g^2 in fp64 over the spec's fixed tree (16 lanes, adjacent pairwise tree over rows).
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "adam.h"
#include "lowbit/registry.h"

namespace lowbit::cpu::optim {
namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kStatRows = 4096;     // rows per statistics work item: an aligned subtree of the spec's tree
constexpr int64_t kStepChunk = 1 << 15;  // elements per elementwise work item

struct Lanes {
  double v[kLanes];
};

// Pairwise sum over a stream of rows: a binary counter whose entry i is a complete subtree of
// 2^level[i] rows; folding what is left from the right equals the tree over rows padded with zeros.
struct PairwiseTree {
  Lanes s[64];
  int level[64];
  int n = 0;

  // `x` is a complete subtree of 2^l rows; pushes of a stream come in row order, levels never rising
  // after a lower one (full blocks first, then single rows).
  inline void push(Lanes x, int l) {
    while (n > 0 && level[n - 1] == l) {
      const Lanes& left = s[n - 1];
      for (int k = 0; k < kLanes; ++k) x.v[k] = left.v[k] + x.v[k];
      --n;
      ++l;
    }
    s[n] = x;
    level[n] = l;
    ++n;
  }

  Lanes fold() const {
    Lanes acc{};
    if (n == 0) return acc;
    acc = s[n - 1];
    for (int i = n - 2; i >= 0; --i)
      for (int k = 0; k < kLanes; ++k) acc.v[k] = s[i].v[k] + acc.v[k];
    return acc;
  }
};

double lane_tree(Lanes x) {
  for (int w = kLanes; w > 1; w /= 2)
    for (int i = 0; i < w / 2; ++i) x.v[i] = x.v[2 * i] + x.v[2 * i + 1];
  return x.v[0];
}

struct StatItem {
  int64_t tensor, row0, row1;
  Lanes sum;
  float amax;
  int64_t count;
};

// One row of the statistics pass: fp64 squares of the 16 values (clipped with kClip) and, lane by
// lane, the running max |g| (or the clip count); lane-wise so that the loop vectorises.
template <bool kClip>
inline void square_row(const float* src, double* q, float* mx, int32_t* cnt, float mh, float r) {
  for (int k = 0; k < kLanes; ++k) {
    float x = src[k];
    const float a = std::fabs(x);
    if (kClip) {
      const bool c = a > mh;
      cnt[k] += c;
      x = c ? x * r : x;
    } else {
      mx[k] = a > mx[k] ? a : mx[k];
    }
    q[k] = static_cast<double>(x) * static_cast<double>(x);
  }
}

constexpr int kBlockLevel = 4;                  // full blocks are complete subtrees of 2^4 rows ...
constexpr int kBlockRows = 1 << kBlockLevel;  // ... summed in registers before entering the counter

// Rows [row0, row1) of one tensor (row0 a multiple of kBlockRows): max |g| (or the clip count) and
// the subtree sum of squares. Full blocks of 16 rows are reduced in registers (an aligned complete
// subtree of the spec's tree) and pushed at level 4; the tail goes row by row.
template <bool kClip>
void stat_rows(const float* g, int64_t n, StatItem& it, float mh, float r) {
  PairwiseTree tree;
  float mx[kLanes] = {};
  int32_t cnt[kLanes] = {};
  int64_t row = it.row0;
  for (; row + kBlockRows <= it.row1 && (row + kBlockRows) * kLanes <= n; row += kBlockRows) {
    Lanes q[kBlockRows];
    const float* src = g + row * kLanes;
    for (int j = 0; j < kBlockRows; ++j) square_row<kClip>(src + j * kLanes, q[j].v, mx, cnt, mh, r);
    for (int w = kBlockRows; w > 1; w /= 2)
      for (int j = 0; j < w / 2; ++j)
        for (int k = 0; k < kLanes; ++k) q[j].v[k] = q[2 * j].v[k] + q[2 * j + 1].v[k];
    tree.push(q[0], kBlockLevel);
  }
  for (; row < it.row1; ++row) {
    Lanes q;
    float src[kLanes];
    const int64_t base = row * kLanes;
    for (int k = 0; k < kLanes; ++k) src[k] = base + k < n ? g[base + k] : 0.f;
    square_row<kClip>(src, q.v, mx, cnt, mh, r);
    tree.push(q, 0);
  }
  it.sum = tree.fold();
  float amax = 0.f;
  int64_t count = 0;
  for (int k = 0; k < kLanes; ++k) {
    amax = std::max(amax, mx[k]);
    count += cnt[k];
  }
  it.amax = amax;
  it.count = count;
}

void check_f32(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, ": expected CPU tensors");
  TORCH_CHECK(t.scalar_type() == at::kFloat, what, ": expected fp32 tensors, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), what, ": expected contiguous tensors");
}

// -> [n, 2] fp64: (max |g| or +inf where g holds NaN / Inf, sum g^2) or, with clipping,
// (sum of clipped values squared, clipped count); `table` (clipping only): rows (clip, mh, r), a
// tensor whose clip is 0 is not read and gets (0, 0).
template <bool kClip>
at::Tensor stats_impl(const std::vector<at::Tensor>& grads, const double* table) {
  const int64_t nt = static_cast<int64_t>(grads.size());
  std::vector<StatItem> items;
  for (int64_t t = 0; t < nt; ++t) {
    check_f32(grads[t], "grads");
    if (kClip && table[3 * t] == 0.0) continue;  // no work items: its sums fold to (0, 0)
    const int64_t rows = (grads[t].numel() + kLanes - 1) / kLanes;
    for (int64_t r0 = 0; r0 < rows; r0 += kStatRows) items.push_back({t, r0, std::min(rows, r0 + kStatRows), {}, 0.f, 0});
  }
  std::vector<const float*> ptr(nt);
  std::vector<int64_t> numel(nt);
  for (int64_t t = 0; t < nt; ++t) {
    ptr[t] = grads[t].data_ptr<float>();
    numel[t] = grads[t].numel();
  }
  {
    pybind11::gil_scoped_release nogil;
    const int64_t ni = static_cast<int64_t>(items.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
    for (int64_t i = 0; i < ni; ++i) {
      StatItem& it = items[i];
      const float m = kClip ? static_cast<float>(table[3 * it.tensor + 1]) : 0.f;
      const float s = kClip ? static_cast<float>(table[3 * it.tensor + 2]) : 0.f;
      stat_rows<kClip>(ptr[it.tensor], numel[it.tensor], it, m, s);
    }
  }
  at::Tensor out = at::zeros({nt, 2}, at::kDouble);
  double* o = out.data_ptr<double>();
  size_t i = 0;
  for (int64_t t = 0; t < nt; ++t) {
    PairwiseTree tree;  // chunk subtrees combine with the same tree as rows
    float amax = 0.f;
    int64_t count = 0;
    for (; i < items.size() && items[i].tensor == t; ++i) {
      tree.push(items[i].sum, 0);
      amax = std::max(amax, items[i].amax);
      count += items[i].count;
    }
    const double sumsq = lane_tree(tree.fold());
    if (kClip) {
      o[2 * t] = sumsq;
      o[2 * t + 1] = static_cast<double>(count);
    } else {
      o[2 * t] = std::isfinite(sumsq) ? static_cast<double>(amax) : INFINITY;
      o[2 * t + 1] = sumsq;
    }
  }
  return out;
}

at::Tensor grad_stats(const std::vector<at::Tensor>& grads) { return stats_impl<false>(grads, nullptr); }

// A per-tensor fp64 table of `cols` columns, one row per tensor, on the CPU; contiguous.
at::Tensor table_arg(const at::Tensor& t, int64_t rows, int64_t cols, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, ": expected a [", rows, ", ", cols, "] fp64 tensor on the CPU, got one on ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kDouble && t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, what,
              ": expected a [", rows, ", ", cols, "] fp64 tensor, got ", t.scalar_type(), " of shape ", t.sizes());
  return t.contiguous();
}

at::Tensor clip_stats(const std::vector<at::Tensor>& grads, const at::Tensor& table) {
  const at::Tensor tab = table_arg(table, static_cast<int64_t>(grads.size()), 3, "table");
  return stats_impl<true>(grads, tab.data_ptr<double>());
}

void adam_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& ms, const std::vector<at::Tensor>& vs, const at::Tensor& scalars) {
  const int64_t nt = static_cast<int64_t>(params.size());
  TORCH_CHECK(grads.size() == params.size() && ms.size() == params.size() && vs.size() == params.size(),
              "params, grads, ms, vs: expected lists of the same length");
  const at::Tensor tab = table_arg(scalars, nt, kScalarCount, "scalars");
  const double* sc = tab.data_ptr<double>();
  std::vector<Scalars> s(nt);
  struct Item {
    int64_t tensor, begin, end;
  };
  std::vector<Item> items;
  std::vector<float*> pp(nt), mp(nt), vp(nt);
  std::vector<const float*> gp(nt);
  for (int64_t t = 0; t < nt; ++t) {
    check_f32(params[t], "params");
    check_f32(grads[t], "grads");
    check_f32(ms[t], "ms");
    check_f32(vs[t], "vs");
    const int64_t n = params[t].numel();
    TORCH_CHECK(grads[t].numel() == n && ms[t].numel() == n && vs[t].numel() == n,
                "params, grads, ms, vs: tensor ", t, " differs in size");
    s[t] = scalars_from_row(sc + kScalarCount * t);
    pp[t] = params[t].data_ptr<float>();
    gp[t] = grads[t].data_ptr<float>();
    mp[t] = ms[t].data_ptr<float>();
    vp[t] = vs[t].data_ptr<float>();
    if (s[t].skip) continue;  // no work items: left untouched
    for (int64_t b = 0; b < n; b += kStepChunk) items.push_back({t, b, std::min(n, b + kStepChunk)});
  }
  pybind11::gil_scoped_release nogil;
  const int64_t ni = static_cast<int64_t>(items.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < ni; ++i) {
    const Item& it = items[i];
    const Scalars& x = s[it.tensor];
    const int64_t b = it.begin, n = it.end - it.begin;
    float* p = pp[it.tensor] + b;
    const float* g = gp[it.tensor] + b;
    float* m = mp[it.tensor] + b;
    float* v = vp[it.tensor] + b;
    adam_step_range(p, g, m, v, n, x);
  }
}

const lowbit::Bindings<lowbit::CpuExt> kOptimBindings([](pybind11::module_& m) {
  m.def("optim_grad_stats", &grad_stats, "Per tensor (max |g| or inf if non-finite, sum g^2 in the spec's order)",
        pybind11::arg("grads"));
  m.def("optim_clip_stats", &clip_stats,
        "Per tensor (sum of AdaClip-clipped g^2, clipped count); table: [n, 3] fp64 (clip, mh, r), (0, 0) where "
        "clip is 0",
        pybind11::arg("grads"), pybind11::arg("table"));
  m.def("optim_adam_step", &adam_step,
        "Fused Stable-SPAM elementwise step over lists of fp32 tensors; scalars: [n, 14] fp64 (SCALARS), a row "
        "whose skip is set leaves its tensor untouched",
        pybind11::arg("params"), pybind11::arg("grads"), pybind11::arg("ms"), pybind11::arg("vs"),
        pybind11::arg("scalars"));
});

}  // namespace
}  // namespace lowbit::cpu::optim
