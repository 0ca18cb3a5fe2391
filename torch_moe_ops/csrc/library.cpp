// The moe_ops library: every schema is defined here, once. Kernels register
// per dispatch key: CPU below, CUDA in native/cuda/ or as Triton kernels from
// Python (torch_moe_ops/triton/cuda.py), Meta (fake) and autograd in Python
// (torch_moe_ops/ops/).

#include <Python.h>
#include <torch/library.h>

#include <ATen/native/ExpertMLP.h>
#include <ATen/native/GroupedMM.h>
#include <ATen/native/MoEQuantize.h>
#include <ATen/native/MoERouting.h>
#include <ATen/native/MoEScaledGroupedMM.h>

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
  m.def(
      "grouped_mm_gather(Tensor mat_a, Tensor mat_b, Tensor offs, Tensor? a_index=None, Tensor? b_index=None, "
      "Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "router_topk(Tensor logits, int k, str score_func=\"softmax\", Tensor? bias=None, int n_group=1, "
      "int topk_group=1, bool renormalize=False, float scaling_factor=1.0) -> (Tensor weights, Tensor expert_ids, "
      "Tensor counts)");
  m.def(
      "permute(Tensor tokens, Tensor expert_ids, int num_experts, int alignment=1, int first_expert=0, "
      "int? num_local_experts=None) -> (Tensor permuted, Tensor dst_rows, Tensor src_rows, Tensor offs)");
  m.def("unpermute(Tensor permuted, Tensor dst_rows, Tensor? weights=None) -> Tensor");
  m.def(
      "expert_mlp(Tensor tokens, Tensor src_rows, Tensor offs, Tensor dst_rows, Tensor? weights, "
      "Tensor gate_up_proj, Tensor down_proj, Tensor? gate_up_bias=None, Tensor? down_bias=None, "
      "str activation=\"swiglu\", bool gate_up_interleaved=False, float swiglu_alpha=1.702, "
      "float swiglu_limit=7.0) -> (Tensor out, Tensor h)");
  m.def(
      "expert_mlp_backward(Tensor grad_out, Tensor tokens, Tensor src_rows, Tensor offs, Tensor dst_rows, "
      "Tensor? weights, Tensor gate_up_proj, Tensor down_proj, Tensor? gate_up_bias, Tensor? down_bias, Tensor h, "
      "str activation, bool gate_up_interleaved, float swiglu_alpha, float swiglu_limit, bool[4] output_mask) -> "
      "(Tensor grad_tokens, Tensor grad_weights, Tensor grad_gate_up_proj, Tensor grad_down_proj, "
      "Tensor grad_gate_up_bias, Tensor grad_down_bias)");
  m.def(
      "unpermute_backward(Tensor grad_output, Tensor dst_rows, SymInt num_rows, Tensor? weights=None, "
      "Tensor? permuted=None) -> (Tensor grad_permuted, Tensor grad_weights)");
  m.def(
      "quantize_fp8(Tensor x, str recipe, ScalarType? float8_dtype=None, Tensor? offs=None, bool swizzle=False) "
      "-> (Tensor data, Tensor scale)");
  m.def(
      "dequantize_fp8(Tensor data, Tensor scale, str recipe, ScalarType? out_dtype=None, Tensor? offs=None, "
      "bool swizzle=False) -> Tensor");
  m.def("swizzle_mx_scale(Tensor scale, Tensor offs, int dim) -> Tensor");
  // The schema of aten::_scaled_grouped_mm.
  m.def(
      "scaled_grouped_mm(Tensor mat_a, Tensor mat_b, Tensor scale_a, Tensor scale_b, Tensor? offs=None, "
      "Tensor? bias=None, Tensor? scale_result=None, ScalarType? out_dtype=None, bool use_fast_accum=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_ops, CPU, m) {
  m.impl("grouped_mm", &at::native::grouped_mm_cpu);
  m.impl("grouped_mm_gather", &at::native::grouped_mm_gather_cpu);
  m.impl("router_topk", &at::native::moe_router_topk_cpu);
  m.impl("permute", &at::native::moe_permute_cpu);
  m.impl("unpermute", &at::native::moe_unpermute_cpu);
  m.impl("unpermute_backward", &at::native::moe_unpermute_backward_cpu);
  m.impl("quantize_fp8", &at::native::quantize_fp8_cpu);
  m.impl("dequantize_fp8", &at::native::dequantize_fp8_cpu);
  m.impl("scaled_grouped_mm", &at::native::scaled_grouped_mm_cpu);
  m.impl("swizzle_mx_scale", &at::native::swizzle_mx_scale);
  m.impl("expert_mlp", &at::native::expert_mlp);
  m.impl("expert_mlp_backward", &at::native::expert_mlp_backward);
}

#if defined(TORCH_MOE_OPS_WITH_CUDA)
TORCH_LIBRARY_IMPL(moe_ops, CUDA, m) {
  m.impl("router_topk", &at::native::moe_router_topk_cuda);
  m.impl("permute", &at::native::moe_permute_cuda);
  m.impl("unpermute", &at::native::moe_unpermute_cuda);
  m.impl("unpermute_backward", &at::native::moe_unpermute_backward_cuda);
  m.impl("quantize_fp8", &at::native::quantize_fp8_cuda);
  m.impl("dequantize_fp8", &at::native::dequantize_fp8_cuda);
  m.impl("swizzle_mx_scale", &at::native::swizzle_mx_scale);  // device-generic ATen code
  // grouped_mm, grouped_mm_gather, expert_mlp, expert_mlp_backward and
  // scaled_grouped_mm: Triton kernels, registered at this key from Python
  // (torch_moe_ops/triton/cuda.py).
}
#endif
