// Counter-based random bits shared by every C++ / CUDA kernel of lowbit.
// r(seed, i) = word (i mod 4) of Philox4x32-10 with counter (lo32(i/4), hi32(i/4), 0, 0) and
// key (lo32(seed), hi32(seed)); Hadamard signs use counter (j/4, 0, 1, 0) so the streams are disjoint.
// See lowbit/backends/ref.py for the spec.
#pragma once

#include <stdint.h>

#ifndef LOWBIT_HD
#ifdef __CUDACC__
#define LOWBIT_HD __host__ __device__ __forceinline__
#else
#define LOWBIT_HD inline
#endif
#endif

namespace lowbit {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Philox4 {
  uint32_t w[4];
};

LOWBIT_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return (uint32_t)(((uint64_t)a * (uint64_t)b) >> 32);
#endif
}

// Philox4x32-10 with counter (c0, c1, c2, c3) and key (k0, k1).
LOWBIT_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = mulhi32(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  Philox4 r;
  r.w[0] = c0;
  r.w[1] = c1;
  r.w[2] = c2;
  r.w[3] = c3;
  return r;
}

// The four rounding words r(seed, 4q), ..., r(seed, 4q + 3).
LOWBIT_HD Philox4 random_bits4(uint64_t seed, uint64_t q) {
  return philox4x32_10((uint32_t)q, (uint32_t)(q >> 32), 0u, 0u, (uint32_t)seed, (uint32_t)(seed >> 32));
}

// r(seed, i): the rounding bits of flat element index i.
LOWBIT_HD uint32_t random_bits(uint64_t seed, uint64_t i) {
  const Philox4 p = random_bits4(seed, i >> 2);
  const uint32_t lane = (uint32_t)(i & 3u);
  return lane == 0 ? p.w[0] : lane == 1 ? p.w[1] : lane == 2 ? p.w[2] : p.w[3];
}

// The 24 bits u is made of: u = random_u24(r) * 2^-24.
LOWBIT_HD uint32_t random_u24(uint32_t r) { return r >> 8; }

// u = (r >> 8) * 2^-24, exact in fp32.
LOWBIT_HD float uniform_from_bits(uint32_t r) { return (float)(r >> 8) * 5.9604644775390625e-08f; }

// Word (j mod 4) of the Hadamard sign stream: counter (j/4, 0, 1, 0).
LOWBIT_HD uint32_t hadamard_sign_word(uint64_t seed, uint32_t j) {
  const Philox4 p = philox4x32_10(j >> 2, 0u, 1u, 0u, (uint32_t)seed, (uint32_t)(seed >> 32));
  const uint32_t lane = j & 3u;
  return lane == 0 ? p.w[0] : lane == 1 ? p.w[1] : lane == 2 ? p.w[2] : p.w[3];
}

// Sign s_j of the random Hadamard transform: -1 iff the top bit of the sign word is set.
LOWBIT_HD float hadamard_sign(uint64_t seed, uint32_t j) {
  return (hadamard_sign_word(seed, j) >> 31) ? -1.0f : 1.0f;
}

}  // namespace lowbit
