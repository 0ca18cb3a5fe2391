#pragma once

// Project-only (csrc/moe/, outside the ATen mirror; why: patches/manifest.py
// NOT_UPSTREAMED): a bounded cache of large CPU blocks for the outputs of the
// MoE layer's backward (grouped_mm's, grouped_mm_gather's, expert_mlp's).
//
// Why: an expert layer's weight gradients are hundreds of MB that a training
// step frees (zero_grad(set_to_none=True)) and the next step allocates again
// at the same sizes. glibc maps blocks above its mmap threshold (32 MiB at
// most) afresh on every malloc and unmaps them on free, so each step's
// gradients are written into new pages, which the kernel faults in and zeroes:
// 22-40 ms of a Qwen3 layer's ~190 ms step on the Zen 4 VM (benchmarks/
// README.md, "rounds, GEMMs and pages"), where the dense MLP's 2 MB of
// gradients stay in the heap. CUDA's caching allocator keeps such blocks on
// the GPU; c10's CPU allocator keeps nothing outside StaticRuntime. This
// cache keeps a freed block for the next request of exactly its size.
//
// Policy: blocks of at least min_block_bytes (default 32 MiB: below it the
// heap reuses memory itself) are cached; at most limit_bytes (default 2 GiB,
// TORCH_MOE_OPS_CPU_CACHE_MB in MiB, 0 turns the cache off) are held free,
// the oldest released first when a new one does not fit. A failed allocation
// empties the cache and tries once more. Reused memory holds the previous
// tensor's bytes, as at::empty's may: the kernels write every output element.
// Thread-safe; the held blocks are released by empty() or at process exit.

#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>

#include <cstddef>
#include <cstdint>

namespace torch_moe_ops {

struct LargeOutputCacheStats {
  int64_t hits = 0;           // requests served from a cached block
  int64_t misses = 0;         // cacheable requests that allocated
  int64_t in_use_bytes = 0;   // cached-size blocks held by tensors now
  int64_t cached_bytes = 0;   // free bytes held now
  int64_t cached_blocks = 0;
  int64_t limit_bytes = 0;
  int64_t min_block_bytes = 0;
};

// The process-wide cache, a c10::Allocator: storages it allocates may resize.
c10::Allocator* large_output_cache();

LargeOutputCacheStats large_output_cache_stats();
// Frees every held block.
void large_output_cache_empty();
// Writes `byte` over every held block (tests: a reused block must never show
// its old bytes in an output).
void large_output_cache_fill_held(uint8_t byte);
// limit 0 turns caching off (and frees what is held); blocks beyond a
// lowered limit are freed, oldest first.
void large_output_cache_configure(int64_t limit_bytes, int64_t min_block_bytes);

// at::empty / at::empty_strided on CPU, their storage from the cache.
at::Tensor empty_cached(c10::IntArrayRef size, c10::ScalarType dtype);
at::Tensor empty_strided_cached(c10::IntArrayRef size, c10::IntArrayRef stride, c10::ScalarType dtype);

} // namespace torch_moe_ops
