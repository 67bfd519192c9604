// OCTAV statistics and fixed point on the CPU (SPEC §2).
//
// A pass reads a group once and computes S_out, n_in, n_out and max a together, vectorized:
// float (double for float64 input) partials over kBlock elements, added in double. A group is
// cut into fixed chunks of kChunk elements whose partials are added in chunk order, so results
// do not depend on the thread count.
//
// Small groups (channels, blocks: < kBracketMin elements) are iterated with plain passes while
// they are in cache; many groups are spread over threads, one whole group per task.
//
// Large groups (per tensor) use the bracketed solver, which reads the data about twice instead
// of once per iteration:
//   1. histogram pass: counts of a (every kHistStride-th element) over 2^15 bins of its float bit
//      pattern (8 exponent bits and 7 mantissa bits, bins < 0.8% wide; no max pass needed);
//   2. the recursion solved on the histogram (a bin's values spread uniformly) -> estimate s~;
//   3. bracket pass: exact S_out and counts of everything outside [lo, hi), a few bins around
//      s~, and the values inside gathered;
//   4. the SPEC §2 iteration (same stopping rules) from lo on those values: f(s) is exact for
//      every s in [lo, hi). An iterate that leaves the bracket gets a new bracket pass around it
//      (at most kMaxBrackets), then plain passes.
// A warm start (init > 0) skips 1-2 and brackets init * [1/1.06, 1.06): one read when init is
// within 5% of the answer. The cold solver returns the fixed point reached from lo, climbing
// like the plain iteration does from the mean; they agree unless another fixed point lies
// between the mean and lo, which the parity tests probe on varied data. From init, both
// iterations take the same path.
//
// Weighted groups (SPEC §2.1) take the same steps with weighted statistics: the histogram sums
// the sampled entries' importance per bin, the bracket pass keeps S_out, W_out above it, W_in
// below it and the (a, h) pairs inside it, and the plain passes are weighted ones.
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "../grid.h"

namespace octav::cpu {
namespace {

constexpr int64_t kChunk = 1 << 14;
constexpr int64_t kBlock = 256;
constexpr int64_t kBracketMin = 1 << 15;
constexpr int kHistShift = 16;                     // float bits >> 16: exponent + 7 mantissa bits
constexpr uint32_t kBins = 1u << 15;               // keys of all non-negative floats
constexpr uint32_t kFirstNonFinite = 0x7F800000u >> kHistShift;
// The histogram only places the bracket, so it samples every kHistStride-th element of each
// contiguous run (the scattered increments cost more than the read); a sample that misses the
// answer costs one more bracket pass, never accuracy.
constexpr int64_t kHistStride = 8;
constexpr int kBracketBins = 3;                    // bins on each side of the estimate's bin
constexpr int kMaxBrackets = 3;
constexpr double kWarmBracket = 1.06;

struct Sums {
  double s_out = 0.0;
  int64_t n_in = 0;
  int64_t n_out = 0;
  double a_max = 0.0;  // largest positive magnitude

  void add(const Sums& o) {
    s_out += o.s_out;
    n_in += o.n_in;
    n_out += o.n_out;
    a_max = std::max(a_max, o.a_max);
  }
};

// Group c of the contiguous [outer, n_groups, inner] view: element j is x[j / inner, c, j % inner].
template <typename T>
struct GroupView {
  const T* x;
  int64_t n_groups, inner, c, len;

  // fn(ptr, n) over the contiguous runs that make up elements [begin, end) of the group.
  template <typename F>
  void runs(int64_t begin, int64_t end, const F& fn) const {
    runs_at(begin, end, [&](const T* p, int64_t n, int64_t) { fn(p, n); });
  }

  // fn(ptr, n, j): the same runs with the index j of their first element in the group. Always
  // inlined: for groups of 32 a call per pass costs ~20% (GCC stopped inlining the weighted one).
  template <typename F>
  __attribute__((always_inline)) void runs_at(int64_t begin, int64_t end, const F& fn) const {
    for (int64_t j = begin; j < end;) {
      const int64_t o = j / inner, i = j % inner;
      const int64_t n = std::min(inner - i, end - j);
      fn(x + (o * n_groups + c) * inner + i, n, j);
      j += n;
    }
  }
};

// fn(begin, end) -> R over the kChunk-element chunks of [0, len), in parallel (serially inside
// a parallel region), combined with R::add in chunk order.
template <typename R, typename F>
R reduce_chunks(int64_t len, const F& fn) {
  const int64_t n_chunks = (len + kChunk - 1) / kChunk;
  if (n_chunks <= 1) return fn(0, len);
  std::vector<R> partial(n_chunks);
  at::parallel_for(0, n_chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) partial[k] = fn(k * kChunk, std::min(len, (k + 1) * kChunk));
  });
  R total = std::move(partial[0]);
  for (int64_t k = 1; k < n_chunks; ++k) total.add(std::move(partial[k]));
  return total;
}

