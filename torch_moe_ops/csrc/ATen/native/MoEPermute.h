#pragma once

// _moe_permute: checks and output sizes, shared by every backend (CPU, CUDA);
// the meta function restates them one for one, with the same messages.
//
//   permute(tokens (T, H), expert_ids (T, k), ...) -> permuted (R, H),
//       dst_rows (T, k) int64, src_rows (R,) int64, offs (L,) int32
//
// The row count R is a function of the shapes only (no host sync, no
// data-dependent shapes under torch.compile): the worst case
// R = T * k + L * (alignment - 1), L = number of local experts. Rows in
// [offs[-1], R) are unused and zero.

#include <ATen/core/Tensor.h>
#include <ATen/native/DispatchStub.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <limits>
#include <optional>

namespace at::native {

// Group starts are aligned to one of these row counts: 16-byte bf16 strides,
// fp8 rowwise (16), MXFP8 (32), DeepGEMM's contiguous layout (128).
inline bool permute_alignment_ok(int64_t alignment) {
  return alignment >= 1 && alignment <= 128 && (alignment & (alignment - 1)) == 0;
}

// Number of local experts L.
inline int64_t permute_num_local(int64_t num_experts, int64_t first_expert, std::optional<int64_t> num_local) {
  return num_local.value_or(num_experts - first_expert);
}

// Worst-case number of permuted rows: every (token, slot) local, and every
// local group padded by alignment - 1 rows.
inline int64_t permute_num_rows(int64_t tokens, int64_t top_k, int64_t num_local, int64_t alignment) {
  return tokens * top_k + num_local * (alignment - 1);
}

inline void permute_check_inputs(
    const Tensor& tokens,
    const Tensor& expert_ids,
    int64_t num_experts,
    int64_t alignment,
    int64_t first_expert,
    std::optional<int64_t> num_local_experts) {
  TORCH_CHECK_VALUE(tokens.dim() == 2,
      "permute: tokens must be 2-D (tokens, hidden), got ", tokens.dim(), "-D with sizes ", tokens.sizes());
  TORCH_CHECK_VALUE(expert_ids.dim() == 2,
      "permute: expert_ids must be 2-D (tokens, top_k), got ", expert_ids.dim(), "-D with sizes ",
      expert_ids.sizes());
  TORCH_CHECK_VALUE(expert_ids.scalar_type() == kInt || expert_ids.scalar_type() == kLong,
      "permute: expert_ids must be int32 or int64, got ", expert_ids.scalar_type());
  TORCH_CHECK_VALUE(expert_ids.size(0) == tokens.size(0),
      "permute: expert_ids must have one row per token (", tokens.size(0), "), got sizes ", expert_ids.sizes());
  TORCH_CHECK_VALUE(expert_ids.device() == tokens.device(),
      "permute: expert_ids must be on the device of tokens (", tokens.device(), "), got ", expert_ids.device());
  // Expert ids are int32 (router_topk's output) and every local expert has
  // an int32 entry in offs: counts past int32 cannot be honoured.
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts <= std::numeric_limits<int32_t>::max(),
      "permute: num_experts must be in [1, 2^31 - 1], got num_experts=", num_experts);
  TORCH_CHECK_VALUE(permute_alignment_ok(alignment),
      "permute: alignment must be a power of two in [1, 128], got alignment=", alignment);
  TORCH_CHECK_VALUE(first_expert >= 0 && first_expert < num_experts,
      "permute: first_expert must be in [0, num_experts=", num_experts, "), got first_expert=", first_expert);
  const int64_t num_local = permute_num_local(num_experts, first_expert, num_local_experts);
  // Compared with num_experts - first_expert, never first_expert + num_local, which can overflow.
  TORCH_CHECK_VALUE(num_local >= 1 && num_local <= num_experts - first_expert,
      "permute: num_local_experts must be in [1, num_experts - first_expert = ", num_experts - first_expert,
      "], got num_local_experts=", num_local);
  // offs is int32, the layout grouped_mm takes. Sizes are bounded first, so
  // the row count below cannot overflow int64.
  constexpr int64_t kMaxRows = std::numeric_limits<int32_t>::max();
  const int64_t tokens_n = tokens.size(0), top_k = expert_ids.size(1);
  const bool fits = top_k == 0 || tokens_n <= kMaxRows / top_k;
  const int64_t rows = fits ? permute_num_rows(tokens_n, top_k, num_local, alignment) : -1;
  TORCH_CHECK_VALUE(fits && rows <= kMaxRows,
      "permute: the permuted row count tokens * top_k + num_local_experts * (alignment - 1) = ", tokens_n, " * ",
      top_k, " + ", num_local, " * ", alignment - 1, " exceeds the int32 offsets (2^31 - 1)");
}

// Entry points: CPU in MoEPermute.cpp; CUDA in cuda/MoEPermute.cu, declared
// for every build as ATen declares its CUDA entries.
std::tuple<Tensor, Tensor, Tensor, Tensor> moe_permute_cpu(
    const Tensor& tokens, const Tensor& expert_ids, int64_t num_experts, int64_t alignment, int64_t first_expert,
    std::optional<int64_t> num_local_experts);
std::tuple<Tensor, Tensor, Tensor, Tensor> moe_permute_cuda(
    const Tensor& tokens, const Tensor& expert_ids, int64_t num_experts, int64_t alignment, int64_t first_expert,
    std::optional<int64_t> num_local_experts);

// The CPU kernel (cpu/MoEPermuteKernel.cpp). Outputs are fresh, contiguous
// and fully written by the kernel; expert_ids is contiguous, tokens' rows are.
using moe_permute_fn = void (*)(
    const Tensor& tokens, const Tensor& expert_ids, int64_t num_experts, int64_t alignment, int64_t first_expert,
    const Tensor& permuted, const Tensor& dst_rows, const Tensor& src_rows, const Tensor& offs);
DECLARE_DISPATCH(moe_permute_fn, moe_permute_stub);

} // namespace at::native
