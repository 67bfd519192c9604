// Autograd of the differentiable octav ops, registered for the Autograd dispatch key (every
// device): C++ autograd Functions that call the ops below autograd, so the dispatcher then picks
// the device's kernel. The formulas are those of octav_kernels/ops/ (which registers them in
// Python only where this extension is missing).
//
// fake_quantize / octav_fake_quantize (SPEC §3): STE keeps nothing for the backward, MAD keeps
// x and the scale, PWL runs the _packed forward and keeps its bit-packed mask (1 bit per
// element); without a gradient to compute, the op's kernel runs directly (no graph node).
// fake_quantize_lsq (a learned scale): keeps x and the scale; the gradient goes to both.
// dampening_error: keeps w, the scale and the frozen mask; the gradient goes to w only.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "args.h"

namespace octav {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptInt = std::optional<int64_t>;
using OptTensor = std::optional<at::Tensor>;

using FakeQuantizeSig = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool, OptInt,
                                   OptInt, c10::string_view, bool);
using PackedSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     int64_t, bool, OptInt, OptInt, bool);
using BackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                               OptInt, OptInt, c10::string_view, const OptTensor&);
using PwlBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&);
using FusedSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, bool, OptInt,
                                                    OptInt, c10::string_view, const OptTensor&,
                                                    bool, const OptTensor&);
using FusedPackedSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, int64_t, bool, OptInt, OptInt, const OptTensor&, bool, const OptTensor&);
using LsqSig = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool, OptInt, OptInt,
                          c10::string_view, bool, bool);
using LsqBackwardSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool, OptInt, OptInt,
    c10::string_view, bool, bool, const OptTensor&);
using DampeningSig = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool, OptInt,
                                OptInt, bool, const OptTensor&);
using DampeningBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        int64_t, bool, OptInt, OptInt, bool, const OptTensor&);

// The op octav::<name>, looked up at its first use (the schemas are defined in Python).
template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

const c10::TypedOperatorHandle<FakeQuantizeSig>& fake_quantize_op() {
  static const auto handle = op<FakeQuantizeSig>("octav::fake_quantize");
  return handle;
}
const c10::TypedOperatorHandle<PackedSig>& packed_op() {
  static const auto handle = op<PackedSig>("octav::_fake_quantize_packed");
  return handle;
}
const c10::TypedOperatorHandle<FusedSig>& fused_op() {
  static const auto handle = op<FusedSig>("octav::octav_fake_quantize");
  return handle;
}
const c10::TypedOperatorHandle<FusedPackedSig>& fused_packed_op() {
  static const auto handle = op<FusedPackedSig>("octav::_octav_fake_quantize_packed");
  return handle;
}
const c10::TypedOperatorHandle<LsqSig>& lsq_op() {
  static const auto handle = op<LsqSig>("octav::fake_quantize_lsq");
  return handle;
}
const c10::TypedOperatorHandle<DampeningSig>& dampening_op() {
  static const auto handle = op<DampeningSig>("octav::dampening_error");
  return handle;
}

bool needs_grad(const at::Tensor& x) { return at::GradMode::is_enabled() && x.requires_grad(); }

// What the estimator's backward needs, saved by the forwards below.
void save_estimator(AutogradContext* ctx, Grad mode, bool is_signed, OptInt dim,
                    OptInt group_size) {
  ctx->saved_data["mode"] = static_cast<int64_t>(mode);
  ctx->saved_data["signed"] = is_signed;
  ctx->saved_data["dim"] = dim;
  ctx->saved_data["group_size"] = group_size;
}

// d(loss)/dx by the estimator (SPEC §3): STE passes grad_out; PWL from the packed mask; MAD from
// x and the scale.
at::Tensor estimator_grad(AutogradContext* ctx, const at::Tensor& grad_out) {
  const auto mode = static_cast<Grad>(ctx->saved_data["mode"].toInt());
  if (mode == kSte) return grad_out;
  const auto saved = ctx->get_saved_variables();
  if (mode == kPwl) {
    static const auto pwl = op<PwlBackwardSig>("octav::_pwl_backward_packed");
    return pwl.call(grad_out, saved[0]);
  }
  static const auto backward = op<BackwardSig>("octav::fake_quantize_backward");
  return backward.call(grad_out, saved[0], saved[1], ctx->saved_data["signed"].toBool(),
                       ctx->saved_data["dim"].toOptional<int64_t>(),
                       ctx->saved_data["group_size"].toOptional<int64_t>(), "mad",
                       std::nullopt);
}

struct FakeQuantize : torch::autograd::Function<FakeQuantize> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            int64_t bits, bool is_signed, OptInt dim, OptInt group_size,
                            c10::string_view grad, bool narrow) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const Grad mode = check_grad(grad);
    save_estimator(ctx, mode, is_signed, dim, group_size);
    if (mode == kPwl) {
      auto [y, mask] = packed_op().call(x, scale, bits, is_signed, dim, group_size, narrow);
      ctx->save_for_backward({mask});
      return y;
    }
    at::Tensor y = fake_quantize_op().call(x, scale, bits, is_signed, dim, group_size, grad,
                                           narrow);
    if (mode == kMad) ctx->save_for_backward({x, scale});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {estimator_grad(ctx, grads[0]), {}, {}, {}, {}, {}, {}, {}};
  }
};

at::Tensor fake_quantize_autograd(const at::Tensor& x, const at::Tensor& scale, int64_t bits,
                                  bool is_signed, OptInt dim, OptInt group_size,
                                  c10::string_view grad, bool narrow) {
  if (!needs_grad(x)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return fake_quantize_op().call(x, scale, bits, is_signed, dim, group_size, grad, narrow);
  }
  return FakeQuantize::apply(x, scale, bits, is_signed, dim, group_size, grad, narrow);
}