// The sum of the magnitudes a block counts (counted(a)), in double. The vectorized passes add a
// block in float; magnitudes near float32's max (possible in float32 and bfloat16) overflow
// that sum, so a block whose float sum is inf while its entries are finite is added again here.
template <typename T, bool Signed, typename F>
double sum_in_double(const T* p, int64_t b, int64_t e, const F& counted) {
  double sum = 0.0;
  for (int64_t k = b; k < e; ++k) {
    const auto a = magnitude<Signed>(static_cast<at::opmath_type<T>>(p[k]));
    if (counted(a)) sum += static_cast<double>(a);
  }
  return sum;
}

// One plain pass at threshold s.
template <typename T, bool Signed>
Sums group_sums(const GroupView<T>& g, float s) {
  using C = at::opmath_type<T>;
  const C sc = static_cast<C>(s);
  return reduce_chunks<Sums>(g.len, [&](int64_t begin, int64_t end) {
    Sums r;
    g.runs(begin, end, [&](const T* p, int64_t n) {
      for (int64_t b = 0; b < n; b += kBlock) {
        const int64_t e = std::min(n, b + kBlock);
        C s_out = 0, a_max = 0;
        int32_t n_in = 0, n_out = 0;
#pragma omp simd reduction(+ : s_out, n_in, n_out) reduction(max : a_max)
        for (int64_t k = b; k < e; ++k) {
          // Bitwise &, | and std::max keep the loop branch-free (2.4x faster than && / ?:).
          const C a = magnitude<Signed>(static_cast<C>(p[k]));
          const bool out = (a > sc) | (a != a);
          s_out += out ? a : C(0);
          n_out += out;
          n_in += (a > C(0)) & (a <= sc);
          a_max = std::max(a_max, a);
        }
        double sum = s_out;
        if (std::isinf(s_out) && std::isfinite(a_max)) {
          sum = sum_in_double<T, Signed>(p, b, e, [&](C a) { return a > sc; });
        }
        r.add({sum, n_in, n_out, static_cast<double>(a_max)});
      }
    });
    return r;
  });
}

// The importance-weighted statistics of one pass (SPEC §2.1): sum h a 1{out}, sum h 1{in},
// sum h 1{out}; a bracket pass also keeps the weighted rule's max a (the largest magnitude of
// positive importance, 0 if none; NaN entries are left to S_out). A plain pass leaves a_max 0:
// its iteration takes weighted_max when an iterate needs it.
struct WeightedSums {
  double s_out = 0.0, w_in = 0.0, w_out = 0.0, a_max = 0.0;

  void add(const WeightedSums& o) {
    s_out += o.s_out;
    w_in += o.w_in;
    w_out += o.w_out;
    a_max = std::max(a_max, o.a_max);
  }
};

// One weighted block, partial sums in C (float for float32 and narrower inputs, as group_sums).
// The term h a of an element out is formed as (out ? h : 0) * a, which GCC vectorizes (4x
// faster than out ? h * a : 0); for a finite threshold it is the same (an entry that is not out
// is finite, and h is finite). An infinite threshold takes the selected product.
template <typename C, typename T, bool Signed>
inline WeightedSums weighted_block(const T* __restrict p, const float* __restrict h, int64_t n,
                                   C sc) {
  C s_out = 0, w_in = 0, w_out = 0;
  if (std::isinf(sc)) {
    for (int64_t k = 0; k < n; ++k) {
      const C a = magnitude<Signed>(static_cast<C>(p[k]));
      const C w = static_cast<C>(h[k]);
      const bool out = (a > sc) | (a != a);
      s_out += out ? w * a : C(0);
      w_out += out ? w : C(0);
      w_in += (a > C(0)) & (a <= sc) ? w : C(0);
    }
  } else {
#pragma omp simd reduction(+ : s_out, w_in, w_out)
    for (int64_t k = 0; k < n; ++k) {
      const C a = magnitude<Signed>(static_cast<C>(p[k]));
      const C w = static_cast<C>(h[k]);
      const bool out = (a > sc) | (a != a);
      const C w_if_out = out ? w : C(0);
      s_out += w_if_out * a;  // NaN, or inf of importance 0, reach S_out
      w_out += w_if_out;
      w_in += (a > C(0)) & (a <= sc) ? w : C(0);
    }
  }
  return {static_cast<double>(s_out), static_cast<double>(w_in), static_cast<double>(w_out)};
}

