// Clip-quantize forward (optionally with the bit-packed PWL mask) and its STE / PWL / MAD
// backward on the CPU (SPEC §1, §3), the weight forward that also tracks oscillations and
// freezes weights (Nagel et al. 2022; octav_kernels.reference.fake_quantize_tracked), and the
// oscillation-dampening term. All are single elementwise passes split across threads by element
// ranges (whole 32-element words of the mask); a range is walked in runs of contiguous elements
// that share one scale (row r = o * n_groups + c of the [outer, n_groups, inner] view uses
// scale[c]). The element math is csrc/grid.h's (shared with CUDA).
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../grid.h"

namespace octav::cpu {
namespace {

constexpr int64_t kGrainWords = 1 << 10;  // 32768 elements

// Calls fn(begin, length, scale) over runs covering all elements of g's view; a thread takes
// whole 32-element words (so a mask word is written by one thread).
template <typename F>
void for_each_run(const Groups& g, const float* scale, const F& fn) {
  const int64_t numel = g.outer * g.n_groups * g.inner, inner = g.inner;
  at::parallel_for(0, (numel + 31) / 32, kGrainWords, [&](int64_t wb, int64_t we) {
    const int64_t e = std::min(numel, we * 32);
    for (int64_t k = wb * 32; k < e;) {
      const int64_t row = k / inner;
      const int64_t end = std::min(e, (row + 1) * inner);
      fn(k, end - k, scale[row % g.n_groups]);
      k = end;
    }
  });
}

}  // namespace

at::Tensor Kernels::fake_quantize(const at::Tensor& x, const at::Tensor& scale, const Groups& g,
                                  const Levels& lv, bool is_signed, at::Tensor* mask) {
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  uint32_t* mp = nullptr;
  if (mask != nullptr) {
    *mask = at::zeros({(x.numel() + 31) / 32}, x.options().dtype(at::kInt));
    mp = reinterpret_cast<uint32_t*>(mask->data_ptr<int32_t>());
  }
  const float fl = static_cast<float>(lv.L), flo = static_cast<float>(lv.lo),
              fhi = static_cast<float>(lv.hi);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quantize", [&] {
    using C = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    for_each_run(g, scale.data_ptr<float>(), [&](int64_t begin, int64_t n, float s) {
      const scalar_t* xr = xp + begin;
      scalar_t* yr = yp + begin;
      const float step = s / fl;
      if (step == 0.0f) {  // all-zero group (or s / L underflows): q = 0, never NaN
        for (int64_t k = 0; k < n; ++k) yr[k] = scalar_t(0);
      } else {
        for (int64_t k = 0; k < n; ++k) {
          yr[k] = static_cast<scalar_t>(grid_level(static_cast<float>(xr[k]), step, flo, fhi) *
                                        step);
        }
      }
      if (mp != nullptr) {
        const C sc = static_cast<C>(s);
        for (int64_t k = begin; k < begin + n; ++k) {
          mp[k >> 5] |= static_cast<uint32_t>(inside(static_cast<C>(xp[k]), sc, is_signed))
                        << (k & 31);
        }
      }
    });
  });
  return y;
}

