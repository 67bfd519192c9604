"""Baseline clipping scales (SPEC §7) and the empirical quantization MSE that judges them.

All take the granularity arguments of the ops (``dim`` / ``group_size``) and return a float32
scale of the same shape as ``octav_scale`` would.
"""

from __future__ import annotations

import math

import torch

from . import _args, distributed, reference
from .ops import fake_quantize, octav_fake_quantize, octav_scale


def _rows(x, dim, group_size):
    """The granularity of ``x`` and ``x`` as float32 ``[n_groups, group_len]`` rows."""
    g = _args.groups(_args.check_x(x), dim, group_size)
    return g, _args.as_rows(x, g.dim, g.group_size).float()


def max_scale(x: torch.Tensor, *, signed: bool = True, dim: int | None = None,
              group_size: int | None = None) -> torch.Tensor:
    """``s = max|x|`` per group (``max(x, 0)`` unsigned, where -inf counts as +inf so that
    every NaN/inf reaches the scale); 0 for empty groups."""
    g, rows = _rows(x, dim, group_size)
    return _args.positive_max(rows, signed).reshape(g.scale_shape)


def percentile_scale(x: torch.Tensor, percentile: float = 99.99, *, signed: bool = True,
                     dim: int | None = None, group_size: int | None = None) -> torch.Tensor:
    """``s`` = the ``percentile``-th percentile of |x| per group (nearest rank)."""
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    g, rows = _rows(x, dim, group_size)
    a = rows.abs() if signed else rows.clamp_min(0)
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
    return _args.as_rows(err, g.dim, g.group_size).mean(1).reshape(g.scale_shape)


