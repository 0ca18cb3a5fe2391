at::Tensor grouped_mm_mat_a_backward(
    const at::Tensor& grad,
    const at::Tensor& mat_b,
    const std::optional<at::Tensor>& offs,
    at::ScalarType input_dtype);
at::Tensor grouped_mm_mat_b_backward(
    const at::Tensor& grad,
    const at::Tensor& mat_a,
    const at::Tensor& mat_b,
    const std::optional<at::Tensor>& offs,
    at::ScalarType input_dtype);
at::Tensor grouped_mm_bias_backward(
    const at::Tensor& grad,
    const at::Tensor& mat_a,
    const at::Tensor& mat_b,
    const std::optional<at::Tensor>& offs);
