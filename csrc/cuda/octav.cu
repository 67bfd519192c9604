// OCTAV statistics and fixed point on CUDA (SPEC §2), alone or fused with the fake-quant.
//
// Groups (channels, blocks) are solved on-chip: a warp (groups of <= kWarpGroupMax elements, 8
// per block) or a block (up to the device's shared-memory budget: solver_path.h) loads its group
// into shared memory once, iterates the recursion there with register/shuffle reductions until
// it stops, then writes the scale and, fused, the quantized group: one read and one write of the
// tensor. Larger groups among several are iterated by one block each over global memory (L2
// helps). Blocks loop over groups (grid-stride), so any number of groups fits one launch.
//
// A whole tensor (one group too large for one SM) is solved by one cooperative launch: every
// block reduces its grid-stride share of a pass, writes a (double, int64, int64, float) partial
// (weighted: double sums of importance in place of the counts), the grid synchronizes, and
// every block adds all partials in the same fixed order, so every block holds the bit-identical
// next scale and takes the same stop decision. Partials are double-buffered by iteration
// parity, so one grid barrier per pass suffices. Fused, the same
// launch then writes the quantized tensor. No host synchronization anywhere; results do not
// depend on timing (no floating-point atomics).
//
// masked_sums is one pass: blocks reduce slices of a group into partials, a second kernel adds
// them per group in order.
//
// With importance h (SPEC §2.1: float32 in x's layout, so element j of group c of h is at x's
// offset; an undefined tensor without), every kernel reduces the weighted sums instead
// (common.cuh: Stats<true>, Totals<true>): a template parameter, so the plain instantiations are
// the unweighted kernels as they were. On-chip groups stage h in shared memory next to x (4 more
// bytes an element, which solver_path accounts for); the global-memory and whole-tensor paths
// and masked_sums read h from global memory with x.
#include "kernels.h"
#include "common.cuh"
#include "solver_path.h"

#include <cooperative_groups.h>

#include <limits>
#include <mutex>
#include <vector>

namespace octav::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kBlock = 512;  // threads of a block-per-group or whole-tensor block

// Group c of the contiguous [outer, n_groups, inner] view; element j is x[j / inner, c, j % inner].
struct Geometry {
  int64_t outer, n_groups, inner;

  __host__ __device__ int64_t len() const { return outer * inner; }
  __device__ __forceinline__ int64_t offset(int64_t c, int64_t j) const {
    return group_offset(j, c, outer, n_groups, inner);
  }
};

struct Solver {
  const float* init;  // nullptr: cold start
  double octav_const, rtol;
  int max_iters;
};

struct Quantizer {  // fused fake-quant output (y == nullptr: scale only)
  float L, lo, hi;
};

// Reduction over the threads of one group: a warp (TPG == 32) or the whole block.
template <int TPG, bool W>
__device__ __forceinline__ Totals<W> group_sum(const Totals<W>& t, Totals<W>* scratch) {
  if constexpr (TPG == kWarp) {
    return warp_sum(t);
  } else {
    return block_sum(t, scratch);
  }
}

