// Clip-quantize forward and its STE / PWL / MAD backward on the CPU (SPEC §1, §3), and the
// weight forward that also tracks oscillations and freezes weights (Nagel et al. 2022;
// octav_kernels.reference.fake_quantize_tracked). All are single elementwise passes split
// across threads by element ranges; a range is walked in runs of contiguous elements that share
// one scale (row r = o * n_groups + c of the [outer, n_groups, inner] view uses scale[c]).
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

// r clamped to [lo, hi]; the comparisons keep NaN.
inline float clamp_level(float r, float lo, float hi) { return r < lo ? lo : (r > hi ? hi : r); }

// SPEC §1's integer level clamp(round(v / step), lo, hi) for step != 0: v / step in float32,
// nearbyint rounds half to even.
inline float grid_level(float v, float step, float lo, float hi) {
  return clamp_level(std::nearbyint(v / step), lo, hi);
}

// SPEC §1's q = level * step, 0 where step == 0 (an all-zero group, or s / L underflows).
inline float quantize(float v, float step, float lo, float hi) {
  return step == 0.0f ? 0.0f : grid_level(v, step, lo, hi) * step;
}

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
      const float step = s / fl;
      if (step == 0.0f) {  // all-zero group (or s / L underflows): q = 0, never NaN
        for (int64_t k = 0; k < n; ++k) yr[k] = scalar_t(0);
        return;
      }
      for (int64_t k = 0; k < n; ++k) {
        yr[k] = static_cast<scalar_t>(grid_level(static_cast<float>(xr[k]), step, flo, fhi) * step);
      }
    });
  });
  return y;
}

at::Tensor fake_quantize_tracked(const at::Tensor& x, const at::Tensor& scale, int64_t outer,
                                 int64_t n_groups, int64_t inner, int64_t L, int64_t lo,
                                 int64_t hi, at::Tensor& last_int, at::Tensor& last_dir,
                                 at::Tensor& frozen, at::Tensor& osc_freq, at::Tensor& int_ema,
                                 double momentum, const at::Tensor& freeze_threshold,
                                 bool update) {
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const float fl = static_cast<float>(L), flo = static_cast<float>(lo),
              fhi = static_cast<float>(hi);
  // float32 as the reference computes them; products and sums are rounded one by one (this
  // file is built without FMA contraction).
  const float m = static_cast<float>(momentum), keep = static_cast<float>(1.0 - momentum),
              threshold = freeze_threshold.item<float>();
  int8_t* level_p = last_int.data_ptr<int8_t>();
  int8_t* dir_p = last_dir.data_ptr<int8_t>();
  bool* frozen_p = frozen.data_ptr<bool>();
  float* freq_p = osc_freq.data_ptr<float>();
  float* ema_p = int_ema.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fq_tracked", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    for_each_run(outer, n_groups, inner, scale.data_ptr<float>(), [&](int64_t begin, int64_t n,
                                                                      float s) {
      const float step = s / fl;
      for (int64_t k = begin; k < begin + n; ++k) {
        // The integer level; 0 where step == 0 (an all-zero group).
        const float v =
            step == 0.0f ? 0.0f : grid_level(static_cast<float>(xp[k]), step, flo, fhi);
        if (update && !frozen_p[k] && v == v) {
          const int level = static_cast<int>(v), last = level_p[k];
          const int d = (level > last) - (level < last);
          const bool oscillated = d != 0 && dir_p[k] != 0 && d != dir_p[k];
          if (d != 0) dir_p[k] = static_cast<int8_t>(d);
          const float freq = keep * freq_p[k] + (oscillated ? m : 0.0f);
          const float ema = keep * ema_p[k] + m * static_cast<float>(level);
          freq_p[k] = freq;
          ema_p[k] = ema;
          int kept = level;
          if (threshold > 0.0f && freq > threshold) {  // freeze at the rounded EMA level
            kept = static_cast<int>(clamp_level(std::nearbyint(ema), flo, fhi));
            frozen_p[k] = true;
          }
          level_p[k] = static_cast<int8_t>(kept);
        }
        const float out = frozen_p[k] ? static_cast<float>(level_p[k]) : v;
        yp[k] = step == 0.0f ? scalar_t(0) : static_cast<scalar_t>(out * step);
      }
    });
  });
  return y;
}

at::Tensor dampening_error(const at::Tensor& w, const at::Tensor& scale, int64_t outer,
                           int64_t n_groups, int64_t inner, int64_t L, int64_t lo, int64_t hi,
                           const at::Tensor& frozen) {
  auto err = at::empty(w.sizes(), w.options().dtype(at::kFloat));
  const float fl = static_cast<float>(L), flo = static_cast<float>(lo),
              fhi = static_cast<float>(hi);
  const bool* frozen_p = frozen.numel() > 0 ? frozen.data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "dampening", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    float* ep = err.data_ptr<float>();
    for_each_run(outer, n_groups, inner, scale.data_ptr<float>(), [&](int64_t begin, int64_t n,
                                                                      float s) {
      const float step = s / fl, bottom = flo * step, top = fhi * step;
      for (int64_t k = begin; k < begin + n; ++k) {
        const float v = static_cast<float>(wp[k]);
        const float d = quantize(v, step, flo, fhi) - clamp_level(v, bottom, top);
        ep[k] = frozen_p != nullptr && frozen_p[k] ? 0.0f : d * d;
      }
    });
  });
  return err;
}

at::Tensor dampening_backward(const at::Tensor& grad, const at::Tensor& w,
                              const at::Tensor& scale, int64_t outer, int64_t n_groups,
                              int64_t inner, int64_t L, int64_t lo, int64_t hi,
                              const at::Tensor& frozen) {
  auto gw = at::empty_like(w, at::MemoryFormat::Contiguous);
  const float fl = static_cast<float>(L), flo = static_cast<float>(lo),
              fhi = static_cast<float>(hi);
  const bool* frozen_p = frozen.numel() > 0 ? frozen.data_ptr<bool>() : nullptr;
  const float* gp = grad.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "damp_bwd", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = gw.data_ptr<scalar_t>();
    for_each_run(outer, n_groups, inner, scale.data_ptr<float>(), [&](int64_t begin, int64_t n,
                                                                      float s) {
      const float step = s / fl, bottom = flo * step, top = fhi * step;
      for (int64_t k = begin; k < begin + n; ++k) {
        const float v = static_cast<float>(wp[k]);
        float out = 0.0f;
        if (v >= bottom && v <= top && !(frozen_p != nullptr && frozen_p[k])) {
          const float t = v - quantize(v, step, flo, fhi);  // clip(w) = w inside the range
          out = (t + t) * gp[k];
        }
        op[k] = static_cast<scalar_t>(out);
      }
    });
  });
  return gw;
}

at::Tensor fake_quantize_backward(const at::Tensor& grad, const at::Tensor& x,
                                  const at::Tensor& scale, int64_t outer, int64_t n_groups,
                                  int64_t inner, bool is_signed, int64_t mode,
                                  const at::Tensor& frozen) {
  auto gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  const bool* frozen_p = frozen.numel() > 0 ? frozen.data_ptr<bool>() : nullptr;
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
        if (frozen_p != nullptr && frozen_p[k]) out = C(0);
        op[k] = static_cast<scalar_t>(out);
      }
    });
  });
  return gx;
}

}  // namespace octav::cpu
