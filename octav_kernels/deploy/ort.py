"""ONNX Runtime's integer kernels for converted layers: the nodes ``export_onnx(target="ort")``
writes, and the rule that picks them (``plan``).

- ``"integer"``: an input quantized per tensor to at most 8 bits and a weight of at most 8 bits,
  per tensor or per output channel. The input becomes uint8 codes ``level - lo``
  (``QuantizeLinear`` with zero point ``-lo``, after a clip to the grid when it is narrower
  than 0..255), the weight int8 levels or uint8 codes ``level - lo``; then
  ``com.microsoft.MatMulIntegerToFloat`` (Linear: the int32 sum of products times
  ``s_x * s_w`` plus the bias) or ``ConvInteger`` + ``Cast`` + ``Mul`` + ``Add`` (Conv). The
  integer sums are exact, so the output differs from the converted model's only by float32
  roundings. int8 weights (MLAS's u8s8 kernel) only where no pair of products can saturate
  the int16 sums of x86's ``vpmaddubsw`` (CPUs without VNNI):
  ``2 * (hi_x - lo_x) * max|w| <= 32767``; else uint8 (u8u8, exact everywhere). Codes that fit
  4 bits are stored as INT4 / UINT4 with a ``Cast`` that ORT folds at load (``compact_codes``).
  Measured on x86 (ORT 1.32, ``bench/bench_deploy.py``): ``MatMulIntegerToFloat`` is several
  times faster than the float MatMul, ``ConvInteger`` slower than ORT's float ``Conv``.
- ``"nbits"``: any other Linear weight of at most 8 bits per tensor, per channel or in blocks
  of a power of two in 16..256 along the input: ``com.microsoft.MatMulNBits`` (2-, 4- or
  8-bit codes; 3 bits in the 4-bit container, 5-7 in the 8-bit one, exact), after the
  input's Q/DQ pair if it is quantized. Per tensor and per channel steps are repeated over
  blocks of ``NBITS_BLOCK``. ``accuracy_level=4`` (the default) quantizes the input to int8
  inside the kernel, per block of K, with scale ``max|x_block| / 127``: each element moves
  by at most half that scale. ``accuracy_level=0`` keeps it in float32.
- ``None``: the QDQ form (``DequantizeLinear`` + the float op), with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .quantized import QuantizedLinear, _QuantizedLayer

CONTRIB_DOMAIN = "com.microsoft"
NBITS_BLOCKS = (16, 32, 64, 128, 256)  # MatMulNBits' block sizes
NBITS_BLOCK = 128  # for per-tensor and per-channel weights (one scale per block of K)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
DEFAULT_ACCURACY_LEVEL = 4  # MatMulNBits': int8 inputs inside the kernel
INT16_MAX = 2**15 - 1


def nbits_container(bits: int) -> int:
    """The MatMulNBits code width that holds ``bits``-bit levels exactly: 2, 4 or 8."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def _per_tensor(grid) -> bool:
    return grid.dim is None and grid.group_size is None


def plan(layer: _QuantizedLayer) -> tuple[str | None, str]:
    """(``"integer"`` | ``"nbits"`` | None, what runs or why not) for a converted layer."""
    w, x = layer.weight_grid, (layer.input_quantizer.grid if layer.input_quantizer else None)
    if layer.weight_dtype != torch.float32:
        return None, f"its weight is {layer.weight_dtype}, the integer kernels take float32"
    per_channel = w.dim is not None and w.dim % len(layer.weight_shape) == 0
    if (x is not None and x.bits <= 8 and _per_tensor(x) and w.bits <= 8
            and (per_channel or _per_tensor(w))):
        return "integer", ("MatMulIntegerToFloat" if isinstance(layer, QuantizedLinear)
                           else "ConvInteger")
    if not isinstance(layer, QuantizedLinear):
        why = ("its input is not quantized" if x is None else
               f"its input is quantized {x.describe()}" if x.bits <= 8 and not _per_tensor(x)
               else f"its input has {x.bits} bits" if x.bits > 8
               else f"its weight is quantized {w.describe()}" if w.bits <= 8
               else f"its weight has {w.bits} bits")
        return None, (f"ConvInteger needs an input per tensor of at most 8 bits and a weight "
                      f"per tensor or per output channel of at most 8 bits; {why}")
    if w.bits > 8:
        return None, f"MatMulNBits takes at most 8 bits; the weight has {w.bits}"
    if w.group_size is not None and w.group_size not in NBITS_BLOCKS:
        return None, (f"MatMulNBits takes blocks of {', '.join(map(str, NBITS_BLOCKS))}; the "
                      f"weight's group_size is {w.group_size}")
    if w.dim is not None and not per_channel:
        return None, f"MatMulNBits takes steps per output channel; the weight has dim={w.dim}"
    return "nbits", "MatMulNBits"


