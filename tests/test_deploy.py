"""From QAT to deployment: convert_model (integer weights, eval outputs bit for bit the QAT
model's), export_onnx (a QDQ graph that passes onnx.checker and that ONNX Runtime runs within
a derived tolerance), torch.export of converted models, state_dict size and round trip, and the
errors (uncalibrated quantizers, unconvertible layers, opsets too old).

ONNX Runtime's tolerance. The converted model and the ONNX graph compute the same quantized
inputs x^ and dequantized weights w^ (QuantizeLinear divides by the step and rounds half to
even, DequantizeLinear multiplies by it in float32: SPEC §1's operations), then a float32
matrix product or convolution. Each implementation's sum of K products is within
gamma_K * sum_k |x^_k w^_k| of the exact one (gamma_K = K u / (1 - K u), u = 2**-24, any
summation order), so the two outputs of one layer differ by at most 2 gamma_K (|x^| * |w^|)
elementwise (``layer_bound``), plus one rounding of the bias add. Through several layers a
difference can also move a value across a rounding midpoint of the next QuantizeLinear (one
level flips): ``assert_matches_onnx`` allows such elements to differ by at most a few output
steps, and only a small fraction of them.

The default export (``target="ort"``) runs ONNX Runtime's integer kernels. ``MatMulIntegerToFloat``
and ``ConvInteger`` take the same input codes (``QuantizeLinear``) and weight levels and sum the
products exactly in int32; the float epilogue (int32 -> float, times ``s_x * s_w``, plus the
bias) rounds 3-4 times, which the bound above covers (it allows 2 gamma_K >= 4 u for K >= 2).
``MatMulNBits`` with ``accuracy_level=4`` quantizes its input ``a`` to int8 inside the kernel,
per block ``b`` of ``block_size`` along K, with the step ``max|a_b| / 127`` and round to
nearest: each element moves by at most half that step (times ``1 + 2**-10`` for the float32
rounding of the step and of ``a / step``), so an output moves by at most
``sum_b max|a_b| / 254 * sum_{k in b} |w_k|`` more (``nbits_bound``); with
``accuracy_level=0`` it dequantizes ``level * step`` in float32 and the float bound holds.
"""

import io
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_bitwise
from torch import nn

import octav_kernels as ok

onnx = pytest.importorskip("onnx", reason="needs onnx (pip install onnx onnxruntime)")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime")

BITS = [2, 3, 4, 8]
GRANULARITY = [pytest.param("tensor", id="tensor"), pytest.param("channel", id="channel"),
               pytest.param(4, id="group4")]
# (act_signed, narrow): the input grid (and narrow weights)
GRIDS = [pytest.param((True, False), id="signed"), pytest.param((False, False), id="unsigned"),
         pytest.param((True, True), id="narrow")]


