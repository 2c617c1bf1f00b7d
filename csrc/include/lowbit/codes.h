// The enum codes of enums.h where Python arguments enter either extension: range and combination
// checks (a bad value is a TORCH_CHECK error naming the argument, never a crash), and the codes()
// table both extensions expose so the tests can compare it with lowbit/backends/codes.py.
#pragma once

#include <torch/extension.h>

#include <cstddef>
#include <string>

#include "lowbit/enums.h"

namespace lowbit {

static_assert(sizeof(kKindNames) / sizeof(*kKindNames) == kKindNVFP4 + 1, "one name per Kind");
static_assert(sizeof(kElemNames) / sizeof(*kElemNames) == kFP16 + 1, "one name per ElemId");
static_assert(sizeof(kRoundingNames) / sizeof(*kRoundingNames) == kRoundStochastic + 1, "one name per Rounding");
static_assert(sizeof(kScaleModeNames) / sizeof(*kScaleModeNames) == kScaleRceil + 1, "one name per ScaleMode");
static_assert(sizeof(kOutDtypeNames) / sizeof(*kOutDtypeNames) == kOutF16 + 1, "one name per OutDtype");

// `value` as a code of `names` (indexed by code).
template <size_t N>
int check_code(int64_t value, const char* const (&names)[N], const char* arg) {
  if (value >= 0 && value < (int64_t)N) return (int)value;
  std::string valid;
  for (size_t i = 0; i < N; ++i) valid += (i ? ", " : "") + std::to_string(i) + " (" + names[i] + ")";
  TORCH_CHECK(false, arg, ": expected one of ", valid, ", got ", value);
  return 0;
}

struct FormatCodes {
  Kind kind;
  ElemId elem;
};

// kind and elem of a quantized format, checked together.
inline FormatCodes check_format(int64_t kind, int64_t elem) {
  const Kind k = (Kind)check_code(kind, kKindNames, "kind");
  const ElemId e = (ElemId)check_code(elem, kElemNames, "elem");
  const bool fp8 = e == kE4M3 || e == kE5M2;
  const bool ok = k == kKindFP8 ? fp8 : (k == kKindMX ? fp8 || e == kE2M1 : e == kE2M1);
  TORCH_CHECK(ok, "elem: ", kKindNames[k], " has no ", kElemNames[e],
              " elements (fp8: e4m3, e5m2; mx: e4m3, e5m2, e2m1; nvfp4: e2m1)");
  return {k, e};
}

// FP8 takes every scale rule; MX scales are powers of two (floor, rceil), NVFP4's are E4M3 (exact).
inline ScaleMode check_scale_mode(int64_t mode, Kind kind) {
  const ScaleMode m = (ScaleMode)check_code(mode, kScaleModeNames, "scale_mode");
  const bool ok = kind == kKindFP8 || (kind == kKindMX ? m != kScaleExact : m == kScaleExact);
  TORCH_CHECK(ok, "scale_mode: ", kKindNames[kind], " takes ", kind == kKindMX ? "floor or rceil" : "exact",
              ", got ", kScaleModeNames[m]);
  return m;
}

// true for stochastic rounding.
inline bool check_rounding(int64_t rounding) {
  return check_code(rounding, kRoundingNames, "rounding") == kRoundStochastic;
}

// The element of an unscaled cast: one with a torch dtype.
inline ElemId check_cast_elem(int64_t elem) {
  const ElemId e = (ElemId)check_code(elem, kElemNames, "elem");
  TORCH_CHECK(e != kE2M1, "elem: e2m1 has no torch dtype; quantize to mxfp4 or nvfp4 instead");
  return e;
}

inline OutDtype check_out_dtype(int64_t out) { return (OutDtype)check_code(out, kOutDtypeNames, "out_dtype"); }

inline at::ScalarType out_scalar_type(OutDtype out) {
  return out == kOutF32 ? at::kFloat : (out == kOutBF16 ? at::kBFloat16 : at::kHalf);
}

// global_amax: absent, or one fp32 value, and only for NVFP4 (the one format with a per-tensor scale).
inline bool check_global_amax(const c10::optional<at::Tensor>& global_amax, Kind kind) {
  if (!global_amax.has_value() || !global_amax->defined()) return false;
  TORCH_CHECK(kind == kKindNVFP4, "global_amax: only nvfp4 has a per-tensor amax");
  TORCH_CHECK(global_amax->scalar_type() == at::kFloat && global_amax->numel() == 1,
              "global_amax: expected one float32 value, got ", global_amax->scalar_type(), " with ",
              global_amax->numel(), " elements");
  return true;
}

// {"kind": {"fp8": 0, ...}, "elem": {...}, ...}
inline pybind11::dict codes_table() {
  pybind11::dict table;
  auto add = [&table](const char* arg, const auto& names) {
    pybind11::dict t;
    for (size_t i = 0; i < sizeof(names) / sizeof(*names); ++i) t[names[i]] = (int)i;
    table[arg] = t;
  };
  add("kind", kKindNames);
  add("elem", kElemNames);
  add("rounding", kRoundingNames);
  add("scale_mode", kScaleModeNames);
  add("out_dtype", kOutDtypeNames);
  return table;
}

}  // namespace lowbit
