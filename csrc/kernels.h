// The interface every device's kernels implement (cpu::Kernels, cuda::Kernels; csrc/ops.h says
// what each computes and calls them): declared once here, as the static members of each
// device's struct, each named after the op it serves (fake_quantize also serves
// _fake_quantize_packed with a mask). Tensors are checked and contiguous, seen as
// [outer, n_groups, inner] (Groups); scales are float32 [n_groups]. A device with a fused
// OCTAV + fake-quant kernel sets kFusedOctav and adds octav_fake_quantize (cuda/kernels.h).
// The reductions take the importance h of SPEC §2.1 (args.h importance_layout: a [P, len] table,
// group c weighted by row c % P; fallback applied except for masked_sums), or an undefined
// tensor for the unweighted op; weighted masked_sums returns its three sums as float32.
#pragma once

#include <tuple>

#include "args.h"

// clang-format off
#define OCTAV_KERNELS_INTERFACE \
  static at::Tensor fake_quantize(const at::Tensor& x, const at::Tensor& scale, const Groups& g, \
                                  const Levels& lv, bool is_signed, at::Tensor* mask); \
  static at::Tensor fake_quantize_backward(const at::Tensor& grad, const at::Tensor& x, \
                                           const at::Tensor& scale, const Groups& g, \
                                           bool is_signed, Grad mode, \
                                           const at::Tensor& frozen); \
  static at::Tensor pwl_backward_packed(const at::Tensor& grad, const at::Tensor& mask); \
  static std::tuple<at::Tensor, at::Tensor> fake_quantize_lsq_backward( \
      const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, const Groups& g, \
      const Levels& lv, bool is_signed, Grad mode, const at::Tensor& frozen, \
      double coefficient); \
  static at::Tensor fake_quantize_tracked(const at::Tensor& x, const at::Tensor& scale, \
                                          const Groups& g, const Levels& lv, \
                                          at::Tensor& last_int, at::Tensor& last_dir, \
                                          at::Tensor& frozen, at::Tensor& osc_freq, \
                                          at::Tensor& int_ema, double momentum, \
                                          const at::Tensor& freeze_threshold, bool update); \
  static at::Tensor dampening_error(const at::Tensor& w, const at::Tensor& scale, \
                                    const Groups& g, const Levels& lv, \
                                    const at::Tensor& frozen); \
  static at::Tensor dampening_backward(const at::Tensor& grad, const at::Tensor& w, \
                                       const at::Tensor& scale, const Groups& g, \
                                       const Levels& lv, const at::Tensor& frozen); \
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_sums(const at::Tensor& x, \
                                                                    const at::Tensor& scale, \
                                                                    const Groups& g, \
                                                                    bool is_signed, \
                                                                    const at::Tensor& h); \
  static at::Tensor octav_scale(const at::Tensor& x, const at::Tensor& init, const Groups& g, \
                                bool is_signed, double octav_const, int64_t max_iters, \
                                double rtol, const at::Tensor& h); \
  static at::Tensor candidate_sse(const at::Tensor& x, const at::Tensor& cand, const Groups& g, \
                                  const Levels& lv, const at::Tensor& h);
// clang-format on