def _codes(layer: _QuantizedLayer, signed_ok: bool) -> tuple[torch.Tensor, int]:
    """(the weight's codes, their zero point): int8 levels where ``signed_ok``, else uint8
    ``level - lo``."""
    _, lo, _ = layer.weight_grid.levels
    levels = layer.weight_levels().reshape(layer.weight_shape)
    if signed_ok and layer.weight_grid.signed:
        return levels.to(torch.int8), 0
    return (levels - lo).to(torch.uint8), -lo


@dataclass
class IntegerSpec:
    """The constants of one ``"integer"`` layer's nodes."""

    x_step: torch.Tensor  # [] float32
    x_zero: int  # -lo of the input grid: codes 0..hi-lo
    x_clip: tuple[float, float] | None  # (lo * step, hi * step) when narrower than 0..255
    codes: torch.Tensor  # Linear: [K, N]; conv: the weight's shape
    w_zero: int
    w_step: torch.Tensor  # [N] (or []) float32
    bias: torch.Tensor | None
    conv: dict | None  # ConvInteger's attributes (None: Linear)


def integer_spec(layer: _QuantizedLayer) -> IntegerSpec:
    xg = layer.input_quantizer.grid
    _, xlo, xhi = xg.levels
    _, wlo, whi = layer.weight_grid.levels
    x_step = layer.input_quantizer.step.detach().cpu().reshape(())
    clip = None if xhi - xlo == 255 else (float(x_step * xlo), float(x_step * xhi))
    signed_ok = 2 * (xhi - xlo) * max(-wlo, whi) <= INT16_MAX
    codes, w_zero = _codes(layer, signed_ok)
    w_step = layer.weight_step.detach().cpu()
    conv = None
    if isinstance(layer, QuantizedLinear):
        codes = codes.t().contiguous()
    else:
        dims = len(layer.weight_shape) - 2
        pads = [0] * (2 * dims) if layer.padding_mode != "zeros" else list(layer.padding) * 2
        conv = dict(strides_i=list(layer.stride), pads_i=pads,
                    dilations_i=list(layer.dilation), group_i=layer.groups,
                    kernel_shape_i=list(layer.weight_shape[2:]))
    bias = None if layer.bias is None else layer.bias.detach().cpu().float()
    return IntegerSpec(x_step, -xlo, clip, codes.cpu(), w_zero, w_step, bias, conv)


def integer_symbolic(g, x, spec: IntegerSpec):
    """The ``"integer"`` nodes on ``x``: clip, ``QuantizeLinear`` (uint8), then
    ``MatMulIntegerToFloat`` or ``ConvInteger`` and the float epilogue."""
    const = lambda t: _constant(g, t)  # noqa: E731
    if spec.x_clip is not None:
        lo, hi = spec.x_clip
        x = g.op("Min", g.op("Max", x, const(torch.tensor(lo))), const(torch.tensor(hi)))
    x_zero = const(torch.tensor(spec.x_zero, dtype=torch.uint8))
    q = g.op("QuantizeLinear", x, const(spec.x_step), x_zero)
    w_zero = const(torch.tensor(spec.w_zero, dtype=spec.codes.dtype))
    if spec.conv is None:
        inputs = [q, const(spec.codes), const(spec.x_step), const(spec.w_step), x_zero, w_zero]
        if spec.bias is not None:
            inputs.append(const(spec.bias))
        y = g.op(f"{CONTRIB_DOMAIN}::MatMulIntegerToFloat", *inputs)
        return _typed_like(y, x, spec.codes.shape[1])
    acc = g.op("ConvInteger", q, const(spec.codes), x_zero, w_zero, **spec.conv)
    shape = [1, -1] + [1] * (spec.codes.dim() - 2)
    scale = (spec.x_step * spec.w_step).reshape(shape) if spec.w_step.dim() else (
        spec.x_step * spec.w_step)
    y = g.op("Mul", g.op("Cast", acc, to_i=1), const(scale))  # to_i=1: FLOAT
    if spec.bias is not None:
        y = g.op("Add", y, const(spec.bias.reshape(shape)))
    return y


@dataclass
class NBitsSpec:
    """The constants and attributes of one ``MatMulNBits`` node."""

    packed: torch.Tensor  # [N, blocks, block * bits / 8] uint8
    scales: torch.Tensor  # [N, blocks] float32
    zero_points: torch.Tensor | None  # packed like B; None: the default 2^(bits-1)
    bias: torch.Tensor | None
    attrs: dict


