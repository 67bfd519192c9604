"""Scale policies: where a ``Quantizer``'s clipping scale comes from.

- ``DynamicScale(every=1)``: in training, every forward (every k-th with ``every=k``) computes
  the scale of the tensor it sees with the calibrator, warm-started from the kept one, in the
  calibrator's fused op when it has one (``Calibrator.quantize``: OCTAV's
  ``octav_fake_quantize``); eval uses the kept scale.
- ``StaticScale()``: the scale is set by calibration (``octav_kernels.calibrate_model``: the
  mean, or max, of the per-batch scales, the paper's static OCTAV) and then frozen, in training
  and eval.
- ``LearnedScale(grad_scale=True, scale_shape=None)`` (LSQ, Esser et al. 2020): the scale is an
  ``nn.Parameter`` named ``scale``, initialized by the calibrator at the first training forward
  (or by calibration), then trained by the optimizer with the LSQ gradient
  (``fake_quantize_lsq``).

Every policy also holds the calibrator (the rule from data to a scale, which also serves
calibration and ``init_from_input``), how calibration combines batches (``reduce``) and the
data-parallel group (``process_group``). A policy is configuration only and may be shared:
the state (the scale, the step count, the calibration accumulator) lives on the quantizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import _args, distributed
from ..calibrate import Calibrator, make_calibrator

if TYPE_CHECKING:
    from .quantizer import Quantizer

MODES = ("dynamic", "static", "learned")
REDUCTIONS = ("mean", "max")


def choice(value, allowed, name):
    """``value`` if it is one of ``allowed``, else a ``ValueError`` naming ``name``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