class Residual(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class TransformerBlock(nn.Module):
    """A pre-norm transformer block: LayerNorm, attention, a GELU MLP with a standalone
    QuantAct, residuals."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.act, self.down = nn.Linear(d, 4 * d), ok.QuantAct(8), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, -1).unbind(2)
        w = torch.softmax(q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)
                          / math.sqrt(d // self.heads), -1)
        a = (w @ v.transpose(1, 2)).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.down(self.act(nn.functional.gelu(self.up(self.norm2(x)))))



def model_of(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """(a small float model, a batch) of each kind of the matrix; every quantized layer's
    input and weight sizes are multiples of 4 (the group size)."""
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(16, 32), nn.GELU(),
                              Residual(nn.Sequential(nn.Linear(32, 32), nn.ReLU())),
                              nn.Linear(32, 8))
        return model, torch.randn(12, 16)
    if kind == "conv1d":
        model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
                              Residual(nn.Conv1d(8, 8, 1)), nn.Conv1d(8, 4, 4, stride=2))
        return model, torch.randn(6, 4, 16)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"),
                          nn.BatchNorm2d(8), nn.ReLU(), Residual(nn.Conv2d(8, 8, 1)),
                          nn.GELU(), nn.Conv2d(8, 4, 2, stride=2))
    return model, torch.randn(6, 4, 8, 8)


def trained(kind, bits, gran, grid, *, frozen=False, steps=6):
    """A QAT model trained a few dynamic-OCTAV steps, in eval, and a batch. ``frozen``: with
    oscillation tracking, and every 5th weight then frozen at a level one above its own (so
    that a converted weight which ignored the frozen level would differ)."""
    act_signed, narrow = grid
    model, x = model_of(kind)
    q = ok.quantize_model(model, bits, first_last_bits=None, weight_granularity=gran,
                          act_signed=act_signed, narrow=narrow)
    control = ok.OscillationControl(q) if frozen else None
    optimizer = torch.optim.SGD(q.parameters(), lr=0.05)
    target = q(x).detach() * 0 + 0.3
    for _ in range(steps):
        loss = (q(x) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if control is not None:
        for wq in control.quantizers:
            hi = ok._args.levels(wq.bits, True, wq.narrow)[2]
            with torch.no_grad():
                wq.osc_frozen.view(-1)[::5] = True
                wq.osc_last_int.copy_((wq.osc_last_int + 1).clamp_max(hi))
    return q.eval(), x


def layer_bound(model: nn.Module, x: torch.Tensor) -> float:
    """2 gamma_K max(|x^| * |w^|) over the converted layers of ``model`` at their inputs for x
    (the largest single-layer difference two float32 implementations may show)."""
    bound = 0.0
    handles = []

    def hook(layer, args, output):
        nonlocal bound
        xq = layer.quantized_input(args[0]).double().abs()
        w = layer.dequantized_weight().double().abs()
        k = math.prod(w.shape[1:])
        gamma = k * 2.0**-24 / (1 - k * 2.0**-24)
        magnitude = layer._layer(xq, w, None)
        bias = 0.0 if layer.bias is None else float(layer.bias.abs().max())
        bound = max(bound, 2 * gamma * float(magnitude.max()) + 2.0**-23 * (
            float(magnitude.max()) + bias))

    for m in model.modules():
        if isinstance(m, ok.deploy.quantized._QuantizedLayer):
            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return bound


def nbits_bound(layer, a: torch.Tensor, accuracy_level: int) -> torch.Tensor:
    """The elementwise bound of ONNX Runtime's ``MatMulNBits`` output against the converted
    layer's for the kernel's input ``a`` (module docstring), float64, the output's shape."""
    w = layer.dequantized_weight().double()
    n, k = w.shape
    a = a.double()
    magnitude = a.abs() @ w.abs().t()
    gamma = k * 2.0**-24 / (1 - k * 2.0**-24)
    bias = 0.0 if layer.bias is None else layer.bias.detach().abs().double()
    bound = 2 * gamma * magnitude + 2.0**-23 * (magnitude + bias)
    if accuracy_level > 0:
        block = ok.deploy.ort.nbits_spec(layer, accuracy_level).attrs["block_size_i"]
        pad = (-k) % block
        a_max = nn.functional.pad(a.abs(), (0, pad)).reshape(*a.shape[:-1], -1, block).amax(-1)
        w_sum = nn.functional.pad(w.abs(), (0, pad)).reshape(n, -1, block).sum(-1)
        bound = bound + (a_max / 254 * (1 + 2.0**-10)) @ w_sum.t()
    return bound


def run_onnx(proto, x, optimized: Path | None = None):
    """ONNX Runtime's output for x, default session options (what users run); ``optimized``:
    also save the graph ORT's optimizer made (what it really runs) there."""
    options = ort.SessionOptions()
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def optimized_ops(proto, x, tmp_path) -> list[str]:
    """The node types of the graph ONNX Runtime runs for ``proto``."""
    path = tmp_path / "optimized.onnx"
    run_onnx(proto, x, path)
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def assert_matches_onnx(converted, x, proto, layers: int):
    """ONNX Runtime's output within the derived tolerance (module docstring)."""
    with torch.no_grad():
        expected = converted(x)
    got = run_onnx(proto, x)
    assert got.shape == expected.shape
    bound = layer_bound(converted, x) * layers * 4  # differences grow through the layers
    far = (got - expected).abs() > bound + 1e-30
    if layers == 1:
        assert not bool(far.any()), float((got - expected).abs().max())
        return
    # Level flips: rare, and each worth at most a few steps of the output.
    scale = float(expected.abs().max())
    assert float(far.float().mean()) <= 0.01
    assert float((got - expected).abs().max()) <= 0.05 * scale + bound


# ---------------------------------------------------------------------------------------------
# convert_model == QAT eval


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("gran", GRANULARITY)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_convert_equals_qat_eval_and_onnx_runtime_agrees(kind, bits, gran, grid):
    """Both targets: the QDQ graph, and the default one, where every layer of these models
    (inputs quantized per tensor) runs ONNX Runtime's integer kernels except per-block weights,
    which stay QDQ with a warning naming each layer."""
    q, x = trained(kind, bits, gran, grid, frozen=bits <= 4)
    with torch.no_grad():
        expected = q(x)
    converted = ok.convert_model(q)
    with torch.no_grad():
        assert_bitwise(converted(x), expected)
    names = [n for n, m in converted.named_modules()
             if isinstance(m, ok.deploy.quantized._QuantizedLayer)]
    layers = len(names)
    proto = ok.export_onnx(converted, x, io.BytesIO(), target="qdq")
    assert_matches_onnx(converted, x, proto, layers)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == layers  # one Q/DQ pair per quantized input
    types = {t.name: t.data_type for t in proto.graph.initializer if t.name.endswith("_quantized")}
    expected_type = onnx.TensorProto.INT4 if bits <= 4 else onnx.TensorProto.INT8
    assert len(types) == layers and set(types.values()) == {expected_type}
    for t in proto.graph.initializer:  # compact storage, raw: a byte per int8 level, two INT4
        if t.name.endswith("_quantized"):
            per_byte = 2 if t.data_type == onnx.TensorProto.INT4 else 1
            assert len(t.raw_data) == math.ceil(math.prod(t.dims) / per_byte), t.name
            assert len(t.int32_data) == 0, t.name

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        proto = ok.export_onnx(converted, x, io.BytesIO())
    fallbacks = [str(w.message) for w in caught if w.category is ok.OrtFallbackWarning]
    assert_matches_onnx(converted, x, proto, layers)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == layers
    integer = "MatMulIntegerToFloat" if kind == "linear" else "ConvInteger"
    if gran == 4:  # per-block weights: no integer kernel takes them (Linear: blocks of 4 < 16)
        assert len(fallbacks) == layers and ops.count(integer) == 0
        assert all(f"export_onnx(target='ort'): {name} runs in float" in message
                   for name, message in zip(names, fallbacks))
    else:
        assert fallbacks == [] and ops.count(integer) == layers
        assert "DequantizeLinear" not in ops


@pytest.mark.parametrize("make,shape", [
    pytest.param(lambda: nn.Linear(64, 48), (32, 64), id="linear"),
    pytest.param(lambda: nn.Linear(64, 48), (4, 8, 64), id="linear-3d"),
    pytest.param(lambda: nn.Conv1d(8, 16, 5), (4, 8, 40), id="conv1d"),
    pytest.param(lambda: nn.Conv2d(8, 16, 3, groups=2), (4, 8, 12, 12), id="conv2d-groups"),
])
def test_single_layers_match_onnx_runtime_within_the_float32_bound(make, shape):
    """One quantized layer: ONNX Runtime is within 2 gamma_K (|x^| * |w^|) of PyTorch, every
    element (no level can flip before the last layer)."""
    torch.manual_seed(1)
    x = torch.randn(shape)
    q = ok.quantize_model(nn.Sequential(make()), 4, first_last_bits=None).train()
    q(x)
    converted = ok.convert_model(q.eval())
    assert_matches_onnx(converted, x, ok.export_onnx(converted, x, io.BytesIO()), 1)


def test_standalone_quantizers_and_a_transformer_block():
    """QuantAct modules outside layers become QuantizedAct (a Q/DQ pair in ONNX); a pre-norm
    transformer block (LayerNorm, attention, GELU MLP, residuals) converts and exports."""

    torch.manual_seed(2)
    x = torch.randn(2, 16, 32)
    q = ok.quantize_model(TransformerBlock(), 4, first_last_bits=8).train()
    q(x)
    q.eval()
    converted = ok.convert_model(q)
    assert isinstance(converted.act, ok.QuantizedAct)
    with torch.no_grad():
        assert_bitwise(converted(x), q(x))
    proto = ok.export_onnx(converted, x, io.BytesIO())
    assert_matches_onnx(converted, x, proto, layers=4)


def test_qat_model_exports_directly_and_torch_export_works(tmp_path):
    q, x = trained("conv2d", 4, "channel", (False, False))
    path = tmp_path / "model.onnx"
    proto = ok.export_onnx(q, x, path)  # converts a copy first
    assert path.exists() and onnx.load(str(path)) == proto
    assert not any(isinstance(m, ok.QuantizedConv2d) for m in q.modules())  # untouched
    converted = ok.convert_model(q)
    program = torch.export.export(converted, (x,))
    with torch.no_grad():
        assert_bitwise(program.module()(x), converted(x))


# ---------------------------------------------------------------------------------------------
# ONNX Runtime's integer kernels (target="ort", the default)


def single_linear(bits, gran, *, k=256, n=40, act_bits=None, signed_weights=True, narrow=False,
                  seed=3):
    """A converted one-Linear model trained one dynamic step on inputs with outliers in the
    first block, and its batch (3-d: the kernels take N-d inputs)."""
    torch.manual_seed(seed)
    x = torch.randn(3, 5, k)
    x[..., :7] *= 30
    q = ok.quantize_model(nn.Sequential(nn.Linear(k, n)), bits, first_last_bits=None,
                          weight_granularity=gran, narrow=narrow, act_bits=act_bits,
                          quantize_input=act_bits is not None)
    q[0].weight_quantizer.signed = signed_weights
    q.train()(x)
    return ok.convert_model(q.eval()), x


@pytest.mark.parametrize("bits,gran,grid,level,act_bits", [
    pytest.param(2, "channel", "signed", 4, None, id="w2-channel"),
    pytest.param(3, 32, "signed", 4, None, id="w3-g32"),
    pytest.param(4, "channel", "signed", 4, None, id="w4-channel"),
    pytest.param(4, "tensor", "signed", 0, None, id="w4-tensor-level0"),
    pytest.param(4, 16, "narrow", 0, None, id="w4-g16-narrow-level0"),
    pytest.param(4, 32, "unsigned", 4, None, id="w4-g32-unsigned"),
    pytest.param(4, 128, "signed", 4, 8, id="w4-g128-a8"),
    pytest.param(5, 64, "signed", 4, None, id="w5-g64"),
    pytest.param(8, 256, "signed", 4, None, id="w8-g256"),
    pytest.param(8, "channel", "narrow", 0, None, id="w8-channel-narrow-level0"),
])
def test_matmul_nbits_within_the_derived_bound(bits, gran, grid, level, act_bits, tmp_path):
    """Linear weights of at most 8 bits that MatMulIntegerToFloat cannot take (no per-tensor
    8-bit input) run as MatMulNBits in ORT's optimized graph (3 bits in the 4-bit container,
    5 in the 8-bit one), within ``nbits_bound`` of the converted model at every element."""
    k = 512 if gran == 256 else 200 if gran == "channel" else 256  # 200: a padded last block
    converted, x = single_linear(bits, gran, k=k, act_bits=act_bits, narrow=grid == "narrow",
                                 signed_weights=grid != "unsigned")
    layer = converted[0]
    assert ok.deploy.ort.plan(layer) == ("nbits", "MatMulNBits")
    proto = ok.export_onnx(converted, x, io.BytesIO(), accuracy_level=level)
    (node,) = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: a.i for a in node.attribute}
    assert attrs["bits"] == {2: 2, 3: 4, 4: 4, 5: 8, 8: 8}[bits]
    assert attrs["accuracy_level"] == level
    ops = optimized_ops(proto, x, tmp_path)
    assert ops.count("MatMulNBits") == 1 and not {"MatMul", "Gemm"} & set(ops)
    assert ops.count("DequantizeLinear") == (act_bits is not None)  # the input's Q/DQ only
    with torch.no_grad():
        expected = converted(x).double()
        a = layer.quantized_input(x)
    got = run_onnx(proto, x).double()
    bound = nbits_bound(layer, a, level)
    assert bool(((got - expected).abs() <= bound).all()), float(((got - expected).abs()
                                                                  / bound).max())