def _pack_along_k(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[N, blocks, block]`` uint8 codes of ``bits`` bits, packed along the last dimension,
    the first code in the low bits of each byte."""
    per = 8 // bits
    parts = codes.to(torch.int32).reshape(*codes.shape[:-1], -1, per)
    packed = torch.zeros(parts.shape[:-1], dtype=torch.int32)
    for i in range(per):
        packed |= parts[..., i] << (bits * i)
    return packed.to(torch.uint8)


def nbits_spec(layer: QuantizedLinear, accuracy_level: int) -> NBitsSpec:
    grid = layer.weight_grid
    n, k = layer.weight_shape
    bits = nbits_container(grid.bits)
    block = grid.group_size or min(NBITS_BLOCK, max(16, 1 << (k - 1).bit_length()))
    blocks = math.ceil(k / block)
    _, lo, _ = grid.levels
    offset = 2 ** (bits - 1) if grid.signed else -lo  # the stored code of level 0
    levels = layer.weight_levels().reshape(n, k)
    codes = torch.full((n, blocks * block), offset, dtype=torch.int32)
    codes[:, :k] = levels + offset
    step = layer.weight_step.detach().cpu().float()
    scales = (step.reshape(n, blocks) if grid.group_size is not None
              else step.reshape(-1, 1).expand(n, blocks).contiguous())
    zero_points = None
    if offset != 2 ** (bits - 1):
        zeros = torch.full((n, math.ceil(blocks * bits / 8) * 8 // bits), offset,
                           dtype=torch.int32)
        zero_points = _pack_along_k(zeros, bits)
    bias = None if layer.bias is None else layer.bias.detach().cpu().float()
    return NBitsSpec(_pack_along_k(codes.reshape(n, blocks, block), bits), scales,
                     zero_points, bias, dict(K_i=k, N_i=n, bits_i=bits, block_size_i=block,
                                             accuracy_level_i=accuracy_level))


def nbits_symbolic(g, x, spec: NBitsSpec):
    """``com.microsoft.MatMulNBits(x, B, scales[, zero_points][, g_idx: none][, bias])``."""
    inputs = [x, _constant(g, spec.packed), _constant(g, spec.scales)]
    if spec.zero_points is not None or spec.bias is not None:
        inputs.append(_constant(g, spec.zero_points) if spec.zero_points is not None
                      else _absent(g))
    if spec.bias is not None:
        inputs += [_absent(g), _constant(g, spec.bias)]
    y = g.op(f"{CONTRIB_DOMAIN}::MatMulNBits", *inputs, **spec.attrs)
    return _typed_like(y, x, spec.attrs["N_i"])


def _constant(g, t: torch.Tensor):
    return g.op("Constant", value_t=t)


def _absent(g):
    """An omitted optional input (its name is empty in the ONNX node)."""
    value = g.op("prim::Constant")
    value.setType(torch._C.OptionalType.ofTensor())
    return value


def _typed_like(y, x, n: int):
    """``y`` typed as float32 of x's shape with the last dimension ``n`` (the exporter's shape
    inference does not know the contrib ops)."""
    sizes = x.type().varyingSizes()
    if sizes is not None:
        y.setType(x.type().with_sizes(sizes[:-1] + [n]))
    return y


def compact_codes(graph) -> None:
    """Stores the weight codes of ``MatMulIntegerToFloat`` / ``ConvInteger`` nodes that fit 4
    bits as an INT4 / UINT4 initializer (two per byte) and a ``Cast`` back to INT8 / UINT8,
    which ONNX Runtime folds when it loads the graph (opset >= 21)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    for node in list(graph.node):
        if node.op_type not in ("MatMulIntegerToFloat", "ConvInteger"):
            continue
        constant = constants.get(node.input[1])
        if constant is None:
            continue
        codes = numpy_helper.to_array(constant.attribute[0].t)
        small = (TensorProto.INT4 if codes.dtype == np.int8 and codes.min() >= -8
                 and codes.max() <= 7 else TensorProto.UINT4
                 if codes.dtype == np.uint8 and codes.max() <= 15 else None)
        if small is None:
            continue
        name = f"{node.input[1]}_4bit"
        graph.initializer.append(int4_tensor(name, codes, signed=small == TensorProto.INT4))
        wide = TensorProto.INT8 if codes.dtype == np.int8 else TensorProto.UINT8
        cast = helper.make_node("Cast", [name], [node.input[1]], to=wide,
                                name=f"{node.input[1]}_Cast")
        graph.node.insert(list(graph.node).index(constant), cast)
        graph.node.remove(constant)


def int4_tensor(name: str, values, signed: bool):
    """An INT4 (``signed``) or UINT4 ``TensorProto`` of integer ``values`` (an array or tensor
    in range) as ``raw_data``: two per byte, the first in the low nibble (``make_tensor`` with
    a list would store each packed byte as an int32 varint, up to 2 bytes)."""
    from onnx import TensorProto, helper

    flat = torch.as_tensor(values).reshape(-1).to(torch.int32) & 0xF
    packed = _pack_along_k(nn.functional.pad(flat, (0, flat.numel() % 2)), 4)
    return helper.make_tensor(name, TensorProto.INT4 if signed else TensorProto.UINT4,
                              list(values.shape), packed.numpy().tobytes(), raw=True)