// One weighted pass at threshold s; h is the group's row of the importance table (element j's
// weight at h[j]). A block whose float sums overflow (or are NaN) is added again in double,
// which keeps only the NaN / inf that are real.
template <typename T, bool Signed>
WeightedSums weighted_sums(const GroupView<T>& g, const float* h, float s) {
  using C = at::opmath_type<T>;
  return reduce_chunks<WeightedSums>(g.len, [&](int64_t begin, int64_t end) {
    WeightedSums r;
    g.runs_at(begin, end, [&](const T* p, int64_t n, int64_t j) {
      const float* hp = h + j;
      for (int64_t b = 0; b < n; b += kBlock) {
        const int64_t e = std::min(n, b + kBlock);
        WeightedSums t = weighted_block<C, T, Signed>(p + b, hp + b, e - b, static_cast<C>(s));
        if constexpr (!std::is_same_v<C, double>) {
          if (!std::isfinite(t.s_out) || !std::isfinite(t.w_in) || !std::isfinite(t.w_out)) {
            t = weighted_block<double, T, Signed>(p + b, hp + b, e - b, static_cast<double>(s));
          }
        }
        r.add(t);
      }
    });
    return r;
  });
}

// The largest magnitude of positive importance in the group (0 if none; NaN entries are left to
// S_out): the weighted rule's max a. One more pass, taken only when an iterate needs it.
template <typename T, bool Signed>
double weighted_max(const GroupView<T>& g, const float* h) {
  double m = 0.0;
  g.runs_at(0, g.len, [&](const T* p, int64_t n, int64_t j) {
    for (int64_t k = 0; k < n; ++k) {
      const double a = magnitude<Signed>(static_cast<double>(p[k]));
      if (h[j + k] > 0.0f && a > m) m = a;
    }
  });
  return m;
}

// The weighted s_next: S_out / (c W_in + W_out), or max_a() (the largest a of positive
// importance) when no weight lies above s and S_out is 0 (a NaN S_out stays NaN); rounded to
// float.
template <typename MaxFn>
float next_weighted(const WeightedSums& t, double octav_const, const MaxFn& max_a) {
  if (t.w_out == 0.0 && t.s_out == 0.0) return static_cast<float>(max_a());
  return static_cast<float>(t.s_out / (octav_const * t.w_in + t.w_out));
}

// s_next = S_out / (c * n_in + n_out), or max a when nothing lies above s; rounded to float.
inline float next_scale(double s_out, int64_t n_in, int64_t n_out, double a_max,
                        double octav_const) {
  if (n_out == 0) return static_cast<float>(a_max);
  return static_cast<float>(s_out /
                            (octav_const * static_cast<double>(n_in) + static_cast<double>(n_out)));
}

// The SPEC §2 stopping rules. Returns true (and sets s to the result) when the iteration ends.
inline bool finished(float nxt, float& s, float& prev, double rtol) {
  const bool converged = nxt == s ||
                         std::abs(static_cast<double>(nxt) - static_cast<double>(s)) <=
                             rtol * static_cast<double>(s) ||
                         std::isnan(nxt);
  if (converged) {
    s = nxt;
    return true;
  }
  if (nxt == prev) {  // 2-cycle: the smaller of the two
    s = std::min(s, nxt);
    return true;
  }
  prev = s;
  s = nxt;
  return false;
}

// Plain iteration from s for at most `iters` steps; next(s) is one pass's s_next.
template <typename NextFn>
float iterate_plain(const NextFn& next, float s, float prev, int64_t iters, double rtol) {
  for (int64_t it = 0; it < iters; ++it) {
    if (finished(next(s), s, prev, rtol)) break;
  }
  return s;
}

inline uint32_t key_of(float a) {
  uint32_t bits;
  std::memcpy(&bits, &a, sizeof bits);
  return bits >> kHistShift;
}

