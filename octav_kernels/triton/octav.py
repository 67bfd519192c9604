"""Triton kernels for the OCTAV statistics and fixed point (SPEC §2).

A pass over a group is a loop over its blocks of ``BLOCK`` elements in order: ``_block_stats``
gives a block's ``(S_out, n_in, n_out, max a)`` (the sum in float64, counts in int64). The pass
adds the float64 sums in two levels: block after block within chunks of ``CHUNK_BLOCKS`` blocks,
then the chunks' sums chunk after chunk (the counts are exact in any order). Element ``j`` of
group ``c`` is ``x[j // inner, c, j % inner]`` of the contiguous ``[outer, n_groups, inner]``
view.

With an importance (SPEC §2.1; ``HAS_H``) the pass also reads ``kernel_importance``'s
``[P, group_len]`` table: element ``j`` of group ``c`` is weighted by ``h[c % P, j]``. It then
gives ``(sum h a 1{out}, sum h 1{in}, sum h 1{out}, max a of positive h)``: each term ``h * a``
a float64 product (exact for float32 operands; a NaN or inf entry of importance 0 gives NaN),
the weights summed in float64 block after block like S_out. Without it (``HAS_H=False``) the
kernels compile to the unweighted code.

Two launch shapes, the same sums bit for bit:

- groups below ``MULTI_MIN`` elements: one program per group. ``_octav_scale_kernel`` repeats the
  pass until the group converges, keeping the iterate on-chip: one launch, no host sync.
- larger groups (a whole large tensor): a pass is spread over one program per block
  (``_blocks_kernel`` writes each block's statistics), then ``_finish_kernel`` adds them per
  group in the one-program pass's order and takes the iteration's step. It adds the blocks of
  up to 512 chunks side by side (one vector add per block of a chunk), then the chunks' sums in
  order: about ``CHUNK_BLOCKS + n_chunks`` dependent steps instead of one per block (10^5 at
  10^8 elements). The iteration is ``max_iters + 1`` such pairs of launches; a group that has
  stopped skips its share (a launch whose programs exit at once, ~10 µs a pair on a GPU).
  Launching fewer would need the host to read the device's done flags: a sync per check, more
  than the launches it saves, and no CUDA graph capture.

The OCTAV constant and ``rtol`` are read from a float64 device tensor: compiled Triton passes
Python floats as float32, which would round ``1 / (12 L**2)`` before the float64 update (the
interpreter keeps them float64, so the CPU tests could not tell). The update runs without FMA
contraction (``enable_fp_fusion=False``), as in the reference.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._args import DEFAULT_MAX_ITERS, DEFAULT_RTOL, groups, kernel_importance, octav_constant
from ._common import block_size, check_dtype, launch
from .fake_quant import fake_quantize, fake_quantize_packed

MULTI_MIN = 1 << 20  # elements of a group from which a pass is spread over many programs
_BLOCK = 1024  # block of the one-program pass of groups that large (block_size's largest)
CHUNK_BLOCKS = 256  # blocks whose float64 sums a pass adds before adding them to the total
_CHUNK_TILE = 512  # chunks the multi-program finish adds side by side


@triton.jit
def _magnitude(v, SIGNED: tl.constexpr):
    # |x| signed; x unsigned with -inf mapped to +inf so non-finite entries reach the scale.
    if SIGNED:
        return tl.abs(v)
    return tl.where(tl.abs(v) == float("inf"), float("inf"), v)


@triton.jit
def _block_stats(x_ptr, h_ptr, h_rows, c, n_groups, inner, group_len, b, s,
                 SIGNED: tl.constexpr, HAS_H: tl.constexpr, BLOCK: tl.constexpr):
    # Statistics of block b (int64) of group c at threshold s; with HAS_H weighted by row
    # c % h_rows of the importance table, the weights in float64 in place of the int64 counts.
    j = b * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = j < group_len
    o = j // inner
    ptr = x_ptr + (o * n_groups + c) * inner + (j - o * inner)
    a = _magnitude(tl.load(ptr, mask=valid, other=0.0).to(tl.float32), SIGNED)
    out = valid & ((a > s) | (a != a))
    inside = valid & (a > 0) & (a <= s)
    if HAS_H:
        h = tl.load(h_ptr + (c % h_rows) * group_len + j, mask=valid, other=0.0)
        w = h.to(tl.float64)
        # the product, exact in float64: NaN, or inf of importance 0, reaches S_out
        s_out = tl.sum(tl.where(out, w * a.to(tl.float64), 0.0), axis=0)
        n_out = tl.sum(tl.where(out, w, 0.0), axis=0)
        n_in = tl.sum(tl.where(inside, w, 0.0), axis=0)
        a_max = tl.max(tl.where(valid & (a > 0) & (h > 0), a, 0.0), axis=0)
    else:
        # float64: magnitudes near float32's max must not overflow
        s_out = tl.sum(tl.where(out, a, 0.0).to(tl.float64), axis=0)
        n_out = tl.sum(out.to(tl.int64), axis=0)
        n_in = tl.sum(inside.to(tl.int64), axis=0)
        a_max = tl.max(tl.where(valid & (a > 0), a, 0.0), axis=0)
    return s_out, n_in, n_out, a_max


@triton.jit
def _group_pass(x_ptr, h_ptr, h_rows, c, n_groups, inner, group_len, s, SIGNED: tl.constexpr,
                HAS_H: tl.constexpr, BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr):
    # The float64 sums (S_out, and the weights with HAS_H) block after block within a chunk of
    # CHUNK_BLOCKS blocks, each chunk's then added to the total: the multi-program finish's order.
    s_out = tl.zeros((), tl.float64)
    chunk_s = tl.zeros((), tl.float64)
    if HAS_H:
        n_in = tl.zeros((), tl.float64)
        n_out = tl.zeros((), tl.float64)
        chunk_i = tl.zeros((), tl.float64)
        chunk_o = tl.zeros((), tl.float64)
    else:
        n_in = tl.zeros((), tl.int64)
        n_out = tl.zeros((), tl.int64)
    a_max = tl.zeros((), tl.float32)
    # A 64-bit block counter: an int32 element index would wrap for groups near 2**31.
    n_blocks = (group_len.to(tl.int64) + (BLOCK - 1)) // BLOCK
    for b in range(0, n_blocks):
        bs, bi, bo, bm = _block_stats(x_ptr, h_ptr, h_rows, c, n_groups, inner, group_len, b, s,
                                      SIGNED, HAS_H, BLOCK)
        end = ((b + 1) % CHUNK_BLOCKS == 0) | (b + 1 == n_blocks)  # of a chunk
        chunk_s += bs
        s_out = tl.where(end, s_out + chunk_s, s_out)
        chunk_s = tl.where(end, 0.0, chunk_s)
        if HAS_H:
            chunk_i += bi
            chunk_o += bo
            n_in = tl.where(end, n_in + chunk_i, n_in)
            n_out = tl.where(end, n_out + chunk_o, n_out)
            chunk_i = tl.where(end, 0.0, chunk_i)
            chunk_o = tl.where(end, 0.0, chunk_o)
        else:
            n_in += bi
            n_out += bo
        a_max = tl.maximum(a_max, bm)
    return s_out, n_in, n_out, a_max


@triton.jit
def _next(s_out, n_in, n_out, a_max, octav_const, HAS_H: tl.constexpr):
    # s_next = S_out / (c n_in + n_out), or max a when nothing lies above s (weighted: when no
    # weight lies above s and S_out is 0, so a NaN S_out stays NaN).
    if HAS_H:
        top = (n_out == 0) & (s_out == 0)
    else:
        top = n_out == 0
    den = octav_const * n_in.to(tl.float64) + n_out.to(tl.float64)
    den = tl.where(top, 1.0, den)
    return tl.where(top, a_max, (s_out / den).to(tl.float32))


@triton.jit
def _step(s, prev, nxt, rtol):
    # The SPEC §2 stopping rules: (the next iterate, whether the iteration ends).
    converged = (nxt == s) | (tl.abs(nxt.to(tl.float64) - s.to(tl.float64)) <= rtol * s) | (
        nxt != nxt)
    cycle = (nxt == prev) & (not converged)  # 2-cycle: keep the smaller of the two
    stop = converged | cycle
    return tl.where(cycle, tl.minimum(s, nxt), nxt), stop


@triton.jit
def _store_sums(s_out_ptr, n_in_ptr, n_out_ptr, c, s_out, n_in, n_out, HAS_H: tl.constexpr):
    # S_out in float32; the counts as int64, the weights (HAS_H) in float32.
    tl.store(s_out_ptr + c, s_out.to(tl.float32))
    if HAS_H:
        tl.store(n_in_ptr + c, n_in.to(tl.float32))
        tl.store(n_out_ptr + c, n_out.to(tl.float32))
    else:
        tl.store(n_in_ptr + c, n_in)
        tl.store(n_out_ptr + c, n_out)


@triton.jit
def _masked_sums_kernel(x_ptr, h_ptr, h_rows, scale_ptr, s_out_ptr, n_in_ptr, n_out_ptr,
                        n_groups, inner, group_len, SIGNED: tl.constexpr, HAS_H: tl.constexpr,
                        BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    s = tl.load(scale_ptr + c)
    s_out, n_in, n_out, _ = _group_pass(x_ptr, h_ptr, h_rows, c, n_groups, inner, group_len, s,
                                        SIGNED, HAS_H, BLOCK, CHUNK_BLOCKS)
    _store_sums(s_out_ptr, n_in_ptr, n_out_ptr, c, s_out, n_in, n_out, HAS_H)


@triton.jit
def _octav_scale_kernel(x_ptr, h_ptr, h_rows, init_ptr, out_ptr, consts_ptr, n_groups, inner,
                        group_len, max_iters, HAS_INIT: tl.constexpr, SIGNED: tl.constexpr,
                        HAS_H: tl.constexpr, BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    octav_const = tl.load(consts_ptr)
    rtol = tl.load(consts_ptr + 1)
    s = tl.zeros((), tl.float32)
    if HAS_INIT:
        s = tl.load(init_ptr + c)
    if not s > 0:  # cold start (also for NaN or non-positive init): the mean of the nonzero a
        s_out, n_in, n_out, a_max = _group_pass(x_ptr, h_ptr, h_rows, c, n_groups, inner,
                                                group_len, 0.0, SIGNED, HAS_H, BLOCK,
                                                CHUNK_BLOCKS)
        s = _next(s_out, n_in, n_out, a_max, octav_const, HAS_H)
    prev = tl.full((), float("nan"), tl.float32)
    done = tl.zeros((), tl.int1)
    it = tl.zeros((), tl.int32)  # a tensor from the start: loop-carried types must not change
    while (it < max_iters) & (not done):
        s_out, n_in, n_out, a_max = _group_pass(x_ptr, h_ptr, h_rows, c, n_groups, inner,
                                                group_len, s, SIGNED, HAS_H, BLOCK,
                                                CHUNK_BLOCKS)
        new, done = _step(s, prev, _next(s_out, n_in, n_out, a_max, octav_const, HAS_H), rtol)
        prev = s
        s = new
        it += 1
    tl.store(out_ptr + c, s)


# ---------------------------------------------------------------------------------------------
# Groups of MULTI_MIN elements and more: a pass over many programs, a finish per group. The
# per-group state is s, prev (float32), the iterations done and a flags word
# (bit 0: started, i.e. s is an iterate; bit 1: done). A block's counts are int64 (its weights
# float64 with HAS_H: the partials' buffer is then float64).


@triton.jit
def _blocks_kernel(x_ptr, h_ptr, h_rows, s_ptr, state_ptr, part_s_ptr, part_n_ptr, part_m_ptr,
                   n_groups, inner, group_len, n_blocks, SIGNED: tl.constexpr, HAS_H: tl.constexpr,
                   BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    c = pid // n_blocks
    b = pid - c * n_blocks
    flags = tl.load(state_ptr + c)
    if (flags & 2) == 0:  # not done
        s = tl.where((flags & 1) != 0, tl.load(s_ptr + c), 0.0)  # a cold start passes at 0
        bs, bi, bo, bm = _block_stats(x_ptr, h_ptr, h_rows, c, n_groups, inner, group_len, b, s,
                                      SIGNED, HAS_H, BLOCK)
        tl.store(part_s_ptr + pid, bs)
        tl.store(part_n_ptr + 2 * pid, bi)
        tl.store(part_n_ptr + 2 * pid + 1, bo)
        tl.store(part_m_ptr + pid, bm)


@triton.jit
def _sum_blocks(part_s_ptr, part_n_ptr, part_m_ptr, c, n_blocks, HAS_H: tl.constexpr,
                CHUNK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr, TILE: tl.constexpr):
    # Group c's statistics from its blocks', in the one-program pass's order: the float64 sums
    # (S_out, and the weights with HAS_H) of each chunk of CHUNK_BLOCKS blocks, TILE chunks side
    # by side, then the chunks' sums one after another (the where-sum picks one chunk's sum
    # exactly: the other terms are 0); the counts and the max in CHUNKs (exact in any order).
    s_out = tl.zeros((), tl.float64)
    if HAS_H:
        n_in = tl.zeros((), tl.float64)
        n_out = tl.zeros((), tl.float64)
    else:
        n_in = tl.zeros((), tl.int64)
        n_out = tl.zeros((), tl.int64)
    a_max = tl.zeros((), tl.float32)
    first = c * n_blocks
    n_chunks = (n_blocks + (CHUNK_BLOCKS - 1)) // CHUNK_BLOCKS
    lanes = tl.arange(0, TILE)
    for t in range(0, (n_chunks + (TILE - 1)) // TILE):
        chunk = t * TILE + lanes.to(tl.int64)
        sums = tl.zeros((TILE,), tl.float64)
        if HAS_H:
            ins = tl.zeros((TILE,), tl.float64)
            outs = tl.zeros((TILE,), tl.float64)
        for k in range(0, CHUNK_BLOCKS):
            b = chunk * CHUNK_BLOCKS + k
            valid = b < n_blocks
            sums += tl.load(part_s_ptr + first + b, mask=valid, other=0.0)
            if HAS_H:
                ins += tl.load(part_n_ptr + 2 * (first + b), mask=valid, other=0.0)
                outs += tl.load(part_n_ptr + 2 * (first + b) + 1, mask=valid, other=0.0)
        for i in range(0, tl.minimum(TILE, n_chunks - t * TILE)):
            pick = lanes == i
            s_out += tl.sum(tl.where(pick, sums, 0.0), axis=0)
            if HAS_H:
                n_in += tl.sum(tl.where(pick, ins, 0.0), axis=0)
                n_out += tl.sum(tl.where(pick, outs, 0.0), axis=0)
    for k in range(0, (n_blocks + (CHUNK - 1)) // CHUNK):
        i = k * CHUNK + tl.arange(0, CHUNK).to(tl.int64)
        valid = i < n_blocks
        if not HAS_H:
            n_in += tl.sum(tl.load(part_n_ptr + 2 * (first + i), mask=valid, other=0), axis=0)
            n_out += tl.sum(tl.load(part_n_ptr + 2 * (first + i) + 1, mask=valid, other=0),
                            axis=0)
        a_max = tl.maximum(a_max, tl.max(tl.load(part_m_ptr + first + i, mask=valid, other=0.0),
                                         axis=0))
    return s_out, n_in, n_out, a_max


@triton.jit
def _finish_kernel(s_ptr, prev_ptr, iters_ptr, state_ptr, consts_ptr, part_s_ptr, part_n_ptr,
                   part_m_ptr, n_blocks, max_iters, HAS_H: tl.constexpr, CHUNK: tl.constexpr,
                   CHUNK_BLOCKS: tl.constexpr, TILE: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    flags = tl.load(state_ptr + c)
    if (flags & 2) == 0:
        s_out, n_in, n_out, a_max = _sum_blocks(part_s_ptr, part_n_ptr, part_m_ptr, c, n_blocks,
                                                HAS_H, CHUNK, CHUNK_BLOCKS, TILE)
        nxt = _next(s_out, n_in, n_out, a_max, tl.load(consts_ptr), HAS_H)
        if (flags & 1) == 0:  # the cold start
            tl.store(s_ptr + c, nxt)
            tl.store(state_ptr + c, tl.where(max_iters == 0, 3, 1))
        else:
            s = tl.load(s_ptr + c)
            new, stop = _step(s, tl.load(prev_ptr + c), nxt, tl.load(consts_ptr + 1))
            it = tl.load(iters_ptr + c) + 1
            tl.store(prev_ptr + c, s)
            tl.store(s_ptr + c, new)
            tl.store(iters_ptr + c, it)
            tl.store(state_ptr + c, tl.where(stop | (it >= max_iters), 3, 1))


@triton.jit
def _sums_finish_kernel(part_s_ptr, part_n_ptr, part_m_ptr, s_out_ptr, n_in_ptr, n_out_ptr,
                        n_blocks, HAS_H: tl.constexpr, CHUNK: tl.constexpr,
                        CHUNK_BLOCKS: tl.constexpr, TILE: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    s_out, n_in, n_out, _ = _sum_blocks(part_s_ptr, part_n_ptr, part_m_ptr, c, n_blocks, HAS_H,
                                        CHUNK, CHUNK_BLOCKS, TILE)
    _store_sums(s_out_ptr, n_in_ptr, n_out_ptr, c, s_out, n_in, n_out, HAS_H)


class _Partials:
    """Per-block statistics of the multi-program passes of n_groups groups (the weights of a
    weighted pass, ``h`` given, in float64 where the counts are int64)."""

    def __init__(self, n_groups, group_len, device, weighted=False):
        self.n_blocks = triton.cdiv(group_len, _BLOCK)
        count = n_groups * self.n_blocks
        self.s = torch.empty(count, dtype=torch.float64, device=device)
        self.n = torch.empty(2 * count, dtype=torch.float64 if weighted else torch.int64,
                             device=device)
        self.m = torch.empty(count, dtype=torch.float32, device=device)

    def pass_(self, x, h, g, s, state, signed):
        launch(_blocks_kernel, (g.n_groups * self.n_blocks,), x, x, *_importance_args(x, h), s,
               state, self.s, self.n, self.m, g.n_groups, g.inner, g.outer * g.inner,
               self.n_blocks, SIGNED=signed, HAS_H=h is not None, BLOCK=_BLOCK)


@functools.lru_cache(maxsize=64)
def _constants(device: torch.device, octav_const: float, rtol: float) -> torch.Tensor:
    """(octav_const, rtol) as a float64 tensor on ``device`` (made once per value)."""
    return torch.tensor([octav_const, rtol], dtype=torch.float64, device=device)


def _importance_args(x, h):
    """The kernels' (h_ptr, h_rows): ``kernel_importance``'s table and its row count P; without
    importance x and 1, which the HAS_H=False kernels never read."""
    return (x, 1) if h is None else (h, h.shape[0])


def masked_sums(x, scale, signed=True, dim=None, group_size=None, importance=None):
    check_dtype(x)
    g = groups(x, dim, group_size)
    h = kernel_importance(importance, x, g, fallback=False)
    x = x.contiguous()
    scale = scale.reshape(-1).float().contiguous()
    s_out = torch.empty(g.n_groups, dtype=torch.float32, device=x.device)
    n_in = torch.empty(g.n_groups, dtype=torch.int64 if h is None else torch.float32,
                       device=x.device)  # the weights are float32
    n_out = torch.empty_like(n_in)
    group_len = g.outer * g.inner
    if group_len >= MULTI_MIN:
        parts = _Partials(g.n_groups, group_len, x.device, h is not None)
        started = torch.ones(g.n_groups, dtype=torch.int32, device=x.device)  # pass at scale
        parts.pass_(x, h, g, scale, started, signed)
        launch(_sums_finish_kernel, (g.n_groups,), x, parts.s, parts.n, parts.m, s_out, n_in,
               n_out, parts.n_blocks, HAS_H=h is not None, CHUNK=1024,
               CHUNK_BLOCKS=CHUNK_BLOCKS, TILE=_CHUNK_TILE)
    else:
        launch(_masked_sums_kernel, (g.n_groups,), x, x, *_importance_args(x, h), scale, s_out,
               n_in, n_out, g.n_groups, g.inner, group_len, SIGNED=signed, HAS_H=h is not None,
               BLOCK=block_size(group_len), CHUNK_BLOCKS=CHUNK_BLOCKS)
    shape = g.scale_shape
    return s_out.reshape(shape), n_in.reshape(shape), n_out.reshape(shape)


def octav_scale(x, bits, signed=True, dim=None, group_size=None, init=None,
                max_iters=DEFAULT_MAX_ITERS, rtol=DEFAULT_RTOL, narrow=False, importance=None):
    check_dtype(x)
    g = groups(x, dim, group_size)
    h = kernel_importance(importance, x, g)
    x = x.contiguous()
    consts = _constants(x.device, octav_constant(bits, signed, narrow), float(rtol))
    out = torch.empty(g.n_groups, dtype=torch.float32, device=x.device)
    init_flat = None if init is None else init.reshape(-1).float().contiguous()
    group_len = g.outer * g.inner
    if group_len >= MULTI_MIN:
        return _octav_scale_multi(x, h, g, init_flat, consts, max_iters, signed).reshape(
            g.scale_shape)
    launch(_octav_scale_kernel, (g.n_groups,), x, x, *_importance_args(x, h),
           out if init_flat is None else init_flat, out, consts, g.n_groups, g.inner, group_len,
           max_iters, HAS_INIT=init is not None, SIGNED=signed, HAS_H=h is not None,
           BLOCK=block_size(group_len), CHUNK_BLOCKS=CHUNK_BLOCKS, enable_fp_fusion=False)
    return out.reshape(g.scale_shape)


def _octav_scale_multi(x, h, g, init, consts, max_iters, signed):
    """octav_scale of large groups: max_iters + 1 (pass, finish) pairs; groups that have
    stopped skip theirs."""
    device = x.device
    s = torch.zeros(g.n_groups, dtype=torch.float32, device=device)
    if init is not None:
        s = torch.where(init > 0, init, s)  # (NaN and non-positive inits start cold)
    state = (s > 0).to(torch.int32)
    if max_iters == 0:
        state = state * 3  # warm groups are done; cold ones take their start
    prev = torch.full_like(s, float("nan"))
    iters = torch.zeros(g.n_groups, dtype=torch.int32, device=device)
    parts = _Partials(g.n_groups, g.outer * g.inner, device, h is not None)
    for _ in range(max_iters + 1):
        parts.pass_(x, h, g, s, state, signed)
        launch(_finish_kernel, (g.n_groups,), x, s, prev, iters, state, consts, parts.s,
               parts.n, parts.m, parts.n_blocks, max_iters, HAS_H=h is not None, CHUNK=1024,
               CHUNK_BLOCKS=CHUNK_BLOCKS, TILE=_CHUNK_TILE, enable_fp_fusion=False)
    return s


def octav_fake_quantize(x, bits, signed=True, dim=None, group_size=None, grad="mad", init=None,
                        narrow=False, importance=None):
    scale = octav_scale(x, bits, signed, dim, group_size, init, narrow=narrow,
                        importance=importance)
    return fake_quantize(x, scale, bits, signed, dim, group_size, grad, narrow), scale


def octav_fake_quantize_packed(x, bits, signed=True, dim=None, group_size=None, init=None,
                               narrow=False, importance=None):
    scale = octav_scale(x, bits, signed, dim, group_size, init, narrow=narrow,
                        importance=importance)
    y, mask = fake_quantize_packed(x, scale, bits, signed, dim, group_size, narrow)
    return y, scale, mask
