#include "args.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>
#include <string>

namespace octav {
namespace {

// Python's spelling of a dtype (torch.float32, ...), so messages read as the Python checks'.
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string shape_of(at::IntArrayRef sizes) {
  std::ostringstream s;
  s << sizes;
  return s.str();
}

}  // namespace

void check_x(const at::Tensor& x, const char* name) {
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble,
                   name, " must be float32, float16 or bfloat16 (float64 on CPU), got ",
                   dtype_name(t));
  TORCH_CHECK_TYPE(t != at::kDouble || x.device().is_cpu(), name,
                   ": float64 is supported on CPU only, got ", x.device().str());
}

void check_bits(int64_t bits) {
  TORCH_CHECK_VALUE(bits >= 2 && bits <= 16, "bits must be in 2..16, got ", bits);
}

void check_narrow(bool narrow, bool is_signed) {
  TORCH_CHECK_VALUE(!narrow || is_signed,
                    "narrow=True applies to signed grids only; got signed=False");
}

void check_iteration(int64_t max_iters, double rtol) {
  TORCH_CHECK_VALUE(max_iters >= 0, "max_iters must be >= 0, got ", max_iters);
  TORCH_CHECK_VALUE(max_iters <= kMaxIters, "max_iters must be <= ", kMaxIters, ", got ",
                    max_iters);
  TORCH_CHECK_VALUE(rtol >= 0.0 && std::isfinite(rtol), "rtol must be finite and >= 0, got ",
                    rtol);
}

Grad check_grad(std::string_view grad) {
  if (grad == "ste") return kSte;
  if (grad == "pwl") return kPwl;
  if (grad == "mad") return kMad;
  TORCH_CHECK_VALUE(false, "grad must be one of ('ste', 'pwl', 'mad'), got '", std::string(grad),
                    "'");
}

Groups groups(const at::Tensor& x, std::optional<int64_t> dim,
              std::optional<int64_t> group_size) {
  const auto shape = x.sizes();
  const int64_t nd = x.dim();
  TORCH_CHECK_VALUE(!(dim && group_size),
                    "give at most one of dim (per channel) and group_size (per block)");
  Groups g;
  if (dim) {
    TORCH_CHECK_VALUE(nd > 0 && *dim >= -nd && *dim < nd, "dim=", *dim,
                      " is out of range for a tensor of shape ", shape_of(shape));
    const int64_t d = (*dim + nd) % nd;
    g.outer = 1;
    for (int64_t i = 0; i < d; ++i) g.outer *= shape[i];
    g.inner = 1;
    for (int64_t i = d + 1; i < nd; ++i) g.inner *= shape[i];
    g.n_groups = shape[d];
    g.scale_shape = {shape[d]};
    g.dim = d;
    return g;
  }
  if (group_size) {
    const int64_t G = *group_size;
    TORCH_CHECK_VALUE(G > 0, "group_size must be positive, got ", G);
    TORCH_CHECK_VALUE(nd > 0 && shape[nd - 1] % G == 0, "group_size=", G,
                      " must divide the last dim of a tensor of shape ", shape_of(shape));
    g.n_groups = x.numel() / G;
    g.inner = G;
    g.scale_shape = std::vector<int64_t>(shape.begin(), shape.end() - 1);
    g.scale_shape.push_back(shape[nd - 1] / G);
    g.group_size = G;
    return g;
  }
  g.inner = x.numel();
  return g;
}

Groups check_common(const at::Tensor& x, int64_t bits, bool is_signed,
                    std::optional<int64_t> dim, std::optional<int64_t> group_size, bool narrow) {
  check_x(x);
  check_bits(bits);
  check_narrow(narrow, is_signed);
  return groups(x, dim, group_size);
}

at::Tensor check_scale(const at::Tensor& scale, const at::Tensor& x, const Groups& g,
                       const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(scale.scalar_type()), name,
                   " must be a floating tensor, got ", dtype_name(scale.scalar_type()));
  TORCH_CHECK_VALUE(scale.sizes() == at::IntArrayRef(g.scale_shape), name, " must have shape ",
                    shape_of(g.scale_shape), " for this granularity, got ",
                    shape_of(scale.sizes()));
  TORCH_CHECK_VALUE(scale.device() == x.device(), name, " is on ", scale.device().str(),
                    " but x is on ", x.device().str());
  return scale.to(at::kFloat).contiguous();
}

