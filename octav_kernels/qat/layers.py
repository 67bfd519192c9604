"""Drop-in quantized ``Linear`` / ``Conv1d`` / ``Conv2d``: the float layer applied to the
fake-quantized input and weight, with the quantizers a ``QuantConfig`` builds."""

from __future__ import annotations

import torch
from torch import nn

from .. import distributed
from .config import QuantConfig


class QuantLayer:
    """The base of the quantized layers: a ``weight_quantizer`` and an ``input_quantizer``
    (None: input in float) built by a ``QuantConfig``, and the conversion from / back to the
    float layer (sharing its Parameters, so optimizers keep working).

    With ``weight_importance="input"`` the layer also keeps ``input_importance``, the mean
    square of each input feature (``E[inp_j**2]``, float32 ``[in_features]`` /
    ``[in_channels]``, a buffer) and ``importance_batches`` (the batches it has seen): an EMA
    (``importance_momentum``) over training forwards, the mean over the batches of
    calibration; one reduction of the (quantized) input per such forward (with the config's
    ``process_group``, also one all-reduce of ``8 * (in + 1)`` bytes: the mean over every
    rank's input, so that the weight's scales stay identical on all ranks). Its weight quantizer
    then weights the weight's squared error by it (SPEC §2.1): ``sum_j E[x_j**2] (q_j - w_j)**2``
    is the expected squared error of the layer's output under independent rounding errors."""

    float_type: type[nn.Module]
    weight: nn.Parameter
    feature_dim: int  # the input's feature dimension (Linear: -1, convolutions: 1)

    def _init_quantizers(self, config: QuantConfig | None, fields: dict) -> None:
        config = QuantConfig.of(config, **fields)
        self.weight_quantizer = config.weight_quantizer(self.weight.shape)
        self.input_quantizer = config.input_quantizer()
        for q in (self.weight_quantizer, self.input_quantizer):
            if q is not None:
                q.to(self.weight.device)
        self.importance_momentum = config.importance_momentum
        self.importance_group = config.process_group  # whose ranks' inputs it averages
        self.collects_importance = config.weight_importance == "input"
        self._importance_seen = False
        self._importance_calibrating = False
        if self.collects_importance:
            features = self.weight.shape[1] * getattr(self, "groups", 1)
            self.register_buffer("input_importance",
                                 torch.zeros(features, device=self.weight.device))
            self.register_buffer("importance_batches",
                                 torch.zeros((), dtype=torch.int64, device=self.weight.device))

    @torch.no_grad()
    def observe_importance(self, x: torch.Tensor) -> None:
        """Fold the mean square per input feature of ``x`` (the layer's input) into
        ``input_importance``: the running mean in calibration, the EMA in training, nothing in
        eval or without ``weight_importance``."""
        calibrating = self.weight_quantizer.calibrating
        if not self.collects_importance:
            return
        if calibrating and not self._importance_calibrating:  # a calibration's first batch:
            self.importance_batches.zero_()  # its mean replaces what training had kept
        self._importance_calibrating = calibrating
        if not (calibrating or self.training):
            return
        x = x.detach()
        dim = self.feature_dim % x.dim()
        if x.shape[dim] != self.input_importance.numel():
            raise ValueError(f"{type(self).__name__}: input of shape {list(x.shape)} has "
                             f"{x.shape[dim]} features, expected {self.input_importance.numel()}")
        others = [d for d in range(x.dim()) if d != dim]
        count = x.numel() // max(1, x.shape[dim])
        batch = torch.linalg.vector_norm(x, 2, dim=others, dtype=torch.float32).square_()
        if self.importance_group is not None:  # over the data-parallel ranks' inputs
            group = None if self.importance_group == "world" else self.importance_group
            totals = distributed.all_reduce_sum(
                torch.cat([batch.double(), torch.tensor([float(count)], device=batch.device,
                                                        dtype=torch.float64)]), group)
            batch, count = totals[:-1].float(), float(totals[-1])
        batch = batch.div_(max(1, count)).to(self.input_importance.device)
        seen = self.importance_batches
        first = seen == 0
        if calibrating:  # the running mean over the batches
            weight = 1.0 / (seen.double() + 1.0)
        else:
            weight = torch.where(first, 1.0, torch.full((), float(self.importance_momentum),
                                                        dtype=torch.float64,
                                                        device=seen.device))
        self.input_importance.add_((batch - self.input_importance) * weight.float())
        seen.add_(1)
        self._importance_seen = True

    def weight_importance(self) -> torch.Tensor | None:
        """``input_importance`` broadcastable to the weight as its quantizer sees it
        (``weight_as_quantized``), or None (no importance kept, or none observed yet)."""
        if not self.collects_importance:
            return None
        if not self._importance_seen:  # (a host read only until the first batch)
            self._importance_seen = bool(self.importance_batches > 0)
            if not self._importance_seen:
                return None
        h, w = self.input_importance, self.weight
        if w.dim() == 2:  # Linear: [out, in] (and its blocks along in)
            return h
        groups, out, per_group = self.groups, w.shape[0], w.shape[1]  # [out, in/groups, *k]
        kernel = [1] * (w.dim() - 2)
        if groups == 1:
            h = h.view(per_group, *kernel)
        else:  # output channel o sees the inputs of its group
            h = h.view(groups, 1, per_group).expand(groups, out // groups, per_group)
            h = h.reshape(out, per_group, *kernel)
        if self.weight_quantizer.group_size is not None:  # blocks over [out, in * kernel]
            rows = 1 if groups == 1 else out
            h = h.expand(rows, *w.shape[1:]).reshape(rows, -1)
        return h

    def weight_as_quantized(self) -> torch.Tensor:
        """The weight in the shape its quantizer sees (blocks of ``group_size`` run over the
        flattened ``in x kernel`` elements of each output channel)."""
        w = self.weight
        return w if self.weight_quantizer.group_size is None else w.reshape(w.shape[0], -1)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight (its scales weighted by ``weight_importance()``)."""
        return self.weight_quantizer(self.weight_as_quantized(),
                                     self.weight_importance()).reshape(self.weight.shape)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The fake-quantized input, observed for ``input_importance`` where it is kept."""
        x = x if self.input_quantizer is None else self.input_quantizer(x)
        self.observe_importance(x)
        return x

    @classmethod
    def from_float(cls, module: nn.Module, config: QuantConfig | None = None, **fields):
        """The quantized version of ``module`` (same Parameters, device, dtype, mode), with
        ``config`` (a ``QuantConfig``) and/or its fields as keywords."""
        if type(module) is not cls.float_type:
            raise TypeError(f"{cls.__name__}.from_float needs an {cls.float_type.__name__}, "
                            f"got {type(module).__name__}")
        new = cls(**float_layer_args(module), device=module.weight.device,
                  dtype=module.weight.dtype, config=config, **fields)
        new.weight = module.weight
        new.bias = module.bias
        new.train(module.training)
        return new

    def to_float(self) -> nn.Module:
        """The plain float layer with the same Parameters (quantizers dropped)."""
        module = self.float_type(**float_layer_args(self), device=self.weight.device,
                                 dtype=self.weight.dtype)
        module.weight = self.weight
        module.bias = self.bias
        module.train(self.training)
        return module


def float_layer_args(m: nn.Module) -> dict:
    """The constructor arguments of a Linear or ConvNd (float or quantized) ``m``."""
    if isinstance(m, nn.Linear):
        return dict(in_features=m.in_features, out_features=m.out_features,
                    bias=m.bias is not None)
    return dict(in_channels=m.in_channels, out_channels=m.out_channels,
                kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                padding_mode=m.padding_mode)


_QUANT_DOC = """Quantized ``{base}``: ``{base}`` applied to the fake-quantized input and weight.

    Extra keyword arguments (``quantize_model`` passes them through): ``config``, a
    ``QuantConfig``, and/or any of its fields (``bits``, ``act_bits``, ``grad``,
    ``weight_granularity``, ``act_signed``, ``mode``, ``weight_mode``, ``calibrator``,
    ``weight_calibrator``, ``act_calibrator``, ``every``, ``narrow``, ``quantize_input``,
    ``process_group``, ``grad_scale``, ``weight_importance``, ``importance_momentum``), which
    replace the config's.
    """


class QuantLinear(QuantLayer, nn.Linear):
    __doc__ = _QUANT_DOC.format(base="nn.Linear")
    float_type = nn.Linear
    feature_dim = -1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, *, config: QuantConfig | None = None, **fields):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_quantizers(config, fields)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


class _QuantConv(QuantLayer):
    """Shared by the quantized convolutions (the next base in the MRO is ``nn.ConvNd``)."""

    feature_dim = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, *, config: QuantConfig | None = None, **fields):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        self._init_quantizers(config, fields)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantConv1d(_QuantConv, nn.Conv1d):
    __doc__ = _QUANT_DOC.format(base="nn.Conv1d")
    float_type = nn.Conv1d


class QuantConv2d(_QuantConv, nn.Conv2d):
    __doc__ = _QUANT_DOC.format(base="nn.Conv2d")
    float_type = nn.Conv2d


QUANTIZED = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d}
