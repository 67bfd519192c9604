// Which path of csrc/cuda/octav.cu solves a tensor's OCTAV groups, from their sizes and the
// device's shared-memory budget. Plain C++ (no CUDA), so that the tests of a CPU-only build
// check the decision too (octav_kernels._C.cuda_solver_path).
#pragma once

#include <algorithm>
#include <cstdint>

namespace octav::cuda {

// kFewGroups: the global-memory groups split across blocks when there are fewer of them than
// SMs (decided in octav.cu at the call, from the device's SM count; solver_path() says
// kBlockGlobal for them).
enum class SolverPath { kWarpPerGroup, kBlockOnChip, kBlockGlobal, kWholeTensor, kFewGroups };

constexpr int64_t kWarpGroupMax = 1024;  // elements of a group a warp solves
constexpr int64_t kWarpsPerBlock = 8;    // groups per block in the warp-per-group kernel

// The dynamic shared memory a block of a kernel may use: the device's opt-in limit per block
// (cudaDeviceProp::sharedMemPerBlockOptin: 227 KiB on sm_90, 163 KiB on sm_80, 99 KiB on
// sm_86 / sm_89) minus the kernel's static shared memory.
inline int64_t smem_budget(int64_t optin_per_block, int64_t static_bytes) {
  return std::max<int64_t>(0, optin_per_block - static_bytes);
}

// Groups of <= kWarpGroupMax elements: a warp each, 8 to a block, in shared memory. Larger
// groups that fit the budget: a block each, in shared memory. Larger still: a block each over
// global memory, or, for a single group (per tensor), the cooperative whole-tensor solver.
// elem_size: the shared-memory bytes of one element (x's element size; 4 more with importance,
// whose float32 weights are staged next to x).
inline SolverPath solver_path(int64_t n_groups, int64_t len, int64_t elem_size,
                              int64_t budget) {
  const int64_t bytes = len * elem_size;
  if (len <= kWarpGroupMax && kWarpsPerBlock * bytes <= budget) return SolverPath::kWarpPerGroup;
  if (bytes <= budget) return SolverPath::kBlockOnChip;
  return n_groups == 1 ? SolverPath::kWholeTensor : SolverPath::kBlockGlobal;
}

inline const char* path_name(SolverPath p) {
  switch (p) {
    case SolverPath::kWarpPerGroup: return "warp-per-group";
    case SolverPath::kBlockOnChip: return "block-per-group";
    case SolverPath::kBlockGlobal: return "block-per-group-global";
    case SolverPath::kFewGroups: return "few-groups-split";
    default: return "whole-tensor";
  }
}

}  // namespace octav::cuda
