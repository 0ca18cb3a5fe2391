
// Backward of aten::_grouped_mm, called from derivatives.yaml.
//
// The backward of a grouped mm is grouped mms in the other layouts, the same
// two formulas for all four layouts:
//   grad_mat_a = _grouped_mm(grad, mat_b^T, offs)
//   grad_mat_b = _grouped_mm(mat_a^T, grad, offs)
// e.g. 2D x 3D (rows of mat_a grouped): grad_mat_a is 2D x 3D again and
// grad_mat_b is 2D x 2D over M; 2D x 2D (K grouped): grad_mat_a is 3D x 2D and
// grad_mat_b is 2D x 3D.

// The generated code unpacks an absent Tensor? as an undefined tensor; the
// kernels tell the layouts apart by whether offs is present.
static std::optional<at::Tensor> grouped_mm_offs(const std::optional<at::Tensor>& offs) {
  return offs.has_value() && offs->defined() ? offs : std::nullopt;
}

// grad is cast to the input dtype (it is float32 under out_dtype=float32) and
// made contiguous: x.sum().backward() hands an expanded, stride-0 gradient,
// which the fast CUDA kernel cannot read. For a contiguous gradient a no-op.
static at::Tensor grouped_mm_grad_input(const at::Tensor& grad, at::ScalarType input_dtype) {
  return grad.to(input_dtype).contiguous();
}

at::Tensor grouped_mm_mat_a_backward(
    const at::Tensor& grad, const at::Tensor& mat_b, const std::optional<at::Tensor>& offs,
    at::ScalarType input_dtype) {
  return at::_grouped_mm(grouped_mm_grad_input(grad, input_dtype), mat_b.transpose(-2, -1), grouped_mm_offs(offs));
}

// grad_mat_b is produced in mat_b's own layout: for weights stored (G, N, K)
// and passed transposed (mat_b K-major), as (grad^T mat_a)^T, so that
// autograd need not copy it into the weight's layout.
at::Tensor grouped_mm_mat_b_backward(
    const at::Tensor& grad, const at::Tensor& mat_a, const at::Tensor& mat_b, const std::optional<at::Tensor>& offs,
    at::ScalarType input_dtype) {
  const auto g = grouped_mm_grad_input(grad, input_dtype);
  // Symbolic strides and sizes under torch.compile(dynamic=True): compared
  // as SymInts (a guard), never read as int64_t.
  const bool k_major = mat_b.sym_stride(-2) == 1 && mat_b.sym_stride(-1) != 1 && mat_b.sym_size(-1) > 1;
  if (k_major && (mat_b.dim() == 3) && (mat_a.dim() == 2 || mat_a.dim() == 3)) {
    return at::_grouped_mm(g.transpose(-2, -1), mat_a, grouped_mm_offs(offs)).transpose(-2, -1);
  }
  return at::_grouped_mm(mat_a.transpose(-2, -1), g, grouped_mm_offs(offs));
}

// Gradient of bias (G, N_out): each group's sum of grad over the rows (2D x 3D)
// or the batch (3D x 3D, 2D x 2D) it owns; in 3D x 2D group g owns the columns
// offs[g-1]:offs[g], and its bias row only receives those. Accumulates in fp32
// (fp64 for fp64) in a fixed order and returns the output dtype; when bias has
// the input dtype, autograd casts the gradient to it (validate_outputs).
at::Tensor grouped_mm_bias_backward(
    const at::Tensor& grad,
    const at::Tensor& mat_a,
    const at::Tensor& mat_b,
    const std::optional<at::Tensor>& maybe_offs) {
  const auto offs = grouped_mm_offs(maybe_offs);
  const auto grad_dtype = grad.scalar_type();
  const auto acc = grad_dtype == at::kDouble ? at::kDouble : at::kFloat;
  if (mat_a.dim() == 2 && mat_b.dim() == 3) {
    // Row sums per group are a 2D x 2D grouped mm with a row of ones.
    const auto ones = at::ones_symint({1, grad.sym_size(0)}, grad.options());
    const bool sixteen_bit = grad_dtype == at::kHalf || grad_dtype == at::kBFloat16;
    const auto out_dtype = sixteen_bit ? std::optional<at::ScalarType>(at::kFloat) : std::nullopt;
    return at::_grouped_mm(ones, grad, offs, std::nullopt, out_dtype).squeeze(1).to(grad_dtype);
  }
  if (mat_a.dim() == 3 && mat_b.dim() == 2) {
    const auto col_sum = grad.sum({0}, /*keepdim=*/false, acc);
    const auto cols = at::arange(grad.sym_size(1), offs->options());
    const auto col_group = at::searchsorted(*offs, cols, /*out_int32=*/false, /*right=*/true);
    const auto groups = at::arange(offs->sym_size(0), col_group.options());
    const auto mask = col_group.unsqueeze(0).eq(groups.unsqueeze(1));
    return at::where(mask, col_sum.unsqueeze(0), 0).to(grad_dtype);
  }
  return grad.sum({1}, /*keepdim=*/false, acc).to(grad_dtype);  // (G, M, N) outputs
}
