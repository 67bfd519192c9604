"""Baseline clipping scales (SPEC §7) and the empirical quantization MSE that judges them.

All take the granularity arguments of the ops (``dim`` / ``group_size``) and return a float32
scale of the same shape as ``octav_scale`` would.
"""

from __future__ import annotations

import math

import torch

from . import _args
from .ops import fake_quantize
from .reference import _as_rows


def _magnitude_rows(x, signed, dim, group_size):
    g = _args.groups(_args.check_x(x), dim, group_size)
    rows = _as_rows(x, g.dim, g.group_size).float()
    return g, (rows.abs() if signed else rows.clamp_min(0))


def max_scale(x: torch.Tensor, *, signed: bool = True, dim: int | None = None,
              group_size: int | None = None) -> torch.Tensor:
    """``s = max|x|`` per group (``max(x, 0)`` unsigned); 0 for empty groups."""
    g, a = _magnitude_rows(x, signed, dim, group_size)
    if a.shape[1] == 0:
        return torch.zeros(g.scale_shape, dtype=torch.float32, device=x.device)
    return a.amax(1).reshape(g.scale_shape)


def percentile_scale(x: torch.Tensor, percentile: float = 99.99, *, signed: bool = True,
                     dim: int | None = None, group_size: int | None = None) -> torch.Tensor:
    """``s`` = the ``percentile``-th percentile of |x| per group (nearest rank)."""
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    g, a = _magnitude_rows(x, signed, dim, group_size)
    n = a.shape[1]
    if n == 0:
        return torch.zeros(g.scale_shape, dtype=torch.float32, device=x.device)
    k = min(n, max(1, math.ceil(percentile / 100.0 * n)))
    return a.kthvalue(k, dim=1).values.reshape(g.scale_shape)


def quantization_mse(x: torch.Tensor, scale: torch.Tensor, bits: int, *, signed: bool = True,
                     dim: int | None = None, group_size: int | None = None,
                     narrow: bool = False) -> torch.Tensor:
    """Empirical MSE ``mean((fake_quantize(x, s) - x)**2)`` per group, float64."""
    q = fake_quantize(x, scale, bits, signed=signed, dim=dim, group_size=group_size,
                      narrow=narrow)
    g = _args.groups(x, dim, group_size)
    err = (q.double() - x.double()).square()
    return _as_rows(err, g.dim, g.group_size).mean(1).reshape(g.scale_shape)


def mse_sweep_scale(x: torch.Tensor, bits: int, *, signed: bool = True, dim: int | None = None,
                    group_size: int | None = None, narrow: bool = False, points: int = 100,
                    max_elements: int = 1 << 25) -> torch.Tensor:
    """Brute-force sweep: ``s = k/points * max|x|``, k = 1..points, with the lowest empirical
    MSE (SPEC §1 quantizer) per group. Candidates are evaluated batched (``[K, groups, len]``
    tensors of at most ``max_elements``), not one Python call per point."""
    _args.check_bits(bits)
    _args.check_narrow(narrow, signed)
    s_max = max_scale(x, signed=signed, dim=dim, group_size=group_size)
    g = _args.groups(x, dim, group_size)
    rows = _as_rows(x, g.dim, g.group_size).float()
    if rows.numel() == 0:
        return s_max
    L, lo, hi = _args.levels(bits, signed, narrow)
    fractions = torch.arange(1, points + 1, dtype=torch.float32, device=x.device) / points
    best_err = torch.full((rows.shape[0],), math.inf, dtype=torch.float64, device=x.device)
    best = s_max.reshape(-1).clone()
    per_batch = max(1, max_elements // rows.numel())
    for start in range(0, points, per_batch):
        cand = fractions[start:start + per_batch, None] * s_max.reshape(1, -1)  # [K, groups]
        step = (cand / L).unsqueeze(-1)
        q = torch.clamp(torch.round(rows / step), lo, hi) * step
        q = torch.where(step == 0, torch.zeros((), device=x.device), q)
        err = (q.double() - rows.double()).square().sum(-1)  # [K, groups]
        k_err, k = err.min(0)
        better = k_err < best_err
        best_err = torch.where(better, k_err, best_err)
        best = torch.where(better, cand.gather(0, k.unsqueeze(0)).squeeze(0), best)
    return best.reshape(g.scale_shape)