inline float bin_edge(uint32_t key) {  // smallest float of bin `key`
  const uint32_t bits = key << kHistShift;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// Histogram of sampled magnitudes (negative unsigned entries fall into bin 0 with the zeros).
// Returns false if the sample holds NaN or inf (the plain iteration then gives NaN / inf); the
// bracket pass carries any the sample missed into the result.
template <typename T, bool Signed>
bool histogram(const GroupView<T>& g, std::vector<int64_t>& counts) {
  counts.assign(kBins, 0);
  std::mutex merge;
  const int64_t n_chunks = (g.len + kChunk - 1) / kChunk;
  at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<int32_t> local(kBins, 0);
    for (int64_t k = cb; k < ce; ++k) {
      g.runs(k * kChunk, std::min(g.len, (k + 1) * kChunk), [&](const T* p, int64_t n) {
        for (int64_t i = 0; i < n; i += kHistStride) {
          float a = static_cast<float>(magnitude<Signed>(static_cast<at::opmath_type<T>>(p[i])));
          a = a < 0.0f ? 0.0f : a;
          ++local[key_of(a)];
        }
      });
      if ((k - cb) % 4096 == 4095) {  // keep int32 counts from overflowing
        std::lock_guard<std::mutex> lock(merge);
        for (uint32_t b = 0; b < kBins; ++b) counts[b] += std::exchange(local[b], 0);
      }
    }
    std::lock_guard<std::mutex> lock(merge);
    for (uint32_t b = 0; b < kBins; ++b) counts[b] += local[b];
  });
  for (uint32_t b = kFirstNonFinite; b < kBins; ++b) {
    if (counts[b] != 0) return false;
  }
  return true;
}

// The weighted histogram (SPEC §2.1): the sum of the importance of the sampled magnitudes in each
// bin (float32 sums of kChunk-element chunks' samples, added in double), and the mean importance
// of a sampled element. Returns false as histogram() does.
template <typename T, bool Signed>
bool weighted_histogram(const GroupView<T>& g, const float* h, std::vector<double>& weights,
                        double& unit) {
  // Each task's histogram, merged in the order of its first chunk (for a given thread count, the
  // same sums every call; across thread counts they may differ in the last bits, which could
  // only move the bracket when the estimate lies within such a difference of a bin edge).
  struct Part {
    int64_t first;
    std::vector<double> weights;
    double total;
    int64_t samples;
  };
  std::vector<Part> parts;
  std::mutex merge;
  const int64_t n_chunks = (g.len + kChunk - 1) / kChunk;
  at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<double> local(kBins, 0.0);
    double local_total = 0.0;
    int64_t local_samples = 0;
    for (int64_t k = cb; k < ce; ++k) {
      g.runs_at(k * kChunk, std::min(g.len, (k + 1) * kChunk),
                [&](const T* p, int64_t n, int64_t j) {
        for (int64_t i = 0; i < n; i += kHistStride) {
          float a = static_cast<float>(magnitude<Signed>(static_cast<at::opmath_type<T>>(p[i])));
          a = a < 0.0f ? 0.0f : a;
          local[key_of(a)] += h[j + i];
          local_total += h[j + i];
          ++local_samples;
        }
      });
    }
    std::lock_guard<std::mutex> lock(merge);
    parts.push_back({cb, std::move(local), local_total, local_samples});
  });
  std::sort(parts.begin(), parts.end(),
            [](const Part& a, const Part& b) { return a.first < b.first; });
  weights.assign(kBins, 0.0);
  double total = 0.0;
  int64_t samples = 0;
  for (const Part& part : parts) {
    for (uint32_t b = 0; b < kBins; ++b) weights[b] += part.weights[b];
    total += part.total;
    samples += part.samples;
  }
  unit = samples > 0 ? total / static_cast<double>(samples) : 0.0;
  for (uint32_t b = kFirstNonFinite; b < kBins; ++b) {
    if (weights[b] != 0.0) return false;
  }
  return true;
}