@pytest.mark.parametrize("kind,bits,act_bits,node,weight_type", [
    pytest.param("linear", 8, 8, "MatMulIntegerToFloat", onnx.TensorProto.UINT8, id="w8a8"),
    pytest.param("linear", 4, 8, "MatMulIntegerToFloat", onnx.TensorProto.INT8, id="w4a8"),
    pytest.param("linear", 4, 4, "MatMulIntegerToFloat", onnx.TensorProto.INT8, id="w4a4"),
    pytest.param("conv", 8, 8, "ConvInteger", onnx.TensorProto.UINT8, id="conv-w8a8"),
    pytest.param("conv", 4, 8, "ConvInteger", onnx.TensorProto.INT8, id="conv-w4a8"),
])
def test_integer_kernels_in_the_optimized_graph_exact_even_at_saturation(
        kind, bits, act_bits, node, weight_type, tmp_path):
    """Inputs per tensor at <= 8 bits with weights per channel at <= 8 bits: ORT's optimized
    graph runs MatMulIntegerToFloat / ConvInteger, no float MatMul, Gemm or Conv. Inputs at
    the top level and weights at the bottom one (-128 * 255 per product): int8 weights only
    where no pair of products can saturate x86's 16-bit vpmaddubsw sums, so the integer sums
    are exact on every CPU and the output is within the float32 bound."""
    torch.manual_seed(4)
    if kind == "linear":
        model, x = nn.Sequential(nn.Linear(64, 48)), torch.randn(4, 6, 64)
    else:
        model, x = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1)), torch.randn(2, 8, 6, 6)
    q = ok.quantize_model(model, bits, act_bits=act_bits, first_last_bits=None,
                          act_signed=False).train()
    q(x.abs())
    converted = ok.convert_model(q.eval())
    layer = converted[0]
    lo = ok._args.levels(bits, True, False)[1]
    with torch.no_grad():  # every weight at its grid's lowest level
        layer.weight_packed.copy_(ok.deploy.quantized.pack_levels(
            torch.full(layer.weight_shape, lo), layer.weight_grid))
    x = torch.full_like(x, 1e6)  # every input at its grid's top level
    x[..., :1] = torch.rand_like(x[..., :1])
    proto = ok.export_onnx(converted, x, io.BytesIO())
    ops = optimized_ops(proto, x, tmp_path)
    assert ops.count(node) == 1 and not {"MatMul", "Gemm", "Conv", "DequantizeLinear"} & set(ops)
    (kernel,) = [n for n in proto.graph.node if n.op_type == node]
    (source,) = [n for n in proto.graph.node if kernel.input[1] in n.output]
    # codes that fit 4 bits are stored as INT4 / UINT4 and cast back (folded by ORT at load)
    attribute = source.attribute[0]
    assert (attribute.i if source.op_type == "Cast" else attribute.t.data_type) == weight_type
    assert_matches_onnx(converted, x, proto, 1)


