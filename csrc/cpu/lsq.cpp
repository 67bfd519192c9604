// The learned-scale (LSQ) backward on the CPU (octav_kernels.reference.fake_quantize_lsq_backward):
// the estimator's grad_x (SPEC §3) and, per group, the scale's gradient
// coefficient * sum grad * (n - x / step inside the grid's range, n outside), n the integer
// level, summed in float64. The forward is fake_quantize's (csrc/ops.h).
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

constexpr int64_t kLsqChunk = 1 << 14;  // elements per partial sum of a learned scale's gradient

// The estimator's grad_x of elements [begin, end) of group c (a contiguous run of one row),
// and the float64 sum of their terms grad * (n - v or n) of the scale's gradient
// (reference.fake_quantize_lsq_backward).
template <typename T>
double lsq_run(const T* gp, const T* xp, T* op, const bool* frozen_p, int64_t begin,
               int64_t end, float sf, const Levels& lv, bool is_signed, Grad mode) {
  using C = at::opmath_type<T>;
  const float fl = static_cast<float>(lv.L), flo = static_cast<float>(lv.lo),
              fhi = static_cast<float>(lv.hi);
  const float step = sf / fl;
  const C s = static_cast<C>(sf);
  double acc = 0.0;
  for (int64_t k = begin; k < end; ++k) {
    const C gk = static_cast<C>(gp[k]);
    const bool off = frozen_p != nullptr && frozen_p[k];
    op[k] = static_cast<T>(off ? C(0)
                               : estimator_grad(gk, static_cast<C>(xp[k]), s, is_signed, mode));
    if (step != 0.0f && !off) {
      const float v = static_cast<float>(xp[k]) / step;
      const float n = clamp_level(round_half_even(v), flo, fhi);
      const float d = (v >= flo && v <= fhi) ? n - v : n;
      acc += static_cast<double>(gk) * static_cast<double>(d);
    }
  }
  return acc;
}

}  // namespace

// Per group, the elements are cut into fixed chunks of kLsqChunk whose partial sums are added
// in chunk order, whether the groups run in parallel (many groups) or the chunks of each group
// do (few groups): the same bits for any thread count.
std::tuple<at::Tensor, at::Tensor> Kernels::fake_quantize_lsq_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, const Groups& g,
    const Levels& lv, bool is_signed, Grad mode, const at::Tensor& frozen, double coefficient) {
  auto gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto gs = at::empty({g.n_groups}, x.options().dtype(at::kFloat));
  const bool* frozen_p = frozen.numel() > 0 ? frozen.data_ptr<bool>() : nullptr;
  const float* sp = scale.data_ptr<float>();
  float* gsp = gs.data_ptr<float>();
  const int64_t len = g.len(), n_chunks = (len + kLsqChunk - 1) / kLsqChunk;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lsq_bwd", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = gx.data_ptr<scalar_t>();
    // Group c's elements [b, e) (in (outer, inner) order): grad_x and their partial sum.
    auto chunk = [&](int64_t c, int64_t b, int64_t e) {
      double acc = 0.0;
      for (int64_t j = b; j < e;) {
        const int64_t o = j / g.inner, i = j % g.inner, n = std::min(g.inner - i, e - j);
        const int64_t at = (o * g.n_groups + c) * g.inner + i;
        acc += lsq_run(gp, xp, op, frozen_p, at, at + n, sp[c], lv, is_signed, mode);
        j += n;
      }
      return acc;
    };
    auto finish = [&](int64_t c, const double* partial) {
      double total = 0.0;
      for (int64_t k = 0; k < n_chunks; ++k) total += partial[k];
      gsp[c] = static_cast<float>(total * coefficient);
    };
    if (g.n_groups >= at::get_num_threads()) {
      at::parallel_for(0, g.n_groups, 1, [&](int64_t b, int64_t e) {
        std::vector<double> partial(n_chunks);
        for (int64_t c = b; c < e; ++c) {
          for (int64_t k = 0; k < n_chunks; ++k) {
            partial[k] = chunk(c, k * kLsqChunk, std::min(len, (k + 1) * kLsqChunk));
          }
          finish(c, partial.data());
        }
      });
      return;
    }
    std::vector<double> partial(n_chunks);
    for (int64_t c = 0; c < g.n_groups; ++c) {
      at::parallel_for(0, n_chunks, 1, [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) {
          partial[k] = chunk(c, k * kLsqChunk, std::min(len, (k + 1) * kLsqChunk));
        }
      });
      finish(c, partial.data());
    }
  });
  return {gx, gs};
}

}  // namespace octav::cpu