template <int TPG>
__device__ __forceinline__ void group_sync() {
  if constexpr (TPG == kWarp) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// TPG == 32: a warp per group, blockDim / 32 groups per block; TPG == kBlock: the whole block
// (any multiple of 32 threads up to kBlock) per group. OnChip groups are first copied to shared
// memory (a slot per group; weighted W, the blockDim / tpg slots of h (float) come first, then
// those of x); otherwise every pass reads global memory. h: the importance (W only).
template <typename T, bool Signed, int TPG, bool OnChip, bool W>
__global__ void __launch_bounds__(kBlock)
    octav_groups_kernel(const T* __restrict__ x, const float* __restrict__ h,
                        float* __restrict__ scale_out, T* __restrict__ y, Geometry geo,
                        Solver solver, Quantizer qz) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ Totals<W> scratch[kWarp];
  const int tpg = TPG == kWarp ? kWarp : blockDim.x;  // threads per group
  const int64_t groups_per_block = blockDim.x / tpg;
  const int slot = threadIdx.x / tpg, t = threadIdx.x % tpg;
  const int64_t len = geo.len();
  // The h slots (float) first: x's after them stay aligned for any T.
  const int64_t h_bytes = W && OnChip ? groups_per_block * len * int64_t{sizeof(float)} : 0;
  float* hbuf = reinterpret_cast<float*>(smem) + (OnChip ? slot * len : 0);
  T* buf = reinterpret_cast<T*>(smem + h_bytes) + (OnChip ? slot * len : 0);
  // c is uniform over the threads of a group (a warp, or the whole block), so are the barriers.
  for (int64_t c = blockIdx.x * groups_per_block + slot; c < geo.n_groups;
       c += static_cast<int64_t>(gridDim.x) * groups_per_block) {
    if constexpr (OnChip) {
#pragma unroll 4
      for (int64_t j = t; j < len; j += tpg) {
        const int64_t o = geo.offset(c, j);
        buf[j] = x[o];
        if constexpr (W) hbuf[j] = h[o];
      }
      group_sync<TPG>();
    }
    auto value = [&](int64_t j) -> float {
      return static_cast<float>(OnChip ? buf[j] : x[geo.offset(c, j)]);
    };
    // Element j and (W) its importance w.
    auto element = [&](int64_t j, float& w) -> float {
      if constexpr (OnChip) {
        if constexpr (W) w = hbuf[j];
        return static_cast<float>(buf[j]);
      } else {
        const int64_t o = geo.offset(c, j);
        if constexpr (W) w = h[o];
        return static_cast<float>(x[o]);
      }
    };
    auto pass = [&](float s) {
      Totals<W> total;
      Stats<W> part;
      int n = 0;
#pragma unroll 4
      for (int64_t j = t; j < len; j += tpg) {
        float w = 0.0f;
        const float v = element(j, w);
        part.template add<Signed>(v, w, s);
        if (++n == 256) {  // keep float partials short
          total.add(part);
          part = Stats<W>{};
          n = 0;
        }
      }
      total.add(part);
      return group_sum<TPG>(total, scratch);
    };

    float s = solver.init != nullptr ? solver.init[c] : 0.0f;
    if (!(s > 0.0f)) s = next_scale(pass(0.0f), solver.octav_const);  // cold: mean of nonzero a
    float prev = std::numeric_limits<float>::quiet_NaN();
    for (int it = 0; it < solver.max_iters; ++it) {
      if (finished(next_scale(pass(s), solver.octav_const), s, prev, solver.rtol)) break;
    }
    if (t == 0) scale_out[c] = s;
    if (y != nullptr) {
      const float step = __fdiv_rn(s, qz.L);
      for (int64_t j = t; j < len; j += tpg) {
        y[geo.offset(c, j)] = static_cast<T>(quantize(value(j), step, qz.lo, qz.hi));
      }
    }
    group_sync<TPG>();  // the next group reuses the buffer and the scratch
  }
}

