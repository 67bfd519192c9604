// Device helpers shared by the CUDA kernel families (the element math of SPEC §1 is csrc/grid.h's,
// shared with the CPU): 16-byte vector loads of 8 elements, and (S_out, n_in, n_out, max a)
// reductions, plain or importance-weighted (SPEC §2.1).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../grid.h"

namespace octav::cuda {

// float32, float16 and bfloat16 (float64 is CPU-only, SPEC §6).
#define OCTAV_DISPATCH_FLOATING(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                  \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// f(std::true_type) or f(std::false_type): a runtime flag as a template argument.
template <typename F>
void dispatch_bool(bool b, const F& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // per block of the elementwise and LSQ kernels
constexpr int kChunk = 8;  // elements per thread step of the elementwise kernels: 16 or 32 bytes

// Offset of element j of group c in the contiguous [outer, n_groups, inner] view of a tensor
// (element j of a group is x[j / inner, c, j % inner]).
__device__ __forceinline__ int64_t group_offset(int64_t j, int64_t c, int64_t outer,
                                                int64_t n_groups, int64_t inner) {
  if (outer == 1) return c * inner + j;
  const int64_t o = j / inner;
  return (o * n_groups + c) * inner + (j - o * inner);
}

// 8 consecutive elements through 16-byte loads and stores (p 16-byte aligned).
template <typename T>
struct alignas(16) Chunk {
  T v[kChunk];
};

template <typename T>
__device__ __forceinline__ Chunk<T> load_chunk(const T* p) {
  Chunk<T> c;
  const uint4* src = reinterpret_cast<const uint4*>(p);
  uint4* dst = reinterpret_cast<uint4*>(c.v);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(Chunk<T>) / 16); ++i) dst[i] = __ldg(src + i);
  return c;
}

template <typename T>
__device__ __forceinline__ void store_chunk(T* p, const Chunk<T>& c) {
  uint4* dst = reinterpret_cast<uint4*>(p);
  const uint4* src = reinterpret_cast<const uint4*>(c.v);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(Chunk<T>) / 16); ++i) dst[i] = src[i];
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Grid size for a grid-stride loop over n_items with `threads` per block: one item per thread,
// capped at 16 blocks per SM.
inline int blocks_for(int64_t n_items, int threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = (n_items + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, sms * 16)));
}

// Where element k0 sits: its scale group and how many elements remain in its row.
struct GroupCursor {
  int64_t g, left;
  int64_t n_groups, inner;

  __device__ GroupCursor(int64_t k0, int64_t n_groups_, int64_t inner_)
      : n_groups(n_groups_), inner(inner_) {
    const int64_t row = k0 / inner;
    left = inner - (k0 - row * inner);
    g = n_groups == 1 ? 0 : row % n_groups;
  }
  __device__ __forceinline__ bool next() {  // step to the next element; true if its group changed
    const bool changed = left == 0;
    if (changed) {
      left = inner;
      g = g + 1 == n_groups ? 0 : g + 1;
    }
    --left;
    return changed;
  }
};

