// Clip-quantize forward and its STE / PWL / MAD backward on CUDA (SPEC §1, §3), and the weight
// forward that also tracks oscillations and freezes weights
// (octav_kernels.reference.fake_quantize_tracked).
//
// Elementwise over the flat contiguous tensor, grid-stride, int64 indices. A thread step is a
// chunk of 8 consecutive elements read and written with 16-byte accesses (two for float32).
// Element k uses scale[(k / inner) % n_groups]: one division per chunk, then the group is
// advanced as the chunk crosses row ends. Unaligned pointers take the scalar path.
//
// The PWL clip mask is bit-packed: bit k % 32 of word k / 32 is 1 where PWL passes the gradient
// of element k. A chunk gives one byte; four lanes' bytes make a word, written by one lane.
#include "kernels.h"
#include "common.cuh"

namespace octav::cuda {
namespace {

template <typename T, bool Vec, bool Signed, bool WriteMask>
__global__ void __launch_bounds__(kThreads)
    fake_quantize_kernel(const T* __restrict__ x, T* __restrict__ y,
                         const float* __restrict__ scale, uint32_t* __restrict__ mask,
                         int64_t numel, int64_t n_groups, int64_t inner, float L, float lo,
                         float hi) {
  quantize_chunks<T, Vec, Signed, WriteMask>(x, y, scale, mask, numel, n_groups, inner, L, lo, hi);
}

// One thread per element (grid-stride): the level, the state update of reference
// fake_quantize_tracked, and y. Products and sums are __fmul_rn / __fadd_rn (no FMA), so the
// EMAs round as in the reference.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    fake_quantize_tracked_kernel(const T* __restrict__ x, T* __restrict__ y,
                                 const float* __restrict__ scale, int8_t* __restrict__ level_p,
                                 int8_t* __restrict__ dir_p, bool* __restrict__ frozen_p,
                                 float* __restrict__ freq_p, float* __restrict__ ema_p,
                                 int64_t numel, int64_t n_groups, int64_t inner, float L,
                                 float lo, float hi, float m, float keep,
                                 const float* __restrict__ threshold_p, bool update) {
  const float threshold = *threshold_p;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < numel;
       k += stride) {
    const float s = scale[n_groups == 1 ? 0 : (k / inner) % n_groups];
    const float step = __fdiv_rn(s, L);
    // The integer level; 0 where step == 0 (an all-zero group).
    const float v = step == 0.0f ? 0.0f : grid_level(static_cast<float>(x[k]), step, lo, hi);
    bool frozen = frozen_p[k];
    int last = level_p[k];
    if (update && !frozen && v == v) {
      const int level = static_cast<int>(v), dir = dir_p[k];
      const int d = (level > last) - (level < last);
      const bool oscillated = d != 0 && dir != 0 && d != dir;
      if (d != 0) dir_p[k] = static_cast<int8_t>(d);
      const float freq = __fadd_rn(__fmul_rn(keep, freq_p[k]), oscillated ? m : 0.0f);
      const float ema =
          __fadd_rn(__fmul_rn(keep, ema_p[k]), __fmul_rn(m, static_cast<float>(level)));
      freq_p[k] = freq;
      ema_p[k] = ema;
      last = level;
      if (threshold > 0.0f && freq > threshold) {  // freeze at the rounded EMA level
        last = static_cast<int>(clamp_level(round_half_even(ema), lo, hi));
        frozen = true;
        frozen_p[k] = true;
      }
      level_p[k] = static_cast<int8_t>(last);
    }
    y[k] = step == 0.0f ? static_cast<T>(0.0f)
                     : static_cast<T>(__fmul_rn(frozen ? static_cast<float>(last) : v, step));
  }
}

