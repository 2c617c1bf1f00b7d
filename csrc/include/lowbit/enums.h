// The small integer codes the kernels of both extensions (lowbit._C, lowbit._C_cuda) take.
// Python parses the names once, in lowbit/backends/codes.py, which holds the same values: the two
// must match (each extension exposes these tables as codes(), and the tests compare them).
// Names below are indexed by code. Torch-free, so the .cu files can include it.
//
// Binding convention, the same for every op of both extensions: enums as these ints, checked on
// entry (an out-of-range value is an error naming the argument); the 64-bit Philox key as the
// signed int64 with the same 64 bits (codes.seed64); global_amax as an optional fp32 tensor.
#pragma once

#include <stdint.h>

namespace lowbit {

enum Kind : int { kKindFP8 = 0, kKindMX = 1, kKindNVFP4 = 2 };
constexpr const char* kKindNames[] = {"fp8", "mx", "nvfp4"};

enum ElemId : int { kE4M3 = 0, kE5M2 = 1, kE2M1 = 2, kBF16 = 3, kFP16 = 4 };
constexpr const char* kElemNames[] = {"e4m3", "e5m2", "e2m1", "bf16", "fp16"};

enum Rounding : int { kRoundNearest = 0, kRoundStochastic = 1 };
constexpr const char* kRoundingNames[] = {"nearest", "stochastic"};

enum ScaleMode : int { kScaleExact = 0, kScaleFloor = 1, kScaleRceil = 2 };
constexpr const char* kScaleModeNames[] = {"exact", "floor", "rceil"};

// The dtype dequantize writes.
enum OutDtype : int { kOutF32 = 0, kOutBF16 = 1, kOutF16 = 2 };
constexpr const char* kOutDtypeNames[] = {"float32", "bfloat16", "float16"};

}  // namespace lowbit
