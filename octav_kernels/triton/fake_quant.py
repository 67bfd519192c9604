"""Triton kernels for the clip-quantize forward and its STE / PWL / MAD backward (SPEC §1, §3),
and the weight forward that also tracks oscillations and freezes weights
(``octav_kernels.reference.fake_quantize_tracked``).

Elementwise over the flat contiguous tensor; element ``k`` uses ``scale[(k // inner) % n_groups]``.
Divisions use ``div_rn`` (IEEE round-to-nearest) so results match the CPU kernels bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._args import GRADS, groups, levels
from ._common import (
    BLOCK,
    check_dtype,
    estimator_grad,
    exact_bf16_store,
    frozen_arg,
    grid_level,
    launch,
    quantize,
    round_to_bf16,
)


@triton.jit
def _inside(x, s, SIGNED: tl.constexpr):
    # Whether PWL passes the gradient of x (SPEC §3): |x| <= s signed, 0 <= x <= s unsigned.
    if SIGNED:
        return tl.abs(x) <= s
    return (x >= 0) & (x <= s)


@triton.jit
def _fake_quantize_kernel(x_ptr, y_ptr, scale_ptr, mask_ptr, numel, n_groups, inner, L, lo, hi,
                          SIGNED: tl.constexpr, WRITE_MASK: tl.constexpr,
                          ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = k < numel
    s = tl.load(scale_ptr + (k // inner) % n_groups, mask=valid, other=1.0)
    x = tl.load(x_ptr + k, mask=valid, other=0.0).to(tl.float32)
    q = quantize(x, tl.math.div_rn(s, L), lo, hi)
    if ROUND_BF16:
        q = round_to_bf16(q)
    tl.store(y_ptr + k, q.to(y_ptr.dtype.element_ty), mask=valid)
    if WRITE_MASK:  # bit k % 32 of word k // 32: the block's BLOCK // 32 words
        bits = tl.reshape((valid & _inside(x, s, SIGNED)).to(tl.int64), (BLOCK // 32, 32))
        words = tl.sum(bits << tl.arange(0, 32).to(tl.int64)[None, :], axis=1)
        w = tl.program_id(0).to(tl.int64) * (BLOCK // 32) + tl.arange(0, BLOCK // 32)
        tl.store(mask_ptr + w, words.to(tl.int32), mask=w < (numel + 31) // 32)


@triton.jit
def _pwl_backward_packed_kernel(g_ptr, mask_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = k < numel
    word = tl.load(mask_ptr + k // 32, mask=valid, other=0)
    g = tl.load(g_ptr + k, mask=valid, other=0.0)
    tl.store(out_ptr + k, tl.where(((word >> (k % 32).to(tl.int32)) & 1) != 0, g, 0.0), mask=valid)


@triton.jit
def _fake_quantize_tracked_kernel(x_ptr, y_ptr, scale_ptr, level_ptr, dir_ptr, frozen_ptr,
                                  freq_ptr, ema_ptr, threshold_ptr, numel, n_groups, inner, L, lo,
                                  hi, m, keep, UPDATE: tl.constexpr, ROUND_BF16: tl.constexpr,
                                  BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = k < numel
    s = tl.load(scale_ptr + (k // inner) % n_groups, mask=valid, other=1.0)
    x = tl.load(x_ptr + k, mask=valid, other=0.0).to(tl.float32)
    step = tl.math.div_rn(s, L)
    v = tl.where(step == 0, 0.0, grid_level(x, step, lo, hi))  # the level (NaN for NaN x)
    last = tl.load(level_ptr + k, mask=valid, other=0).to(tl.int32)
    frozen = tl.load(frozen_ptr + k, mask=valid, other=0) != 0
    if UPDATE:
        live = valid & ~frozen & (v == v)
        level = tl.where(v == v, v, 0.0).to(tl.int32)
        d = (level > last).to(tl.int32) - (level < last).to(tl.int32)
        last_dir = tl.load(dir_ptr + k, mask=valid, other=0).to(tl.int32)
        oscillated = (d != 0) & (last_dir != 0) & (d != last_dir)
        freq = keep * tl.load(freq_ptr + k, mask=valid, other=0.0) + tl.where(oscillated, m, 0.0)
        ema = keep * tl.load(ema_ptr + k, mask=valid, other=0.0) + m * level.to(tl.float32)
        threshold = tl.load(threshold_ptr)  # <= 0: freezing off
        freeze = live & (freq > tl.where(threshold > 0, threshold, float("inf")))
        # |ema| <= 2**7, so the magic-number rounding (ties to even) is exact.
        r = (ema + 12582912.0) - 12582912.0
        r = tl.where(r < lo, lo, tl.where(r > hi, hi, r))
        kept = tl.where(freeze, r.to(tl.int32), level)
        tl.store(dir_ptr + k, tl.where(d != 0, d, last_dir).to(tl.int8), mask=live)
        tl.store(level_ptr + k, kept.to(tl.int8), mask=live)
        tl.store(freq_ptr + k, freq, mask=live)
        tl.store(ema_ptr + k, ema, mask=live)
        tl.store(frozen_ptr + k, tl.full(k.shape, 1, tl.uint8), mask=freeze)
        frozen = frozen | freeze
        last = tl.where(live, kept, last)
    q = tl.where(step == 0, 0.0, tl.where(frozen, last.to(tl.float32), v) * step)
    if ROUND_BF16:
        q = round_to_bf16(q)
    tl.store(y_ptr + k, q.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _dampening_kernel(w_ptr, g_ptr, out_ptr, scale_ptr, frozen_ptr, numel, n_groups, inner, L, lo,
                      hi, BACKWARD: tl.constexpr, FROZEN: tl.constexpr,
                      ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """Oscillation dampening (reference.dampening_error / dampening_backward)."""
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = k < numel
    s = tl.load(scale_ptr + (k // inner) % n_groups, mask=valid, other=1.0)
    v = tl.load(w_ptr + k, mask=valid, other=0.0).to(tl.float32)
    step = tl.math.div_rn(s, L)
    bottom = lo * step
    top = hi * step
    q = quantize(v, step, lo, hi)
    off = k < 0  # nothing frozen
    if FROZEN:
        off = tl.load(frozen_ptr + k, mask=valid, other=0) != 0
    if BACKWARD:
        t = v - q
        g = tl.load(g_ptr + k, mask=valid, other=0.0)
        out = tl.where((v >= bottom) & (v <= top) & ~off, (t + t) * g, 0.0)
        if ROUND_BF16:
            out = round_to_bf16(out)
        tl.store(out_ptr + k, out.to(out_ptr.dtype.element_ty), mask=valid)
    else:
        d = q - tl.where(v < bottom, bottom, tl.where(v > top, top, v))
        tl.store(out_ptr + k, tl.where(off, 0.0, d * d), mask=valid)


@triton.jit
def _fake_quantize_backward_kernel(g_ptr, x_ptr, out_ptr, scale_ptr, frozen_ptr, numel, n_groups,
                                   inner, SIGNED: tl.constexpr, MODE: tl.constexpr,
                                   FROZEN: tl.constexpr, ROUND_BF16: tl.constexpr,
                                   BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = k < numel
    g = tl.load(g_ptr + k, mask=valid, other=0.0).to(tl.float32)
    if MODE == 0:  # ste
        out = g
    else:
        s = tl.load(scale_ptr + (k // inner) % n_groups, mask=valid, other=1.0)
        x = tl.load(x_ptr + k, mask=valid, other=0.0).to(tl.float32)
        out = estimator_grad(g, x, s, SIGNED, MODE)
    if FROZEN:  # frozen weights get no gradient
        out = tl.where(tl.load(frozen_ptr + k, mask=valid, other=0) != 0, 0.0, out)
    if ROUND_BF16:
        out = round_to_bf16(out)
    tl.store(out_ptr + k, out.to(out_ptr.dtype.element_ty), mask=valid)


def _fake_quantize(x, scale, bits, signed, dim, group_size, narrow, with_mask):
    check_dtype(x)
    g = groups(x, dim, group_size)
    L, lo, hi = levels(bits, signed, narrow)
    x = x.contiguous()
    y = torch.empty_like(x)
    mask = torch.empty((x.numel() + 31) // 32 if with_mask else 0, dtype=torch.int32,
                       device=x.device)
    launch(_fake_quantize_kernel, (triton.cdiv(x.numel(), BLOCK),), x,
        x, y, scale.reshape(-1).float().contiguous(), mask if with_mask else y, x.numel(),
        g.n_groups, g.inner, float(L), float(lo), float(hi), SIGNED=signed,
        WRITE_MASK=with_mask, ROUND_BF16=exact_bf16_store(x.dtype), BLOCK=BLOCK)
    return y, mask


def fake_quantize(x, scale, bits, signed=True, dim=None, group_size=None, grad="mad",
                  narrow=False):
    return _fake_quantize(x, scale, bits, signed, dim, group_size, narrow, False)[0]


def fake_quantize_packed(x, scale, bits, signed=True, dim=None, group_size=None, narrow=False):
    """``(y, mask)``: fake_quantize and the packed PWL mask from the same read of x."""
    return _fake_quantize(x, scale, bits, signed, dim, group_size, narrow, True)


def pwl_backward_packed(grad_out, mask):
    check_dtype(grad_out)
    grad_out = grad_out.contiguous()
    out = torch.empty_like(grad_out)
    launch(_pwl_backward_packed_kernel, (triton.cdiv(grad_out.numel(), BLOCK),), grad_out,
        grad_out, mask.contiguous(), out, grad_out.numel(), BLOCK=BLOCK)
    return out


def fake_quantize_backward(grad_out, x, scale, signed=True, dim=None, group_size=None,
                           grad="mad", frozen=None):
    check_dtype(x)
    g = groups(x, dim, group_size)
    x = x.contiguous()
    grad_out = grad_out.to(x.dtype).contiguous()
    out = torch.empty_like(x)
    launch(_fake_quantize_backward_kernel, (triton.cdiv(x.numel(), BLOCK),), x,
        grad_out, x, out, scale.reshape(-1).float().contiguous(), frozen_arg(frozen, x),
        x.numel(), g.n_groups, g.inner, SIGNED=signed, MODE=GRADS.index(grad),
        FROZEN=frozen is not None, ROUND_BF16=exact_bf16_store(x.dtype), BLOCK=BLOCK)
    return out


def fake_quantize_tracked(x, scale, bits, signed, dim, group_size, narrow, last_int, last_dir,
                          frozen, osc_freq, int_ema, momentum, freeze_threshold, update):
    check_dtype(x)
    g = groups(x, dim, group_size)
    L, lo, hi = levels(bits, signed, narrow)
    x = x.contiguous()
    y = torch.empty_like(x)
    # float32 constants as the reference rounds them; no FMA contraction (enable_fp_fusion), so
    # the EMA updates round like the reference's separate products and sums.
    launch(_fake_quantize_tracked_kernel, (triton.cdiv(x.numel(), BLOCK),), x,
        x, y, scale.reshape(-1).float().contiguous(), last_int, last_dir,
        frozen.view(torch.uint8), osc_freq, int_ema, freeze_threshold, x.numel(), g.n_groups,
        g.inner, float(L), float(lo), float(hi), _f32(momentum), _f32(1.0 - momentum),
        UPDATE=update, ROUND_BF16=exact_bf16_store(x.dtype), BLOCK=BLOCK,
        enable_fp_fusion=False)
    return y


def _dampening(w, grad, scale, bits, signed, dim, group_size, narrow, frozen):
    check_dtype(w)
    g = groups(w, dim, group_size)
    L, lo, hi = levels(bits, signed, narrow)
    w = w.contiguous()
    out = (torch.empty(w.shape, dtype=torch.float32, device=w.device) if grad is None
           else torch.empty_like(w))
    launch(_dampening_kernel, (triton.cdiv(w.numel(), BLOCK),), w,
        w, w if grad is None else grad.float().contiguous(), out,
        scale.reshape(-1).float().contiguous(), frozen_arg(frozen, w), w.numel(), g.n_groups,
        g.inner, float(L), float(lo), float(hi), BACKWARD=grad is not None,
        FROZEN=frozen is not None, ROUND_BF16=exact_bf16_store(out.dtype), BLOCK=BLOCK,
        enable_fp_fusion=False)
    return out


def dampening_error(w, scale, bits, signed=True, dim=None, group_size=None, narrow=False,
                    frozen=None):
    return _dampening(w, None, scale, bits, signed, dim, group_size, narrow, frozen)


def dampening_backward(grad, w, scale, bits, signed=True, dim=None, group_size=None,
                       narrow=False, frozen=None):
    return _dampening(w, grad, scale, bits, signed, dim, group_size, narrow, frozen)


def _f32(value: float) -> float:
    """``value`` rounded to float32 (as a Python float, which Triton passes as fp32 exactly)."""
    return torch.tensor(value, dtype=torch.float32).item()
