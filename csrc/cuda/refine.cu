// Squared quantization error of candidate scales on the GPU: one pass of the refinement search
// (octav_kernels/reference.py: refine_search, whose candidate updates run as torch ops on the
// device, so there is no host sync).
//
// sse[g, k] = sum over group g of (q(x; cand[g, k]) - x)^2, q the float32 quantizer of
// fake_quantize; each difference and square in double without contraction (the same terms as
// the reference and the CPU kernel), summed in double. Block (g, split) reduces one slice of
// group g for all candidates at once; the slices' partials are added by a torch sum.
// With importance h (SPEC §2.1: float32 in x's layout, fallback applied), each term is
// double(h) * (d * d), the reference's float64 term; a template parameter, so the unweighted
// kernel is unchanged.
//
// FP64 work: where |x| <= 2 * (hi * step) (all but outliers, NaN and inf), q - x is exact in
// float (Sterbenz, as in the C++ pass: q == 0, or x within a factor 2 of q), so d is that float
// difference widened, and d * d is exact in double: an FMA adds it with the same rounding as a
// product and a sum. Two FP64-pipe instructions per element and candidate (a conversion and
// the FMA) instead of four (two conversions, a difference, a product) plus the sum: on GPUs with
// 1/64-rate FP64 (L4, A10, RTX) the pass stays FP64-bound (README, "GPU performance").
#include "common.cuh"
#include "kernels.h"

namespace octav::cuda {
namespace {

constexpr int kMaxCandidates = 8;  // of one _candidate_sse pass (csrc/ops.h; the search uses <= 6)
constexpr int kSseBlock = 256;

template <typename T, bool W>
__global__ void __launch_bounds__(kSseBlock)
    candidate_sse_kernel(const T* __restrict__ x, const float* __restrict__ h,
                         const float* __restrict__ cand, double* __restrict__ partials,
                         int64_t outer, int64_t n_groups, int64_t inner, int64_t splits,
                         int64_t per, int K, float L, float lo, float hi) {
  __shared__ double scratch[kSseBlock / kWarp][kMaxCandidates];
  const int64_t len = outer * inner;
  for (int64_t item = blockIdx.x; item < n_groups * splits; item += gridDim.x) {
    const int64_t g = item / splits, split = item % splits;
    float step[kMaxCandidates], bound[kMaxCandidates];
    double acc[kMaxCandidates];
#pragma unroll
    for (int k = 0; k < kMaxCandidates; ++k) {  // unused slots repeat the last candidate
      step[k] = __fdiv_rn(cand[g * K + min(k, K - 1)], L);
      // 2 * the clip level quantize() forms (hi * step, the same rounding): |x| within it makes
      // q - x exact in float.
      bound[k] = __fmul_rn(2.0f, __fmul_rn(hi, step[k]));
      acc[k] = 0.0;
    }
    const int64_t end = std::min(len, (split + 1) * per);
    for (int64_t e = split * per + threadIdx.x; e < end; e += blockDim.x) {
      const int64_t at = group_offset(e, g, outer, n_groups, inner);
      const float v = static_cast<float>(x[at]);
      double hd = 1.0;
      if constexpr (W) hd = static_cast<double>(h[at]);
#pragma unroll
      for (int k = 0; k < kMaxCandidates; ++k) {
        if (k >= K) break;  // uniform across the block
        const float q = quantize(v, step[k], lo, hi);
        // False for NaN, and for inf unless bound overflowed to inf (then q is inf too, and
        // the float difference is the double one: inf or NaN).
        const bool exact = fabsf(v) <= bound[k];
        const double d = exact ? static_cast<double>(__fsub_rn(q, v))
                               : __dsub_rn(static_cast<double>(q), static_cast<double>(v));
        if constexpr (W) {
          acc[k] = __dadd_rn(acc[k], __dmul_rn(hd, __dmul_rn(d, d)));
        } else if (exact) {
          acc[k] = __fma_rn(d, d, acc[k]);  // d * d exact: the same sum as product, then add
        } else {
          acc[k] = __dadd_rn(acc[k], __dmul_rn(d, d));
        }
      }
    }
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
    for (int k = 0; k < kMaxCandidates; ++k) {
      for (int d = kWarp / 2; d > 0; d /= 2) acc[k] += __shfl_down_sync(0xffffffffu, acc[k], d);
      if (lane == 0) scratch[warp][k] = acc[k];
    }
    __syncthreads();
    if (threadIdx.x < K) {
      double total = 0.0;
      for (int w = 0; w < kSseBlock / kWarp; ++w) total += scratch[w][threadIdx.x];
      partials[item * K + threadIdx.x] = total;  // int64: n_groups * splits * K may pass 2^32
    }
    __syncthreads();  // the next item reuses the scratch
  }
}

}  // namespace

at::Tensor Kernels::candidate_sse(const at::Tensor& x, const at::Tensor& cand, const Groups& g,
                                  const Levels& lv, const at::Tensor& h) {
  const int K = static_cast<int>(cand.size(1));  // 1..kMaxCandidates (csrc/ops.h checks it)
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t outer = g.outer, n_groups = g.n_groups, inner = g.inner, len = g.len();
  // Enough slices to fill the GPU, none shorter than 8 elements per thread.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t splits = std::max<int64_t>(
      1, std::min<int64_t>((len + kSseBlock * 8 - 1) / (kSseBlock * 8),
                           (4 * sms + n_groups - 1) / n_groups));
  const int64_t per = (len + splits - 1) / splits;
  auto partials = at::empty({n_groups, splits, K}, x.options().dtype(at::kDouble));
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(n_groups * splits, int64_t{1} << 30));
  const float* hp = h.defined() ? h.data_ptr<float>() : nullptr;
  OCTAV_DISPATCH_FLOATING(x.scalar_type(), "candidate_sse", [&] {
    dispatch_bool(hp != nullptr, [&](auto wt) {
      candidate_sse_kernel<scalar_t, decltype(wt)::value><<<blocks, kSseBlock, 0, stream>>>(
          x.data_ptr<scalar_t>(), hp, cand.data_ptr<float>(), partials.data_ptr<double>(),
          outer, n_groups, inner, splits, per, K, static_cast<float>(lv.L),
          static_cast<float>(lv.lo), static_cast<float>(lv.hi));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials.sum(1);
}

}  // namespace octav::cuda
