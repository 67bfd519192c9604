// Clip-quantize forward and its STE / PWL / MAD backward on the CPU (SPEC §1, §3).
// Both are single elementwise passes split across threads by element ranges; a range is walked
// in runs of contiguous elements that share one scale (row r = o * n_groups + c of the
// [outer, n_groups, inner] view uses scale[c]).
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace octav::cpu {
namespace {

constexpr int64_t kGrainElems = 1 << 15;

// Calls fn(begin, length, scale) over runs covering all outer * n_groups * inner elements.
template <typename F>
void for_each_run(int64_t outer, int64_t n_groups, int64_t inner, const float* scale,
                  const F& fn) {
  at::parallel_for(0, outer * n_groups * inner, kGrainElems, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e;) {
      const int64_t row = k / inner;
      const int64_t end = std::min(e, (row + 1) * inner);
      fn(k, end - k, scale[row % n_groups]);
      k = end;
    }
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
    for_each_run(outer, n_groups, inner, scale.data_ptr<float>(), [&](int64_t begin, int64_t n,
                                                                      float s) {
      const scalar_t* xr = xp + begin;
      scalar_t* yr = yp + begin;
      if (s == 0.0f) {  // all-zero group: q = 0, never NaN
        for (int64_t k = 0; k < n; ++k) yr[k] = scalar_t(0);
        return;
      }
      const float step = s / fl;
      for (int64_t k = 0; k < n; ++k) {
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
    for_each_run(outer, n_groups, inner, scale.data_ptr<float>(), [&](int64_t begin, int64_t n,
                                                                      float sf) {
      const C s = static_cast<C>(sf);
      for (int64_t k = begin; k < begin + n; ++k) {
        const C g = static_cast<C>(gp[k]);
        const C v = static_cast<C>(xp[k]);
        const C a = is_signed ? std::abs(v) : v;
        const bool inside = is_signed ? a <= s : (v >= C(0) && v <= s);
        const bool below = !is_signed && v < C(0);
        C out = g;
        if (mode == kPwl && !inside) out = C(0);
        if (mode == kMad && !inside) out = below ? C(0) : g * (s / a);
        op[k] = static_cast<scalar_t>(out);
      }
    });
  });
  return gx;
}

}  // namespace octav::cpu