// y = quantize(x) over the whole flat tensor, grid-stride in chunks of 8 (the calling kernel's
// whole grid takes part); with WriteMask, also the bit-packed PWL mask (bit k % 32 of word
// k / 32 set where PWL passes element k's gradient): a chunk gives a byte, lanes 4m..4m+3 hold
// chunks 4w..4w+3 and lane 4m writes word w. The loop is warp-uniform so the shuffles are safe.
template <typename T, bool Vec, bool Signed, bool WriteMask>
__device__ __forceinline__ void quantize_chunks(const T* __restrict__ x, T* __restrict__ y,
                                                const float* scale, uint32_t* __restrict__ mask,
                                                int64_t numel, int64_t n_groups, int64_t inner,
                                                float L, float lo, float hi) {
  const int64_t n_chunks = (numel + kChunk - 1) / kChunk;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t lane = threadIdx.x % kWarp;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x - lane;
       base < n_chunks; base += stride) {
    const int64_t ci = base + lane;
    const int64_t k0 = ci * kChunk;
    uint32_t bits = 0;
    if (ci < n_chunks) {
      GroupCursor cur(k0, n_groups, inner);
      float s = scale[cur.g], step = __fdiv_rn(s, L);
      auto one = [&](float v, int j) {
        if (cur.next()) {
          s = scale[cur.g];
          step = __fdiv_rn(s, L);
        }
        if (WriteMask) bits |= static_cast<uint32_t>(inside<Signed>(v, s)) << j;
        return static_cast<T>(quantize(v, step, lo, hi));
      };
      if (Vec && k0 + kChunk <= numel) {
        Chunk<T> c = load_chunk(x + k0);
#pragma unroll
        for (int j = 0; j < kChunk; ++j) c.v[j] = one(static_cast<float>(c.v[j]), j);
        store_chunk(y + k0, c);
      } else {
        for (int j = 0; j < kChunk && k0 + j < numel; ++j) {
          y[k0 + j] = one(static_cast<float>(x[k0 + j]), j);
        }
      }
    }
    if (WriteMask) {
      bits |= __shfl_down_sync(0xffffffffu, bits, 1) << 8;
      bits |= __shfl_down_sync(0xffffffffu, bits, 2) << 16;
      if (lane % 4 == 0 && ci < n_chunks) mask[ci / 4] = bits;
    }
  }
}

// Per-thread statistics of one pass at threshold s over a few hundred elements at most (float
// sum, int counts); flushed into Totals for longer runs and for every reduction. Magnitudes
// above kBig (near float32's max, possible in float32 and bfloat16) go to a double sum, so the
// float one cannot overflow (256 * kBig << FLT_MAX); the branch is uniform on ordinary data.
// Weighted (SPEC §2.1, importance h): float sums of h a, h 1{in}, h 1{out} and the largest a of
// positive h; a term whose h or float product h a is above kBig goes to the double sums, with
// the product taken in double (exact: two floats' product fits a double). The plain
// Stats<false> ignores h.
constexpr float kBig = 1e30f;

template <bool Weighted>
struct Stats;

template <>
struct Stats<false> {
  float s_out = 0.0f;
  double s_big = 0.0;
  int n_in = 0;
  int n_out = 0;
  float a_max = 0.0f;

  template <bool Signed>
  __device__ __forceinline__ void add(float v, float s) {
    const float a = magnitude<Signed>(v);
    const bool out = (a > s) | (a != a);
    if (a > kBig) {
      s_big += out ? a : 0.0;
    } else {
      s_out += out ? a : 0.0f;
    }
    n_out += out;
    n_in += (a > 0.0f) & (a <= s);
    a_max = fmaxf(a_max, a);
  }
  template <bool Signed>
  __device__ __forceinline__ void add(float v, float /*h*/, float s) {
    add<Signed>(v, s);
  }
};

template <>
struct Stats<true> {
  float s_out = 0.0f, w_in = 0.0f, w_out = 0.0f;
  double s_big = 0.0, w_in_big = 0.0, w_out_big = 0.0;
  float a_max = 0.0f;

  template <bool Signed>
  __device__ __forceinline__ void add(float v, float h, float s) {
    const float a = magnitude<Signed>(v);
    const bool out = (a > s) | (a != a);
    const bool in = (a > 0.0f) & (a <= s);
    const float p = __fmul_rn(h, a);  // NaN for a NaN a, or an inf a of importance 0
    if (fmaxf(h, p) > kBig) {  // fmaxf(h, NaN) = h: a NaN product stays on the float sums
      s_big += out ? __dmul_rn(static_cast<double>(h), static_cast<double>(a)) : 0.0;
      w_in_big += in ? static_cast<double>(h) : 0.0;
      w_out_big += out ? static_cast<double>(h) : 0.0;
    } else {
      s_out += out ? p : 0.0f;
      w_in += in ? h : 0.0f;
      w_out += out ? h : 0.0f;
    }
    a_max = fmaxf(a_max, h > 0.0f ? a : 0.0f);
  }
};