at::Tensor Kernels::fake_quantize_tracked(const at::Tensor& x, const at::Tensor& scale,
                                          const Groups& g, const Levels& lv,
                                          at::Tensor& last_int, at::Tensor& last_dir,
                                          at::Tensor& frozen, at::Tensor& osc_freq,
                                          at::Tensor& int_ema, double momentum,
                                          const at::Tensor& freeze_threshold, bool update) {
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const float fl = static_cast<float>(lv.L), flo = static_cast<float>(lv.lo),
              fhi = static_cast<float>(lv.hi);
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
    for_each_run(g, scale.data_ptr<float>(), [&](int64_t begin, int64_t n, float s) {
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
            kept = static_cast<int>(clamp_level(round_half_even(ema), flo, fhi));
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

namespace {

// The dampening term (Backward false: err float32) or its gradient (grad_w in w's dtype).
template <bool Backward>
at::Tensor dampening_kernel(const at::Tensor& w, const at::Tensor& grad, const at::Tensor& scale,
                            const Groups& g, const Levels& lv, const at::Tensor& frozen) {
  auto out = Backward ? at::empty_like(w, at::MemoryFormat::Contiguous)
                      : at::empty(w.sizes(), w.options().dtype(at::kFloat));
  const float fl = static_cast<float>(lv.L), flo = static_cast<float>(lv.lo),
              fhi = static_cast<float>(lv.hi);
  const bool* frozen_p = frozen.numel() > 0 ? frozen.data_ptr<bool>() : nullptr;
  const float* gp = Backward ? grad.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "dampening", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* gw = Backward ? out.data_ptr<scalar_t>() : nullptr;
    float* err = Backward ? nullptr : out.data_ptr<float>();
    for_each_run(g, scale.data_ptr<float>(), [&](int64_t begin, int64_t n, float s) {
      const float step = s / fl, bottom = flo * step, top = fhi * step;
      for (int64_t k = begin; k < begin + n; ++k) {
        const float v = static_cast<float>(wp[k]);
        const bool off = frozen_p != nullptr && frozen_p[k];
        if constexpr (Backward) {
          float r = 0.0f;
          if (v >= bottom && v <= top && !off) {
            const float t = v - quantize(v, step, flo, fhi);  // clip(w) = w inside the range
            r = (t + t) * gp[k];
          }
          gw[k] = static_cast<scalar_t>(r);
        } else {
          const float d = quantize(v, step, flo, fhi) - clamp_level(v, bottom, top);
          err[k] = off ? 0.0f : d * d;
        }
      }
    });
  });
  return out;
}

}  // namespace

at::Tensor Kernels::dampening_error(const at::Tensor& w, const at::Tensor& scale, const Groups& g,
                                    const Levels& lv, const at::Tensor& frozen) {
  return dampening_kernel<false>(w, at::Tensor(), scale, g, lv, frozen);
}

at::Tensor Kernels::dampening_backward(const at::Tensor& grad, const at::Tensor& w,
                                       const at::Tensor& scale, const Groups& g,
                                       const Levels& lv, const at::Tensor& frozen) {
  return dampening_kernel<true>(w, grad, scale, g, lv, frozen);
}

at::Tensor Kernels::fake_quantize_backward(const at::Tensor& grad, const at::Tensor& x,
                                           const at::Tensor& scale, const Groups& g,
                                           bool is_signed, Grad mode, const at::Tensor& frozen) {
  auto gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  const bool* frozen_p = frozen.numel() > 0 ? frozen.data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fq_backward", [&] {
    using C = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = gx.data_ptr<scalar_t>();
    for_each_run(g, scale.data_ptr<float>(), [&](int64_t begin, int64_t n, float sf) {
      const C s = static_cast<C>(sf);
      for (int64_t k = begin; k < begin + n; ++k) {
        const bool off = frozen_p != nullptr && frozen_p[k];
        op[k] = static_cast<scalar_t>(
            off ? C(0)
                : estimator_grad(static_cast<C>(gp[k]), static_cast<C>(xp[k]), s, is_signed,
                                 mode));
      }
    });
  });
  return gx;
}

at::Tensor Kernels::pwl_backward_packed(const at::Tensor& g, const at::Tensor& m) {
  auto gx = at::empty(g.sizes(), g.options());
  const uint32_t* mp = reinterpret_cast<const uint32_t*>(m.data_ptr<int32_t>());
  const int64_t numel = g.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "pwl_packed", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* op = gx.data_ptr<scalar_t>();
    at::parallel_for(0, numel, kGrainWords * 32, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        op[k] = (mp[k >> 5] >> (k & 31)) & 1u ? gp[k] : scalar_t(0);
      }
    });
  });
  return gx;
}

}  // namespace octav::cpu