// The recursion on the histogram, each bin's count (weighted: its sum of importance) spread
// uniformly over its range; `unit` is one sampled element's count (weighted: the mean importance
// of the sample), so that "less than half an element above s" means max a. Bin 0 (zeros,
// non-positive unsigned entries and values below 2^-118) is left out.
template <typename N>
double estimate_from_histogram(const std::vector<N>& counts, double octav_const, double unit) {
  std::vector<double> below_n(kFirstNonFinite + 1, 0.0), below_s(kFirstNonFinite + 1, 0.0);
  for (uint32_t b = 1; b < kFirstNonFinite; ++b) {
    const double n = static_cast<double>(counts[b]);  // the top bin's upper edge is inf
    below_n[b + 1] = below_n[b] + n;
    below_s[b + 1] = below_s[b] + (n > 0 ? n * 0.5 * (double{bin_edge(b)} + bin_edge(b + 1)) : 0);
  }
  const double total_n = below_n[kFirstNonFinite], total_s = below_s[kFirstNonFinite];
  if (total_n == 0) return 0.0;
  uint32_t top = kFirstNonFinite - 1;
  while (counts[top] == 0) --top;
  const double a_max = bin_edge(top + 1);
  double s = total_s / total_n, prev = -1.0;
  for (int it = 0; it < 100; ++it) {
    const uint32_t k = std::max<uint32_t>(1, std::min(key_of(static_cast<float>(s)), top));
    const double lo = bin_edge(k), hi = bin_edge(k + 1);
    const double out_frac = std::clamp((hi - s) / (hi - lo), 0.0, 1.0);
    const double n_k = static_cast<double>(counts[k]);
    const double n_out = total_n - below_n[k + 1] + n_k * out_frac;
    const double n_in = below_n[k] + n_k * (1.0 - out_frac);
    const double s_out = total_s - below_s[k + 1] + n_k * out_frac * 0.5 * (std::max(s, lo) + hi);
    const double nxt = n_out <= 0.5 * unit ? a_max : s_out / (octav_const * n_in + n_out);
    if (std::abs(nxt - s) <= 1e-9 * s || nxt == prev) return nxt;
    prev = s;
    s = nxt;
  }
  return s;
}

// [lo, hi): the bin of s and kBracketBins bins on each side (s > 0 finite).
inline void bins_around(float s, float& lo, float& hi) {
  const uint32_t k = key_of(s);
  lo = bin_edge(k - std::min<uint32_t>(k, kBracketBins));
  hi = bin_edge(std::min<uint32_t>(k + kBracketBins + 1, kFirstNonFinite));
}

// Exact statistics outside [lo, hi) and the magnitudes inside it.
template <typename C>
struct Bracket {
  double s_above = 0.0;  // sum of a >= hi (and NaN)
  int64_t n_above = 0;
  int64_t n_below = 0;  // 0 < a < lo
  double a_max = 0.0;
  std::vector<C> inside;

  void add(Bracket&& o) {
    s_above += o.s_above;
    n_above += o.n_above;
    n_below += o.n_below;
    a_max = std::max(a_max, o.a_max);
    inside.insert(inside.end(), o.inside.begin(), o.inside.end());
  }

  // The exact f(s) for lo <= s < hi: entries outside the bracket are on a known side of s.
  float next(float s, double octav_const) const {
    const C sc = static_cast<C>(s);
    double s_out = s_above;
    int64_t n_out = n_above, n_in = n_below;
    for (const C v : inside) {  // lo may be 0 for tiny scales: zeros stay out of n_in
      const bool out = v > sc;
      s_out += out ? static_cast<double>(v) : 0.0;
      n_out += out;
      n_in += !out & (v > C(0));
    }
    return next_scale(s_out, n_in, n_out, a_max, octav_const);
  }
};

template <typename T, bool Signed>
Bracket<at::opmath_type<T>> bracket_pass(const GroupView<T>& g, float lo, float hi) {
  using C = at::opmath_type<T>;
  const C clo = lo, chi = hi;
  return reduce_chunks<Bracket<C>>(g.len, [&](int64_t begin, int64_t end) {
    Bracket<C> r;
    g.runs(begin, end, [&](const T* p, int64_t n) {
      for (int64_t b = 0; b < n; b += kBlock) {
        const int64_t e = std::min(n, b + kBlock);
        C s_above = 0, a_max = 0;
        int32_t n_above = 0, n_below = 0, n_inside = 0;
#pragma omp simd reduction(+ : s_above, n_above, n_below, n_inside) reduction(max : a_max)
        for (int64_t k = b; k < e; ++k) {
          const C a = magnitude<Signed>(static_cast<C>(p[k]));
          const bool above = (a >= chi) | (a != a);  // NaN reaches S_out, as in a plain pass
          s_above += above ? a : C(0);
          n_above += above;
          n_below += (a > C(0)) & (a < clo);
          n_inside += (a >= clo) & (a < chi);
          a_max = std::max(a_max, a);
        }
        r.s_above += std::isinf(s_above) && std::isfinite(a_max)
                         ? sum_in_double<T, Signed>(p, b, e, [&](C a) { return a >= chi; })
                         : static_cast<double>(s_above);
        r.n_above += n_above;
        r.n_below += n_below;
        r.a_max = std::max(r.a_max, static_cast<double>(a_max));
        if (n_inside == 0) continue;
        for (int64_t k = b; k < e; ++k) {
          const C a = magnitude<Signed>(static_cast<C>(p[k]));
          if (a >= clo && a < chi) r.inside.push_back(a);
        }
      }
    });
    return r;
  });
}

