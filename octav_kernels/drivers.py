"""Host-side drivers shared by backends whose kernels compute one pass each: the SPEC §2
fixed-point iteration over a ``step`` function (distributed OCTAV, whose step all-reduces the
sums of its ranks), and the refinement search of SPEC §8 over a ``candidate_sse`` pass (the
CUDA and Triton backends). Vectorized over groups with torch ops on the data's device, so a
driver never synchronizes with the host except where it says so.

These are implementations of the definitions, not the definitions: ``octav_kernels.reference``
implements both independently (the parity tests compare the two), and the C++ backend runs its
own search and iteration inside its kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._args import (
    REFINE_COARSE,
    REFINE_ROUNDS,
    REFINE_SPREAD,
    as_rows,
    cube_root,
    groups,
    positive_max,
    transposed_for_kernels,
)


def fixed_point(step: Callable[[torch.Tensor], torch.Tensor], n_groups: int,
                init: torch.Tensor | None, max_iters: int, rtol: float,
                device: torch.device) -> torch.Tensor:
    """The SPEC §2 iteration of ``step`` (float64 ``[n_groups]`` iterate -> the next one, rounded
    to float32) with its start and stopping rules; returns the scale (float64 ``[n_groups]``).

    The cold start (one step from s = 0: the mean of the nonzero magnitudes) is taken only for
    groups without an ``init`` > 0. Stops per group at ``|s_next - s| <= rtol * s`` (or
    s_next == s, or NaN), or at a 2-cycle (s_next == s_prev: the smaller of the two). One host
    sync per step (whether every group has stopped).
    """
    s = None if init is None else init.float().double().reshape(-1)
    if s is None or not bool((s > 0).all()):
        cold = step(torch.zeros(n_groups, dtype=torch.float64, device=device))
        s = cold if s is None else torch.where(s > 0, s, cold)
    prev = torch.full_like(s, float("nan"))
    done = torch.zeros_like(s, dtype=torch.bool)
    for _ in range(max_iters):
        nxt = step(s)
        converged = (nxt == s) | ((nxt - s).abs() <= rtol * s) | torch.isnan(nxt)
        cycle = ~converged & (nxt == prev)
        result = torch.where(cycle, torch.minimum(s, nxt), nxt)
        prev = torch.where(done, prev, s)
        s = torch.where(done, s, result)
        done = done | converged | cycle
        if bool(done.all()):
            break
    return s


def refine_search(sse: Callable[[torch.Tensor], torch.Tensor], scale: torch.Tensor,
                  a_max: torch.Tensor) -> torch.Tensor:
    """The search of ``reference.refine_scale`` for all groups at once: ``sse`` maps float32
    candidates ``[n_groups, K]`` to their float64 squared errors (one pass over the data);
    ``scale`` and ``a_max`` are per group. Returns float32 ``[n_groups]``."""
    s0 = scale.double().reshape(-1)
    m = a_max.double().reshape(-1)
    start = torch.where((s0 > 0) & torch.isfinite(s0), s0, m)
    ok = (start > 0) & torch.isfinite(start) & (m > 0) & torch.isfinite(m)
    start = torch.where(ok, start, 1.0)
    top = torch.where(ok, m, 1.0)
    # Quotients by tensors, not Python numbers (CUDA multiplies by the reciprocal of those).
    low = start / torch.full_like(start, REFINE_SPREAD)
    ratio = cube_root(torch.maximum(top, start * REFINE_SPREAD) / low)
    points = [low]
    for _ in range(REFINE_COARSE - 3):  # low * ratio**j by repeated products, as the definition
        points.append(points[-1] * ratio)
    cand = torch.stack(points + [start, top], 1).float().sort(1).values
    best_err, idx = sse(cand).min(1)  # the first of exact ties
    around = torch.stack([idx - 1, idx, idx + 1], 1).clamp(0, REFINE_COARSE - 1)
    at = cand.gather(1, around).double()
    best = at[:, 1]
    lower = torch.where(idx > 0, at[:, 0], best / ratio)
    upper = torch.where(idx < REFINE_COARSE - 1, at[:, 2], best * ratio)
    for K in REFINE_ROUNDS:
        width = (upper - lower) / torch.full_like(upper, K + 1.0)
        offsets = torch.arange(1, K + 1, dtype=torch.float64, device=m.device)
        cand = (lower[:, None] + width[:, None] * offsets).float()
        err, idx = sse(cand).min(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, cand.gather(1, idx[:, None]).squeeze(1).double(), best)
        lower, upper = best - width, best + width
    return torch.where(ok, best, m).float()


def refine_scale(candidate_sse: Callable, x, scale, bits, signed=True, dim=None,
                 group_size=None, narrow=False, importance=None) -> torch.Tensor:
    """``refine_scale`` (the op's arguments, checked) by ``refine_search`` over the passes of a
    backend's ``candidate_sse`` (the op's signature). A per-channel tensor whose channels are not
    contiguous runs is transposed once (with its importance), so the passes do not each make
    that copy."""
    g = groups(x, dim, group_size)
    if transposed_for_kernels(g):
        if importance is not None:
            importance = importance.expand(x.shape).movedim(g.dim, 0).contiguous()
        x, dim = x.movedim(g.dim, 0).contiguous(), 0

    def sse(cand):
        return candidate_sse(x, cand, bits, signed, dim, group_size, narrow, importance)

    a_max = positive_max(as_rows(x, dim, group_size), signed)
    return refine_search(sse, scale, a_max).reshape(scale.shape)
