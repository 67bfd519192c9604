// OCTAV refined against the empirical MSE on the CPU: octav_kernels/reference.py's refine_search
// (same candidates, same order of decisions), with the squared errors of its passes
// (reference.candidate_sse) computed here:
//
//   sse[k] = sum over the group of (q(x; cand[k]) - x)^2, q the float32 quantizer of
//   fake_quantize; each difference and square in double (exact terms), summed in double.
//   With importance h (SPEC §2.1) each term is double(h) * (q - x)^2 of the same exact square.
//
// Groups of at most kLocal elements are read once (copied to a float buffer unless they are float
// and contiguous) and the whole search runs on them in cache, one group per task. Larger groups
// (per tensor) run the search with each pass split into fixed chunks of kChunk elements whose
// partial sums are added in chunk order, so results do not depend on the thread count.
//
// A pass runs with AVX-512 or AVX2 + FMA intrinsics where the CPU has them, else portable loops
// (buffer_sse), weighted or not. All three add the same terms, in different orders (the weighted
// AVX passes fuse the product by h into the add, one rounding fewer per term): an exact tie
// between two candidates (within ~n ulps of the sum) may resolve differently on different CPUs.
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

namespace octav::cpu {
namespace {

constexpr int64_t kChunk = 1 << 14;
constexpr int64_t kPiece = 512;   // elements evaluated for all K candidates while in L1
constexpr int64_t kLocal = 1 << 14;
constexpr int kLanes = 16;  // independent double accumulators (a power of two)
constexpr int64_t kCoarse = 6;          // candidates of the coarse pass
constexpr int64_t kRounds[] = {4, 4, 2};  // candidates of the narrowing passes
constexpr double kSpread = 1.25;  // the coarse grid spans at least this factor around the start
constexpr int64_t kMaxCandidates = 16;  // of one pass

// sum over xs[0..n) of (clamp(round(xs / step), lo, hi) * step - xs)^2, the difference and square
// in double, q = 0 when step == 0. Fixed-width lane loops that GCC vectorizes (no FMA, so every
// term is rounded as in the reference); kLanes accumulators keep the double adds from
// serializing. The portable pass; sse_avx512 below is the one AVX-512 machines run.
inline __attribute__((always_inline)) double piece_sse(const float* __restrict xs, int64_t n,
                                                      float step, float lo, float hi) {
  double acc[kLanes] = {};
  int64_t j = 0;
  if (step == 0.0f) {
    for (; j < n; ++j) acc[0] += static_cast<double>(xs[j]) * static_cast<double>(xs[j]);
    return acc[0];
  }
  for (; j + kLanes <= n; j += kLanes) {
    float q[kLanes];
    for (int u = 0; u < kLanes; ++u) {
      // std::max / std::min keep NaN as fake_quantize's comparisons do.
      q[u] = std::min(std::max(std::nearbyint(xs[j + u] / step), lo), hi) * step;
    }
    for (int u = 0; u < kLanes; ++u) {
      const double d = static_cast<double>(q[u]) - static_cast<double>(xs[j + u]);
      acc[u] += d * d;
    }
  }
  for (; j < n; ++j) {
    const float q = std::min(std::max(std::nearbyint(xs[j] / step), lo), hi) * step;
    const double d = static_cast<double>(q) - static_cast<double>(xs[j]);
    acc[0] += d * d;
  }
  for (int w = kLanes / 2; w > 0; w /= 2) {  // pairwise: a few vector adds, fixed order
    for (int u = 0; u < w; ++u) acc[u] += acc[u + w];
  }
  return acc[0];
}

#if defined(__x86_64__)
// The pass with AVX-512 intrinsics: 0.11 ns per element and candidate on one core of this
// project's AMD EPYC machine, where GCC's vectorization of piece_sse takes 0.18 (it keeps a
// scalar copy of a lane and runs one block per iteration). Same terms, summed in another order.
// Up to 4 candidates share each block read (independent chains, every accumulator a register).
//
// A block whose |x| are all <= bound = 2 * hi * (the set's smallest step) takes q - x in float:
// that difference is then exact for each candidate (Sterbenz: q == 0, or x within [q / 2, 2 q];
// a rounded element with |n| >= 1 lies within (q / 2, 3 q / 2], a clipped one within 2x of its
// clip level, since |lo| >= hi or lo == 0), so its square in double is the same exact term, and
// an FMA adds it (exact product: the same sum). Other blocks (outliers, NaN, inf) convert q and
// x to double first. The AVX2 pass below is the same at half the width.
#define OCTAV_AVX512 __attribute__((target("avx512f"), always_inline)) inline

OCTAV_AVX512 __m256 upper_half(__m512 v) {
  return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

// clamp(round(x / step), lo, hi) * step; max(lo, .) and min(hi, .) return their second operand
// for NaN, as std::max / std::min do in fake_quantize.
OCTAV_AVX512 __m512 quantized(__m512 x, __m512 step, __m512 lo, __m512 hi) {
  const __m512 n = _mm512_roundscale_ps(_mm512_div_ps(x, step),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_mul_ps(_mm512_min_ps(hi, _mm512_max_ps(lo, n)), step);
}

// The terms of the differences d0 (lanes 0-7), d1 (8-15) added to a, b: d * d, by an FMA where d
// is exact (Fused: an exact product, so the same sum). Weighted (W): the exact square d * d, then
// h times it fused into the add (h * d^2 unrounded: each term within half an ulp of the
// reference's rounded one, below the float64 sum's own rounding; 1.21x -> 1.11x the unweighted
// pass here).
template <bool W, bool Fused>
OCTAV_AVX512 void add_diffs(__m512d d0, __m512d d1, __m512d h0, __m512d h1, __m512d& a,
                            __m512d& b) {
  if constexpr (W) {
    a = _mm512_fmadd_pd(h0, _mm512_mul_pd(d0, d0), a);
    b = _mm512_fmadd_pd(h1, _mm512_mul_pd(d1, d1), b);
  } else if constexpr (Fused) {
    a = _mm512_fmadd_pd(d0, d0, a);
    b = _mm512_fmadd_pd(d1, d1, b);
  } else {
    a = _mm512_add_pd(a, _mm512_mul_pd(d0, d0));
    b = _mm512_add_pd(b, _mm512_mul_pd(d1, d1));
  }
}

constexpr int64_t kPrefetch = 512;  // elements ahead

// Weighted (W, SPEC §2.1), each term is h * (d * d) (add_diffs); h is converted once per block for
// all of the set's candidates.
template <int G, bool W>
__attribute__((target("avx512f"))) void sse_avx512_set(const float* xs, const float* hs,
                                                       int64_t n, const float* steps, float lo,
                                                       float hi, double* err) {
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  __m512 step[G];
  __m512d a[G], b[G];
  for (int k = 0; k < G; ++k) {
    step[k] = _mm512_set1_ps(steps[k]);
    a[k] = b[k] = _mm512_setzero_pd();
  }
  const __m512 bound = _mm512_set1_ps(2.0f * (hi * *std::min_element(steps, steps + G)));
  for (int64_t j = 0; j < n; j += 16) {  // the last block zero-filled (zero terms)
    const __mmask16 valid = n - j >= 16 ? 0xFFFF : (1u << (n - j)) - 1;
    const __m512 x = _mm512_maskz_loadu_ps(valid, xs + j);
    _mm_prefetch(reinterpret_cast<const char*>(xs + j + kPrefetch), _MM_HINT_T0);
    __m512d h0 = _mm512_setzero_pd(), h1 = _mm512_setzero_pd();
    if constexpr (W) {
      const __m512 h = _mm512_maskz_loadu_ps(valid, hs + j);
      _mm_prefetch(reinterpret_cast<const char*>(hs + j + kPrefetch), _MM_HINT_T0);
      h0 = _mm512_cvtps_pd(_mm512_castps512_ps256(h));
      h1 = _mm512_cvtps_pd(upper_half(h));
    }
    if (_mm512_cmp_ps_mask(_mm512_abs_ps(x), bound, _CMP_NLE_UQ) == 0) {
      for (int k = 0; k < G; ++k) {
        const __m512 d = _mm512_sub_ps(quantized(x, step[k], vlo, vhi), x);
        add_diffs<W, true>(_mm512_cvtps_pd(_mm512_castps512_ps256(d)),
                           _mm512_cvtps_pd(upper_half(d)), h0, h1, a[k], b[k]);
      }
    } else {
      const __m512d x0 = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
      const __m512d x1 = _mm512_cvtps_pd(upper_half(x));
      for (int k = 0; k < G; ++k) {
        const __m512 q = quantized(x, step[k], vlo, vhi);
        add_diffs<W, false>(_mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(q)), x0),
                            _mm512_sub_pd(_mm512_cvtps_pd(upper_half(q)), x1), h0, h1, a[k],
                            b[k]);
      }
    }
  }
  for (int k = 0; k < G; ++k) err[k] = _mm512_reduce_add_pd(_mm512_add_pd(a[k], b[k]));
}

// K candidates (steps, none 0) in sets of at most 4: 8 accumulators and 4 steps in registers.
template <bool W>
void sse_avx512(const float* xs, const float* hs, int64_t n, const float* steps, int64_t K,
                float lo, float hi, double* err) {
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) sse_avx512_set<4, W>(xs, hs, n, steps + k, lo, hi, err + k);
  if (K - k == 3) sse_avx512_set<3, W>(xs, hs, n, steps + k, lo, hi, err + k);
  if (K - k == 2) sse_avx512_set<2, W>(xs, hs, n, steps + k, lo, hi, err + k);
  if (K - k == 1) sse_avx512_set<1, W>(xs, hs, n, steps + k, lo, hi, err + k);
}

// The same pass with AVX2 and FMA, in blocks of 8: 0.21 ns per element and candidate on that
// machine (the portable loop, SSE4.2: 0.59; GCC vectorizes its double half poorly).
#define OCTAV_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline

OCTAV_AVX2 __m256 quantized(__m256 x, __m256 step, __m256 lo, __m256 hi) {
  const __m256 n = _mm256_round_ps(_mm256_div_ps(x, step),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_mul_ps(_mm256_min_ps(hi, _mm256_max_ps(lo, n)), step);
}

template <bool W, bool Fused>
OCTAV_AVX2 void add_diffs(__m256d d0, __m256d d1, __m256d h0, __m256d h1, __m256d& a,
                          __m256d& b) {
  if constexpr (W) {
    a = _mm256_fmadd_pd(h0, _mm256_mul_pd(d0, d0), a);
    b = _mm256_fmadd_pd(h1, _mm256_mul_pd(d1, d1), b);
  } else if constexpr (Fused) {
    a = _mm256_fmadd_pd(d0, d0, a);
    b = _mm256_fmadd_pd(d1, d1, b);
  } else {
    a = _mm256_add_pd(a, _mm256_mul_pd(d0, d0));
    b = _mm256_add_pd(b, _mm256_mul_pd(d1, d1));
  }
}

template <int G, bool W>
__attribute__((target("avx2,fma"))) void sse_avx2_set(const float* xs, const float* hs,
                                                      int64_t n, const float* steps, float lo,
                                                      float hi, double* err) {
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  __m256 step[G];
  __m256d a[G], b[G];
  for (int k = 0; k < G; ++k) {
    step[k] = _mm256_set1_ps(steps[k]);
    a[k] = b[k] = _mm256_setzero_pd();
  }
  const __m256 bound = _mm256_set1_ps(2.0f * (hi * *std::min_element(steps, steps + G)));
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t j = 0; j < n; j += 8) {  // the last block zero-filled (zero terms)
    const __m256i valid = _mm256_cmpgt_epi32(
        _mm256_set1_epi32(static_cast<int>(std::min<int64_t>(8, n - j))),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 x = _mm256_maskload_ps(xs + j, valid);
    _mm_prefetch(reinterpret_cast<const char*>(xs + j + kPrefetch), _MM_HINT_T0);
    __m256d h0 = _mm256_setzero_pd(), h1 = _mm256_setzero_pd();
    if constexpr (W) {
      const __m256 h = _mm256_maskload_ps(hs + j, valid);
      _mm_prefetch(reinterpret_cast<const char*>(hs + j + kPrefetch), _MM_HINT_T0);
      h0 = _mm256_cvtps_pd(_mm256_castps256_ps128(h));
      h1 = _mm256_cvtps_pd(_mm256_extractf128_ps(h, 1));
    }
    const __m256 beyond = _mm256_cmp_ps(_mm256_andnot_ps(sign, x), bound, _CMP_NLE_UQ);
    if (_mm256_movemask_ps(beyond) == 0) {
      for (int k = 0; k < G; ++k) {
        const __m256 d = _mm256_sub_ps(quantized(x, step[k], vlo, vhi), x);
        add_diffs<W, true>(_mm256_cvtps_pd(_mm256_castps256_ps128(d)),
                           _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1)), h0, h1, a[k], b[k]);
      }
    } else {
      const __m256d x0 = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
      const __m256d x1 = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
      for (int k = 0; k < G; ++k) {
        const __m256 q = quantized(x, step[k], vlo, vhi);
        add_diffs<W, false>(_mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(q)), x0),
                            _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(q, 1)), x1), h0,
                            h1, a[k], b[k]);
      }
    }
  }
  for (int k = 0; k < G; ++k) {
    const __m256d sum = _mm256_add_pd(a[k], b[k]);
    const __m128d half = _mm_add_pd(_mm256_castpd256_pd128(sum), _mm256_extractf128_pd(sum, 1));
    err[k] = _mm_cvtsd_f64(_mm_add_sd(half, _mm_unpackhi_pd(half, half)));
  }
}

