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
"""

import io
import math
import subprocess
import sys
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


def run_onnx(proto, x):
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


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
    q, x = trained(kind, bits, gran, grid, frozen=bits <= 4)
    with torch.no_grad():
        expected = q(x)
    converted = ok.convert_model(q)
    with torch.no_grad():
        assert_bitwise(converted(x), expected)
    layers = sum(isinstance(m, ok.deploy.quantized._QuantizedLayer)
                 for m in converted.modules())
    proto = ok.export_onnx(converted, x, io.BytesIO())
    assert_matches_onnx(converted, x, proto, layers)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == layers  # one Q/DQ pair per quantized input
    types = {t.name: t.data_type for t in proto.graph.initializer if t.name.endswith("_quantized")}
    expected_type = onnx.TensorProto.INT4 if bits <= 4 else onnx.TensorProto.INT8
    assert len(types) == layers and set(types.values()) == {expected_type}
    for t in proto.graph.initializer:  # compact storage: one byte per int8 level, raw
        if t.name.endswith("_quantized") and t.data_type == onnx.TensorProto.INT8:
            assert len(t.raw_data) == math.prod(t.dims) and len(t.int32_data) == 0, t.name


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

    class Block(nn.Module):
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

    torch.manual_seed(2)
    x = torch.randn(2, 16, 32)
    q = ok.quantize_model(Block(), 4, first_last_bits=8).train()
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
        ok.export_onnx(q, x, io.BytesIO(), opset=17)
    with pytest.raises(TypeError, match="opset must be an int"):
        ok.export_onnx(q, x, io.BytesIO(), opset="21")
    # Below opset 21, 4-bit weights per channel export in an INT8 container (still exact).
    q, x = trained("linear", 4, "channel", (True, False), steps=1)
    proto = ok.export_onnx(q, x, io.BytesIO(), opset=17)
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
    """bench/deploy_digits.py --quick: QAT, convert, export, ONNX Runtime on the digits CNN."""
    pytest.importorskip("sklearn", reason="the demo's data ships with scikit-learn")
    bench = Path(__file__).resolve().parent.parent / "bench"
    done = subprocess.run([sys.executable, str(bench / "deploy_digits.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, cwd=bench.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Converted logits equal the QAT model's bit for bit: True" in done.stdout
    assert "| exported QDQ graph (ONNX Runtime" in done.stdout
