// OCTAV refined against the empirical MSE on the CPU: octav_kernels/reference.py's refine_search
// (same candidates, same order of decisions), with the squared errors of its passes
// (reference.candidate_sse) computed here:
//
//   sse[k] = sum over the group of (q(x; cand[k]) - x)^2, q the float32 quantizer of
//   fake_quantize; each difference and square in double (exact terms), summed in double.
//
// Groups of at most kLocal elements are copied once into a float and a double buffer and the whole
// search runs on them in cache, one group per task. Larger groups (per tensor) run the search
// with each pass split into fixed chunks of kChunk elements whose partial sums are added in chunk
// order, so results do not depend on the thread count.
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
constexpr int kLanes = 32;  // independent double accumulators (a power of two)

// sum over xs[0..n) (xd: the same values in double) of (clamp(round(xs / step), lo, hi) * step -
// xs)^2, q = 0 when step == 0. Fixed-width lane loops that GCC vectorizes (no FMA, so every term
// is rounded as in the reference); kLanes accumulators keep the double adds from serializing.
inline __attribute__((always_inline)) double piece_sse(const float* __restrict xs,
                                                      const double* __restrict xd, int64_t n,
                                                      float step, float lo, float hi) {
  double acc[kLanes] = {};
  int64_t j = 0;
  if (step == 0.0f) {
    for (; j < n; ++j) acc[0] += xd[j] * xd[j];
    return acc[0];
  }
  for (; j + kLanes <= n; j += kLanes) {
    float q[kLanes];
    for (int u = 0; u < kLanes; ++u) {
      // std::max / std::min keep NaN as fake_quantize's comparisons do.
      q[u] = std::min(std::max(std::nearbyint(xs[j + u] / step), lo), hi) * step;
    }
    for (int u = 0; u < kLanes; ++u) {
      const double d = static_cast<double>(q[u]) - xd[j + u];
      acc[u] += d * d;
    }
  }
  for (; j < n; ++j) {
    const float q = std::min(std::max(std::nearbyint(xs[j] / step), lo), hi) * step;
    const double d = static_cast<double>(q) - xd[j];
    acc[0] += d * d;
  }
  for (int w = kLanes / 2; w > 0; w /= 2) {  // pairwise: a few vector adds, fixed order
    for (int u = 0; u < w; ++u) acc[u] += acc[u + w];
  }
  return acc[0];
}

// sum over the buffers of the squared errors of K candidate scales, piece by piece. Compiled for
// SSE4 and, through target_clones, AVX2 and AVX-512 (one dispatch per pass, not per piece).
__attribute__((target_clones("avx512f", "avx2", "default")))
void buffer_sse(const float* xs, const double* xd, int64_t n, const float* cand, int64_t K,
                float L, float lo, float hi, double* err) {
  std::fill(err, err + K, 0.0);
  for (int64_t j = 0; j < n; j += kPiece) {
    const int64_t len = std::min(kPiece, n - j);
    for (int64_t k = 0; k < K; ++k) err[k] += piece_sse(xs + j, xd + j, len, cand[k] / L, lo, hi);
  }
}