// (S_out, n_in, n_out, max a) of a group: double sum, exact int64 counts; weighted, double sums
// of h a, h 1{in}, h 1{out} (as n_in, n_out) and the largest a of positive h. The same size
// either way (the solvers' static shared memory does not depend on it).
template <bool Weighted>
struct Totals {
  using Count = std::conditional_t<Weighted, double, long long>;
  double s_out = 0.0;
  Count n_in = 0;
  Count n_out = 0;
  float a_max = 0.0f;

  __device__ __forceinline__ void add(const Stats<Weighted>& t) {
    if constexpr (Weighted) {
      s_out += static_cast<double>(t.s_out) + t.s_big;
      n_in += static_cast<double>(t.w_in) + t.w_in_big;
      n_out += static_cast<double>(t.w_out) + t.w_out_big;
    } else {
      s_out += static_cast<double>(t.s_out) + t.s_big;
      n_in += t.n_in;
      n_out += t.n_out;
    }
    a_max = fmaxf(a_max, t.a_max);
  }
  __device__ __forceinline__ void add(const Totals& t) {
    s_out += t.s_out;
    n_in += t.n_in;
    n_out += t.n_out;
    a_max = fmaxf(a_max, t.a_max);
  }
};
static_assert(sizeof(Totals<true>) == sizeof(Totals<false>), "Totals: one size");

template <bool Weighted>
__device__ __forceinline__ Totals<Weighted> warp_sum(Totals<Weighted> t) {
#pragma unroll
  for (int d = kWarp / 2; d > 0; d /= 2) {  // butterfly: every lane ends with the same total
    Totals<Weighted> o;
    o.s_out = __shfl_xor_sync(0xffffffffu, t.s_out, d);
    o.n_in = __shfl_xor_sync(0xffffffffu, t.n_in, d);
    o.n_out = __shfl_xor_sync(0xffffffffu, t.n_out, d);
    o.a_max = __shfl_xor_sync(0xffffffffu, t.a_max, d);
    t.add(o);
  }
  return t;
}

// Sum over the block (blockDim.x a multiple of 32); every thread gets the total, added in the
// same order in every thread and every block. `scratch` holds 32 Totals; the trailing barrier
// makes it reusable at once.
template <bool Weighted>
__device__ __forceinline__ Totals<Weighted> block_sum(Totals<Weighted> t,
                                                      Totals<Weighted>* scratch) {
  t = warp_sum(t);
  const int warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  if (threadIdx.x % kWarp == 0) scratch[warp] = t;
  __syncthreads();
  Totals<Weighted> total;
  for (int w = 0; w < n_warps; ++w) total.add(scratch[w]);
  __syncthreads();
  return total;
}

// s_next = S_out / (c n_in + n_out) (double, then float), or max a when nothing lies above s.
// Weighted: S_out / (c W_in + W_out), or the largest a of positive h when no weight lies above s
// and S_out is 0 (a NaN S_out, from a NaN or inf entry of importance 0, stays NaN).
// Each operation rounded on its own (no FMA contraction), as in the reference and the C++ build.
template <bool Weighted>
__device__ __forceinline__ float next_scale(const Totals<Weighted>& t, double octav_const) {
  if constexpr (Weighted) {
    if (t.n_out == 0.0 && t.s_out == 0.0) return t.a_max;
  } else {
    if (t.n_out == 0) return t.a_max;
  }
  const double den = __dadd_rn(__dmul_rn(octav_const, static_cast<double>(t.n_in)),
                               static_cast<double>(t.n_out));
  return static_cast<float>(__ddiv_rn(t.s_out, den));
}

// The SPEC §2 stopping rules (as csrc/cpu/octav.cpp). True when the iteration ends, with s set.
__device__ __forceinline__ bool finished(float nxt, float& s, float& prev, double rtol) {
  const bool converged = nxt == s ||
                         fabs(__dsub_rn(nxt, s)) <= __dmul_rn(rtol, static_cast<double>(s)) ||
                         nxt != nxt;
  if (converged) {
    s = nxt;
    return true;
  }
  if (nxt == prev) {  // 2-cycle: the smaller of the two
    s = fminf(s, nxt);
    return true;
  }
  prev = s;
  s = nxt;
  return false;
}

}  // namespace octav::cuda
