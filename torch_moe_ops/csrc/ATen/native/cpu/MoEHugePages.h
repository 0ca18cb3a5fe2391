#pragma once

// Large fresh outputs of the MoE kernels (permuted tokens, weight gradients)
// are written exactly once, so their cost is dominated by first-touch page
// faults (~1 us per 4 KB page: a 200 MB gradient spends ~50 ms faulting, more
// than its GEMM takes). Asking for transparent huge pages before the first
// touch makes that 512x fewer faults. Only a hint, never a change of results:
// no effect when THP is off, and skipped for memory the allocator reuses
// already faulted in (see below). c10's allocator advises every allocation
// when THP_MEM_ALLOC_ENABLE=1 is set.

#include <ATen/core/Tensor.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace at::native {

static inline void moe_advise_huge_pages(const Tensor& fresh) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr int64_t kHugePage = int64_t(2) << 20;
  const int64_t bytes = fresh.nbytes();
  if (bytes < 2 * kHugePage) {
    return;
  }
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(fresh.const_data_ptr());
  const uintptr_t aligned = (begin + page - 1) / page * page;
  const uintptr_t end = begin + static_cast<uintptr_t>(bytes);
  // Memory the allocator reuses (already faulted in, from the heap) gains
  // nothing and loses: the advice splits the heap's mapping and hands its
  // pages to khugepaged, which made a warm 32 MB permute 2x slower.
  unsigned char resident = 0;
  if (mincore(reinterpret_cast<void*>(aligned), page, &resident) == 0 && (resident & 1) != 0) {
    return;
  }
  // Failure (EINVAL without THP support) just leaves the default pages.
  (void)madvise(reinterpret_cast<void*>(aligned), (end - aligned) / page * page, MADV_HUGEPAGE);
#endif
}

} // namespace at::native