// The largest positive magnitude (|x| signed; x unsigned, -inf counting as +inf); NaN if any.
float positive_max(const float* xs, int64_t n, bool is_signed) {
  float m = 0.0f;
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) {
    const float a = is_signed || std::isinf(xs[j]) ? std::abs(xs[j]) : xs[j];
    nan |= std::isnan(a);
    m = a > m ? a : m;
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

// reference.refine_search for one group: sse(cand, err) evaluates K candidates in one pass.
template <typename SSE>
float refine_search(float s0f, float mf, int64_t K, int64_t rounds, double spread,
                    const SSE& sse) {
  const double s0 = s0f, m = mf;
  const double start = (s0 > 0 && std::isfinite(s0)) ? s0 : m;
  if (!(start > 0 && std::isfinite(start) && m > 0 && std::isfinite(m))) return mf;
  std::vector<float> cand(K);
  std::vector<double> err(K);
  // Coarse pass: K-2 points geometric from start / spread to max(m, start * spread), start, m.
  const double low = start / spread;
  const double ratio =
      std::pow(std::max(m, start * spread) / low, 1.0 / static_cast<double>(K - 3));
  double power = 1.0;
  for (int64_t j = 0; j < K - 2; ++j, power *= ratio) cand[j] = static_cast<float>(low * power);
  cand[K - 2] = static_cast<float>(start);
  cand[K - 1] = static_cast<float>(m);
  std::sort(cand.begin(), cand.end());
  sse(cand.data(), err.data());
  int64_t idx = std::min_element(err.begin(), err.end()) - err.begin();  // first of ties
  double best = cand[idx], best_err = err[idx];
  double lower = idx > 0 ? cand[idx - 1] : best / ratio;
  double upper = idx < K - 1 ? cand[idx + 1] : best * ratio;
  // Narrowing passes: K points evenly inside the bracket, then two spacings around the best.
  for (int64_t r = 0; r < rounds; ++r) {
    const double width = (upper - lower) / static_cast<double>(K + 1);
    for (int64_t k = 0; k < K; ++k) {
      const double offset = width * static_cast<double>(k + 1);
      cand[k] = static_cast<float>(lower + offset);
    }
    sse(cand.data(), err.data());
    idx = std::min_element(err.begin(), err.end()) - err.begin();
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
                        bool is_signed, int64_t K, int64_t rounds, double spread) {
  auto out = at::empty({n_groups}, scale.options());
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float fL = static_cast<float>(L), flo = static_cast<float>(lo),
              fhi = static_cast<float>(hi);
  const int64_t len = outer * inner;  // elements per group
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "refine_scale", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    // Copies elements [b, e) of group g (in its (outer, inner) order) to xs / xd as float / double.
    auto gather = [&](int64_t g, int64_t b, int64_t e, float* xs, double* xd) {
      for (int64_t k = b; k < e;) {
        const int64_t o = k / inner, i = k % inner, n = std::min(inner - i, e - k);
        const scalar_t* src = xp + (o * n_groups + g) * inner + i;
        for (int64_t j = 0; j < n; ++j) {
          xs[k - b + j] = static_cast<float>(src[j]);
          xd[k - b + j] = xs[k - b + j];
        }
        k += n;
      }
    };
    if (len <= kLocal) {
      at::parallel_for(0, n_groups, 1, [&](int64_t b, int64_t e) {
        std::vector<float> xs(len);
        std::vector<double> xd(len);
        for (int64_t g = b; g < e; ++g) {
          gather(g, 0, len, xs.data(), xd.data());
          op[g] = refine_search(sp[g], positive_max(xs.data(), len, is_signed), K, rounds, spread,
                                [&](const float* cand, double* err) {
                                  buffer_sse(xs.data(), xd.data(), len, cand, K, fL, flo, fhi, err);
                                });
        }
      });
      return;
    }
    const int64_t chunks = (len + kChunk - 1) / kChunk;
    std::vector<double> partial(chunks * K);
    std::vector<float> chunk_max(chunks);
    for (int64_t g = 0; g < n_groups; ++g) {
      // Runs fn(chunk index, float buffer, double buffer, length) over the chunks in parallel.
      auto for_chunks = [&](const auto& fn) {
        at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
          std::vector<float> xs(kChunk);
          std::vector<double> xd(kChunk);
          for (int64_t c = b; c < e; ++c) {
            const int64_t begin = c * kChunk, end = std::min(len, begin + kChunk);
            gather(g, begin, end, xs.data(), xd.data());
            fn(c, xs.data(), xd.data(), end - begin);
          }
        });
      };
      for_chunks([&](int64_t c, const float* xs, const double*, int64_t n) {
        chunk_max[c] = positive_max(xs, n, is_signed);
      });
      float m = 0.0f;
      for (float v : chunk_max) m = (std::isnan(v) || v > m) ? v : m;
      if (std::isnan(m)) {
        op[g] = m;
        continue;
      }
      op[g] = refine_search(sp[g], m, K, rounds, spread, [&](const float* cand, double* err) {
        for_chunks([&](int64_t c, const float* xs, const double* xd, int64_t n) {
          buffer_sse(xs, xd, n, cand, K, fL, flo, fhi, partial.data() + c * K);
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
