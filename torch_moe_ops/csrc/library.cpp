// The moe_ops library. Its schemas and the C++ kernels' registrations are
// generated from torch_moe_ops/native_functions.yaml (RegisterMoeOps.h, which
// setup.py writes into the build tree; torch_moe_ops/native_functions.py is
// the generator), so an op is declared once. Kernels registered from Python
// (Triton CUDA kernels in torch_moe_ops/triton/cuda.py), Meta (fake) and
// autograd are in torch_moe_ops/ops/. This file only gathers the headers
// declaring the kernels and opens the library's blocks.

#include <Python.h>
#include <torch/library.h>

#include <ATen/native/GroupedMM.h>
#include <ATen/native/MoEPermute.h>
#include <ATen/native/MoEQuantize.h>
#include <ATen/native/MoERouterTopk.h>
#include <ATen/native/MoEScaledGroupedMM.h>
#include <ATen/native/MoEUnpermute.h>
#include <ATen/native/MoEUnpermuteBackward.h>
#include <ATen/native/MoESwizzleMXScale.h>
#include <ATen/native/MoEScaledGroupedMMv2.h>
#include <moe/ExpertMLP.h>
#include <moe/GroupedMMGather.h>

#include <torch_moe_ops/RegisterMoeOps.h>

extern "C" {
// Importing torch_moe_ops._C loads this library and runs the registrations
// below; the module itself only says whether CUDA kernels were built.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
#if defined(TORCH_MOE_OPS_WITH_CUDA)
  constexpr long kWithCuda = 1;
#else
  constexpr long kWithCuda = 0;
#endif
  if (module != nullptr && PyModule_AddIntConstant(module, "WITH_CUDA", kWithCuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(moe_ops, m) {
  torch_moe_ops::generated::define_schemas(m);
}

TORCH_LIBRARY_IMPL(moe_ops, CPU, m) {
  torch_moe_ops::generated::register_CPU(m);
}

#if defined(TORCH_MOE_OPS_WITH_CUDA)
TORCH_LIBRARY_IMPL(moe_ops, CUDA, m) {
  torch_moe_ops::generated::register_CUDA(m);
}
#endif
