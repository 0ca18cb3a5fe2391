// CPU kernel of _moe_permute: a counting sort of (token, slot) pairs by
// expert, stable in (token, slot) order. Tokens are cut into chunks; a
// per-chunk histogram and a prefix sum over (expert, chunk) give every chunk
// its first row in every group, so the chunks assign rows in parallel and the
// result does not depend on the number of chunks or threads. The rows are then
// gathered in destination order: every permuted row (copy, padding or unused
// tail) is written exactly once, sequentially, without a prior zero-fill.
// All element offsets are int64.

#include <ATen/native/MoEPermute.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace at::native {
namespace {

void permute_kernel(
    const Tensor& tokens, const Tensor& expert_ids, int64_t num_experts, int64_t alignment, int64_t first_expert,
    const Tensor& permuted, const Tensor& dst_rows, const Tensor& src_rows, const Tensor& offs) {
  const int64_t num_tokens = tokens.size(0);
  const int64_t top_k = expert_ids.size(1);
  const int64_t num_local = offs.size(0);
  const int64_t rows = permuted.size(0);
  int64_t* dst = dst_rows.mutable_data_ptr<int64_t>();
  int64_t* src = src_rows.mutable_data_ptr<int64_t>();
  int32_t* offs_out = offs.mutable_data_ptr<int32_t>();

  // Chunks of tokens; any count gives the same result (see the top comment).
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(num_tokens, at::get_num_threads()));
  const auto chunk_begin = [&](int64_t c) { return c * num_tokens / chunks; };
  // hist[c * L + e]: rows of local expert e in chunk c; becomes chunk c's next row in group e.
  std::vector<int64_t> hist(chunks * num_local, 0);
  std::vector<int64_t> first_bad(chunks, -1);

  AT_DISPATCH_INDEX_TYPES(expert_ids.scalar_type(), "moe_permute_cpu", [&] {
    const index_t* ids = expert_ids.const_data_ptr<index_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (const auto c : c10::irange(c0, c1)) {
        int64_t* h = hist.data() + c * num_local;
        for (int64_t i = chunk_begin(c) * top_k; i < chunk_begin(c + 1) * top_k; ++i) {
          const int64_t e = static_cast<int64_t>(ids[i]);
          if (e < 0 || e >= num_experts) {
            first_bad[c] = i;
            break;
          }
          const int64_t local = e - first_expert;
          if (local >= 0 && local < num_local) {
            ++h[local];
          }
        }
      }
    });
    for (const auto c : c10::irange(chunks)) {
      if (first_bad[c] >= 0) {
        const int64_t i = first_bad[c];
        TORCH_CHECK_VALUE(false, "permute: expert_ids must be in [0, num_experts=", num_experts,
                          "), got expert_ids[", i / top_k, ", ", i % top_k, "]=", static_cast<int64_t>(ids[i]));
      }
    }

    // Group starts (aligned) and each chunk's first row in each group.
    int64_t start = 0;
    for (const auto e : c10::irange(num_local)) {
      int64_t next = start;
      for (const auto c : c10::irange(chunks)) {
        const int64_t n = hist[c * num_local + e];
        hist[c * num_local + e] = next;
        next += n;
      }
      const int64_t end = (next + alignment - 1) / alignment * alignment;
      for (int64_t r = next; r < end; ++r) {
        src[r] = -1;  // padding
      }
      offs_out[e] = static_cast<int32_t>(end);
      start = end;
    }
    for (int64_t r = start; r < rows; ++r) {
      src[r] = -1;  // unused tail
    }

    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (const auto c : c10::irange(c0, c1)) {
        int64_t* next = hist.data() + c * num_local;
        for (int64_t i = chunk_begin(c) * top_k; i < chunk_begin(c + 1) * top_k; ++i) {
          const int64_t local = static_cast<int64_t>(ids[i]) - first_expert;
          if (local >= 0 && local < num_local) {
            const int64_t r = next[local]++;
            dst[i] = r;
            src[r] = i;
          } else {
            dst[i] = -1;
          }
        }
      }
    });
  });

  // Gather the rows in destination order. A pure copy: bytes, any dtype.
  const int64_t row_bytes = tokens.size(1) * tokens.element_size();
  const int64_t in_stride = tokens.stride(0) * tokens.element_size();
  const char* in = static_cast<const char*>(tokens.const_data_ptr());
  char* out = static_cast<char*>(permuted.mutable_data_ptr());
  // Rows per task: ~64 KB of data each.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (const auto r : c10::irange(r0, r1)) {
      char* o = out + r * row_bytes;
      if (src[r] >= 0) {
        std::memcpy(o, in + (src[r] / top_k) * in_stride, row_bytes);
      } else {
        std::memset(o, 0, row_bytes);
      }
    }
  });
}

} // namespace

ALSO_REGISTER_AVX512_DISPATCH(moe_permute_stub, &permute_kernel)

} // namespace at::native