template <bool W>
void sse_avx2(const float* xs, const float* hs, int64_t n, const float* steps, int64_t K,
              float lo, float hi, double* err) {
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) sse_avx2_set<4, W>(xs, hs, n, steps + k, lo, hi, err + k);
  if (K - k == 3) sse_avx2_set<3, W>(xs, hs, n, steps + k, lo, hi, err + k);
  if (K - k == 2) sse_avx2_set<2, W>(xs, hs, n, steps + k, lo, hi, err + k);
  if (K - k == 1) sse_avx2_set<1, W>(xs, hs, n, steps + k, lo, hi, err + k);
}
#endif

// sum over xs[0..n) of the squared errors of K candidate steps, piece by piece, portably. Not
// inlined: inside buffer_sse GCC leaves piece_sse's double half scalar (0.73 ns, not 0.58).
__attribute__((noinline)) void portable_sse(const float* xs, int64_t n, const float* steps,
                                            int64_t K, float lo, float hi, double* err) {
  std::fill(err, err + K, 0.0);
  for (int64_t j = 0; j < n; j += kPiece) {
    const int64_t len = std::min(kPiece, n - j);
    for (int64_t k = 0; k < K; ++k) err[k] += piece_sse(xs + j, len, steps[k], lo, hi);
  }
}

