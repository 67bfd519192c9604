// Clip-quantize forward and its STE / PWL / MAD backward on the CPU (SPEC §1, §3).
// Both are single elementwise passes over rows of `inner` contiguous elements that share one
// scale (row r = o * n_groups + c uses scale[c]).
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace octav::cpu {
namespace {

constexpr int64_t kGrainElems = 1 << 15;

// Calls fn(row, scale) over all rows, in parallel with about kGrainElems elements per task.
template <typename F>
void for_each_row(int64_t outer, int64_t n_groups, int64_t inner, const float* scale,
                  const F& fn) {
  const int64_t rows = outer * n_groups;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(inner, 1));
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) fn(r, scale[r % n_groups]);
  });
}

enum Mode : int64_t { kSte = 0, kPwl = 1, kMad = 2 };

}  // namespace

at::Tensor fake_quantize(const at::Tensor& x, const at::Tensor& scale, int64_t outer,
                         int64_t n_groups, int64_t inner, int64_t L, int64_t lo, int64_t hi) {
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const float fl = static_cast<float>(L), flo = static_cast<float>(lo),
              fhi = static_cast<float>(hi);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quantize", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    for_each_row(outer, n_groups, inner, scale.data_ptr<float>(), [&](int64_t r, float s) {
      const scalar_t* xr = xp + r * inner;
      scalar_t* yr = yp + r * inner;
      if (s == 0.0f) {  // all-zero group: q = 0, never NaN
        for (int64_t k = 0; k < inner; ++k) yr[k] = scalar_t(0);
        return;
      }
      const float step = s / fl;
      for (int64_t k = 0; k < inner; ++k) {
        // x / step in float32 (SPEC §1); nearbyint rounds half to even. The comparisons keep NaN.
        float v = std::nearbyint(static_cast<float>(xr[k]) / step);
        v = v < flo ? flo : (v > fhi ? fhi : v);
        yr[k] = static_cast<scalar_t>(v * step);
      }
    });
  });
  return y;
}

at::Tensor fake_quantize_backward(const at::Tensor& grad, const at::Tensor& x,
                                  const at::Tensor& scale, int64_t outer, int64_t n_groups,
                                  int64_t inner, bool is_signed, int64_t mode) {
  auto gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fq_backward", [&] {
    using C = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = gx.data_ptr<scalar_t>();
    for_each_row(outer, n_groups, inner, scale.data_ptr<float>(), [&](int64_t r, float sf) {
      const C s = static_cast<C>(sf);
      const int64_t base = r * inner;
      for (int64_t k = 0; k < inner; ++k) {
        const C g = static_cast<C>(gp[base + k]);
        const C v = static_cast<C>(xp[base + k]);
        const C a = is_signed ? std::abs(v) : v;
        const bool inside = is_signed ? a <= s : (v >= C(0) && v <= s);
        const bool below = !is_signed && v < C(0);
        C out = g;
        if (mode == kPwl && !inside) out = C(0);
        if (mode == kMad && !inside) out = below ? C(0) : g * (s / a);
        op[base + k] = static_cast<scalar_t>(out);
      }
    });
  });
  return gx;
}

}  // namespace octav::cpu