def test_dynamic_batch_and_sequence_axes():
    """A transformer block exported with dynamic batch and sequence axes runs at other shapes
    than the example's, with integer kernels (W4A8) and with MatMulNBits (weight-only)."""
    torch.manual_seed(5)
    example = torch.randn(2, 16, 32)
    for config in (dict(act_bits=8), dict(quantize_input=False, weight_granularity=16)):
        q = ok.quantize_model(TransformerBlock(), 4, first_last_bits=None, **config).train()
        q(example)
        converted = ok.convert_model(q.eval())
        proto = ok.export_onnx(converted, example, io.BytesIO(), accuracy_level=0,
                               input_names=["x"], dynamic_axes={"x": {0: "batch", 1: "seq"}})
        kernel = "MatMulIntegerToFloat" if "act_bits" in config else "MatMulNBits"
        assert [n.op_type for n in proto.graph.node].count(kernel) == 4
        for shape in ((1, 3, 32), (5, 23, 32)):
            assert_matches_onnx(converted, torch.randn(shape), proto, layers=4)


@pytest.mark.parametrize("bits,gran,act_bits,target_ratio", [
    pytest.param(4, "channel", None, 0.2, id="w4-channel"),
    pytest.param(4, 32, None, 0.2, id="w4-g32"),
    pytest.param(8, "channel", 8, 0.3, id="w8a8"),
    pytest.param(4, "channel", 8, 0.2, id="w4a8"),
])
def test_file_sizes(bits, gran, act_bits, target_ratio):
    """The file holds the weights' codes (a byte per 8-bit level, half a byte per 4-bit one:
    MatMulNBits packs two, and MatMulIntegerToFloat's 4-bit codes are INT4 with a Cast), one
    float32 step per group (weight-only per channel: one per block of 128) and the biases, plus
    less than 4 KiB of graph; W4 <= 0.2x the fp32 export, W8 <= 0.3x."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
    x = torch.randn(2, 256)
    fp32 = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), fp32, dynamo=False, opset_version=21)
    q = ok.quantize_model(model, bits, first_last_bits=None, weight_granularity=gran,
                          act_bits=act_bits, quantize_input=act_bits is not None).train()
    q(x)
    size = len(ok.export_onnx(ok.convert_model(q.eval()), x, io.BytesIO()).SerializeToString())
    payload = 0
    for k, n in ((256, 1024), (1024, 256)):
        groups = n * k // (gran if isinstance(gran, int) else 128 if act_bits is None else k)
        payload += n * k * bits // 8 + 4 * groups + 4 * n
    assert payload <= size <= payload + 4096
    assert size <= target_ratio * len(fp32.getvalue())


def test_fallbacks_warn_name_the_layer_and_stay_exact():
    """Layers without an ONNX Runtime integer kernel stay in the QDQ form (float in ONNX
    Runtime) with an OrtFallbackWarning naming each and saying why: a weight-only convolution,
    a 12-bit weight, blocks of 8 (MatMulNBits takes 16..256)."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.Flatten(), nn.Linear(48, 16), nn.ReLU(),
                          nn.Linear(16, 8))
    x = torch.randn(3, 4, 8)
    q = ok.quantize_model(model, 4, first_last_bits=None, quantize_input=False)
    q[2] = ok.quantize_model(nn.Sequential(model[2]), 12, first_last_bits=None)[0]
    q[4] = ok.quantize_model(nn.Sequential(model[4]), 4, first_last_bits=None,
                             weight_granularity=8, quantize_input=False)[0]
    q.train()(x)
    converted = ok.convert_model(q.eval())
    with pytest.warns(ok.OrtFallbackWarning) as caught:
        proto = ok.export_onnx(converted, x, io.BytesIO())
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 3
    assert messages[0].startswith("export_onnx(target='ort'): 0 runs in float in ONNX Runtime")
    assert "ConvInteger needs an input per tensor" in messages[0]
    assert messages[1].startswith("export_onnx(target='ort'): 2 runs") and \
        "MatMulNBits takes at most 8 bits; the weight has 12" in messages[1]
    assert messages[2].startswith("export_onnx(target='ort'): 4 runs") and \
        "blocks of 16, 32, 64, 128, 256; the weight's group_size is 8" in messages[2]
    assert_matches_onnx(converted, x, proto, layers=3)


