// The octav ops' C++ entry points, written once for every device: each checks its arguments
// (args.h: SPEC §6's TypeError / ValueError naming the argument), returns early on an empty
// input, lays the tensor out as the kernels read it, and calls the device's kernels K
// (cpu::Kernels, cuda::Kernels), named after the op. csrc/ops.cpp registers register_ops<K> for
// each device's dispatch key; the kernels are in csrc/<device>/<family>.{cpp,cu}. The schemas
// are defined in octav_kernels/ops/. Decisions above the kernels live here: e.g. whether
// octav_fake_quantize runs a fused kernel or is composed of two.
//
// K is the device's struct of kernels (csrc/kernels.h: OCTAV_KERNELS_INTERFACE); the reductions
// (masked_sums, octav_scale, candidate_sse) take the reductions' layout (reduction_layout).
#pragma once

#include <torch/library.h>

#include <optional>
#include <tuple>

#include "args.h"

namespace octav::ops {

using OptInt = std::optional<int64_t>;
using OptTensor = std::optional<at::Tensor>;

inline at::Tensor empty_like_x(const at::Tensor& x) { return at::empty(x.sizes(), x.options()); }

inline at::Tensor empty_mask(const at::Tensor& x) {
  return at::empty({(x.numel() + 31) / 32}, x.options().dtype(at::kInt));
}

// ------------------------------------------------------------------------------ fake-quant

template <typename K>
at::Tensor fake_quantize(const at::Tensor& x, const at::Tensor& scale, int64_t bits,
                         bool is_signed, OptInt dim, OptInt group_size, c10::string_view grad,
                         bool narrow) {
  const Groups g = check_common(x, bits, is_signed, dim, group_size, narrow);
  check_grad(grad);
  const at::Tensor s = check_scale(scale, x, g);
  if (x.numel() == 0) return empty_like_x(x);
  return K::fake_quantize(x.contiguous(), s, g, levels(bits, is_signed, narrow), is_signed,
                          nullptr);
}

template <typename K>
std::tuple<at::Tensor, at::Tensor> fake_quantize_packed(const at::Tensor& x,
                                                        const at::Tensor& scale, int64_t bits,
                                                        bool is_signed, OptInt dim,
                                                        OptInt group_size, bool narrow) {
  const Groups g = check_common(x, bits, is_signed, dim, group_size, narrow);
  const at::Tensor s = check_scale(scale, x, g);
  if (x.numel() == 0) return {empty_like_x(x), empty_mask(x)};
  at::Tensor mask;
  at::Tensor y = K::fake_quantize(x.contiguous(), s, g, levels(bits, is_signed, narrow),
                                  is_signed, &mask);
  return {y, mask};
}

template <typename K>
at::Tensor pwl_backward_packed(const at::Tensor& grad_out, const at::Tensor& mask) {
  check_x(grad_out, "grad_out");
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kInt && mask.dim() == 1 &&
                        mask.numel() == (grad_out.numel() + 31) / 32 &&
                        mask.device() == grad_out.device(),
                    "mask must be the int32 [(numel + 31) / 32] PWL mask of grad_out's tensor");
  if (grad_out.numel() == 0) return empty_like_x(grad_out);
  return K::pwl_backward_packed(grad_out.contiguous(), mask.contiguous());
}

template <typename K>
at::Tensor fake_quantize_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                  const at::Tensor& scale, bool is_signed, OptInt dim,
                                  OptInt group_size, c10::string_view grad,
                                  const OptTensor& frozen) {
  check_x(x);
  const Groups g = groups(x, dim, group_size);
  const Grad mode = check_grad(grad);
  const at::Tensor s = check_scale(scale, x, g);
  check_x(grad_out, "grad_out");
  check_matches(grad_out, x, "grad_out", "x");
  const at::Tensor fr = check_frozen(frozen, x);
  if (x.numel() == 0) return empty_like_x(x);
  return K::fake_quantize_backward(grad_out.to(x.scalar_type()).contiguous(), x.contiguous(), s,
                                   g, is_signed, mode, fr);
}

// The learned-scale (LSQ) op: fake_quantize's values; its backward also reduces the scale's
// gradient per group (octav_kernels/reference.py: fake_quantize_lsq_backward).
template <typename K>
at::Tensor fake_quantize_lsq(const at::Tensor& x, const at::Tensor& scale, int64_t bits,
                             bool is_signed, OptInt dim, OptInt group_size, c10::string_view grad,
                             bool narrow, bool grad_scale) {
  return fake_quantize<K>(x, scale, bits, is_signed, dim, group_size, grad, narrow);
}

