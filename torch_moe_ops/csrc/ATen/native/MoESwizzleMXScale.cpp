// swizzle_mx_scale (CPU and CUDA: device-generic ATen code) and its inverse,
// which the CPU entry of scaled_grouped_mm uses on blocked MX scales.

#include <ATen/native/GroupedMM.h>
#include <ATen/native/MoESwizzleMXScale.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <string>

namespace at::native {

namespace {

// fp8_swizzled_offset on tensors (sp may be a tensor too).
Tensor swizzled_offset(const Tensor& r, const Tensor& s, const Tensor& sp) {
  const Tensor tile = r.div(128, "floor").mul(sp.div(4, "floor")).add(s.div(4, "floor"));
  return tile.mul(512).add(r.remainder(32).mul(16)).add(r.remainder(128).div(32, "floor").mul(4)).add(s.remainder(4));
}

Tensor exclusive_cumsum(const Tensor& t) {
  return t.cumsum(0).sub(t);
}

} // namespace

std::pair<Tensor, Tensor> swizzle_mx_scale_index(int64_t rows, int64_t s, const Tensor& offs, int64_t dim) {
  const auto opt = offs.options().dtype(kLong);
  const int64_t groups = offs.size(0);
  if (groups == 0) {
    return {at::zeros({rows, s}, opt), at::zeros({rows, s}, opt.dtype(kBool))};
  }
  const Tensor zero = at::zeros({1}, opt);
  const Tensor o = offs.to(kLong);
  const Tensor r = at::arange(rows, opt).unsqueeze(1);  // (R, 1)
  const Tensor c = at::arange(s, opt).unsqueeze(0);     // (1, S)
  if (dim == 0) {
    const Tensor starts = at::cat({zero, o.narrow(0, 0, groups - 1)});
    const Tensor padded = o.sub(starts).add(127).div(128, "floor").mul(128);
    const Tensor g = grouped_mm_group_index(o, rows);  // (R,)
    const Tensor gi = g.clamp_max(groups - 1);
    const Tensor r_local = r.squeeze(1).sub(starts.index_select(0, gi)).unsqueeze(1);
    const int64_t sp = fp8_round_up(s, 4);
    const Tensor base = exclusive_cumsum(padded).index_select(0, gi).mul(sp).unsqueeze(1);
    const Tensor index = base.add(swizzled_offset(r_local, c, at::full({1}, sp, opt)));
    return {index, g.lt(groups).unsqueeze(1).expand({rows, s})};
  }
  const Tensor ends = o.add(31).div(32, "floor");  // in scale columns
  const Tensor starts = at::cat({zero, ends.narrow(0, 0, groups - 1)});
  const Tensor widths = ends.sub(starts).add(3).div(4, "floor").mul(4);
  const Tensor g = grouped_mm_group_index(ends, s);  // (S,): groups of scale columns
  const Tensor gi = g.clamp_max(groups - 1);
  const Tensor c_local = c.squeeze(0).sub(starts.index_select(0, gi)).unsqueeze(0);
  const Tensor base = exclusive_cumsum(widths).index_select(0, gi).mul(fp8_round_up(rows, 128)).unsqueeze(0);
  const Tensor index = base.add(swizzled_offset(r, c_local, widths.index_select(0, gi).unsqueeze(0)));
  return {index, g.lt(groups).unsqueeze(0).expand({rows, s})};
}

void swizzle_mx_scale_check_offsets(const char* op, const Tensor& offs, int64_t rows, int64_t s, int64_t dim) {
  const int64_t extent = dim == 0 ? rows : 32 * s;
  const char* name = dim == 0 ? "R" : "32 * S";
  if (!offs.is_cpu()) {
    if (offs.numel() == 0) return;
    const Tensor o = offs.to(kLong);
    Tensor ok = grouped_mm_offs_ok(o, extent);
    if (dim == 1) {
      ok = ok.logical_and(o.remainder(32).eq(0).logical_or(o.add(31).div(32, "floor").eq(s)).all());
    }
    at::_assert_async(ok, std::string(op) + ": offs must be non-decreasing in [0, " + name + "=" +
                              std::to_string(extent) + "]" + (dim == 1 ? ", on 32-element blocks" : ""));
    return;
  }
  const int32_t* data = offs.const_data_ptr<int32_t>();
  int64_t prev = 0;
  for (int64_t g = 0; g < offs.size(0); ++g) {
    const int64_t end = data[g * offs.stride(0)];
    TORCH_CHECK_VALUE(end >= prev && end <= extent,
        op, ": offs must be non-decreasing in [0, ", name, "=", extent, "], got offs[", g, "]=", end,
        g == 0 ? std::string() : " after offs[" + std::to_string(g - 1) + "]=" + std::to_string(prev));
    TORCH_CHECK_VALUE(dim == 0 || end % 32 == 0 || (end + 31) / 32 == s,
        op, ": with groups along K every group must hold whole 32-element blocks: offs[g] must be a multiple "
        "of 32 or end in the last block, got offs[", g, "]=", end);
    prev = end;
  }
}

Tensor swizzle_mx_scale(const Tensor& scale, const Tensor& offs, int64_t dim) {
  swizzle_mx_scale_check_inputs(scale, offs, dim);
  const int64_t rows = scale.size(0), s = scale.size(1), groups = offs.size(0);
  swizzle_mx_scale_check_offsets("swizzle_mx_scale", offs, rows, s, dim);
  const auto size = swizzle_mx_scale_size(rows, s, groups, dim);
  auto [index, held] = swizzle_mx_scale_index(rows, s, offs, dim);
  // Elements of no group go to one extra byte past the end, dropped below:
  // the scatter needs no data-dependent shape (no host sync on GPUs).
  const int64_t total = size[0] * size[1];
  index = at::where(held, index.clamp(0, total - 1), total);
  Tensor out = at::zeros({total + 1}, scale.options().dtype(kByte));
  out.index_put_({index.reshape(-1)}, scale.view(kByte).reshape(-1));
  return fp8_dense_output(out.narrow(0, 0, total).view(size).view(kFloat8_e8m0fnu));
}

Tensor unswizzle_mx_scale(const Tensor& blocked, int64_t rows, int64_t s, const Tensor& offs, int64_t dim) {
  auto [index, held] = swizzle_mx_scale_index(rows, s, offs, dim);
  index = index.masked_fill(held.logical_not(), 0);
  const Tensor flat = blocked.contiguous().view(kByte).reshape(-1);
  if (index.numel() == 0) {
    return at::empty({rows, s}, blocked.options());
  }
  const Tensor needed = index.max().add(1);
  if (blocked.is_cpu()) {
    TORCH_CHECK_VALUE(needed.item<int64_t>() <= flat.numel(),
        "scaled_grouped_mm: the blocked mx scale of sizes ", blocked.sizes(), " holds ", flat.numel(),
        " bytes, fewer than the groups of offs need (", needed.item<int64_t>(), ")");
  } else {
    at::_assert_async(needed.le(flat.numel()),
        "scaled_grouped_mm: the blocked mx scale holds fewer bytes than the groups of offs need");
  }
  // Clamped: offs are validated asynchronously on GPUs, and a bad value must
  // fail that check, not read out of bounds first.
  const Tensor picked = flat.index_select(0, index.clamp(0, std::max<int64_t>(flat.numel() - 1, 0)).reshape(-1));
  return at::where(held, picked.view({rows, s}), at::scalar_tensor(127, picked.options())).view(kFloat8_e8m0fnu);
}

} // namespace at::native
