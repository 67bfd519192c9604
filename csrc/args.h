// Argument checks and the group layout of the C++ entry points (CPU and CUDA), the twin of
// octav_kernels/_args.py: the same rules and the same messages, raised as ValueError
// (TORCH_CHECK_VALUE) or TypeError (TORCH_CHECK_TYPE) naming the argument (SPEC §4, §6).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <vector>

namespace octav {

// How a tensor splits into OCTAV groups: viewed contiguous as [outer, n_groups, inner], group c
// is x[:, c, :]. Per tensor (1, 1, numel); per channel dim d (prod(shape[:d]), shape[d],
// prod(shape[d+1:])); per block of G along the last dim (1, numel / G, G).
struct Groups {
  int64_t outer = 1, n_groups = 1, inner = 0;
  std::vector<int64_t> scale_shape;
  std::optional<int64_t> dim;  // normalized to 0..x.dim()-1
  std::optional<int64_t> group_size;

  int64_t len() const { return outer * inner; }  // elements per group
};

// The integer grid of SPEC §1: levels lo..hi, step = s / L.
struct Levels {
  int64_t L, lo, hi;
};

enum Grad : int64_t { kSte = 0, kPwl = 1, kMad = 2 };

// The largest max_iters any backend accepts (the recursion converges in tens of steps).
constexpr int64_t kMaxIters = 1 << 16;
// The default OCTAV iteration, the one octav_fake_quantize runs (octav_kernels/_args.py:
// DEFAULT_MAX_ITERS, DEFAULT_RTOL).
constexpr int64_t kDefaultMaxIters = 32;
constexpr double kDefaultRtol = 1e-6;

void check_x(const at::Tensor& x, const char* name = "x");
void check_bits(int64_t bits);
void check_narrow(bool narrow, bool is_signed);
void check_iteration(int64_t max_iters, double rtol);
Grad check_grad(std::string_view grad);

// Validates dim / group_size against x.
Groups groups(const at::Tensor& x, std::optional<int64_t> dim, std::optional<int64_t> group_size);
// x, bits, the grid and the granularity: the checks every op with bits starts with.
Groups check_common(const at::Tensor& x, int64_t bits, bool is_signed,
                    std::optional<int64_t> dim, std::optional<int64_t> group_size, bool narrow);

// A floating tensor of g.scale_shape on x's device, as the kernels read it: contiguous float32
// [n_groups] (a copy only where needed).
at::Tensor check_scale(const at::Tensor& scale, const at::Tensor& x, const Groups& g,
                       const char* name = "scale");
// An optional init: an empty tensor when absent (cold start), else as check_scale.
at::Tensor check_init(const std::optional<at::Tensor>& init, const at::Tensor& x,
                      const Groups& g);
// The optional importance of the weighted ops (SPEC §2.1): float32 on x's device, broadcastable
// to x's shape, finite and >= 0 (one device synchronization); undefined when absent.
at::Tensor check_importance(const std::optional<at::Tensor>& importance, const at::Tensor& x);
// The importance as the reductions read it: a contiguous float32 [P, len] table, group c's
// weights in row c % P, in the order the group's elements are read (outer, inner: the order of
// reduction_layout and of octav_kernels._args.as_rows). P = 1 when the importance is the same
// for every group (a [in] importance of a [out, in] weight per channel), in / G for blocks of G
// of a [.., in] weight, else n_groups. With fallback, groups whose importance sums to 0 are
// weighted 1 everywhere. Undefined stays undefined (no importance).
at::Tensor importance_layout(const at::Tensor& importance, const at::Tensor& x, const Groups& g,
                             bool fallback);
// A per-element state tensor: x's shape and device, `dtype`, contiguous where `contiguous`.
void check_state(const at::Tensor& t, const at::Tensor& x, at::ScalarType dtype,
                 const char* name, bool contiguous = false);
// The optional bool frozen mask, contiguous; empty when absent.
at::Tensor check_frozen(const std::optional<at::Tensor>& frozen, const at::Tensor& x);
// Candidate scales of the refinement search: a floating [n_groups, K] tensor on x's device,
// 1 <= K <= most.
void check_candidates(const at::Tensor& cand, const at::Tensor& x, const Groups& g,
                      int64_t most);
// grad (an incoming gradient) must have x's shape and device.
void check_matches(const at::Tensor& grad, const at::Tensor& x, const char* grad_name,
                   const char* x_name);

// The oscillation-tracking arguments of fake_quantize_tracked: integer levels that fit int8,
// five contiguous, disjoint state tensors of x's shape, momentum in (0, 1], a 0-dim float32
// freeze_threshold on x's device.
void check_tracked(const at::Tensor& x, int64_t bits, bool is_signed, const at::Tensor& last_int,
                   const at::Tensor& last_dir, const at::Tensor& frozen,
                   const at::Tensor& osc_freq, const at::Tensor& int_ema, double momentum,
                   const at::Tensor& freeze_threshold);

Levels levels(int64_t bits, bool is_signed, bool narrow);
// The factor of a learned scale's summed gradient: 1 / L (step = s / L), times LSQ's gradient
// scale 1 / sqrt(N hi) (N = group_len elements per group) when grad_scale.
double lsq_coefficient(int64_t group_len, const Levels& lv, bool grad_scale);
// step^2 / (12 s^2) = 1 / (12 L^2): 4^-B / 3 signed, 4^-B / 12 unsigned, narrow 1/(12 (2^(B-1)-1)^2).
double octav_constant(int64_t bits, bool is_signed, bool narrow);

// Reductions (masked sums, OCTAV, refinement) read per-channel groups whose runs are shorter
// than this from one transposed copy whose rows are the groups (per channel along a trailing
// dim has runs of 1).
bool transposed_for_kernels(const Groups& g);
// x contiguous in the reductions' layout, and that layout (g itself unless transposed).
std::pair<at::Tensor, Groups> reduction_layout(const at::Tensor& x, const Groups& g);

// Zero-filled tensors of the scale's shape: the result for an empty x.
at::Tensor zeros_like_scale(const at::Tensor& x, const Groups& g, at::ScalarType dtype);

}  // namespace octav
