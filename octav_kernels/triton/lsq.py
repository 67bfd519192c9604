"""Triton kernels of the learned-scale (LSQ) op ``octav::fake_quantize_lsq``: the forward is the
fake-quant's; the backward gives the estimator's grad_x and, per group, the scale's gradient
(``octav_kernels.reference.fake_quantize_lsq_backward``), summed in float64 per block, then the
blocks' partials in order. A block is sized to the group (``block_size``, 16 to 1024 elements)
and a program takes as many groups as fill 4096 elements: groups of 32 no longer leave 97% of a
1024-lane program masked (issue 29)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._args import GRADS, groups, levels, lsq_coefficient
from ._common import (
    block_size,
    check_dtype,
    estimator_grad,
    exact_bf16_store,
    frozen_arg,
    grid_level,
    launch,
    round_to_bf16,
)
from .fake_quant import fake_quantize

_TILE = 4096  # elements a program reads: GROUPS * BLOCK


@triton.jit
def _lsq_backward_kernel(g_ptr, x_ptr, out_ptr, scale_ptr, frozen_ptr, part_ptr, n_groups, inner,
                         group_len, n_blocks, L, lo, hi, SIGNED: tl.constexpr,
                         MODE: tl.constexpr, FROZEN: tl.constexpr, ROUND_BF16: tl.constexpr,
                         GROUPS: tl.constexpr, BLOCK: tl.constexpr):
    """Program (tile, b): block b of each of GROUPS groups (a tile of GROUPS * BLOCK elements,
    BLOCK sized to the group: several short groups per program, one block of a long one):
    grad_x, and per group the float64 sum of the block's terms grad * (n - v or n) of the
    learned scale's gradient (reference.fake_quantize_lsq_backward)."""
    pid = tl.program_id(0).to(tl.int64)
    tile = pid // n_blocks
    b = pid - tile * n_blocks
    c = tile * GROUPS + tl.arange(0, GROUPS).to(tl.int64)[:, None]  # [GROUPS, 1]
    j = b * BLOCK + tl.arange(0, BLOCK).to(tl.int64)[None, :]  # [1, BLOCK]
    valid = (c < n_groups) & (j < group_len)
    o = j // inner
    k = (o * n_groups + c) * inner + (j - o * inner)
    g = tl.load(g_ptr + k, mask=valid, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + k, mask=valid, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + c, mask=c < n_groups, other=1.0)
    out = estimator_grad(g, x, s, SIGNED, MODE)
    live = valid
    if FROZEN:
        off = tl.load(frozen_ptr + k, mask=valid, other=0) != 0
        out = tl.where(off, 0.0, out)
        live = live & ~off
    if ROUND_BF16:
        out = round_to_bf16(out)
    tl.store(out_ptr + k, out.to(out_ptr.dtype.element_ty), mask=valid)
    step = tl.math.div_rn(s, L)
    v = tl.math.div_rn(x, tl.where(step == 0, 1.0, step))
    n = grid_level(x, tl.where(step == 0, 1.0, step), lo, hi)
    d = tl.where((v >= lo) & (v <= hi), n - v, n)
    term = g.to(tl.float64) * d.to(tl.float64)
    term = tl.where(step == 0, 0.0, term)  # (a group of scale 0 gets no gradient)
    sums = tl.sum(tl.where(live, term, 0.0), axis=1)  # [GROUPS]
    row = tile * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    tl.store(part_ptr + row * n_blocks + b, sums, mask=row < n_groups)


def fake_quantize_lsq(x, scale, bits, signed=True, dim=None, group_size=None, grad="mad",
                      narrow=False, grad_scale=True):
    return fake_quantize(x, scale, bits, signed, dim, group_size, grad, narrow)


def fake_quantize_lsq_backward(grad_out, x, scale, bits, signed=True, dim=None, group_size=None,
                               grad="mad", narrow=False, grad_scale=True, frozen=None):
    check_dtype(x)
    g = groups(x, dim, group_size)
    L, lo, hi = levels(bits, signed, narrow)
    x = x.contiguous()
    grad_out = grad_out.to(x.dtype).contiguous()
    out = torch.empty_like(x)
    group_len = g.outer * g.inner
    block = block_size(group_len)
    tile = _TILE // block if group_len <= block else 1  # short groups: several per program
    n_blocks = triton.cdiv(group_len, block)
    partial = torch.empty((g.n_groups, n_blocks), dtype=torch.float64, device=x.device)
    launch(_lsq_backward_kernel, (triton.cdiv(g.n_groups, tile) * n_blocks,), x,
           grad_out, x, out, scale.reshape(-1).float().contiguous(), frozen_arg(frozen, x),
           partial, g.n_groups, g.inner, group_len, n_blocks, float(L), float(lo), float(hi),
           SIGNED=signed, MODE=GRADS.index(grad), FROZEN=frozen is not None,
           ROUND_BF16=exact_bf16_store(x.dtype), GROUPS=tile, BLOCK=block)
    coefficient = lsq_coefficient(group_len, bits, signed, narrow, grad_scale)
    return out, (partial.sum(1) * coefficient).float().reshape(g.scale_shape)
