// CPU entry point of _moe_unpermute_backward: validate, allocate, run the kernel.

#include <ATen/native/MoEUnpermuteBackward.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

namespace at::native {

DEFINE_DISPATCH(moe_unpermute_backward_stub);

std::tuple<Tensor, Tensor> moe_unpermute_backward_cpu(
    const Tensor& grad_output, const Tensor& dst_rows, int64_t num_rows, const std::optional<Tensor>& weights,
    const std::optional<Tensor>& permuted) {
  unpermute_backward_check_inputs(grad_output, dst_rows, num_rows, weights, permuted);
  const Tensor grad_c = grad_output.contiguous();
  // Rows no (token, slot) maps to (padding, unused tail) get a zero gradient;
  // the kernel writes every mapped row once.
  Tensor grad_permuted = at::zeros({num_rows, grad_output.size(1)}, grad_output.options());
  Tensor grad_weights;
  if (permuted.has_value()) {
    const auto w_dtype = weights.has_value() ? weights->scalar_type() : kFloat;
    grad_weights = at::empty(dst_rows.sizes(), grad_output.options().dtype(w_dtype));
  } else {
    grad_weights = at::empty({0}, grad_output.options().dtype(kFloat));
  }
  std::optional<Tensor> weights_c = weights.has_value() ? std::optional<Tensor>(weights->contiguous()) : std::nullopt;
  std::optional<Tensor> permuted_c =
      permuted.has_value() ? std::optional<Tensor>(permuted->contiguous()) : std::nullopt;
  moe_unpermute_backward_stub(kCPU, grad_c, dst_rows.contiguous(), weights_c, permuted_c, grad_permuted, grad_weights);
  return {grad_permuted, grad_weights};
}

} // namespace at::native
