// The element math of SPEC §1 and §3, written once for the CPU and the CUDA kernels
// (C10_HOST_DEVICE): the integer level and the quantizer of one element, the PWL range, the
// estimators' gradient, and the magnitude OCTAV thresholds. Every operation is rounded once, as
// IEEE float32 (on the GPU too, where the compiler would otherwise contract a product into an
// FMA or approximate a quotient), so that both devices give the reference's bits.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

#include "args.h"

namespace octav {

// a / b and a * b, each correctly rounded.
C10_HOST_DEVICE inline float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

C10_HOST_DEVICE inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

C10_HOST_DEVICE inline double div_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

C10_HOST_DEVICE inline double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// Rounds half to even (the default rounding mode).
C10_HOST_DEVICE inline float round_half_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return std::nearbyint(v);
#endif
}

C10_HOST_DEVICE inline float abs_of(float v) { return fabsf(v); }
C10_HOST_DEVICE inline double abs_of(double v) { return fabs(v); }

// r clamped to [lo, hi]; the comparisons keep NaN.
C10_HOST_DEVICE inline float clamp_level(float r, float lo, float hi) {
  return r < lo ? lo : (r > hi ? hi : r);
}

// The integer level clamp(round_half_even(v / step), lo, hi), for step != 0.
C10_HOST_DEVICE inline float grid_level(float v, float step, float lo, float hi) {
  return clamp_level(round_half_even(div_rn(v, step)), lo, hi);
}

// q = level * step with step = s / L (callers compute it once per group); 0 where step == 0
// (s == 0, or a subnormal s whose s / L underflows).
C10_HOST_DEVICE inline float quantize(float v, float step, float lo, float hi) {
  return step == 0.0f ? 0.0f : mul_rn(grid_level(v, step, lo, hi), step);
}

// Whether PWL passes the gradient of v (SPEC §3): |v| <= s signed, 0 <= v <= s unsigned.
template <bool Signed, typename C>
C10_HOST_DEVICE inline bool inside(C v, C s) {
  if constexpr (Signed) {
    return abs_of(v) <= s;
  } else {
    return v >= C(0) && v <= s;
  }
}

template <typename C>
C10_HOST_DEVICE inline bool inside(C v, C s, bool is_signed) {
  return is_signed ? inside<true>(v, s) : inside<false>(v, s);
}

// The estimator's gradient of element v for the incoming g (SPEC §3's table): STE g; inside the
// range g; outside 0 for PWL (and unsigned v < 0 for MAD), MAD g * s / |v|.
template <typename C>
C10_HOST_DEVICE inline C estimator_grad(C g, C v, C s, bool is_signed, Grad mode) {
  if (mode == kSte || inside(v, s, is_signed)) return g;
  if (mode == kPwl || (!is_signed && v < C(0))) return C(0);
  return mul_rn(g, div_rn(s, abs_of(v)));
}

// The quantity OCTAV thresholds: |v| signed; v unsigned (entries <= 0 are ignored by the masks),
// with -inf mapped to +inf so that every non-finite entry reaches the scale (SPEC §6).
template <bool Signed, typename C>
C10_HOST_DEVICE inline C magnitude(C v) {
  if constexpr (Signed) {
    return abs_of(v);
  } else {
    return abs_of(v) == C(INFINITY) ? C(INFINITY) : v;
  }
}

}  // namespace octav
