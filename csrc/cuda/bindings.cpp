// Python module lowbit._C_cuda: the CUDA kernels behind lowbit/backends/cuda.py.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowbit CUDA kernels: quantize, dequantize, cast, hadamard (bit-exact with lowbit.backends.ref)";
  m.def("quantize", &lowbit::cuda::quantize, "quantize [R, K] into FP8 / MX / NVFP4 -> (data, scale, global_scale)",
        py::arg("x"), py::arg("kind"), py::arg("elem"), py::arg("br"), py::arg("bk"), py::arg("rounding"),
        py::arg("seed"), py::arg("scale_mode"), py::arg("global_amax"), py::arg("hadamard_block"), py::arg("inner"));
  m.def("dequantize", &lowbit::cuda::dequantize, "decode quantized [R, K] data", py::arg("data"), py::arg("scale"),
        py::arg("global_scale"), py::arg("kind"), py::arg("elem"), py::arg("br"), py::arg("bk"), py::arg("K"),
        py::arg("out_dtype"));
  m.def("cast", &lowbit::cuda::cast, "saturating cast to bf16 / fp16 / fp8", py::arg("x"), py::arg("dtype"),
        py::arg("rounding"), py::arg("seed"));
  m.def("hadamard", &lowbit::cuda::hadamard, "random Hadamard transform along the last dim", py::arg("x"),
        py::arg("block"), py::arg("seed"), py::arg("inverse"));
}