// The weighted bracket (SPEC §2.1): S_out and W_out of a >= hi (and NaN), W_in of 0 < a < lo,
// the weighted max, and the (a, h) pairs inside [lo, hi) of positive importance (the others add
// 0 there).
template <typename C>
struct WeightedBracket {
  WeightedSums outside;  // s_out, w_out: above; w_in: below; a_max
  std::vector<std::pair<C, C>> inside;

  void add(WeightedBracket&& o) {
    outside.add(o.outside);
    inside.insert(inside.end(), o.inside.begin(), o.inside.end());
  }

  float next(float s, double octav_const) const {
    const C sc = static_cast<C>(s);
    WeightedSums t = outside;
    for (const auto& [v, w] : inside) {
      const bool out = v > sc;
      t.s_out += out ? static_cast<double>(w) * static_cast<double>(v) : 0.0;
      t.w_out += out ? static_cast<double>(w) : 0.0;
      t.w_in += !out & (v > C(0)) ? static_cast<double>(w) : 0.0;
    }
    return next_weighted(t, octav_const, [&] { return t.a_max; });  // known: no pass
  }
};

// One block's sums outside [lo, hi) in C (float for float32 and narrower, as weighted_block),
// and the count inside.
template <typename C, typename T, bool Signed>
inline WeightedSums weighted_outside(const T* __restrict p, const float* __restrict h, int64_t n,
                                     C clo, C chi, int32_t& n_inside) {
  C s_above = 0, w_above = 0, w_below = 0, a_max = 0;
  int32_t inside = 0;
#pragma omp simd reduction(+ : s_above, w_above, w_below, inside) reduction(max : a_max)
  for (int64_t k = 0; k < n; ++k) {
    const C a = magnitude<Signed>(static_cast<C>(p[k]));
    const C w = static_cast<C>(h[k]);
    const bool above = (a >= chi) | (a != a);  // NaN reaches S_out, as in a plain pass
    const C w_if_above = above ? w : C(0);     // every entry not above is finite
    s_above += w_if_above * a;
    w_above += w_if_above;
    w_below += (a > C(0)) & (a < clo) ? w : C(0);
    inside += (a >= clo) & (a < chi);
    a_max = std::max(a_max, w > C(0) ? a : C(0));  // a NaN lane makes S_out NaN anyway
  }
  n_inside = inside;
  return {static_cast<double>(s_above), static_cast<double>(w_below),
          static_cast<double>(w_above), static_cast<double>(a_max)};
}

template <typename T, bool Signed>
WeightedBracket<at::opmath_type<T>> weighted_bracket_pass(const GroupView<T>& g, const float* h,
                                                          float lo, float hi) {
  using C = at::opmath_type<T>;
  const C clo = lo, chi = hi;
  return reduce_chunks<WeightedBracket<C>>(g.len, [&](int64_t begin, int64_t end) {
    WeightedBracket<C> r;
    g.runs_at(begin, end, [&](const T* p, int64_t n, int64_t j) {
      const float* hp = h + j;
      for (int64_t b = 0; b < n; b += kBlock) {
        const int64_t e = std::min(n, b + kBlock);
        int32_t n_inside = 0;
        WeightedSums t = weighted_outside<C, T, Signed>(p + b, hp + b, e - b, clo, chi, n_inside);
        if constexpr (!std::is_same_v<C, double>) {
          if (!std::isfinite(t.s_out) || !std::isfinite(t.w_in) || !std::isfinite(t.w_out)) {
            t = weighted_outside<double, T, Signed>(p + b, hp + b, e - b, lo, hi, n_inside);
          }
        }
        r.outside.add(t);
        if (n_inside == 0) continue;
        for (int64_t k = b; k < e; ++k) {
          const C a = magnitude<Signed>(static_cast<C>(p[k]));
          if (a >= clo && a < chi && hp[k] > 0.0f) r.inside.emplace_back(a, hp[k]);
        }
      }
    });
    return r;
  });
}

