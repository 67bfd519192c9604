// OCTAV statistics and fixed point on the CPU (SPEC §2).
//
// One pass over a group computes S_out, n_in, n_out (and the largest magnitude, needed when
// n_out == 0) together. A group is cut into fixed chunks of kChunk elements; each chunk is
// summed in double and the partials are added in chunk order, so the result does not depend on
// the number of threads. Many groups: threads take whole groups and iterate each to convergence
// while it is in cache. Few large groups: each pass splits the group's chunks across threads.
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace octav::cpu {
namespace {

constexpr int64_t kChunk = 1 << 14;

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

// The thresholded quantity: |x| signed, x unsigned (entries <= 0 are ignored by the masks).
// Unsigned -inf becomes +inf so every non-finite entry reaches the scale (SPEC §6).
template <bool Signed, typename C>
inline C magnitude(C v) {
  if constexpr (Signed) {
    return std::abs(v);
  } else {
    return std::isinf(v) ? std::numeric_limits<C>::infinity() : v;
  }
}

// Sums over elements [begin, end) of group c; element j of the group is x[j / inner, c, j % inner].
template <typename T, bool Signed>
Sums range_sums(const T* x, int64_t n_groups, int64_t inner, int64_t c, int64_t begin,
                int64_t end, float s) {
  using C = at::opmath_type<T>;
  const C sc = static_cast<C>(s);
  Sums r;
  int64_t j = begin;
  while (j < end) {
    const int64_t o = j / inner;
    const int64_t i = j % inner;
    const int64_t run = std::min(inner - i, end - j);
    const T* p = x + (o * n_groups + c) * inner + i;
    double s_out = 0.0, a_max = 0.0;
    int64_t n_in = 0, n_out = 0;
    for (int64_t k = 0; k < run; ++k) {
      const C a = magnitude<Signed>(static_cast<C>(p[k]));
      const bool out = a > sc || std::isnan(a);
      const bool in = a > C(0) && a <= sc;
      s_out += out ? static_cast<double>(a) : 0.0;
      n_out += out;
      n_in += in;
      a_max = a > a_max ? static_cast<double>(a) : a_max;
    }
    r.add({s_out, n_in, n_out, a_max});
    j += run;
  }
  return r;
}

// One pass over group c: chunks in parallel (serial when already inside a parallel region).
template <typename T, bool Signed>
Sums group_sums(const T* x, int64_t group_len, int64_t n_groups, int64_t inner, int64_t c,
                float s) {
  const int64_t n_chunks = (group_len + kChunk - 1) / kChunk;
  if (n_chunks <= 1) {
    return range_sums<T, Signed>(x, n_groups, inner, c, 0, group_len, s);
  }
  std::vector<Sums> partial(n_chunks);
  at::parallel_for(0, n_chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      partial[k] = range_sums<T, Signed>(x, n_groups, inner, c, k * kChunk,
                                         std::min(group_len, (k + 1) * kChunk), s);
    }
  });
  Sums total;
  for (const Sums& p : partial) total.add(p);
  return total;
}

// s_next = S_out / (c * n_in + n_out), or max|x| when nothing lies above s; rounded to float.
inline float next_scale(const Sums& t, double octav_const) {
  if (t.n_out == 0) return static_cast<float>(t.a_max);
  return static_cast<float>(t.s_out / (octav_const * static_cast<double>(t.n_in) +
                                       static_cast<double>(t.n_out)));
}

template <typename T, bool Signed>
float octav_group(const T* x, int64_t group_len, int64_t n_groups, int64_t inner, int64_t c,
                  const float* init, double octav_const, int64_t max_iters, double rtol) {
  auto f = [&](float s) {
    return next_scale(group_sums<T, Signed>(x, group_len, n_groups, inner, c, s), octav_const);
  };
  // init > 0 is false for NaN and non-positive entries: those groups start cold.
  float s = (init != nullptr && init[c] > 0.0f) ? init[c] : f(0.0f);
  float prev = std::numeric_limits<float>::quiet_NaN();
  for (int64_t it = 0; it < max_iters; ++it) {
    const float nxt = f(s);
    const bool converged = nxt == s ||
                           std::abs(static_cast<double>(nxt) - static_cast<double>(s)) <=
                               rtol * static_cast<double>(s) ||
                           std::isnan(nxt);
    if (converged) return nxt;
    if (nxt == prev) return std::min(s, nxt);  // 2-cycle: the smaller of the two
    prev = s;
    s = nxt;
  }
  return s;
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_sums(const at::Tensor& x,
                                                           const at::Tensor& scale,
                                                           int64_t outer, int64_t n_groups,
                                                           int64_t inner, bool is_signed) {
  auto s_out = at::empty({n_groups}, x.options().dtype(at::kFloat));
  auto n_in = at::empty({n_groups}, x.options().dtype(at::kLong));
  auto n_out = at::empty({n_groups}, x.options().dtype(at::kLong));
  const int64_t group_len = outer * inner;
  const float* sp = scale.data_ptr<float>();
  float* so = s_out.data_ptr<float>();
  int64_t* ni = n_in.data_ptr<int64_t>();
  int64_t* no = n_out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_sums", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    for_each_group(n_groups, [&](int64_t c) {
      const Sums t = is_signed
                         ? group_sums<scalar_t, true>(xp, group_len, n_groups, inner, c, sp[c])
                         : group_sums<scalar_t, false>(xp, group_len, n_groups, inner, c, sp[c]);
      so[c] = static_cast<float>(t.s_out);
      ni[c] = t.n_in;
      no[c] = t.n_out;
    });
  });
  return {s_out, n_in, n_out};
}

at::Tensor octav_scale(const at::Tensor& x, const at::Tensor& init, int64_t outer,
                       int64_t n_groups, int64_t inner, bool is_signed, double octav_const,
                       int64_t max_iters, double rtol) {
  auto scale = at::empty({n_groups}, x.options().dtype(at::kFloat));
  const int64_t group_len = outer * inner;
  const float* ip = init.numel() > 0 ? init.data_ptr<float>() : nullptr;
  float* sp = scale.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "octav_scale", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    auto solve = [&](int64_t c) {
      sp[c] = is_signed ? octav_group<scalar_t, true>(xp, group_len, n_groups, inner, c, ip,
                                                      octav_const, max_iters, rtol)
                        : octav_group<scalar_t, false>(xp, group_len, n_groups, inner, c, ip,
                                                       octav_const, max_iters, rtol);
    };
    for_each_group(n_groups, solve);
  });
  return scale;
}

}  // namespace octav::cpu
