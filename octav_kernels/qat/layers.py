"""Drop-in quantized ``Linear`` / ``Conv1d`` / ``Conv2d``: the float layer applied to the
fake-quantized input and weight, with the quantizers a ``QuantConfig`` builds."""

from __future__ import annotations

import torch
from torch import nn

from .config import QuantConfig


class QuantLayer:
    """The base of the quantized layers: a ``weight_quantizer`` and an ``input_quantizer``
    (None: input in float) built by a ``QuantConfig``, and the conversion from / back to the
    float layer (sharing its Parameters, so optimizers keep working)."""

    float_type: type[nn.Module]
    weight: nn.Parameter

    def _init_quantizers(self, config: QuantConfig | None, fields: dict) -> None:
        config = QuantConfig.of(config, **fields)
        self.weight_quantizer = config.weight_quantizer(self.weight.shape)
        self.input_quantizer = config.input_quantizer()
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
    ``process_group``, ``grad_scale``), which replace the config's.
    """


class QuantLinear(QuantLayer, nn.Linear):
    __doc__ = _QUANT_DOC.format(base="nn.Linear")
    float_type = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, *, config: QuantConfig | None = None, **fields):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_quantizers(config, fields)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


class _QuantConv(QuantLayer):
    """Shared by the quantized convolutions (the next base in the MRO is ``nn.ConvNd``)."""

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