// The SPEC §2 iteration from `start` on brackets: bracket(lo, hi) reads the data once and returns
// an object whose next(s) is the exact f(s) for lo <= s < hi. An iterate that leaves the bracket
// gets a new bracket around it (at most kMaxBrackets), then plain(s, prev, iterations left).
template <typename BracketFn, typename PlainFn>
float octav_bracketed(float start, double octav_const, int64_t max_iters, double rtol, float lo,
                      float hi, const BracketFn& bracket, const PlainFn& plain) {
  float s = start;
  float prev = std::numeric_limits<float>::quiet_NaN();
  int brackets = 0;
  decltype(bracket(lo, hi)) br;
  for (int64_t it = 0; it < max_iters; ++it) {
    const bool outside = !(s >= lo && s < hi);
    if (outside || brackets == 0) {
      if (brackets == kMaxBrackets || !std::isfinite(s)) return plain(s, prev, max_iters - it);
      if (outside) bins_around(s, lo, hi);  // re-centre on the iterate that left the bracket
      br = bracket(lo, hi);
      ++brackets;
    }
    if (finished(br.next(s, octav_const), s, prev, rtol)) break;
  }
  return s;
}

// The fixed point of one group from its solver's pieces, weighted or not: estimate() -> the
// histogram's estimate of the answer (0 where it has none), bracket(lo, hi) (octav_bracketed),
// plain(s, prev, iterations) and cold() -> the first iterate (from s = 0). The bracketed solver
// runs on large groups; the plain iteration is kept where its exact path matters (early stops:
// large rtol, few iterations) or a group is cache-resident.
template <typename EstimateFn, typename BracketFn, typename PlainFn, typename ColdFn>
float solve_group(int64_t len, float init, double octav_const, int64_t max_iters, double rtol,
                  const EstimateFn& estimate, const BracketFn& bracket, const PlainFn& plain,
                  const ColdFn& cold) {
  // init > 0 is false for NaN and non-positive entries: those groups start cold.
  const bool warm = init > 0.0f;
  const bool bracketed = len >= kBracketMin && rtol <= kDefaultRtol && max_iters >= 16;
  if (bracketed && warm && std::isfinite(init)) {
    return octav_bracketed(init, octav_const, max_iters, rtol,
                           static_cast<float>(init / kWarmBracket),
                           static_cast<float>(init * kWarmBracket), bracket, plain);
  }
  if (bracketed && !warm) {
    const float est = static_cast<float>(estimate());
    if (est > 0.0f && std::isfinite(est)) {
      // Start at the bracket's lower edge: the plain iteration climbs from the mean, so it
      // stops at the lowest of several nearby fixed points (s = max|x| is always one).
      float lo, hi;
      bins_around(est, lo, hi);
      return octav_bracketed(lo, octav_const, max_iters, rtol, lo, hi, bracket, plain);
    }
  }
  return plain(warm ? init : cold(), std::numeric_limits<float>::quiet_NaN(), max_iters);
}

template <typename T, bool Signed>
float octav_group(const GroupView<T>& g, const float* init, double octav_const,
                  int64_t max_iters, double rtol) {
  auto estimate = [&] {
    std::vector<int64_t> counts;
    return histogram<T, Signed>(g, counts) ? estimate_from_histogram(counts, octav_const, 1.0)
                                           : 0.0;
  };
  auto bracket = [&](float lo, float hi) { return bracket_pass<T, Signed>(g, lo, hi); };
  auto next = [&](float s) {
    const Sums t = group_sums<T, Signed>(g, s);
    return next_scale(t.s_out, t.n_in, t.n_out, t.a_max, octav_const);
  };
  auto plain = [&](float s, float prev, int64_t iters) {
    return iterate_plain(next, s, prev, iters, rtol);
  };
  return solve_group(g.len, init != nullptr ? init[g.c] : 0.0f, octav_const, max_iters, rtol,
                     estimate, bracket, plain, [&] { return next(0.0f); });
}

