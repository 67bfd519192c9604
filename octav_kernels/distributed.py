"""OCTAV over data split across ranks (torch.distributed): the scale single-process OCTAV gives on
the concatenated data, bit-identical on every rank.

Each rank holds a slice of the data along a dimension other than the grouping one (a
data-parallel batch of activations; rows or columns of a weight for a per-tensor scale, or the
non-channel dim for a per-channel one), so every rank has the same groups. An iteration of
SPEC §2 computes ``masked_sums`` locally with the fast kernels and does ONE all-reduce of the
packed ``(S_out, n_in, n_out)`` of all groups (float64: sums added in double, counts exact below
2**53 elements per group); every rank then applies the same update to the same totals, so all
hold the same bits.

Collectives per call: one per iteration, plus one for the start, plus a max-reduce only if some
iterate has nothing above it (the SPEC rule ``s_next = max a``); a warm start near the answer
needs a single all-reduce. A cold per-tensor start is one all-reduced histogram of the
magnitudes (2**15 bins of their float32 bit patterns, counts and exact sums): it gives the mean
of the nonzero magnitudes exactly and, for large data (>= 32768 elements over all ranks), the
recursion solved on it; the iteration then starts a few bins below that estimate and climbs to
the fixed point the plain iteration reaches (as the C++ backend's bracketed solver does on one
process): 4 collectives instead of 9 on the tests' 60K-element tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import _args, drivers, ops

__all__ = ["octav_scale", "max_scale", "all_reduce_sum", "all_reduce_mean", "all_reduce_max"]


def _check_group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("octav_kernels.distributed needs torch.distributed initialized "
                           "(torch.distributed.init_process_group)")
    return group if group is not None else dist.group.WORLD


def octav_scale(x: torch.Tensor, bits: int, *, signed: bool = True, dim: int | None = None,
                group_size: int | None = None, init: torch.Tensor | None = None,
                max_iters: int = _args.DEFAULT_MAX_ITERS, rtol: float = _args.DEFAULT_RTOL,
                narrow: bool = False, group=None, importance: torch.Tensor | None = None,
                return_all_reduces: bool = False):
    """``octav_kernels.octav_scale`` of the data of all ranks of ``group`` (default: the world),
    float32, identical on every rank. ``return_all_reduces=True`` also returns the number of
    collectives the call made (the same on every rank).

    ``importance`` (each rank's, broadcastable to its ``x``) weights the sums as in
    ``octav_scale`` (SPEC §2.1); the fallback for groups whose importance sums to 0 is decided
    on the totals of all ranks (one more all-reduce), and the cold start is the plain one (no
    histogram)."""
    if group_size is not None:
        raise ValueError("group_size: blocks along the last dim are rows of the local data, "
                         "not groups shared across ranks; use octav_kernels.octav_scale per "
                         "rank for per-block scales")
    _args.check_x(x)
    _args.check_bits(bits)
    _args.check_narrow(narrow, signed)
    _args.check_iteration(max_iters, rtol)
    g = _args.groups(x, dim, None)
    if init is not None:
        init = _args.check_scale(init, x, g, "init")
    importance = _args.check_importance(importance, x)
    group = _check_group(group)
    c = _args.octav_constant(bits, signed, narrow)
    calls = 0
    a_max = None
    if importance is not None:
        importance = _global_fallback(importance, x, g, group)
        calls += 1

    def global_max():
        nonlocal calls, a_max
        if a_max is None:
            a_max = (max_scale(x, signed=signed, dim=g.dim, group=group) if importance is None
                     else _weighted_max(x, importance, signed, g, group)).double().reshape(-1)
            calls += 1
        return a_max

    def step(s):
        nonlocal calls
        s_out, n_in, n_out = ops.masked_sums(x, s.float().reshape(g.scale_shape), signed=signed,
                                             dim=g.dim, importance=importance)
        packed = torch.stack([s_out.double().reshape(-1), n_in.double().reshape(-1),
                              n_out.double().reshape(-1)])
        dist.all_reduce(packed, group=group)
        calls += 1
        s_out, n_in, n_out = packed
        nxt = s_out / (c * n_in + n_out)
        top = n_out == 0 if importance is None else (n_out == 0) & (s_out == 0)
        if bool(top.any()):  # the same decision on every rank: the totals are shared
            nxt = torch.where(top, global_max(), nxt)
        return nxt.float().double()

    if (init is None and importance is None and g.n_groups == 1 and max_iters >= 16
            and rtol <= _args.DEFAULT_RTOL):
        start = _histogram_start(x, signed, c, group)
        calls += 1
        if start is not None:
            init = start
    s = drivers.fixed_point(step, g.n_groups, init, max_iters, rtol, x.device)
    s = s.float().reshape(g.scale_shape)
    return (s, calls) if return_all_reduces else s


def _global_fallback(importance, x, g, group):
    """``importance`` with the SPEC §2.1 fallback decided on all ranks' totals: a group whose
    importance sums to 0 over every rank is weighted 1 (one all-reduce)."""
    rows = _args.as_rows(importance.expand(x.shape), g.dim, None)
    totals = rows.double().sum(1)
    dist.all_reduce(totals, group=group)
    uninformed = totals == 0
    if not bool(uninformed.any()):
        return importance
    ones = torch.ones((), dtype=torch.float32, device=x.device)
    weights = torch.where(uninformed.unsqueeze(1), ones, rows)
    if g.dim is None:
        return weights.reshape(x.shape)
    return weights.reshape(x.movedim(g.dim, 0).shape).movedim(0, g.dim)


def _weighted_max(x, importance, signed, g, group):
    """The largest magnitude of positive importance per group over all ranks (one max-reduce)."""
    rows = _args.as_rows(x, g.dim, None)
    h = _args.as_rows(importance.expand(x.shape), g.dim, None)
    local = _args.positive_max(torch.where(h > 0, rows, torch.zeros((), dtype=rows.dtype,
                                                                    device=rows.device)), signed)
    dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
    return local


_KEY_SHIFT = 16  # float32 bits >> 16: 8 exponent and 7 mantissa bits, bins < 0.8% wide
_BINS = 1 << 15
_FIRST_NONFINITE = 0x7F800000 >> _KEY_SHIFT
_HISTOGRAM_MIN = 1 << 15
_BRACKET_BINS = 3


def _histogram_start(x, signed, c, group):
    """A start for a cold per-tensor scale from one all-reduced histogram of the magnitudes:
    just below the fixed point for large data, the mean of the nonzero magnitudes (the plain
    cold start) for small data; None (plain cold start) if there is none or NaN/inf."""
    a = x.reshape(-1).float()
    a = (a.abs() if signed else torch.where(a == float("-inf"), float("inf"), a)).clamp_min(0.0)
    keys = (a.view(torch.int32) >> _KEY_SHIFT).long()
    hist = torch.stack([torch.bincount(keys, minlength=_BINS).double(),
                        torch.bincount(keys, weights=a.double(), minlength=_BINS)]).cpu()
    dist.all_reduce(hist, group=group)
    counts, sums = hist[0, 1:_FIRST_NONFINITE], hist[1, 1:_FIRST_NONFINITE]  # bin 0: zeros
    total_n, total_s = float(counts.sum()), float(sums.sum())
    if total_n == 0 or float(hist[0, _FIRST_NONFINITE:].sum()) > 0:
        return None
    s = total_s / total_n  # the mean of the nonzero magnitudes
    if total_n >= _HISTOGRAM_MIN:
        s = _solve_on_histogram(counts, sums, s, c)
        key = int(torch.tensor(s, dtype=torch.float32).view(torch.int32)) >> _KEY_SHIFT
        bits = torch.tensor(max(key - _BRACKET_BINS, 1) << _KEY_SHIFT, dtype=torch.int32)
        s = float(bits.view(torch.float32))  # the lower edge of a bin a little below
    return torch.tensor(s, dtype=torch.float32, device=x.device)


def _solve_on_histogram(counts, sums, s, c):
    """The recursion on histogram bins 1.. (exact counts and sums per bin; only the bin that
    holds s is split, as if its values were spread uniformly), from s."""
    first = torch.arange(1, _FIRST_NONFINITE, dtype=torch.int32)
    lower = (first << _KEY_SHIFT).view(torch.float32).double()
    upper = ((first + 1) << _KEY_SHIFT).view(torch.float32).double()
    n_above = counts.flip(0).cumsum(0).flip(0) - counts  # in bins strictly above
    s_above = sums.flip(0).cumsum(0).flip(0) - sums
    n_below = counts.cumsum(0) - counts
    for _ in range(100):
        k = min(int(torch.searchsorted(upper, torch.tensor(s, dtype=torch.float64),
                                       right=True)), upper.numel() - 1)
        lo_k, hi_k, n_k = float(lower[k]), float(upper[k]), float(counts[k])
        frac = min(max((hi_k - s) / (hi_k - lo_k), 0.0), 1.0)  # the part of bin k above s
        n_out = float(n_above[k]) + n_k * frac
        n_in = float(n_below[k]) + n_k * (1 - frac)
        s_out = float(s_above[k]) + n_k * frac * 0.5 * (max(s, lo_k) + hi_k)
        nxt = s_out / (c * n_in + n_out) if n_out > 0.5 else hi_k
        if abs(nxt - s) <= 1e-9 * s:
            return nxt
        s = nxt
    return s


def max_scale(x: torch.Tensor, *, signed: bool = True, dim: int | None = None, group=None
              ) -> torch.Tensor:
    """The max baseline (SPEC §7) over all ranks: ``octav_kernels.max_scale`` of the
    concatenated data (the largest magnitude per group), float32. One max-reduce."""
    g = _args.groups(_args.check_x(x), dim, None)
    local = _args.positive_max(_args.as_rows(x, g.dim, None), signed).reshape(g.scale_shape)
    dist.all_reduce(local, op=dist.ReduceOp.MAX, group=_check_group(group))
    return local


def world_size(group=None) -> int:
    """The number of ranks of ``group`` (None: the default group)."""
    return dist.get_world_size(_check_group(group))


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """The elementwise sum of ``t`` over the ranks (a copy; ``t`` is not modified)."""
    out = t.clone()
    dist.all_reduce(out, group=_check_group(group))
    return out


def all_reduce_mean(scale: torch.Tensor, group=None) -> torch.Tensor:
    """The mean of ``scale`` over the ranks (static calibration: per-batch scales averaged over
    batches on each rank, then over ranks), float32, identical everywhere."""
    group = _check_group(group)
    total = scale.double().clone()
    dist.all_reduce(total, group=group)
    return (total / dist.get_world_size(group)).float()


def all_reduce_max(t: torch.Tensor, group=None) -> torch.Tensor:
    """The elementwise maximum of ``t`` over the ranks (a copy; ``t`` is not modified)."""
    group = _check_group(group)
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out
