// The moe_ops library. Its schemas and the C++ kernels' registrations are
// generated from torch_moe_ops/native_functions.yaml (RegisterMoeOps.h, which
// setup.py writes into the build tree; torch_moe_ops/native_functions.py is
// the generator), so an op is declared once. Kernels registered from Python
// (Triton CUDA kernels in torch_moe_ops/triton/cuda.py), Meta (fake) and
// autograd are in torch_moe_ops/ops/. This file gathers the headers declaring
// the kernels and opens the library's blocks; its Python module (_C) holds
// only the large-output cache's controls, which are not ops.

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
#include <moe/GroupedMMCached.h>
#include <moe/GroupedMMGather.h>
#include <moe/LargeOutputCache.h>

#include <torch_moe_ops/RegisterMoeOps.h>

namespace {

// The large-output cache's controls (torch_moe_ops/memory.py wraps them). A
// c10::Error becomes the Python exception torch would raise for it.
template <typename F>
PyObject* call_translating_errors(F&& fn) {
  try {
    return fn();
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyObject* cpu_cache_stats(PyObject*, PyObject*) {
  return call_translating_errors([] {
    const auto s = torch_moe_ops::large_output_cache_stats();
    return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L,s:L,s:L}", "hits", s.hits, "misses", s.misses, "in_use_bytes",
                         s.in_use_bytes, "cached_bytes", s.cached_bytes, "cached_blocks", s.cached_blocks,
                         "limit_bytes", s.limit_bytes, "min_block_bytes", s.min_block_bytes);
  });
}

PyObject* cpu_cache_empty(PyObject*, PyObject*) {
  return call_translating_errors([] {
    torch_moe_ops::large_output_cache_empty();
    Py_RETURN_NONE;
  });
}

PyObject* cpu_cache_fill(PyObject*, PyObject* args) {
  int byte = 0;
  if (!PyArg_ParseTuple(args, "i", &byte)) {
    return nullptr;
  }
  if (byte < 0 || byte > 255) {
    PyErr_Format(PyExc_ValueError, "_cpu_cache_fill: byte must be in [0, 255], got %d", byte);
    return nullptr;
  }
  return call_translating_errors([&] {
    torch_moe_ops::large_output_cache_fill_held(static_cast<uint8_t>(byte));
    Py_RETURN_NONE;
  });
}

PyObject* cpu_cache_configure(PyObject*, PyObject* args) {
  long long limit = 0, min_block = 0;
  if (!PyArg_ParseTuple(args, "LL", &limit, &min_block)) {
    return nullptr;
  }
  return call_translating_errors([&] {
    torch_moe_ops::large_output_cache_configure(limit, min_block);
    Py_RETURN_NONE;
  });
}

PyMethodDef methods[] = {
    {"_cpu_cache_stats", cpu_cache_stats, METH_NOARGS, "the large-output cache's counters and settings"},
    {"_cpu_cache_empty", cpu_cache_empty, METH_NOARGS, "free every block the cache holds"},
    {"_cpu_cache_fill", cpu_cache_fill, METH_VARARGS, "(byte): write byte over every held block (tests)"},
    {"_cpu_cache_configure", cpu_cache_configure, METH_VARARGS, "(limit_bytes, min_block_bytes)"},
    {nullptr, nullptr, 0, nullptr}};

} // namespace

extern "C" {
// Importing torch_moe_ops._C loads this library and runs the registrations
// below; the module says whether CUDA kernels were built and holds the
// large-output cache's controls.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
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
