"""ONNX export of a converted (or QAT) model as a QDQ graph.

- Weights: integer initializers (INT4 / UINT4 for 2-4 bits from opset 21, else INT8 / UINT8 /
  INT16) with a ``DequantizeLinear`` (per tensor; per axis 0 for per-channel weights; blocked,
  ``axis=1, block_size=G``, opset 21, for per-group weights, then a ``Reshape`` back to the
  weight's shape). ``DequantizeLinear`` computes ``level * step`` in float32: the converted
  layer's weight, bit for bit.
- Quantized inputs and standalone quantizers: ``Max`` / ``Min`` to the grid's range
  ``[lo * step, hi * step]`` when it is narrower than the container's (2-7 bits, narrow grids),
  then ``QuantizeLinear`` / ``DequantizeLinear`` with the frozen step and zero point 0 (INT8 /
  UINT8 for up to 8 bits, INT16 from opset 21 above). ``QuantizeLinear`` divides by the step and
  rounds half to even, as SPEC §1 does, so the pair is the fake-quant.

The graph is traced by PyTorch's TorchScript-based ONNX exporter from a copy of the model whose
converted layers hold their dequantized weight as a float Parameter (named ``<layer>.weight``)
and whose quantizers are one ``QDQ`` node group each; the weight initializers are then replaced
by the integer ones and their ``DequantizeLinear``.

``target="ort"`` (the default) writes the layers that ONNX Runtime has integer kernels for as
those kernels' nodes instead (``deploy/ort.py``: ``MatMulIntegerToFloat``, ``ConvInteger``,
``com.microsoft.MatMulNBits``), on the same integer levels and steps; every other layer stays
in the QDQ form above, with an ``OrtFallbackWarning`` naming it. ``target="qdq"``: the QDQ
form for every layer (a graph any ONNX runtime runs; ONNX Runtime runs it in float).
"""

from __future__ import annotations

import copy
import io
import warnings

import torch
from torch import nn

from ..qat.layers import QuantLayer
from ..qat.model import replace_modules
from ..qat.quantizer import Quantizer
from . import ort
from .quantized import (
    Grid,
    QuantizedAct,
    QuantizedLinear,
    _QuantizedLayer,
    convert_model,
    storage,
)

DEFAULT_OPSET = 21
MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear
TARGETS = ("ort", "qdq")


class OrtFallbackWarning(UserWarning):
    """``export_onnx(target="ort")`` wrote a layer in the QDQ form: ONNX Runtime runs it in
    float (the message names the layer and says why)."""


def _onnx():
    try:
        import onnx
    except ImportError as err:
        raise ImportError("export_onnx needs the onnx package (pip install onnx)") from err
    return onnx


def _container(grid: Grid, opset: int, what: str) -> tuple[torch.dtype, int, int]:
    """(the integer type of the Q/DQ pair, its min, its max) for a grid."""
    if grid.bits <= 8:
        return (torch.int8, -128, 127) if grid.signed else (torch.uint8, 0, 255)
    if opset < 21:
        raise ValueError(f"{what}: {grid.bits}-bit quantization needs INT16 QuantizeLinear, "
                         f"opset >= 21 (opset={opset})")
    if not grid.signed and grid.bits > 15:
        raise ValueError(f"{what}: unsigned 16-bit quantization has no ONNX export")
    return torch.int16, -(2**15), 2**15 - 1


class _QDQ(torch.autograd.Function):
    """The Q/DQ node group of a frozen quantizer in the exported graph. Traced with example
    inputs only for the graph, it passes x through in PyTorch."""

    @staticmethod
    def forward(ctx, x, spec):
        return x.clone()

    @staticmethod
    def symbolic(g, x, spec):
        step, bound_step, lo, hi, (dtype, cmin, cmax), axis, block = spec
        scale = g.op("Constant", value_t=step)
        zero = g.op("Constant", value_t=torch.zeros(step.shape, dtype=dtype))
        if (lo, hi) != (cmin, cmax):  # clip to the grid's range (the container saturates wider)
            low = g.op("Constant", value_t=bound_step * lo)
            high = g.op("Constant", value_t=bound_step * hi)
            x = g.op("Min", g.op("Max", x, low), high)
        attrs = {} if axis is None else {"axis_i": axis}
        if block is not None:
            attrs["block_size_i"] = block
        q = g.op("QuantizeLinear", x, scale, zero, **attrs)
        return g.op("DequantizeLinear", q, scale, zero, **attrs)


