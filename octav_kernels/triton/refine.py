"""Triton kernel for one pass of the refinement search: the squared quantization error of K
candidate scales per group (``octav_kernels.reference.candidate_sse``); the search itself
(``reference.refine_search``) updates the candidates with torch ops on the device.

A program reads ``BLOCK`` elements of each of ``GROUPS`` groups (several short groups per program,
one block of a long one) once and writes the float64 sums of ``(q(x; cand[g, k]) - x)**2`` for
every k (with an importance, ``HAS_H``: ``h * (q - x)**2``, h in float64, element j of group g
weighted by row ``g % P`` of ``kernel_importance``'s ``[P, group_len]`` table); the blocks'
partials are added by a torch sum. ``refine_scale`` runs the shared search
(``octav_kernels.drivers``) over these passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import drivers
from .._args import groups, kernel_importance, kernel_layout, levels
from ._common import block_size, check_dtype, launch, quantize

_TILE = 4096  # elements a program reads: GROUPS * BLOCK


@triton.jit
def _candidate_sse_kernel(x_ptr, h_ptr, h_rows, cand_ptr, out_ptr, group_len, n_groups, inner,
                          n_blocks, L, lo, hi, K: tl.constexpr, GROUPS: tl.constexpr,
                          HAS_H: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # one flat grid of (group tile, block) pairs
    tile = pid // n_blocks
    b = pid - tile * n_blocks
    g = tile * GROUPS + tl.arange(0, GROUPS).to(tl.int64)[:, None]  # [GROUPS, 1]
    j = b * BLOCK + tl.arange(0, BLOCK)[None, :]  # [1, BLOCK]
    valid = (g < n_groups) & (j < group_len)
    o = j // inner
    x = tl.load(x_ptr + (o * n_groups + g) * inner + (j - o * inner), mask=valid,
                other=0.0).to(tl.float32)
    exact = x.to(tl.float64)
    if HAS_H:  # element j of group g: row g % h_rows of the importance table
        w = tl.load(h_ptr + (g % h_rows) * group_len + j, mask=valid, other=0.0).to(tl.float64)
    for k in tl.static_range(K):
        s = tl.load(cand_ptr + g * K + k, mask=g < n_groups, other=1.0)
        d = quantize(x, tl.math.div_rn(s, L), lo, hi).to(tl.float64) - exact
        sq = d * d
        if HAS_H:
            sq = w * sq
        err = tl.sum(tl.where(valid, sq, 0.0), axis=1)  # [GROUPS]
        row = tile * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
        tl.store(out_ptr + (row * n_blocks + b) * K + k, err, mask=row < n_groups)


def candidate_sse(x, cand, bits, signed=True, dim=None, group_size=None, narrow=False,
                  importance=None):
    check_dtype(x)
    g = groups(x, dim, group_size)
    h = kernel_importance(importance, x, g)
    x, outer, n_groups, inner = kernel_layout(x, g)
    group_len = outer * inner
    block = block_size(group_len, _TILE)
    tile = _TILE // block  # short groups: several per program
    n_blocks = triton.cdiv(group_len, block)
    K = cand.shape[1]
    partial = torch.empty((n_groups, n_blocks, K), dtype=torch.float64, device=x.device)
    L, lo, hi = levels(bits, signed, narrow)
    launch(_candidate_sse_kernel, (triton.cdiv(n_groups, tile) * n_blocks,), x,
        x, *((x, 1) if h is None else (h, h.shape[0])), cand.float().contiguous(), partial,
        group_len, n_groups, inner, n_blocks, float(L), float(lo), float(hi), K=K, GROUPS=tile,
        HAS_H=h is not None, BLOCK=block)
    return partial.sum(1)


def refine_scale(x, scale, bits, signed=True, dim=None, group_size=None, narrow=False,
                 importance=None):
    return drivers.refine_scale(candidate_sse, x, scale, bits, signed, dim, group_size, narrow,
                                importance)
