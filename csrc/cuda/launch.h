// Kernel launchers of lowbit._C_cuda on raw device pointers, free of torch headers so the .cu
// files compile quickly; bindings.cpp checks arguments, allocates tensors and calls these.
// Each returns the launch status (cudaGetLastError()).
#pragma once

#include <stdint.h>

#include <cuda_runtime_api.h>

#include <lowbit/enums.h>

namespace lowbit {
namespace cuda {

// Kind, ElemId, ScaleMode and OutDtype codes: lowbit/enums.h.
enum InType : int { kInF32 = 0, kInBF16 = 1, kInF16 = 2 };  // input element storage

// Random Hadamard transform of nblocks consecutive blocks of B values (B = 16 .. 32768) into fp32.
// sign_words: B / 32 (at least 1) words of scratch when with_signs.
cudaError_t launch_hadamard(int in, const void* x, float* y, int64_t nblocks, int B, bool with_signs, uint64_t seed,
                            bool inverse, uint32_t* sign_words, cudaStream_t stream);

// sign_words[w] bit b = 1 iff the Hadamard sign s_(32 w + b) of `seed` is -1 (B / 32 words, at least 1).
cudaError_t launch_hadamard_signs(uint32_t* sign_words, int B, uint64_t seed, cudaStream_t stream);

// amax_bits[tile] = max(amax_bits[tile], max over the (br, bk) tile of |x| as fp32 bits); x [R, K].
// V: elements per vector load, dividing bk.
cudaError_t launch_tile_amax(int in, const void* x, int64_t R, int64_t K, int64_t br, int64_t bk, int V,
                             uint32_t* amax_bits, cudaStream_t stream);

// s_enc = nvfp4_global_scale(amax), amax = *given, or the finalized *reduced bits when given is null.
cudaError_t launch_nvfp4_global_scale(const float* given, const uint32_t* reduced, float* s_enc, cudaStream_t stream);

struct QuantizeLaunch {
  int in;       // InType of x
  int kind;     // Kind
  int elem;     // ElemId (E4M3, E5M2, E2M1)
  bool stochastic;
  bool row_block;  // br == 1, bk = 8 * G, G a power of two <= 32: the fused kernel (amax_bits unused)
  int V;           // elements per vector in the tile kernel (divides bk; 8 for MX / NVFP4)
  const void* x;
  int64_t R, K, br, bk;
  const uint32_t* amax_bits;  // per tile, from launch_tile_amax (tile kernel only)
  const float* s_enc;         // NVFP4 per-tensor scale on device
  int mode;                   // ScaleMode of formats.h
  uint64_t seed;
  int64_t inner;
  // Fused random Hadamard transform of the rows (row_block only, 16 <= hadamard_block <= 256):
  // x is the untransformed input; 0 means none (or already applied by launch_hadamard).
  int hadamard_block;
  const uint32_t* hadamard_signs;  // launch_hadamard_signs words for hadamard_block
  uint8_t* data;  // codes [R, K] (FP8) or packed [R, K / 2] (FP4)
  void* scale;    // [R / br, K / bk]: fp32 (FP8), E8M0 bytes (MX), E4M3 codes (NVFP4)
};
cudaError_t launch_quantize(const QuantizeLaunch& a, cudaStream_t stream);

struct DequantizeLaunch {
  int kind, elem, out, V;
  const uint8_t* data;
  const void* scale;
  const float* global_scale;
  int64_t R, K, br, bk;
  void* y;
};
cudaError_t launch_dequantize(const DequantizeLaunch& a, cudaStream_t stream);

// Saturating cast of n elements to elem (E4M3, E5M2, BF16, FP16); codes of 1 or 2 bytes.
cudaError_t launch_cast(int in, int elem, bool stochastic, const void* x, int64_t n, uint64_t seed, void* y,
                        cudaStream_t stream);

}  // namespace cuda
}  // namespace lowbit