class _ExportQDQ(nn.Module):
    """A ``QuantizedAct`` as the exporter sees it."""

    def __init__(self, act: QuantizedAct, opset: int, name: str):
        super().__init__()
        # Not a submodule: the exported graph holds the quantizer's nodes, not its buffers.
        object.__setattr__(self, "act", act)
        g = act.grid
        if g.group_size is not None and opset < 21:
            raise ValueError(f"{name}: per-block quantization of an input (group_size="
                             f"{g.group_size}) needs blocked QuantizeLinear, opset >= 21 "
                             f"(opset={opset})")
        self.container = _container(g, opset, name)

    def forward(self, x):
        g = self.act.grid
        _, lo, hi = g.levels
        step = self.act.step.detach().cpu()
        axis = block = None
        bound_step = step  # the step, broadcastable against x (for the clip)
        if g.group_size is not None:
            axis, block = x.dim() - 1, g.group_size
            bound_step = step.repeat_interleave(block, dim=-1)
        elif g.dim is not None:
            axis = g.dim % x.dim()
            bound_step = step.reshape(-1, *([1] * (x.dim() - axis - 1)))
        return _QDQ.apply(x, (step, bound_step, lo, hi, self.container, axis, block))


class _ExportLayer(nn.Module):
    """A converted layer as the exporter sees it: its dequantized weight as a float Parameter
    (an initializer the export then replaces by the integer one)."""

    def __init__(self, layer: _QuantizedLayer, opset: int, name: str):
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a submodule (its buffers stay out)
        self.weight = nn.Parameter(layer.dequantized_weight().detach(), requires_grad=False)
        self.bias = layer.bias
        self.input = (_ExportQDQ(layer.input_quantizer, opset, f"{name}.input_quantizer")
                      if layer.input_quantizer is not None else None)

    def forward(self, x):
        shape = x.shape
        per_tensor = self.input is None or (self.input.act.grid.dim is None
                                            and self.input.act.grid.group_size is None)
        if isinstance(self.layer, QuantizedLinear) and x.dim() != 2 and per_tensor:
            # A Q/DQ pair and a Gemm on the flattened rows, not a MatMul on N-d inputs: ONNX
            # Runtime's optimizer, moving a Q/DQ pair across the Reshape it puts around such a
            # MatMul, emits an invalid QuantizeLinear (zero point uint8, output_dtype int8).
            x = x.reshape(-1, shape[-1])
        if self.input is not None:
            x = self.input(x)
        y = self.layer._layer(x, self.weight, self.bias)
        return y.reshape(*shape[:-1], y.shape[-1]) if y.dim() != len(shape) else y


class _OrtNode(torch.autograd.Function):
    """One layer as ONNX Runtime's integer-kernel nodes (``ort.integer_symbolic`` or
    ``ort.nbits_symbolic``). Traced with example inputs only for the graph, it computes the
    converted layer's output (``fn``) in PyTorch."""

    @staticmethod
    def forward(ctx, x, spec, fn):
        return fn(x)

    @staticmethod
    def symbolic(g, x, spec, fn):
        if isinstance(spec, ort.NBitsSpec):
            return ort.nbits_symbolic(g, x, spec)
        return ort.integer_symbolic(g, x, spec)


class _ExportOrt(nn.Module):
    """A converted layer that ``ort.plan`` gives an integer kernel, as the exporter sees it."""

    def __init__(self, layer: _QuantizedLayer, kind: str, accuracy_level: int, opset: int,
                 name: str):
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a submodule (its buffers stay out)
        if kind == "integer":
            self.spec = ort.integer_spec(layer)
            self.input = None  # QuantizeLinear is one of the kernel's nodes
        else:
            self.spec = ort.nbits_spec(layer, accuracy_level)
            self.input = (_ExportQDQ(layer.input_quantizer, opset, f"{name}.input_quantizer")
                          if layer.input_quantizer is not None else None)

    def forward(self, x):
        layer = self.layer
        if self.input is not None:
            x = self.input(x)
        if not isinstance(layer, QuantizedLinear) and layer.padding_mode != "zeros":
            # An ONNX Pad before the kernel (which then pads nothing): quantizing is elementwise,
            # so padding the float input first leaves the codes as the converted layer's.
            x = nn.functional.pad(x, layer._reversed_padding_repeated_twice,
                                  mode=layer.padding_mode)
        return _OrtNode.apply(x, self.spec, self._converted)

    def _converted(self, x):
        """The converted layer's output for ``x`` (padded already where ``padding_mode`` is
        not "zeros"; through the input quantizer already for MatMulNBits)."""
        layer = self.layer
        if self.input is None:
            x = layer.quantized_input(x)
        weight = layer.dequantized_weight()
        bias = self.spec.bias
        if isinstance(layer, QuantizedLinear):
            return nn.functional.linear(x, weight, bias)
        padding = layer.padding if layer.padding_mode == "zeros" else 0
        return type(layer)._conv(x, weight, bias, layer.stride, padding, layer.dilation,
                                 layer.groups)


