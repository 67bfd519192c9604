"""QAT modules: a fake-quantizer with OCTAV (or baseline) clipping scales, and drop-in
quantized ``Linear`` / ``Conv1d`` / ``Conv2d`` layers that quantize their weight and their input.

Scale modes (``mode=``):

- ``"dynamic"``: in training, every forward computes the scale of the tensor it sees (OCTAV by
  default, warm-started from the previous step's scale, in the same fused op that
  fake-quantizes) and keeps it in the ``scale`` buffer; with ``every=k`` only every k-th
  training forward recomputes it. Eval uses the kept scale.
- ``"static"``: the scale is set by calibration (``octav_kernels.calibrate_model``: the mean of
  the per-batch scales over N batches, the paper's static OCTAV) and then frozen, in training
  and eval.

Gradient estimators (SPEC §3): ``grad="mph"`` (the paper's recommendation) is MAD for weights and
PWL for activations; ``"mad"``, ``"pwl"`` or ``"ste"`` use one estimator for both roles.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _args, distributed, reference
from .calibrate import Calibrator, MaxCalibrator, OctavCalibrator, make_calibrator
from .ops import fake_quantize, octav_fake_quantize
from .oscillation import OscillationState, dampening_loss, fake_quantize_tracked

MODES = ("dynamic", "static")
# Oscillation tracking state (octav_kernels.oscillation.OscillationState), buffer name: dtype.
_OSC_BUFFERS = {"osc_last_int": torch.int8, "osc_last_dir": torch.int8,
                "osc_frozen": torch.bool, "osc_freq": torch.float32,
                "osc_int_ema": torch.float32}
ESTIMATORS = ("mph", "mad", "pwl", "ste")
REDUCTIONS = ("mean", "max")


class Quantizer(nn.Module):
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
        check_finite: raise ``ValueError`` naming the module when a scale computed from data is
            NaN/inf (the input had NaN/inf). Costs one host sync per scale update on a GPU.
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
    per-element oscillation tracking and freezing to the fake-quant (``octav_kernels.oscillation``)
    with its state in the buffers ``osc_last_int``, ``osc_last_dir``, ``osc_frozen``,
    ``osc_freq`` and ``osc_int_ema``.
    """

    def __init__(self, bits: int = 4, *, signed: bool | None = True, dim: int | None = None,
                 group_size: int | None = None, grad: str = "mad", mode: str = "dynamic",
                 calibrator: str | Calibrator = "octav", every: int = 1, narrow: bool = False,
                 reduce: str = "mean", check_finite: bool = True,
                 init_from_input: bool = False, process_group=None):
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
        self.mode = _choice(mode, MODES, "mode")
        self.calibrator = make_calibrator(calibrator)
        if _args.check_int(every, "every") < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.reduce = _choice(reduce, REDUCTIONS, "reduce")
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
        self.register_buffer("scale", torch.empty(0))
        self.momentum: float | None = None  # oscillation tracking off

    # -- oscillation tracking ---------------------------------------------------------------

    @property
    def tracking(self) -> bool:
        """Whether oscillation tracking is on (``track_oscillations``)."""
        return self.momentum is not None

    def track_oscillations(self, momentum: float = 0.01) -> None:
        """Track this quantizer's oscillations from its next training forward (momentum of the
        frequency and level EMAs); ``freeze_threshold`` > 0 freezes weights above it. The
        state starts at the first forward, from that input's levels."""
        if self.signed is None:
            raise ValueError(f"{self.name}: oscillation tracking needs a fixed grid type "
                             "(signed=True or False), got signed=None")
        _args.check_tracked_bits(self.bits, self.signed)
        self.momentum = _args.check_momentum(momentum)
        if "osc_last_int" not in self._buffers:
            device = self.scale.device
            for name, dtype in _OSC_BUFFERS.items():
                self.register_buffer(name, torch.empty(0, dtype=dtype, device=device))
            # Set by the schedule every step (OscillationControl); not part of the state.
            self.register_buffer("osc_threshold", torch.zeros((), device=device),
                                 persistent=False)

    @property
    def freeze_threshold(self) -> float:
        """The oscillation frequency above which a weight freezes (0: freezing off); stored
        as a tensor, so a schedule that changes it does not recompile a compiled model."""
        return float(self.osc_threshold) if self.tracking else 0.0

    @freeze_threshold.setter
    def freeze_threshold(self, value: float) -> None:
        if not self.tracking:
            raise RuntimeError(f"{self.name}: call track_oscillations() before setting "
                               "freeze_threshold")
        with torch.no_grad():
            self.osc_threshold.fill_(_args.check_threshold(value, "freeze_threshold"))

    def _oscillation_state(self, x, scale) -> OscillationState:
        if self.osc_last_int.shape != x.shape:
            if self.osc_last_int.numel() > 0:
                raise ValueError(f"{self.name}: oscillation state of shape "
                                 f"{list(self.osc_last_int.shape)} does not match the input "
                                 f"{list(x.shape)}")
            start = OscillationState.start(x, scale, self.bits, signed=self.signed, dim=self.dim,
                                           group_size=self.group_size, narrow=self.narrow)
            for name, tensor in zip(_OSC_BUFFERS, start.tensors()):
                setattr(self, name, tensor)
        return OscillationState(*(getattr(self, name) for name in _OSC_BUFFERS))

    def frozen_fraction(self) -> float:
        """Fraction of the tracked elements that are frozen (0 before tracking starts)."""
        if not self.tracking or self.osc_frozen.numel() == 0:
            return 0.0
        return float(self.osc_frozen.float().mean())

    def oscillating_fraction(self, threshold: float = 0.01) -> float:
        """Fraction of the tracked elements that are not frozen and whose oscillation frequency
        EMA exceeds ``threshold`` (a frozen element keeps the frequency it froze at)."""
        if not self.tracking or self.osc_freq.numel() == 0:
            return 0.0
        return float(((self.osc_freq > threshold) & ~self.osc_frozen).float().mean())

    def write_frozen(self, w: torch.Tensor) -> int:
        """Set the frozen elements of ``w`` (this quantizer's input, e.g. the layer's weight
        viewed as it quantizes it) to their kept level on the current grid, in place; returns
        how many were set."""
        if not self.tracking or self.osc_frozen.shape != w.shape:
            return 0
        L = _args.levels(self.bits, bool(self.signed), self.narrow)[0]
        with torch.no_grad():
            step = reference.grid_step(self.scale, w, self.dim, self.group_size, L)
            w.copy_(torch.where(self.osc_frozen, (self.osc_last_int.float() * step).to(w.dtype),
                                w))
        return int(self.osc_frozen.sum())

    def dampening_loss(self, w: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """``oscillation.dampening_loss`` of ``w`` (this quantizer's input, e.g. the layer's
        weight) at the kept scale, frozen elements left out."""
        if not self.initialized:
            raise RuntimeError(f"{self.name}: no scale yet; the dampening loss needs one "
                               "(run a training forward first)")
        # Copies: the next training forward updates the scale and the frozen set in place, and
        # this loss's backward must still see the ones it was computed with.
        frozen = (self.osc_frozen.clone()
                  if self.tracking and self.osc_frozen.shape == w.shape else None)
        return dampening_loss(w, self.scale.clone(), self.bits, signed=bool(self.signed),
                              dim=self.dim,
                              group_size=self.group_size, narrow=self.narrow,
                              reduction=reduction, frozen=frozen)

    # -- state ------------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        """Whether a scale has been set (by training, calibration or ``state_dict``)."""
        return self.scale.numel() > 0 or self.scale.dim() == 0

    def _set_scale(self, s: torch.Tensor) -> None:
        with torch.no_grad():
            if self.scale.shape == s.shape:
                self.scale.copy_(s)
            else:
                self.scale = s.detach().to(torch.float32, copy=True)

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
        for name in ("scale", *(_OSC_BUFFERS if self.tracking else ())):
            saved, mine = state_dict.get(prefix + name), getattr(self, name)
            if name != "scale" and not saved_tracking:  # an untracked checkpoint: start over
                saved = torch.empty(0)
            if isinstance(saved, torch.Tensor) and saved.shape != mine.shape:
                setattr(self, name, torch.empty(saved.shape, dtype=mine.dtype,
                                                device=mine.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.tracking and not saved_tracking:  # the state restarts at the next forward
            for name in _OSC_BUFFERS:
                if prefix + name in missing_keys:
                    missing_keys.remove(prefix + name)

    def _apply(self, fn, recurse=True):
        kept = {name: getattr(self, name) for name in ("scale", *_OSC_BUFFERS, "osc_threshold")
                if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        # Follow device moves only: the scale and the EMAs stay float32 when the model is cast,
        # and the state stays contiguous (the kernels update it in place) under channels_last.
        for name, tensor in kept.items():
            setattr(self, name, tensor.to(getattr(self, name).device).contiguous())
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
                + (f", oscillations tracked (momentum={self.momentum})" if self.tracking else ""))

    # -- forward ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.observe(x)
            return x
        if self.training and self.mode == "dynamic":
            return self._quantize_dynamic(x)
        if not self.initialized:
            if not self.init_from_input:
                raise RuntimeError(
                    f"{self.name}: no scale yet; train it (mode='dynamic') or calibrate it "
                    "(octav_kernels.calibrate_model) before using it in eval / static mode")
            self._set_scale(self._compute_scale(x.detach(), self._signed_for(x)))
        return self._fake_quantize(x, self.scale)

    def _fake_quantize(self, x, scale):
        if self.tracking:
            state = self._oscillation_state(x, scale)
            return fake_quantize_tracked(
                x, scale, self.bits, state, signed=self.signed, dim=self.dim,
                group_size=self.group_size, grad=self.grad, narrow=self.narrow,
                momentum=self.momentum, freeze_threshold=self.osc_threshold,
                update=self.training)
        return fake_quantize(x, scale, self.bits, signed=self._signed_for(x), dim=self.dim,
                             group_size=self.group_size, grad=self.grad, narrow=self.narrow)

    def _quantize_dynamic(self, x):
        signed = self._signed_for(x)
        init = self.scale if self._scale_fits(x) else None
        if self.every > 1:
            self.steps += 1
            if init is not None and (self.steps - 1) % self.every != 0:
                return self._fake_quantize(x, init)
        calibrator = self.calibrator
        if self.process_group is not None:
            s = self._distributed_scale(x.detach(), signed, init)
            y = self._fake_quantize(x, s)
        elif (isinstance(calibrator, OctavCalibrator) and calibrator.is_default
              and not self.tracking):
            y, s = octav_fake_quantize(x, self.bits, signed=signed, dim=self.dim,
                                       group_size=self.group_size, grad=self.grad, init=init,
                                       narrow=self.narrow)
        else:
            s = calibrator(x.detach(), self.bits, signed=signed, dim=self.dim,
                           group_size=self.group_size, narrow=self.narrow, init=init)
            y = self._fake_quantize(x, s)
        self._check(s, x)
        self._set_scale(s)
        return y

    def _scale_fits(self, x) -> bool:
        """Whether the kept scale has the shape this input's granularity needs."""
        if not self.initialized:
            return False
        shape = _args.groups(x, self.dim, self.group_size).scale_shape
        return tuple(self.scale.shape) == shape

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

    def _check(self, s, x) -> None:
        if not self.check_finite:
            return
        seen = s if self.calibrator.propagates_nonfinite else x
        if not bool(torch.isfinite(seen).all()):
            raise ValueError(f"{self.name}: the input contains NaN or inf, so its clipping "
                             "scale is not finite")

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


def estimators(grad: str) -> tuple[str, str]:
    """``(weight estimator, activation estimator)`` of a module-level ``grad`` setting:
    ``mph`` -> (mad, pwl); otherwise the same one for both."""
    grad = _choice(grad, ESTIMATORS, "grad")
    return ("mad", "pwl") if grad == "mph" else (grad, grad)


def _choice(value, allowed, name):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


class _QuantLayer:
    """Shared by the quantized layers: builds the weight and input quantizers, and converts
    from / back to the float layer (sharing its Parameters, so optimizers keep working)."""

    float_type: type[nn.Module]
    weight: nn.Parameter

    def _init_quantizers(self, bits: int, act_bits: int | None, grad: str,
                         weight_granularity: str | int, act_signed: bool | None, mode: str,
                         weight_mode: str | None, calibrator: str | Calibrator, every: int,
                         narrow: bool, quantize_input: bool, process_group=None) -> None:
        w_grad, a_grad = estimators(grad)
        dim, group_size = _weight_granularity(weight_granularity, self.weight.shape)
        common = dict(calibrator=calibrator, every=every)
        self.weight_quantizer = Quantizer(
            bits, signed=True, dim=dim, group_size=group_size, grad=w_grad,
            mode=weight_mode or mode, narrow=narrow, init_from_input=True, **common)
        self.input_quantizer = (
            QuantAct(act_bits or bits, signed=act_signed, grad=a_grad, mode=mode,
                     narrow=narrow and act_signed is True, process_group=process_group,
                     **common)
            if quantize_input else None)
        for q in (self.weight_quantizer, self.input_quantizer):
            if q is not None:
                q.to(self.weight.device)

    def weight_as_quantized(self) -> torch.Tensor:
        """The weight in the shape its quantizer sees (blocks of ``group_size`` run over the
        flattened ``in x kernel`` elements of each output channel)."""
        w = self.weight
        return w if self.weight_quantizer.group_size is None else w.reshape(w.shape[0], -1)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight."""
        return self.weight_quantizer(self.weight_as_quantized()).reshape(self.weight.shape)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    @classmethod
    def from_float(cls, module: nn.Module, **config):
        """The quantized version of ``module`` (same Parameters, device, dtype, mode)."""
        if type(module) is not cls.float_type:
            raise TypeError(f"{cls.__name__}.from_float needs an {cls.float_type.__name__}, "
                            f"got {type(module).__name__}")
        new = cls(**_float_layer_args(module), device=module.weight.device,
                  dtype=module.weight.dtype, **config)
        new.weight = module.weight
        new.bias = module.bias
        new.train(module.training)
        return new

    def to_float(self) -> nn.Module:
        """The plain float layer with the same Parameters (quantizers dropped)."""
        module = self.float_type(**_float_layer_args(self), device=self.weight.device,
                                 dtype=self.weight.dtype)
        module.weight = self.weight
        module.bias = self.bias
        module.train(self.training)
        return module


def _weight_granularity(spec, shape):
    """``(dim, group_size)`` for ``"channel"`` (dim 0), ``"tensor"`` or a block size."""
    if spec == "channel":
        return 0, None
    if spec == "tensor":
        return None, None
    if isinstance(spec, int) and not isinstance(spec, bool) and spec > 0:
        row = math.prod(shape[1:])
        if row % spec:
            raise ValueError(f"weight_granularity={spec} must divide the {row} elements per "
                             f"output channel of a weight of shape {list(shape)}")
        return None, spec
    raise ValueError("weight_granularity must be 'channel', 'tensor' or a positive block "
                     f"size, got {spec!r}")


def _float_layer_args(m: nn.Module) -> dict:
    if isinstance(m, nn.Linear):
        return dict(in_features=m.in_features, out_features=m.out_features,
                    bias=m.bias is not None)
    return dict(in_channels=m.in_channels, out_channels=m.out_channels,
                kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                padding_mode=m.padding_mode)


_QUANT_DOC = """Quantized ``{base}``: ``{base}`` applied to the fake-quantized input and weight.

    Extra keyword arguments (``quantize_model`` passes them through):
        bits: weight bits (and activation bits unless ``act_bits``).
        grad: ``"mph"`` (MAD weights, PWL activations; default), ``"mad"``, ``"pwl"``, ``"ste"``.
        weight_granularity: ``"channel"`` (per output channel, default), ``"tensor"`` or a
            block size G (blocks of G over each output channel's flattened elements).
        act_signed: input grid; ``None`` decides from the data (unsigned after a ReLU).
        mode / weight_mode: ``"dynamic"`` or ``"static"`` (``weight_mode`` defaults to mode).
        calibrator, every, narrow: as in ``Quantizer``.
        quantize_input: set False to leave the input in float.
        process_group: data-parallel group for the input quantizer (``Quantizer``); weights
            are replicated by DDP and need none.
    """


def _quant_kwargs(kwargs):
    defaults = dict(bits=4, act_bits=None, grad="mph", weight_granularity="channel",
                    act_signed=None, mode="dynamic", weight_mode=None, calibrator="octav",
                    every=1, narrow=False, quantize_input=True, process_group=None)
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"unexpected quantization arguments: {sorted(unknown)}")
    return {**defaults, **kwargs}


class QuantLinear(_QuantLayer, nn.Linear):
    __doc__ = _QUANT_DOC.format(base="nn.Linear")
    float_type = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, **quant):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_quantizers(**_quant_kwargs(quant))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


class _QuantConv(_QuantLayer):
    """Shared by the quantized convolutions (the next base in the MRO is ``nn.ConvNd``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, **quant):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        self._init_quantizers(**_quant_kwargs(quant))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantConv1d(_QuantConv, nn.Conv1d):
    __doc__ = _QUANT_DOC.format(base="nn.Conv1d")
    float_type = nn.Conv1d


class QuantConv2d(_QuantConv, nn.Conv2d):
    __doc__ = _QUANT_DOC.format(base="nn.Conv2d")
    float_type = nn.Conv2d


QUANTIZED = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d}