at::Tensor check_init(const std::optional<at::Tensor>& init, const at::Tensor& x,
                      const Groups& g) {
  if (!init) return at::empty({0}, x.options().dtype(at::kFloat));
  return check_scale(*init, x, g, "init");
}

at::Tensor check_importance(const std::optional<at::Tensor>& importance, const at::Tensor& x) {
  if (!importance) return at::Tensor();
  const at::Tensor& h = *importance;
  TORCH_CHECK_TYPE(h.scalar_type() == at::kFloat, "importance must be torch.float32, got ",
                   dtype_name(h.scalar_type()));
  TORCH_CHECK_VALUE(h.device() == x.device(), "importance is on ", h.device().str(),
                    " but x is on ", x.device().str());
  bool broadcasts = h.dim() <= x.dim();
  for (int64_t i = 1; broadcasts && i <= h.dim(); ++i) {
    const int64_t a = h.size(h.dim() - i), b = x.size(x.dim() - i);
    broadcasts = a == b || a == 1;
  }
  TORCH_CHECK_VALUE(broadcasts, "importance of shape ", shape_of(h.sizes()),
                    " does not broadcast to x's shape ", shape_of(x.sizes()));
  TORCH_CHECK_VALUE(h.numel() == 0 || (at::isfinite(h) & h.ge(0)).all().item<bool>(),
                    "importance must be finite and >= 0 (it weights each element's squared "
                    "error); it has a negative, NaN or inf entry");
  return h;
}

at::Tensor importance_layout(const at::Tensor& importance, const at::Tensor& x, const Groups& g,
                             bool fallback) {
  if (!importance.defined()) return importance;
  const at::Tensor full = importance.expand(x.sizes());
  // Whether importance is constant along x's dim d (it broadcasts there).
  auto broadcast_along = [&](int64_t d) {
    const int64_t k = d - (x.dim() - importance.dim());
    return k < 0 || importance.size(k) == 1;
  };
  at::Tensor rows;
  if (g.dim) {
    rows = broadcast_along(*g.dim) ? full.select(*g.dim, 0).reshape({1, g.len()})
                                   : full.movedim(*g.dim, 0).reshape({g.n_groups, g.len()});
  } else if (g.group_size) {
    bool leading = true;  // constant along every dim but the last: one row per block position
    for (int64_t d = 0; d + 1 < x.dim(); ++d) leading = leading && broadcast_along(d);
    const int64_t per_row = x.size(-1) / *g.group_size;
    rows = leading && x.dim() > 0
               ? full.reshape({-1, x.size(-1)}).select(0, 0).reshape({per_row, *g.group_size})
               : full.reshape({g.n_groups, *g.group_size});
  } else {
    rows = full.reshape({1, g.len()});
  }
  rows = rows.contiguous();
  if (!fallback) return rows;
  const at::Tensor uninformed = rows.sum(1).eq(0);  // no cancellation: h >= 0
  if (!uninformed.any().item<bool>()) return rows;
  return at::where(uninformed.unsqueeze(1), at::ones({}, rows.options()), rows);
}

void check_state(const at::Tensor& t, const at::Tensor& x, at::ScalarType dtype,
                 const char* name, bool contiguous) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype_name(dtype), ", got ",
                   dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.sizes() == x.sizes() && t.device() == x.device(), name, " (",
                    shape_of(t.sizes()), " on ", t.device().str(),
                    ") must have x's shape and device (", shape_of(x.sizes()), " on ",
                    x.device().str(), ")");
  TORCH_CHECK_VALUE(!contiguous || t.is_contiguous(), name,
                    " must be contiguous (it is updated in place)");
}

at::Tensor check_frozen(const std::optional<at::Tensor>& frozen, const at::Tensor& x) {
  if (!frozen) return at::empty({0}, x.options().dtype(at::kBool));
  check_state(*frozen, x, at::kBool, "frozen");
  return frozen->contiguous();
}

void check_candidates(const at::Tensor& cand, const at::Tensor& x, const Groups& g,
                      int64_t most) {
  TORCH_CHECK_VALUE(at::isFloatingType(cand.scalar_type()) && cand.dim() == 2 &&
                        cand.size(0) == g.n_groups && cand.size(1) >= 1 &&
                        cand.size(1) <= most && cand.device() == x.device(),
                    "cand must be a floating [n_groups, K] tensor on x's device with 1 <= K <= ",
                    most, " (n_groups = ", g.n_groups, "), got ", dtype_name(cand.scalar_type()),
                    " of shape ", shape_of(cand.sizes()), " on ", cand.device().str());
}

