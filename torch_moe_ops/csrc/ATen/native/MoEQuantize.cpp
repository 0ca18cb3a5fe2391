// CPU entry points of quantize_fp8 and dequantize_fp8 (validate, allocate,
// run the kernels) and their device-generic fallbacks, written as ATen
// operations.
// The unswizzling of swizzled MX scales (ATen operations too).
//
// No device code here: torch's float -> float8 conversion is c10's, the same
// function on host and device, and every other step (an amax, a float32
// division, a multiply, a clamp) is exact or correctly rounded, so the
// fallback code gives the CPU kernel's bytes on any device. The price is a few
// passes over x and a float32 copy of it, where a fused kernel reads x twice.

#include <ATen/native/GroupedMM.h>
#include <ATen/native/MoEQuantize.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>

#include <limits>

namespace at::native {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// The format's largest finite value.
double fp8_max(ScalarType t) {
  return t == kFloat8_e5m2 ? 57344.0 : 448.0;
}

// The exponent of the largest power of two below fp8_max (OCP MX emax_elem).
int64_t fp8_emax(ScalarType t) {
  return t == kFloat8_e5m2 ? 15 : 8;
}

// Multiplier q and stored scale of blocks with float32 amax (any shape).
std::pair<Tensor, Tensor> fp8_block_scales(const Tensor& amax, Fp8Recipe recipe, ScalarType float8) {
  if (recipe == Fp8Recipe::kMX) {
    // floor(log2(amax)) from the float32 exponent field; 255 is inf or NaN.
    const Tensor field = amax.contiguous().view(kInt).bitwise_right_shift(23).bitwise_and(0xFF);
    const Tensor e = field.sub(127 + fp8_emax(float8)).clamp(-127, 127);
    const Tensor finite = field.ne(255);
    const Tensor byte = at::where(finite, e.add(127), at::scalar_tensor(255, e.options())).to(kByte);
    const Tensor pow2 = e.neg().add(127).bitwise_left_shift(23).view(kFloat);  // 2^-e, exact
    return {at::where(finite, pow2, kNaN), byte.view(kFloat8_e8m0fnu)};
  }
  // The comparison is in float32 (1e-12f), as the CPU kernel's; NaN passes.
  const Tensor a = at::where(amax.lt(1e-12), 1e-12, amax);
  const Tensor q = at::div(at::scalar_tensor(fp8_max(float8), amax.options()), a);
  return {q, q.reciprocal()};
}

// x * q -> clamp -> float8, one NaN byte whatever the sign (as the CPU kernel).
Tensor fp8_round(const Tensor& scaled, ScalarType float8) {
  const double fmax = fp8_max(float8);
  const Tensor y = scaled.clamp(-fmax, fmax);
  return at::where(y.isnan(), kNaN, y).to(float8);
}

// The blocked 32_4_4 layout of (B, R, S) scale grids (bytes).
Tensor fp8_swizzle(const Tensor& grid, bool two_d) {
  const int64_t nb = grid.size(0), rows = grid.size(1), s = grid.size(2);
  const int64_t rp = fp8_round_up(rows, 128), sp = fp8_round_up(s, 4);
  const Tensor padded = at::constant_pad_nd(grid, {0, sp - s, 0, rp - rows}, 0);
  // row 128 t + 32 i + j, column 4 u + c  ->  [t][u][j][i][c]
  const Tensor tiles = padded.view({nb, rp / 128, 4, 32, sp / 4, 4}).permute({0, 1, 4, 3, 2, 5}).contiguous();
  return fp8_dense_output(two_d ? tiles.view({rp, sp}) : tiles.view({nb, rp * sp}));
}

// e8m0 -> float32: 2^(b - 127); 0 is the denormal 2^-127, 0xFF is NaN.
Tensor e8m0_to_float(const Tensor& scale) {
  const Tensor b = scale.view(kByte).to(kInt);
  Tensor bits = at::where(b.eq(0), at::scalar_tensor(0x00400000, b.options()), b.bitwise_left_shift(23));
  bits = at::where(b.eq(255), at::scalar_tensor(0x7FC00000, b.options()), bits);
  return bits.view(kFloat);
}

// Block geometry of a (B, R, C) operand without offs: blocks of br x w
// elements, nrb x nseg of them, the operand zero-padded to cover them.
struct BlockGrid {
  int64_t nb, rows, cols, br, nrb, w, nseg;
  BlockGrid(const Tensor& t, Fp8Recipe recipe)
      : nb(t.dim() == 3 ? t.size(0) : 1), rows(t.size(-2)), cols(t.size(-1)) {
    const int64_t r = fp8_block_rows(recipe), c = fp8_block_cols(recipe);
    br = r == 0 ? std::max<int64_t>(rows, 1) : r;
    nrb = r == 0 ? 1 : fp8_ceil_div(rows, r);
    w = c == 0 ? std::max<int64_t>(cols, 1) : c;
    nseg = c == 0 ? 1 : fp8_ceil_div(cols, c);
  }
  // (B, nrb, br, nseg, w) view of the zero-padded float32 operand.
  Tensor blocks(const Tensor& t) const {
    const Tensor t3 = t.reshape({nb, rows, cols});
    return at::constant_pad_nd(t3, {0, nseg * w - cols, 0, nrb * br - rows}, 0).view({nb, nrb, br, nseg, w});
  }
  // The inverse of blocks(): (B, nrb, br, nseg, w) -> (B, R, C).
  Tensor unblock(const Tensor& b) const {
    return b.reshape({nb, nrb * br, nseg * w}).narrow(1, 0, rows).narrow(2, 0, cols);
  }
};

} // namespace

