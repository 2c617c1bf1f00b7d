// Python bindings of the CPU kernels: the lowbit._C extension (used by lowbit/backends/cpu).
// quantize, dequantize, cast and hadamard take the argument lists of lowbit._C_cuda's, built by
// lowbit/backends/codes.py (conventions in lowbit/enums.h).
#include <torch/extension.h>

#include "common.h"
#include "lowbit/codes.h"
#include "lowbit/registry.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace c = lowbit::cpu;
  using pybind11::arg;
  m.doc() = "lowbit CPU kernels (bit-exact to lowbit.backends.ref)";
  m.def("quantize", &c::quantize, "Quantize a contiguous [R, K] tensor into blocks (br, bk)", arg("x"), arg("kind"),
        arg("elem"), arg("br"), arg("bk"), arg("rounding"), arg("seed"), arg("scale_mode"), arg("global_amax"),
        arg("hadamard_block"), arg("inner"));
  m.def("dequantize", &c::dequantize, "Decode [R, K] codes and block scales", arg("data"), arg("scale"),
        arg("global_scale"), arg("kind"), arg("elem"), arg("br"), arg("bk"), arg("K"), arg("out_dtype"));
  m.def("cast", &c::cast, "Saturating cast of fp32 to e4m3 / e5m2 / bf16 / fp16", arg("x"), arg("elem"),
        arg("rounding"), arg("seed"));
  m.def("hadamard", &c::hadamard, "Random Hadamard transform of 1 x block slices of the last dim (seed None: no signs)",
        arg("x"), arg("block"), arg("seed"), arg("inverse"));
  m.def("codes", &lowbit::codes_table, "The enum codes the ops take: {argument: {name: code}}");
  for (auto fn : lowbit::binding_registry<lowbit::CpuExt>()) fn(m);  // bindings that other kernel files registered
}
