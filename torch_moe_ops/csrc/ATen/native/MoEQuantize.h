#pragma once

// Shared validation and output sizes for the fp8 quantisation ops
// (_quantize_fp8, _dequantize_fp8), used by every backend. Their Python meta
// functions restate these checks one for one, with the same messages; keep
// the two in step.
//
// x is (R, C) or (B, R, C); blocks run along the last dimension C (the
// contraction dimension K of a GEMM operand: pass B^T to scale a weight per
// output column). The recipes, with the scale shape each returns:
//
//   recipe              block      scale (x 2-D)        scale (x 3-D)          scale dtype
//   tensorwise          R x C      ()                   (B,)                   float32
//   rowwise             1 x C      (R,)                 (B, R)                 float32
//   blockwise_1x128     1 x 128    (R, ceil(C/128))     (B, R, ceil(C/128))    float32
//   blockwise_128x128   128 x 128  (ceil(R/128), ceil(C/128)) (B, ...)         float32
//   mx                  1 x 32     (R, ceil(C/32))      (B, R, ceil(C/32))     float8_e8m0fnu
//
// A partial last block (C not a multiple of the block) is scaled by its own
// elements. scale is the dequantisation scale: x ~= float(data) * scale, the
// operand scale _scaled_grouped_mm takes.
//
// Float recipes (torchao's float8 recipes): amax = max |x| over the block in
// float32, clamped below to 1e-12 so that an all-zero block gets a finite
// scale; q = fp8_max / amax (float32 division); data = fp8(clamp(x * q,
// -fp8_max, fp8_max)) rounded to nearest even, i.e. saturating; scale = 1 / q.
// MX (OCP MX v1.0 with torchao's default "floor" rounding of the scale):
// scale = 2^(floor(log2(amax)) - emax), emax = 8 for e4m3fn, 15 for e5m2,
// floor(log2) read from amax's float32 exponent field (so a denormal or zero
// amax gives the smallest scale, 2^-127) and the exponent clamped to
// [-127, 127]; data = fp8(clamp(x * 2^-e, ...)) as above, the multiply exact.
// Non-finite inputs: a block holding NaN or +-inf gets a NaN scale (MX: the
// e8m0 NaN, 0xFF; float: inf amax gives q = 0 and scale = inf), and the block
// dequantises to NaN: no silent clamping of an overflowed activation.
//
// Per-group operands (offs, 2-D x only): offs holds int32 cumulative group
// ends along C, the contraction dimension of the 2D x 2D (weight-gradient)
// grouped GEMM, so that no block straddles two groups:
//   tensorwise: one scale per group, scale (G,); rowwise: one per row and
//   group, scale (G, R) (flattened, the (G * R,) operand scale of the 2D x 2D
//   layout); mx: the blocks are unchanged, and offs must split C on multiples
//   of 32. Elements past offs[-1] belong to no group and quantise to zero
//   (tensorwise, rowwise). The 1x128 and 128x128 recipes take no offs (their
//   per-group block counts would depend on the values of offs).
// Rows (the tokens of a 2D x 3D forward operand) need no offs: no recipe's
// block spans two rows except 128x128, which is meant for weights.
//
// swizzle (mx only, no offs): the scale in the blocked layout upstream's CUDA
// MX kernels read (cuBLAS "32_4_4"): the (R, S) scale grid, padded with zero
// bytes to (round_up(R, 128), round_up(S, 4)), cut into 128 x 4 tiles stored
// one after the other (row tiles outer), element (32 i + j, c) of a tile at
// byte 16 j + 4 i + c. Shape (round_up(R, 128), round_up(S, 4)) for 2-D x,
// (B, round_up(R, 128) * round_up(S, 4)) for 3-D x, as upstream checks them.

#include <ATen/core/Tensor.h>
#include <ATen/native/DispatchStub.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>
#include <vector>

