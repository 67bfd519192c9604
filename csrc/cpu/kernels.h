// The CPU kernels of the octav ops (csrc/ops.h says what each computes), one family per file:
// octav.cpp (masked sums, the OCTAV fixed point; octav_fake_quantize is composed by ops.h),
// fake_quant.cpp (fake-quant forward with the packed PWL mask, backward, tracked forward,
// dampening), lsq.cpp (the learned-scale backward), refine.cpp (the refinement search and its
// candidate passes). Tensors are checked and
// contiguous, seen as [outer, n_groups, inner] (Groups); scales are float32 [n_groups].
#pragma once

#include "../kernels.h"

namespace octav::cpu {

// Group c's row of an importance table (args.h importance_layout: [P, len], row c % P).
inline const float* importance_row(const at::Tensor& h, int64_t c, int64_t len) {
  return h.data_ptr<float>() + (c % h.size(0)) * len;
}

struct Kernels {
  OCTAV_KERNELS_INTERFACE
  static constexpr bool kFusedOctav = false;  // (the scale, then the fake-quant with it)
  static constexpr bool kImportanceAtOffsets = false;  // reads the [P, len] table (ops.h)
  // The whole refinement search, in C++ on the CPU.
  static at::Tensor refine_scale(const at::Tensor& x, const at::Tensor& scale, const Groups& g,
                                 const Levels& lv, bool is_signed, const at::Tensor& h);
};

}  // namespace octav::cpu
