// Python bindings of the CPU kernels: the lowbit._C extension (used by lowbit/backends/cpu.py).
#include <torch/extension.h>

#include "common.h"
#include "lowbit/registry.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace c = lowbit::cpu;
  m.doc() = "lowbit CPU kernels (bit-exact to lowbit.backends.ref)";
  m.def("quantize", &c::quantize, "Quantize a contiguous [R, K] tensor into blocks (br, bk)", pybind11::arg("x"),
        pybind11::arg("kind"), pybind11::arg("elem"), pybind11::arg("br"), pybind11::arg("bk"),
        pybind11::arg("stochastic"), pybind11::arg("seed"), pybind11::arg("scale_mode"), pybind11::arg("global_amax"),
        pybind11::arg("hadamard_block"), pybind11::arg("inner"));
  m.def("dequantize", &c::dequantize, "Decode [R, K] codes and block scales to fp32", pybind11::arg("data"),
        pybind11::arg("scale"), pybind11::arg("global_scale"), pybind11::arg("kind"), pybind11::arg("elem"),
        pybind11::arg("br"), pybind11::arg("bk"), pybind11::arg("K"));
  m.def("cast", &c::cast, "Saturating cast of fp32 to e4m3 / e5m2 / bf16 / fp16", pybind11::arg("x"),
        pybind11::arg("elem"), pybind11::arg("stochastic"), pybind11::arg("seed"));
  m.def("hadamard", &c::hadamard, "Random Hadamard transform of 1 x block slices of the last dim (seed < 0: no signs)",
        pybind11::arg("x"), pybind11::arg("block"), pybind11::arg("seed"), pybind11::arg("inverse"));
  for (auto fn : lowbit::binding_registry<lowbit::CpuExt>()) fn(m);  // bindings that other kernel files registered
}
