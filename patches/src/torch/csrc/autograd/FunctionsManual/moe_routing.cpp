
// Backward of aten::_moe_router_topk, called from derivatives.yaml.
//
// The expert ids are a piecewise-constant function of the logits, so with the
// ids fixed the weights are smooth in the logits:
//   w = scaling_factor * renorm(gather(score(logits), ids))
// with score = softmax or sigmoid over the experts, or (softmax_after_topk)
// softmax over the k gathered logits. This is the chain rule of that
// expression, computed in the weights' precision (float32, float64 for
// float64 logits). The scatters write k distinct ids per row, so the result
// is deterministic.

at::Tensor moe_router_topk_backward(
    const at::Tensor& grad_weights,
    const at::Tensor& logits,
    const at::Tensor& expert_ids,
    c10::string_view score_func,
    bool renormalize,
    double scaling_factor) {
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto x = logits.to(acc);
  const auto ids = expert_ids.to(at::kLong);
  auto g = grad_weights.to(acc) * scaling_factor;
  const bool after_topk = score_func == "softmax_after_topk";
  at::Tensor s;
  at::Tensor v;
  if (after_topk) {
    v = at::softmax(x.gather(1, ids), -1);
  } else {
    s = score_func == "softmax" ? at::softmax(x, -1) : at::sigmoid(x);
    v = s.gather(1, ids);
  }
  if (renormalize) {
    const auto total = v.sum(-1, /*keepdim=*/true);
    const auto w = v / total;
    g = (g - (g * w).sum(-1, /*keepdim=*/true)) / total;
  }
  at::Tensor d_x;
  if (after_topk) {
    const auto d_sel = v * (g - (g * v).sum(-1, /*keepdim=*/true));
    d_x = at::zeros_like(x).scatter(1, ids, d_sel);
  } else {
    const auto d_s = at::zeros_like(x).scatter(1, ids, g);
    d_x = score_func == "softmax" ? s * (d_s - (d_s * s).sum(-1, /*keepdim=*/true)) : d_s * s * (1 - s);
  }
  return d_x.to(logits.scalar_type());
}