struct OctavFakeQuantize : torch::autograd::Function<OctavFakeQuantize> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t bits,
                               bool is_signed, OptInt dim, OptInt group_size,
                               c10::string_view grad, const OptTensor& init, bool narrow,
                               const OptTensor& importance) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const Grad mode = check_grad(grad);
    save_estimator(ctx, mode, is_signed, dim, group_size);
    at::Tensor y, scale;
    if (mode == kPwl) {
      at::Tensor mask;
      std::tie(y, scale, mask) =
          fused_packed_op().call(x, bits, is_signed, dim, group_size, init, narrow, importance);
      ctx->save_for_backward({mask});
    } else {
      std::tie(y, scale) = fused_op().call(x, bits, is_signed, dim, group_size, grad, init,
                                           narrow, importance);
      if (mode == kMad) ctx->save_for_backward({x, scale});
    }
    ctx->mark_non_differentiable({scale});
    return {y, scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {estimator_grad(ctx, grads[0]), {}, {}, {}, {}, {}, {}, {}, {}};
  }
};

std::tuple<at::Tensor, at::Tensor> octav_fake_quantize_autograd(
    const at::Tensor& x, int64_t bits, bool is_signed, OptInt dim, OptInt group_size,
    c10::string_view grad, const OptTensor& init, bool narrow, const OptTensor& importance) {
  if (!needs_grad(x)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return fused_op().call(x, bits, is_signed, dim, group_size, grad, init, narrow, importance);
  }
  const auto out = OctavFakeQuantize::apply(x, bits, is_signed, dim, group_size, grad, init,
                                            narrow, importance);
  return {out[0], out[1]};
}

// The learned-scale op: keeps x and the scale; its backward gives both their gradients.
struct FakeQuantizeLsq : torch::autograd::Function<FakeQuantizeLsq> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            int64_t bits, bool is_signed, OptInt dim, OptInt group_size,
                            c10::string_view grad, bool narrow, bool grad_scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["signed"] = is_signed;
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["grad"] = std::string(grad);
    ctx->saved_data["narrow"] = narrow;
    ctx->saved_data["grad_scale"] = grad_scale;
    ctx->save_for_backward({x, scale});
    return lsq_op().call(x, scale, bits, is_signed, dim, group_size, grad, narrow, grad_scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward = op<LsqBackwardSig>("octav::fake_quantize_lsq_backward");
    const auto saved = ctx->get_saved_variables();
    const std::string grad = ctx->saved_data["grad"].toStringRef();
    auto [grad_x, grad_s] = backward.call(
        grads[0], saved[0], saved[1], ctx->saved_data["bits"].toInt(),
        ctx->saved_data["signed"].toBool(), ctx->saved_data["dim"].toOptional<int64_t>(),
        ctx->saved_data["group_size"].toOptional<int64_t>(), grad,
        ctx->saved_data["narrow"].toBool(), ctx->saved_data["grad_scale"].toBool(),
        std::nullopt);
    return {grad_x, grad_s.to(saved[1].scalar_type()), {}, {}, {}, {}, {}, {}, {}};
  }
};

at::Tensor fake_quantize_lsq_autograd(const at::Tensor& x, const at::Tensor& scale,
                                      int64_t bits, bool is_signed, OptInt dim,
                                      OptInt group_size, c10::string_view grad, bool narrow,
                                      bool grad_scale) {
  if (!(needs_grad(x) || needs_grad(scale))) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return lsq_op().call(x, scale, bits, is_signed, dim, group_size, grad, narrow, grad_scale);
  }
  return FakeQuantizeLsq::apply(x, scale, bits, is_signed, dim, group_size, grad, narrow,
                                grad_scale);
}

struct DampeningError : torch::autograd::Function<DampeningError> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& w, const at::Tensor& scale,
                            int64_t bits, bool is_signed, OptInt dim, OptInt group_size,
                            bool narrow, const OptTensor& frozen) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["signed"] = is_signed;
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["narrow"] = narrow;
    ctx->save_for_backward({w, scale, frozen.value_or(at::Tensor())});
    return dampening_op().call(w, scale, bits, is_signed, dim, group_size, narrow, frozen);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward = op<DampeningBackwardSig>("octav::dampening_backward");
    const auto saved = ctx->get_saved_variables();
    const OptTensor frozen = saved[2].defined() ? OptTensor(saved[2]) : std::nullopt;
    const at::Tensor grad_w = backward.call(
        grads[0], saved[0], saved[1], ctx->saved_data["bits"].toInt(),
        ctx->saved_data["signed"].toBool(), ctx->saved_data["dim"].toOptional<int64_t>(),
        ctx->saved_data["group_size"].toOptional<int64_t>(), ctx->saved_data["narrow"].toBool(),
        frozen);
    return {grad_w, {}, {}, {}, {}, {}, {}, {}};
  }
};

at::Tensor dampening_error_autograd(const at::Tensor& w, const at::Tensor& scale, int64_t bits,
                                    bool is_signed, OptInt dim, OptInt group_size, bool narrow,
                                    const OptTensor& frozen) {
  if (!needs_grad(w)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return dampening_op().call(w, scale, bits, is_signed, dim, group_size, narrow, frozen);
  }
  return DampeningError::apply(w, scale, bits, is_signed, dim, group_size, narrow, frozen);
}

}  // namespace

TORCH_LIBRARY_IMPL(octav, Autograd, m) {
  m.impl("fake_quantize", &fake_quantize_autograd);
  m.impl("octav_fake_quantize", &octav_fake_quantize_autograd);
  m.impl("fake_quantize_lsq", &fake_quantize_lsq_autograd);
  m.impl("dampening_error", &dampening_error_autograd);
}

}  // namespace octav
