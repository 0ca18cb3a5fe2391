at::Tensor moe_router_topk_backward(
    const at::Tensor& grad_weights,
    const at::Tensor& logits,
    const at::Tensor& expert_ids,
    c10::string_view score_func,
    bool renormalize,
    double scaling_factor);
