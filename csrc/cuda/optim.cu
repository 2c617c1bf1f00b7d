// Stable-SPAM step kernels for CUDA: per-tensor statistics and the fused elementwise update over lists
// of tensors (one launch per list: a table of (tensor, chunk) work items on the device; for the update
// it depends only on the tensor sizes, so the caller builds it once per layout, optim_step_layout, and
// each step uploads only the per-tensor pointers and scalars, without waiting for the GPU). Bit-exact with
// the spec in lowbit/optim/kernels.py: fp32 and fp64 operations through the _rn intrinsics (never
// contracted into FMAs), correctly rounded sqrt and division, and sum g^2 over the spec's tree: 16
// lanes; per lane an adjacent pairwise tree over rows, computed as aligned subtrees (a thread's 256
// rows, a block's 4096 rows, then the chunks of a tensor) that compose to exactly that tree.
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
  float mh, r;   // AdaClip threshold and ratio (clip statistics only)
};

// One block per chunk of 4096 rows: sums[item][lane] (the chunk's subtree per lane), amax / count.
template <bool kClip>
__global__ void chunk_stats_kernel(const StatItem* items, double* sums, float* amax, long long* count) {
  const StatItem it = items[blockIdx.x];
  const int lane = threadIdx.x % kLanes, group = threadIdx.x / kLanes;
  Tree tree;
  float m = 0.f;
  long long c = 0;
  const int64_t first = it.row0 + static_cast<int64_t>(group) * kRowsPerThread;
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t e = (first + i) * kLanes + lane;
    float x = e < it.numel ? it.g[e] : 0.f;
    if (kClip) {
      const bool hit = fabsf(x) > it.mh;
      c += hit;
      x = hit ? __fmul_rn(x, it.r) : x;
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

template <bool kClip>
at::Tensor stats_impl(const std::vector<at::Tensor>& grads, const std::vector<double>& mh,
                      const std::vector<double>& r) {
  const int64_t nt = static_cast<int64_t>(grads.size());
  TORCH_CHECK(nt > 0, "grads: expected at least one tensor");
  const at::Device dev = grads[0].device();
  const c10::cuda::CUDAGuard guard(dev);
  std::vector<StatItem> items;
  std::vector<int64_t> first(nt + 1, 0);
  for (int64_t t = 0; t < nt; ++t) {
    check_f32(grads[t], grads[0], "grads");
    const int64_t rows = (grads[t].numel() + kLanes - 1) / kLanes;
    first[t] = static_cast<int64_t>(items.size());
    for (int64_t r0 = 0; r0 < rows; r0 += kChunkRows)
      items.push_back({grads[t].data_ptr<float>(), grads[t].numel(), r0, t,
                       kClip ? static_cast<float>(mh[t]) : 0.f, kClip ? static_cast<float>(r[t]) : 0.f});
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
        reinterpret_cast<const StatItem*>(d_items.data_ptr()), sums.data_ptr<double>(), amax.data_ptr<float>(),
        reinterpret_cast<long long*>(count.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  tensor_stats_kernel<kClip><<<static_cast<unsigned>((nt + 127) / 128), 128, 0, stream>>>(
      reinterpret_cast<const int64_t*>(d_first.data_ptr()), nt, sums.data_ptr<double>(), amax.data_ptr<float>(),
      reinterpret_cast<const long long*>(count.data_ptr<int64_t>()), out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor grad_stats(const std::vector<at::Tensor>& grads) { return stats_impl<false>(grads, {}, {}); }

at::Tensor clip_stats(const std::vector<at::Tensor>& grads, const std::vector<double>& mh, const std::vector<double>& r) {
  TORCH_CHECK(mh.size() == grads.size() && r.size() == grads.size(), "mh, r: expected one value per gradient");
  return stats_impl<true>(grads, mh, r);
}

// Block b of the step kernel updates elements [chunk * kStepChunk, +kStepChunk) of tensor `tensor`.
struct StepChunk {
  int32_t tensor, chunk;
};

// One tensor's pointers and scalars for one step.
struct StepArgs {
  float* p;
  const float* g;
  float* m;
  float* v;
  int64_t numel;
  int clip, zero;
  float mh, r, f, b1, omb1, b2, omb2, inv_sbc2, eps, decay, step;
};

__global__ void adam_step_kernel(const StepChunk* chunks, const StepArgs* args) {
  const StepChunk c = chunks[blockIdx.x];
  const StepArgs s = args[c.tensor];
  const int64_t begin = static_cast<int64_t>(c.chunk) * kStepChunk;
  // a table built for other sizes never writes out of bounds
  const int64_t end = begin + kStepChunk < s.numel ? begin + kStepChunk : s.numel;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float x = s.g[i];
    if (s.clip) x = fabsf(x) > s.mh ? __fmul_rn(x, s.r) : x;
    x = __fmul_rn(x, s.f);
    const float m0 = s.zero ? 0.f : s.m[i];
    const float v0 = s.zero ? 0.f : s.v[i];
    const float mm = __fadd_rn(__fmul_rn(m0, s.b1), __fmul_rn(x, s.omb1));
    const float vv = __fadd_rn(__fmul_rn(v0, s.b2), __fmul_rn(__fmul_rn(x, x), s.omb2));
    const float u = __fdiv_rn(mm, __fadd_rn(__fmul_rn(__fsqrt_rn(vv), s.inv_sbc2), s.eps));
    s.p[i] = __fsub_rn(__fmul_rn(s.p[i], s.decay), __fmul_rn(u, s.step));
    s.m[i] = mm;
    s.v[i] = vv;
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
  TORCH_CHECK(!scalars.is_cuda(), "scalars: expected a CPU tensor (reading a CUDA one would wait for the GPU)");
  const at::Tensor sc = scalars.contiguous();
  TORCH_CHECK(sc.scalar_type() == at::kDouble && sc.dim() == 2 && sc.size(0) == nt && sc.size(1) == 13,
              "scalars: expected an [n, 13] fp64 tensor");
  const double* row = sc.data_ptr<double>();
  const at::Device dev = params[0].device();
  const c10::cuda::CUDAGuard guard(dev);
  std::vector<StepArgs> args;
  int64_t n_chunks = 0;
  for (int64_t t = 0; t < nt; ++t, row += 13) {
    check_f32(params[t], params[0], "params");
    check_f32(grads[t], params[0], "grads");
    check_f32(ms[t], params[0], "ms");
    check_f32(vs[t], params[0], "vs");
    const int64_t n = params[t].numel();
    TORCH_CHECK(grads[t].numel() == n && ms[t].numel() == n && vs[t].numel() == n,
                "params, grads, ms, vs: tensor ", t, " differs in size");
    n_chunks += (n + kStepChunk - 1) / kStepChunk;
    args.push_back({params[t].data_ptr<float>(), grads[t].data_ptr<float>(), ms[t].data_ptr<float>(),
                    vs[t].data_ptr<float>(), n, row[0] != 0.0, row[12] != 0.0, static_cast<float>(row[1]),
                    static_cast<float>(row[2]), static_cast<float>(row[3]), static_cast<float>(row[4]),
                    static_cast<float>(row[5]), static_cast<float>(row[6]), static_cast<float>(row[7]),
                    static_cast<float>(row[8]), static_cast<float>(row[9]), static_cast<float>(row[10]),
                    static_cast<float>(row[11])});
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
      reinterpret_cast<const StepChunk*>(chunks.data_ptr()), reinterpret_cast<const StepArgs*>(d_args.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

const lowbit::Bindings<lowbit::CudaExt> kOptimBindings([](pybind11::module_& m) {
  m.def("optim_grad_stats", &grad_stats, "Per tensor (max |g| or inf if non-finite, sum g^2 in the spec's order)",
        pybind11::arg("grads"));
  m.def("optim_clip_stats", &clip_stats, "Per tensor (sum of AdaClip-clipped g^2, clipped count)",
        pybind11::arg("grads"), pybind11::arg("mh"), pybind11::arg("r"));
  m.def("optim_adam_step", &adam_step,
        "Fused Stable-SPAM elementwise step over lists of fp32 CUDA tensors (layout: optim_step_layout of "
        "their sizes, reused across steps; None builds it)",
        pybind11::arg("params"), pybind11::arg("grads"), pybind11::arg("ms"), pybind11::arg("vs"),
        pybind11::arg("scalars"), pybind11::arg("layout") = pybind11::none());
  m.def("optim_step_layout", &step_layout, "The work table of optim_adam_step for tensors of these sizes",
        pybind11::arg("numels"), pybind11::arg("like"));
});

}  // namespace
}  // namespace optim
}  // namespace cuda
}  // namespace lowbit