void check_matches(const at::Tensor& grad, const at::Tensor& x, const char* grad_name,
                   const char* x_name) {
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes() && grad.device() == x.device(), grad_name, " (",
                    shape_of(grad.sizes()), " on ", grad.device().str(), ") must match ", x_name,
                    " (", shape_of(x.sizes()), " on ", x.device().str(), ")");
}

void check_tracked(const at::Tensor& x, int64_t bits, bool is_signed, const at::Tensor& last_int,
                   const at::Tensor& last_dir, const at::Tensor& frozen,
                   const at::Tensor& osc_freq, const at::Tensor& int_ema, double momentum,
                   const at::Tensor& freeze_threshold) {
  const int64_t most = is_signed ? 8 : 7;
  TORCH_CHECK_VALUE(bits <= most, "oscillation tracking keeps integer levels in int8: bits must "
                    "be <= ", most, " for a ", is_signed ? "signed" : "unsigned", " grid, got ",
                    bits);
  const std::pair<const at::Tensor*, const char*> state[] = {
      {&last_int, "last_int"}, {&last_dir, "last_dir"}, {&frozen, "frozen"},
      {&osc_freq, "osc_freq"}, {&int_ema, "int_ema"}};
  const at::ScalarType dtypes[] = {at::kChar, at::kChar, at::kBool, at::kFloat, at::kFloat};
  for (int i = 0; i < 5; ++i) check_state(*state[i].first, x, dtypes[i], state[i].second, true);
  TORCH_CHECK_VALUE(momentum > 0.0 && momentum <= 1.0, "momentum must be in (0, 1], got ",
                    momentum);
  TORCH_CHECK_VALUE(freeze_threshold.scalar_type() == at::kFloat && freeze_threshold.dim() == 0 &&
                        freeze_threshold.device() == x.device(),
                    "freeze_threshold must be a 0-dim float32 tensor on ", x.device().str(),
                    ", got ", dtype_name(freeze_threshold.scalar_type()), " of shape ",
                    shape_of(freeze_threshold.sizes()), " on ", freeze_threshold.device().str());
  // The kernels update the five in place and assume they do not alias.
  for (int i = 0; i < 5; ++i) {
    for (int j = i + 1; j < 5; ++j) {
      const at::Tensor &a = *state[i].first, &b = *state[j].first;
      if (a.numel() == 0 || b.numel() == 0) continue;
      const auto* a0 = static_cast<const char*>(a.data_ptr());
      const auto* b0 = static_cast<const char*>(b.data_ptr());
      const bool overlap = a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
      TORCH_CHECK_VALUE(!overlap, a0 <= b0 ? state[i].second : state[j].second, " and ",
                        a0 <= b0 ? state[j].second : state[i].second,
                        " share memory; each state tensor needs its own");
    }
  }
}

Levels levels(int64_t bits, bool is_signed, bool narrow) {
  if (!is_signed) return {int64_t{1} << bits, 0, (int64_t{1} << bits) - 1};
  const int64_t half = int64_t{1} << (bits - 1);
  if (narrow) return {half - 1, -(half - 1), half - 1};
  return {half, -half, half - 1};
}

double lsq_coefficient(int64_t group_len, const Levels& lv, bool grad_scale) {
  const double factor =
      grad_scale ? 1.0 / std::sqrt(static_cast<double>(group_len) * static_cast<double>(lv.hi))
                 : 1.0;
  return factor / static_cast<double>(lv.L);
}

double octav_constant(int64_t bits, bool is_signed, bool narrow) {
  const double L = static_cast<double>(levels(bits, is_signed, narrow).L);
  return 1.0 / (12.0 * L * L);
}

bool transposed_for_kernels(const Groups& g) {
  constexpr int64_t kMinRun = 16;
  return g.dim.has_value() && g.inner < kMinRun && g.n_groups > 1;
}

std::pair<at::Tensor, Groups> reduction_layout(const at::Tensor& x, const Groups& g) {
  if (!transposed_for_kernels(g)) return {x.contiguous(), g};
  Groups t = g;
  t.inner = g.outer * g.inner;
  t.outer = 1;
  t.dim = 0;
  return {x.movedim(*g.dim, 0).contiguous(), t};
}

at::Tensor zeros_like_scale(const at::Tensor& x, const Groups& g, at::ScalarType dtype) {
  return at::zeros(g.scale_shape, x.options().dtype(dtype));
}

}  // namespace octav