// Whole-tensor solver (cooperative launch). partials: 2 * gridDim.x Totals. Fused, it also
// writes y and, with WriteMask, the packed PWL mask. W: weighted by h (x's flat layout; Vec:
// x, y and h 16-byte aligned).
template <typename T, bool Signed, bool Vec, bool WriteMask, bool W>
__global__ void __launch_bounds__(kBlock)
    octav_tensor_kernel(const T* __restrict__ x, const float* __restrict__ h, int64_t numel,
                        float* __restrict__ scale_out, T* __restrict__ y,
                        uint32_t* __restrict__ mask, Totals<W>* __restrict__ partials,
                        Solver solver, Quantizer qz) {
  __shared__ Totals<W> scratch[kWarp];
  __shared__ float s_shared;
  cg::grid_group grid = cg::this_grid();
  const int64_t n_chunks = (numel + kChunk - 1) / kChunk;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int parity = 0;

  auto pass = [&](float s) {
    Totals<W> mine;
    for (int64_t ci = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
         ci < n_chunks; ci += stride) {
      const int64_t k0 = ci * kChunk;
      Stats<W> part;
      if (Vec && k0 + kChunk <= numel) {
        const Chunk<T> v = load_chunk(x + k0);
        if constexpr (W) {
          const Chunk<float> w = load_chunk(h + k0);
#pragma unroll
          for (int j = 0; j < kChunk; ++j) {
            part.template add<Signed>(static_cast<float>(v.v[j]), w.v[j], s);
          }
        } else {
#pragma unroll
          for (int j = 0; j < kChunk; ++j) {
            part.template add<Signed>(static_cast<float>(v.v[j]), s);
          }
        }
      } else {
        for (int64_t k = k0; k < numel && k < k0 + kChunk; ++k) {
          if constexpr (W) {
            part.template add<Signed>(static_cast<float>(x[k]), h[k], s);
          } else {
            part.template add<Signed>(static_cast<float>(x[k]), s);
          }
        }
      }
      mine.add(part);
    }
    const Totals<W> block = block_sum(mine, scratch);
    Totals<W>* buf = partials + parity * gridDim.x;
    if (threadIdx.x == 0) buf[blockIdx.x] = block;
    parity ^= 1;
    grid.sync();
    Totals<W> all;  // every block adds the partials in the same order: identical totals
    for (int64_t b = threadIdx.x; b < gridDim.x; b += blockDim.x) all.add(buf[b]);
    return block_sum(all, scratch);
  };

  float s = solver.init != nullptr ? solver.init[0] : 0.0f;
  if (!(s > 0.0f)) s = next_scale(pass(0.0f), solver.octav_const);
  float prev = std::numeric_limits<float>::quiet_NaN();
  for (int it = 0; it < solver.max_iters; ++it) {
    if (finished(next_scale(pass(s), solver.octav_const), s, prev, solver.rtol)) break;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) scale_out[0] = s;
  if (y != nullptr) {
    if (threadIdx.x == 0) s_shared = s;
    __syncthreads();
    quantize_chunks<T, Vec, Signed, WriteMask>(x, y, &s_shared, mask, numel, 1, numel, qz.L,
                                               qz.lo, qz.hi);
  }
}

// Few large groups (fewer than the SMs, too large for shared memory: per-channel scales along
// a long dim, a [2, 10M] tensor; issue 29), one cooperative launch: gridDim.x = n_groups * bpg,
// block b reduces slice b % bpg of group b / bpg (a grid-stride share of the group's elements,
// bpg blocks per group) instead of one block per group on n_groups SMs. Each pass, the blocks
// write their partials, the grid synchronizes, and in every block thread g (< n_groups) adds the
// bpg partials of group g in order and steps group g's iteration: every block holds the same
// state of every group (bit-identical), so they agree on when all groups have stopped and take
// the same number of grid barriers (a warp per group adds its partials: lanes over the bpg
// partials, then the fixed butterfly of warp_sum). Partials are double-buffered by pass parity.
// Then the blocks write y for their slices (fused, y != nullptr). The sums' order depends on the
// grid (bpg), so results may differ from the block-per-group path's in the last bits.
constexpr int kMaxFewGroups = 256;  // of the shared state (<= kBlock: a thread per group)
static_assert(kMaxFewGroups <= kBlock, "the termination vote takes a thread per group");

