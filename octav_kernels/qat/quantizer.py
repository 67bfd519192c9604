"""The QAT fake-quantizer: a module that keeps a clipping scale (OCTAV by default) and
fake-quantizes its input with it.

Scale modes (``mode=``):

- ``"dynamic"``: in training, every forward computes the scale of the tensor it sees (OCTAV by
  default, warm-started from the previous step's scale, in the same fused op that
  fake-quantizes) and keeps it in the ``scale`` buffer; with ``every=k`` only every k-th
  training forward recomputes it. Eval uses the kept scale.
- ``"static"``: the scale is set by calibration (``octav_kernels.calibrate_model``: the mean of
  the per-batch scales over N batches, the paper's static OCTAV) and then frozen, in training
  and eval.
- ``"learned"`` (LSQ, Esser et al. 2020): the scale is an ``nn.Parameter`` named ``scale``,
  initialized by the calibrator (OCTAV by default) at the first training forward (or by
  calibration), then trained by the optimizer with the LSQ gradient (``fake_quantize_lsq``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _args, distributed
from ..calibrate import Calibrator, MaxCalibrator, OctavCalibrator, make_calibrator
from ..ops import fake_quantize, fake_quantize_lsq, octav_fake_quantize
from .tracking import OSC_BUFFERS, OscillationTracking

MODES = ("dynamic", "static", "learned")
REDUCTIONS = ("mean", "max")


def choice(value, allowed, name):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


class Quantizer(OscillationTracking, nn.Module):
    """Fake-quantizes its input on a ``bits``-bit grid whose clipping scale it keeps.

    Args:
        bits: bit width, 2..16.
        signed: grid type; ``None`` decides from the first tensor seen (unsigned if it has no
            negative entry, e.g. after a ReLU) and keeps that decision (in ``state_dict``).
        dim, group_size: granularity of the scale, as in the ops (per tensor by default).
        grad: backward estimator, ``"mad"``, ``"pwl"`` or ``"ste"``.
        mode: ``"dynamic"`` or ``"static"`` (module docstring).
        calibrator: the scale rule: ``"octav"`` (default), ``"octav:refine"`` (polished against
            the empirical MSE), ``"max"``, ``"percentile[:p]"``, ``"mse[:points]"`` or a
            ``Calibrator``.
        every: in dynamic training, recompute the scale every ``every`` forwards.
        narrow: symmetric signed levels ``±(2**(B-1)-1)``.
        reduce: how static calibration combines per-batch scales, ``"mean"`` or ``"max"``.
        grad_scale: in learned mode, multiply the scale's gradient by LSQ's gradient scale
            ``1 / sqrt(N hi)`` (N elements per group).
        scale_shape: in learned mode, the scale's shape, so that the Parameter exists (for the
            optimizer) before the first forward; per tensor it is ``()`` without saying.
            Otherwise the Parameter appears at the first training forward (build the optimizer
            after it).
        check_finite: raise ``ValueError`` naming the module when a scale computed from data is
            NaN/inf (the input had NaN/inf), or a learned scale is not positive and finite. On
            CPU tensors at once. On CUDA tensors without a host sync per step: the quantizer
            records it on the device and raises at its next check point: every
            ``check_every`` (100) scale updates, its first forward in eval mode, or
            ``check_nonfinite()`` (``octav_kernels.check_finite(model)``).
        init_from_input: in eval, a quantizer without a scale computes it from its input
            instead of raising (right for weights, which do not depend on data).
        process_group: a ``torch.distributed`` group whose ranks see different data (the
            activations of data-parallel training), or ``"world"``: dynamic OCTAV / max scales
            and static calibration are then computed over the data of all ranks
            (``octav_kernels.distributed``), identical everywhere. Cost: one all-reduce of
            ``24 * n_groups`` bytes per OCTAV iteration (1-3 per warm-started step) or one
            max-reduce; ``signed=None`` is decided from all ranks' first batch (one more).
            Calibrators ``"octav"`` and ``"max"`` only; not with ``group_size``.

    ``scale`` (float32, the granularity's shape; empty until set) is a buffer: it is saved in
    ``state_dict``, moves with ``.to(device)`` and stays float32 when the model is cast to
    another dtype.

    ``track_oscillations()`` (for weights; ``octav_kernels.OscillationControl`` calls it) adds
    per-element oscillation tracking and freezing to the fake-quant
    (``octav_kernels.qat.tracking``).
    """

    check_every = 100  # CUDA: scale updates between two checks of the recorded NaN/inf flag
    deferred_check = ("cuda",)  # device types whose NaN/inf check waits for a check point

    def __init__(self, bits: int = 4, *, signed: bool | None = True, dim: int | None = None,
                 group_size: int | None = None, grad: str = "mad", mode: str = "dynamic",
                 calibrator: str | Calibrator = "octav", every: int = 1, narrow: bool = False,
                 reduce: str = "mean", check_finite: bool = True,
                 init_from_input: bool = False, process_group=None, grad_scale: bool = True,
                 scale_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.bits = _args.check_bits(bits)
        if signed is not None and not isinstance(signed, bool):
            raise TypeError(f"signed must be a bool or None, got {type(signed).__name__}")
        if signed is not None:
            _args.check_narrow(narrow, signed)
        if dim is not None and group_size is not None:
            raise ValueError("give at most one of dim (per channel) and group_size (per block)")
        if dim is not None:
            _args.check_int(dim, "dim")
        if group_size is not None and _args.check_int(group_size, "group_size") <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        self.signed, self.dim, self.group_size, self.narrow = signed, dim, group_size, narrow
        self.grad = _args.check_grad(grad)
        self.mode = choice(mode, MODES, "mode")
        self.calibrator = make_calibrator(calibrator)
        if _args.check_int(every, "every") < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.reduce = choice(reduce, REDUCTIONS, "reduce")
        self.check_finite = bool(check_finite)
        self.init_from_input = bool(init_from_input)
        if process_group is not None:
            if not isinstance(self.calibrator, (OctavCalibrator, MaxCalibrator)):
                raise ValueError("process_group works with the 'octav' and 'max' calibrators, "
                                 f"got {self.calibrator}")
            if getattr(self.calibrator, "refine", False):
                raise ValueError("process_group: the refined OCTAV scale is not computed "
                                 "across ranks; use calibrator='octav'")
            if group_size is not None:
                raise ValueError("process_group: per-block scales (group_size) are local to "
                                 "each rank's rows; use a per-tensor or per-channel scale")
        self.process_group = process_group
        self.name = type(self).__name__  # quantize_model sets the module path
        self.calibrating = False
        self.steps = 0  # training forwards seen (counted only when every > 1)
        self._calibration: tuple[torch.Tensor, int] | None = None
        self._scale_shapes: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._unchecked = 0  # CUDA scale updates since the NaN/inf flag was last read
        self.grad_scale = _args.check_bool(grad_scale, "grad_scale")
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("_nonfinite", torch.zeros((), dtype=torch.bool), persistent=False)
        self._learned_set = False  # learned mode: whether the Parameter holds a scale yet
        if self.mode == "learned":
            if scale_shape is None and dim is None and group_size is None:
                scale_shape = ()
            # Whether the learned scale has been set (saved, so a checkpoint knows).
            self.register_buffer("scale_set", torch.zeros((), dtype=torch.bool))
            if scale_shape is not None:
                del self._buffers["scale"]
                self.scale = nn.Parameter(torch.zeros(tuple(scale_shape)))

    # -- state ------------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        """Whether a scale has been set (by training, calibration or ``state_dict``)."""
        if self.mode == "learned":
            return self._learned_set
        return self.scale.numel() > 0 or self.scale.dim() == 0

    def _set_scale(self, s: torch.Tensor) -> None:
        if self.mode != "learned":  # a buffer: no autograd to stop (the per-step path)
            if self.scale.shape == s.shape:
                self.scale.copy_(s.detach())
            else:
                self.scale = s.detach().to(torch.float32, copy=True)
            return
        with torch.no_grad():
            if self.scale.shape == s.shape:
                self.scale.copy_(s)
            else:  # the Parameter of a shape known only now
                self._buffers.pop("scale", None)
                self.scale = nn.Parameter(s.detach().to(torch.float32, copy=True))
        self.scale_set.fill_(True)
        self._learned_set = True

    def get_extra_state(self) -> dict:
        return {"signed": self.signed, "momentum": self.momentum}

    def set_extra_state(self, state: dict) -> None:
        self.signed = state["signed"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        extra = state_dict.get(prefix + "_extra_state") or {}
        saved_tracking = prefix + "osc_last_int" in state_dict
        if saved_tracking and not self.tracking:
            self.track_oscillations(extra.get("momentum") or 0.01)
        for name in ("scale", *(OSC_BUFFERS if self.tracking else ())):
            saved, mine = state_dict.get(prefix + name), getattr(self, name)
            if name != "scale" and not saved_tracking:  # an untracked checkpoint: start over
                saved = torch.empty(0)
            if isinstance(saved, torch.Tensor) and saved.shape != mine.shape:
                fresh = torch.empty(saved.shape, dtype=mine.dtype, device=mine.device)
                if isinstance(mine, nn.Parameter):
                    fresh = nn.Parameter(fresh)
                elif name == "scale" and self.mode == "learned":  # (its first appearance)
                    del self._buffers["scale"]
                    fresh = nn.Parameter(fresh)
                setattr(self, name, fresh)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.mode == "learned" and prefix + "scale_set" in state_dict:
            self._learned_set = bool(self.scale_set)
        if self.tracking and not saved_tracking:  # the state restarts at the next forward
            for name in OSC_BUFFERS:
                if prefix + name in missing_keys:
                    missing_keys.remove(prefix + name)

    def _apply(self, fn, recurse=True):
        kept = {name: getattr(self, name) for name in ("scale", *OSC_BUFFERS, "osc_threshold")
                if self._buffers.get(name) is not None
                or self._parameters.get(name) is not None}
        super()._apply(fn, recurse)
        # Follow device moves only: the scale and the EMAs stay float32 when the model is cast,
        # and the state stays contiguous (the kernels update it in place) under channels_last.
        # A learned scale stays the same Parameter object (an optimizer holds it).
        for name, tensor in kept.items():
            moved = tensor.to(getattr(self, name).device).contiguous()
            if isinstance(getattr(self, name), nn.Parameter):
                getattr(self, name).data = moved.detach()
            else:
                setattr(self, name, moved)
        return self

    def extra_repr(self) -> str:
        gran = ("per tensor" if self.dim is None and self.group_size is None
                else f"dim={self.dim}" if self.dim is not None
                else f"group_size={self.group_size}")
        signed = "auto" if self.signed is None else self.signed
        return (f"bits={self.bits}, signed={signed}, {gran}, grad={self.grad}, "
                f"mode={self.mode}, calibrator={self.calibrator}"
                + (f", every={self.every}" if self.every > 1 else "")
                + (", narrow=True" if self.narrow else "")
                + (", grad_scale=False" if self.mode == "learned" and not self.grad_scale
                   else "")
                + (f", oscillations tracked (momentum={self.momentum})" if self.tracking else ""))

    # -- forward ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.observe(x)
            return x
        if self.training and self.mode == "dynamic":
            return self._quantize_dynamic(x)
        if self.training and self.mode == "learned":
            return self._quantize_learned(x)
        if self._unchecked:
            self.check_nonfinite()
        if not self.initialized:
            if not self.init_from_input:
                raise RuntimeError(
                    f"{self.name}: no scale yet; train it (mode='dynamic') or calibrate it "
                    "(octav_kernels.calibrate_model) before using it in eval / static mode")
            self._set_scale(self._compute_scale(x.detach(), self._signed_for(x)))
        return self._fake_quantize(x, self.scale)

    def _fake_quantize(self, x, scale):
        if self.tracking:
            return self._fake_quantize_tracked(x, scale)
        return fake_quantize(x, scale, self.bits, signed=self._signed_for(x), dim=self.dim,
                             group_size=self.group_size, grad=self.grad, narrow=self.narrow)

    def _quantize_dynamic(self, x):
        signed = self._signed_for(x)
        init = self.scale if self._scale_fits(x) else None
        if self.every > 1:
            self.steps += 1
            if init is not None and (self.steps - 1) % self.every != 0:
                return self._fake_quantize(x, init)
        if self.process_group is not None:
            s = self._distributed_scale(x.detach(), signed, init)
            y = self._fake_quantize(x, s)
        elif (isinstance(self.calibrator, OctavCalibrator) and self.calibrator.is_default
              and not self.tracking):
            y, s = octav_fake_quantize(x, self.bits, signed=signed, dim=self.dim,
                                       group_size=self.group_size, grad=self.grad, init=init,
                                       narrow=self.narrow)
        else:
            s = self.calibrator(x.detach(), self.bits, signed=signed, dim=self.dim,
                                group_size=self.group_size, narrow=self.narrow, init=init)
            y = self._fake_quantize(x, s)
        self._check(s, x)
        self._set_scale(s)
        return y

    def _quantize_learned(self, x):
        if not self.initialized:  # the first training forward: the calibrator's scale
            self._set_scale(self._compute_scale(x.detach(), self._signed_for(x)))
        self._check_learned()
        if self.tracking:
            return self._fake_quantize_tracked(x, self.scale)
        return fake_quantize_lsq(x, self.scale, self.bits, signed=self._signed_for(x),
                                 dim=self.dim, group_size=self.group_size, grad=self.grad,
                                 narrow=self.narrow, grad_scale=self.grad_scale)

    def _scale_fits(self, x) -> bool:
        """Whether the kept scale has the shape this input's granularity needs."""
        shape = self._scale_shapes.get(x.shape)
        if shape is None:  # (the layout of each input shape is worked out once)
            shape = _args.groups(x, self.dim, self.group_size).scale_shape
            self._scale_shapes[x.shape] = shape
        return self.initialized and tuple(self.scale.shape) == shape

    def _signed_for(self, x) -> bool:
        if self.signed is None:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    f"{self.name}: signed=None is decided from the first input, which needs one "
                    "eager forward before torch.compile (or pass signed / act_signed)")
            negative = x.numel() == 0 or bool(x.detach().min() < 0)
            if self.process_group is not None:  # the same grid on every rank (empty: no say)
                local = torch.tensor(float(x.numel() > 0 and negative))
                negative = bool(distributed.all_reduce_max(local, self._group()))
            self.signed = negative
            _args.check_narrow(self.narrow, self.signed)
        return self.signed

    def _group(self):
        return None if self.process_group == "world" else self.process_group

    def _distributed_scale(self, x, signed, init=None):
        if isinstance(self.calibrator, MaxCalibrator):
            return distributed.max_scale(x, signed=signed, dim=self.dim, group=self._group())
        octav = self.calibrator
        return distributed.octav_scale(x, self.bits, signed=signed, dim=self.dim, init=init,
                                       max_iters=octav.max_iters, rtol=octav.rtol,
                                       narrow=self.narrow, group=self._group())

    def _compute_scale(self, x, signed):
        if self.process_group is not None:
            s = self._distributed_scale(x, signed)
        else:
            s = self.calibrator(x, self.bits, signed=signed, dim=self.dim,
                                group_size=self.group_size, narrow=self.narrow)
        self._check(s, x)
        return s

    # -- NaN / inf ----------------------------------------------------------------------------

    def _nonfinite_error(self, when: str) -> ValueError:
        return ValueError(f"{self.name}: the input {when}contains NaN or inf, so its clipping "
                          "scale is not finite")

    def _check(self, s, x) -> None:
        seen = s if self.calibrator.propagates_nonfinite else x
        if self.check_finite and not self._all_finite(seen):
            raise self._nonfinite_error("")

    def _check_learned(self) -> None:
        """A learned scale the optimizer drove to <= 0, NaN or inf is an error (lower the
        scales' learning rate)."""
        if self.check_finite and not self._all_finite(self.scale.detach(), positive=True):
            raise ValueError(f"{self.name}: the learned scale is not positive and finite (NaN "
                             "or inf in the input, or the optimizer drove it there)")

    def _all_finite(self, t: torch.Tensor, positive: bool = False) -> bool:
        """Whether every element of ``t`` is finite (and > 0 if ``positive``): at once on the
        CPU, from its min and max (NaN propagates into both; one reduction, cheaper than
        ``isfinite(t).all()``); on a GPU (no host sync per step) it is recorded on the device,
        read at a check point, and this returns True."""
        if t.numel() == 0:
            return True
        if t.device.type not in self.deferred_check:
            lo, hi = torch.aminmax(t)
            lo, hi = float(lo), float(hi)
            return (lo > 0 if positive else lo > -math.inf) and hi < math.inf
        good = torch.isfinite(t).all()
        if positive:
            good &= (t > 0).all()
        if self._nonfinite.device != good.device:
            self._nonfinite = torch.zeros((), dtype=torch.bool, device=good.device)
        self._nonfinite |= ~good
        if not torch.compiler.is_compiling():
            self._unchecked += 1
            if self._unchecked >= self.check_every:
                self.check_nonfinite()
        return True

    def check_nonfinite(self) -> None:
        """Raise the ``ValueError`` of ``check_finite`` now if a scale this quantizer computed
        on a GPU since the last check was NaN/inf (one host sync; nothing to do on CPU, where
        every scale is checked at once)."""
        unchecked, self._unchecked = self._unchecked, 0
        if unchecked and bool(self._nonfinite):
            self._nonfinite.zero_()
            if self.mode == "learned":
                raise ValueError(f"{self.name}: the learned scale was not positive and finite "
                                 f"at one of the last {unchecked} training steps")
            raise self._nonfinite_error(f"of one of the last {unchecked} scale updates ")

    def to_float(self) -> nn.Module:
        """What ``dequantize_model`` puts in this quantizer's place: ``nn.Identity``."""
        return nn.Identity()

    # -- static calibration -----------------------------------------------------------------

    def observe(self, x: torch.Tensor) -> None:
        """Calibration step: compute this batch's scale and fold it into the running result
        (mean or max over batches, ``reduce``). Always checks x for NaN/inf."""
        x = x.detach()
        signed = self._signed_for(x)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{self.name}: a calibration batch contains NaN or inf")
        s = self._compute_scale(x, signed).double()
        if self._calibration is None:
            self._calibration = (s, 1)
            return
        acc, count = self._calibration
        if acc.shape != s.shape:
            raise ValueError(f"{self.name}: calibration batches give scales of shapes "
                             f"{list(acc.shape)} and {list(s.shape)}")
        acc = acc + s if self.reduce == "mean" else torch.maximum(acc, s)
        self._calibration = (acc, count + 1)

    def finish_calibration(self) -> bool:
        """Leave calibration mode and set the scale from the observed batches. Returns False
        (scale unchanged) if no batch was observed."""
        self.calibrating = False
        if self._calibration is None:
            return False
        acc, count = self._calibration
        self._calibration = None
        s = (acc / count if self.reduce == "mean" else acc).float()
        if self.process_group is not None:  # every rank observed its own batches
            s = (distributed.all_reduce_mean(s, self._group()) if self.reduce == "mean"
                 else distributed.all_reduce_max(s, self._group()))
        self._set_scale(s)
        return True


class QuantAct(Quantizer):
    """An activation quantizer to insert anywhere (e.g. after a non-linearity): a
    ``Quantizer`` with activation defaults, ``signed`` from the data and PWL gradients."""

    def __init__(self, bits: int = 4, *, signed: bool | None = None, grad: str = "pwl",
                 **kwargs):
        super().__init__(bits, signed=signed, grad=grad, **kwargs)
