// Stable-SPAM step kernels for CUDA: per-tensor statistics and the fused elementwise update over lists
// of tensors (one launch per list: a table of (tensor, chunk) work items on the device; for the update
// it depends only on the tensor sizes, so the caller builds it once per layout, optim_step_layout, and
// each step uploads only the per-tensor pointers, without waiting for the GPU). Every per-tensor scalar
// (AdaClip's (clip, mh, r) table, the step's [n, 14] SCALARS rows, skip included) is a device tensor the
// kernels read where it is, so that nothing of a step goes through the host. Bit-exact with the spec in
// lowbit/backends/ref/optim.py: scalars rounded fp64 -> fp32 to nearest, fp32 and fp64 operations
// through the _rn intrinsics (never contracted into FMAs), correctly rounded sqrt and division, and
// sum g^2 over the spec's tree: 16 lanes; per lane an adjacent pairwise tree over rows, computed as
// aligned subtrees (a thread's 256 rows, a block's 4096 rows, then the chunks of a tensor) that compose
// to exactly that tree.
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <math_constants.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "lowbit/registry.h"

namespace lowbit {
namespace cuda {
namespace optim {
namespace {

constexpr int kLanes = 16;
constexpr int kStatThreads = 256;                              // 16 lanes x 16 row groups
constexpr int kRowsPerThread = 256;                            // a complete subtree per thread
constexpr int64_t kChunkRows = kRowsPerThread * (kStatThreads / kLanes);  // 4096, as the CPU kernel
constexpr int kStepThreads = 256;
constexpr int64_t kStepChunk = 1 << 16;
constexpr int kScalarCount = 14;  // lowbit.backends.ref.optim.SCALARS

// A binary counter of complete subtrees (entry i covers 2^level[i] pushes); fold() equals the tree
// over the pushes padded with zeros to a power of two.
struct Tree {
  double s[32];
  int level[32];
  int n;
  __device__ Tree() : n(0) {}
  __device__ void push(double x) {
    int l = 0;
    while (n > 0 && level[n - 1] == l) {
      x = __dadd_rn(s[n - 1], x);
      --n;
      ++l;
    }
    s[n] = x;
    level[n] = l;
    ++n;
  }
  __device__ double fold() const {
    if (n == 0) return 0.0;
    double acc = s[n - 1];
    for (int i = n - 2; i >= 0; --i) acc = __dadd_rn(s[i], acc);
    return acc;
  }
};

struct StatItem {
  const float* g;
  int64_t numel;
  int64_t row0;  // first row of this chunk
  int64_t tensor;
};

// One block per chunk of 4096 rows: sums[item][lane] (the chunk's subtree per lane), amax / count.
// With kClip, table[tensor] = (clip, mh, r) on the device: a tensor whose clip is 0 is not read, its
// chunks give zeros (the clip value is the same for the whole block, so the block exits as one).
template <bool kClip>
__global__ void chunk_stats_kernel(const StatItem* items, const double* table, double* sums, float* amax,
                                   long long* count) {
  const StatItem it = items[blockIdx.x];
  const int lane = threadIdx.x % kLanes, group = threadIdx.x / kLanes;
  float mh = 0.f, r = 0.f;
  if (kClip) {
    const double* row = table + 3 * it.tensor;
    if (row[0] == 0.0) {
      if (threadIdx.x < kLanes) sums[blockIdx.x * kLanes + lane] = 0.0;
      if (threadIdx.x == 0) {
        amax[blockIdx.x] = 0.f;
        count[blockIdx.x] = 0;
      }
      return;
    }
    mh = __double2float_rn(row[1]);  // = the host's static_cast<float>
    r = __double2float_rn(row[2]);
  }
  Tree tree;
  float m = 0.f;
  long long c = 0;
  const int64_t first = it.row0 + static_cast<int64_t>(group) * kRowsPerThread;
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t e = (first + i) * kLanes + lane;
    float x = e < it.numel ? it.g[e] : 0.f;
    if (kClip) {
      const bool hit = fabsf(x) > mh;
      c += hit;
      x = hit ? __fmul_rn(x, r) : x;
    } else {
      m = fmaxf(m, fabsf(x));
    }
    const double d = static_cast<double>(x);
    tree.push(__dmul_rn(d, d));
  }
  // the 16 row groups of a lane are adjacent aligned subtrees: combine them pairwise
  __shared__ double part[kStatThreads];
  __shared__ float mpart[kStatThreads];
  __shared__ long long cpart[kStatThreads];
  part[threadIdx.x] = tree.fold();
  mpart[threadIdx.x] = m;
  cpart[threadIdx.x] = c;
  __syncthreads();
  for (int width = kStatThreads / kLanes / 2; width >= 1; width /= 2) {
    const bool active = group < width;
    double sum = 0.0;
    float mm = 0.f;
    long long cc = 0;
    if (active) {
      const int a = (2 * group) * kLanes + lane, b = (2 * group + 1) * kLanes + lane;
      sum = __dadd_rn(part[a], part[b]);
      mm = fmaxf(mpart[a], mpart[b]);
      cc = cpart[a] + cpart[b];
    }
    __syncthreads();
    if (active) {
      part[group * kLanes + lane] = sum;
      mpart[group * kLanes + lane] = mm;
      cpart[group * kLanes + lane] = cc;
    }
    __syncthreads();
  }
  if (threadIdx.x < kLanes) {
    sums[blockIdx.x * kLanes + lane] = part[lane];
    if (lane == 0) {
      float mm = 0.f;
      long long cc = 0;
      for (int k = 0; k < kLanes; ++k) {
        mm = fmaxf(mm, mpart[k]);
        cc += cpart[k];
      }
      amax[blockIdx.x] = mm;
      count[blockIdx.x] = cc;
    }
  }
}

// One thread per tensor: chunks combined with the same tree as rows, then the 16 lanes.
template <bool kClip>
__global__ void tensor_stats_kernel(const int64_t* first_item, int64_t ntensors, const double* sums,
                                    const float* amax, const long long* count, double* out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= ntensors) return;
  double lanes[kLanes];
  float m = 0.f;
  long long c = 0;
  for (int k = 0; k < kLanes; ++k) {
    Tree tree;
    for (int64_t i = first_item[t]; i < first_item[t + 1]; ++i) tree.push(sums[i * kLanes + k]);
    lanes[k] = tree.fold();
  }
  for (int64_t i = first_item[t]; i < first_item[t + 1]; ++i) {
    m = fmaxf(m, amax[i]);
    c += count[i];
  }
  for (int w = kLanes; w > 1; w /= 2)
    for (int i = 0; i < w / 2; ++i) lanes[i] = __dadd_rn(lanes[2 * i], lanes[2 * i + 1]);
  const double sumsq = lanes[0];
  if (kClip) {
    out[2 * t] = sumsq;
    out[2 * t + 1] = static_cast<double>(c);
  } else {
    out[2 * t] = isfinite(sumsq) ? static_cast<double>(m) : CUDART_INF;
    out[2 * t + 1] = sumsq;
  }
}

void check_f32(const at::Tensor& t, const at::Tensor& first, const char* what) {
  TORCH_CHECK(t.is_cuda(), what, ": expected CUDA tensors, got one on ", t.device());
  TORCH_CHECK(t.device() == first.device(), what, ": all tensors must be on ", first.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, what, ": expected fp32 tensors, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), what, ": expected contiguous tensors");
}

// A host table of POD items copied to the device in one transfer (bytes of a uint8 tensor). Staged in
// pinned memory and copied without blocking, so the host does not wait for the GPU; the caching host
// allocator keeps the staging buffer until the copy has run.
template <class T>
at::Tensor to_device(const std::vector<T>& v, const at::Device& dev) {
  at::Tensor host = at::empty({static_cast<int64_t>(v.size() * sizeof(T))},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  if (!v.empty()) std::memcpy(host.data_ptr(), v.data(), v.size() * sizeof(T));
  return host.to(at::TensorOptions().device(dev), /*non_blocking=*/true);
}

// A per-tensor fp64 table of `cols` columns, one row per tensor, on `dev` (read there by the kernels,
// never copied to the host); contiguous.
at::Tensor table_arg(const at::Tensor& t, int64_t rows, int64_t cols, const at::Device& dev, const char* what) {
  TORCH_CHECK(t.device() == dev, what, ": expected a [", rows, ", ", cols, "] fp64 tensor on ", dev,
              " (the kernel reads it there, so the host never waits for the GPU), got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kDouble && t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, what,
              ": expected a [", rows, ", ", cols, "] fp64 tensor, got ", t.scalar_type(), " of shape ", t.sizes());
  return t.contiguous();
}

// `table` (clip statistics only): [n, 3] fp64 (clip, mh, r) on the gradients' device.
template <bool kClip>
at::Tensor stats_impl(const std::vector<at::Tensor>& grads, const at::Tensor* table) {
  const int64_t nt = static_cast<int64_t>(grads.size());
  TORCH_CHECK(nt > 0, "grads: expected at least one tensor");
  const at::Device dev = grads[0].device();
  TORCH_CHECK(dev.is_cuda(), "grads: expected CUDA tensors, got one on ", dev);
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor tab = kClip ? table_arg(*table, nt, 3, dev, "table") : at::Tensor();
  std::vector<StatItem> items;
  std::vector<int64_t> first(nt + 1, 0);
  for (int64_t t = 0; t < nt; ++t) {
    check_f32(grads[t], grads[0], "grads");
    const int64_t rows = (grads[t].numel() + kLanes - 1) / kLanes;
    first[t] = static_cast<int64_t>(items.size());
    for (int64_t r0 = 0; r0 < rows; r0 += kChunkRows)
      items.push_back({grads[t].data_ptr<float>(), grads[t].numel(), r0, t});
  }
  first[nt] = static_cast<int64_t>(items.size());
  const int64_t ni = static_cast<int64_t>(items.size());
  auto opts = at::TensorOptions().device(dev);
  at::Tensor out = at::zeros({nt, 2}, opts.dtype(at::kDouble));
  at::Tensor sums = at::empty({std::max<int64_t>(ni, 1), kLanes}, opts.dtype(at::kDouble));
  at::Tensor amax = at::empty({std::max<int64_t>(ni, 1)}, opts.dtype(at::kFloat));
  at::Tensor count = at::empty({std::max<int64_t>(ni, 1)}, opts.dtype(at::kLong));
  at::Tensor d_items = to_device(items, dev);
  at::Tensor d_first = to_device(first, dev);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  if (ni > 0)
    chunk_stats_kernel<kClip><<<static_cast<unsigned>(ni), kStatThreads, 0, stream>>>(
        reinterpret_cast<const StatItem*>(d_items.data_ptr()), kClip ? tab.data_ptr<double>() : nullptr,
        sums.data_ptr<double>(), amax.data_ptr<float>(), reinterpret_cast<long long*>(count.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  tensor_stats_kernel<kClip><<<static_cast<unsigned>((nt + 127) / 128), 128, 0, stream>>>(
      reinterpret_cast<const int64_t*>(d_first.data_ptr()), nt, sums.data_ptr<double>(), amax.data_ptr<float>(),
      reinterpret_cast<const long long*>(count.data_ptr<int64_t>()), out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor grad_stats(const std::vector<at::Tensor>& grads) { return stats_impl<false>(grads, nullptr); }

at::Tensor clip_stats(const std::vector<at::Tensor>& grads, const at::Tensor& table) {
  return stats_impl<true>(grads, &table);
}

// Block b of the step kernel updates elements [chunk * kStepChunk, +kStepChunk) of tensor `tensor`.
struct StepChunk {
  int32_t tensor, chunk;
};

// One tensor's pointers for one step (its scalars: row `tensor` of the device table).
struct StepArgs {
  float* p;
  const float* g;
  float* m;
  float* v;
  int64_t numel;
};

// One row of SCALARS, read from device memory and rounded to fp32 to nearest (= the host's static_cast).
struct StepScalars {
  bool clip, zero, skip;
  float mh, r, f, b1, omb1, b2, omb2, inv_sbc2, eps, decay, step;
};

__device__ inline StepScalars load_scalars(const double* row) {
  return {row[0] != 0.0, row[12] != 0.0, row[13] != 0.0, __double2float_rn(row[1]), __double2float_rn(row[2]),
          __double2float_rn(row[3]), __double2float_rn(row[4]), __double2float_rn(row[5]),
          __double2float_rn(row[6]), __double2float_rn(row[7]), __double2float_rn(row[8]),
          __double2float_rn(row[9]), __double2float_rn(row[10]), __double2float_rn(row[11])};
}

__global__ void adam_step_kernel(const StepChunk* chunks, const StepArgs* args, const double* scalars) {
  const StepChunk c = chunks[blockIdx.x];
  const StepScalars s = load_scalars(scalars + static_cast<int64_t>(c.tensor) * kScalarCount);
  if (s.skip) return;  // left untouched, its gradient not read (the whole block: one tensor)
  const StepArgs a = args[c.tensor];
  const int64_t begin = static_cast<int64_t>(c.chunk) * kStepChunk;
  // a table built for other sizes never writes out of bounds
  const int64_t end = begin + kStepChunk < a.numel ? begin + kStepChunk : a.numel;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float x = a.g[i];
    if (s.clip) x = fabsf(x) > s.mh ? __fmul_rn(x, s.r) : x;
    x = __fmul_rn(x, s.f);
    const float m0 = s.zero ? 0.f : a.m[i];
    const float v0 = s.zero ? 0.f : a.v[i];
    const float mm = __fadd_rn(__fmul_rn(m0, s.b1), __fmul_rn(x, s.omb1));
    const float vv = __fadd_rn(__fmul_rn(v0, s.b2), __fmul_rn(__fmul_rn(x, x), s.omb2));
    const float u = __fdiv_rn(mm, __fadd_rn(__fmul_rn(__fsqrt_rn(vv), s.inv_sbc2), s.eps));
    a.p[i] = __fsub_rn(__fmul_rn(a.p[i], s.decay), __fmul_rn(u, s.step));
    a.m[i] = mm;
    a.v[i] = vv;
  }
}

std::vector<StepChunk> step_chunks(const std::vector<int64_t>& numels) {
  std::vector<StepChunk> chunks;
  for (size_t t = 0; t < numels.size(); ++t) {
    TORCH_CHECK(numels[t] >= 0, "numels: expected sizes >= 0, got ", numels[t]);
    for (int64_t b = 0; b < numels[t]; b += kStepChunk)
      chunks.push_back({static_cast<int32_t>(t), static_cast<int32_t>(b / kStepChunk)});
  }
  return chunks;
}

// The work table of optim_adam_step for tensors of these sizes, on the device of `like`.
at::Tensor step_layout(const std::vector<int64_t>& numels, const at::Tensor& like) {
  TORCH_CHECK(like.is_cuda(), "like: expected a CUDA tensor, got one on ", like.device());
  const c10::cuda::CUDAGuard guard(like.device());
  return to_device(step_chunks(numels), like.device());
}

void adam_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& ms, const std::vector<at::Tensor>& vs, const at::Tensor& scalars,
               const c10::optional<at::Tensor>& layout) {
  const int64_t nt = static_cast<int64_t>(params.size());
  TORCH_CHECK(nt > 0, "params: expected at least one tensor");
  TORCH_CHECK(grads.size() == params.size() && ms.size() == params.size() && vs.size() == params.size(),
              "params, grads, ms, vs: expected lists of the same length");
  const at::Device dev = params[0].device();
  TORCH_CHECK(dev.is_cuda(), "params: expected CUDA tensors, got one on ", dev);
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor sc = table_arg(scalars, nt, kScalarCount, dev, "scalars");
  std::vector<StepArgs> args;
  int64_t n_chunks = 0;
  for (int64_t t = 0; t < nt; ++t) {
    check_f32(params[t], params[0], "params");
    check_f32(grads[t], params[0], "grads");
    check_f32(ms[t], params[0], "ms");
    check_f32(vs[t], params[0], "vs");
    const int64_t n = params[t].numel();
    TORCH_CHECK(grads[t].numel() == n && ms[t].numel() == n && vs[t].numel() == n,
                "params, grads, ms, vs: tensor ", t, " differs in size");
    n_chunks += (n + kStepChunk - 1) / kStepChunk;
    args.push_back({params[t].data_ptr<float>(), grads[t].data_ptr<float>(), ms[t].data_ptr<float>(),
                    vs[t].data_ptr<float>(), n});
  }
  if (n_chunks == 0) return;
  at::Tensor chunks;
  if (layout.has_value() && layout->defined()) {
    chunks = *layout;
    TORCH_CHECK(chunks.device() == dev && chunks.scalar_type() == at::kByte &&
                    chunks.numel() == n_chunks * static_cast<int64_t>(sizeof(StepChunk)),
                "layout: not the work table of these tensors (build it with optim_step_layout of their sizes)");
  } else {
    std::vector<int64_t> numels;
    for (const auto& p : params) numels.push_back(p.numel());
    chunks = to_device(step_chunks(numels), dev);
  }
  at::Tensor d_args = to_device(args, dev);
  adam_step_kernel<<<static_cast<unsigned>(n_chunks), kStepThreads, 0, at::cuda::getCurrentCUDAStream().stream()>>>(
      reinterpret_cast<const StepChunk*>(chunks.data_ptr()), reinterpret_cast<const StepArgs*>(d_args.data_ptr()),
      sc.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

const lowbit::Bindings<lowbit::CudaExt> kOptimBindings([](pybind11::module_& m) {
  m.def("optim_grad_stats", &grad_stats, "Per tensor (max |g| or inf if non-finite, sum g^2 in the spec's order)",
        pybind11::arg("grads"));
  m.def("optim_clip_stats", &clip_stats,
        "Per tensor (sum of AdaClip-clipped g^2, clipped count); table: [n, 3] fp64 (clip, mh, r) on the "
        "gradients' device, (0, 0) where clip is 0",
        pybind11::arg("grads"), pybind11::arg("table"));
  m.def("optim_adam_step", &adam_step,
        "Fused Stable-SPAM elementwise step over lists of fp32 CUDA tensors (scalars: [n, 14] fp64 SCALARS on "
        "their device, a row whose skip is set leaves its tensor untouched; layout: optim_step_layout of their "
        "sizes, reused across steps; None builds it)",
        pybind11::arg("params"), pybind11::arg("grads"), pybind11::arg("ms"), pybind11::arg("vs"),
        pybind11::arg("scalars"), pybind11::arg("layout") = pybind11::none());
  m.def("optim_step_layout", &step_layout, "The work table of optim_adam_step for tensors of these sizes",
        pybind11::arg("numels"), pybind11::arg("like"));
});

}  // namespace
}  // namespace optim
}  // namespace cuda
}  // namespace lowbit
