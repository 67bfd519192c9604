// OCTAV refined against the empirical MSE on the CPU: octav_kernels/reference.py's refine_search
// (same candidates, same order of decisions), with the squared errors of its passes
// (reference.candidate_sse) computed here:
//
//   sse[k] = sum over the group of (q(x; cand[k]) - x)^2, q the float32 quantizer of
//   fake_quantize; each difference and square in double (exact terms), summed in double.
//
// Groups of at most kLocal elements are read once (copied to a float buffer unless they are float
// and contiguous) and the whole search runs on them in cache, one group per task. Larger groups
// (per tensor) run the search with each pass split into fixed chunks of kChunk elements whose
// partial sums are added in chunk order, so results do not depend on the thread count.
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace octav::cpu {
namespace {

constexpr int64_t kChunk = 1 << 14;
constexpr int64_t kPiece = 512;   // elements evaluated for all K candidates while in L1
constexpr int64_t kLocal = 1 << 14;
constexpr int kLanes = 16;  // independent double accumulators (a power of two)

// sum over xs[0..n) of (clamp(round(xs / step), lo, hi) * step - xs)^2, the difference and square
// in double, q = 0 when step == 0. Fixed-width lane loops that GCC vectorizes (no FMA, so every
// term is rounded as in the reference); kLanes accumulators keep the double adds from
// serializing.
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

// sum over xs[0..n) of the squared errors of K candidate scales, piece by piece. Compiled for
// SSE4 and, through target_clones, AVX2 and AVX-512 (one dispatch per pass, not per piece).
__attribute__((target_clones("avx512f", "avx2", "default")))
void buffer_sse(const float* xs, int64_t n, const float* cand, int64_t K, float L, float lo,
                float hi, double* err) {
  std::fill(err, err + K, 0.0);
  for (int64_t j = 0; j < n; j += kPiece) {
    const int64_t len = std::min(kPiece, n - j);
    for (int64_t k = 0; k < K; ++k) err[k] += piece_sse(xs + j, len, cand[k] / L, lo, hi);
  }
}

// The data itself where it is float (read in place), else nullptr (to be converted).
inline const float* float_data(const float* p) { return p; }
template <typename T>
const float* float_data(const T*) {
  return nullptr;
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

constexpr int64_t kCoarse = 6;          // candidates of the coarse pass
constexpr int64_t kMaxCandidates = 16;  // of one pass

// reference.cube_root: y^(1/3) for y >= 1 by square roots, products, quotients (bit for bit).
double cube_root(double y) {
  const double r4 = std::sqrt(std::sqrt(y)), r16 = std::sqrt(std::sqrt(r4));
  double t = r4 * r16 * std::sqrt(std::sqrt(r16));
  for (int i = 0; i < 6; ++i) t = (t + t + y / (t * t)) * (1.0 / 3.0);
  return t;
}

// reference.refine_search for one group: sse(cand, K, err) evaluates K candidates in one pass;
// `rounds` the candidate counts of the narrowing passes.
template <typename SSE>
float refine_search(float s0f, float mf, const std::vector<int64_t>& rounds, double spread,
                    const SSE& sse) {
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
  for (const int64_t count : rounds) {
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

at::Tensor refine_scale(const at::Tensor& x, const at::Tensor& scale, int64_t outer,
                        int64_t n_groups, int64_t inner, int64_t L, int64_t lo, int64_t hi,
                        bool is_signed, const std::vector<int64_t>& rounds, double spread) {
  TORCH_CHECK(std::all_of(rounds.begin(), rounds.end(),
                          [](int64_t K) { return K >= 1 && K <= kMaxCandidates; }),
              "refine_scale: rounds must be candidate counts of 1..", kMaxCandidates);
  auto out = at::empty({n_groups}, scale.options());
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float fL = static_cast<float>(L), flo = static_cast<float>(lo),
              fhi = static_cast<float>(hi);
  const int64_t len = outer * inner;  // elements per group
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "refine_scale", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    // Elements [b, e) of group g (in its (outer, inner) order) as float: in place for a float
    // group stored contiguously, else copied to buf.
    auto elements = [&](int64_t g, int64_t b, int64_t e, float* buf) -> const float* {
      if (const float* p = float_data(xp + g * inner + b); p != nullptr && outer == 1) {
        return p;
      }
      for (int64_t k = b; k < e;) {
        const int64_t o = k / inner, i = k % inner, n = std::min(inner - i, e - k);
        const scalar_t* src = xp + (o * n_groups + g) * inner + i;
        for (int64_t j = 0; j < n; ++j) buf[k - b + j] = static_cast<float>(src[j]);
        k += n;
      }
      return buf;
    };
    if (len <= kLocal) {
      at::parallel_for(0, n_groups, 1, [&](int64_t b, int64_t e) {
        std::vector<float> buf(len);
        for (int64_t g = b; g < e; ++g) {
          const float* xs = elements(g, 0, len, buf.data());
          auto sse = [&](const float* cand, int64_t K, double* err) {
            buffer_sse(xs, len, cand, K, fL, flo, fhi, err);
          };
          op[g] = refine_search(sp[g], positive_max(xs, len, is_signed), rounds, spread, sse);
        }
      });
      return;
    }
    const int64_t chunks = (len + kChunk - 1) / kChunk;
    std::vector<float> chunk_max(chunks);
    std::vector<double> partial(chunks * kMaxCandidates);
    for (int64_t g = 0; g < n_groups; ++g) {
      // Runs fn(elements, count, chunk index) over the chunks of group g in parallel.
      auto for_chunks = [&](const auto& fn) {
        at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
          std::vector<float> buf(kChunk);
          for (int64_t c = b; c < e; ++c) {
            const int64_t begin = c * kChunk, end = std::min(len, begin + kChunk);
            fn(elements(g, begin, end, buf.data()), end - begin, c);
          }
        });
      };
      for_chunks([&](const float* xs, int64_t n, int64_t c) {
        chunk_max[c] = positive_max(xs, n, is_signed);
      });
      float m = 0.0f;
      for (float v : chunk_max) m = (std::isnan(v) || v > m) ? v : m;
      if (std::isnan(m)) {
        op[g] = m;
        continue;
      }
      op[g] = refine_search(sp[g], m, rounds, spread, [&](const float* cand, int64_t K,
                                                          double* err) {
        for_chunks([&](const float* xs, int64_t n, int64_t c) {
          buffer_sse(xs, n, cand, K, fL, flo, fhi, partial.data() + c * K);
        });
        std::fill(err, err + K, 0.0);
        for (int64_t c = 0; c < chunks; ++c)
          for (int64_t k = 0; k < K; ++k) err[k] += partial[c * K + k];
      });
    }
  });
  return out;
}

}  // namespace octav::cpu