def test_export_target_and_accuracy_level_errors():
    converted, x = single_linear(4, "channel")
    with pytest.raises(ValueError, match="target must be one of 'ort', 'qdq', got 'onnx'"):
        ok.export_onnx(converted, x, io.BytesIO(), target="onnx")
    with pytest.raises(TypeError, match="target must be a str, got int"):
        ok.export_onnx(converted, x, io.BytesIO(), target=1)
    for level in (5, -1, True, 4.0):
        with pytest.raises(ValueError, match="accuracy_level must be one of"):
            ok.export_onnx(converted, x, io.BytesIO(), accuracy_level=level)


# ---------------------------------------------------------------------------------------------
# torchao tensors


@pytest.mark.parametrize("config", [
    pytest.param(dict(bits=4), id="w4a4-channel"),
    pytest.param(dict(bits=4, quantize_input=False, weight_granularity=16), id="w4-g16"),
    pytest.param(dict(bits=3, weight_granularity="tensor", narrow=True), id="w3-tensor-narrow"),
    pytest.param(dict(bits=8, act_bits=8), id="w8a8"),
])
def test_to_torchao_equals_the_converted_model(config):
    """torchao's IntxUnpackedToInt8Tensor holding our levels and steps: the outputs are the
    converted model's bit for bit, eager and through torch.export."""
    tensor_type = pytest.importorskip("torchao.quantization",
                                      reason="needs torchao").IntxUnpackedToInt8Tensor
    torch.manual_seed(8)
    x = torch.randn(2, 16, 32)
    q = ok.quantize_model(TransformerBlock(), **config).train()
    q(x)
    converted = ok.convert_model(q.eval())
    ao = ok.to_torchao(converted)
    linears = [m for m in ao.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 and all(isinstance(m.weight, tensor_type) for m in linears)
    with torch.no_grad():
        expected = converted(x)
        assert_bitwise(ao(x), expected)
        assert_bitwise(torch.export.export(ao, (x,)).module()(x), expected)


def test_to_torchao_conv2d_blocks_and_errors():
    """Conv2d weights in blocks over ``in x kernel`` become torchao blocks over the innermost
    dimensions they span; unsigned levels are stored shifted by a zero point. Conv1d, 12-bit
    weights and blocks that do not tile the weight raise ValueError naming the layer."""
    pytest.importorskip("torchao.quantization", reason="needs torchao")
    torch.manual_seed(9)
    x = torch.randn(2, 4, 8, 8)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                          nn.Conv2d(8, 8, 3))
    for gran, block in ((3, (1, 1, 1, 3)), (9, (1, 1, 3, 3)), (36, (1, 4, 3, 3))):
        q = ok.quantize_model(model, 4, first_last_bits=None, weight_granularity=gran)
        q[0].weight_quantizer.signed = False
        q.train()(x)
        converted = ok.convert_model(q.eval())
        ao = ok.to_torchao(converted)
        assert ao[0].layer.weight.block_size == block
        assert int(ao[0].layer.weight.zero_point.unique()) == -8  # unsigned 0..15 -> -8..7
        with torch.no_grad():
            assert_bitwise(ao(x), converted(x))
    q = ok.quantize_model(nn.Sequential(nn.Conv1d(4, 8, 3), nn.Flatten(), nn.Linear(48, 8)), 12,
                          first_last_bits=None, weight_granularity=6)
    q.train()(torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match=r"^to_torchao: cannot convert 0 \(QuantizedConv1d\): "
                                         r"torchao's .* implements linear and conv2d only; 2 "
                                         r"\(QuantizedLinear\): .* at most 8 bits"):
        ok.to_torchao(ok.convert_model(q.eval()))
    q = ok.quantize_model(model, 4, first_last_bits=None, weight_granularity=6).train()
    q(x)
    with pytest.raises(ValueError, match=r"blocks of 6 over the weight's flattened elements do "
                                         r"not tile its shape \[8, 4, 3, 3\]"):
        ok.to_torchao(ok.convert_model(q.eval()))


