// The CUDA kernels of the octav ops (built when a CUDA toolkit and a CUDA build of torch are
// found), the same contract as cpu/kernels.h (csrc/ops.h says what each computes): octav.cu
// (masked sums, the OCTAV solvers, the fused OCTAV + fake-quant), fake_quant.cu (forward with the
// packed PWL mask, backward, tracked forward, dampening), refine.cu (one pass of the refinement
// search; the search itself is octav_kernels.drivers'). float32, float16 and bfloat16. Host
// declarations only: included by the host compiler (csrc/ops.cpp) too.
#pragma once

#include <tuple>

#include "../args.h"

namespace octav::cuda {

struct Kernels {
  static at::Tensor fake_quantize(const at::Tensor& x, const at::Tensor& scale, const Groups& g,
                                  const Levels& lv, bool is_signed, at::Tensor* mask);
  static at::Tensor backward(const at::Tensor& grad, const at::Tensor& x,
                             const at::Tensor& scale, const Groups& g, bool is_signed,
                             Grad mode, const at::Tensor& frozen);
  static at::Tensor pwl_backward_packed(const at::Tensor& grad, const at::Tensor& mask);
  static at::Tensor tracked(const at::Tensor& x, const at::Tensor& scale, const Groups& g,
                            const Levels& lv, at::Tensor& last_int, at::Tensor& last_dir,
                            at::Tensor& frozen, at::Tensor& osc_freq, at::Tensor& int_ema,
                            double momentum, const at::Tensor& freeze_threshold, bool update);
  static at::Tensor dampening(const at::Tensor& w, const at::Tensor& grad,
                              const at::Tensor& scale, const Groups& g, const Levels& lv,
                              const at::Tensor& frozen);
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_sums(const at::Tensor& x,
                                                                    const at::Tensor& scale,
                                                                    const Groups& g,
                                                                    bool is_signed);
  static at::Tensor octav_scale(const at::Tensor& x, const at::Tensor& init, const Groups& g,
                                bool is_signed, double octav_const, int64_t max_iters,
                                double rtol);
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> fused(const at::Tensor& x,
                                                              const at::Tensor& init,
                                                              const Groups& g, int64_t bits,
                                                              bool is_signed, bool narrow,
                                                              bool with_mask);
  static at::Tensor candidate_sse(const at::Tensor& x, const at::Tensor& cand, const Groups& g,
                                  const Levels& lv);
};

// Whether this build has a kernel image (SASS, or PTX the driver can JIT) for GPU `device`
// (octav_kernels.backend serves the GPUs it has none for from Triton).
bool kernels_run_on(int64_t device);

// The dynamic shared memory the OCTAV block-per-group kernel may use on GPU `device`
// (solver_path.h: smem_budget), cached per device.
int64_t octav_smem_budget(int64_t device);

}  // namespace octav::cuda
