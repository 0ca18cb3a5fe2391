#pragma once

// What the MoE routing ops (_moe_permute, _moe_unpermute, _moe_router_topk;
// MoEPermute.h, MoEUnpermute.h, MoERouterTopk.h) share: the floating dtypes
// they compute in. Each op's header holds its checks, used by every backend
// (CPU, CUDA); the Python meta functions restate them one for one, with the
// same messages; keep the two in step.
//
// The token flow of an MoE layer:
//   weights, expert_ids, counts = _moe_router_topk(logits, k)
//   permuted, dst_rows, src_rows, offs = _moe_permute(tokens, expert_ids, E)
//   y = _grouped_mm(permuted, w, offs)
//   out = _moe_unpermute(y, dst_rows, weights)

#include <c10/core/ScalarType.h>

namespace at::native {

inline bool routing_float_dtype(ScalarType t) {
  return t == kFloat || t == kHalf || t == kBFloat16 || t == kDouble;
}

} // namespace at::native
