// The learned-scale (LSQ) backward on CUDA (octav_kernels.reference.fake_quantize_lsq_backward):
// the estimator's grad_x (SPEC §3) and, per group, the scale's gradient
// coefficient * sum grad * (n - x / step inside the grid's range, n outside), n the integer
// level, summed in float64. Three shapes (issue 29: a block per group of 32 left 7 of 8 warps
// idle): long contiguous groups are cut into slices that a block reduces one at a time; groups
// of at most 1024 elements get a warp each (shuffle reduction, no barrier); strided groups
// (inner < 16, e.g. per channel along dim 1) get a thread per group and slice, adjacent groups on
// adjacent threads, so loads coalesce. The slices' partials are added per group in order after.
// The forward is fake_quantize's.
#include "kernels.h"
#include "common.cuh"

#include <algorithm>

namespace octav::cuda {
namespace {

// Element k of group c: writes its grad_x and returns its term grad * (n - v or n) of the scale's
// gradient (0 where frozen or the group's step is 0: no gradient).
template <typename T, bool Signed, int M>
__device__ __forceinline__ double lsq_element(const T* __restrict__ grad, const T* __restrict__ x,
                                              T* __restrict__ gx,
                                              const bool* __restrict__ frozen, int64_t k,
                                              float s, float step, float lo, float hi) {
  const float g = static_cast<float>(grad[k]), v0 = static_cast<float>(x[k]);
  const bool off = frozen != nullptr && frozen[k];
  gx[k] = static_cast<T>(off ? 0.0f : estimator_grad(g, v0, s, Signed, static_cast<Grad>(M)));
  if (step == 0.0f || off) return 0.0;
  const float v = __fdiv_rn(v0, step);
  const float n = clamp_level(round_half_even(v), lo, hi);
  const float d = (v >= lo && v <= hi) ? __fsub_rn(n, v) : n;
  return __dmul_rn(static_cast<double>(g), static_cast<double>(d));
}

// Long contiguous groups: item b = c * splits + split is elements [split * per, (split + 1) *
// per) of group c; a block writes their grad_x and the float64 sum of their terms (blocks loop
// over items; the partials are added per group in order after).
template <typename T, bool Signed, int M>
__global__ void __launch_bounds__(kThreads)
    lsq_backward_kernel(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ gx,
                        const float* __restrict__ scale, const bool* __restrict__ frozen,
                        double* __restrict__ partials, int64_t outer, int64_t n_groups,
                        int64_t inner, int64_t splits, int64_t per, float L, float lo,
                        float hi) {
  __shared__ double scratch[kThreads / kWarp];
  const int64_t len = outer * inner;
  for (int64_t item = blockIdx.x; item < n_groups * splits; item += gridDim.x) {
    const int64_t c = item / splits, split = item % splits;
    const float s = scale[c], step = __fdiv_rn(s, L);
    const int64_t end = std::min(len, (split + 1) * per);
    double acc = 0.0;
    for (int64_t j = split * per + threadIdx.x; j < end; j += blockDim.x) {
      acc = __dadd_rn(acc, lsq_element<T, Signed, M>(grad, x, gx, frozen,
                                                     group_offset(j, c, outer, n_groups, inner),
                                                     s, step, lo, hi));
    }
    for (int d = kWarp / 2; d > 0; d /= 2) acc += __shfl_down_sync(0xffffffffu, acc, d);
    if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      double total = 0.0;
      for (int w = 0; w < kThreads / kWarp; ++w) total += scratch[w];
      partials[item] = total;
    }
    __syncthreads();  // the next item reuses the scratch
  }
}

// Short contiguous groups (<= kLsqWarpMax elements: blocks of 32 or 128, short rows): a warp per
// group, its lanes striding over the group, a shuffle reduction, no barrier; partials[c].
template <typename T, bool Signed, int M>
__global__ void __launch_bounds__(kThreads)
    lsq_backward_warp_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                             T* __restrict__ gx, const float* __restrict__ scale,
                             const bool* __restrict__ frozen, double* __restrict__ partials,
                             int64_t outer, int64_t n_groups, int64_t inner, float L, float lo,
                             float hi) {
  const int64_t len = outer * inner;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / kWarp);
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarp) + threadIdx.x / kWarp;
       c < n_groups; c += warps) {  // the same trip count for every lane of a warp
    const float s = scale[c], step = __fdiv_rn(s, L);
    double acc = 0.0;
    for (int64_t j = lane; j < len; j += kWarp) {
      acc = __dadd_rn(acc, lsq_element<T, Signed, M>(grad, x, gx, frozen,
                                                     group_offset(j, c, outer, n_groups, inner),
                                                     s, step, lo, hi));
    }
    for (int d = kWarp / 2; d > 0; d /= 2) acc += __shfl_down_sync(0xffffffffu, acc, d);
    if (lane == 0) partials[c] = acc;
  }
}

