// CPU kernels of octav_kernels. Every tensor argument is contiguous and already validated by
// octav_kernels/ops.py; a tensor is seen as [outer, n_groups, inner] and group c is x[:, c, :]
// (see octav_kernels/_args.py: Groups).
#pragma once

#include <torch/extension.h>

#include <tuple>

namespace octav::cpu {

// (S_out float32, n_in int64, n_out int64) per group at the given float32 scale [n_groups].
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_sums(const at::Tensor& x,
                                                           const at::Tensor& scale,
                                                           int64_t outer, int64_t n_groups,
                                                           int64_t inner, bool is_signed);

// OCTAV fixed point per group; init is an empty tensor (cold start) or float32 [n_groups].
at::Tensor octav_scale(const at::Tensor& x, const at::Tensor& init, int64_t outer,
                       int64_t n_groups, int64_t inner, bool is_signed, double octav_const,
                       int64_t max_iters, double rtol);

// q = clamp(round(x / step), lo, hi) * step with step = s / L; q = 0 where s == 0.
at::Tensor fake_quantize(const at::Tensor& x, const at::Tensor& scale, int64_t outer,
                         int64_t n_groups, int64_t inner, int64_t L, int64_t lo, int64_t hi);

// fake_quantize that also updates the oscillation state of every element in place (int8
// last_int and last_dir, bool frozen, float32 osc_freq and int_ema, all contiguous like x) and
// outputs frozen elements at their kept level (octav_kernels.reference.fake_quantize_tracked);
// freeze_threshold is a 0-dim float32 tensor.
at::Tensor fake_quantize_tracked(const at::Tensor& x, const at::Tensor& scale, int64_t outer,
                                 int64_t n_groups, int64_t inner, int64_t L, int64_t lo,
                                 int64_t hi, at::Tensor& last_int, at::Tensor& last_dir,
                                 at::Tensor& frozen, at::Tensor& osc_freq, at::Tensor& int_ema,
                                 double momentum, const at::Tensor& freeze_threshold,
                                 bool update);

// The oscillation-dampening term (q(w) - clamp(w, lo * step, hi * step))**2 per element, float32,
// 0 where the bool mask frozen is set (empty: no mask); and its gradient for a float32 grad,
// in w's dtype (octav_kernels.reference.dampening_error / dampening_backward).
at::Tensor dampening_error(const at::Tensor& w, const at::Tensor& scale, int64_t outer,
                           int64_t n_groups, int64_t inner, int64_t L, int64_t lo, int64_t hi,
                           const at::Tensor& frozen);
at::Tensor dampening_backward(const at::Tensor& grad, const at::Tensor& w,
                              const at::Tensor& scale, int64_t outer, int64_t n_groups,
                              int64_t inner, int64_t L, int64_t lo, int64_t hi,
                              const at::Tensor& frozen);

// grad_x for grad mode 0 = ste, 1 = pwl, 2 = mad (SPEC §3), 0 where the bool mask frozen is
// set (an empty frozen: no mask). grad has x's dtype.
at::Tensor fake_quantize_backward(const at::Tensor& grad, const at::Tensor& x,
                                  const at::Tensor& scale, int64_t outer, int64_t n_groups,
                                  int64_t inner, bool is_signed, int64_t mode,
                                  const at::Tensor& frozen);

// OCTAV scale polished against the empirical MSE (octav_kernels.reference.refine_search:
// `rounds` the candidate counts of its narrowing passes, coarse spread factor `spread`), float32
// [n_groups].
at::Tensor refine_scale(const at::Tensor& x, const at::Tensor& scale, int64_t outer,
                        int64_t n_groups, int64_t inner, int64_t L, int64_t lo, int64_t hi,
                        bool is_signed, const std::vector<int64_t>& rounds, double spread);

// One pass of that search: the squared error of the SPEC §1 quantizer per group at each of K
// candidate scales cand [n_groups, K] (float32, K <= 16), float64 [n_groups, K]
// (octav_kernels.reference.candidate_sse).
at::Tensor candidate_sse(const at::Tensor& x, const at::Tensor& cand, int64_t outer,
                         int64_t n_groups, int64_t inner, int64_t L, int64_t lo, int64_t hi);

}  // namespace octav::cpu