# ---------------------------------------------------------------------------------------------
# Storage, state_dict, dequantize_model


@pytest.mark.parametrize("bits,per_element", [(2, 0.5), (3, 0.5), (4, 0.5), (5, 1), (8, 1),
                                              (12, 2)])
def test_weights_are_stored_compactly(bits, per_element):
    """Two levels per byte at 2-4 bits (a 4-bit weight: 1/8 of its fp32 bytes), int8 at 5-8,
    int16 above; plus one float32 step per group."""
    q = ok.quantize_model(nn.Sequential(nn.Linear(256, 128)), bits, first_last_bits=None)
    q(torch.randn(4, 256))
    converted = ok.convert_model(q.eval())
    layer = converted[0]
    assert layer.weight_packed.numel() * layer.weight_packed.element_size() == \
        256 * 128 * per_element
    assert layer.weight_step.shape == (128,) and layer.weight_step.dtype == torch.float32
    state = converted.state_dict()
    assert "0.weight" not in state and state["0.weight_packed"].dtype in (
        torch.uint8, torch.int8, torch.int16)


def test_state_dict_round_trip_into_another_converted_model():
    a, x = trained("conv2d", 3, 4, (True, False), steps=4)
    b, _ = trained("conv2d", 3, 4, (True, False), steps=1)
    ca, cb = ok.convert_model(a), ok.convert_model(b)
    buffer = io.BytesIO()
    torch.save(ca.state_dict(), buffer)
    buffer.seek(0)
    cb.load_state_dict(torch.load(buffer))
    with torch.no_grad():
        assert_bitwise(cb(x), ca(x))
    mismatched, _ = trained("conv2d", 4, 4, (True, False), steps=1)
    with pytest.raises(ValueError, match="saved with"):
        ok.convert_model(mismatched).load_state_dict(ca.state_dict())


