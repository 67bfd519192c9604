"""The QAT fake-quantizer: a module that fake-quantizes its input on a grid whose clipping
scale it keeps. Where the scale comes from is its scale policy (``octav_kernels.qat.scale``:
dynamic, static or learned); what deploy reads of it is ``Quantizer.export()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .. import _args, distributed
from ..calibrate import Calibrator
from ..ops import fake_quantize, fake_quantize_lsq
from .grid import Grid, granularity
from .scale import ScalePolicy, make_policy
from .tracking import OSC_BUFFERS, OscillationTracking


@dataclass(frozen=True)
class QuantizerExport:
    """What a trained or calibrated quantizer hands to deployment (``Quantizer.export``): its
    grid, its float32 scale (the granularity's shape, finite) and, for a weight whose
    oscillating elements were frozen, the mask of frozen elements and their kept levels."""

    grid: Grid
    scale: torch.Tensor
    frozen: torch.Tensor | None = None
    frozen_levels: torch.Tensor | None = None

    def levels(self, x: torch.Tensor) -> torch.Tensor:
        """The integer levels (float32) of ``x`` as the quantizer's eval forward quantizes it:
        ``grid.integer_levels``, frozen elements at their kept level."""
        levels = self.grid.integer_levels(x, self.scale)
        if self.frozen is not None and self.frozen.shape == x.shape:
            levels = torch.where(self.frozen, self.frozen_levels.float(), levels)
        return levels


class _GlobalGradScale(torch.autograd.Function):
    """The scale unchanged; its gradient times ``1 / sqrt(world size)``. LSQ's gradient scale
    ``1 / sqrt(N hi)`` counts the N elements of this rank's input; over data-parallel ranks
    of equal batches, the whole batch has ``world * N`` (as one process on it would count)."""

    @staticmethod
    def forward(ctx, scale, factor):
        ctx.factor = factor
        return scale.view_as(scale)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class Quantizer(OscillationTracking, nn.Module):
    """Fake-quantizes its input on a ``bits``-bit grid whose clipping scale it keeps.

    Args:
        bits: bit width, 2..16.
        signed: grid type; ``None`` decides from the first tensor seen (unsigned if it has no
            negative entry, e.g. after a ReLU) and keeps that decision (in ``state_dict``).
        dim, group_size: granularity of the scale, as in the ops (per tensor by default).
        grad: backward estimator, ``"mad"``, ``"pwl"`` or ``"ste"``.
        narrow: symmetric signed levels ``±(2**(B-1)-1)``.
        policy: where the scale comes from, a ``ScalePolicy`` (``DynamicScale``,
            ``StaticScale``, ``LearnedScale``; ``octav_kernels.qat.scale``). Or, instead, its
            fields as keywords: ``mode`` (``"dynamic"``, default, ``"static"`` or
            ``"learned"``), ``calibrator`` (``"octav"``, default, ``"octav:refine"``,
            ``"max"``, ``"percentile[:p]"``, ``"mse[:points]"`` or a ``Calibrator``),
            ``every`` (dynamic), ``reduce`` (static calibration, ``"mean"`` or ``"max"``),
            ``process_group`` and ``grad_scale`` / ``scale_shape`` (learned).
        check_finite: raise ``ValueError`` naming the module when a scale computed from data is
            NaN/inf (the input had NaN/inf), or a learned scale is not positive and finite. On
            CPU tensors at once. On CUDA tensors without a host sync per step: the quantizer
            records it on the device and raises at its next check point: every
            ``check_every`` (100) scale updates (eager steps only: steps under torch.compile
            are not counted), its first forward in eval mode, or ``check_nonfinite()``
            (``octav_kernels.check_finite(model)``), which also see compiled steps.
        init_from_input: in eval, a quantizer without a scale computes it from its input
            instead of raising (right for weights, which do not depend on data).

    ``process_group`` (a ``torch.distributed`` group whose ranks see different data, the
    activations of data-parallel training, or ``"world"``): dynamic OCTAV / max scales and
    static calibration are computed over the data of all ranks (``octav_kernels.distributed``),
    identical everywhere. Cost: one all-reduce of ``24 * n_groups`` bytes per OCTAV iteration
    (1-3 per warm-started step) or one max-reduce; ``signed=None`` is decided from all ranks'
    first batch (one more). Calibrators ``"octav"`` and ``"max"`` only; not with ``group_size``.

    ``scale`` (float32, the granularity's shape; empty until set) is a buffer, or with a learned
    scale an ``nn.Parameter``: it is saved in ``state_dict``, moves with ``.to(device)`` and
    stays float32 when the model is cast to another dtype. A learned per-tensor scale is a
    ``[1]`` Parameter (FSDP2 shards Parameters along dim 0 and rejects 0-dim ones; a 0-dim one
    of an older checkpoint loads into it); ``kept_scale()`` is the scale in the granularity's
    shape, as the ops take it.

    ``track_oscillations()`` (for weights; ``octav_kernels.OscillationControl`` calls it) adds
    per-element oscillation tracking and freezing to the fake-quant
    (``octav_kernels.qat.tracking``).
    """

    check_every = 100  # CUDA: scale updates between two checks of the recorded NaN/inf flag
    deferred_check = ("cuda",)  # device types whose NaN/inf check waits for a check point

    def __init__(self, bits: int = 4, *, signed: bool | None = True, dim: int | None = None,
                 group_size: int | None = None, grad: str = "mad", narrow: bool = False,
                 policy: ScalePolicy | None = None, mode: str = "dynamic",
                 calibrator: str | Calibrator = "octav", every: int = 1, reduce: str = "mean",
                 check_finite: bool = True, init_from_input: bool = False,
                 process_group=None, grad_scale: bool = True,
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
        if policy is None:
            policy = make_policy(mode, calibrator, every=every, reduce=reduce,
                                 process_group=process_group, grad_scale=grad_scale,
                                 scale_shape=scale_shape)
        elif not isinstance(policy, ScalePolicy):
            raise TypeError(f"policy must be a ScalePolicy, got {type(policy).__name__}")
        elif (mode, calibrator, every, reduce, process_group, grad_scale, scale_shape) != (
                "dynamic", "octav", 1, "mean", None, True, None):
            raise ValueError("give either policy or its fields (mode, calibrator, every, "
                             "reduce, process_group, grad_scale, scale_shape), not both")
        if policy.process_group is not None and group_size is not None:
            raise ValueError("process_group: per-block scales (group_size) are local to "
                             "each rank's rows; use a per-tensor or per-channel scale")
        self.policy = policy
        self.check_finite = bool(check_finite)
        self.init_from_input = bool(init_from_input)
        self.name = type(self).__name__  # quantize_model sets the module path
        self.calibrating = False
        self.steps = 0  # training forwards seen (counted only when every > 1)
        self._calibration: tuple[torch.Tensor, int] | None = None
        self._scale_shapes: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._unchecked = 0  # CUDA scale updates since the NaN/inf flag was last read (eager)
        self._uncounted = False  # whether one ran under torch.compile since (not counted)
        self._learned_set = False  # a learned scale: whether the Parameter holds a scale yet
        self._own_scale = None  # the learned scale Parameter it made (not a wrapper's swap)
        self.register_buffer("scale", torch.empty(0))
        # The GPU NaN/inf record (_all_finite): the largest magnitude checked since the last
        # check point, NaN or inf once a bad value was seen. A plain attribute, not a buffer,
        # so that DDP's buffer broadcast (from rank 0 at every forward) cannot erase what
        # another rank recorded; it follows the data's device lazily.
        self._nonfinite = torch.zeros(())
        policy.attach(self)

    @property
    def mode(self) -> str:
        """The scale policy's name: ``"dynamic"``, ``"static"`` or ``"learned"``."""
        return self.policy.mode

    @property
    def calibrator(self) -> Calibrator:
        """The scale policy's calibrator."""
        return self.policy.calibrator

    @property
    def every(self) -> int:
        """Dynamic scales: training forwards per scale update (1 for the other policies)."""
        return getattr(self.policy, "every", 1)

    @property
    def reduce(self) -> str:
        """How static calibration combines per-batch scales (the policy's)."""
        return self.policy.reduce

    @property
    def process_group(self):
        """The data-parallel group of the scales computed from data (the policy's)."""
        return self.policy.process_group

    @property
    def grad_scale(self) -> bool:
        """Learned scales: whether LSQ's gradient scale applies (True for the others)."""
        return getattr(self.policy, "grad_scale", True)

    @property
    def grid(self) -> Grid:
        """The grid this quantizer quantizes on (``ValueError`` while ``signed=None`` is not
        yet decided by data)."""
        if self.signed is None:
            raise ValueError(f"{self.name}: the input grid (signed=None) is decided by the first "
                             "batch; run the model on data before convert_model")
        return Grid(self.bits, self.signed, self.narrow, self.dim, self.group_size)

    # -- state ------------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        """Whether a scale has been set (by training, calibration or ``state_dict``)."""
        if self.policy.learned:
            return self._learned_set
        return self.scale.numel() > 0 or self.scale.dim() == 0

    def kept_scale(self) -> torch.Tensor:
        """The kept scale in the granularity's shape, as the ops take it (a view of ``scale``:
        a learned per-tensor ``[1]`` Parameter is viewed as 0-dim)."""
        if self.scale.dtype != torch.float32:  # (buffers stay float32: _apply)
            raise ValueError(
                f"{self.name}: the learned scale arrives as {self.scale.dtype}, not float32 "
                "(an FSDP2 MixedPrecisionPolicy casts the Parameters of its unit); wrap the "
                "quantizers in float32 units first: octav_kernels.shard_quantizers(model)")
        if self.scale.dim() == 1 and self._per_tensor_parameter():
            return self.scale.view(())
        return self.scale

    def _per_tensor_parameter(self) -> bool:
        """Whether the scale is stored as a ``[1]`` Parameter (learned, per tensor)."""
        return self.policy.learned and self.dim is None and self.group_size is None

    def _stored_shape(self, shape) -> tuple[int, ...]:
        """The shape ``scale`` keeps a scale of the granularity's ``shape`` in."""
        shape = tuple(shape)
        return (1,) if shape == () and self._per_tensor_parameter() else shape

    def set_scale(self, s: torch.Tensor) -> None:
        """Keep ``s`` (float32, the granularity's shape) as the scale; a learned scale stays
        the same Parameter where the shape allows (an optimizer holds it)."""
        shape = self._stored_shape(s.shape)
        if self.policy.learned and self._parameters.get("scale") is not self._own_scale:
            # FSDP2 swapped the Parameter: its unsharded copy in a forward (a write there is
            # lost), or its sharded DTensor outside one (written shard by shard).
            if not isinstance(self.scale, DTensor) or tuple(self.scale.shape) != shape:
                raise ValueError(
                    f"{self.name}: a learned scale cannot be set inside a forward of a model "
                    "sharded by FSDP2 (fully_shard keeps the sharded Parameter); set it before "
                    "sharding, or after it outside the forward: calibrate_model(model, "
                    "batches), a training forward of the unsharded model, or load_state_dict")
            with torch.no_grad():
                mine = distribute_tensor(s.detach().reshape(shape).to(self.scale.dtype),
                                         self.scale.device_mesh, self.scale.placements,
                                         src_data_rank=None)
                self.scale.to_local().copy_(mine.to_local())
        elif tuple(self.scale.shape) != shape:  # a buffer, or a Parameter of a shape known now
            fresh = s.detach().to(torch.float32, copy=True).reshape(shape)
            if self.policy.learned:
                if (self._own_scale is None and torch.distributed.is_initialized()
                        and torch.distributed.get_world_size() > 1):
                    raise ValueError(
                        f"{self.name}: a learned scale whose shape is known only at the first "
                        "forward would be a Parameter that DDP / FSDP2 (wrapped before) do not "
                        "synchronize; give its scale_shape so that it exists before wrapping")
                self.keep_parameter(nn.Parameter(fresh))
            else:
                self.scale = fresh
        elif self.policy.learned:
            with torch.no_grad():
                self.scale.copy_(s.reshape(shape))
        else:  # a buffer: no autograd to stop (the per-step path)
            self.scale.copy_(s.detach())
        if self.policy.learned:
            self.scale_set.fill_(True)
            self._learned_set = True

    def keep_parameter(self, scale: nn.Parameter) -> None:
        """Make ``scale`` the learned scale Parameter (remembered, so that ``set_scale`` knows
        a wrapper's swap, FSDP2's, from its own)."""
        self.scale = scale
        self.__dict__["_own_scale"] = scale  # (not registered a second time)

    def export(self, x: torch.Tensor | None = None) -> QuantizerExport:
        """The grid, scale and frozen levels for deployment (``octav_kernels.deploy``). A
        quantizer without a scale and with ``init_from_input`` computes it from ``x`` (its
        input, e.g. the weight) without keeping it, as its eval forward would."""
        if self.initialized:
            scale = self.kept_scale().detach()
        elif self.init_from_input and x is not None:
            scale = self.scale_of(x)
        else:
            raise ValueError(f"{self.name}: no scale yet; calibrate the model "
                             "(octav_kernels.calibrate_model) or train it before convert_model")
        if not bool(torch.isfinite(scale).all()):
            raise ValueError(f"{self.name}: its scale is not finite")
        grid = self.grid
        if self.tracking and self.osc_frozen.numel() > 0:
            return QuantizerExport(grid, scale, self._full_state("osc_frozen").clone(),
                                   self._full_state("osc_last_int").clone())
        return QuantizerExport(grid, scale)

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
        saved = state_dict.get(prefix + "scale")
        if isinstance(saved, torch.Tensor) and saved.numel() == 1 and saved.dim() <= 1 and (
                self.dim is None and self.group_size is None):  # a per-tensor scale: 0-dim,
            state_dict[prefix + "scale"] = saved.reshape(self._stored_shape(()))  # or [1]
        for name in ("scale", *(OSC_BUFFERS if self.tracking else ())):
            saved, mine = state_dict.get(prefix + name), getattr(self, name)
            if name != "scale" and not saved_tracking:  # an untracked checkpoint: start over
                saved = torch.empty(0)
            if isinstance(saved, torch.Tensor) and saved.shape != mine.shape:
                fresh = torch.empty(saved.shape, dtype=mine.dtype, device=mine.device)
                if name == "scale" and (isinstance(mine, nn.Parameter) or self.policy.learned):
                    self.keep_parameter(nn.Parameter(fresh))
                else:
                    setattr(self, name, fresh)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        mine = self._parameters.get("scale")
        if mine is not None and not isinstance(mine, DTensor):  # (assign=True: a new one)
            self.keep_parameter(mine)
        if self.policy.learned and prefix + "scale_set" in state_dict:
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
        signed = "auto" if self.signed is None else self.signed
        return (f"bits={self.bits}, signed={signed}, {granularity(self.dim, self.group_size)}, "
                f"grad={self.grad}, {self.policy.describe()}"
                + (", narrow=True" if self.narrow else "")
                + ("" if self.grad_scale else ", grad_scale=False")
                + (f", oscillations tracked (momentum={self.momentum})" if self.tracking else ""))

    # -- forward ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` fake-quantized. ``importance`` (SPEC §2.1, broadcastable to ``x``; a layer
        passes its inputs' ``E[inp**2]`` to its weight quantizer) weights the squared error of
        the scales computed from ``x`` here (rules with ``Calibrator.uses_importance``)."""
        if self.calibrating:
            self.observe(x, importance)
            return x
        if self.training:
            return self.policy.training_forward(self, x, importance)
        return self.eval_forward(x, importance)

    def eval_forward(self, x: torch.Tensor, importance: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """The forward with the kept scale (computed from ``x`` first if there is none and
        ``init_from_input``)."""
        if self._unchecked or self._uncounted:
            self.check_nonfinite()
        if not self.initialized:
            if not self.init_from_input:
                raise RuntimeError(
                    f"{self.name}: no scale yet; train it (mode='dynamic') or calibrate it "
                    "(octav_kernels.calibrate_model) before using it in eval / static mode")
            self.set_scale(self.scale_of(x, importance=importance))
        return self.fake_quantize(x, self.kept_scale())

    def fake_quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``x`` fake-quantized with ``scale``: the tracked op when oscillations are tracked,
        the LSQ op for a learned scale in training, else ``fake_quantize``."""
        if (self.policy.learned and self.training and self.policy.grad_scale
                and self.policy.process_group is not None):
            world = distributed.world_size(self.policy.group)
            scale = _GlobalGradScale.apply(scale, float(world) ** -0.5)
        if self.tracking:
            return self._fake_quantize_tracked(x, scale)
        if self.policy.learned and self.training:
            return fake_quantize_lsq(x, scale, self.bits, signed=self._signed_for(x),
                                     dim=self.dim, group_size=self.group_size, grad=self.grad,
                                     narrow=self.narrow, grad_scale=self.policy.grad_scale)
        return fake_quantize(x, scale, self.bits, signed=self._signed_for(x), dim=self.dim,
                             group_size=self.group_size, grad=self.grad, narrow=self.narrow)

    def quantize_with_rule(self, x: torch.Tensor, init: torch.Tensor | None = None,
                           importance: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fake-quantized x, its scale)``: the scale rule applied to ``x`` (warm-started from
        ``init``, weighted by ``importance``) in one call where the rule has a fused op
        (``Calibrator.quantize``)."""
        if self.tracking:  # the tracked op quantizes with the scale it is given
            s = self.scale_of(x, init, importance)
            return self.fake_quantize(x, s), s
        signed = self._signed_for(x)
        y, s = self.policy.rule.quantize(x, self.bits, signed=signed, dim=self.dim,
                                         group_size=self.group_size, narrow=self.narrow,
                                         grad=self.grad, init=init,
                                         **self._weighted(importance))
        self._check(s, x)
        return y, s

    def scale_of(self, x: torch.Tensor, init: torch.Tensor | None = None,
                 importance: torch.Tensor | None = None) -> torch.Tensor:
        """The scale rule's scale of ``x`` (weighted by ``importance``; checked for NaN/inf),
        not kept."""
        x = x.detach()
        s = self.policy.rule(x, self.bits, signed=self._signed_for(x), dim=self.dim,
                             group_size=self.group_size, narrow=self.narrow, init=init,
                             **self._weighted(importance))
        self._check(s, x)
        return s

    def _weighted(self, importance: torch.Tensor | None) -> dict:
        """The rule's ``importance`` keyword: given only to rules that use it."""
        if importance is None or not self.policy.rule.uses_importance:
            return {}
        return {"importance": importance}

    def scale_fits(self, x: torch.Tensor) -> bool:
        """Whether the kept scale has the shape this input's granularity needs."""
        shape = self._scale_shapes.get(x.shape)
        if shape is None:  # (the layout of each input shape is worked out once)
            shape = _args.groups(x, self.dim, self.group_size).scale_shape
            self._scale_shapes[x.shape] = shape
        return self.initialized and tuple(self.scale.shape) == self._stored_shape(shape)

    def _signed_for(self, x) -> bool:
        if self.signed is None:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    f"{self.name}: signed=None is decided from the first input, which needs one "
                    "eager forward before torch.compile (or pass signed / act_signed)")
            negative = x.numel() == 0 or bool(x.detach().min() < 0)
            if self.policy.process_group is not None:  # the same grid on every rank
                local = torch.tensor(float(x.numel() > 0 and negative))  # (empty: no say)
                negative = bool(distributed.all_reduce_max(local, self.policy.group))
            self.signed = negative
            _args.check_narrow(self.narrow, self.signed)
        return self.signed

    # -- NaN / inf ----------------------------------------------------------------------------

    def _nonfinite_error(self, when: str) -> ValueError:
        return ValueError(f"{self.name}: the input {when}contains NaN or inf, so its clipping "
                          "scale is not finite")

    def _check(self, s, x) -> None:
        seen = s if self.policy.rule.propagates_nonfinite else x
        if self.check_finite and not self._all_finite(seen):
            raise self._nonfinite_error("")

    def check_learned(self) -> None:
        """A learned scale the optimizer drove to <= 0, NaN or inf is an error (lower the
        scales' learning rate)."""
        if self.check_finite and not self._all_finite(self.scale.detach(), positive=True):
            raise ValueError(f"{self.name}: the learned scale is not positive and finite (NaN "
                             "or inf in the input, or the optimizer drove it there)")

    def _all_finite(self, t: torch.Tensor, positive: bool = False) -> bool:
        """Whether every element of ``t`` is finite (and > 0 if ``positive``): at once on the
        CPU, from its min and max (NaN propagates into both; one reduction, cheaper than
        ``isfinite(t).all()``); on a GPU (no host sync per step) it is recorded on the device,
        read at a check point, and this returns True. The record is two kernels: the largest
        ``|t|`` (``|log t|`` when ``positive``: NaN or -inf for ``t <= 0``), NaN or inf exactly
        where ``t`` holds a bad value (torch's max reductions propagate NaN), and its running
        maximum (``torch.maximum`` propagates NaN too)."""
        if t.numel() == 0:
            return True
        if t.device.type not in self.deferred_check:
            lo, hi = torch.aminmax(t)
            lo, hi = float(lo), float(hi)
            return (lo > 0 if positive else lo > -math.inf) and hi < math.inf
        worst = torch.linalg.vector_norm(t.log() if positive else t, math.inf)
        if self._nonfinite.device != worst.device:
            self._nonfinite = torch.zeros((), device=worst.device)
        torch.maximum(self._nonfinite, worst, out=self._nonfinite)
        if torch.compiler.is_compiling():  # a Python counter would recompile at every step
            self._uncounted = True
        else:
            self._unchecked += 1
            if self._unchecked >= self.check_every:
                self.check_nonfinite()
        return True

    def check_nonfinite(self) -> None:
        """Raise the ``ValueError`` of ``check_finite`` now if a scale this quantizer computed
        on a GPU since the last check was NaN/inf (one host sync; nothing to do on CPU, where
        every scale is checked at once)."""
        unchecked, self._unchecked = self._unchecked, 0
        counted, self._uncounted = not self._uncounted, False
        if (unchecked or not counted) and not bool(torch.isfinite(self._nonfinite)):
            self._nonfinite.zero_()
            when = f"one of the last {unchecked}" if counted else "a recent"
            steps = "steps" if counted else "step"
            if self.policy.learned:
                raise ValueError(f"{self.name}: the learned scale was not positive and finite "
                                 f"at {when} training {steps}")
            updates = "updates" if counted else "update"
            raise self._nonfinite_error(f"of {when} scale {updates} ")

    def to_float(self) -> nn.Module:
        """What ``dequantize_model`` puts in this quantizer's place: ``nn.Identity``."""
        return nn.Identity()

    # -- static calibration -----------------------------------------------------------------

    def start_calibration(self) -> None:
        """Enter calibration mode (``octav_kernels.calibration``): each forward observes its
        input and passes it through; forgets batches observed before."""
        self.calibrating, self._calibration = True, None

    def stop_calibration(self) -> None:
        """Leave calibration mode without setting the scale (the observed batches dropped)."""
        self.calibrating, self._calibration = False, None

    def observe(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> None:
        """Calibration step: compute this batch's scale and fold it into the running result
        (mean or max over batches, the policy's ``reduce``). Always checks x for NaN/inf.

        With ``importance`` (a weight observed with its layer's running mean of
        ``E[inp**2]``): the scale of the last batch, whose importance is the mean over all
        batches, replaces the earlier ones."""
        x = x.detach()
        self._signed_for(x)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{self.name}: a calibration batch contains NaN or inf")
        s = self.scale_of(x, importance=importance).double()
        if self._calibration is None or importance is not None:
            self._calibration = (s, 1)
            return
        acc, count = self._calibration
        if acc.shape != s.shape:
            raise ValueError(f"{self.name}: calibration batches give scales of shapes "
                             f"{list(acc.shape)} and {list(s.shape)}")
        self._calibration = (self.policy.combine(acc, s), count + 1)

    def finish_calibration(self) -> bool:
        """Leave calibration mode and set the scale from the observed batches. Returns False
        (scale unchanged) if no batch was observed."""
        self.calibrating = False
        if self._calibration is None:
            return False
        acc, count = self._calibration
        self._calibration = None
        self.set_scale(self.policy.calibrated(acc, count))
        return True


class QuantAct(Quantizer):
    """An activation quantizer to insert anywhere (e.g. after a non-linearity): a
    ``Quantizer`` with activation defaults, ``signed`` from the data and PWL gradients."""

    def __init__(self, bits: int = 4, *, signed: bool | None = None, grad: str = "pwl",
                 **kwargs):
        super().__init__(bits, signed=signed, grad=grad, **kwargs)