template <typename K>
std::tuple<at::Tensor, at::Tensor> fake_quantize_lsq_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& scale, int64_t bits,
    bool is_signed, OptInt dim, OptInt group_size, c10::string_view grad, bool narrow,
    bool grad_scale, const OptTensor& frozen) {
  const Groups g = check_common(x, bits, is_signed, dim, group_size, narrow);
  const Grad mode = check_grad(grad);
  const at::Tensor s = check_scale(scale, x, g);
  check_x(grad_out, "grad_out");
  check_matches(grad_out, x, "grad_out", "x");
  const at::Tensor fr = check_frozen(frozen, x);
  if (x.numel() == 0) return {empty_like_x(x), zeros_like_scale(x, g, at::kFloat)};
  const Levels lv = levels(bits, is_signed, narrow);
  auto [grad_x, grad_s] =
      K::fake_quantize_lsq_backward(grad_out.to(x.scalar_type()).contiguous(), x.contiguous(), s,
                                    g, lv, is_signed, mode, fr,
                                    lsq_coefficient(g.len(), lv, grad_scale));
  return {grad_x, grad_s.view(g.scale_shape)};
}

// ------------------------------------------------------------------------------ oscillation

template <typename K>
at::Tensor fake_quantize_tracked(const at::Tensor& x, const at::Tensor& scale, int64_t bits,
                                 bool is_signed, OptInt dim, OptInt group_size, bool narrow,
                                 at::Tensor& last_int, at::Tensor& last_dir, at::Tensor& frozen,
                                 at::Tensor& osc_freq, at::Tensor& int_ema, double momentum,
                                 const at::Tensor& freeze_threshold, bool update) {
  const Groups g = check_common(x, bits, is_signed, dim, group_size, narrow);
  const at::Tensor s = check_scale(scale, x, g);
  check_tracked(x, bits, is_signed, last_int, last_dir, frozen, osc_freq, int_ema, momentum,
                freeze_threshold);
  if (x.numel() == 0) return empty_like_x(x);
  return K::fake_quantize_tracked(x.contiguous(), s, g, levels(bits, is_signed, narrow), last_int,
                                  last_dir, frozen, osc_freq, int_ema, momentum,
                                  freeze_threshold, update);
}

template <typename K>
at::Tensor dampening_error(const at::Tensor& w, const at::Tensor& scale, int64_t bits,
                           bool is_signed, OptInt dim, OptInt group_size, bool narrow,
                           const OptTensor& frozen) {
  const Groups g = check_common(w, bits, is_signed, dim, group_size, narrow);
  const at::Tensor s = check_scale(scale, w, g);
  const at::Tensor fr = check_frozen(frozen, w);
  if (w.numel() == 0) return at::empty(w.sizes(), w.options().dtype(at::kFloat));
  return K::dampening_error(w.contiguous(), s, g, levels(bits, is_signed, narrow), fr);
}

template <typename K>
at::Tensor dampening_backward(const at::Tensor& grad, const at::Tensor& w,
                              const at::Tensor& scale, int64_t bits, bool is_signed, OptInt dim,
                              OptInt group_size, bool narrow, const OptTensor& frozen) {
  const Groups g = check_common(w, bits, is_signed, dim, group_size, narrow);
  const at::Tensor s = check_scale(scale, w, g);
  const at::Tensor fr = check_frozen(frozen, w);
  check_matches(grad, w, "grad", "w");
  if (w.numel() == 0) return empty_like_x(w);
  return K::dampening_backward(grad.to(at::kFloat).contiguous(), w.contiguous(), s, g,
                               levels(bits, is_signed, narrow), fr);
}

// ------------------------------------------------------------------------------ OCTAV

// The importance table (args.h importance_layout) as K reads it: the [P, len] table itself, or
// where K::kImportanceAtOffsets (the CUDA kernels) a contiguous tensor in the reductions'
// [outer, n_groups, inner] layout (gr), read at x's offsets: group c's row c % P repeated.
template <typename K>
at::Tensor importance_for(const at::Tensor& table, const Groups& gr) {
  if constexpr (K::kImportanceAtOffsets) {
    if (table.defined()) {
      const int64_t rows = table.size(0);
      return table.view({rows, gr.outer, gr.inner})
          .permute({1, 0, 2})
          .repeat({1, gr.n_groups / rows, 1})
          .contiguous();
    }
  }
  return table;
}

