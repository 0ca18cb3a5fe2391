// CPU entry point of _grouped_mm: validate, allocate, run the kernel.

#include <ATen/native/GroupedMM.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_strided.h>

namespace at::native {

DEFINE_DISPATCH(grouped_mm_stub);

Tensor grouped_mm_empty_cpu(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    ScalarType out_dtype) {
  const auto layout = grouped_mm_layout(mat_a, mat_b);
  int64_t covered = 0;
  if (offs.has_value()) {
    const int64_t split = grouped_mm_split_size(mat_a, mat_b);
    grouped_mm_check_offsets_cpu(*offs, split, grouped_mm_split_name(layout));
    covered = offs->size(0) > 0 ? offs->const_data_ptr<int32_t>()[(offs->size(0) - 1) * offs->stride(0)] : 0;
  }

  const auto size = grouped_mm_out_size(mat_a, mat_b, offs);
  Tensor out = at::empty_strided(size, grouped_mm_out_strides(size, out_dtype, mat_a.device()),
                                 mat_a.options().dtype(out_dtype));
  // Rows (2D x 3D) or columns (3D x 2D) that no group covers are zero, never
  // uninitialised memory.
  if (layout == GroupedMMLayout::k2d3d && covered < out.size(0)) {
    out.narrow(0, covered, out.size(0) - covered).zero_();
  } else if (layout == GroupedMMLayout::k3d2d && covered < out.size(1)) {
    out.narrow(1, covered, out.size(1) - covered).zero_();
  }
  return out;
}

Tensor grouped_mm_cpu(
    const Tensor& mat_a,
    const Tensor& mat_b,
    const std::optional<Tensor>& offs,
    const std::optional<Tensor>& bias,
    std::optional<ScalarType> out_dtype) {
  grouped_mm_check_inputs(mat_a, mat_b, offs, bias, out_dtype);
  Tensor out = grouped_mm_empty_cpu(mat_a, mat_b, offs, grouped_mm_out_dtype(mat_a, out_dtype));
  if (out.numel() > 0) {
    grouped_mm_stub(kCPU, mat_a, mat_b, offs, bias, std::nullopt, std::nullopt, out);
  }
  return out;
}

} // namespace at::native
