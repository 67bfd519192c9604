"""Triton kernels for the clip-quantize forward and its STE / PWL / MAD backward (SPEC §1, §3).

Elementwise over the flat contiguous tensor; element ``k`` uses ``scale[(k // inner) % n_groups]``.
Divisions use ``div_rn`` (IEEE round-to-nearest) so results match the CPU kernels bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._args import GRADS, groups, levels
from ._common import check_dtype, exact_bf16_store, quantize, round_to_bf16

_BLOCK = 1024


@triton.jit
def _fake_quantize_kernel(x_ptr, y_ptr, scale_ptr, numel, n_groups, inner, L, lo, hi,
                          ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = k < numel
    s = tl.load(scale_ptr + (k // inner) % n_groups, mask=valid, other=1.0)
    x = tl.load(x_ptr + k, mask=valid, other=0.0).to(tl.float32)
    q = quantize(x, s, tl.math.div_rn(s, L), lo, hi)
    if ROUND_BF16:
        q = round_to_bf16(q)
    tl.store(y_ptr + k, q.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _fake_quantize_backward_kernel(g_ptr, x_ptr, out_ptr, scale_ptr, numel, n_groups, inner,
                                   SIGNED: tl.constexpr, MODE: tl.constexpr,
                                   ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = k < numel
    g = tl.load(g_ptr + k, mask=valid, other=0.0).to(tl.float32)
    if MODE == 0:  # ste
        out = g
    else:
        s = tl.load(scale_ptr + (k // inner) % n_groups, mask=valid, other=1.0)
        x = tl.load(x_ptr + k, mask=valid, other=0.0).to(tl.float32)
        if SIGNED:
            a = tl.abs(x)
            inside = a <= s
            below = a < 0  # never
        else:
            a = x
            inside = (x >= 0) & (x <= s)
            below = x < 0
        if MODE == 1:  # pwl
            out = tl.where(inside, g, 0.0)
        else:  # mad: g * s / |x| outside
            ratio = tl.math.div_rn(s, tl.where(inside | below, 1.0, a))
            out = tl.where(inside, g, tl.where(below, 0.0, g * ratio))
    if ROUND_BF16:
        out = round_to_bf16(out)
    tl.store(out_ptr + k, out.to(out_ptr.dtype.element_ty), mask=valid)


def fake_quantize(x, scale, bits, signed=True, dim=None, group_size=None, grad="mad",
                  narrow=False):
    check_dtype(x)
    g = groups(x, dim, group_size)
    L, lo, hi = levels(bits, signed, narrow)
    x = x.contiguous()
    y = torch.empty_like(x)
    _fake_quantize_kernel[(triton.cdiv(x.numel(), _BLOCK),)](
        x, y, scale.reshape(-1).float().contiguous(), x.numel(), g.n_groups, g.inner,
        float(L), float(lo), float(hi), ROUND_BF16=exact_bf16_store(x.dtype), BLOCK=_BLOCK)
    return y


def fake_quantize_backward(grad_out, x, scale, signed=True, dim=None, group_size=None,
                           grad="mad"):
    check_dtype(x)
    g = groups(x, dim, group_size)
    x = x.contiguous()
    grad_out = grad_out.to(x.dtype).contiguous()
    out = torch.empty_like(x)
    _fake_quantize_backward_kernel[(triton.cdiv(x.numel(), _BLOCK),)](
        grad_out, x, out, scale.reshape(-1).float().contiguous(), x.numel(), g.n_groups, g.inner,
        SIGNED=signed, MODE=GRADS.index(grad), ROUND_BF16=exact_bf16_store(x.dtype),
        BLOCK=_BLOCK)
    return out