// The pass this machine runs: the widest the CPU has, or a narrower one forced by
// OCTAV_CPU_PASS=avx2|portable (read once; the tests run each pass that way).
enum class Pass { kAvx512, kAvx2, kPortable };

Pass cpu_pass() {
  const char* forced = std::getenv("OCTAV_CPU_PASS");
  const std::string name = forced == nullptr ? "" : forced;
  TORCH_CHECK(name.empty() || name == "avx512" || name == "avx2" || name == "portable",
              "OCTAV_CPU_PASS must be avx512, avx2 or portable, got '", name, "'");
#if defined(__x86_64__)
  const bool widest = name.empty() || name == "avx512";
  if (widest && __builtin_cpu_supports("avx512f")) return Pass::kAvx512;
  if ((widest || name == "avx2") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma")) {
    return Pass::kAvx2;
  }
#endif
  return Pass::kPortable;
}

// The importance-weighted portable pass (SPEC §2.1): sum over xs[0..n) of hs * (q - xs)^2 for K
// candidate steps, each term double(h) * (d * d) with d as in piece_sse. Lane loops (no FMA).
__attribute__((noinline)) void portable_weighted_sse(const float* xs, const float* hs, int64_t n,
                                                     const float* steps, int64_t K, float lo,
                                                     float hi, double* err) {
  for (int64_t k = 0; k < K; ++k) {
    const float step = steps[k];
    double acc[kLanes] = {};
    auto term = [&](int64_t j) {
      const float q =
          step == 0.0f ? 0.0f : std::min(std::max(std::nearbyint(xs[j] / step), lo), hi) * step;
      const double d = static_cast<double>(q) - static_cast<double>(xs[j]);
      return static_cast<double>(hs[j]) * (d * d);
    };
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      for (int u = 0; u < kLanes; ++u) acc[u] += term(j + u);
    }
    for (; j < n; ++j) acc[0] += term(j);
    for (int w = kLanes / 2; w > 0; w /= 2) {
      for (int u = 0; u < w; ++u) acc[u] += acc[u + w];
    }
    err[k] = acc[0];
  }
}