template <typename T, bool Signed, bool W>
__global__ void __launch_bounds__(kBlock)
    octav_few_groups_kernel(const T* __restrict__ x, const float* __restrict__ h,
                            float* __restrict__ scale_out, T* __restrict__ y,
                            Totals<W>* __restrict__ partials, Geometry geo, Solver solver,
                            Quantizer qz) {
  __shared__ Totals<W> scratch[kWarp];
  __shared__ float state_s[kMaxFewGroups], state_prev[kMaxFewGroups];
  __shared__ int state_iters[kMaxFewGroups];
  __shared__ unsigned char state_phase[kMaxFewGroups];  // 0 cold start due, 1 iterating, 2 done
  cg::grid_group grid = cg::this_grid();
  const int64_t n_groups = geo.n_groups, len = geo.len();
  const int64_t bpg = gridDim.x / n_groups;  // the launch makes gridDim.x a multiple
  const int64_t c = blockIdx.x / bpg, slice = blockIdx.x % bpg;
  const int64_t stride = bpg * blockDim.x;
  for (int g = threadIdx.x; g < n_groups; g += blockDim.x) {
    const float init = solver.init != nullptr ? solver.init[g] : 0.0f;
    const bool warm = init > 0.0f;  // false for NaN and non-positive inits: a cold start
    state_s[g] = warm ? init : 0.0f;
    state_prev[g] = std::numeric_limits<float>::quiet_NaN();
    state_iters[g] = 0;
    state_phase[g] = warm ? (solver.max_iters > 0 ? 1 : 2) : 0;
  }
  __syncthreads();
  int parity = 0;
  for (;;) {
    if (state_phase[c] != 2) {  // uniform over the block
      const float s = state_s[c];  // 0 for the cold start's pass
      Totals<W> mine;
      Stats<W> part;
      int n = 0;
      for (int64_t j = slice * blockDim.x + threadIdx.x; j < len; j += stride) {
        const int64_t o = geo.offset(c, j);
        if constexpr (W) {
          part.template add<Signed>(static_cast<float>(x[o]), h[o], s);
        } else {
          part.template add<Signed>(static_cast<float>(x[o]), s);
        }
        if (++n == 256) {  // keep float partials short
          mine.add(part);
          part = Stats<W>{};
          n = 0;
        }
      }
      mine.add(part);
      const Totals<W> block = block_sum(mine, scratch);
      if (threadIdx.x == 0) partials[parity * gridDim.x + blockIdx.x] = block;
    }
    grid.sync();
    const int lane = threadIdx.x % kWarp, n_warps = blockDim.x / kWarp;
    for (int g = threadIdx.x / kWarp; g < n_groups; g += n_warps) {  // uniform over a warp
      if (state_phase[g] == 2) continue;
      Totals<W> t;
      const Totals<W>* mine = partials + parity * gridDim.x + g * bpg;
      for (int64_t k = lane; k < bpg; k += kWarp) t.add(mine[k]);
      t = warp_sum(t);  // every lane: the same total
      if (lane != 0) continue;
      const float nxt = next_scale(t, solver.octav_const);
      if (state_phase[g] == 0) {  // the cold start: the mean of the nonzero a
        state_s[g] = nxt;
        state_phase[g] = solver.max_iters > 0 ? 1 : 2;
        continue;
      }
      float s = state_s[g], prev = state_prev[g];
      const bool stop = finished(nxt, s, prev, solver.rtol);
      state_s[g] = s;
      state_prev[g] = prev;
      state_phase[g] = stop || ++state_iters[g] >= solver.max_iters ? 2 : 1;
    }
    parity ^= 1;
    __syncthreads();  // the warps' updates of the state, before every thread reads it
    // Every block reaches the same decision (the same state): the same number of barriers.
    const bool running = threadIdx.x < n_groups && state_phase[threadIdx.x] != 2;
    if (!__syncthreads_or(running)) break;
  }
  if (blockIdx.x == 0) {
    for (int g = threadIdx.x; g < n_groups; g += blockDim.x) scale_out[g] = state_s[g];
  }
  if (y != nullptr) {
    const float step = __fdiv_rn(state_s[c], qz.L);
    for (int64_t j = slice * blockDim.x + threadIdx.x; j < len; j += stride) {
      const int64_t o = geo.offset(c, j);
      y[o] = static_cast<T>(quantize(static_cast<float>(x[o]), step, qz.lo, qz.hi));
    }
  }
}