DEFINE_DISPATCH(quantize_fp8_stub);
DEFINE_DISPATCH(dequantize_fp8_stub);

std::tuple<Tensor, Tensor> quantize_fp8_cpu(
    const Tensor& x, c10::string_view recipe_name, std::optional<ScalarType> float8_dtype,
    const std::optional<Tensor>& offs, bool swizzle) {
  quantize_fp8_check_inputs(x, recipe_name, float8_dtype, offs, swizzle);
  const auto recipe = fp8_recipe("quantize_fp8", recipe_name);
  if (offs.has_value()) {
    fp8_check_offsets_cpu("quantize_fp8", *offs, x.size(-1), recipe);
  }
  Tensor data = at::empty(x.sizes(), x.options().dtype(float8_dtype.value_or(kFloat8_e4m3fn)));
  const auto scale_size = fp8_scale_size(x.sizes(), recipe, offs.has_value() ? offs->size(0) : -1, swizzle);
  Tensor scale = at::empty(scale_size, x.options().dtype(fp8_scale_dtype(recipe)));
  // The kernel reads rows; a transposed operand (B^T of a weight) is copied
  // once here, which costs less than the strided reads would.
  quantize_fp8_stub(kCPU, x.contiguous(), recipe, offs, swizzle, data, scale);
  return {data, scale};
}

Tensor dequantize_fp8_cpu(
    const Tensor& data, const Tensor& scale, c10::string_view recipe_name, std::optional<ScalarType> out_dtype,
    const std::optional<Tensor>& offs, bool swizzle) {
  dequantize_fp8_check_inputs(data, scale, recipe_name, out_dtype, offs, swizzle);
  const auto recipe = fp8_recipe("dequantize_fp8", recipe_name);
  if (offs.has_value()) {
    fp8_check_offsets_cpu("dequantize_fp8", *offs, data.size(-1), recipe);
  }
  Tensor out = at::empty(data.sizes(), data.options().dtype(dequantize_fp8_out_dtype(out_dtype)));
  dequantize_fp8_stub(kCPU, data.contiguous(), scale.contiguous(), recipe, offs, swizzle, out);
  return out;
}

Tensor fp8_unswizzle_scale(const Tensor& scale, int64_t nb, int64_t rows, int64_t s) {
  const int64_t rp = fp8_round_up(rows, 128), sp = fp8_round_up(s, 4);
  // [t][u][j][i][c] -> row 128 t + 32 i + j, column 4 u + c (fp8_swizzled_offset)
  return scale.reshape({nb, rp / 128, sp / 4, 32, 4, 4}).permute({0, 1, 4, 3, 2, 5}).reshape({nb, rp, sp})
      .narrow(1, 0, rows).narrow(2, 0, s);
}