inline Groups check_octav(const at::Tensor& x, int64_t bits, bool is_signed, OptInt dim,
                          OptInt group_size, const OptTensor& init, bool narrow,
                          at::Tensor& init_flat) {
  const Groups g = check_common(x, bits, is_signed, dim, group_size, narrow);
  init_flat = check_init(init, x, g);
  return g;
}

template <typename K>
at::Tensor octav_scale(const at::Tensor& x, int64_t bits, bool is_signed, OptInt dim,
                       OptInt group_size, const OptTensor& init, int64_t max_iters, double rtol,
                       bool narrow, const OptTensor& importance) {
  at::Tensor init_flat;
  const Groups g = check_octav(x, bits, is_signed, dim, group_size, init, narrow, init_flat);
  check_iteration(max_iters, rtol);
  const at::Tensor h = check_importance(importance, x);
  if (x.numel() == 0) return zeros_like_scale(x, g, at::kFloat);
  const auto [xr, gr] = reduction_layout(x, g);
  return K::octav_scale(xr, init_flat, gr, is_signed, octav_constant(bits, is_signed, narrow),
                        max_iters, rtol, importance_for<K>(importance_layout(h, x, g, true), gr))
      .view(g.scale_shape);
}

template <typename K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_sums(const at::Tensor& x,
                                                           const at::Tensor& scale,
                                                           bool is_signed, OptInt dim,
                                                           OptInt group_size,
                                                           const OptTensor& importance) {
  check_x(x);
  const Groups g = groups(x, dim, group_size);
  const at::Tensor s = check_scale(scale, x, g);
  const at::Tensor h = check_importance(importance, x);
  if (x.numel() == 0) {
    auto zeros = zeros_like_scale(x, g, h.defined() ? at::kFloat : at::kLong);
    return {zeros.to(at::kFloat), zeros, zeros.clone()};
  }
  const auto [xr, gr] = reduction_layout(x, g);
  const at::Tensor hr = importance_for<K>(importance_layout(h, x, g, false), gr);
  auto [s_out, n_in, n_out] = K::masked_sums(xr, s, gr, is_signed, hr);
  return {s_out.view(g.scale_shape), n_in.view(g.scale_shape), n_out.view(g.scale_shape)};
}

// The OCTAV scale (the default iteration) and the fake-quant with it, with the packed PWL mask
// if with_mask: the device's fused kernel where it has one (K::kFusedOctav) and the groups are
// read in x's own layout; otherwise composed: the scale, then the fake-quant of the original
// layout with it (one more read of x).
// h: the checked importance (undefined: none), laid out here.
template <typename K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_octav(const at::Tensor& x,
                                                           const at::Tensor& init,
                                                           const Groups& g, int64_t bits,
                                                           bool is_signed, bool narrow,
                                                           bool with_mask, const at::Tensor& h) {
  const at::Tensor hr = importance_layout(h, x, g, true);  // x's own layout unless transposed
  if constexpr (K::kFusedOctav) {
    if (!transposed_for_kernels(g)) {
      return K::octav_fake_quantize(x, init, g, bits, is_signed, narrow, with_mask,
                                    importance_for<K>(hr, g));
    }
  }
  const auto [xr, gr] = reduction_layout(x, g);
  const at::Tensor scale = K::octav_scale(xr, init, gr, is_signed,
                                          octav_constant(bits, is_signed, narrow),
                                          kDefaultMaxIters, kDefaultRtol,
                                          importance_for<K>(hr, gr));
  at::Tensor mask = at::empty({0}, x.options().dtype(at::kInt));
  at::Tensor y = K::fake_quantize(x.contiguous(), scale, g, levels(bits, is_signed, narrow),
                                  is_signed, with_mask ? &mask : nullptr);
  return {y, scale, mask};
}

