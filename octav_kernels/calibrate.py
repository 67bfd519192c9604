"""Baseline clipping scales (SPEC §7) and the empirical quantization MSE that judges them.

All take the granularity arguments of the ops (``dim`` / ``group_size``) and return a float32
scale of the same shape as ``octav_scale`` would.
"""

from __future__ import annotations

import math

import torch

from . import _args
from .ops import fake_quantize
from .reference import _as_rows, quantize_to_grid


def _rows(x, dim, group_size):
    """The granularity of ``x`` and ``x`` as float32 ``[n_groups, group_len]`` rows."""
    g = _args.groups(_args.check_x(x), dim, group_size)
    return g, _as_rows(x, g.dim, g.group_size).float()


def _magnitudes(rows, signed):
    return rows.abs() if signed else rows.clamp_min(0)


def _row_max(g, a):
    if a.shape[1] == 0:
        return torch.zeros(g.scale_shape, dtype=torch.float32, device=a.device)
    return a.amax(1).reshape(g.scale_shape)


def max_scale(x: torch.Tensor, *, signed: bool = True, dim: int | None = None,
              group_size: int | None = None) -> torch.Tensor:
    """``s = max|x|`` per group (``max(x, 0)`` unsigned); 0 for empty groups."""
    g, rows = _rows(x, dim, group_size)
    return _row_max(g, _magnitudes(rows, signed))


def percentile_scale(x: torch.Tensor, percentile: float = 99.99, *, signed: bool = True,
                     dim: int | None = None, group_size: int | None = None) -> torch.Tensor:
    """``s`` = the ``percentile``-th percentile of |x| per group (nearest rank)."""
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    g, rows = _rows(x, dim, group_size)
    a = _magnitudes(rows, signed)
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
    g, rows = _rows(x, dim, group_size)
    s_max = _row_max(g, _magnitudes(rows, signed))
    if rows.numel() == 0:
        return s_max
    L, lo, hi = _args.levels(bits, signed, narrow)
    fractions = torch.arange(1, points + 1, dtype=torch.float32, device=x.device) / points
    best_err = torch.full((rows.shape[0],), math.inf, dtype=torch.float64, device=x.device)
    best = s_max.reshape(-1).clone()
    per_batch = max(1, max_elements // rows.numel())
    for start in range(0, points, per_batch):
        cand = fractions[start:start + per_batch, None] * s_max.reshape(1, -1)  # [K, groups]
        q = quantize_to_grid(rows, (cand / L).unsqueeze(-1), lo, hi)
        err = (q.double() - rows.double()).square().sum(-1)  # [K, groups]
        k_err, k = err.min(0)
        better = k_err < best_err
        best_err = torch.where(better, k_err, best_err)
        best = torch.where(better, cand.gather(0, k.unsqueeze(0)).squeeze(0), best)
    return best.reshape(g.scale_shape)