// masked_sums: item b = c * splits + split reduces elements [split * per, (split + 1) * per)
// of group c; blocks loop over items (a 1-D grid: gridDim.y would cap the groups at 65535).
// W: weighted by h (read at x's offsets).
template <typename T, bool Signed, bool W>
__global__ void __launch_bounds__(kBlock)
    masked_sums_partial_kernel(const T* __restrict__ x, const float* __restrict__ h,
                               const float* __restrict__ scale, Totals<W>* __restrict__ partials,
                               Geometry geo, int64_t splits, int64_t per) {
  __shared__ Totals<W> scratch[kWarp];
  for (int64_t b = blockIdx.x; b < geo.n_groups * splits; b += gridDim.x) {
    const int64_t c = b / splits, split = b % splits;
    const float s = scale[c];
    const int64_t end = std::min(geo.len(), (split + 1) * per);
    Totals<W> mine;
    Stats<W> part;
    int n = 0;
    for (int64_t j = split * per + threadIdx.x; j < end; j += blockDim.x) {
      if constexpr (W) {
        const int64_t o = geo.offset(c, j);
        part.template add<Signed>(static_cast<float>(x[o]), h[o], s);
      } else {
        part.template add<Signed>(static_cast<float>(x[geo.offset(c, j)]), s);
      }
      if (++n == 256) {
        mine.add(part);
        part = Stats<W>{};
        n = 0;
      }
    }
    mine.add(part);
    const Totals<W> block = block_sum(mine, scratch);
    if (threadIdx.x == 0) partials[b] = block;
  }
}

// Adds the partials of each group in order. Counts: int64 n_in, n_out; weighted (W), the float32
// sums of importance W_in, W_out.
template <bool W>
__global__ void masked_sums_finish_kernel(
    const Totals<W>* __restrict__ partials, int64_t splits, int64_t n_groups,
    float* __restrict__ s_out, std::conditional_t<W, float, int64_t>* __restrict__ n_in,
    std::conditional_t<W, float, int64_t>* __restrict__ n_out) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < n_groups;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Totals<W> t;
    for (int64_t k = 0; k < splits; ++k) t.add(partials[c * splits + k]);
    s_out[c] = static_cast<float>(t.s_out);
    if constexpr (W) {
      n_in[c] = static_cast<float>(t.n_in);
      n_out[c] = static_cast<float>(t.n_out);
    } else {
      n_in[c] = t.n_in;
      n_out[c] = t.n_out;
    }
  }
}

// Blocks of a grid-stride launch over n_items of `per_block` each (gridDim.x is at most 2^31-1).
unsigned grid_for(int64_t n_items, int64_t per_block) {
  constexpr int64_t kMaxGrid = int64_t{1} << 30;
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>((n_items + per_block - 1) / per_block, kMaxGrid)));
}

template <typename Kernel>
void allow_smem(Kernel kernel, int64_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

// An attribute of the current device, as the driver reports it now (not the properties torch
// cached at start-up).
int current_device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// Whether the current device takes cooperative launches (cudaDevAttrCooperativeLaunch: every
// GPU from sm_60 on, though a virtualized one may refuse).
bool cooperative_launch_supported() {
  return current_device_attribute(cudaDevAttrCooperativeLaunch) != 0;
}

// The SM count of the current device (under MPS with an active-thread limit, this client's).
int current_sms() { return current_device_attribute(cudaDevAttrMultiProcessorCount); }

// The path solve() takes on the current device; weighted, an on-chip group also holds its
// importance (4 bytes an element). Global-memory groups fewer than the SMs are split across
// blocks (kFewGroups). Without cooperative launches, a whole tensor goes to the global-memory
// path (one block, the same sums in another order) and few groups stay a block each.
SolverPath path_for(const Geometry& geo, int64_t elem_size, bool weighted) {
  const SolverPath path = solver_path(geo.n_groups, geo.len(), elem_size + (weighted ? 4 : 0),
                                      octav_smem_budget(c10::cuda::current_device()));
  if (path != SolverPath::kWholeTensor && path != SolverPath::kBlockGlobal) return path;
  if (!cooperative_launch_supported()) return SolverPath::kBlockGlobal;
  if (path == SolverPath::kBlockGlobal && geo.n_groups <= kMaxFewGroups &&
      geo.n_groups < current_sms()) {
    return SolverPath::kFewGroups;
  }
  return path;
}

// The whole-tensor kernel's grid: at most as many blocks as can be resident at once in the
// current context (the kernel's occupancy times the SM count the driver reports now: under MPS
// with an active-thread limit, the SMs this client may use), and at most max_blocks.
template <typename Kernel>
int whole_tensor_blocks(Kernel kernel, int64_t max_blocks) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kBlock, 0));
  return static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(static_cast<int64_t>(per_sm) * current_sms(), max_blocks)));
}