// The squared errors of K candidate scales (cand, steps cand / L) over xs[0..n), float64 err[K];
// each weighted by hs where hs is given (SPEC §2.1).
void buffer_sse(const float* xs, const float* hs, int64_t n, const float* cand, int64_t K,
                float L, float lo, float hi, double* err) {
  float steps[kMaxCandidates];
  for (int64_t k = 0; k < K; ++k) steps[k] = cand[k] / L;
#if defined(__x86_64__)
  static const Pass pass = cpu_pass();
  // The AVX passes divide by every step (the portable one sums x^2 for a step of 0).
  if (pass != Pass::kPortable && std::find(steps, steps + K, 0.0f) == steps + K) {
    const bool w = hs != nullptr;
    if (pass == Pass::kAvx512) {
      (w ? sse_avx512<true> : sse_avx512<false>)(xs, hs, n, steps, K, lo, hi, err);
    } else {
      (w ? sse_avx2<true> : sse_avx2<false>)(xs, hs, n, steps, K, lo, hi, err);
    }
    return;
  }
#endif
  if (hs != nullptr) {
    portable_weighted_sse(xs, hs, n, steps, K, lo, hi, err);
  } else {
    portable_sse(xs, n, steps, K, lo, hi, err);
  }
}

// The data itself where it is float (read in place), else nullptr (to be converted).
inline const float* float_data(const float* p) { return p; }
template <typename T>
const float* float_data(const T*) {
  return nullptr;
}

