#pragma once

// Project-only (csrc/moe/, outside the ATen mirror; why: patches/manifest.py
// NOT_UPSTREAMED). moe_ops::grouped_mm's CPU entry in this extension: ATen's
// grouped_mm_cpu (ATen/native/GroupedMM.cpp, the entry the core series
// registers for _grouped_mm) with its output's storage from the large-output
// cache (LargeOutputCache.h). A training step's 2D x 2D weight gradients are
// hundreds of MB, freed and allocated again at the same sizes every step;
// from the cache they are written into the pages the last step freed instead
// of freshly faulted ones. Upstream keeps ATen's allocator: a CPU allocation
// policy is the process's, not an op's.

#include <ATen/native/GroupedMM.h>

#include <ATen/core/Tensor.h>

#include <optional>

namespace at::native {

// grouped_mm_empty_cpu's output (offs checked, rows (2D x 3D) or columns
// (3D x 2D) past offs[-1] zeroed), its storage from the large-output cache.
// mat_a and mat_b give the operands' shapes only (grouped_mm_gather passes
// stand-ins of its gathered operands). Its steps are ATen's, around another
// allocator (grouped_mm_empty_cpu takes none): the same helpers of
// GroupedMM.h check offs and zero what no group covers. Here every grouped_mm
// test runs through this one; test_large_output_cache.py also runs it on
// reused, NaN-filled blocks.
Tensor grouped_mm_empty_cached(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    ScalarType out_dtype);

Tensor grouped_mm_cached_cpu(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    const std::optional<Tensor>& bias,
    std::optional<ScalarType> out_dtype);

} // namespace at::native
