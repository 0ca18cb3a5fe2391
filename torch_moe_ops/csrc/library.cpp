// The moe_ops library: every schema is defined here, once. Kernels register
// per dispatch key: CPU below, CUDA in native/cuda/, Meta (fake) and autograd
// in Python (torch_moe_ops/ops/).

#include <Python.h>
#include <torch/library.h>

#include <ATen/native/GroupedMM.h>

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
  m.def(
      "grouped_mm(Tensor mat_a, Tensor mat_b, Tensor? offs=None, Tensor? bias=None, "
      "ScalarType? out_dtype=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_ops, CPU, m) {
  m.impl("grouped_mm", &at::native::grouped_mm_cpu);
}

#if defined(TORCH_MOE_OPS_WITH_CUDA)
TORCH_LIBRARY_IMPL(moe_ops, CUDA, m) {
  m.impl("grouped_mm", &at::native::grouped_mm_cuda);
}
#endif
