// The CUDA kernels of the octav ops (built when a CUDA toolkit and a CUDA build of torch are
// found), the same contract as cpu/kernels.h (csrc/ops.h says what each computes): octav.cu
// (masked sums, the OCTAV solvers, the fused OCTAV + fake-quant), fake_quant.cu (forward with the
// packed PWL mask, backward, tracked forward, dampening), lsq.cu (the learned-scale backward),
// refine.cu (one pass of the refinement search; the search itself is octav_kernels.drivers').
// float32, float16 and bfloat16. Host declarations only: included by the host compiler
// (csrc/ops.cpp) too.
#pragma once

#include "../kernels.h"

namespace octav::cuda {

struct Kernels {
  OCTAV_KERNELS_INTERFACE
  // The fused OCTAV + fake-quant in one solver launch (octav.cu), for groups in x's own layout
  // (ops.h composes it for a transposed reduction layout). The default iteration
  // (kDefaultMaxIters, kDefaultRtol); y, the scale and, with with_mask, the packed PWL mask.
  static constexpr bool kFusedOctav = true;
  // The kernels read an importance at x's offsets (ops.h importance_for: the table expanded).
  static constexpr bool kImportanceAtOffsets = true;
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> octav_fake_quantize(
      const at::Tensor& x, const at::Tensor& init, const Groups& g, int64_t bits, bool is_signed,
      bool narrow, bool with_mask, const at::Tensor& h);
};

// The dynamic shared memory the OCTAV block-per-group kernel may use on GPU `device`
// (solver_path.h: smem_budget), cached per device.
int64_t octav_smem_budget(int64_t device);

}  // namespace octav::cuda
