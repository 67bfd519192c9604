"""The QAT knobs of a quantized layer, with their defaults, in one place: ``QuantConfig``.

``quantize_model``, the quantized layers (``QuantLinear``, ``QuantConv1d``, ``QuantConv2d``) and
their ``from_float`` take a ``QuantConfig`` or its fields as keywords; the config builds each
layer's weight and input quantizers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import _args
from ..calibrate import Calibrator, make_calibrator
from .quantizer import QuantAct, Quantizer
from .scale import MODES, ScalePolicy, check_owned_fields, choice, make_policy

ESTIMATORS = ("mph", "mad", "pwl", "ste")
IMPORTANCES = ("input",)  # what weight_importance can weight a weight's error by


def estimators(grad: str) -> tuple[str, str]:
    """``(weight estimator, activation estimator)`` of a layer-level ``grad`` setting:
    ``mph`` (the paper's recommendation) -> (mad, pwl); otherwise the same one for both."""
    grad = choice(grad, ESTIMATORS, "grad")
    return ("mad", "pwl") if grad == "mph" else (grad, grad)


@dataclass(frozen=True)
class QuantConfig:
    """How a layer is quantized (``quantize_model`` and the quantized layers).

    Attributes:
        bits: weight bits, and activation bits unless ``act_bits``.
        act_bits: input (activation) bits if different from ``bits``.
        grad: ``"mph"`` (MAD weights, PWL activations; default), ``"mad"``, ``"pwl"``, ``"ste"``.
        weight_granularity: ``"channel"`` (per output channel, default), ``"tensor"`` or a block
            size G (blocks of G over each output channel's flattened elements).
        act_signed: input grid; ``None`` decides from the data (unsigned after a ReLU).
        mode: ``"dynamic"``, ``"static"`` or ``"learned"`` scales (``Quantizer``; learned: LSQ,
            initialized by the calibrator); ``weight_mode`` overrides it for weights.
        calibrator: the scale rule (``Quantizer``): ``"octav"``, ``"octav:refine"``, ``"max"``,
            ``"percentile[:p]"``, ``"mse[:points]"`` or a ``Calibrator``, for weights and
            inputs; ``weight_calibrator`` / ``act_calibrator`` override it for one role.
        every: in dynamic training, recompute scales every ``every`` forwards.
        narrow: symmetric signed levels ``±(2**(B-1)-1)`` (weights, and signed inputs).
        quantize_input: set False to leave the input in float.
        process_group: data-parallel group (or ``"world"``) of the input quantizer
            (``Quantizer``); weights are replicated by DDP and need none.
        grad_scale: learned scales: multiply their gradient by LSQ's ``1 / sqrt(N hi)``.
        weight_importance: ``"input"``: the layer keeps the mean square of each input feature
            (``E[inp**2]``: an EMA with ``importance_momentum`` in training, the mean over
            batches in ``calibrate_model``; buffer ``input_importance``) and its weight scales
            minimize the importance-weighted squared error (SPEC §2.1: the layer's expected
            output error) instead of the weight's own. Used by the calibrators that minimize an
            error (``octav``, ``octav:refine``, ``mse``), for dynamic and static scales and the
            start of learned ones. ``None`` (default): unweighted.
        importance_momentum: the EMA factor of ``input_importance`` in training.
    """

    bits: int = 4
    act_bits: int | None = None
    grad: str = "mph"
    weight_granularity: str | int = "channel"
    act_signed: bool | None = None
    mode: str = "dynamic"
    weight_mode: str | None = None
    calibrator: str | Calibrator = "octav"
    weight_calibrator: str | Calibrator | None = None
    act_calibrator: str | Calibrator | None = None
    every: int = 1
    narrow: bool = False
    quantize_input: bool = True
    process_group: Any = None
    grad_scale: bool = True
    weight_importance: str | None = None
    importance_momentum: float = 0.1

    def __post_init__(self):
        _args.check_bits(self.bits)
        if self.act_bits is not None:
            _args.check_bits(self.act_bits)
        estimators(self.grad)
        choice(self.mode, MODES, "mode")
        if self.weight_mode is not None:
            choice(self.weight_mode, MODES, "weight_mode")
        if self.act_signed is not None and not isinstance(self.act_signed, bool):
            raise TypeError(f"act_signed must be a bool or None, got "
                            f"{type(self.act_signed).__name__}")
        make_calibrator(self.calibrator)
        for name in ("weight_calibrator", "act_calibrator"):
            if getattr(self, name) is not None:
                try:
                    make_calibrator(getattr(self, name))
                except (TypeError, ValueError) as err:
                    raise type(err)(f"{name}: {err}") from None
        if _args.check_int(self.every, "every") < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        for name in ("narrow", "quantize_input", "grad_scale"):
            _args.check_bool(getattr(self, name), name)
        check_owned_fields((self.mode, self.weight_mode or self.mode), self.every,
                           self.grad_scale)
        if self.weight_importance is not None:
            choice(self.weight_importance, IMPORTANCES, "weight_importance")
        m = self.importance_momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 < m <= 1.0:
            raise ValueError(f"importance_momentum must be a number in (0, 1], got {m!r}")

    @classmethod
    def of(cls, config: QuantConfig | None = None, **fields) -> QuantConfig:
        """``config`` (default: the defaults) with ``fields`` replaced; an unknown field is a
        ``TypeError`` naming it."""
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unexpected quantization arguments: {sorted(unknown)}")
        if config is not None and not isinstance(config, QuantConfig):
            raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
        if not fields:
            return config or cls()
        return dataclasses.replace(config or cls(), **fields)

    def policy(self, mode: str, scale_shape: tuple[int, ...] | None = None,
               process_group: Any = None, calibrator: str | Calibrator | None = None
               ) -> ScalePolicy:
        """The scale policy of ``mode`` with this config's fields (``every`` for dynamic
        scales, ``grad_scale`` and ``scale_shape`` for learned ones) and ``calibrator``
        (default: the config's ``calibrator``)."""
        learned = mode == "learned"
        return make_policy(mode, self.calibrator if calibrator is None else calibrator,
                           every=self.every if mode == "dynamic" else 1,
                           grad_scale=self.grad_scale if learned else True,
                           scale_shape=scale_shape if learned else None,
                           process_group=process_group)

    def weight_quantizer(self, weight_shape) -> Quantizer:
        """The quantizer of a weight of ``weight_shape`` (signed; computes its scale from the
        weight itself in eval if it has none)."""
        dim, group_size = weight_granularity(self.weight_granularity, weight_shape)
        view = (weight_shape if group_size is None
                else (weight_shape[0], math.prod(weight_shape[1:])))
        scale_shape = _args.groups(torch.empty(view, device="meta"), dim,
                                   group_size).scale_shape
        return Quantizer(self.bits, signed=True, dim=dim, group_size=group_size,
                         grad=estimators(self.grad)[0], narrow=self.narrow,
                         policy=self.policy(self.weight_mode or self.mode, scale_shape,
                                            calibrator=self.weight_calibrator),
                         init_from_input=True)

    def input_quantizer(self) -> QuantAct | None:
        """The quantizer of the layer's input, or None with ``quantize_input=False``."""
        if not self.quantize_input:
            return None
        return QuantAct(self.act_bits or self.bits, signed=self.act_signed,
                        grad=estimators(self.grad)[1],
                        narrow=self.narrow and self.act_signed is True,
                        policy=self.policy(self.mode, process_group=self.process_group,
                                           calibrator=self.act_calibrator))


def weight_granularity(spec, shape) -> tuple[int | None, int | None]:
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