class ScalePolicy:
    """The base of the policies: the calibrator, ``reduce`` and ``process_group``.

    Args:
        calibrator: the scale rule, ``"octav"`` (default), ``"octav:refine"``, ``"max"``,
            ``"percentile[:p]"``, ``"mse[:points]"`` or a ``Calibrator``.
        reduce: how static calibration combines per-batch scales, ``"mean"`` or ``"max"``.
        process_group: a ``torch.distributed`` group whose ranks see different data, or
            ``"world"``: scales from data are then computed over all ranks
            (``Calibrator.across``: the ``"octav"`` and ``"max"`` rules).
    """

    mode = ""  # the name QuantConfig / Quantizer(mode=...) know it by
    learned = False  # whether the scale is an nn.Parameter trained by the optimizer

    def __init__(self, calibrator: str | Calibrator = "octav", *, reduce: str = "mean",
                 process_group: Any = None):
        self.calibrator = make_calibrator(calibrator)
        self.reduce = choice(reduce, REDUCTIONS, "reduce")
        self.process_group = process_group
        # The torch.distributed group of the collectives (None: the default one).
        self.group = None if process_group in (None, "world") else process_group
        # The rule that maps data to a scale: the calibrator, across ranks with a group.
        self.rule = self.calibrator if process_group is None else self.calibrator.across(
            self.group)

    def attach(self, q: Quantizer) -> None:
        """Set up the state this policy keeps on ``q`` (called once, by ``Quantizer``)."""

    def training_forward(self, q: Quantizer, x: torch.Tensor,
                         importance: torch.Tensor | None = None) -> torch.Tensor:
        """``q``'s forward in training mode (here: the eval forward, with the kept scale);
        ``importance`` weights a scale computed from ``x`` (``Quantizer.forward``)."""
        return q.eval_forward(x, importance)

    def combine(self, acc: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Fold one calibration batch's scale into the running result (float64)."""
        return acc + s if self.reduce == "mean" else torch.maximum(acc, s)

    def calibrated(self, acc: torch.Tensor, count: int) -> torch.Tensor:
        """The calibrated scale (float32) from ``count`` batches folded into ``acc``: their
        mean (or max), then over the ranks with a process group (each observed its own)."""
        mean = self.reduce == "mean"
        s = (acc / count if mean else acc).float()
        if self.process_group is not None:
            reduce = distributed.all_reduce_mean if mean else distributed.all_reduce_max
            s = reduce(s, self.group)
        return s

    def describe(self) -> str:
        return f"mode={self.mode}, calibrator={self.calibrator}"


class DynamicScale(ScalePolicy):
    """A scale recomputed from each training batch (module docstring); ``every=k``: from every
    k-th (the kept scale in between)."""

    mode = "dynamic"

    def __init__(self, calibrator: str | Calibrator = "octav", *, every: int = 1,
                 reduce: str = "mean", process_group: Any = None):
        super().__init__(calibrator, reduce=reduce, process_group=process_group)
        if _args.check_int(every, "every") < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every

    def training_forward(self, q, x, importance=None):
        init = q.kept_scale() if q.scale_fits(x) else None
        if self.every > 1:
            q.steps += 1
            if init is not None and (q.steps - 1) % self.every != 0:
                return q.fake_quantize(x, init)
        y, s = q.quantize_with_rule(x, init, importance)
        q.set_scale(s)
        return y

    def describe(self) -> str:
        return super().describe() + (f", every={self.every}" if self.every > 1 else "")


class StaticScale(ScalePolicy):
    """A scale set by calibration and frozen (module docstring)."""

    mode = "static"


class LearnedScale(ScalePolicy):
    """An LSQ scale (module docstring).

    Args:
        grad_scale: multiply the scale's gradient by LSQ's gradient scale ``1 / sqrt(N hi)``
            (N elements per group; with a ``process_group``, N counts the elements of all
            ranks' inputs, taken to be batches of the same size: ``world *`` the local N).
        scale_shape: the scale's shape, so that the Parameter exists (for the optimizer)
            before the first forward; per tensor it is ``()`` without saying. Otherwise the
            Parameter appears at the first training forward (build the optimizer after it).
    """

    mode = "learned"
    learned = True

    def __init__(self, calibrator: str | Calibrator = "octav", *, grad_scale: bool = True,
                 scale_shape: tuple[int, ...] | None = None, reduce: str = "mean",
                 process_group: Any = None):
        super().__init__(calibrator, reduce=reduce, process_group=process_group)
        self.grad_scale = _args.check_bool(grad_scale, "grad_scale")
        self.scale_shape = None if scale_shape is None else tuple(scale_shape)

    def attach(self, q):
        # Whether the learned scale has been set (saved, so that a checkpoint knows).
        q.register_buffer("scale_set", torch.zeros((), dtype=torch.bool))
        shape = self.scale_shape
        if shape is None and q.dim is None and q.group_size is None:
            shape = ()
        if shape is not None:
            q.keep_parameter(nn.Parameter(torch.zeros(q._stored_shape(shape))))

    def training_forward(self, q, x, importance=None):
        if not q.initialized:  # the first training forward: the calibrator's scale (weighted)
            q.set_scale(q.scale_of(x, importance=importance))
        q.check_learned()
        return q.fake_quantize(x, q.kept_scale())



def check_owned_fields(modes, every: int = 1, grad_scale: bool = True,
                       scale_shape: tuple[int, ...] | None = None) -> None:
    """A ``ValueError`` when a field is set off the only mode that reads it: ``every`` (dynamic)
    or ``grad_scale=False`` / ``scale_shape`` (learned), none of ``modes`` (a mode or several)
    being that mode."""
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    if every != 1 and "dynamic" not in modes:
        raise ValueError(f"every={every} applies to mode='dynamic', got mode={modes[0]!r}")
    if (not grad_scale or scale_shape is not None) and "learned" not in modes:
        raise ValueError("grad_scale and scale_shape apply to mode='learned', got "
                         f"mode={modes[0]!r}")


def make_policy(mode: str = "dynamic", calibrator: str | Calibrator = "octav", *,
                every: int = 1, reduce: str = "mean", process_group: Any = None,
                grad_scale: bool = True, scale_shape: tuple[int, ...] | None = None
                ) -> ScalePolicy:
    """The policy of ``mode`` (``"dynamic"``, ``"static"`` or ``"learned"``) with its fields;
    a field another mode owns (``every`` off dynamic, ``grad_scale=False`` / ``scale_shape`` off
    learned) is a ``ValueError`` rather than silently ignored."""
    choice(mode, MODES, "mode")
    if _args.check_int(every, "every") < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    _args.check_bool(grad_scale, "grad_scale")
    common = dict(reduce=reduce, process_group=process_group)
    check_owned_fields(mode, every, grad_scale, scale_shape)
    if mode == "dynamic":
        return DynamicScale(calibrator, every=every, **common)
    if mode == "learned":
        return LearnedScale(calibrator, grad_scale=grad_scale, scale_shape=scale_shape, **common)
    return StaticScale(calibrator, **common)
