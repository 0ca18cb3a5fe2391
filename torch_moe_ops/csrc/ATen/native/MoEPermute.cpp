// CPU entry point of _moe_permute: validate, allocate, run the kernel.

#include <ATen/native/MoEPermute.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

namespace at::native {

DEFINE_DISPATCH(moe_permute_stub);

std::tuple<Tensor, Tensor, Tensor, Tensor> moe_permute_cpu(
    const Tensor& tokens, const Tensor& expert_ids, int64_t num_experts, int64_t alignment, int64_t first_expert,
    std::optional<int64_t> num_local_experts) {
  permute_check_inputs(tokens, expert_ids, num_experts, alignment, first_expert, num_local_experts);
  const int64_t num_local = permute_num_local(num_experts, first_expert, num_local_experts);
  const int64_t rows = permute_num_rows(tokens.size(0), expert_ids.size(1), num_local, alignment);
  // Every element of the outputs is written by the kernel (padding and unused
  // rows are zeroed there, in the same pass as the copy): no zero-fill here.
  Tensor permuted = at::empty({rows, tokens.size(1)}, tokens.options());
  Tensor dst_rows = at::empty(expert_ids.sizes(), expert_ids.options().dtype(kLong));
  Tensor src_rows = at::empty({rows}, expert_ids.options().dtype(kLong));
  Tensor offs = at::empty({num_local}, expert_ids.options().dtype(kInt));
  // The kernel copies whole rows: a row-strided tokens view is read in place,
  // anything else is made row-contiguous once.
  const Tensor tokens_c = tokens.stride(1) == 1 ? tokens : tokens.contiguous();
  moe_permute_stub(kCPU, tokens_c, expert_ids.contiguous(), num_experts, alignment, first_expert, permuted, dst_rows,
                     src_rows, offs);
  return {permuted, dst_rows, src_rows, offs};
}

} // namespace at::native
