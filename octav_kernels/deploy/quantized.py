"""The convert step after QAT or calibration: deployable layers that hold their weight as
integer levels, and ``convert_model``.

A converted layer (``QuantizedLinear``, ``QuantizedConv1d``, ``QuantizedConv2d``) keeps

- the weight's integer levels on its quantizer's grid (SPEC §1: signed, unsigned or narrow; per
  tensor, per channel or per block), packed: two levels per byte for 2-4 bits, int8 (uint8
  unsigned) for 5-8 bits, int16 / int32 above;
- the float32 step ``s / L`` of each group;
- its input quantizer as a ``QuantizedAct``: the frozen scale and grid.

Its eval forward is the QAT layer's: the input fake-quantized by the same op with the same
scale, the weight ``level * step`` in float32 (what the fake-quant kernels compute) cast to the
layer's dtype, then the same ``F.linear`` / ``F.convNd`` call: bit for bit the same output.
Weights frozen by oscillation tracking keep their frozen levels, as the QAT eval forward does.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict

import torch
from torch import nn
from torch.nn import functional as F

from .. import _args
from ..ops import fake_quantize
from ..qat.grid import Grid
from ..qat.layers import QuantConv1d, QuantConv2d, QuantLayer, QuantLinear, float_layer_args
from ..qat.model import replace_modules
from ..qat.quantizer import Quantizer


def storage(grid: Grid) -> torch.dtype | None:
    """The dtype a grid's levels are stored in; None: two per byte (2-4 bits)."""
    if grid.bits <= 4:
        return None
    if grid.bits <= 8:
        return torch.int8 if grid.signed else torch.uint8
    return torch.int16 if grid.levels[2] < 2**15 else torch.int32


