// Random Hadamard transform of consecutive 1 x B slices of the last dim (B = 16 .. 32768).
//
// Bit-exact with ref.hadamard: every output is produced by the same sequence of fp32 operations
// (forward: sign multiply, butterfly stages h = 1, 2, 4, ..., B/2 each (a + c, a - c), multiply by
// fp32(1/sqrt(B)); inverse: butterfly, multiply, signs). Only where the stage operands live
// changes: each thread holds E consecutive elements; stages h < E run in registers, stages with
// partners in the same warp through shuffles, the rest through shared memory.
#include <cmath>

#include "common.cuh"
#include "fwht.cuh"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kMaxHadamardThreads = 512;

// Bit j of words[] = 1 iff s_j = -1 (top bit of word j mod 4 of Philox with counter (j/4, 0, 1, 0)).
__global__ void hadamard_signs_kernel(uint32_t* words, int block, uint64_t seed) {
  const int w = blockIdx.x * blockDim.x + threadIdx.x;
  if (w * 32 >= block) return;
  uint32_t bits = 0;
  for (int b = 0; b < 32; ++b) {
    const int j = w * 32 + b;
    if (j < block) bits |= (hadamard_sign_word(seed, (uint32_t)j) >> 31) << b;
  }
  words[w] = bits;
}

// Threads per transform block T = B / E. T <= 32: several transform blocks per warp, one thread
// block of kThreads handles kThreads / T of them. T > 32: one thread block of T threads per
// transform block, with a T x CH fp32 shared buffer for the stages across warps.
template <int IN, int E>
__global__ void __launch_bounds__(kMaxHadamardThreads)
    hadamard_kernel(const typename InTraits<IN>::Storage* __restrict__ x, float* __restrict__ y, int64_t nblocks,
                    int B, const uint32_t* __restrict__ signs, float norm, bool inverse) {
  constexpr int CH = E < 16 ? E : 16;
  extern __shared__ float exchange[];
  const int T = B / E;
  int64_t hb;
  int t;
  if (T <= 32) {
    const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    hb = g / T;
    t = (int)(g % T);
  } else {
    hb = blockIdx.x;
    t = threadIdx.x;
  }
  const bool valid = hb < nblocks;
  const int64_t base = hb * B + (int64_t)t * E;
  const int j0 = t * E;

  float v[E];
  if (valid) {
    load_f32<IN, E>(x + base, v);
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e) v[e] = 0.0f;
  }
  if (!inverse && signs != nullptr && valid) fwht_signs<E>(v, signs, j0);
  fwht_thread_stages<E>(v);
  fwht_warp_stages<E>(v, t, B);
  // Stages across warps (only when T > 32, where the whole thread block is one transform block).
  for (int h = 32 * E; h < B; h <<= 1) {
    const int lm = h / E;
    const bool upper = (t & lm) != 0;
#pragma unroll
    for (int e0 = 0; e0 < E; e0 += CH) {
#pragma unroll
      for (int c = 0; c < CH; ++c) exchange[c * T + t] = v[e0 + c];
      __syncthreads();
      float o[CH];
#pragma unroll
      for (int c = 0; c < CH; ++c) o[c] = exchange[c * T + (t ^ lm)];
      __syncthreads();
#pragma unroll
      for (int c = 0; c < CH; ++c) v[e0 + c] = upper ? sub_rn(o[c], v[e0 + c]) : add_rn(v[e0 + c], o[c]);
    }
  }
  fwht_scale<E>(v, norm);
  if (!valid) return;
  if (inverse && signs != nullptr) fwht_signs<E>(v, signs, j0);
  Pack<float, E> out;
#pragma unroll
  for (int e = 0; e < E; ++e) out.v[e] = v[e];
  *reinterpret_cast<Pack<float, E>*>(y + base) = out;
}

template <int IN, int E>
void launch(const void* x, float* y, int64_t nblocks, int B, const uint32_t* signs, float norm, bool inverse,
            cudaStream_t stream) {
  using S = typename InTraits<IN>::Storage;
  constexpr int CH = E < 16 ? E : 16;
  const int T = B / E;
  const S* xp = reinterpret_cast<const S*>(x);
  if (T <= 32) {
    const int64_t grid = ceil_div(nblocks * T, kThreads);
    hadamard_kernel<IN, E><<<(unsigned)grid, kThreads, 0, stream>>>(xp, y, nblocks, B, signs, norm, inverse);
  } else {
    const size_t smem = sizeof(float) * CH * T;
    hadamard_kernel<IN, E><<<(unsigned)nblocks, T, smem, stream>>>(xp, y, nblocks, B, signs, norm, inverse);
  }
}

template <int IN>
void dispatch(const void* x, float* y, int64_t nblocks, int B, const uint32_t* signs, float norm, bool inverse,
              cudaStream_t stream) {
  // Elements per thread: 8 up to B = 4096 (T <= 512), then B / 512.
  if (B <= 4096) {
    launch<IN, 8>(x, y, nblocks, B, signs, norm, inverse, stream);
  } else if (B == 8192) {
    launch<IN, 16>(x, y, nblocks, B, signs, norm, inverse, stream);
  } else if (B == 16384) {
    launch<IN, 32>(x, y, nblocks, B, signs, norm, inverse, stream);
  } else {
    launch<IN, 64>(x, y, nblocks, B, signs, norm, inverse, stream);
  }
}

}  // namespace

cudaError_t launch_hadamard_signs(uint32_t* sign_words, int B, uint64_t seed, cudaStream_t stream) {
  const int nwords = (B + 31) / 32;
  hadamard_signs_kernel<<<(unsigned)ceil_div(nwords, 128), 128, 0, stream>>>(sign_words, B, seed);
  return launch_status();
}

cudaError_t launch_hadamard(int in, const void* x, float* y, int64_t nblocks, int B, bool with_signs, uint64_t seed,
                            bool inverse, uint32_t* sign_words, cudaStream_t stream) {
  const float norm = fwht_norm(B);
  const uint32_t* signs = nullptr;
  if (with_signs) {
    launch_hadamard_signs(sign_words, B, seed, stream);
    signs = sign_words;
  }
  switch (in) {
    case kInF32: dispatch<kInF32>(x, y, nblocks, B, signs, norm, inverse, stream); break;
    case kInBF16: dispatch<kInBF16>(x, y, nblocks, B, signs, norm, inverse, stream); break;
    default: dispatch<kInF16>(x, y, nblocks, B, signs, norm, inverse, stream); break;
  }
  return launch_status();
}

}  // namespace cuda
}  // namespace lowbit
