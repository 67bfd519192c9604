"""Triton kernels for the OCTAV statistics and fixed point (SPEC §2).

One program per group. ``_group_pass`` reads the group once and returns
``(S_out, n_in, n_out, max a)`` together; ``_octav_scale_kernel`` repeats it until the group
converges, keeping the iterate on-chip, so an op is one launch and never syncs with the host.
Sums accumulate in float64, counts in int64. Element ``j`` of group ``c`` is
``x[j // inner, c, j % inner]`` of the contiguous ``[outer, n_groups, inner]`` view.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._args import groups, octav_constant
from ._common import block_size, check_dtype


@triton.jit
def _magnitude(v, SIGNED: tl.constexpr):
    # |x| signed; x unsigned with -inf mapped to +inf so non-finite entries reach the scale.
    if SIGNED:
        return tl.abs(v)
    return tl.where(tl.abs(v) == float("inf"), float("inf"), v)


@triton.jit
def _group_pass(x_ptr, c, n_groups, inner, group_len, s, SIGNED: tl.constexpr,
                BLOCK: tl.constexpr):
    s_out = tl.zeros((), tl.float64)  # float64: magnitudes near float32's max must not overflow
    n_in = tl.zeros((), tl.int64)
    n_out = tl.zeros((), tl.int64)
    a_max = tl.zeros((), tl.float32)
    for start in range(0, group_len, BLOCK):
        j = start + tl.arange(0, BLOCK).to(tl.int64)
        valid = j < group_len
        o = j // inner
        ptr = x_ptr + (o * n_groups + c) * inner + (j - o * inner)
        a = _magnitude(tl.load(ptr, mask=valid, other=0.0).to(tl.float32), SIGNED)
        out = valid & ((a > s) | (a != a))
        inside = valid & (a > 0) & (a <= s)
        s_out += tl.sum(tl.where(out, a, 0.0).to(tl.float64), axis=0)
        n_out += tl.sum(out.to(tl.int64), axis=0)
        n_in += tl.sum(inside.to(tl.int64), axis=0)
        a_max = tl.maximum(a_max, tl.max(tl.where(valid & (a > 0), a, 0.0), axis=0))
    return s_out, n_in, n_out, a_max


@triton.jit
def _next_scale(x_ptr, c, n_groups, inner, group_len, s, octav_const, SIGNED: tl.constexpr,
                BLOCK: tl.constexpr):
    # s_next = S_out / (c n_in + n_out), or max a when nothing lies above s.
    s_out, n_in, n_out, a_max = _group_pass(x_ptr, c, n_groups, inner, group_len, s, SIGNED, BLOCK)
    den = octav_const * n_in.to(tl.float64) + n_out.to(tl.float64)
    den = tl.where(n_out == 0, 1.0, den)
    return tl.where(n_out == 0, a_max, (s_out / den).to(tl.float32))


@triton.jit
def _masked_sums_kernel(x_ptr, scale_ptr, s_out_ptr, n_in_ptr, n_out_ptr, n_groups, inner,
                        group_len, SIGNED: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    s = tl.load(scale_ptr + c)
    s_out, n_in, n_out, _ = _group_pass(x_ptr, c, n_groups, inner, group_len, s, SIGNED, BLOCK)
    tl.store(s_out_ptr + c, s_out.to(tl.float32))
    tl.store(n_in_ptr + c, n_in)
    tl.store(n_out_ptr + c, n_out)


@triton.jit
def _octav_scale_kernel(x_ptr, init_ptr, out_ptr, n_groups, inner, group_len, octav_const,
                        max_iters, rtol, HAS_INIT: tl.constexpr, SIGNED: tl.constexpr,
                        BLOCK: tl.constexpr):
    c = tl.program_id(0)
    s = tl.zeros((), tl.float32)
    if HAS_INIT:
        s = tl.load(init_ptr + c)
    if not s > 0:  # cold start (also for NaN or non-positive init): the mean of the nonzero a
        s = _next_scale(x_ptr, c, n_groups, inner, group_len, 0.0, octav_const, SIGNED, BLOCK)
    prev = tl.full((), float("nan"), tl.float32)
    done = tl.zeros((), tl.int1)
    it = tl.zeros((), tl.int32)  # a tensor from the start: loop-carried types must not change
    while (it < max_iters) & (not done):
        nxt = _next_scale(x_ptr, c, n_groups, inner, group_len, s, octav_const, SIGNED, BLOCK)
        converged = (nxt == s) | (tl.abs(nxt - s) <= rtol * s) | (nxt != nxt)
        cycle = (nxt == prev) & (not converged)  # 2-cycle: keep the smaller of the two
        prev = s
        s = tl.where(cycle, tl.minimum(s, nxt), nxt)
        done = converged | cycle
        it += 1
    tl.store(out_ptr + c, s)


def masked_sums(x, scale, signed=True, dim=None, group_size=None):
    check_dtype(x)
    g = groups(x, dim, group_size)
    x = x.contiguous()
    s_out = torch.empty(g.n_groups, dtype=torch.float32, device=x.device)
    n_in = torch.empty(g.n_groups, dtype=torch.int64, device=x.device)
    n_out = torch.empty_like(n_in)
    group_len = g.outer * g.inner
    _masked_sums_kernel[(g.n_groups,)](
        x, scale.reshape(-1).float().contiguous(), s_out, n_in, n_out, g.n_groups, g.inner,
        group_len, SIGNED=signed, BLOCK=block_size(group_len))
    shape = g.scale_shape
    return s_out.reshape(shape), n_in.reshape(shape), n_out.reshape(shape)


def octav_scale(x, bits, signed=True, dim=None, group_size=None, init=None, max_iters=32,
                rtol=1e-6, narrow=False):
    check_dtype(x)
    g = groups(x, dim, group_size)
    x = x.contiguous()
    out = torch.empty(g.n_groups, dtype=torch.float32, device=x.device)
    init_flat = out if init is None else init.reshape(-1).float().contiguous()
    group_len = g.outer * g.inner
    _octav_scale_kernel[(g.n_groups,)](
        x, init_flat, out, g.n_groups, g.inner, group_len, octav_constant(bits, signed, narrow),
        max_iters, rtol, HAS_INIT=init is not None, SIGNED=signed, BLOCK=block_size(group_len))
    return out.reshape(g.scale_shape)
