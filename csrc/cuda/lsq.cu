// The learned-scale (LSQ) backward on CUDA (octav_kernels.reference.fake_quantize_lsq_backward):
// the estimator's grad_x (SPEC §3) and, per group, the scale's gradient
// coefficient * sum grad * (n - x / step inside the grid's range, n outside), n the integer
// level, summed in float64: each group is cut into slices, a block reduces one slice at a time,
// and the slices' partials are added per group in order after. The forward is fake_quantize's.
#include "kernels.h"
#include "common.cuh"

#include <algorithm>

namespace octav::cuda {
namespace {

// The learned-scale backward (reference.fake_quantize_lsq_backward): item b = c * splits + split
// is elements [split * per, (split + 1) * per) of group c; a block writes their grad_x and the
// float64 sum of their terms grad * (n - v or n) of the scale's gradient (blocks loop over
// items; the partials are added per group in order after).
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
      const int64_t o = outer == 1 ? 0 : j / inner;
      const int64_t k = (o * n_groups + c) * inner + (j - o * inner);
      const float g = static_cast<float>(grad[k]), v0 = static_cast<float>(x[k]);
      const bool off = frozen != nullptr && frozen[k];
      gx[k] = static_cast<T>(off ? 0.0f
                                 : estimator_grad(g, v0, s, Signed, static_cast<Grad>(M)));
      if (step != 0.0f && !off) {
        const float v = __fdiv_rn(v0, step);
        const float n = clamp_level(round_half_even(v), lo, hi);
        const float d = (v >= lo && v <= hi) ? __fsub_rn(n, v) : n;
        acc = __dadd_rn(acc, __dmul_rn(static_cast<double>(g), static_cast<double>(d)));
      }
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

}  // namespace

std::tuple<at::Tensor, at::Tensor> Kernels::fake_quantize_lsq_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, const Groups& g,
    const Levels& lv, bool is_signed, Grad mode, const at::Tensor& frozen, double coefficient) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n_groups = g.n_groups, len = g.len();
  // Enough slices to fill the GPU, none shorter than 4 elements per thread.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t splits = std::max<int64_t>(
      1, std::min<int64_t>((len + kThreads * 4 - 1) / (kThreads * 4),
                           (4 * sms + n_groups - 1) / n_groups));
  const int64_t per = (len + splits - 1) / splits;
  auto partials = at::empty({n_groups, splits}, x.options().dtype(at::kDouble));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto blocks =
      static_cast<unsigned>(std::min<int64_t>(n_groups * splits, int64_t{1} << 30));
  const bool* frozen_p = frozen.numel() > 0 ? frozen.data_ptr<bool>() : nullptr;
  OCTAV_DISPATCH_FLOATING(x.scalar_type(), "lsq_backward", [&] {
    dispatch_bool(is_signed, [&](auto sg) {
      constexpr bool S = decltype(sg)::value;
      auto launch = [&](auto kernel) {
        kernel<<<blocks, kThreads, 0, stream>>>(
            grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),
            scale.data_ptr<float>(), frozen_p, partials.data_ptr<double>(), g.outer, n_groups,
            g.inner, splits, per, static_cast<float>(lv.L), static_cast<float>(lv.lo),
            static_cast<float>(lv.hi));
      };
      if (mode == kSte) {
        launch(lsq_backward_kernel<scalar_t, S, kSte>);
      } else if (mode == kPwl) {
        launch(lsq_backward_kernel<scalar_t, S, kPwl>);
      } else {
        launch(lsq_backward_kernel<scalar_t, S, kMad>);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gx, (partials.sum(1) * coefficient).to(at::kFloat)};
}

}  // namespace octav::cuda