// Launches a cooperative solver on `blocks` blocks (a multiple of `unit`). Where the launch is
// refused as too large (the context's SMs are shared in a way the count does not show), it is
// retried with about half the blocks, down to `unit`: the kernels' grid-stride passes are
// correct for any such grid (their partials, 2 * gridDim.x of them, are added in block order,
// so the grid changes only the order of those sums).
//
// CUDA graphs: the occupancy and attribute queries are not stream work and a cooperative launch
// is captured as a cooperative kernel node (CUDA 12+), so the solver can be captured; replays
// use the grid chosen at capture. A cooperative grid waits until all its blocks can be resident:
// kernels on other streams (NCCL's) can delay it, never deadlock it.
template <typename Kernel>
void launch_cooperative(Kernel kernel, int blocks, int unit, void** args, cudaStream_t stream) {
  for (;;) {
    const cudaError_t err =
        cudaLaunchCooperativeKernel((void*)kernel, blocks, kBlock, args, 0, stream);
    if (err != cudaErrorCooperativeLaunchTooLarge || blocks == unit) {
      C10_CUDA_CHECK(err);
      return;
    }
    (void)cudaGetLastError();  // clear the refused launch's error before the retry
    blocks = std::max(unit, blocks / 2 / unit * unit);
  }
}

