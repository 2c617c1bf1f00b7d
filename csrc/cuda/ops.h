// Host entry points of lowbit._C_cuda (the Python side is lowbit/backends/cuda.py).
// Every function checks its arguments with TORCH_CHECK and works on 2-D [R, K] CUDA tensors
// as described in lowbit/backends/ref.py.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace lowbit {
namespace cuda {

// Quantize x [R, K] (fp32 / bf16 / fp16) into kind "fp8" | "mx" | "nvfp4" with element
// "e4m3" | "e5m2" | "e2m1" and tiles (br, bk). Returns (data, scale, global_scale).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const at::Tensor& x, const std::string& kind,
                                                        const std::string& elem, int64_t br, int64_t bk,
                                                        const std::string& rounding, int64_t seed,
                                                        const std::string& scale_mode,
                                                        const c10::optional<at::Tensor>& global_amax,
                                                        int64_t hadamard_block, int64_t inner);

// Decode (data, scale, global_scale) to [R, K] in out_dtype "float32" | "bfloat16" | "float16".
at::Tensor dequantize(const at::Tensor& data, const at::Tensor& scale, const at::Tensor& global_scale,
                      const std::string& kind, const std::string& elem, int64_t br, int64_t bk, int64_t K,
                      const std::string& out_dtype);

// Saturating cast of x (fp32 / bf16 / fp16, any shape, contiguous) to dtype
// "bfloat16" | "float16" | "float8_e4m3fn" | "float8_e5m2".
at::Tensor cast(const at::Tensor& x, const std::string& dtype, const std::string& rounding, int64_t seed);

// Random Hadamard transform of the 1 x block slices of x [R, K]; seed < 0: no signs. fp32 out.
at::Tensor hadamard(const at::Tensor& x, int64_t block, int64_t seed, bool inverse);

// The same with the seed as the full 64-bit Philox key (quantize's fused transform uses it).
at::Tensor hadamard_transform(const at::Tensor& x, int64_t block, bool with_signs, uint64_t seed, bool inverse);

}  // namespace cuda
}  // namespace lowbit