// The weighted fixed point of one group (h: its row of the importance table): as octav_group,
// with the weighted histogram, brackets and passes.
template <typename T, bool Signed>
float octav_group_weighted(const GroupView<T>& g, const float* h, const float* init,
                           double octav_const, int64_t max_iters, double rtol) {
  auto next = [&](float s) {
    return next_weighted(weighted_sums<T, Signed>(g, h, s), octav_const,
                         [&] { return weighted_max<T, Signed>(g, h); });
  };
  auto estimate = [&] {
    std::vector<double> weights;
    double unit;
    return weighted_histogram<T, Signed>(g, h, weights, unit)
               ? estimate_from_histogram(weights, octav_const, unit)
               : 0.0;
  };
  auto bracket = [&](float lo, float hi) {
    return weighted_bracket_pass<T, Signed>(g, h, lo, hi);
  };
  auto plain = [&](float s, float prev, int64_t iters) {
    return iterate_plain(next, s, prev, iters, rtol);
  };
  return solve_group(g.len, init != nullptr ? init[g.c] : 0.0f, octav_const, max_iters, rtol,
                     estimate, bracket, plain, [&] { return next(0.0f); });
}

// Runs fn(c) for every group. Many groups: whole groups per thread (each group stays in cache
// for all its passes). Few groups: one after another, each pass split across threads.
template <typename F>
void for_each_group(int64_t n_groups, const F& fn) {
  if (n_groups >= at::get_num_threads()) {
    at::parallel_for(0, n_groups, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) fn(c);
    });
  } else {
    for (int64_t c = 0; c < n_groups; ++c) fn(c);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> Kernels::masked_sums(const at::Tensor& x,
                                                                    const at::Tensor& scale,
                                                                    const Groups& g,
                                                                    bool is_signed,
                                                                    const at::Tensor& h) {
  auto s_out = at::empty({g.n_groups}, x.options().dtype(at::kFloat));
  const float* sp = scale.data_ptr<float>();
  float* so = s_out.data_ptr<float>();
  if (h.defined()) {
    auto w_in = at::empty({g.n_groups}, x.options().dtype(at::kFloat));
    auto w_out = at::empty({g.n_groups}, x.options().dtype(at::kFloat));
    float* wi = w_in.data_ptr<float>();
    float* wo = w_out.data_ptr<float>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_sums", [&] {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      for_each_group(g.n_groups, [&](int64_t c) {
        const GroupView<scalar_t> view{xp, g.n_groups, g.inner, c, g.len()};
        const float* hc = importance_row(h, c, g.len());
        const WeightedSums t = is_signed ? weighted_sums<scalar_t, true>(view, hc, sp[c])
                                         : weighted_sums<scalar_t, false>(view, hc, sp[c]);
        so[c] = static_cast<float>(t.s_out);
        wi[c] = static_cast<float>(t.w_in);
        wo[c] = static_cast<float>(t.w_out);
      });
    });
    return {s_out, w_in, w_out};
  }
  auto n_in = at::empty({g.n_groups}, x.options().dtype(at::kLong));
  auto n_out = at::empty({g.n_groups}, x.options().dtype(at::kLong));
  int64_t* ni = n_in.data_ptr<int64_t>();
  int64_t* no = n_out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_sums", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    for_each_group(g.n_groups, [&](int64_t c) {
      const GroupView<scalar_t> view{xp, g.n_groups, g.inner, c, g.len()};
      const Sums t = is_signed ? group_sums<scalar_t, true>(view, sp[c])
                               : group_sums<scalar_t, false>(view, sp[c]);
      so[c] = static_cast<float>(t.s_out);
      ni[c] = t.n_in;
      no[c] = t.n_out;
    });
  });
  return {s_out, n_in, n_out};
}

at::Tensor Kernels::octav_scale(const at::Tensor& x, const at::Tensor& init, const Groups& g,
                                bool is_signed, double octav_const, int64_t max_iters,
                                double rtol, const at::Tensor& h) {
  auto scale = at::empty({g.n_groups}, x.options().dtype(at::kFloat));
  const float* ip = init.numel() > 0 ? init.data_ptr<float>() : nullptr;
  float* sp = scale.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "octav_scale", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    for_each_group(g.n_groups, [&](int64_t c) {
      const GroupView<scalar_t> view{xp, g.n_groups, g.inner, c, g.len()};
      if (h.defined()) {
        const float* hc = importance_row(h, c, g.len());
        sp[c] = is_signed
                    ? octav_group_weighted<scalar_t, true>(view, hc, ip, octav_const, max_iters,
                                                           rtol)
                    : octav_group_weighted<scalar_t, false>(view, hc, ip, octav_const,
                                                            max_iters, rtol);
        return;
      }
      sp[c] = is_signed ? octav_group<scalar_t, true>(view, ip, octav_const, max_iters, rtol)
                        : octav_group<scalar_t, false>(view, ip, octav_const, max_iters, rtol);
    });
  });
  return scale;
}

}  // namespace octav::cpu