def mse_sweep_scale(x: torch.Tensor, bits: int, *, signed: bool = True, dim: int | None = None,
                    group_size: int | None = None, narrow: bool = False, points: int = 100,
                    max_elements: int = 1 << 25,
                    importance: torch.Tensor | None = None) -> torch.Tensor:
    """Brute-force sweep: ``s = k/points * max|x|``, k = 1..points, with the lowest empirical
    MSE (SPEC §1 quantizer) per group. Candidates are evaluated batched (``[K, groups, len]``
    tensors of at most ``max_elements``), not one Python call per point. With ``importance``
    h (SPEC §2.1) the error is ``sum h (q - x)**2`` (a group whose importance sums to 0 is
    weighted 1)."""
    _args.check_bits(bits)
    _args.check_narrow(narrow, signed)
    g, rows = _rows(x, dim, group_size)
    weights = reference.importance_rows(_args.check_importance(importance, x), x, g.dim,
                                        g.group_size)
    s_max = _args.positive_max(rows, signed).reshape(g.scale_shape)
    if rows.numel() == 0:
        return s_max
    L, lo, hi = _args.levels(bits, signed, narrow)
    # Quotients by tensors: CUDA divides by a Python number as a product with its reciprocal,
    # which would make the candidates (and the steps) differ from the CPU's in the last bit.
    # torch.full fills on the device (torch.tensor would be a blocking host copy per call).
    def divisor(value):
        return torch.full((), value, dtype=torch.float32, device=x.device)

    fractions = torch.arange(1, points + 1, dtype=torch.float32, device=x.device) / divisor(points)
    best_err = torch.full((rows.shape[0],), math.inf, dtype=torch.float64, device=x.device)
    best = s_max.reshape(-1).clone()
    per_batch = max(1, max_elements // rows.numel())
    for start in range(0, points, per_batch):
        cand = fractions[start:start + per_batch, None] * s_max.reshape(1, -1)  # [K, groups]
        step = (cand / divisor(L)).unsqueeze(-1)
        q = reference.quantize_to_grid(rows, step, lo, hi)  # SPEC §1's quantizer
        err = (q.double() - rows.double()).square()
        err = (err if weights is None else err * weights).sum(-1)  # [K, groups]
        k_err, k = err.min(0)
        better = k_err < best_err
        best_err = torch.where(better, k_err, best_err)
        best = torch.where(better, cand.gather(0, k.unsqueeze(0)).squeeze(0), best)
    return best.reshape(g.scale_shape)




# ---------------------------------------------------------------------------------------------
# Calibrators: one interface over OCTAV and the baselines, used by the QAT modules and for PTQ.


class Calibrator:
    """A rule mapping a tensor to a float32 clipping scale of the granularity's shape.

    ``calibrator(x, bits, signed=..., dim=..., group_size=..., narrow=..., init=...,
    importance=...)``. ``init`` is a previous scale that iterative rules may warm-start from
    (others ignore it). ``importance`` (SPEC §2.1, e.g. a layer's ``E[inp**2]`` per input
    feature) weights each element's squared error in the rules that minimize one (OCTAV, its
    refinement, the MSE sweep: ``uses_importance``); the others ignore it. A calibrator of
    one's own receives ``importance`` only if it sets ``uses_importance = True``.
    ``propagates_nonfinite`` says whether NaN/inf in ``x`` always shows up in the scale, so
    that a caller can check the (small) scale instead of the whole tensor.
    """

    name = "calibrator"
    propagates_nonfinite = True
    uses_importance = False

    def __call__(self, x: torch.Tensor, bits: int, *, signed: bool = True,
                 dim: int | None = None, group_size: int | None = None, narrow: bool = False,
                 init: torch.Tensor | None = None,
                 importance: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def quantize(self, x: torch.Tensor, bits: int, *, signed: bool = True,
                 dim: int | None = None, group_size: int | None = None, narrow: bool = False,
                 grad: str = "mad", init: torch.Tensor | None = None,
                 importance: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fake_quantize(x, s, ...), s)`` with this rule's scale ``s`` of ``x``: the training
        step of a dynamic quantizer. Rules with a fused op (OCTAV) override it."""
        weighted = {} if importance is None else {"importance": importance}
        s = self(x.detach(), bits, signed=signed, dim=dim, group_size=group_size, narrow=narrow,
                 init=init, **weighted)
        return fake_quantize(x, s, bits, signed=signed, dim=dim, group_size=group_size,
                             grad=grad, narrow=narrow), s

    def across(self, group) -> Calibrator:
        """This rule computed over the data of every rank of ``group`` (a ``torch.distributed``
        group, ``None`` for the default one): the scale is identical on every rank."""
        raise ValueError("process_group works with the 'octav' and 'max' calibrators, "
                         f"got {self}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class OctavCalibrator(Calibrator):
    """The OCTAV fixed point (``octav_scale``), warm-started from ``init``; with
    ``refine=True`` polished against the empirical MSE (``refine_scale``)."""

    name = "octav"
    uses_importance = True

    def __init__(self, max_iters: int = _args.DEFAULT_MAX_ITERS,
                 rtol: float = _args.DEFAULT_RTOL, refine: bool = False):
        _args.check_iteration(max_iters, rtol)
        self.max_iters, self.rtol = max_iters, rtol
        self.refine = _args.check_bool(refine, "refine")

    def __call__(self, x, bits, *, signed=True, dim=None, group_size=None, narrow=False,
                 init=None, importance=None):
        return octav_scale(x, bits, signed=signed, dim=dim, group_size=group_size, init=init,
                           max_iters=self.max_iters, rtol=self.rtol, narrow=narrow,
                           refine=self.refine, importance=importance)

    def quantize(self, x, bits, *, signed=True, dim=None, group_size=None, narrow=False,
                 grad="mad", init=None, importance=None):
        if not self.is_default:
            return super().quantize(x, bits, signed=signed, dim=dim, group_size=group_size,
                                    narrow=narrow, grad=grad, init=init, importance=importance)
        return octav_fake_quantize(x, bits, signed=signed, dim=dim, group_size=group_size,
                                   grad=grad, init=init, narrow=narrow, importance=importance)

    def across(self, group) -> Calibrator:
        if self.refine:
            raise ValueError("process_group: the refined OCTAV scale is not computed across "
                             "ranks; use calibrator='octav'")
        return _OctavAcrossRanks(self, group)

    @property
    def is_default(self) -> bool:
        """True when the fused ``octav_fake_quantize`` (default iteration) computes this rule."""
        return (self.max_iters == _args.DEFAULT_MAX_ITERS and self.rtol == _args.DEFAULT_RTOL
                and not self.refine)

    def __repr__(self) -> str:
        return (f"OctavCalibrator(max_iters={self.max_iters}, rtol={self.rtol}, "
                f"refine={self.refine})")


class MaxCalibrator(Calibrator):
    """``s = max|x|`` (``max_scale``)."""

    name = "max"

    def __call__(self, x, bits, *, signed=True, dim=None, group_size=None, narrow=False,
                 init=None, importance=None):
        _args.check_bits(bits)
        return max_scale(x, signed=signed, dim=dim, group_size=group_size)

    def across(self, group) -> Calibrator:
        return _MaxAcrossRanks(group)


class _OctavAcrossRanks(Calibrator):
    """OCTAV over the data of every rank (``distributed.octav_scale``); no ``group_size``."""

    uses_importance = True

    def __init__(self, octav: OctavCalibrator, group):
        self.octav, self.group = octav, group

    def __call__(self, x, bits, *, signed=True, dim=None, group_size=None, narrow=False,
                 init=None, importance=None):
        return distributed.octav_scale(x, bits, signed=signed, dim=dim, group_size=group_size,
                                       init=init, max_iters=self.octav.max_iters,
                                       rtol=self.octav.rtol, narrow=narrow, group=self.group,
                                       importance=importance)

    def __repr__(self) -> str:
        return f"{self.octav!r} across ranks"


class _MaxAcrossRanks(Calibrator):
    """``max|x|`` over the data of every rank (``distributed.max_scale``); no ``group_size``."""

    def __init__(self, group):
        self.group = group

    def __call__(self, x, bits, *, signed=True, dim=None, group_size=None, narrow=False,
                 init=None, importance=None):
        return distributed.max_scale(x, signed=signed, dim=dim, group=self.group)

    def __repr__(self) -> str:
        return "MaxCalibrator() across ranks"


class PercentileCalibrator(Calibrator):
    """``s`` = the ``percentile``-th percentile of |x| (``percentile_scale``). A NaN may sort
    above the percentile, so NaN/inf need a check of ``x`` itself."""

    name = "percentile"
    propagates_nonfinite = False

    def __init__(self, percentile: float = 99.99):
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)):
            raise TypeError(f"percentile must be a float, got {type(percentile).__name__}")
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = float(percentile)

    def __call__(self, x, bits, *, signed=True, dim=None, group_size=None, narrow=False,
                 init=None, importance=None):
        _args.check_bits(bits)
        return percentile_scale(x, self.percentile, signed=signed, dim=dim,
                                group_size=group_size)

    def __repr__(self) -> str:
        return f"PercentileCalibrator(percentile={self.percentile})"


class MSESweepCalibrator(Calibrator):
    """The ``points``-point empirical-MSE sweep (``mse_sweep_scale``), batched on x's device."""

    name = "mse"
    uses_importance = True

    def __init__(self, points: int = 100):
        _args.check_int(points, "points")
        if points < 1:
            raise ValueError(f"points must be >= 1, got {points}")
        self.points = points

    def __call__(self, x, bits, *, signed=True, dim=None, group_size=None, narrow=False,
                 init=None, importance=None):
        return mse_sweep_scale(x, bits, signed=signed, dim=dim, group_size=group_size,
                               narrow=narrow, points=self.points, importance=importance)

    def __repr__(self) -> str:
        return f"MSESweepCalibrator(points={self.points})"


CALIBRATORS = {"octav": OctavCalibrator, "max": MaxCalibrator,
               "percentile": PercentileCalibrator, "mse": MSESweepCalibrator}


def make_calibrator(spec: str | Calibrator) -> Calibrator:
    """A ``Calibrator`` from an instance or a name: ``"octav"``, ``"octav:refine"`` (polished
    against the empirical MSE), ``"max"``, ``"percentile"`` (99.99), ``"percentile:99.9"``,
    ``"mse"`` (100 points) or ``"mse:200"``."""
    if isinstance(spec, Calibrator):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"calibrator must be a str or a Calibrator, got {type(spec).__name__}")
    name, _, arg = spec.partition(":")
    if name not in CALIBRATORS:
        raise ValueError(f"calibrator must be one of {sorted(CALIBRATORS)} "
                         "(optionally 'octav:refine', 'percentile:<p>' or 'mse:<points>'), "
                         f"got {spec!r}")
    if not arg:
        return CALIBRATORS[name]()
    try:
        if name == "percentile":
            return PercentileCalibrator(float(arg))
        if name == "mse":
            return MSESweepCalibrator(int(arg))
        if name == "octav" and arg == "refine":
            return OctavCalibrator(refine=True)
    except ValueError as err:
        raise ValueError(f"calibrator {spec!r}: {err}") from None
    if name == "octav":
        raise ValueError(f"calibrator {spec!r}: the only option of 'octav' is 'octav:refine'")
    raise ValueError(f"calibrator {name!r} takes no argument, got {spec!r}")