template <typename K>
std::tuple<at::Tensor, at::Tensor> octav_fake_quantize(const at::Tensor& x, int64_t bits,
                                                       bool is_signed, OptInt dim,
                                                       OptInt group_size, c10::string_view grad,
                                                       const OptTensor& init, bool narrow,
                                                       const OptTensor& importance) {
  at::Tensor init_flat;
  const Groups g = check_octav(x, bits, is_signed, dim, group_size, init, narrow, init_flat);
  check_grad(grad);
  const at::Tensor h = check_importance(importance, x);
  if (x.numel() == 0) return {empty_like_x(x), zeros_like_scale(x, g, at::kFloat)};
  auto [y, scale, mask] = fused_octav<K>(x, init_flat, g, bits, is_signed, narrow, false, h);
  return {y, scale.view(g.scale_shape)};
}

template <typename K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> octav_fake_quantize_packed(
    const at::Tensor& x, int64_t bits, bool is_signed, OptInt dim, OptInt group_size,
    const OptTensor& init, bool narrow, const OptTensor& importance) {
  at::Tensor init_flat;
  const Groups g = check_octav(x, bits, is_signed, dim, group_size, init, narrow, init_flat);
  const at::Tensor h = check_importance(importance, x);
  if (x.numel() == 0) {
    return {empty_like_x(x), zeros_like_scale(x, g, at::kFloat), empty_mask(x)};
  }
  auto [y, scale, mask] = fused_octav<K>(x, init_flat, g, bits, is_signed, narrow, true, h);
  return {y, scale.view(g.scale_shape), mask};
}

// ------------------------------------------------------------------------------ refinement

constexpr int64_t kMaxCandidates = 8;  // of one _candidate_sse pass, on every backend

template <typename K>
at::Tensor candidate_sse(const at::Tensor& x, const at::Tensor& cand, int64_t bits,
                         bool is_signed, OptInt dim, OptInt group_size, bool narrow,
                         const OptTensor& importance) {
  const Groups g = check_common(x, bits, is_signed, dim, group_size, narrow);
  check_candidates(cand, x, g, kMaxCandidates);
  const at::Tensor h = check_importance(importance, x);
  if (x.numel() == 0) return at::zeros(cand.sizes(), cand.options().dtype(at::kDouble));
  const auto [xr, gr] = reduction_layout(x, g);
  return K::candidate_sse(xr, cand.to(at::kFloat).contiguous(), gr,
                          levels(bits, is_signed, narrow),
                          importance_for<K>(importance_layout(h, x, g, true), gr));
}

// The whole refinement search (devices whose kernels run it: K::refine_scale).
template <typename K>
at::Tensor refine_scale(const at::Tensor& x, const at::Tensor& scale, int64_t bits,
                        bool is_signed, OptInt dim, OptInt group_size, bool narrow,
                        const OptTensor& importance) {
  const Groups g = check_common(x, bits, is_signed, dim, group_size, narrow);
  const at::Tensor s = check_scale(scale, x, g);
  const at::Tensor h = check_importance(importance, x);
  if (x.numel() == 0) return zeros_like_scale(x, g, at::kFloat);
  const auto [xr, gr] = reduction_layout(x, g);
  return K::refine_scale(xr, s, gr, levels(bits, is_signed, narrow), is_signed,
                         importance_for<K>(importance_layout(h, x, g, true), gr))
      .view(g.scale_shape);
}

// Registers the ops every device implements with K's kernels (refine_scale: see ops.cpp).
template <typename K>
void register_ops(torch::Library& m) {
  m.impl("fake_quantize", &fake_quantize<K>);
  m.impl("_fake_quantize_packed", &fake_quantize_packed<K>);
  m.impl("_pwl_backward_packed", &pwl_backward_packed<K>);
  m.impl("fake_quantize_backward", &fake_quantize_backward<K>);
  m.impl("fake_quantize_lsq", &fake_quantize_lsq<K>);
  m.impl("fake_quantize_lsq_backward", &fake_quantize_lsq_backward<K>);
  m.impl("fake_quantize_tracked", &fake_quantize_tracked<K>);
  m.impl("dampening_error", &dampening_error<K>);
  m.impl("dampening_backward", &dampening_backward<K>);
  m.impl("octav_scale", &octav_scale<K>);
  m.impl("masked_sums", &masked_sums<K>);
  m.impl("octav_fake_quantize", &octav_fake_quantize<K>);
  m.impl("_octav_fake_quantize_packed", &octav_fake_quantize_packed<K>);
  m.impl("_candidate_sse", &candidate_sse<K>);
}

}  // namespace octav::ops