// Elements [b, e) of group g of x (laid out (outer, n_groups, inner); a group's elements in
// (outer, inner) order) as float: in place for a float group stored contiguously, else copied
// to buf.
template <typename T>
const float* group_elements(const T* xp, int64_t outer, int64_t n_groups, int64_t inner,
                            int64_t g, int64_t b, int64_t e, float* buf) {
  if (const float* p = float_data(xp + g * inner + b); p != nullptr && outer == 1) return p;
  for (int64_t k = b; k < e;) {
    const int64_t o = k / inner, i = k % inner, n = std::min(inner - i, e - k);
    const T* src = xp + (o * n_groups + g) * inner + i;
    for (int64_t j = 0; j < n; ++j) buf[k - b + j] = static_cast<float>(src[j]);
    k += n;
  }
  return buf;
}

// The largest positive magnitude (|x| signed; x unsigned, -inf counting as +inf); NaN if any.
// Lane loops without branches, as in piece_sse, so GCC vectorizes them.
template <bool kSigned>
inline __attribute__((always_inline)) float lane_positive_max(const float* xs, int64_t n) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  float m[kLanes] = {};
  int32_t nan[kLanes] = {}, neg_inf[kLanes] = {};
  auto visit = [&](int u, float v) {
    const float a = kSigned ? std::abs(v) : v;
    nan[u] |= a != a;
    neg_inf[u] |= v == -kInf;
    m[u] = a > m[u] ? a : m[u];
  };
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int u = 0; u < kLanes; ++u) visit(u, xs[j + u]);
  }
  for (; j < n; ++j) visit(0, xs[j]);
  for (int u = 1; u < kLanes; ++u) {
    nan[0] |= nan[u];
    neg_inf[0] |= neg_inf[u];
    m[0] = m[u] > m[0] ? m[u] : m[0];
  }
  if (nan[0]) return std::numeric_limits<float>::quiet_NaN();
  return !kSigned && neg_inf[0] ? kInf : m[0];
}

