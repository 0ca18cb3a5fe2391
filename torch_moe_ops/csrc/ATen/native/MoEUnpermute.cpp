// CPU entry point of _moe_unpermute: validate, allocate, run the kernel.

#include <ATen/native/MoEUnpermute.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

namespace at::native {

DEFINE_DISPATCH(moe_unpermute_stub);

Tensor moe_unpermute_cpu(const Tensor& permuted, const Tensor& dst_rows, const std::optional<Tensor>& weights) {
  unpermute_check_inputs(permuted, dst_rows, weights);
  Tensor out = at::empty({dst_rows.size(0), permuted.size(1)}, permuted.options());
  std::optional<Tensor> weights_c = weights.has_value() ? std::optional<Tensor>(weights->contiguous()) : std::nullopt;
  const Tensor permuted_c = permuted.stride(1) == 1 ? permuted : permuted.contiguous();
  moe_unpermute_stub(kCPU, permuted_c, dst_rows.contiguous(), weights_c, out);
  return out;
}

} // namespace at::native