// Oscillation dampening: err = (q - clip(w))**2 (Backward: false) or
// grad_w = 2 (w - q) * grad inside [lo * step, hi * step] (Backward: true), one thread per
// element, 0 where frozen; IEEE float32 operations as in the reference.
template <typename T, bool Backward>
__global__ void __launch_bounds__(kThreads)
    dampening_kernel(const T* __restrict__ w, const float* __restrict__ grad,
                     float* __restrict__ err, T* __restrict__ gw,
                     const float* __restrict__ scale, const bool* __restrict__ frozen,
                     int64_t numel, int64_t n_groups, int64_t inner, float L, float lo,
                     float hi) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < numel;
       k += stride) {
    const float step = __fdiv_rn(scale[n_groups == 1 ? 0 : (k / inner) % n_groups], L);
    const float bottom = __fmul_rn(lo, step), top = __fmul_rn(hi, step);
    const float v = static_cast<float>(w[k]);
    const float q = quantize(v, step, lo, hi);
    const bool off = frozen != nullptr && frozen[k];
    if constexpr (Backward) {
      float out = 0.0f;
      if (v >= bottom && v <= top && !off) {
        const float t = __fsub_rn(v, q);
        out = __fmul_rn(__fadd_rn(t, t), grad[k]);
      }
      gw[k] = static_cast<T>(out);
    } else {
      const float d = __fsub_rn(q, clamp_level(v, bottom, top));
      err[k] = off ? 0.0f : __fmul_rn(d, d);
    }
  }
}

template <typename T, bool Vec, bool Signed, int M>
__global__ void __launch_bounds__(kThreads)
    fake_quantize_backward_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                  T* __restrict__ gx, const float* __restrict__ scale,
                                  const bool* __restrict__ frozen, int64_t numel,
                                  int64_t n_groups, int64_t inner) {
  const int64_t n_chunks = (numel + kChunk - 1) / kChunk;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t ci = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; ci < n_chunks;
       ci += stride) {
    const int64_t k0 = ci * kChunk;
    GroupCursor cur(k0, n_groups, inner);
    float s = M == kSte ? 0.0f : scale[cur.g];
    auto one = [&](float g, float v, int64_t k) {
      if (cur.next() && M != kSte) s = scale[cur.g];
      if (frozen != nullptr && frozen[k]) return static_cast<T>(0.0f);  // frozen weight
      return static_cast<T>(estimator_grad(g, v, s, Signed, static_cast<Grad>(M)));
    };
    if (Vec && k0 + kChunk <= numel) {
      Chunk<T> g = load_chunk(grad + k0);
      Chunk<T> v;
      if (M != kSte) v = load_chunk(x + k0);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        g.v[j] = one(static_cast<float>(g.v[j]), M == kSte ? 0.0f : static_cast<float>(v.v[j]),
                     k0 + j);
      }
      store_chunk(gx + k0, g);
    } else {
      for (int j = 0; j < kChunk && k0 + j < numel; ++j) {
        gx[k0 + j] = one(static_cast<float>(grad[k0 + j]),
                         M == kSte ? 0.0f : static_cast<float>(x[k0 + j]), k0 + j);
      }
    }
  }
}

// grad_x = grad where the mask bit is set, else 0 (PWL from the packed mask alone).
template <typename T, bool Vec>
__global__ void __launch_bounds__(kThreads)
    masked_backward_kernel(const T* __restrict__ grad, const uint32_t* __restrict__ mask,
                           T* __restrict__ gx, int64_t numel) {
  const int64_t n_chunks = (numel + kChunk - 1) / kChunk;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t ci = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; ci < n_chunks;
       ci += stride) {
    const int64_t k0 = ci * kChunk;
    const uint32_t bits = mask[ci / 4] >> (8 * (ci % 4));
    if (Vec && k0 + kChunk <= numel) {
      Chunk<T> g = load_chunk(grad + k0);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        if (!((bits >> j) & 1u)) g.v[j] = static_cast<T>(0.0f);
      }
      store_chunk(gx + k0, g);
    } else {
      for (int j = 0; j < kChunk && k0 + j < numel; ++j) {
        gx[k0 + j] = (bits >> j) & 1u ? grad[k0 + j] : static_cast<T>(0.0f);
      }
    }
  }
}

}  // namespace