std::tuple<Tensor, Tensor> quantize_fp8_fallback(
    const Tensor& x, Fp8Recipe recipe, ScalarType float8, const std::optional<Tensor>& offs, bool swizzle) {
  const Tensor xf = x.to(kFloat);

  if (offs.has_value() && recipe != Fp8Recipe::kMX) {  // tensorwise/rowwise per group of columns
    const int64_t rows = x.size(0), cols = x.size(1), groups = offs->size(0);
    const Tensor gid = grouped_mm_group_index(*offs, cols).unsqueeze(0).expand({rows, cols});
    const Tensor ax = xf.abs();
    const Tensor nan = ax.isnan();
    // amax per (row, group); column `groups` collects the columns of no group.
    Tensor amax = at::zeros({rows, groups + 1}, xf.options())
                      .scatter_reduce_(1, gid, at::where(nan, 0.0, ax), "amax", /*include_self=*/true);
    const Tensor has_nan = at::zeros({rows, groups + 1}, xf.options()).scatter_add_(1, gid, nan.to(kFloat)).gt(0);
    amax = at::where(has_nan, kNaN, amax).narrow(1, 0, groups);
    if (recipe == Fp8Recipe::kTensorwise) {
      amax = rows == 0 ? at::zeros({1, groups}, xf.options()) : amax.amax(0, /*keepdim=*/true);
    }
    auto [q, scale] = fp8_block_scales(amax, recipe, float8);
    // q of every element; the columns of no group get 0, then +0 below.
    const Tensor q_el = at::constant_pad_nd(q, {0, 1}, 0).expand({rows, groups + 1}).gather(1, gid);
    const Tensor data = fp8_round(at::where(gid.eq(groups), 0.0, xf.mul(q_el)), float8);
    return {fp8_dense_output(data), fp8_dense_output(recipe == Fp8Recipe::kTensorwise ? scale.view({groups}) : scale.t())};
  }

  const BlockGrid g(x, recipe);
  const Tensor blocks = g.blocks(xf);
  const Tensor amax = blocks.abs().amax({2, 4});  // (B, nrb, nseg); amax propagates NaN
  auto [q, scale] = fp8_block_scales(amax, recipe, float8);
  const Tensor data =
      fp8_dense_output(g.unblock(fp8_round(blocks.mul(q.view({g.nb, g.nrb, 1, g.nseg, 1})), float8)).reshape(x.sizes()));
  if (swizzle) {
    return {data, fp8_swizzle(scale.view(kByte), x.dim() == 2).view(kFloat8_e8m0fnu)};
  }
  return {data, fp8_dense_output(scale.reshape(fp8_scale_size(x.sizes(), recipe, -1, false)))};
}

Tensor dequantize_fp8_fallback(
    const Tensor& data, const Tensor& scale, Fp8Recipe recipe, ScalarType out_dtype, const std::optional<Tensor>& offs,
    bool swizzle) {
  const Tensor df = data.to(kFloat);  // exact

  if (offs.has_value() && recipe != Fp8Recipe::kMX) {
    const int64_t rows = data.size(0), cols = data.size(1), groups = offs->size(0);
    const Tensor gid = grouped_mm_group_index(*offs, cols).unsqueeze(0).expand({rows, cols});
    const Tensor grid = recipe == Fp8Recipe::kTensorwise ? scale.view({1, groups}).expand({rows, groups})
                                                         : scale.t();  // (R, G)
    const Tensor s_el = at::constant_pad_nd(grid, {0, 1}, 0).gather(1, gid);
    return fp8_dense_output(at::where(gid.eq(groups), 0.0, df.mul(s_el)).to(out_dtype));
  }

  const BlockGrid g(data, recipe);
  Tensor grid;
  if (recipe == Fp8Recipe::kMX) {
    grid = e8m0_to_float(swizzle ? fp8_unswizzle_scale(scale, g.nb, g.rows, g.nseg) : scale);
  } else {
    grid = scale;
  }
  grid = grid.reshape({g.nb, g.nrb, 1, g.nseg, 1});
  return fp8_dense_output(g.unblock(g.blocks(df).mul(grid)).to(out_dtype).reshape(data.sizes()));
}

} // namespace at::native
