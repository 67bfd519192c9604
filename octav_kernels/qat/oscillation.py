"""Weight oscillations in low-bit QAT (Nagel et al., "Overcoming Oscillations in
Quantization-Aware Training", ICML 2022): the schedules (``Ramp``) and ``OscillationControl``,
which turns tracking on in a converted model's weight quantizers and drives the freezing
threshold and the dampening weight.

In low-bit QAT a latent weight near a rounding boundary can flip between two grid levels step
after step; the flips corrupt BatchNorm statistics and cost accuracy. Three tools:

- **tracking** (``fake_quantize_tracked``, ``octav_kernels.ops.oscillation``): per weight, its
  integer level at every step, the direction of its last change and an EMA of how often the
  direction reverses (the oscillation frequency), plus an EMA of the level itself; updated
  inside the weight fake-quant kernel (one pass, no extra torch ops). State:
  ``OscillationState`` (11 bytes per weight).
- **dampening** (``dampening_loss``): ``lambda * sum((q(w).detach() - clip(w))**2)`` pulls
  latent weights towards their grid level.
- **iterative freezing**: a weight whose frequency exceeds a threshold is frozen at the
  rounded EMA of its level until the end of training: its output stays at that level and its
  gradient is zero (in the same kernels).

A changing scale (dynamic OCTAV recomputes it every step) is handled by comparing integer
levels only: a level change caused by the scale counts like one caused by the weight; a
frozen weight keeps its integer level and follows the scale (``level * step``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .. import _args
from ..ops.oscillation import REDUCTIONS
from .layers import QuantLayer
from .model import name_quantizers


@dataclass(frozen=True)
class Ramp:
    """A schedule over training steps: 0 before ``start_step``; from ``start`` at
    ``start_step`` to ``end`` at ``end_step`` by ``kind`` (``"cosine"``: half a cosine,
    ``"linear"``, or ``"constant"``: ``start`` throughout); ``end`` after ``end_step``.

    Freezing threshold (0 is off): e.g. ``Ramp(0.04, 0.01, start_step=500, end_step=3000)``;
    dampening lambda: ``Ramp(0.0, 1e-3, end_step=3000)``.
    """

    start: float
    end: float | None = None
    start_step: int = 0
    end_step: int | None = None
    kind: str = "cosine"

    def __post_init__(self):
        if self.kind not in ("cosine", "linear", "constant"):
            raise ValueError(f"kind must be 'cosine', 'linear' or 'constant', got {self.kind!r}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is None and name == "end":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        _args.check_int(self.start_step, "start_step")
        if self.end_step is not None:
            _args.check_int(self.end_step, "end_step")
        if self.kind != "constant" and (self.end is None or self.end_step is None):
            raise ValueError(f"a {self.kind} ramp needs end and end_step")
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must be after start_step "
                             f"({self.start_step})")

    def __call__(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        if self.kind == "constant":
            return float(self.start)
        t = min(1.0, (step - self.start_step) / (self.end_step - self.start_step))
        if self.kind == "cosine":
            t = (1.0 - math.cos(math.pi * t)) / 2.0
        return float(self.start + (self.end - self.start) * t)


def _as_schedule(value, name: str) -> Ramp | None:
    if value is None or isinstance(value, Ramp):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, a Ramp or None, got {type(value).__name__}")
    return Ramp(float(value), kind="constant")


class OscillationControl:
    """Oscillation tracking, dampening and freezing for the weights of a converted model
    (``quantize_model``): turns tracking on in every quantized layer's weight quantizer and
    drives the schedules. In the training loop::

        control = OscillationControl(model, freeze=Ramp(0.04, 0.01, 200, 2000),
                                     dampening=Ramp(0.0, 1e-3, end_step=2000))
        for x, y in batches:
            loss = criterion(model(x), y) + control.dampening_loss()
            loss.backward(); optimizer.step(); optimizer.zero_grad()
            control.step()

    Args:
        model: a model with quantized layers.
        momentum: EMA momentum of the oscillation frequency and of the integer level (the
            paper's 0.01).
        freeze: the freezing threshold, a number or a ``Ramp`` over steps; 0 / None is off.
        dampening: lambda of the dampening loss, a number or a ``Ramp``; 0 / None is off.
        reduction: of the dampening loss per weight, ``"sum"``, ``"mean"``, ``"kernel_mean"``.

    ``step()`` counts optimizer steps (saved by ``state_dict``); the per-weight state lives in
    the quantizers' buffers (the model's ``state_dict``).
    """

    def __init__(self, model: nn.Module, *, momentum: float = 0.01,
                 freeze: float | Ramp | None = None, dampening: float | Ramp | None = None,
                 reduction: str = "sum"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        name_quantizers(model)
        self.layers, skipped = [], []
        for m in model.modules():
            if isinstance(m, QuantLayer):
                q = m.weight_quantizer
                fits = _args.tracked_bits_fit(q.bits, q.signed is not False)
                (self.layers if fits else skipped).append(m)
        if skipped:
            warnings.warn("OscillationControl: not tracked (levels of more than 8 bits do not fit "
                          "the int8 state): " + ", ".join(m.weight_quantizer.name
                                                          for m in skipped), stacklevel=2)
        self.quantizers = [m.weight_quantizer for m in self.layers]
        if not self.quantizers:
            raise ValueError("model has no quantized layers with <= 8-bit weights; call "
                             "quantize_model first")
        self.momentum = _args.check_momentum(momentum)
        self.freeze = _as_schedule(freeze, "freeze")
        self.dampening = _as_schedule(dampening, "dampening")
        self.reduction = reduction
        self.steps = 0
        for q in self.quantizers:
            q.track_oscillations(self.momentum)
        self._shard_state()
        self._apply_threshold()

    def _shard_state(self) -> None:
        """Shard the state of the weights FSDP2 has sharded since (``shard_tracking``)."""
        for layer in self.layers:
            q = layer.weight_quantizer
            if q._shard is None and isinstance(layer.weight, DTensor):
                q.shard_tracking(layer.weight_as_quantized())

    def _apply_threshold(self) -> None:
        threshold = self.freeze(self.steps) if self.freeze is not None else 0.0
        for q in self.quantizers:
            q.freeze_threshold = threshold

    def step(self) -> None:
        """Advance the schedules by one training step."""
        self.steps += 1
        self._shard_state()
        self._apply_threshold()

    @property
    def dampening_weight(self) -> float:
        """lambda at the current step."""
        return self.dampening(self.steps) if self.dampening is not None else 0.0

    def dampening_loss(self) -> torch.Tensor:
        """``lambda * sum over the quantized layers of dampening_loss(weight)`` at the scales of
        their last forward (call it after the model's forward); a zero tensor when lambda is
        0."""
        lam = self.dampening_weight
        device = self.layers[0].weight.device
        if lam == 0.0:
            return torch.zeros((), device=device)
        total = torch.zeros((), device=device)
        for layer in self.layers:
            total = total + layer.weight_quantizer.dampening_loss(layer.weight_as_quantized(),
                                                                  self.reduction)
        return lam * total

    def frozen_fraction(self) -> dict[str, float]:
        """Fraction of each weight's elements that are frozen, by quantizer path."""
        return {q.name: q.frozen_fraction() for q in self.quantizers}

    def oscillating_fraction(self, threshold: float = 0.01) -> dict[str, float]:
        """Fraction of each weight's elements that are not frozen and whose oscillation
        frequency EMA exceeds ``threshold`` (0.01: more than one reversal per 100 steps)."""
        return {q.name: q.oscillating_fraction(threshold) for q in self.quantizers}

    def write_frozen_weights(self) -> int:
        """Write every frozen weight's kept level into the latent weight (``level * step`` at
        the current scale), so that the weight itself carries the frozen values: for export,
        ``dequantize_model``, or anything that quantizes ``weight`` again. (The optimizer can
        still move frozen latent weights through momentum or weight decay; their outputs do
        not change, but the latent values drift.) Returns how many weights were written."""
        return sum(layer.weight_quantizer.write_frozen(layer.weight_as_quantized())
                   for layer in self.layers)

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self._apply_threshold()