// Solves every group, weighted by h where it is defined (float32 in x's layout); writes y too
// when it is defined, and the packed PWL mask when that is (whole-tensor path only).
void solve(const at::Tensor& x, const at::Tensor& h, const at::Tensor& init, at::Tensor& scale,
           at::Tensor& y, at::Tensor& mask, const Geometry& geo, bool is_signed,
           const Solver& solver_in, const Quantizer& qz) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  Solver solver = solver_in;
  solver.init = init.numel() > 0 ? init.data_ptr<float>() : nullptr;
  const int64_t len = geo.len();
  const bool weighted = h.defined();
  const float* hp = weighted ? h.data_ptr<float>() : nullptr;
  const SolverPath path = path_for(geo, x.element_size(), weighted);
  OCTAV_DISPATCH_FLOATING(x.scalar_type(), "octav_scale", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.defined() ? y.data_ptr<scalar_t>() : nullptr;
    float* sp = scale.data_ptr<float>();
    dispatch_bool(weighted, [&](auto wt) {
     constexpr bool W = decltype(wt)::value;
     // Shared memory of an on-chip group: x, and weighted its importance.
     const int64_t group_bytes =
         len * static_cast<int64_t>(sizeof(scalar_t) + (W ? sizeof(float) : 0));
     dispatch_bool(is_signed, [&](auto sg) {
      constexpr bool S = decltype(sg)::value;
      if (path == SolverPath::kWarpPerGroup) {
        const int64_t smem = kWarpsPerBlock * group_bytes;
        auto kernel = octav_groups_kernel<scalar_t, S, kWarp, true, W>;
        allow_smem(kernel, smem);
        kernel<<<grid_for(geo.n_groups, kWarpsPerBlock), kWarpsPerBlock * kWarp, smem, stream>>>(
            xp, hp, sp, yp, geo, solver, qz);
      } else if (path == SolverPath::kBlockOnChip) {
        // About 32 elements per thread (fewer threads: cheaper reductions, more groups per SM).
        int threads = 128;
        while (threads < kBlock && threads * 32 < len) threads *= 2;
        auto kernel = octav_groups_kernel<scalar_t, S, kBlock, true, W>;
        allow_smem(kernel, group_bytes);
        kernel<<<grid_for(geo.n_groups, 1), threads, group_bytes, stream>>>(xp, hp, sp, yp, geo,
                                                                              solver, qz);
      } else if (path == SolverPath::kFewGroups) {
        auto kernel = octav_few_groups_kernel<scalar_t, S, W>;
        const int64_t n = geo.n_groups;
        // Blocks per group: what is resident over the groups, none with under 16 elements a
        // thread.
        const int64_t bpg = std::max<int64_t>(
            1, std::min<int64_t>(whole_tensor_blocks(kernel, n * grid_for(len, kBlock * 16)) / n,
                                 grid_for(len, kBlock * 16)));
        const int blocks = static_cast<int>(bpg * n);
        auto partials = at::empty({2 * blocks * static_cast<int64_t>(sizeof(Totals<W>))},
                                  x.options().dtype(at::kByte));
        Totals<W>* pp = reinterpret_cast<Totals<W>*>(partials.data_ptr<uint8_t>());
        Geometry g = geo;
        void* args[] = {(void*)&xp, (void*)&hp, (void*)&sp, (void*)&yp, (void*)&pp, (void*)&g,
                        (void*)&solver, (void*)&qz};
        launch_cooperative(kernel, blocks, static_cast<int>(n), args, stream);
      } else if (path == SolverPath::kBlockGlobal) {
        octav_groups_kernel<scalar_t, S, kBlock, false, W>
            <<<grid_for(geo.n_groups, 1), kBlock, 0, stream>>>(xp, hp, sp, yp, geo, solver, qz);
      } else {
        const bool vec = aligned16(xp) && (yp == nullptr || aligned16(yp)) &&
                         (hp == nullptr || aligned16(hp));
        uint32_t* mp = mask.defined() ? reinterpret_cast<uint32_t*>(mask.data_ptr<int32_t>())
                                      : nullptr;
        dispatch_bool(vec, [&](auto v) {
         dispatch_bool(mp != nullptr, [&](auto m) {
          auto kernel =
              octav_tensor_kernel<scalar_t, S, decltype(v)::value, decltype(m)::value, W>;
          const int64_t n_chunks = (len + kChunk - 1) / kChunk;
          const int blocks =
              whole_tensor_blocks(kernel, (n_chunks + kBlock * 4 - 1) / (kBlock * 4));
          auto partials = at::empty({2 * blocks * static_cast<int64_t>(sizeof(Totals<W>))},
                                    x.options().dtype(at::kByte));
          Totals<W>* pp = reinterpret_cast<Totals<W>*>(partials.data_ptr<uint8_t>());
          int64_t numel = len;
          void* args[] = {(void*)&xp, (void*)&hp, (void*)&numel, (void*)&sp, (void*)&yp,
                          (void*)&mp, (void*)&pp, (void*)&solver, (void*)&qz};
          launch_cooperative(kernel, blocks, 1, args, stream);
         });
        });
      }
     });
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Geometry geometry(const Groups& g) { return {g.outer, g.n_groups, g.inner}; }

}  // namespace

int64_t octav_smem_budget(int64_t device) {
  static std::mutex lock;
  static std::vector<int64_t> cached;
  const std::lock_guard<std::mutex> hold(lock);
  if (device >= static_cast<int64_t>(cached.size())) cached.resize(device + 1, -1);
  if (cached[device] < 0) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    cudaFuncAttributes attr;  // the static shared memory is the same in every instantiation
    C10_CUDA_CHECK(
        cudaFuncGetAttributes(&attr, octav_groups_kernel<float, true, kBlock, true, false>));
    const auto* prop = at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(device));
    cached[device] = smem_budget(static_cast<int64_t>(prop->sharedMemPerBlockOptin),
                                 static_cast<int64_t>(attr.sharedSizeBytes));
  }
  return cached[device];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> Kernels::masked_sums(const at::Tensor& x,
                                                                    const at::Tensor& scale,
                                                                    const Groups& g,
                                                                    bool is_signed,
                                                                    const at::Tensor& h) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t n_groups = g.n_groups;
  const bool weighted = h.defined();
  // Weighted: the sums of importance W_in, W_out (float32) in place of the counts.
  const auto count_type = weighted ? at::kFloat : at::kLong;
  auto s_out = at::empty({n_groups}, x.options().dtype(at::kFloat));
  auto n_in = at::empty({n_groups}, x.options().dtype(count_type));
  auto n_out = at::empty({n_groups}, x.options().dtype(count_type));
  const Geometry geo = geometry(g);
  const int64_t len = geo.len();
  // Enough slices to fill the GPU, none shorter than 4 elements per thread.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t splits = std::max<int64_t>(
      1, std::min<int64_t>((len + kBlock * 4 - 1) / (kBlock * 4),
                           (4 * sms + n_groups - 1) / n_groups));
  const int64_t per = (len + splits - 1) / splits;
  const float* hp = weighted ? h.data_ptr<float>() : nullptr;
  dispatch_bool(weighted, [&](auto wt) {
    constexpr bool W = decltype(wt)::value;
    using Count = std::conditional_t<W, float, int64_t>;
    auto partials = at::empty({n_groups * splits * static_cast<int64_t>(sizeof(Totals<W>))},
                              x.options().dtype(at::kByte));
    Totals<W>* pp = reinterpret_cast<Totals<W>*>(partials.data_ptr<uint8_t>());
    OCTAV_DISPATCH_FLOATING(x.scalar_type(), "masked_sums", [&] {
      dispatch_bool(is_signed, [&](auto sg) {
        masked_sums_partial_kernel<scalar_t, decltype(sg)::value, W>
            <<<grid_for(n_groups * splits, 1), kBlock, 0, stream>>>(
                x.data_ptr<scalar_t>(), hp, scale.data_ptr<float>(), pp, geo, splits, per);
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    masked_sums_finish_kernel<W><<<grid_for(n_groups, 256), 256, 0, stream>>>(
        pp, splits, n_groups, s_out.data_ptr<float>(), n_in.data_ptr<Count>(),
        n_out.data_ptr<Count>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {s_out, n_in, n_out};
}

at::Tensor Kernels::octav_scale(const at::Tensor& x, const at::Tensor& init, const Groups& g,
                                bool is_signed, double octav_const, int64_t max_iters,
                                double rtol, const at::Tensor& h) {
  auto scale = at::empty({g.n_groups}, x.options().dtype(at::kFloat));
  at::Tensor y, mask;
  // max_iters <= kMaxIters (args.h) fits the kernels' int.
  solve(x, h, init, scale, y, mask, geometry(g), is_signed,
        {nullptr, octav_const, rtol, static_cast<int>(max_iters)}, {1.0f, 0.0f, 0.0f});
  return scale;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> Kernels::octav_fake_quantize(
    const at::Tensor& x, const at::Tensor& init, const Groups& g, int64_t bits, bool is_signed,
    bool narrow, bool with_mask, const at::Tensor& h) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const Geometry geo = geometry(g);
  const Levels lv = levels(bits, is_signed, narrow);
  auto scale = at::empty({g.n_groups}, x.options().dtype(at::kFloat));
  const Solver solver{nullptr, octav_constant(bits, is_signed, narrow), kDefaultRtol,
                      static_cast<int>(kDefaultMaxIters)};
  const Quantizer qz{static_cast<float>(lv.L), static_cast<float>(lv.lo),
                     static_cast<float>(lv.hi)};
  if (with_mask && path_for(geo, x.element_size(), h.defined()) != SolverPath::kWholeTensor) {
    // Groups are written from shared memory in group order; the mask is written in flat order
    // by the elementwise kernel: solve, then quantize (one more read of x).
    at::Tensor no_y, no_mask;
    solve(xc, h, init, scale, no_y, no_mask, geo, is_signed, solver, qz);
    at::Tensor mask;
    at::Tensor y = fake_quantize(xc, scale, g, lv, is_signed, &mask);
    return {y, scale, mask};
  }
  auto y = at::empty_like(xc, at::MemoryFormat::Contiguous);
  auto mask = at::empty({with_mask ? (x.numel() + 31) / 32 : 0}, x.options().dtype(at::kInt));
  at::Tensor mask_arg = with_mask ? mask : at::Tensor();
  solve(xc, h, init, scale, y, mask_arg, geo, is_signed, solver, qz);
  return {y, scale, mask};
}

}  // namespace octav::cuda
