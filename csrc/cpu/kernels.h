// The CPU kernels of the octav ops (csrc/ops.h says what each computes), one family per file:
// octav.cpp (masked sums, the OCTAV fixed point, the composed fused op), fake_quant.cpp
// (fake-quant forward with the packed PWL mask, backward, tracked forward, dampening),
// refine.cpp (the refinement search and its candidate passes). Tensors are checked and
// contiguous, seen as [outer, n_groups, inner] (Groups); scales are float32 [n_groups].
#pragma once

#include "../kernels.h"

namespace octav::cpu {

struct Kernels {
  OCTAV_KERNELS_INTERFACE
  // The whole refinement search (refine_scale), in C++ on the CPU.
  static at::Tensor refine(const at::Tensor& x, const at::Tensor& scale, const Groups& g,
                           const Levels& lv, bool is_signed);
};

}  // namespace octav::cpu