def test_dequantize_model_of_a_converted_model():
    q, x = trained("linear", 4, "channel", (True, False))
    converted = ok.convert_model(q)
    floats = ok.dequantize_model(converted)
    assert not any(isinstance(m, (ok.QuantizedLinear, ok.QuantizedAct))
                   for m in floats.modules())
    assert_bitwise(floats[0].weight.detach(), converted[0].dequantized_weight())
    with torch.no_grad():  # same weights, inputs no longer quantized
        assert_bitwise(floats[0](x), nn.functional.linear(x, converted[0].dequantized_weight(),
                                                          converted[0].bias))


def test_frozen_weights_keep_their_level():
    q, x = trained("linear", 3, "channel", (True, False), frozen=True)
    layer = q[0]
    wq = layer.weight_quantizer
    converted = ok.convert_model(q)[0]
    levels = converted.weight_levels()
    frozen = wq.osc_frozen
    assert bool(frozen.any())
    assert torch.equal(levels[frozen], wq.osc_last_int[frozen].to(torch.int32))


# ---------------------------------------------------------------------------------------------
# Errors


def test_convert_errors_name_the_module():
    static = ok.quantize_model(model_of("linear")[0], mode="static")
    with pytest.raises(ValueError, match=r"^convert_model: cannot convert 0\.input_quantizer: "
                                         "no scale yet"):
        ok.convert_model(static)

    class Custom(ok.QuantLinear):
        pass

    model = nn.Sequential(Custom(4, 4))
    model[0].input_quantizer.signed = True
    model[0].input_quantizer.set_scale(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"0 \(Custom\): no converted version"):
        ok.convert_model(model)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        ok.convert_model("model")


