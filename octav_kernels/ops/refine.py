"""Refined OCTAV (SPEC §8): ``octav::refine_scale``, the OCTAV scale polished against the
empirical MSE of the real quantizer, and ``octav::_candidate_sse``, one pass of its search (the
squared error of up to 8 candidate scales per group)."""

from __future__ import annotations

import torch

from .. import _args
from ._library import define

MAX_CANDIDATES = 8  # of one _candidate_sse pass, on every backend


def _zero_scale(x, g):
    return torch.zeros(g.scale_shape, dtype=torch.float32, device=x.device)


def _refine_kernel(impl):
    def kernel(x, scale, bits, signed=True, dim=None, group_size=None, narrow=False,
               importance=None):
        g, scale = _args.check_with_scale(x, scale, bits, signed, dim, group_size, narrow)
        importance = _args.check_importance(importance, x)
        if x.numel() == 0:
            return _zero_scale(x, g)
        return impl(x, scale, bits, signed, g.dim, g.group_size, narrow, importance)
    return kernel


def _refine_fake(x, scale, bits, signed=True, dim=None, group_size=None, narrow=False,
                 importance=None):
    g, _ = _args.check_with_scale(x, scale, bits, signed, dim, group_size, narrow)
    _args.check_importance(importance, x, values=False)
    return x.new_empty(g.scale_shape, dtype=torch.float32)


define("refine_scale(Tensor x, Tensor scale, int bits, bool signed=True, int? dim=None, "
       "int? group_size=None, bool narrow=False, Tensor? importance=None) -> Tensor",
       _refine_kernel, _refine_fake)


def _check_candidates(x, cand, bits, signed, dim, group_size, narrow):
    g = _args.check_common(x, bits, signed, dim, group_size, narrow)
    if (not isinstance(cand, torch.Tensor) or not cand.dtype.is_floating_point
            or cand.dim() != 2 or cand.shape[0] != g.n_groups
            or not 1 <= cand.shape[1] <= MAX_CANDIDATES or cand.device != x.device):
        described = (f"{cand.dtype} of shape {list(cand.shape)} on {cand.device}"
                     if isinstance(cand, torch.Tensor) else type(cand).__name__)
        raise ValueError(f"cand must be a floating [n_groups, K] tensor on x's device with "
                         f"1 <= K <= {MAX_CANDIDATES} (n_groups = {g.n_groups}), got {described}")
    return g


def _candidate_sse_kernel(impl):
    def kernel(x, cand, bits, signed=True, dim=None, group_size=None, narrow=False,
               importance=None):
        g = _check_candidates(x, cand, bits, signed, dim, group_size, narrow)
        importance = _args.check_importance(importance, x)
        if x.numel() == 0:
            return torch.zeros(cand.shape, dtype=torch.float64, device=x.device)
        return impl(x, cand.float(), bits, signed, g.dim, g.group_size, narrow, importance)
    return kernel


def _candidate_sse_fake(x, cand, bits, signed=True, dim=None, group_size=None, narrow=False,
                        importance=None):
    _check_candidates(x, cand, bits, signed, dim, group_size, narrow)
    _args.check_importance(importance, x, values=False)
    return cand.new_empty(cand.shape, dtype=torch.float64)


define("_candidate_sse(Tensor x, Tensor cand, int bits, bool signed=True, int? dim=None, "
       "int? group_size=None, bool narrow=False, Tensor? importance=None) -> Tensor",
       _candidate_sse_kernel, _candidate_sse_fake)


def refine_scale(x: torch.Tensor, scale: torch.Tensor, bits: int, *, signed: bool = True,
                 dim: int | None = None, group_size: int | None = None,
                 narrow: bool = False, importance: torch.Tensor | None = None) -> torch.Tensor:
    """``scale`` (e.g. the OCTAV fixed point) polished against the empirical MSE
    ``sum((fake_quantize(x, s) - x)**2)`` of the real quantizer (SPEC §1, §8), per group, float32.

    OCTAV minimizes a model of the error (uniform noise, symmetric grid); the two's-complement
    grid, short rows and low bit widths make the real optimum differ. The search
    (``octav_kernels.reference.refine_scale``) evaluates 16 candidate scales in 4 passes over
    the data: a coarse pass of 6 from ``scale / 1.25`` up to ``max|x|`` (it includes ``scale``
    and ``max|x|``, and spans both minima of heavy-outlier data: outliers clipped, or
    represented with the small values rounded to zero), then passes of 4, 4 and 2 that narrow
    the bracket around the best. It returns the lowest-error candidate seen, so never a higher
    error than ``scale`` or than max scaling. NaN/inf in a group give a NaN/inf scale; an
    all-zero group gives 0. With ``importance`` the error is ``sum h (q - x)**2`` (SPEC §2.1;
    a group whose importance sums to 0 is searched without it).
    """
    _args.check_types(x, bits, dim, group_size, (("signed", signed), ("narrow", narrow)),
                      (("scale", scale), ("importance", importance)))
    return torch.ops.octav.refine_scale.default(x, scale, bits, signed, dim, group_size, narrow,
                                                importance)