def export_onnx(model: nn.Module, args, path, *, target: str = "ort",
                accuracy_level: int = ort.DEFAULT_ACCURACY_LEVEL, opset: int | None = None,
                input_names: list[str] | None = None, output_names: list[str] | None = None,
                dynamic_axes: dict | None = None):
    """Write ``model`` (a converted model, or a QAT model in eval, which is converted first) as
    an ONNX graph to ``path`` (a file path or a writable binary file); returns the
    ``onnx.ModelProto``, which passes ``onnx.checker``.

    ``target="ort"`` (default): ONNX Runtime's integer kernels where it has one for a layer
    (``octav_kernels.deploy.ort``: ``MatMulIntegerToFloat`` / ``ConvInteger`` for inputs
    quantized per tensor to at most 8 bits with weights of at most 8 bits per tensor or per
    output channel, exact up to float32 roundings; ``com.microsoft.MatMulNBits`` for other
    Linear weights of at most 8 bits), the QDQ form elsewhere, each such layer named in an
    ``OrtFallbackWarning``. ``accuracy_level`` is ``MatMulNBits``' (4, default: the input
    quantized to int8 per block inside the kernel, fast and approximate; 0: float32).
    ``target="qdq"``: ``DequantizeLinear`` + the float op for every layer (any runtime; ONNX
    Runtime runs it in float). ``args`` are example inputs (a tensor or a tuple); ``opset``
    defaults to 21 (INT4 weights, blocked ``DequantizeLinear``); from 13 up, per-block weights
    or inputs and quantizers of more than 8 bits in the QDQ form need 21, and 2-4-bit QDQ
    weights are stored in INT8 below 21 (still exact). ``input_names``, ``output_names``,
    ``dynamic_axes``: as in ``torch.onnx.export``.
    """
    onnx = _onnx()
    if not isinstance(target, str):
        raise TypeError(f"target must be a str, got {type(target).__name__}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(map(repr, TARGETS))}, got "
                         f"{target!r}")
    if (isinstance(accuracy_level, bool) or not isinstance(accuracy_level, int)
            or accuracy_level not in ort.ACCURACY_LEVELS):
        raise ValueError(f"accuracy_level must be one of {ort.ACCURACY_LEVELS}, got "
                         f"{accuracy_level!r}")
    if opset is None:
        opset = DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an int, got {type(opset).__name__}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (per-axis DequantizeLinear), got {opset}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, (QuantLayer, Quantizer)) for m in model.modules()):
        model = convert_model(model)
    else:
        model = copy.deepcopy(model)
    model.eval()
    weights, fallbacks = _swap_for_export(model, opset, target, accuracy_level)
    args = args if isinstance(args, tuple) else (args,)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, buffer, dynamo=False, opset_version=opset,
                          do_constant_folding=False, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes,
                          custom_opsets={ort.CONTRIB_DOMAIN: 1} if any(
                              isinstance(m, _ExportOrt) and isinstance(m.layer, QuantizedLinear)
                              for m in model.modules()) else None)
    proto = onnx.load_from_string(buffer.getvalue())
    for name, layer in weights.items():
        _integer_weight(onnx, proto.graph, f"{name}.weight", layer, opset)
    if target == "ort" and opset >= 21:
        ort.compact_codes(proto.graph)
    onnx.checker.check_model(proto, full_check=True)
    if hasattr(path, "write"):
        path.write(proto.SerializeToString())
    else:
        onnx.save(proto, str(path))
    for name, why in fallbacks.items():
        warnings.warn(f"export_onnx(target='ort'): {name} runs in float in ONNX Runtime (QDQ "
                      f"form): {why}", OrtFallbackWarning, stacklevel=2)
    return proto


