// lowbit._C_cuda: argument checks, output allocation and the Python module around the CUDA
// kernels of csrc/cuda/*.cu (launch.h). Works on 2-D [R, K] tensors as lowbit/backends/ref.py
// describes; every bad argument is a TORCH_CHECK error (a Python RuntimeError), never a crash.
// The ops take lowbit._C's argument lists, built by lowbit/backends/codes.py (lowbit/enums.h).
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <string>
#include <tuple>

#include <lowbit/codes.h>
#include <lowbit/formats.h>
#include <lowbit/registry.h>

#include "launch.h"

// The GPU targets this module was compiled for, "sm_90a+compute_80" (setup.py passes them; '+' since
// compiler command lines split at commas): lowbit.backends.cuda reads them to tell a GPU it holds no
// code for, and falls back to another backend there.
#ifndef LOWBIT_CUDA_ARCHS
#define LOWBIT_CUDA_ARCHS
#endif
#define LOWBIT_STRINGIFY_(...) #__VA_ARGS__
#define LOWBIT_STRINGIFY(...) LOWBIT_STRINGIFY_(__VA_ARGS__)

namespace lowbit {
namespace cuda {
namespace {

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": on ", t.device(), ", expected ", ref.device());
}

// The InType of a float input (fp32 / bf16 / fp16); anything else is an error naming `name`.
int input_type(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return kInF32;
    case at::kBFloat16: return kInBF16;
    case at::kHalf: return kInF16;
    default: TORCH_CHECK(false, name, ": expected float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return kInF32;
}

// Contiguous and 16-byte aligned (the kernels' vector loads need it); copies only when needed.
at::Tensor aligned_contiguous(const at::Tensor& x) {
  at::Tensor c = x.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// Hadamard block sizes ref.py accepts: a power of two in [16, 32768] dividing K.
void check_hadamard_block(int64_t block, int64_t K, const char* name) {
  TORCH_CHECK(is_pow2(block) && block >= 16 && block <= 32768, name, ": expected a power of two in [16, 32768], got ",
              block);
  TORCH_CHECK(K % block == 0, name, ": block ", block, " must divide the last dimension, which has size ", K);
}

void check_block(int kind, int64_t R, int64_t K, int64_t br, int64_t bk) {
  TORCH_CHECK(br > 0 && bk > 0, "block: expected positive (br, bk), got (", br, ", ", bk, ")");
  TORCH_CHECK(R % br == 0, "block: ", R, " rows are not divisible by the block height ", br);
  TORCH_CHECK(K % bk == 0, "block: the quantized dimension has size ", K, ", not divisible by the block size ", bk);
  if (kind == kKindMX) TORCH_CHECK(br == 1 && bk == 32, "block: mx takes (1, 32), got (", br, ", ", bk, ")");
  if (kind == kKindNVFP4)
    TORCH_CHECK((br == 1 || br == 16) && bk == 16, "block: nvfp4 takes (1, 16) or (16, 16), got (", br, ", ", bk, ")");
}

at::ScalarType data_dtype(int elem) {
  return elem == kE2M1 ? at::kByte : (elem == kE4M3 ? at::kFloat8_e4m3fn : at::kFloat8_e5m2);
}

at::ScalarType scale_dtype(int kind) {
  return kind == kKindFP8 ? at::kFloat : (kind == kKindMX ? at::kByte : at::kFloat8_e4m3fn);
}

int vector_width(int64_t bk) { return bk % 8 == 0 ? 8 : bk % 4 == 0 ? 4 : bk % 2 == 0 ? 2 : 1; }

uint32_t* u32(at::Tensor& t) { return reinterpret_cast<uint32_t*>(t.data_ptr<int32_t>()); }

}  // namespace

// Random Hadamard transform of the 1 x block slices of x [R, K]; fp32 out.
at::Tensor hadamard_transform(const at::Tensor& x_in, int64_t block, bool with_signs, uint64_t seed, bool inverse) {
  check_cuda(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2, "x: expected a 2-D [R, K] tensor, got ", x_in.dim(), " dims");
  const int in = input_type(x_in, "x");
  const int64_t R = x_in.size(0), K = x_in.size(1);
  check_hadamard_block(block, K, "block");
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor y = at::empty({R, K}, x_in.options().dtype(at::kFloat));
  if (R * K == 0) return y;
  const at::Tensor x = aligned_contiguous(x_in);
  const int64_t nblocks = R * (K / block);
  const int64_t threads_per_block = block <= 4096 ? block / 8 : 512;  // hadamard.cu's layout
  TORCH_CHECK(nblocks < ((int64_t)1 << 31) && (threads_per_block > 32 || nblocks * threads_per_block / 256 < ((int64_t)1 << 31)),
              "x: too large for one launch (", nblocks, " blocks of ", block, ")");
  at::Tensor words = at::empty({(block + 31) / 32}, x.options().dtype(at::kInt));
  C10_CUDA_CHECK(launch_hadamard(in, x.data_ptr(), y.data_ptr<float>(), nblocks, (int)block, with_signs, seed, inverse,
                                 u32(words), c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

// seed: the Philox key of the signs (lowbit/enums.h), or none for the plain Sylvester transform.
at::Tensor hadamard(const at::Tensor& x, int64_t block, const c10::optional<int64_t>& seed, bool inverse) {
  return hadamard_transform(x, block, seed.has_value(), (uint64_t)seed.value_or(0), inverse);
}

// Quantize x [R, K] into a format (kind, elem codes) with tiles (br, bk). Returns
// (data, scale, global_scale) as ref.quantize does.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const at::Tensor& x_in, int64_t kind, int64_t elem, int64_t br,
                                                        int64_t bk, int64_t rounding, int64_t seed, int64_t scale_mode,
                                                        const c10::optional<at::Tensor>& global_amax,
                                                        int64_t hadamard_block, int64_t inner) {
  check_cuda(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2, "x: expected a 2-D [R, K] tensor, got ", x_in.dim(), " dims");
  int in = input_type(x_in, "x");
  const int64_t R = x_in.size(0), K = x_in.size(1);
  const auto [k_id, e_id] = check_format(kind, elem);
  const bool packed = e_id == kE2M1;
  const bool stochastic = check_rounding(rounding);
  const int mode = check_scale_mode(scale_mode, k_id);
  check_block(k_id, R, K, br, bk);
  TORCH_CHECK(inner >= 1, "inner: expected >= 1, got ", inner);
  TORCH_CHECK(!packed || K % 2 == 0, "x: FP4 packs two elements per byte; the last dim must be even, got ", K);
  if (hadamard_block) check_hadamard_block(hadamard_block, K, "hadamard_block");
  const bool has_global_amax = check_global_amax(global_amax, k_id);
  if (has_global_amax) {
    check_cuda(*global_amax, "global_amax");
    check_same_device(*global_amax, x_in, "global_amax");
  }
  TORCH_CHECK((R / br) * (K / bk) < ((int64_t)1 << 31), "block: too many blocks (", (R / br) * (K / bk), ")");

  const c10::cuda::CUDAGuard guard(x_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto opts = x_in.options();
  at::Tensor data = at::empty({R, packed ? K / 2 : K}, opts.dtype(data_dtype(e_id)));
  at::Tensor scale = at::empty({R / br, K / bk}, opts.dtype(scale_dtype(k_id)));
  at::Tensor global_scale = at::ones({}, opts.dtype(at::kFloat));
  if (R * K == 0) return {data, scale, global_scale};

  const bool row_block = br == 1 && bk % 8 == 0 && is_pow2(bk / 8) && bk / 8 <= 32;
  // The row-block kernel applies a Hadamard transform of up to 256 values itself; larger ones,
  // and NVFP4 without global_amax (its per-tensor amax is over the transformed values), first
  // write the transformed tensor.
  const bool fused_hadamard = hadamard_block && row_block && hadamard_block <= 256 &&
                              !(k_id == kKindNVFP4 && !has_global_amax);
  at::Tensor x = aligned_contiguous(x_in);
  at::Tensor sign_words;
  if (hadamard_block && !fused_hadamard) {
    x = hadamard_transform(x, hadamard_block, true, (uint64_t)seed, false);
    in = kInF32;
  }

  QuantizeLaunch a{};
  if (fused_hadamard) {
    sign_words = at::empty({(hadamard_block + 31) / 32}, opts.dtype(at::kInt));
    C10_CUDA_CHECK(launch_hadamard_signs(u32(sign_words), (int)hadamard_block, (uint64_t)seed, stream));
    a.hadamard_block = (int)hadamard_block;
    a.hadamard_signs = u32(sign_words);
  }
  a.in = in;
  a.kind = k_id;
  a.elem = e_id;
  a.stochastic = stochastic;
  a.row_block = row_block;
  a.V = vector_width(bk);
  a.x = x.data_ptr();
  a.R = R;
  a.K = K;
  a.br = br;
  a.bk = bk;
  a.mode = mode;
  a.seed = (uint64_t)seed;
  a.inner = inner;
  a.data = reinterpret_cast<uint8_t*>(data.data_ptr());
  a.scale = scale.data_ptr();

  at::Tensor given, reduced, amax;
  if (k_id == kKindNVFP4) {
    if (has_global_amax) {
      given = global_amax->contiguous();
    } else {
      reduced = at::zeros({1}, opts.dtype(at::kInt));
      C10_CUDA_CHECK(launch_tile_amax(in, a.x, R, K, R, K, vector_width(K), u32(reduced), stream));
    }
    C10_CUDA_CHECK(launch_nvfp4_global_scale(given.defined() ? given.data_ptr<float>() : nullptr,
                                             reduced.defined() ? u32(reduced) : nullptr,
                                             global_scale.data_ptr<float>(), stream));
    a.s_enc = global_scale.data_ptr<float>();
  }
  if (!a.row_block) {
    amax = at::zeros({(R / br) * (K / bk)}, opts.dtype(at::kInt));
    C10_CUDA_CHECK(launch_tile_amax(in, a.x, R, K, br, bk, a.V, u32(amax), stream));
    a.amax_bits = u32(amax);
  }
  C10_CUDA_CHECK(launch_quantize(a, stream));
  return {data, scale, global_scale};
}

// Decode (data, scale, global_scale) to [R, K] in out_dtype (an OutDtype code).
at::Tensor dequantize(const at::Tensor& data_in, const at::Tensor& scale_in, const at::Tensor& global_scale,
                      int64_t kind, int64_t elem, int64_t br, int64_t bk, int64_t K, int64_t out_dtype) {
  check_cuda(data_in, "data");
  check_cuda(scale_in, "scale");
  check_cuda(global_scale, "global_scale");
  check_same_device(scale_in, data_in, "scale");
  check_same_device(global_scale, data_in, "global_scale");
  TORCH_CHECK(data_in.dim() == 2, "data: expected a 2-D tensor, got ", data_in.dim(), " dims");
  const auto [k_id, e_id] = check_format(kind, elem);
  const bool packed = e_id == kE2M1;
  const OutDtype out = check_out_dtype(out_dtype);
  const at::ScalarType out_type = out_scalar_type(out);
  TORCH_CHECK(data_in.scalar_type() == data_dtype(e_id) || data_in.scalar_type() == at::kByte, "data: expected ",
              data_dtype(e_id), " codes for ", kKindNames[k_id], "/", kElemNames[e_id], ", got ",
              data_in.scalar_type());
  TORCH_CHECK(scale_in.scalar_type() == scale_dtype(k_id), "scale: expected ", scale_dtype(k_id), " for ",
              kKindNames[k_id], ", got ", scale_in.scalar_type());
  TORCH_CHECK(global_scale.scalar_type() == at::kFloat && global_scale.numel() == 1,
              "global_scale: expected one float32 value, got ", global_scale.scalar_type(), " with ",
              global_scale.numel(), " elements");
  const int64_t R = data_in.size(0);
  TORCH_CHECK(K >= 0 && (!packed || K % 2 == 0) && data_in.size(1) == (packed ? K / 2 : K), "data: expected ",
              packed ? "[R, K / 2] packed FP4 codes" : "[R, K] codes", " for K = ", K, ", got shape ", data_in.sizes());
  check_block(k_id, R, K, br, bk);
  TORCH_CHECK(scale_in.numel() == (R / br) * (K / bk), "scale: expected ", (R / br) * (K / bk), " values for ", R,
              "x", K, " in (", br, ", ", bk, ") blocks, got ", scale_in.numel());

  const c10::cuda::CUDAGuard guard(data_in.device());
  at::Tensor result = at::empty({R, K}, data_in.options().dtype(out_type));
  if (R * K == 0) return result;
  const at::Tensor data = aligned_contiguous(data_in);
  const at::Tensor scale = scale_in.contiguous();
  const at::Tensor gs = global_scale.reshape({1}).contiguous();

  DequantizeLaunch a{};
  a.kind = k_id;
  a.elem = e_id;
  a.out = out;
  a.V = vector_width(bk);
  a.data = reinterpret_cast<const uint8_t*>(data.data_ptr());
  a.scale = scale.data_ptr();
  a.global_scale = gs.data_ptr<float>();
  a.R = R;
  a.K = K;
  a.br = br;
  a.bk = bk;
  a.y = result.data_ptr();
  C10_CUDA_CHECK(launch_dequantize(a, c10::cuda::getCurrentCUDAStream().stream()));
  return result;
}

// Saturating cast of x (fp32 / bf16 / fp16, any shape) to the element elem (E4M3, E5M2, BF16,
// FP16); stochastic bits r(seed, flat index).
at::Tensor cast(const at::Tensor& x_in, int64_t elem_code, int64_t rounding, int64_t seed) {
  check_cuda(x_in, "x");
  const int in = input_type(x_in, "x");
  const ElemId elem = check_cast_elem(elem_code);
  const bool stochastic = check_rounding(rounding);
  const at::ScalarType out_type = elem == kE4M3 ? at::kFloat8_e4m3fn
                                  : elem == kE5M2 ? at::kFloat8_e5m2
                                  : elem == kBF16 ? at::kBFloat16 : at::kHalf;
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor out = at::empty(x_in.sizes(), x_in.options().dtype(out_type));
  if (x_in.numel() == 0) return out;
  const at::Tensor x = aligned_contiguous(x_in);
  C10_CUDA_CHECK(launch_cast(in, elem, stochastic, x.data_ptr(), x.numel(), (uint64_t)seed, out.data_ptr(),
                             c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

}  // namespace cuda
}  // namespace lowbit

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowbit CUDA kernels: quantize, dequantize, cast, hadamard (bit-exact with lowbit.backends.ref)";
  m.def("quantize", &lowbit::cuda::quantize, "quantize [R, K] into FP8 / MX / NVFP4 -> (data, scale, global_scale)",
        py::arg("x"), py::arg("kind"), py::arg("elem"), py::arg("br"), py::arg("bk"), py::arg("rounding"),
        py::arg("seed"), py::arg("scale_mode"), py::arg("global_amax"), py::arg("hadamard_block"), py::arg("inner"));
  m.def("dequantize", &lowbit::cuda::dequantize, "decode quantized [R, K] data", py::arg("data"), py::arg("scale"),
        py::arg("global_scale"), py::arg("kind"), py::arg("elem"), py::arg("br"), py::arg("bk"), py::arg("K"),
        py::arg("out_dtype"));
  m.def("cast", &lowbit::cuda::cast, "saturating cast to bf16 / fp16 / fp8", py::arg("x"), py::arg("elem"),
        py::arg("rounding"), py::arg("seed"));
  m.def("hadamard", &lowbit::cuda::hadamard, "random Hadamard transform along the last dim (seed None: no signs)",
        py::arg("x"), py::arg("block"), py::arg("seed"), py::arg("inverse"));
  m.def("codes", &lowbit::codes_table, "the enum codes the ops take: {argument: {name: code}}");
  m.def("archs", []() { return std::string(LOWBIT_STRINGIFY(LOWBIT_CUDA_ARCHS)); },
        "the GPU targets compiled in, '+'-separated (sm_XY: SASS, compute_XY: PTX); empty if not recorded");
  for (auto fn : lowbit::binding_registry<lowbit::CudaExt>()) fn(m);  // bindings that other kernel files registered
}
