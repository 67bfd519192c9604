"""Converted layers as torchao tensors: ``to_torchao`` puts each converted Linear / Conv2d
weight into torchao's ``IntxUnpackedToInt8Tensor`` (int8 ``qdata``, ``scale``, ``zero_point``,
``block_size``, ``target_dtype``) with our levels and steps, not recomputed, so torchao's
``torch.export`` flows (and from there ExecuTorch's lowering) take the model.

``IntxUnpackedToInt8Tensor`` dequantizes ``(qdata - zero_point) * scale`` in the weight's dtype
(float32: ``level * step`` in float32, the converted weight bit for bit) and runs
``F.linear`` / ``F.conv2d`` on it, so the model's outputs are the converted model's. Levels
that do not fit ``target_dtype``'s signed range (unsigned grids) are stored shifted, with
``zero_point = -2**(bits-1)``. Input quantizers stay ``QuantizedAct`` modules in front of the
layer (torchao's activation quantization is dynamic, per token: not our frozen grid).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
from torch import nn

from ..qat.model import replace_modules
from .quantized import QuantizedConv2d, QuantizedLinear, _QuantizedLayer

MAX_BITS = 8  # target dtypes torch.int1 .. torch.int8


def _torchao():
    try:
        from torchao.quantization import IntxUnpackedToInt8Tensor
    except ImportError as err:
        raise ImportError("to_torchao needs torchao (pip install torchao)") from err
    return IntxUnpackedToInt8Tensor


def block_size(layer: _QuantizedLayer) -> tuple[int, ...]:
    """torchao's ``block_size`` (the elements one scale covers, per dimension) of a converted
    layer's weight; blocks of G over the flattened ``in x kernel`` elements become the
    innermost dimensions they span. ``ValueError`` if they do not tile them."""
    shape, grid = layer.weight_shape, layer.weight_grid
    if grid.group_size is None:
        return tuple(1 if d == (grid.dim % len(shape) if grid.dim is not None else None) else n
                     for d, n in enumerate(shape))
    block, left = [1] * len(shape), grid.group_size
    for d in range(len(shape) - 1, 0, -1):
        if left >= shape[d]:
            if left % shape[d]:
                break
            block[d], left = shape[d], left // shape[d]
        else:
            if shape[d] % left:
                break
            block[d], left = left, 1
    if left != 1 or math.prod(block) != grid.group_size:
        raise ValueError(f"blocks of {grid.group_size} over the weight's flattened elements "
                         f"do not tile its shape {list(shape)}")
    return tuple(block)


def torchao_weight(layer: _QuantizedLayer):
    """The layer's weight as an ``IntxUnpackedToInt8Tensor`` of its levels and steps."""
    tensor_type = _torchao()
    grid = layer.weight_grid
    if grid.bits > MAX_BITS:
        raise ValueError(f"torchao's IntxUnpackedToInt8Tensor holds at most {MAX_BITS} bits; "
                         f"the weight has {grid.bits}")
    _, lo, hi = grid.levels
    shift = 0 if lo >= -(2 ** (grid.bits - 1)) and hi < 2 ** (grid.bits - 1) else lo + 2 ** (
        grid.bits - 1)
    blocks = block_size(layer)
    counts = tuple(n // b for n, b in zip(layer.weight_shape, blocks))
    qdata = (layer.weight_levels().reshape(layer.weight_shape) - shift).to(torch.int8)
    scale = layer.weight_step.detach().float().reshape(counts).clone()
    zero_point = torch.full(counts, -shift, dtype=torch.int8, device=scale.device)
    return tensor_type(qdata, scale, zero_point, getattr(torch, f"int{grid.bits}"), blocks,
                       layer.weight_dtype, None)


def to_torchao(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """``model`` (a converted model) with every ``QuantizedLinear`` / ``QuantizedConv2d``
    replaced by the float layer holding an ``IntxUnpackedToInt8Tensor`` weight (torchao), after
    its ``QuantizedAct`` when the input is quantized (``nn.Sequential`` with children
    ``input_quantizer`` and ``layer``). The outputs are the converted model's, bit for bit.

    Raises ``ValueError`` naming each layer torchao cannot hold: more than 8 bits, blocks that
    do not tile the weight, a ``QuantizedConv1d`` (torchao's tensor implements linear and
    conv2d only). ``inplace=False`` converts a deep copy.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, _QuantizedLayer):
        raise ValueError("model is itself a single converted layer; wrap it in a container "
                         "(e.g. nn.Sequential) to convert it")
    if not inplace:
        model = copy.deepcopy(model)
    return replace_modules(model, _to_torchao_layer, "to_torchao").eval()


def _to_torchao_layer(name: str, layer: nn.Module) -> nn.Module | None:
    """The torchao form of a converted layer; None for any other module."""
    if not isinstance(layer, _QuantizedLayer):
        return None
    try:
        if not isinstance(layer, (QuantizedLinear, QuantizedConv2d)):
            raise ValueError("torchao's IntxUnpackedToInt8Tensor implements linear and conv2d "
                             "only")
        weight = torchao_weight(layer)
    except ValueError as err:
        raise ValueError(f"{name} ({type(layer).__name__}): {err}") from None
    float_layer = layer.float_type(**layer.layer_args, device="meta", dtype=layer.weight_dtype)
    float_layer.weight = nn.Parameter(weight, requires_grad=False)
    float_layer.bias = (None if layer.bias is None
                        else nn.Parameter(layer.bias.detach().clone(), requires_grad=False))
    if layer.input_quantizer is None:
        return float_layer.eval()
    return nn.Sequential(OrderedDict(input_quantizer=copy.deepcopy(layer.input_quantizer),
                                     layer=float_layer)).eval()