// Strided groups (inner < kLsqStrided, outer > 1: per-channel scales along dim 1 of [N, C],
// where a group's elements lie n_groups * inner apart): a thread per (group, slice), the groups
// on adjacent threads so that a warp reads adjacent groups' elements together (coalesced).
// Thread t = split * n_groups + c sums elements [split * per, (split + 1) * per) of group c in
// order; partials[c * splits + split].
template <typename T, bool Signed, int M>
__global__ void __launch_bounds__(kThreads)
    lsq_backward_strided_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                T* __restrict__ gx, const float* __restrict__ scale,
                                const bool* __restrict__ frozen, double* __restrict__ partials,
                                int64_t outer, int64_t n_groups, int64_t inner, int64_t splits,
                                int64_t per, float L, float lo, float hi) {
  const int64_t len = outer * inner;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
       t < n_groups * splits; t += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t split = t / n_groups, c = t - split * n_groups;
    const float s = scale[c], step = __fdiv_rn(s, L);
    const int64_t end = std::min(len, (split + 1) * per);
    double acc = 0.0;
    for (int64_t j = split * per; j < end; ++j) {
      acc = __dadd_rn(acc, lsq_element<T, Signed, M>(grad, x, gx, frozen,
                                                     group_offset(j, c, outer, n_groups, inner),
                                                     s, step, lo, hi));
    }
    partials[c * splits + split] = acc;
  }
}

constexpr int64_t kLsqWarpMax = 1024;  // group elements a warp takes (32 per lane)
constexpr int64_t kLsqStrided = 16;    // inner below which a strided group is read by threads

}  // namespace

std::tuple<at::Tensor, at::Tensor> Kernels::fake_quantize_lsq_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, const Groups& g,
    const Levels& lv, bool is_signed, Grad mode, const at::Tensor& frozen, double coefficient) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n_groups = g.n_groups, len = g.len();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // The kernel: strided groups by threads, short contiguous ones by warps, long ones by blocks.
  enum class Shape { kBlock, kWarp, kStrided };
  const Shape shape = g.inner < kLsqStrided && g.outer > 1 ? Shape::kStrided
                      : len <= kLsqWarpMax                 ? Shape::kWarp
                                                           : Shape::kBlock;
  // Slices per group: enough to fill the GPU (about 4 blocks, or 2048 threads, per SM), none
  // shorter than 4 elements per thread of a block (16 per thread of the strided kernel).
  int64_t splits = 1;
  if (shape == Shape::kBlock) {
    splits = std::max<int64_t>(1, std::min<int64_t>((len + kThreads * 4 - 1) / (kThreads * 4),
                                                    (4 * sms + n_groups - 1) / n_groups));
  } else if (shape == Shape::kStrided) {
    splits = std::max<int64_t>(1, std::min<int64_t>((len + 15) / 16,
                                                    (2048 * sms + n_groups - 1) / n_groups));
  }
  const int64_t per = (len + splits - 1) / splits;
  auto partials = at::empty({n_groups, splits}, x.options().dtype(at::kDouble));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t items = shape == Shape::kBlock  ? n_groups * splits
                        : shape == Shape::kWarp ? (n_groups + kThreads / kWarp - 1) /
                                                      (kThreads / kWarp)
                                                : (n_groups * splits + kThreads - 1) / kThreads;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(items, int64_t{1} << 30));
  const bool* frozen_p = frozen.numel() > 0 ? frozen.data_ptr<bool>() : nullptr;
  const float L = static_cast<float>(lv.L), lo = static_cast<float>(lv.lo),
              hi = static_cast<float>(lv.hi);
  OCTAV_DISPATCH_FLOATING(x.scalar_type(), "lsq_backward", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = gx.data_ptr<scalar_t>();
    const float* sp = scale.data_ptr<float>();
    double* pp = partials.data_ptr<double>();
    dispatch_bool(is_signed, [&](auto sg) {
      constexpr bool S = decltype(sg)::value;
      auto launch = [&](auto m) {
        constexpr int M = decltype(m)::value;
        if (shape == Shape::kWarp) {
          lsq_backward_warp_kernel<scalar_t, S, M><<<blocks, kThreads, 0, stream>>>(
              gp, xp, op, sp, frozen_p, pp, g.outer, n_groups, g.inner, L, lo, hi);
        } else if (shape == Shape::kStrided) {
          lsq_backward_strided_kernel<scalar_t, S, M><<<blocks, kThreads, 0, stream>>>(
              gp, xp, op, sp, frozen_p, pp, g.outer, n_groups, g.inner, splits, per, L, lo, hi);
        } else {
          lsq_backward_kernel<scalar_t, S, M><<<blocks, kThreads, 0, stream>>>(
              gp, xp, op, sp, frozen_p, pp, g.outer, n_groups, g.inner, splits, per, L, lo, hi);
        }
      };
      if (mode == kSte) {
        launch(std::integral_constant<int, kSte>{});
      } else if (mode == kPwl) {
        launch(std::integral_constant<int, kPwl>{});
      } else {
        launch(std::integral_constant<int, kMad>{});
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gx, (partials.sum(1) * coefficient).to(at::kFloat)};
}

}  // namespace octav::cuda