__attribute__((target_clones("avx512f", "avx2", "default")))
float positive_max(const float* xs, int64_t n, bool is_signed) {
  return is_signed ? lane_positive_max<true>(xs, n) : lane_positive_max<false>(xs, n);
}

// reference.cube_root: y^(1/3) for y >= 1 by square roots, products, quotients (bit for bit).
double cube_root(double y) {
  const double r4 = std::sqrt(std::sqrt(y)), r16 = std::sqrt(std::sqrt(r4));
  double t = r4 * r16 * std::sqrt(std::sqrt(r16));
  for (int i = 0; i < 6; ++i) t = (t + t + y / (t * t)) * (1.0 / 3.0);
  return t;
}

// reference.refine_scale's search for one group: sse(cand, K, err) evaluates K candidates in
// one pass.
template <typename SSE>
float refine_search(float s0f, float mf, const SSE& sse) {
  constexpr double spread = kSpread;
  const double s0 = s0f, m = mf;
  const double start = (s0 > 0 && std::isfinite(s0)) ? s0 : m;
  if (!(start > 0 && std::isfinite(start) && m > 0 && std::isfinite(m))) return mf;
  float cand[kMaxCandidates];
  double err[kMaxCandidates];
  // Coarse pass: 4 points geometric from start / spread to max(m, start * spread), start, m.
  const double low = start / spread;
  const double ratio = cube_root(std::max(m, start * spread) / low);
  double point = low;
  for (int64_t j = 0; j < kCoarse - 2; ++j, point *= ratio) cand[j] = static_cast<float>(point);
  cand[kCoarse - 2] = static_cast<float>(start);
  cand[kCoarse - 1] = static_cast<float>(m);
  std::sort(cand, cand + kCoarse);
  sse(cand, kCoarse, err);
  int64_t K = kCoarse;
  int64_t idx = std::min_element(err, err + K) - err;  // first of ties
  double best = cand[idx], best_err = err[idx];
  double lower = idx > 0 ? cand[idx - 1] : best / ratio;
  double upper = idx < K - 1 ? cand[idx + 1] : best * ratio;
  // Narrowing passes: K points evenly inside the bracket, then two spacings around the best.
  for (const int64_t count : kRounds) {
    K = count;
    const double width = (upper - lower) / static_cast<double>(K + 1);
    for (int64_t k = 0; k < K; ++k) {
      const double offset = width * static_cast<double>(k + 1);
      cand[k] = static_cast<float>(lower + offset);
    }
    sse(cand, K, err);
    idx = std::min_element(err, err + K) - err;
    if (err[idx] < best_err) {
      best_err = err[idx];
      best = cand[idx];
    }
    lower = best - width;
    upper = best + width;
  }
  return static_cast<float>(best);
}

}  // namespace

