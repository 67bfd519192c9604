"""Plain-PyTorch reference of every op (SPEC §1-§4, §8): the oracle of the parity tests and the
default kernel of every op (it serves any device without kernels of its own, and everything when
the compiled extension is missing).

Sums and counts accumulate in float64 / int64. The quantizer is elementwise and defined in
float32 (``x / step`` in float32, SPEC §1), so it is computed exactly that way here. Every
function takes validated arguments (see ``octav_kernels.ops`` for the checks).

Written independently of the kernels' ``[outer, groups, inner]`` index arithmetic: groups are
formed with ``movedim`` / ``reshape`` and scales are broadcast back the same way. Independent of
the backends' drivers too (``octav_kernels.drivers``): the iteration and the refinement search
are written out here, the search one group at a time.
"""

from __future__ import annotations

import math

import torch

from ._args import (
    DEFAULT_MAX_ITERS,
    DEFAULT_RTOL,
    REFINE_COARSE,
    REFINE_ROUNDS,
    REFINE_SPREAD,
    as_rows,
    cube_root,
    levels,
    lsq_coefficient,
    octav_constant,
    positive_max,
)


def broadcast(scale: torch.Tensor, x: torch.Tensor, dim: int | None, group_size: int | None
              ) -> torch.Tensor:
    """Expand a scale of the granularity's shape to ``x``'s shape."""
    if dim is not None:
        shape = [1] * x.dim()
        shape[dim] = -1
        return scale.reshape(shape).expand(x.shape)
    if group_size is not None:
        return scale.repeat_interleave(group_size, dim=-1).reshape(x.shape)
    return scale.expand(x.shape)