def _swap_for_export(model: nn.Module, opset: int, target: str, accuracy_level: int
                     ) -> tuple[dict[str, _QuantizedLayer], dict[str, str]]:
    """Replaces converted layers and standalone quantizers by their export forms; returns the
    converted layers in the QDQ form by path, and for ``target="ort"`` why each of them is not
    an integer kernel."""
    layers, fallbacks = {}, {}

    def export_form(name: str, module: nn.Module) -> nn.Module | None:
        if isinstance(module, QuantizedAct):
            return _ExportQDQ(module, opset, name)
        if not isinstance(module, _QuantizedLayer):
            return None
        kind, why = ort.plan(module) if target == "ort" else (None, "")
        if kind is not None:
            return _ExportOrt(module, kind, accuracy_level, opset, name)
        if target == "ort":
            fallbacks[name] = why
        layers[name] = module
        return _ExportLayer(module, opset, name)

    replace_modules(model, export_form, "export_onnx")
    if isinstance(model, (_QuantizedLayer, QuantizedAct)):
        raise ValueError("model is itself a single converted layer; wrap it in a container "
                         "(e.g. nn.Sequential) to export it")
    return layers, fallbacks


def _integer_weight(onnx, graph, name: str, layer: _QuantizedLayer, opset: int) -> None:
    """Replaces the float initializer ``name`` by the layer's integer levels and steps and a
    DequantizeLinear (and a Reshape for per-block weights) that produce it."""
    from onnx import TensorProto, helper, numpy_helper

    grid = layer.weight_grid
    found = [t for t in graph.initializer if t.name == name]
    if not found:
        raise RuntimeError(f"export_onnx: the exported graph has no initializer {name!r}")
    graph.initializer.remove(found[0])
    levels = layer.weight_levels()
    if grid.bits <= 4 and opset >= 21:
        dtype = TensorProto.INT4 if grid.signed else TensorProto.UINT4
    else:
        dtype = {torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8,
                 torch.int16: TensorProto.INT16, torch.int32: TensorProto.INT32}[
            storage(grid) or (torch.int8 if grid.signed else torch.uint8)]
        if dtype == TensorProto.INT32:
            raise ValueError(f"{name}: {grid.bits}-bit unsigned weights have no ONNX integer "
                             "type DequantizeLinear takes")
    if dtype in (TensorProto.INT4, TensorProto.UINT4):  # two per byte, raw
        quantized = ort.int4_tensor(f"{name}_quantized", levels.cpu().numpy(),
                                    signed=dtype == TensorProto.INT4)
    else:  # raw_data: one byte per int8 level (a list would be stored as int32 varints)
        numpy_dtype = {TensorProto.INT8: "int8", TensorProto.UINT8: "uint8",
                       TensorProto.INT16: "int16"}[dtype]
        quantized = numpy_helper.from_array(levels.cpu().numpy().astype(numpy_dtype),
                                            f"{name}_quantized")
    step = layer.weight_step.detach().cpu()
    scale = numpy_helper.from_array(step.numpy(), f"{name}_scale")
    attrs = {}
    if grid.dim is not None:
        attrs["axis"] = grid.dim % len(levels.shape)
    elif grid.group_size is not None:
        if opset < 21:
            raise ValueError(f"{name}: per-block weights (group_size={grid.group_size}) need "
                             f"blocked DequantizeLinear, opset >= 21 (opset={opset})")
        attrs.update(axis=1, block_size=grid.group_size)
    nodes = []
    reshape = tuple(levels.shape) != layer.weight_shape
    out = f"{name}_dequantized" if reshape else name
    nodes.append(helper.make_node("DequantizeLinear", [quantized.name, scale.name], [out],
                                  name=f"{name}_DequantizeLinear", **attrs))
    graph.initializer.extend([quantized, scale])
    if reshape:
        shape = numpy_helper.from_array(
            torch.tensor(layer.weight_shape, dtype=torch.int64).numpy(), f"{name}_shape")
        graph.initializer.append(shape)
        nodes.append(helper.make_node("Reshape", [out, shape.name], [name],
                                      name=f"{name}_Reshape"))
    for node in reversed(nodes):
        graph.node.insert(0, node)
    for value in list(graph.input):  # an initializer also listed as an input
        if value.name == name:
            graph.input.remove(value)
