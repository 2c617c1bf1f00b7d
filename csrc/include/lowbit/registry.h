// Each kernel file adds its own Python bindings to its extension, so files stay independent:
//   static const lowbit::Bindings<lowbit::CpuExt> kMyOps([](pybind11::module_& m) { m.def("my_op", &my_op); });
// The extension's module file runs every function registered for it when the extension loads.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace lowbit {

struct CpuExt {};   // lowbit._C
struct CudaExt {};  // lowbit._C_cuda

using BindFn = void (*)(pybind11::module_&);

// One registry per extension (the tag keeps the symbols of the two extensions apart).
template <class Ext>
std::vector<BindFn>& binding_registry() {
  static std::vector<BindFn> fns;  // function-local: safe from static initialisation order
  return fns;
}

template <class Ext>
struct Bindings {
  explicit Bindings(BindFn fn) { binding_registry<Ext>().push_back(fn); }
};

}  // namespace lowbit