def pack_levels(levels: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Integer levels (any integer or float dtype holding integers in ``lo..hi``) stored as
    ``storage(grid)``, flattened; 2-4 bits: ``level - lo`` in nibbles, element 2k in the low
    half of byte k."""
    flat = levels.reshape(-1).to(torch.int32)
    if storage(grid) is not None:
        return flat.to(storage(grid))
    nibbles = (flat - grid.levels[1]).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_levels(packed: torch.Tensor, grid: Grid, numel: int) -> torch.Tensor:
    """The int32 levels of ``pack_levels`` (flat, ``numel`` of them)."""
    if storage(grid) is not None:
        return packed.to(torch.int32)
    pairs = torch.stack([packed & 0xF, packed >> 4], 1).reshape(-1)[:numel]
    return pairs.to(torch.int32) + grid.levels[1]


class QuantizedAct(nn.Module):
    """Fake-quantizes its input with a frozen scale: a converted ``Quantizer`` / ``QuantAct``
    (the same op, so the same output as the quantizer's eval forward)."""

    def __init__(self, grid: Grid, scale_shape=(), device=None):
        super().__init__()
        self.grid = grid
        self.register_buffer("scale", torch.zeros(scale_shape, dtype=torch.float32,
                                                  device=device))

    @classmethod
    def from_quantizer(cls, q: Quantizer) -> QuantizedAct:
        export = q.export()
        new = cls(export.grid, tuple(export.scale.shape), device=export.scale.device)
        new.scale.copy_(export.scale)
        return new

    @property
    def step(self) -> torch.Tensor:
        """``s / L`` (float32)."""
        return self.grid.step(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.grid
        return fake_quantize(x, self.scale, g.bits, signed=g.signed, dim=g.dim,
                             group_size=g.group_size, grad="ste", narrow=g.narrow)

    def get_extra_state(self) -> dict:
        return asdict(self.grid)

    def set_extra_state(self, state: dict) -> None:
        _check_same_grid("QuantizedAct", self.grid, Grid(**state))

    def to_float(self) -> nn.Module:
        return nn.Identity()

    def extra_repr(self) -> str:
        return self.grid.describe()


def _check_same_grid(what: str, mine: Grid, saved: Grid) -> None:
    if mine != saved:
        raise ValueError(f"{what}: the state_dict was saved with {saved}, this module has "
                         f"{mine}")


class _QuantizedLayer(nn.Module):
    """Shared by the converted layers: the packed weight levels (``weight_packed``), the
    float32 steps (``weight_step``), the bias and the input quantizer."""

    float_type: type[nn.Module]
    qat_type: type[nn.Module]

    def __init__(self, layer_args: dict, weight_shape, weight_grid: Grid,
                 input_grid: Grid | None = None, input_scale_shape=(), device=None,
                 dtype=torch.float32):
        super().__init__()
        self.layer_args = dict(layer_args)
        self.weight_shape = tuple(weight_shape)
        self.weight_dtype = dtype
        self.weight_grid = weight_grid
        numel = math.prod(self.weight_shape)
        groups = _args.groups(torch.empty(self.view_shape, device="meta"), weight_grid.dim,
                              weight_grid.group_size)
        packed = (torch.empty(numel, dtype=storage(weight_grid), device=device)
                  if storage(weight_grid) is not None
                  else torch.empty((numel + 1) // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_step", torch.zeros(groups.scale_shape, dtype=torch.float32,
                                                        device=device))
        bias = layer_args.get("bias", False)
        self.bias = (nn.Parameter(torch.zeros(self.weight_shape[0], device=device, dtype=dtype))
                     if bias else None)
        self.input_quantizer = (QuantizedAct(input_grid, input_scale_shape, device)
                                if input_grid is not None else None)

    @property
    def view_shape(self) -> tuple[int, ...]:
        """The weight as its quantizer saw it: blocks run over each output channel's flattened
        ``in x kernel`` elements."""
        if self.weight_grid.group_size is None:
            return self.weight_shape
        return (self.weight_shape[0], math.prod(self.weight_shape[1:]))

    @classmethod
    def from_qat(cls, layer: QuantLayer) -> _QuantizedLayer:
        """The converted version of a QAT layer (in eval, its outputs are the same)."""
        q = layer.weight_quantizer
        w = layer.weight_as_quantized().detach()
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{q.name}: the weight contains NaN or inf")
        # A weight quantizer without a scale computes it from the weight, as in eval (QAT
        # layers set init_from_input); frozen weights keep their level.
        export = q.export(w)
        grid, step, levels = export.grid, export.grid.step(export.scale), export.levels(w)
        iq = layer.input_quantizer
        act = QuantizedAct.from_quantizer(iq) if iq is not None else None
        new = cls(float_layer_args(layer), layer.weight.shape, grid,
                  act.grid if act is not None else None,
                  tuple(act.scale.shape) if act is not None else (), device=w.device,
                  dtype=layer.weight.dtype)
        with torch.no_grad():
            new.weight_packed.copy_(pack_levels(levels, grid))
            new.weight_step.copy_(step)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
            if act is not None:
                new.input_quantizer.scale.copy_(act.scale)
        new.train(False)
        return new

    def weight_levels(self) -> torch.Tensor:
        """The integer levels (int32) in the quantizer's view of the weight."""
        return unpack_levels(self.weight_packed, self.weight_grid,
                             math.prod(self.weight_shape)).reshape(self.view_shape)

    def dequantized_weight(self) -> torch.Tensor:
        """``level * step`` in float32 (as the fake-quant kernels form it), in the weight's
        dtype and shape."""
        w = self.weight_grid.dequantize(self.weight_levels(), self.weight_step)
        return w.to(self.weight_dtype).reshape(self.weight_shape)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._layer(self.quantized_input(x), self.dequantized_weight(), self.bias)

    def to_float(self) -> nn.Module:
        """The float layer with the dequantized weight (input quantization dropped)."""
        module = self.float_type(**self.layer_args, device=self.weight_step.device,
                                 dtype=self.weight_dtype)
        with torch.no_grad():
            module.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                module.bias.copy_(self.bias)
        return module.train(self.training)

    def get_extra_state(self) -> dict:
        return {"weight_grid": asdict(self.weight_grid), "weight_shape": self.weight_shape}

    def set_extra_state(self, state: dict) -> None:
        _check_same_grid(type(self).__name__, self.weight_grid, Grid(**state["weight_grid"]))
        if tuple(state["weight_shape"]) != self.weight_shape:
            raise ValueError(f"{type(self).__name__}: the state_dict holds a weight of shape "
                             f"{list(state['weight_shape'])}, this module "
                             f"{list(self.weight_shape)}")

    def extra_repr(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.layer_args.items())
        return f"{args}, weight: {self.weight_grid.describe()}"


class QuantizedLinear(_QuantizedLayer):
    """A converted ``QuantLinear``: ``F.linear(quantized input, level * step, bias)``."""

    float_type = nn.Linear
    qat_type = QuantLinear

    def _layer(self, x, weight, bias):
        return F.linear(x, weight, bias)


class _QuantizedConv(_QuantizedLayer):
    """A converted convolution: the float convolution's forward (``_conv_forward``, padding
    modes included) on the quantized input and the dequantized weight."""

    _conv = None  # F.conv1d / F.conv2d

    def __init__(self, layer_args: dict, *args, **kwargs):
        super().__init__(layer_args, *args, **kwargs)
        shell = self.float_type(**layer_args, device="meta")  # its padding bookkeeping
        self.stride, self.padding, self.dilation = shell.stride, shell.padding, shell.dilation
        self.groups, self.padding_mode = shell.groups, shell.padding_mode
        self._reversed_padding_repeated_twice = shell._reversed_padding_repeated_twice

    def _layer(self, x, weight, bias):
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return type(self)._conv(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return type(self)._conv(x, weight, bias, self.stride, self.padding, self.dilation,
                                self.groups)


class QuantizedConv1d(_QuantizedConv):
    """A converted ``QuantConv1d``."""

    float_type = nn.Conv1d
    qat_type = QuantConv1d
    _conv = F.conv1d


class QuantizedConv2d(_QuantizedConv):
    """A converted ``QuantConv2d``."""

    float_type = nn.Conv2d
    qat_type = QuantConv2d
    _conv = F.conv2d


CONVERTED = {QuantLinear: QuantizedLinear, QuantConv1d: QuantizedConv1d,
             QuantConv2d: QuantizedConv2d}


def convert_model(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The deployable model of a QAT (or calibrated) model: every ``QuantLinear`` /
    ``QuantConv1d`` / ``QuantConv2d`` becomes a ``QuantizedLinear`` / ``QuantizedConv1d`` /
    ``QuantizedConv2d`` with integer weights, every standalone ``Quantizer`` a ``QuantizedAct``
    with its frozen scale. Its eval outputs equal the QAT model's eval outputs.

    Raises ``ValueError`` naming each module that cannot be converted: an input quantizer
    without a scale (calibrate or train first), a NaN/inf weight or scale, a quantized layer of
    a type without a converted version. ``inplace=False`` converts a deep copy. The result is in
    eval mode (its layers have no training behaviour).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, (QuantLayer, Quantizer)):
        return _convert_one("model", model)
    return replace_modules(model, lambda name, module: _convert_one(name, module) if isinstance(
        module, (QuantLayer, Quantizer)) else None, "convert_model").eval()


def _convert_one(name: str, module: nn.Module) -> nn.Module:
    if isinstance(module, Quantizer):
        return QuantizedAct.from_quantizer(module)
    if type(module) not in CONVERTED:
        raise ValueError(f"{name} ({type(module).__name__}): no converted version")
    return CONVERTED[type(module)].from_qat(module)