at::Tensor Kernels::fake_quantize(const at::Tensor& x, const at::Tensor& scale, const Groups& g,
                                  const Levels& lv, bool is_signed, at::Tensor* mask_out) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t numel = x.numel(), n_groups = g.n_groups, inner = g.inner;
  const int64_t n_chunks = (numel + kChunk - 1) / kChunk;
  const bool with_mask = mask_out != nullptr;
  // One word per 4 chunks of 8: (numel + 31) / 32.
  auto mask = at::empty({with_mask ? (n_chunks + 3) / 4 : 0}, x.options().dtype(at::kInt));
  const float L = static_cast<float>(lv.L), lo = static_cast<float>(lv.lo),
              hi = static_cast<float>(lv.hi);
  const auto stream = at::cuda::getCurrentCUDAStream();
  OCTAV_DISPATCH_FLOATING(x.scalar_type(), "fake_quantize", [&] {
    const bool vec = aligned16(x.data_ptr()) && aligned16(y.data_ptr());
    dispatch_bool(vec, [&](auto v) {
      dispatch_bool(is_signed, [&](auto sg) {
        dispatch_bool(with_mask, [&](auto wm) {
          fake_quantize_kernel<scalar_t, decltype(v)::value, decltype(sg)::value,
                               decltype(wm)::value>
              <<<blocks_for(n_chunks, kThreads), kThreads, 0, stream>>>(
                  x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), scale.data_ptr<float>(),
                  with_mask ? reinterpret_cast<uint32_t*>(mask.data_ptr<int32_t>()) : nullptr,
                  numel, n_groups, inner, L, lo, hi);
        });
      });
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (with_mask) *mask_out = mask;
  return y;
}

at::Tensor Kernels::fake_quantize_tracked(const at::Tensor& x, const at::Tensor& scale,
                                          const Groups& g, const Levels& lv,
                                          at::Tensor& last_int, at::Tensor& last_dir,
                                          at::Tensor& frozen, at::Tensor& osc_freq,
                                          at::Tensor& int_ema, double momentum,
                                          const at::Tensor& freeze_threshold, bool update) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t numel = x.numel(), n_groups = g.n_groups, inner = g.inner;
  const auto stream = at::cuda::getCurrentCUDAStream();
  OCTAV_DISPATCH_FLOATING(x.scalar_type(), "fq_tracked", [&] {
    fake_quantize_tracked_kernel<scalar_t><<<blocks_for(numel, kThreads), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), scale.data_ptr<float>(),
        last_int.data_ptr<int8_t>(), last_dir.data_ptr<int8_t>(), frozen.data_ptr<bool>(),
        osc_freq.data_ptr<float>(), int_ema.data_ptr<float>(), numel, n_groups, inner,
        static_cast<float>(lv.L), static_cast<float>(lv.lo), static_cast<float>(lv.hi),
        static_cast<float>(momentum), static_cast<float>(1.0 - momentum),
        freeze_threshold.data_ptr<float>(), update);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

namespace {

// err (float32) for grad undefined, else grad_w (w's dtype).
at::Tensor dampening(const at::Tensor& w, const at::Tensor& grad, const at::Tensor& scale,
                     const Groups& g, const Levels& lv, const at::Tensor& frozen) {
  const c10::cuda::CUDAGuard guard(w.device());
  const bool backward = grad.defined();
  auto out = backward ? at::empty_like(w, at::MemoryFormat::Contiguous)
                      : at::empty(w.sizes(), w.options().dtype(at::kFloat));
  const int64_t numel = w.numel(), n_groups = g.n_groups, inner = g.inner;
  const float L = static_cast<float>(lv.L), lo = static_cast<float>(lv.lo),
              hi = static_cast<float>(lv.hi);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const bool* frozen_p = frozen.numel() > 0 ? frozen.data_ptr<bool>() : nullptr;
  OCTAV_DISPATCH_FLOATING(w.scalar_type(), "dampening", [&] {
    const int blocks = blocks_for(numel, kThreads);
    if (backward) {
      dampening_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
          w.data_ptr<scalar_t>(), grad.data_ptr<float>(), nullptr, out.data_ptr<scalar_t>(),
          scale.data_ptr<float>(), frozen_p, numel, n_groups, inner, L, lo, hi);
    } else {
      dampening_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
          w.data_ptr<scalar_t>(), nullptr, out.data_ptr<float>(), nullptr,
          scale.data_ptr<float>(), frozen_p, numel, n_groups, inner, L, lo, hi);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

at::Tensor Kernels::dampening_error(const at::Tensor& w, const at::Tensor& scale, const Groups& g,
                                    const Levels& lv, const at::Tensor& frozen) {
  return dampening(w, at::Tensor(), scale, g, lv, frozen);
}

at::Tensor Kernels::dampening_backward(const at::Tensor& grad, const at::Tensor& w,
                                       const at::Tensor& scale, const Groups& g,
                                       const Levels& lv, const at::Tensor& frozen) {
  return dampening(w, grad, scale, g, lv, frozen);
}

at::Tensor Kernels::fake_quantize_backward(const at::Tensor& grad, const at::Tensor& x,
                                           const at::Tensor& scale, const Groups& g,
                                           bool is_signed, Grad mode, const at::Tensor& frozen) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t numel = x.numel(), n_groups = g.n_groups, inner = g.inner;
  const int64_t n_chunks = (numel + kChunk - 1) / kChunk;
  const auto stream = at::cuda::getCurrentCUDAStream();
  OCTAV_DISPATCH_FLOATING(x.scalar_type(), "fq_backward", [&] {
    const bool vec = aligned16(grad.data_ptr()) && aligned16(x.data_ptr()) &&
                     aligned16(gx.data_ptr());
    dispatch_bool(vec, [&](auto v) {
      dispatch_bool(is_signed, [&](auto sg) {
        constexpr bool V = decltype(v)::value, S = decltype(sg)::value;
        auto launch = [&](auto kernel) {
          kernel<<<blocks_for(n_chunks, kThreads), kThreads, 0, stream>>>(
              grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),
              scale.data_ptr<float>(),
              frozen.numel() > 0 ? frozen.data_ptr<bool>() : nullptr, numel, n_groups, inner);
        };
        if (mode == kSte) {
          launch(fake_quantize_backward_kernel<scalar_t, V, S, kSte>);
        } else if (mode == kPwl) {
          launch(fake_quantize_backward_kernel<scalar_t, V, S, kPwl>);
        } else {
          launch(fake_quantize_backward_kernel<scalar_t, V, S, kMad>);
        }
      });
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gx;
}

at::Tensor Kernels::pwl_backward_packed(const at::Tensor& grad, const at::Tensor& mask) {
  const c10::cuda::CUDAGuard guard(grad.device());
  auto gx = at::empty_like(grad, at::MemoryFormat::Contiguous);
  const int64_t numel = grad.numel();
  const int64_t n_chunks = (numel + kChunk - 1) / kChunk;
  const auto stream = at::cuda::getCurrentCUDAStream();
  OCTAV_DISPATCH_FLOATING(grad.scalar_type(), "masked_bwd", [&] {
    const bool vec = aligned16(grad.data_ptr()) && aligned16(gx.data_ptr());
    dispatch_bool(vec, [&](auto v) {
      masked_backward_kernel<scalar_t, decltype(v)::value>
          <<<blocks_for(n_chunks, kThreads), kThreads, 0, stream>>>(
              grad.data_ptr<scalar_t>(),
              reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>()),
              gx.data_ptr<scalar_t>(), numel);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gx;
}

}  // namespace octav::cuda
