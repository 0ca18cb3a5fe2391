// CPU kernel of _moe_unpermute_backward: each row's gradient is written once
// (the weighted gradient of the token that reads it; where an index repeats
// rows, the sum over its readers in slot order, rounded once), and the
// weights' gradient is a dot product per (token, slot), in order. No atomics,
// deterministic. All element offsets are int64.

#include <ATen/native/MoEUnpermuteBackward.h>
#include <ATen/native/cpu/MoERoutingUtils.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace at::native {
namespace {

// sum_h a[h] * b[h] in acc_t, in order.
template <typename acc_t, typename scalar_t>
MOE_NO_FP_CONTRACT acc_t dot_row(const scalar_t* a, const scalar_t* b, int64_t n) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  acc_t dot = 0;
  for (int64_t h = 0; h < n; ++h) dot += static_cast<acc_t>(a[h]) * static_cast<acc_t>(b[h]);
  return dot;
}

// Slots grouped by the row they read, for a backward where rows repeat
// (an index that is not permute's): slot_start (rows + 1) and slots, the
// slots of row r in slot order at slots[slot_start[r] .. slot_start[r + 1]).
// Empty when every row is read at most once, the case permute produces.
struct RowSlots {
  std::vector<int64_t> slot_start, slots;
};

RowSlots group_slots_by_row(const int64_t* dst, int64_t n, int64_t rows) {
  RowSlots g;
  std::vector<int64_t> count(rows + 1, 0);
  bool repeated = false;
  for (const auto i : c10::irange(n)) {
    if (dst[i] >= 0) repeated |= count[dst[i] + 1]++ > 0;
  }
  if (!repeated) return g;
  for (const auto r : c10::irange(rows)) count[r + 1] += count[r];
  g.slot_start = count;
  g.slots.resize(count[rows]);
  for (const auto i : c10::irange(n)) {
    if (dst[i] >= 0) g.slots[count[dst[i]]++] = i;
  }
  return g;
}

void unpermute_backward_kernel(
    const Tensor& grad_output, const Tensor& dst_rows, const std::optional<Tensor>& weights,
    const std::optional<Tensor>& permuted, const Tensor& grad_permuted, const Tensor& grad_weights) {
  check_dst_rows("unpermute_backward", dst_rows, grad_permuted.size(0));
  const int64_t num_tokens = dst_rows.size(0);
  const int64_t top_k = dst_rows.size(1);
  const int64_t hidden = grad_output.size(1);
  const int64_t num_rows = grad_permuted.size(0);
  const int64_t* dst = dst_rows.const_data_ptr<int64_t>();
  const RowSlots by_row = group_slots_by_row(dst, dst_rows.numel(), num_rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(kBFloat16, kHalf, grad_output.scalar_type(), "moe_unpermute_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad_output.const_data_ptr<scalar_t>();
    scalar_t* gp = grad_permuted.mutable_data_ptr<scalar_t>();
    const scalar_t* x = permuted.has_value() ? permuted->const_data_ptr<scalar_t>() : nullptr;
    const auto w = weight_reader<scalar_t, acc_t>(weights);
    const bool weighted = weights.has_value();
    // grad_weights is float32 or the data dtype (like weights), when computed.
    const bool gw_is_f32 = x != nullptr && grad_weights.scalar_type() == kFloat;
    float* gw_f32 = gw_is_f32 ? grad_weights.mutable_data_ptr<float>() : nullptr;
    scalar_t* gw_same = x != nullptr && !gw_is_f32 ? grad_weights.mutable_data_ptr<scalar_t>() : nullptr;
    const bool rows_repeat = !by_row.slots.empty();
    if (rows_repeat) {
      // A row read by several slots gets the sum of their gradients, in
      // slot order, rounded once: the same bits however the rows are split.
      at::parallel_for(0, num_rows, moe_row_grain(hidden * grad_output.element_size()), [&](int64_t r0, int64_t r1) {
        std::vector<acc_t> acc(hidden);
        for (const auto r : c10::irange(r0, r1)) {
          const int64_t b = by_row.slot_start[r], e = by_row.slot_start[r + 1];
          if (b == e) continue;
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t s = b; s < e; ++s) {
            const int64_t i = by_row.slots[s];
            const scalar_t* gt = g + (i / top_k) * hidden;
            const acc_t wi = weighted ? w(i) : acc_t(1);
            accumulate_row(acc.data(), gt, &wi, hidden);
          }
          scalar_t* out_row = gp + r * hidden;
          for (const auto h : c10::irange(hidden)) out_row[h] = static_cast<scalar_t>(acc[h]);
        }
      });
    }
    at::parallel_for(0, num_tokens, moe_row_grain(hidden * top_k * grad_output.element_size()), [&](int64_t t0, int64_t t1) {
      for (const auto t : c10::irange(t0, t1)) {
        const scalar_t* gt = g + t * hidden;
        for (const auto j : c10::irange(top_k)) {
          const int64_t i = t * top_k + j;
          const int64_t r = dst[i];
          // Each (token, slot) owns its row here: one writer per row, no atomics.
          if (r >= 0 && !rows_repeat) {
            scalar_t* out_row = gp + r * hidden;
            if (weighted) {
              const acc_t wj = w(i);
              for (const auto h : c10::irange(hidden)) out_row[h] = static_cast<scalar_t>(wj * static_cast<acc_t>(gt[h]));
            } else {
              std::memcpy(out_row, gt, hidden * sizeof(scalar_t));
            }
          }
          if (x != nullptr) {
            const acc_t dot = r >= 0 ? dot_row<acc_t>(gt, x + r * hidden, hidden) : acc_t(0);
            if (gw_f32 != nullptr) {
              gw_f32[i] = static_cast<float>(dot);
            } else {
              gw_same[i] = static_cast<scalar_t>(dot);
            }
          }
        }
      }
    });
  });
}

} // namespace

ALSO_REGISTER_AVX512_DISPATCH(moe_unpermute_backward_stub, &unpermute_backward_kernel)

} // namespace at::native
