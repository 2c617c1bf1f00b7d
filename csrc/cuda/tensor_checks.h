// Host-side argument checks and input preparation shared by the lowbit CUDA launchers.
#pragma once

#include <cstdint>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common.cuh"

namespace lowbit {
namespace cuda {

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": on ", t.device(), ", expected ", ref.device());
}

// The InType of a float input (fp32 / bf16 / fp16); anything else is an error naming `name`.
inline int input_type(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return kInF32;
    case at::kBFloat16: return kInBF16;
    case at::kHalf: return kInF16;
    default:
      TORCH_CHECK(false, name, ": expected float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return kInF32;
}

// Contiguous and 16-byte aligned (vector loads need it); copies only when x is not already.
inline at::Tensor aligned_contiguous(const at::Tensor& x) {
  at::Tensor c = x.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

inline bool is_rounding(const std::string& rounding, const char* name = "rounding") {
  TORCH_CHECK(rounding == "nearest" || rounding == "stochastic", name,
              ": expected 'nearest' or 'stochastic', got '", rounding, "'");
  return rounding == "stochastic";
}

inline bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// Hadamard block sizes ref.py accepts: a power of two in [16, 32768] dividing K.
inline void check_hadamard_block(int64_t block, int64_t K, const char* name) {
  TORCH_CHECK(is_pow2(block) && block >= 16 && block <= 32768, name,
              ": expected a power of two in [16, 32768], got ", block);
  TORCH_CHECK(K % block == 0, name, ": block ", block, " must divide the last dimension, which has size ", K);
}

}  // namespace cuda
}  // namespace lowbit
