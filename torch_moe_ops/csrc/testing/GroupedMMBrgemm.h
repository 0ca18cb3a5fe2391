#pragma once

// Test-only: the brgemm engine of the CPU grouped mm kernel on one group
// (testing/GroupedMMBrgemm.cpp's op, testing/cpu/GroupedMMBrgemmKernel.cpp's
// per-capability kernel, as ATen splits an op from its native/cpu/ kernel).

#include <ATen/core/Tensor.h>
#include <ATen/native/DispatchStub.h>

#include <optional>

namespace at::native {

// out (M, N) = mat_a rows (through a_index when given) @ mat_b (+ bias), by
// the brgemm engine with ATen's primitives or (reference) the scalar model.
using grouped_mm_brgemm_fn = void (*)(const Tensor& mat_a, const Tensor& mat_b, const std::optional<Tensor>& bias,
                                      const std::optional<Tensor>& a_index, Tensor& out, bool reference);
DECLARE_DISPATCH(grouped_mm_brgemm_fn, grouped_mm_brgemm_stub);

} // namespace at::native