at::Tensor Kernels::refine_scale(const at::Tensor& x, const at::Tensor& scale, const Groups& gr,
                                 const Levels& lv, bool is_signed, const at::Tensor& h) {
  const int64_t outer = gr.outer, n_groups = gr.n_groups, inner = gr.inner;
  const int64_t L = lv.L, lo = lv.lo, hi = lv.hi;
  auto out = at::empty({n_groups}, scale.options());
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float fL = static_cast<float>(L), flo = static_cast<float>(lo),
              fhi = static_cast<float>(hi);
  const int64_t len = outer * inner;  // elements per group
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "refine_scale", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    auto elements = [&](int64_t g, int64_t b, int64_t e, float* buf) {
      return group_elements(xp, outer, n_groups, inner, g, b, e, buf);
    };
    // Elements [b, ...) of group g's importance row, or nullptr without importance.
    auto weights = [&](int64_t g, int64_t b) -> const float* {
      return h.defined() ? importance_row(h, g, len) + b : nullptr;
    };
    if (len <= kLocal) {
      at::parallel_for(0, n_groups, 1, [&](int64_t b, int64_t e) {
        std::vector<float> buf(len);
        for (int64_t g = b; g < e; ++g) {
          const float* xs = elements(g, 0, len, buf.data());
          const float* hs = weights(g, 0);
          auto sse = [&](const float* cand, int64_t K, double* err) {
            buffer_sse(xs, hs, len, cand, K, fL, flo, fhi, err);
          };
          op[g] = refine_search(sp[g], positive_max(xs, len, is_signed), sse);
        }
      });
      return;
    }
    const int64_t chunks = (len + kChunk - 1) / kChunk;
    std::vector<float> chunk_max(chunks);
    std::vector<double> partial(chunks * kMaxCandidates);
    for (int64_t g = 0; g < n_groups; ++g) {
      // Runs fn(elements, importance or nullptr, count, chunk index) over the chunks of group g
      // in parallel.
      auto for_chunks = [&](const auto& fn) {
        at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
          std::vector<float> buf(kChunk);
          for (int64_t c = b; c < e; ++c) {
            const int64_t begin = c * kChunk, end = std::min(len, begin + kChunk);
            fn(elements(g, begin, end, buf.data()), weights(g, begin), end - begin, c);
          }
        });
      };
      for_chunks([&](const float* xs, const float*, int64_t n, int64_t c) {
        chunk_max[c] = positive_max(xs, n, is_signed);
      });
      float m = 0.0f;
      for (float v : chunk_max) m = (std::isnan(v) || v > m) ? v : m;
      if (std::isnan(m)) {
        op[g] = m;
        continue;
      }
      op[g] = refine_search(sp[g], m, [&](const float* cand, int64_t K, double* err) {
        for_chunks([&](const float* xs, const float* hs, int64_t n, int64_t c) {
          buffer_sse(xs, hs, n, cand, K, fL, flo, fhi, partial.data() + c * K);
        });
        std::fill(err, err + K, 0.0);
        for (int64_t c = 0; c < chunks; ++c)
          for (int64_t k = 0; k < K; ++k) err[k] += partial[c * K + k];
      });
    }
  });
  return out;
}

at::Tensor Kernels::candidate_sse(const at::Tensor& x, const at::Tensor& cand, const Groups& gr,
                                  const Levels& lv, const at::Tensor& h) {
  const int64_t outer = gr.outer, n_groups = gr.n_groups, inner = gr.inner;
  const int64_t L = lv.L, lo = lv.lo, hi = lv.hi;
  const int64_t K = cand.size(1), len = outer * inner;
  auto out = at::zeros({n_groups, K}, cand.options().dtype(at::kDouble));
  const float* cp = cand.data_ptr<float>();
  double* op = out.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "candidate_sse", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, n_groups, 1, [&](int64_t b, int64_t e) {
      std::vector<float> buf(std::min(len, kChunk));
      double part[kMaxCandidates];
      for (int64_t g = b; g < e; ++g) {
        // Chunks in order, as refine_scale adds them.
        for (int64_t begin = 0; begin < len; begin += kChunk) {
          const int64_t end = std::min(len, begin + kChunk);
          const float* xs = group_elements(xp, outer, n_groups, inner, g, begin, end, buf.data());
          const float* hs = h.defined() ? importance_row(h, g, len) + begin : nullptr;
          buffer_sse(xs, hs, end - begin, cp + g * K, K, static_cast<float>(L),
                     static_cast<float>(lo), static_cast<float>(hi), part);
          for (int64_t k = 0; k < K; ++k) op[g * K + k] += part[k];
        }
      }
    });
  });
  return out;
}

}  // namespace octav::cpu