def test_export_errors_name_the_argument_or_module():
    q, x = trained("linear", 4, 4, (True, False), steps=1)
    with pytest.raises(ValueError, match="opset must be >= 13"):
        ok.export_onnx(q, x, io.BytesIO(), opset=12)
    with pytest.raises(ValueError, match=r"^0\.weight: per-block weights \(group_size=4\) need "
                                         r"blocked DequantizeLinear, opset >= 21 \(opset=17\)"):
        ok.export_onnx(q, x, io.BytesIO(), opset=17)  # (no fallback warning: nothing written)
    with pytest.raises(TypeError, match="opset must be an int"):
        ok.export_onnx(q, x, io.BytesIO(), opset="21")
    # Below opset 21, 4-bit weights per channel export in an INT8 container (still exact).
    q, x = trained("linear", 4, "channel", (True, False), steps=1)
    proto = ok.export_onnx(q, x, io.BytesIO(), opset=17, target="qdq")
    types = {t.data_type for t in proto.graph.initializer if t.name.endswith("_quantized")}
    assert types == {onnx.TensorProto.INT8}
    converted = ok.convert_model(q)
    assert_matches_onnx(converted, x, proto, layers=3)
    wide = ok.quantize_model(nn.Sequential(nn.Linear(4, 4)), 12, first_last_bits=None).train()
    wide(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"0\.input_quantizer: 12-bit quantization needs INT16 "
                                         "QuantizeLinear, opset >= 21"):
        ok.export_onnx(wide.eval(), torch.randn(3, 4), io.BytesIO(), opset=17)


def test_deploy_demo_quick():
    """bench/deploy_digits.py --quick: QAT, convert, both exports, ONNX Runtime on the digits
    CNN."""
    pytest.importorskip("sklearn", reason="the demo's data ships with scikit-learn")
    bench = Path(__file__).resolve().parent.parent / "bench"
    done = subprocess.run([sys.executable, str(bench / "deploy_digits.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, cwd=bench.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Converted logits equal the QAT model's bit for bit: True" in done.stdout
    assert "| exported, integer kernels (ONNX Runtime" in done.stdout
    assert "| exported, QDQ (ONNX Runtime" in done.stdout