def magnitudes(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """The quantity OCTAV thresholds, in float64: |x| (signed) or x (unsigned; entries <= 0 are
    ignored by the masks). Unsigned -inf is mapped to +inf so that every non-finite entry
    reaches the scale (SPEC §6)."""
    a = x.double()
    if signed:
        return a.abs()
    return torch.where(torch.isinf(a), torch.inf, a)


def _row_sums(a: torch.Tensor, s: torch.Tensor, h: torch.Tensor | None = None):
    """``(S_out, n_in, n_out)`` per row of ``a`` against the per-row threshold ``s`` (float64).

    in = {0 < a <= s}, out = {a > s} plus NaN entries (so NaN reaches S_out). With importance
    rows ``h`` (float64): ``(sum h a 1{out}, sum h 1{in}, sum h 1{out})``, each term ``h * a``
    (so a NaN or inf entry of importance 0 gives NaN)."""
    s = s.unsqueeze(1)
    out = (a > s) | torch.isnan(a)
    inside = (a > 0) & (a <= s)
    zero = torch.zeros((), dtype=a.dtype)
    if h is None:
        s_out = torch.where(out, a, zero).sum(1)
        return s_out, inside.sum(1, dtype=torch.int64), out.sum(1, dtype=torch.int64)
    return (torch.where(out, h * a, zero).sum(1), torch.where(inside, h, zero).sum(1),
            torch.where(out, h, zero).sum(1))


def importance_rows(importance, x, dim, group_size, fallback=True):
    """The importance as OCTAV weights a group's elements (SPEC §2.1): ``importance`` broadcast
    to x's shape, one group per row, float64; None without importance. With ``fallback``, a
    group whose importance sums to 0 is weighted 1 everywhere (solved as without importance,
    rather than given an arbitrary scale)."""
    if importance is None:
        return None
    h = as_rows(importance.expand(x.shape), dim, group_size).double()
    if not fallback:
        return h
    return torch.where(h.sum(1, keepdim=True) > 0, h, torch.ones((), dtype=h.dtype))


def masked_sums(x, scale, signed=True, dim=None, group_size=None, importance=None):
    """One pass of the OCTAV statistics per group at the given scale (SPEC §2):
    ``S_out = sum(a * 1{a > s})``, ``n_in = #{0 < a <= s}``, ``n_out = #{a > s}`` with
    ``a = |x|`` (signed) or ``x`` (unsigned). With ``importance`` h (SPEC §2.1), the weighted
    sums ``(sum h a 1{a > s}, sum h 1{0 < a <= s}, sum h 1{a > s})``, all three float32 (no
    fallback: these are statistics, summed over ranks by distributed OCTAV)."""
    rows = as_rows(x, dim, group_size)
    a = magnitudes(rows, signed)
    h = importance_rows(importance, x, dim, group_size, fallback=False)
    s_out, n_in, n_out = _row_sums(a, scale.double().reshape(-1), h)
    shape = scale.shape
    if h is not None:
        n_in, n_out = n_in.float(), n_out.float()
    return s_out.float().reshape(shape), n_in.reshape(shape), n_out.reshape(shape)


def octav_scale(x, bits, signed=True, dim=None, group_size=None, init=None,
                max_iters=DEFAULT_MAX_ITERS, rtol=DEFAULT_RTOL, narrow=False, importance=None, *,
                return_iterations=False):
    """MSE-optimal clipping scale by the OCTAV fixed point, per group (SPEC §2)::

        s_next = S_out / (c * n_in + n_out),   c = 1 / (12 L**2)  (4**-B/3 signed)
        s_next = max(a)                        if n_out == 0

    Start: ``init`` where it is > 0, else one step from s = 0 (the mean of the nonzero a).
    Stop at ``|s_next - s| <= rtol * s`` (or s_next == s, or NaN), at a 2-cycle
    (s_next == s_prev, returns the smaller), or after ``max_iters`` steps. Every iterate is
    rounded to float32, as the kernels keep it. ``return_iterations=True`` also returns the
    number of steps each group took after its start (int64, the scale's shape): the passes
    over the data a warm start saves.

    With ``importance`` h (SPEC §2.1) the sums are weighted (``importance_rows``: a group with
    no informative entry is weighted 1), and ``max(a)`` is the largest a of positive h, taken
    where no weight lies above s and S_out is 0 (a NaN S_out stays NaN).
    """
    a = magnitudes(as_rows(x, dim, group_size), signed)
    h = importance_rows(importance, x, dim, group_size)
    c = octav_constant(bits, signed, narrow)
    a_max = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
    if a.shape[1] > 0:
        counted = a > 0 if h is None else (a > 0) & (h > 0)
        a_max = torch.where(counted, a, a_max.unsqueeze(1)).amax(1)  # max of the positive a

    def step(s):
        s_out, n_in, n_out = _row_sums(a, s, h)
        top = n_out == 0 if h is None else (n_out == 0) & (s_out == 0)
        nxt = torch.where(top, a_max, s_out / (c * n_in.double() + n_out.double()))
        return nxt.float().double()

    n = a.shape[0]
    s = None if init is None else init.float().double().reshape(-1)
    if s is None or not bool((s > 0).all()):  # cold start for groups without an init > 0
        cold = step(torch.zeros(n, dtype=torch.float64, device=a.device))
        s = cold if s is None else torch.where(s > 0, s, cold)
    prev = torch.full_like(s, float("nan"))
    done = torch.zeros_like(s, dtype=torch.bool)
    iterations = torch.zeros(s.shape, dtype=torch.int64, device=s.device)
    for _ in range(max_iters):
        iterations += ~done
        nxt = step(s)
        converged = (nxt == s) | ((nxt - s).abs() <= rtol * s) | torch.isnan(nxt)
        cycle = ~converged & (nxt == prev)
        result = torch.where(cycle, torch.minimum(s, nxt), nxt)
        prev = torch.where(done, prev, s)
        s = torch.where(done, s, result)
        done = done | converged | cycle
        if bool(done.all()):
            break
    shape = _scale_shape(x, dim, group_size)
    if return_iterations:
        return s.float().reshape(shape), iterations.reshape(shape)
    return s.float().reshape(shape)


# Refinement against the empirical MSE (SPEC §8): a bracketing search over candidate scales
# (its constants and cube_root are in _args: exact formulas every backend shares).


def max_magnitude(x, signed=True, dim=None, group_size=None):
    """The largest positive magnitude per group, float32 (``magnitudes``' rules: |x| signed, x
    unsigned with -inf as +inf; 0 when no entry is positive; NaN propagates)."""
    return positive_max(as_rows(x, dim, group_size), signed)


def candidate_sse(x, cand, bits, signed=True, dim=None, group_size=None, narrow=False,
                  importance=None):
    """Empirical squared error of the SPEC §1 quantizer per group and candidate scale:
    ``sse[g, k] = sum_i (q(x_i; cand[g, k]) - x_i)**2`` over group g, float64 ``[n_groups, K]``.

    ``q`` is the float32 quantizer of ``fake_quantize`` (before any cast to x's dtype); every
    difference ``q - x`` and its square are taken in float64, so each term is the same on every
    backend and only the order of the float64 sum differs. With ``importance`` h, each term is
    ``h_i * (q - x_i)**2`` (``importance_rows``, with its fallback; h in float64)."""
    L, lo, hi = levels(bits, signed, narrow)
    rows = as_rows(x, dim, group_size).float()
    exact = rows.double()
    h = importance_rows(importance, x, dim, group_size)
    divisor = torch.tensor(L, dtype=torch.float32, device=x.device)
    out = torch.empty(cand.shape, dtype=torch.float64, device=x.device)
    for k in range(cand.shape[1]):
        q = quantize_to_grid(rows, cand[:, k:k + 1].float() / divisor, lo, hi)
        sq = (q.double() - exact).square()
        out[:, k] = (sq if h is None else h * sq).sum(1)
    return out


def _to_float32(values):
    """Python floats rounded to float32 (as Python floats)."""
    return torch.tensor(values, dtype=torch.float64).float().tolist()


def _refine_group(row, s0, m, sse):
    """The search for one group (``refine_scale``); ``sse(candidates)`` -> their errors."""
    start = s0 if s0 > 0 and math.isfinite(s0) else m
    if not (start > 0 and math.isfinite(start) and m > 0 and math.isfinite(m)):
        return m
    low = start / REFINE_SPREAD
    ratio = cube_root(max(m, start * REFINE_SPREAD) / low)
    grid = [low]
    for _ in range(REFINE_COARSE - 3):  # low * ratio**j by repeated products
        grid.append(grid[-1] * ratio)
    cand = sorted(_to_float32(grid + [start, m]))
    err = sse(cand)
    i = min(range(len(cand)), key=err.__getitem__)  # the first of exact ties
    best, best_err = cand[i], err[i]
    lower = cand[i - 1] if i > 0 else best / ratio
    upper = cand[i + 1] if i < len(cand) - 1 else best * ratio
    for K in REFINE_ROUNDS:
        width = (upper - lower) / (K + 1.0)
        cand = _to_float32([lower + width * j for j in range(1, K + 1)])
        err = sse(cand)
        i = min(range(K), key=err.__getitem__)
        if err[i] < best_err:
            best, best_err = cand[i], err[i]
        lower, upper = best - width, best + width
    return best


def refine_scale(x, scale, bits, signed=True, dim=None, group_size=None, narrow=False,
                 importance=None):
    """``scale`` polished against the empirical MSE of SPEC §1, per group, float32.

    Per group, from the start ``s0`` (the OCTAV scale; ``m = max a`` where it is not a positive
    finite number) and ``m``:

    1. coarse pass, 6 candidates: ``s0``, ``m`` and 4 points spaced geometrically from
       ``s0 / 1.25`` to ``max(m, 1.25 s0)`` (ratio by ``cube_root``, points by repeated
       products). This spans both minima of Appendix G's non-convex case: the OCTAV basin
       (outliers clipped) and the large-scale basin where small values round to zero and the
       outliers are represented;
    2. narrowing passes of ``REFINE_ROUNDS`` = 4, 4, 2 points spaced evenly inside the bracket
       between the best candidate's neighbours (``best / ratio`` or ``best * ratio`` past an
       end), each narrowing the bracket to two of its spacings around the best.

    Candidates are rounded to float32, everything else is float64; each pass's errors come from
    ``candidate_sse``. Returns the candidate with the lowest squared error seen (among exact
    ties, the first seen: the smallest of its pass), so never worse than ``s0`` or than ``m``
    (max scaling). Groups with a NaN or inf ``m`` return ``m`` (SPEC §6); groups with nothing
    positive return 0.
    """
    rows = as_rows(x, dim, group_size)
    h = importance_rows(importance, x, dim, group_size)
    starts = scale.double().reshape(-1).tolist()
    tops = max_magnitude(x, signed, dim, group_size).double().tolist()
    refined = []
    for g, (s0, m) in enumerate(zip(starts, tops)):
        row = rows[g:g + 1]
        weight = None if h is None else h[g:g + 1].float()  # exact: h is float32 data

        def sse(cand, row=row, weight=weight):
            c = torch.tensor([cand], dtype=torch.float32, device=x.device)
            return candidate_sse(row, c, bits, signed, None, row.shape[1], narrow,
                                 weight)[0].tolist()

        refined.append(_refine_group(row, s0, m, sse))
    return torch.tensor(refined, dtype=torch.float64, device=x.device).float().reshape(
        scale.shape)


def _scale_shape(x, dim, group_size):
    if dim is not None:
        return (x.shape[dim],)
    if group_size is not None:
        return tuple(x.shape[:-1]) + (x.shape[-1] // group_size,)
    return ()


def fake_quantize(x, scale, bits, signed=True, dim=None, group_size=None, grad="mad",
                  narrow=False):
    """Forward of the clip-quantize op (SPEC §1), in float32 whatever x's dtype::

        step = s / L;  q = clamp(round_half_even(x / step), lo, hi) * step;  q = 0 where s == 0
    """
    L, lo, hi = levels(bits, signed, narrow)
    step = grid_step(scale, x, dim, group_size, L)
    return quantize_to_grid(x.float(), step, lo, hi).to(x.dtype)


def grid_step(scale, x, dim, group_size, L) -> torch.Tensor:
    """``step = s / L`` in float32, broadcast to x's shape. A tensor divisor: PyTorch's CUDA
    division by a Python scalar multiplies by its reciprocal, which is not the correctly rounded
    s / L for L = 2**(B-1) - 1 (narrow)."""
    return broadcast(scale.float(), x, dim, group_size) / torch.tensor(
        L, dtype=torch.float32, device=x.device)


def grid_levels(x: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The integer level ``clamp(round_half_even(x / step), lo, hi)`` in x's (float32) dtype,
    0 where step == 0 (s == 0); NaN stays NaN; ``step`` broadcasts against ``x``."""
    n = torch.clamp(torch.round(x / step), lo, hi)
    return torch.where(step == 0, torch.zeros((), dtype=n.dtype, device=n.device), n)


def quantize_to_grid(x: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``clamp(round_half_even(x / step), lo, hi) * step`` in x's (float32) dtype, 0 where
    step == 0 (s == 0); ``step`` broadcasts against ``x``."""
    return grid_levels(x, step, lo, hi) * step


def fake_quantize_backward(grad_out, x, scale, signed=True, dim=None, group_size=None,
                           grad="mad", frozen=None):
    """Gradient of fake_quantize w.r.t. x (SPEC §3), in x's compute type (float64 for float64,
    else float32)::

        inside (|x| <= s; unsigned 0 <= x <= s):  g
        otherwise: ste g;  pwl 0;  mad g * (s / |x|)   (unsigned x < 0: 0 for pwl and mad)

    and 0 wherever the bool mask ``frozen`` (x's shape, optional) is set: frozen weights.
    """
    if frozen is not None:
        out = fake_quantize_backward(grad_out, x, scale, signed, dim, group_size, grad)
        return torch.where(frozen, torch.zeros((), dtype=out.dtype, device=out.device), out)
    if grad == "ste":
        return grad_out.to(x.dtype, copy=True)
    ctype = torch.float64 if x.dtype == torch.float64 else torch.float32
    g = grad_out.to(ctype)
    xc = x.to(ctype)
    s = broadcast(scale.to(ctype), x, dim, group_size)
    zero = torch.zeros((), dtype=ctype)
    if signed:
        a = xc.abs()
        inside = a <= s
        below = torch.zeros_like(inside)
    else:
        a = xc
        inside = (xc >= 0) & (xc <= s)
        below = xc < 0
    if grad == "pwl":
        out = torch.where(inside, g, zero)
    else:
        out = torch.where(inside, g, torch.where(below, zero, g * (s / a)))
    return out.to(x.dtype)


def fake_quantize_lsq_backward(grad_out, x, scale, bits, signed=True, dim=None, group_size=None,
                               grad="mad", narrow=False, grad_scale=True, frozen=None):
    """``(grad_x, grad_scale)`` of the clip-quantize op with a learned scale (LSQ, Esser et al.
    2020, on SPEC §1's grid): ``grad_x`` is ``fake_quantize_backward``'s (the estimator
    ``grad``; 0 where ``frozen``), and per group, with round treated as identity::

        v = x / step (float32),  n = clamp(round(v), lo, hi)
        dq/ds = c (n - v)  if lo <= v <= hi,  else c n       (c = 1 / L, step = c s)
        grad_scale = f * c * sum over the group of grad_out * (n - v or n)

    with LSQ's gradient scale ``f = 1 / sqrt(N hi)`` (N elements per group; 1 without
    ``grad_scale``). ``n - v`` is exact in float32 (Sterbenz: v is within a factor 2 of n, or
    n = 0), each product exact in float64, the sum in float64; elements with step == 0 and
    frozen elements (constants of training) contribute nothing. grad_scale is float32 of the
    scale's shape."""
    grad_x = fake_quantize_backward(grad_out, x, scale, signed, dim, group_size, grad, frozen)
    L, lo, hi = levels(bits, signed, narrow)
    step = grid_step(scale, x, dim, group_size, L)
    v = x.float() / step
    n = torch.clamp(torch.round(v), lo, hi)
    d = torch.where((v >= lo) & (v <= hi), n - v, n)
    term = grad_out.double() * d.double()
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    term = torch.where(step == 0, zero, term)
    if frozen is not None:
        term = torch.where(frozen, zero, term)
    rows = as_rows(term, dim, group_size)
    coefficient = lsq_coefficient(rows.shape[1], bits, signed, narrow, grad_scale)
    return grad_x, (rows.sum(1) * coefficient).float().reshape(scale.shape)


def fake_quantize_lsq(x, scale, bits, signed=True, dim=None, group_size=None, grad="mad",
                      narrow=False, grad_scale=True):
    """The forward of the learned-scale clip-quantize op: ``fake_quantize``'s values."""
    return fake_quantize(x, scale, bits, signed, dim, group_size, grad, narrow)


def pwl_mask(x, scale, signed=True, dim=None, group_size=None):
    """SPEC §3's PWL pass-through set (``|x| <= s``; unsigned ``0 <= x <= s``) bit-packed in x's
    flat contiguous order: bit ``k % 32`` of int32 word ``k // 32`` is element k."""
    ctype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(ctype)
    s = broadcast(scale.to(ctype), x, dim, group_size)
    inside = xc.abs() <= s if signed else (xc >= 0) & (xc <= s)
    flat = inside.reshape(-1).to(torch.int64)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 32)).reshape(-1, 32)
    words = (flat << torch.arange(32, device=x.device)).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pwl_backward_from_mask(grad_out, mask):
    """PWL gradient from the packed mask alone: ``grad_out`` where the bit is set, else 0."""
    bits = (mask.to(torch.int64).unsqueeze(1) >> torch.arange(32, device=mask.device)) & 1
    inside = bits.reshape(-1)[:grad_out.numel()].reshape(grad_out.shape).bool()
    return torch.where(inside, grad_out, torch.zeros((), dtype=grad_out.dtype,
                                                     device=grad_out.device))


def pwl_backward_packed(grad_out, mask):
    """The PWL gradient from its packed mask (``pwl_backward_from_mask``)."""
    return pwl_backward_from_mask(grad_out, mask)


def fake_quantize_packed(x, scale, bits, signed=True, dim=None, group_size=None, narrow=False):
    """``(fake_quantize(x, s), pwl_mask(x, s))``: the PWL training forward."""
    return (fake_quantize(x, scale, bits, signed, dim, group_size, "pwl", narrow),
            pwl_mask(x, scale, signed, dim, group_size))


def octav_fake_quantize(x, bits, signed=True, dim=None, group_size=None, grad="mad", init=None,
                        narrow=False, importance=None):
    """``(fake_quantize(x, s), s)`` with ``s = octav_scale(x, ...)`` (default iteration)."""
    scale = octav_scale(x, bits, signed, dim, group_size, init=init, narrow=narrow,
                        importance=importance)
    return fake_quantize(x, scale, bits, signed, dim, group_size, grad, narrow), scale


def octav_fake_quantize_packed(x, bits, signed=True, dim=None, group_size=None, init=None,
                               narrow=False, importance=None):
    """``(y, s, mask)``: ``octav_fake_quantize`` with the PWL mask of ``fake_quantize_packed``."""
    scale = octav_scale(x, bits, signed, dim, group_size, init=init, narrow=narrow,
                        importance=importance)
    y, mask = fake_quantize_packed(x, scale, bits, signed, dim, group_size, narrow)
    return y, scale, mask


# Oscillation tracking and freezing (Nagel et al., ICML 2022), fused with the weight fake-quant.


def fake_quantize_tracked(x, scale, bits, signed, dim, group_size, narrow, last_int, last_dir,
                          frozen, osc_freq, int_ema, momentum, freeze_threshold, update):
    """``fake_quantize`` of a weight that also tracks its oscillations and freezes the worst.

    Per element, with ``n = clamp(round(x / step), lo, hi)`` its integer level this step (0
    where s == 0) and ``m = momentum``, when ``update`` and the element is not frozen (and x is
    not NaN)::

        d          = sign(n - last_int)                       # direction of this step's change
        oscillated = d != 0 and last_dir != 0 and d != last_dir
        last_dir   = d if d != 0 else last_dir;   last_int = n
        osc_freq   = (1 - m) * osc_freq + m * oscillated     # float32, each product and the
        int_ema    = (1 - m) * int_ema + m * n               #   sum rounded (no FMA)
        if freeze_threshold > 0 and osc_freq > freeze_threshold:   # (float32 threshold)
            frozen = True;  last_int = clamp(round(int_ema), lo, hi)

    The output is ``n * step``, or ``last_int * step`` for a frozen element (its integer level
    is kept, on the current step's grid). Integers are compared as they are, so a change of
    the scale that moves a level counts like any other change. Mutates the five state tensors
    (x's shape: int8, int8, bool, float32, float32) in place; returns y in x's dtype.
    """
    L, lo, hi = levels(bits, signed, narrow)
    step = grid_step(scale, x, dim, group_size, L)
    n = grid_levels(x.float(), step, lo, hi)
    if update:
        live = ~frozen & ~torch.isnan(n)
        level = torch.nan_to_num(n).to(torch.int16)
        d = torch.sign(level - last_int.to(torch.int16)).to(torch.int8)
        oscillated = (d != 0) & (last_dir != 0) & (d != last_dir)
        keep = torch.tensor(1.0 - momentum, dtype=torch.float32, device=x.device)
        m = torch.tensor(momentum, dtype=torch.float32, device=x.device)
        freq = keep * osc_freq + m * oscillated.float()
        ema = keep * int_ema + m * level.float()
        freeze = live & (freeze_threshold > 0) & (freq > freeze_threshold)
        level = torch.where(freeze, torch.clamp(torch.round(ema), lo, hi).to(torch.int16), level)
        last_dir.copy_(torch.where(live & (d != 0), d, last_dir))
        last_int.copy_(torch.where(live, level.to(torch.int8), last_int))
        osc_freq.copy_(torch.where(live, freq, osc_freq))
        int_ema.copy_(torch.where(live, ema, int_ema))
        frozen.copy_(frozen | freeze)
    n = torch.where(frozen, last_int.float(), n)
    q = torch.where(step == 0, torch.zeros((), device=x.device), n * step)
    return q.to(x.dtype)


def integer_levels(x, scale, bits, signed=True, dim=None, group_size=None, narrow=False):
    """``clamp(round(x / step), lo, hi)`` as int8 (0 where s == 0 or x is NaN): the starting
    ``last_int`` (and, as float32, ``int_ema``) of oscillation tracking. Needs levels that fit
    int8 (signed bits <= 8, unsigned bits <= 7)."""
    L, lo, hi = levels(bits, signed, narrow)
    n = grid_levels(x.float(), grid_step(scale, x, dim, group_size, L), lo, hi)
    return torch.nan_to_num(n).to(torch.int8)


def dampening_error(w, scale, bits, signed=True, dim=None, group_size=None, narrow=False,
                    frozen=None):
    """The per-element oscillation-dampening term ``(q(w) - clip(w))**2`` (Nagel et al., eq. 6),
    float32, w's shape: ``q`` the SPEC §1 quantizer, ``clip(w) = clamp(w, lo * step,
    hi * step)``; 0 where ``frozen``. All in float32, each operation rounded once."""
    L, lo, hi = levels(bits, signed, narrow)
    step = grid_step(scale, w, dim, group_size, L)
    wf = w.float()
    q = quantize_to_grid(wf, step, lo, hi)
    d = q - torch.minimum(torch.maximum(wf, lo * step), hi * step)
    err = d * d
    if frozen is not None:
        err = torch.where(frozen, torch.zeros((), device=w.device), err)
    return err


def dampening_backward(grad, w, scale, bits, signed=True, dim=None, group_size=None,
                       narrow=False, frozen=None):
    """d(sum(grad * dampening_error))/dw with q held constant (``q(w).detach()``)::

        ((c - q) + (c - q)) * grad   where lo * step <= w <= hi * step (c = clip(w)), else 0

    in float32, 0 where ``frozen``; returned in w's dtype."""
    L, lo, hi = levels(bits, signed, narrow)
    step = grid_step(scale, w, dim, group_size, L)
    wf = w.float()
    q = quantize_to_grid(wf, step, lo, hi)
    t = wf - q  # clip(w) - q where the gradient passes (clip(w) = w there)
    inside = (wf >= lo * step) & (wf <= hi * step)
    if frozen is not None:
        inside = inside & ~frozen
    out = torch.where(inside, (t + t) * grad.float(), torch.zeros((), device=w.device))
    return out.to(w.dtype)