namespace at::native {

enum class Fp8Recipe { kTensorwise, kRowwise, kBlock1x128, kBlock128x128, kMX };

inline Fp8Recipe fp8_recipe(const char* op, std::string_view recipe) {
  if (recipe == "tensorwise") return Fp8Recipe::kTensorwise;
  if (recipe == "rowwise") return Fp8Recipe::kRowwise;
  if (recipe == "blockwise_1x128") return Fp8Recipe::kBlock1x128;
  if (recipe == "blockwise_128x128") return Fp8Recipe::kBlock128x128;
  TORCH_CHECK_VALUE(recipe == "mx", op,
      ": recipe must be 'tensorwise', 'rowwise', 'blockwise_1x128', 'blockwise_128x128' or 'mx', got '", recipe,
      "'");
  return Fp8Recipe::kMX;
}

// Block extent along C; 0 means the whole row (or group).
inline int64_t fp8_block_cols(Fp8Recipe r) {
  switch (r) {
    case Fp8Recipe::kBlock1x128: return 128;
    case Fp8Recipe::kBlock128x128: return 128;
    case Fp8Recipe::kMX: return 32;
    default: return 0;
  }
}

// Block extent along R; 0 means every row of the matrix.
inline int64_t fp8_block_rows(Fp8Recipe r) {
  switch (r) {
    case Fp8Recipe::kTensorwise: return 0;
    case Fp8Recipe::kBlock128x128: return 128;
    default: return 1;
  }
}

inline ScalarType fp8_scale_dtype(Fp8Recipe r) {
  return r == Fp8Recipe::kMX ? kFloat8_e8m0fnu : kFloat;
}

inline bool fp8_data_dtype(ScalarType t) {
  return t == kFloat8_e4m3fn || t == kFloat8_e5m2;
}

inline bool fp8_float_dtype(ScalarType t) {
  return t == kFloat || t == kBFloat16 || t == kHalf;
}

inline int64_t fp8_ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline int64_t fp8_round_up(int64_t a, int64_t b) {
  return fp8_ceil_div(a, b) * b;
}

// Byte offset of scale-grid element (r, s) in the swizzled (blocked 32_4_4)
// layout of an (R, S) grid whose padded width is sp = round_up(S, 4).
// fp8_unswizzle_scale (MoEQuantize.cpp) is its inverse on whole tensors.
inline int64_t fp8_swizzled_offset(int64_t r, int64_t s, int64_t sp) {
  const int64_t tile = (r / 128) * (sp / 4) + s / 4;
  return tile * 512 + (r % 32) * 16 + ((r % 128) / 32) * 4 + s % 4;
}

// Scale shape for data of sizes (R, C) or (B, R, C); groups = offs.size(0) or
// -1 without offs.
inline std::vector<int64_t> fp8_scale_size(IntArrayRef sizes, Fp8Recipe recipe, int64_t groups, bool swizzle) {
  const int64_t rows = sizes[sizes.size() - 2];
  const int64_t cols = sizes[sizes.size() - 1];
  std::vector<int64_t> out(sizes.begin(), sizes.end() - 2);
  if (groups >= 0) {
    switch (recipe) {
      case Fp8Recipe::kTensorwise: return {groups};
      case Fp8Recipe::kRowwise: return {groups, rows};
      default: break;  // mx: as without offs
    }
  }
  switch (recipe) {
    case Fp8Recipe::kTensorwise: break;
    case Fp8Recipe::kRowwise: out.push_back(rows); break;
    case Fp8Recipe::kBlock1x128:
    case Fp8Recipe::kMX: {
      const int64_t s = fp8_ceil_div(cols, fp8_block_cols(recipe));
      if (swizzle) {
        const int64_t rp = fp8_round_up(rows, 128), sp = fp8_round_up(s, 4);
        if (sizes.size() == 2) {
          out.push_back(rp);
          out.push_back(sp);
        } else {
          out.push_back(rp * sp);
        }
      } else {
        out.push_back(rows);
        out.push_back(s);
      }
      break;
    }
    case Fp8Recipe::kBlock128x128:
      out.push_back(fp8_ceil_div(rows, 128));
      out.push_back(fp8_ceil_div(cols, 128));
      break;
  }
  return out;
}

// The plain (B, R, S) grids of swizzled MX scales, (B, round_up(R, 128) *
// round_up(S, 4)) or, for one 2-D grid, (round_up(R, 128), round_up(S, 4)):
// a view where it can be (ATen operations, any device).
Tensor fp8_unswizzle_scale(const Tensor& scale, int64_t nb, int64_t rows, int64_t s);

// Checks shared by quantize_fp8 and dequantize_fp8 on the layout arguments.
inline void fp8_check_layout(
    const char* op, const char* arg, const Tensor& t, Fp8Recipe recipe, std::string_view recipe_name,
    const std::optional<Tensor>& offs, bool swizzle) {
  TORCH_CHECK_VALUE(t.dim() == 2 || t.dim() == 3,
      op, ": ", arg, " must be 2-D or 3-D, got ", t.dim(), "-D with sizes ", t.sizes());
  TORCH_CHECK_VALUE(!swizzle || recipe == Fp8Recipe::kMX,
      op, ": swizzle=True needs recipe 'mx', got '", recipe_name, "'");
  if (offs.has_value()) {
    TORCH_CHECK_VALUE(t.dim() == 2,
        op, ": offs needs a 2-D ", arg, ", got ", arg, " of sizes ", t.sizes());
    TORCH_CHECK_VALUE(recipe == Fp8Recipe::kTensorwise || recipe == Fp8Recipe::kRowwise || recipe == Fp8Recipe::kMX,
        op, ": offs is supported with recipes 'tensorwise', 'rowwise' and 'mx', got '", recipe_name, "'");
    TORCH_CHECK_VALUE(!swizzle, op, ": swizzle=True does not take offs");
    TORCH_CHECK_VALUE(offs->dim() == 1, op, ": offs must be 1-D, got ", offs->dim(), "-D with sizes ", offs->sizes());
    TORCH_CHECK_VALUE(offs->scalar_type() == kInt, op, ": offs must be int32, got ", offs->scalar_type());
    TORCH_CHECK_VALUE(offs->device() == t.device(),
        op, ": offs must be on the device of ", arg, " (", t.device(), "), got ", offs->device());
  }
}

inline void quantize_fp8_check_inputs(
    const Tensor& x, std::string_view recipe_name, std::optional<ScalarType> float8_dtype,
    const std::optional<Tensor>& offs, bool swizzle) {
  const auto recipe = fp8_recipe("quantize_fp8", recipe_name);
  TORCH_CHECK_VALUE(fp8_float_dtype(x.scalar_type()),
      "quantize_fp8: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  if (float8_dtype.has_value()) {
    TORCH_CHECK_VALUE(fp8_data_dtype(*float8_dtype),
        "quantize_fp8: float8_dtype must be Float8_e4m3fn or Float8_e5m2, got ", *float8_dtype);
  }
  fp8_check_layout("quantize_fp8", "x", x, recipe, recipe_name, offs, swizzle);
}

inline ScalarType dequantize_fp8_out_dtype(std::optional<ScalarType> out_dtype) {
  return out_dtype.value_or(kFloat);
}

inline void dequantize_fp8_check_inputs(
    const Tensor& data, const Tensor& scale, std::string_view recipe_name, std::optional<ScalarType> out_dtype,
    const std::optional<Tensor>& offs, bool swizzle) {
  const auto recipe = fp8_recipe("dequantize_fp8", recipe_name);
  TORCH_CHECK_VALUE(fp8_data_dtype(data.scalar_type()),
      "dequantize_fp8: data must be Float8_e4m3fn or Float8_e5m2, got ", data.scalar_type());
  fp8_check_layout("dequantize_fp8", "data", data, recipe, recipe_name, offs, swizzle);
  const auto want_dtype = fp8_scale_dtype(recipe);
  TORCH_CHECK_VALUE(scale.scalar_type() == want_dtype,
      "dequantize_fp8: scale must be ", want_dtype, " for recipe '", recipe_name, "', got ", scale.scalar_type());
  const auto want = fp8_scale_size(data.sizes(), recipe, offs.has_value() ? offs->size(0) : -1, swizzle);
  TORCH_CHECK_VALUE(scale.sizes() == IntArrayRef(want),
      "dequantize_fp8: scale must have shape ", IntArrayRef(want), " for data of sizes ", data.sizes(),
      " and recipe '", recipe_name, "'", swizzle ? " (swizzled)" : "", ", got ", scale.sizes());
  TORCH_CHECK_VALUE(scale.device() == data.device(),
      "dequantize_fp8: scale must be on the device of data (", data.device(), "), got ", scale.device());
  TORCH_CHECK_VALUE(fp8_float_dtype(dequantize_fp8_out_dtype(out_dtype)),
      "dequantize_fp8: out_dtype must be float32, bfloat16 or float16, got ", dequantize_fp8_out_dtype(out_dtype));
}

// t with the strides of a fresh contiguous tensor, as the fake kernels promise
// (contiguous() keeps whatever strides an empty tensor has; ops composed of
// other ops return through this).
inline Tensor fp8_dense_output(const Tensor& t) {
  return t.numel() > 0 && t.is_contiguous() ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Values of a CPU offs: non-decreasing, within C, and (mx) on block bounds.
inline void fp8_check_offsets_cpu(const char* op, const Tensor& offs, int64_t cols, Fp8Recipe recipe) {
  const int64_t groups = offs.size(0);
  const int32_t* data = offs.const_data_ptr<int32_t>();
  const int64_t stride = offs.stride(0);
  int64_t prev = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t end = data[g * stride];
    TORCH_CHECK_VALUE(end >= prev && end <= cols,
        op, ": offs must be non-decreasing in [0, C=", cols, "], got offs[", g, "]=", end,
        g == 0 ? std::string() : " after offs[" + std::to_string(g - 1) + "]=" + std::to_string(prev));
    TORCH_CHECK_VALUE(recipe != Fp8Recipe::kMX || end % 32 == 0 || end == cols,
        op, ": with recipe 'mx' every group must hold whole 32-element blocks: offs[g] must be a multiple of 32 "
        "or C=", cols, ", got offs[", g, "]=", end);
    prev = end;
  }
}

// The device-generic quantisation and dequantisation (native/MoEQuantize.cpp):
// ATen operations that give the same bytes on every device, for inputs the
// checks above accepted. Each caller checks the values of offs its own way.
std::tuple<Tensor, Tensor> quantize_fp8_fallback(
    const Tensor& x, Fp8Recipe recipe, ScalarType float8, const std::optional<Tensor>& offs, bool swizzle);

Tensor dequantize_fp8_fallback(
    const Tensor& data, const Tensor& scale, Fp8Recipe recipe, ScalarType out_dtype,
    const std::optional<Tensor>& offs, bool swizzle);

// CPU kernels (native/cpu/MoEQuantizeKernel.cpp). x, data and out are
// contiguous; scale is contiguous and fully written (swizzle padding too).
using quantize_fp8_fn = void (*)(
    const Tensor& x, Fp8Recipe recipe, const std::optional<Tensor>& offs, bool swizzle, const Tensor& data,
    const Tensor& scale);
using dequantize_fp8_fn = void (*)(
    const Tensor& data, const Tensor& scale, Fp8Recipe recipe, const std::optional<Tensor>& offs, bool swizzle,
    const Tensor& out);
DECLARE_DISPATCH(quantize_fp8_fn, quantize_fp8_stub);
DECLARE_DISPATCH(dequantize_fp8_fn, dequantize_fp8_stub);

std::tuple<Tensor, Tensor> quantize_fp8_cpu(
    const Tensor& x, c10::string_view recipe, std::optional<ScalarType> float8_dtype,
    const std::optional<Tensor>& offs, bool swizzle);

Tensor dequantize_fp8_cpu(
    const Tensor& data, const Tensor& scale, c10::string_view recipe, std::optional<ScalarType> out_dtype,
    const std::optional<Tensor>& offs, bool swizzle);

// CUDA entry points (native/cuda/MoEQuantize.cpp): the fallbacks, offs checked
// on the device.
std::tuple<Tensor, Tensor> quantize_fp8_cuda(
    const Tensor& x, c10::string_view recipe, std::optional<ScalarType> float8_dtype,
    const std::optional<Tensor>& offs, bool swizzle);

Tensor dequantize_fp8_cuda(
    const Tensor& data, const Tensor& scale, c10::string_view recipe, std::optional<ScalarType> out_dtype,
    const std::optional<Tensor>& offs, bool swizzle);

} // namespace at::native
