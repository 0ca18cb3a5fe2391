// CPU kernels of expert_mlp's SwiGLU rows (moe/ExpertSwiGLU.h): Vectorized<float>
// over each row, the gate and up halves widened into a row buffer once.
// sigmoid(x) = 1 / (1 + exp(-x)) as at::silu and at::silu_backward compute it.

#include <moe/ExpertSwiGLU.h>

// GCC 12 reports its own unmasked AVX-512 intrinsics (under Vectorized<float>'s
// partial loads) as reading an uninitialised value: a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <vector>

namespace at::native {
namespace {

using Vec = vec::Vectorized<float>;

// Rows per task: a few hundred KB of buffers and outputs, enough work to pay
// for the task.
constexpr int64_t kRowsPerTask = 64;

// The dtypes ExpertMLP.cpp sends here (a float32 accumulation); float64 runs
// its ATen composition.
#define SWIGLU_DISPATCH(TYPE, NAME, ...)                        \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                \
                     AT_DISPATCH_CASE(kFloat, __VA_ARGS__)      \
                     AT_DISPATCH_CASE(kBFloat16, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(kHalf, __VA_ARGS__))

// Row r of h widened to float32 as gate[0, I) and up[0, I); buf holds 2I.
template <typename scalar_t>
void load_gate_up(const scalar_t* row, int64_t inter, bool interleaved, float* buf, const float*& gate,
                  const float*& up) {
  if (!interleaved) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      gate = row;
      up = row + inter;
      return;
    } else {
      vec::convert(row, buf, 2 * inter);
    }
  } else {
    for (const auto j : c10::irange(inter)) {
      buf[j] = static_cast<float>(row[2 * j]);
      buf[inter + j] = static_cast<float>(row[2 * j + 1]);
    }
  }
  gate = buf;
  up = buf + inter;
}

inline Vec sigmoid(const Vec& x) {
  return Vec(1.f) / (Vec(1.f) + x.neg().exp());
}

template <typename scalar_t>
void store_row(const float* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::copy(src, src + n, dst);
  } else {
    vec::convert(src, dst, n);
  }
}

void swiglu_forward_kernel(const Tensor& h, bool interleaved, const Tensor& a) {
  TORCH_INTERNAL_ASSERT(h.is_contiguous());
  const int64_t rows = a.size(0), inter = a.size(1);
  SWIGLU_DISPATCH(h.scalar_type(), "expert_swiglu_forward", [&] {
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    scalar_t* ap = a.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(3 * inter);
      float* out = buf.data() + 2 * inter;
      for (const auto r : c10::irange(begin, end)) {
        const float *gate, *up;
        load_gate_up(hp + r * 2 * inter, inter, interleaved, buf.data(), gate, up);
        for (int64_t j = 0; j < inter; j += Vec::size()) {
          const int64_t n = std::min<int64_t>(Vec::size(), inter - j);
          const Vec x = Vec::loadu(gate + j, n);
          (x * sigmoid(x) * Vec::loadu(up + j, n)).store(out + j, n);
        }
        store_row(out, ap + r * inter, inter);
      }
    });
  });
}

void swiglu_backward_kernel(const Tensor& h, const Tensor& g, const std::optional<Tensor>& row_weight,
                            bool interleaved, const Tensor& dh, const Tensor& aw, const Tensor& d_row_weight) {
  TORCH_INTERNAL_ASSERT(h.is_contiguous() && g.is_contiguous() && g.scalar_type() == kFloat);
  const int64_t rows = g.size(0), inter = g.size(1);
  const float* gp = g.const_data_ptr<float>();
  const float* wp = row_weight.has_value() ? row_weight->const_data_ptr<float>() : nullptr;
  float* dwp = d_row_weight.defined() ? d_row_weight.data_ptr<float>() : nullptr;
  SWIGLU_DISPATCH(h.scalar_type(), "expert_swiglu_backward", [&] {
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    scalar_t* dhp = dh.data_ptr<scalar_t>();
    scalar_t* awp = aw.defined() ? aw.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      // Row buffers: h widened (2I), then d_gate, d_up (2I), a * w (I), the
      // interleaved gradient (2I).
      std::vector<float> buf(7 * inter);
      float* d_gate = buf.data() + 2 * inter;
      float* d_up = d_gate + inter;
      float* a_w = d_up + inter;
      float* mixed = a_w + inter;
      for (const auto r : c10::irange(begin, end)) {
        const float *gate, *up;
        load_gate_up(hp + r * 2 * inter, inter, interleaved, buf.data(), gate, up);
        const float* gr = gp + r * inter;
        const Vec w(wp != nullptr ? wp[r] : 1.f);
        Vec dot(0.f);
        for (int64_t j = 0; j < inter; j += Vec::size()) {
          // Lanes past the row load as zeros: their products are zero.
          const int64_t n = std::min<int64_t>(Vec::size(), inter - j);
          const Vec x = Vec::loadu(gate + j, n), u = Vec::loadu(up + j, n), gv = Vec::loadu(gr + j, n);
          const Vec s = sigmoid(x);
          const Vec silu = x * s;
          // act * w and the dot only where autograd asked for them (the
          // branches are the same for every row).
          if (dwp != nullptr || awp != nullptr) {
            const Vec act = silu * u;
            if (dwp != nullptr) dot = dot + gv * act;
            if (awp != nullptr) (act * w).store(a_w + j, n);
          }
          const Vec da = gv * w;
          (da * silu).store(d_up + j, n);
          (da * u * s * (Vec(1.f) + x * (Vec(1.f) - s))).store(d_gate + j, n);
        }
        if (dwp != nullptr) {
          float lanes[Vec::size()];
          dot.store(lanes);
          float sum = 0.f;
          for (const float v : lanes) sum += v;
          dwp[r] = sum;
        }
        if (awp != nullptr) store_row(a_w, awp + r * inter, inter);
        scalar_t* out = dhp + r * 2 * inter;
        if (interleaved) {
          for (const auto j : c10::irange(inter)) {
            mixed[2 * j] = d_gate[j];
            mixed[2 * j + 1] = d_up[j];
          }
          store_row(mixed, out, 2 * inter);
        } else {
          store_row(d_gate, out, 2 * inter);  // d_gate and d_up are adjacent
        }
      }
    });
  });
}

} // namespace

#undef SWIGLU_DISPATCH

// Every capability's build registers its copy (Vectorized<float> is 16 lanes
// in the AVX512 one).
ALSO_REGISTER_AVX512_DISPATCH(expert_swiglu_forward_stub, &swiglu_forward_kernel)
ALSO_REGISTER_AVX512_DISPATCH(expert_swiglu_backward_stub, &swiglu_backward_kernel)

} // namespace at::native

#pragma GCC diagnostic pop
