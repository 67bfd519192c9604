"""QAT layer: quantized modules, model conversion, scale modes, calibration, BN re-estimation.

Expected values are computed with the ops / reference directly (what a quantized layer must
equal), never with the module under test.
"""

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ALL_BACKENDS, SCALE_RTOL, make_data, reference_scale
from torch import nn

import octav_kernels as ok
from octav_kernels import backend, reference

ROOT = Path(__file__).resolve().parents[1]


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 16, 32), nn.ReLU(), nn.Linear(32, 10))


def images(n=16, seed=1):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def trained_bn(model, seed=2):
    """Give the BatchNorms non-trivial running statistics."""
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(images(32, seed + i))
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The layers compute what the ops say


@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
@pytest.mark.parametrize("granularity", ["channel", "tensor", 4])
def test_quant_linear_forward_is_linear_of_fake_quantized_operands(granularity, backend_name):
    torch.manual_seed(0)
    layer = nn.Linear(16, 6)
    q = ok.QuantLinear.from_float(layer, bits=4, weight_granularity=granularity).train()
    x = torch.randn(5, 16)
    with backend.use_backend(backend_name):
        y = q(x)
    w = layer.weight.detach()
    if granularity == "channel":
        kw = {"dim": 0}
    elif granularity == "tensor":
        kw = {}
    else:
        kw = {"group_size": 4}
    s_w = reference_scale(w, 4, **kw)
    s_a = reference_scale(x, 4, signed=True)  # x has negative entries: a signed input grid
    wq = reference.fake_quantize(w, s_w, 4, dim=kw.get("dim"), group_size=kw.get("group_size"))
    xq = reference.fake_quantize(x, s_a, 4)
    torch.testing.assert_close(y, nn.functional.linear(xq, wq, layer.bias), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.weight_quantizer.scale, s_w, rtol=SCALE_RTOL[torch.float32],
                               atol=0)
    assert q.input_quantizer.signed is True


def test_quant_conv_blocks_run_over_flattened_channel_elements():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3)
    q = ok.QuantConv2d.from_float(conv, bits=3, weight_granularity=12, quantize_input=False)
    w = conv.weight.detach()
    expected = ok.fake_quantize(w.reshape(3, 36), ok.octav_scale(w.reshape(3, 36), 3,
                                                                 group_size=12),
                                3, group_size=12).reshape(w.shape)
    torch.testing.assert_close(q.quantized_weight(), expected, rtol=0, atol=0)
    assert q.weight_quantizer.scale.shape == (3, 3)
    with pytest.raises(ValueError, match="weight_granularity=5 must divide the 36"):
        ok.QuantConv2d.from_float(conv, weight_granularity=5)


def test_conv1d_and_unsigned_input_after_relu():
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 4, 5, padding=2)
    q = ok.QuantConv1d.from_float(conv, bits=4).train()
    x = torch.relu(torch.randn(2, 3, 20))
    y = q(x)
    assert q.input_quantizer.signed is False
    s_a = reference_scale(x, 4, signed=False)
    s_w = reference_scale(conv.weight.detach(), 4, dim=0)
    expected = nn.functional.conv1d(reference.fake_quantize(x, s_a, 4, signed=False),
                                    reference.fake_quantize(conv.weight.detach(), s_w, 4, dim=0),
                                    conv.bias, padding=2)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
@pytest.mark.parametrize("grad, w_est, a_est",
                         [("mph", "mad", "pwl"), ("mad", "mad", "mad"), ("pwl", "pwl", "pwl"),
                          ("ste", "ste", "ste")])
def test_gradients_follow_the_estimator_of_each_role(grad, w_est, a_est, backend_name):
    """dL/dw and dL/dx are SPEC §3's estimators applied to the gradient of the quantized
    operands; the scale gets none."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 8)
    q = ok.QuantLinear.from_float(layer, bits=2, grad=grad).train()  # 2 bits: many clipped
    x = (3 * torch.randn(6, 32)).requires_grad_()
    g = torch.randn(6, 8)
    with backend.use_backend(backend_name):
        q(x).backward(g)

    w = layer.weight.detach()
    s_w, s_a = q.weight_quantizer.scale, q.input_quantizer.scale
    wq = reference.fake_quantize(w, s_w, 2, dim=0).requires_grad_()
    xq = reference.fake_quantize(x.detach(), s_a, 2).requires_grad_()
    nn.functional.linear(xq, wq, layer.bias).backward(g)
    expected_w = reference.fake_quantize_backward(wq.grad, w, s_w, dim=0, grad=w_est)
    expected_x = reference.fake_quantize_backward(xq.grad, x.detach(), s_a, grad=a_est)
    torch.testing.assert_close(layer.weight.grad, expected_w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, expected_x, rtol=1e-6, atol=1e-7)
    clipped = w.abs() > s_w[:, None]
    assert clipped.any()  # the estimators differ only there: the test must exercise it
    if w_est == "pwl":
        assert (layer.weight.grad[clipped] == 0).all()
    assert not q.weight_quantizer.scale.requires_grad


# ---------------------------------------------------------------------------------------------
# Scale modes


def test_dynamic_mode_updates_every_training_step_with_warm_start_and_freezes_in_eval():
    qz = ok.Quantizer(4, dim=0).train()
    x1 = torch.randn(4, 64)
    qz(x1)
    torch.testing.assert_close(qz.scale, reference_scale(x1, 4, dim=0),
                               rtol=SCALE_RTOL[torch.float32], atol=0)
    x2 = 1.5 * torch.randn(4, 64)
    previous = qz.scale.clone()
    qz(x2)
    torch.testing.assert_close(qz.scale, reference_scale(x2, 4, dim=0, init=previous),
                               rtol=SCALE_RTOL[torch.float32], atol=0)
    frozen = qz.scale.clone()
    qz.eval()
    x3 = 10 * torch.randn(4, 64)
    y = qz(x3)
    assert torch.equal(qz.scale, frozen)
    assert torch.equal(y, ok.fake_quantize(x3, frozen, 4, dim=0))


def test_dynamic_every_k_steps():
    qz = ok.Quantizer(4, every=3).train()
    scales = []
    for i in range(7):
        qz(torch.randn(256, generator=torch.Generator().manual_seed(i)) * (i + 1))
        scales.append(qz.scale.item())
    # Recomputed on forwards 1, 4, 7 only.
    assert scales[0] == scales[1] == scales[2] != scales[3] == scales[4] == scales[5] != scales[6]


def test_static_mode_averages_per_batch_scales_then_freezes():
    model = ok.quantize_model(small_cnn(), bits=4, mode="static", first_last_bits=None)
    batches = [images(8, seed) for seed in range(3)]
    ok.calibrate_model(model, batches)
    act = model[3].input_quantizer  # input of the second conv: post-ReLU, unsigned
    assert act.signed is False
    # The second conv's input is the float output of conv1-BN-ReLU: calibration observes
    # float activations.
    float_model = ok.dequantize_model(model).eval()
    with torch.no_grad():
        expected = [reference_scale(float_model[:3](b), 4, signed=False) for b in batches]
    torch.testing.assert_close(act.scale, torch.stack(expected).mean(0),
                               rtol=SCALE_RTOL[torch.float32], atol=0)
    frozen = {n: q.scale.clone() for n, q in ok.quantizers(model)}
    model.train()
    model(images(8, 9)).sum().backward()
    for n, q in ok.quantizers(model):
        assert torch.equal(q.scale, frozen[n]), n


def test_static_reduce_max_and_every_calibrator():
    qz = ok.QuantAct(4, mode="static", calibrator="max", reduce="max")
    with torch.no_grad():
        qz.calibrating = True
        for k in (1.0, 3.0, 2.0):
            assert torch.equal(qz(torch.full((4,), k)), torch.full((4,), k))  # passes through
        qz.finish_calibration()
    assert qz.scale.item() == 3.0 and qz.signed is False
    # A quantizer off the forward path is reported; the others still get their scales.
    model = nn.Sequential(ok.QuantAct(4), ok.QuantAct(4))
    with pytest.raises(RuntimeError, match=r"saw no data .*: 1$"):
        ok.calibrate_model(model, [torch.ones(3)], forward=lambda m, b: m[0](b))
    assert model[0].scale.item() == 1.0 and not model[1].initialized
    assert not model[0].calibrating and not model[1].calibrating
    for spec in ("octav", "max", "percentile:99.9", "mse"):
        m = ok.quantize_model(small_cnn(), mode="static", calibrator=spec)
        ok.calibrate_model(m, [images(4)])
        assert all(q.initialized for _, q in ok.quantizers(m)), spec


def test_per_role_calibrators_override_calibrator():
    """weight_calibrator / act_calibrator replace ``calibrator`` for one role: after one
    calibration batch each scale is its role's rule applied to what that quantizer saw."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    x = make_data((32, 16), seed=9)
    model = ok.quantize_model(base, first_last_bits=None, mode="static",
                              calibrator="percentile:99", weight_calibrator="max")
    ok.calibrate_model(model, [x])
    hidden = torch.relu(base[0](x)).detach()
    for layer, inp, signed in ((model[0], x, True), (model[2], hidden, False)):
        assert isinstance(layer.weight_quantizer.calibrator, ok.MaxCalibrator)
        assert layer.input_quantizer.calibrator.percentile == 99.0
        torch.testing.assert_close(layer.weight_quantizer.scale,
                                   ok.max_scale(layer.weight.detach(), dim=0), rtol=0, atol=0)
        torch.testing.assert_close(layer.input_quantizer.scale,
                                   ok.percentile_scale(inp, 99.0, signed=signed),
                                   rtol=0, atol=0)
    cfg = ok.QuantConfig(act_calibrator="max")  # the other role keeps `calibrator`
    layer = ok.QuantLinear(16, 8, config=cfg)
    assert isinstance(layer.weight_quantizer.calibrator, ok.OctavCalibrator)
    assert isinstance(layer.input_quantizer.calibrator, ok.MaxCalibrator)
    for field in ("weight_calibrator", "act_calibrator"):
        with pytest.raises(ValueError, match=f"^{field}: calibrator must be one of"):
            ok.QuantConfig(**{field: "minmax"})
        with pytest.raises(TypeError, match=f"^{field}: calibrator must be a str or a"):
            ok.QuantConfig(**{field: 3})


def test_eval_without_scale_is_an_error_for_activations_not_weights():
    model = ok.quantize_model(small_cnn(), mode="static")
    with pytest.raises(RuntimeError, match=r"^0\.input_quantizer: no scale yet"):
        model.eval()(images())
    layer = ok.QuantLinear(8, 4, quantize_input=False).eval()
    layer(torch.randn(2, 8))  # the weight's scale comes from the weight itself
    torch.testing.assert_close(layer.weight_quantizer.scale,
                               reference_scale(layer.weight.detach(), 4, dim=0),
                               rtol=SCALE_RTOL[torch.float32], atol=0)


def test_nonfinite_input_raises_naming_the_module():
    model = ok.quantize_model(small_cnn())
    bad = images()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^0\.input_quantizer: a calibration batch contains"):
        ok.calibrate_model(model, [bad])
    assert not any(q.calibrating for _, q in ok.quantizers(model))
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^0\.input_quantizer: the input contains NaN or inf"):
        model.train()(bad)
    for calibrator in ("percentile", "max", "mse"):
        qz = ok.QuantAct(4, calibrator=calibrator).train()
        qz.name = "act"
        with pytest.raises(ValueError, match="^act: the input contains NaN or inf"):
            qz(torch.tensor([1.0, float("nan"), 2.0] + [0.5] * 100))


def test_nonfinite_check_without_a_host_sync_per_step(monkeypatch):
    """On a GPU (here: CPU tensors treated as a GPU's) the check records NaN/inf on the device
    and raises at the next check point: every check_every scale updates, the first forward in
    eval mode, or check_finite(model); a clean run never raises."""
    monkeypatch.setattr(ok.Quantizer, "deferred_check", ("cpu",))
    monkeypatch.setattr(ok.Quantizer, "check_every", 5)
    clean = make_data((64,), seed=12)
    bad = clean.clone()
    bad[3] = float("nan")

    def quantizer():
        qz = ok.QuantAct(4).train()
        qz.name = "act"
        return qz

    qz = quantizer()
    for _ in range(10):  # no NaN: two check points pass
        qz(clean)
    qz(bad)  # recorded, not raised
    for _ in range(2):
        qz(clean)
    with pytest.raises(ValueError, match="^act: the input of one of the last 5 scale updates "
                                         "contains NaN or inf"):
        for _ in range(2):
            qz(clean)  # the 5th update since the last check
    qz(clean)  # the flag was cleared by the raise

    qz = quantizer()
    qz(bad)
    qz.eval()
    with pytest.raises(ValueError, match="^act: the input of one of the last 1 scale updates"):
        qz(clean)

    model = ok.quantize_model(nn.Sequential(nn.Linear(64, 8)), first_last_bits=None)
    model.train()(bad)
    with pytest.raises(ValueError, match=r"^0\.input_quantizer: the input of one of the last"):
        ok.check_finite(model)
    ok.check_finite(model)  # checked: nothing pending


def test_deferred_record_catches_every_bad_value(monkeypatch):
    """The device record (largest |t|, or |log t| for a learned scale) turns NaN or inf for
    every bad value: -inf in a bfloat16 input, a learned scale of 0 or below; clean steps leave
    it finite."""
    monkeypatch.setattr(ok.Quantizer, "deferred_check", ("cpu",))
    act = ok.QuantAct(4, calibrator="max").train()
    act.name = "act"
    x = make_data((64,), seed=14).bfloat16()
    act(x)
    act.check_nonfinite()
    x[5] = -float("inf")
    act(x)
    with pytest.raises(ValueError, match="^act: the input of one of the last 1"):
        act.check_nonfinite()
    for bad in (0.0, -0.5, float("inf")):
        learned = ok.QuantAct(4, mode="learned").train()
        learned.name = "learned"
        learned(make_data((64,), seed=15))
        learned.check_nonfinite()
        with torch.no_grad():
            learned.scale.fill_(bad)
        learned.check_learned()  # recorded, not raised
        with pytest.raises(ValueError, match="^learned: the learned scale was not positive"):
            learned.check_nonfinite()


def test_nonfinite_check_sees_compiled_steps(monkeypatch):
    """Steps run under torch.compile record NaN/inf on the device without being counted;
    check_finite(model) and the first eval forward still read the flag and raise (issue 29)."""
    monkeypatch.setattr(ok.Quantizer, "deferred_check", ("cpu",))
    bad = make_data((64,), seed=12)
    bad[3] = float("nan")
    for learned in (False, True):
        qz = ok.QuantAct(4, signed=True, mode="learned" if learned else "dynamic").train()
        qz.name = "act"
        if learned:
            qz(make_data((64,), seed=13))  # eager: the scale starts finite
            qz.check_nonfinite()
            with torch.no_grad():
                qz.scale.fill_(float("nan"))  # the optimizer drove it there
        compiled = torch.compile(qz, backend="eager")
        compiled(bad)
        compiled(bad)
        assert qz._unchecked == 0  # not counted under compile
        match = ("^act: the learned scale was not positive and finite at a recent training "
                 "step" if learned else
                 "^act: the input of a recent scale update contains NaN or inf")
        with pytest.raises(ValueError, match=match):
            ok.check_finite(nn.Sequential(qz))
        ok.check_finite(nn.Sequential(qz))  # read and cleared
        if not learned:
            compiled(bad)
            qz.eval()
            with pytest.raises(ValueError, match=match):
                qz(bad)
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Scale policies, calibrators' fused path, the grid and the export to deploy


def test_policy_objects_equal_their_keyword_spellings():
    x = make_data((6, 20), seed=3)
    for kwargs, policy in [
            (dict(every=2), ok.qat.DynamicScale(every=2)),
            (dict(mode="learned", calibrator="max", grad_scale=False),
             ok.qat.LearnedScale("max", grad_scale=False)),
            (dict(mode="static", reduce="max"), ok.qat.StaticScale(reduce="max"))]:
        by_name = ok.Quantizer(4, dim=0, **kwargs)
        by_policy = ok.Quantizer(4, dim=0, policy=policy)
        assert by_policy.mode == by_name.mode == policy.mode
        assert repr(by_policy) == repr(by_name)
        for name in ("every", "reduce", "process_group", "grad_scale", "calibrator"):
            assert repr(getattr(by_policy, name)) == repr(getattr(by_name, name)), name
        if policy.mode == "static":
            for q in (by_name, by_policy):
                q.start_calibration()
                q(x)
                q(x * 2)
                q.finish_calibration()
            torch.testing.assert_close(by_policy.scale, ok.octav_scale(x * 2, 4, dim=0),
                                       rtol=0, atol=0)
        for q in (by_name, by_policy):
            q.train()(x)
        torch.testing.assert_close(by_policy.scale, by_name.scale, rtol=0, atol=0)
        assert (type(by_policy.scale) is nn.Parameter) == (policy.mode == "learned")


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="static", every=2), "every=2 applies to mode='dynamic'"),
    (dict(mode="learned", every=3), "every=3 applies to mode='dynamic'"),
    (dict(grad_scale=False), "grad_scale and scale_shape apply to mode='learned'"),
    (dict(mode="static", scale_shape=(4,)), "grad_scale and scale_shape apply to mode='learned'"),
    (dict(policy=ok.qat.StaticScale(), mode="static"), "give either policy or its fields"),
    (dict(policy=ok.qat.DynamicScale(), calibrator="max"), "give either policy or its fields"),
    (dict(calibrator="percentile", process_group="world"),
     "process_group works with the 'octav' and 'max' calibrators"),
    (dict(calibrator="octav:refine", process_group="world"), "refined OCTAV scale is not"),
    (dict(reduce="median"), "reduce must be one of"),
])
def test_policy_field_misuse_is_an_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ok.Quantizer(4, **kwargs)
    config_fields = {k: v for k, v in kwargs.items() if k in ("mode", "every", "grad_scale")}
    if set(config_fields) - {"mode"}:  # QuantConfig holds the same rule (weight_mode too)
        with pytest.raises(ValueError, match=match):
            ok.QuantConfig(**config_fields)
        ok.QuantConfig(**config_fields, weight_mode="learned" if "grad_scale" in kwargs
                       else "dynamic")
    with pytest.raises(TypeError, match="policy must be a ScalePolicy, got str"):
        ok.Quantizer(4, policy="dynamic")


class HalfMax(ok.Calibrator):
    """A calibrator without a fused op: half the largest magnitude."""

    def __call__(self, x, bits, *, signed=True, dim=None, group_size=None, narrow=False,
                 init=None):
        return ok.max_scale(x, signed=signed, dim=dim, group_size=group_size) / 2


@pytest.mark.parametrize("calibrator", ["octav", "octav:refine", "max", HalfMax()])
def test_calibrator_quantize_is_its_scale_then_fake_quantize(calibrator):
    """The dynamic training step (``Calibrator.quantize``; fused for default OCTAV) gives the
    rule's scale and the fake-quant with it, and gradients reach x by the estimator."""
    cal = ok.make_calibrator(calibrator)
    x = make_data((4, 32), seed=4).requires_grad_()
    init = ok.max_scale(x.detach(), dim=0) / 3
    y, s = cal.quantize(x, 3, dim=0, grad="pwl", init=init)
    expected_s = cal(x.detach(), 3, dim=0, init=init)
    torch.testing.assert_close(s, expected_s, rtol=0, atol=0)
    torch.testing.assert_close(y, ok.fake_quantize(x.detach(), expected_s, 3, dim=0),
                               rtol=0, atol=0)
    y.sum().backward()
    inside = x.detach().abs() <= expected_s[:, None]
    torch.testing.assert_close(x.grad, inside.float(), rtol=0, atol=0)


@pytest.mark.parametrize("bits, signed, narrow, gran", [
    (4, True, False, {}), (3, True, True, {"dim": 1}), (5, False, False, {"group_size": 4}),
    (8, True, False, {"dim": 0}), (2, False, False, {})])
def test_grid_levels_times_step_is_the_fake_quant(bits, signed, narrow, gran):
    """``Grid`` (the grid deploy stores) against the op: ``level * step`` equals
    ``fake_quantize`` bit for bit, levels are integers in lo..hi, 0 where s == 0."""
    x = make_data((6, 16), seed=bits)
    x = x if signed else x.abs()
    grid = ok.qat.Grid(bits, signed, narrow, gran.get("dim"), gran.get("group_size"))
    s = ok.octav_scale(x, bits, signed=signed, narrow=narrow, **gran)
    s = s.clone().reshape(-1)
    s[0] = 0.0  # a zero scale quantizes its group to 0
    s = s.reshape(ok.octav_scale(x, bits, signed=signed, **gran).shape)
    levels = grid.integer_levels(x, s)
    _, lo, hi = grid.levels
    assert levels.shape == x.shape and levels.dtype == torch.float32
    assert bool((levels == levels.round()).all()) and lo <= levels.min() <= levels.max() <= hi
    fq = ok.fake_quantize(x, s, bits, signed=signed, narrow=narrow, **gran)
    torch.testing.assert_close(grid.dequantize(levels, grid.step(s)), fq, rtol=0, atol=0)


def test_export_hands_deploy_the_grid_scale_and_frozen_levels():
    q = ok.Quantizer(4, dim=0, init_from_input=True)
    w = make_data((5, 12), seed=6)
    with pytest.raises(ValueError, match="^Quantizer: no scale yet; calibrate the model"):
        q.export()
    unkept = q.export(w)  # init_from_input: from the input, as eval would, not kept
    assert not q.initialized
    torch.testing.assert_close(unkept.scale, ok.octav_scale(w, 4, dim=0), rtol=0, atol=0)
    assert unkept.grid == ok.qat.Grid(4, True, False, 0, None) and unkept.frozen is None
    q.train()(w)
    q.track_oscillations()
    q.freeze_threshold = 1e-9
    q(w)
    q(w + 0.3 * q.scale[:, None] / 7 * torch.sign(torch.randn(5, 12)))  # some levels flip
    q(w)
    export = q.export()
    assert export.frozen is not None and bool(export.frozen.any())
    levels = export.levels(w)
    expected = torch.where(q.osc_frozen, q.osc_last_int.float(),
                           export.grid.integer_levels(w, q.scale))
    torch.testing.assert_close(levels, expected, rtol=0, atol=0)
    q.eval()
    torch.testing.assert_close(export.grid.dequantize(levels, export.grid.step(export.scale)),
                               q(w), rtol=0, atol=0)
    act = ok.QuantAct(4)
    act.set_scale(torch.tensor(1.0))
    with pytest.raises(ValueError, match="QuantAct: the input grid .signed=None. is decided"):
        act.export()
    act.signed = True
    act.set_scale(torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="QuantAct: its scale is not finite"):
        act.export()


# ---------------------------------------------------------------------------------------------
# Model conversion


def test_quantize_model_keeps_function_at_8_bits():
    """At 8 bits the quantized model stays within quantization error of the float model:
    per-channel/per-tensor 8-bit steps are ~max/128, an SQNR near 40 dB per quantizer (~1%
    relative RMS error); four layers with two quantizers each compound to a few %. 4 bits
    (~16x the step) must be clearly worse, so the bound is not vacuous."""
    base = trained_bn(small_cnn())
    x = images(64, seed=7)
    with torch.no_grad():
        ref = base(x)
        errors = {}
        for bits in (8, 4):
            q = ok.quantize_model(base, bits=bits, first_last_bits=None)
            ok.calibrate_model(q, [x])
            errors[bits] = ((q(x) - ref).norm() / ref.norm()).item()
    assert errors[8] < 0.05
    assert errors[4] > 4 * errors[8]


def test_quantize_model_layers_bits_devices_dtypes_and_original_untouched():
    base = small_cnn().to(torch.float64)
    snapshot = copy.deepcopy(base.state_dict())
    q = ok.quantize_model(base, bits=3, act_bits=5)
    kinds = [type(m).__name__ for m in q]
    assert kinds[0] == "QuantConv2d" and kinds[3] == "QuantConv2d"
    assert kinds[8] == "QuantLinear" and kinds[10] == "QuantLinear"
    assert q[0].weight_quantizer.bits == 8 and q[0].input_quantizer.bits == 8   # first
    assert q[10].weight_quantizer.bits == 8 and q[10].input_quantizer.bits == 8  # last
    assert q[3].weight_quantizer.bits == 3 and q[3].input_quantizer.bits == 5
    assert q[3].weight.dtype == torch.float64
    assert q[3].weight_quantizer.scale.dtype == torch.float32
    assert q[3].weight_quantizer.name == "3.weight_quantizer"
    for k, v in base.state_dict().items():
        assert torch.equal(v, snapshot[k]), k  # deep copy: the float model is untouched
    assert all(type(m) is not ok.QuantConv2d for m in base)
    q.train()(images().double()).sum().backward()


def test_inplace_conversion_shares_parameters_so_the_optimizer_keeps_working():
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    conv_weight = model[3].weight
    out = ok.quantize_model(model, inplace=True)
    assert out is model and model[3].weight is conv_weight
    before = conv_weight.detach().clone()
    model.train()(images()).sum().backward()
    opt.step()
    assert not torch.equal(conv_weight, before)


def test_skip_unsupported_and_strict():
    model = nn.Sequential(nn.Linear(4, 4), nn.Embedding(3, 4), nn.LSTM(4, 4),
                          nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.LayerNorm(4),
                          nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"left in float: 1 \(Embedding\), 2 \(LSTM\)$"):
        q = ok.quantize_model(model)
    with pytest.raises(ValueError, match=r"left in float: 1 \(Embedding\), 2 \(LSTM\)"):
        ok.quantize_model(model, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = ok.quantize_model(model, skip=["3", nn.Embedding, nn.LSTM])
    assert type(q[3][0]) is nn.Linear and type(q[3][1]) is nn.Linear
    assert type(q[0]) is ok.QuantLinear and type(q[5]) is ok.QuantLinear
    # First / last are decided over the whole model, before skipping.
    assert q[0].weight_quantizer.bits == 8 and q[5].weight_quantizer.bits == 8
    mha = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match=r"0 \(MultiheadAttention\)"):
        q = ok.quantize_model(mha)
    assert type(q[0].out_proj) is not ok.QuantLinear  # driven by MHA's forward: left alone


def test_dequantize_model_round_trip():
    base = small_cnn()
    q = ok.quantize_model(base, inplace=False)
    back = ok.dequantize_model(q)
    assert [type(m) for m in back] == [type(m) for m in base]
    x = images()
    torch.testing.assert_close(back.eval()(x), base.eval()(x), rtol=0, atol=0)
    seq = nn.Sequential(nn.Linear(4, 4), ok.QuantAct(4))
    assert type(ok.dequantize_model(seq)[1]) is nn.Identity


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(mode="sometimes"), ValueError, "mode must be one of"),
    (dict(grad="lsq"), ValueError, "grad must be one of"),
    (dict(weight_granularity="row"), ValueError, "weight_granularity must be"),
    (dict(every=0), ValueError, "every must be >= 1"),
    (dict(calibrator="minmax"), ValueError, "calibrator must be one of"),
    (dict(bits=1), ValueError, "bits must be in 2..16"),
    (dict(skip=[3]), TypeError, "skip entries"),
    (dict(weight_mode="never"), ValueError, "mode must be one of"),
])
def test_quantize_model_argument_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ok.quantize_model(small_cnn(), **kwargs)


def test_quantize_model_rejects_non_modules_and_quantized_models():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        ok.quantize_model("resnet")
    with pytest.raises(ValueError, match="already quantized"):
        ok.quantize_model(ok.quantize_model(small_cnn()))
    # standalone quantizers placed by hand stay, and are not "already quantized"
    model = ok.quantize_model(nn.Sequential(nn.Linear(4, 4), ok.QuantAct(8), nn.Linear(4, 2)))
    assert isinstance(model[1], ok.QuantAct) and isinstance(model[2], ok.QuantLinear)
    with pytest.raises(ValueError, match="narrow=True applies to signed grids only"):
        ok.Quantizer(4, signed=False, narrow=True)


# ---------------------------------------------------------------------------------------------
# Buffers: state_dict, dtype casts, torch.compile


def test_state_dict_round_trip_restores_scales_and_signedness():
    with pytest.raises(ValueError, match="^0: weight_granularity=8 must divide the 9"):
        ok.quantize_model(small_cnn(), weight_granularity=8)
    model = ok.quantize_model(small_cnn(), weight_granularity=8, skip=["0"])
    model.train()(images())
    model.eval()
    state = model.state_dict()
    fresh = ok.quantize_model(small_cnn(seed=5), weight_granularity=8, skip=["0"])
    fresh.load_state_dict(state)
    for (name, a), (_, b) in zip(ok.quantizers(model), ok.quantizers(fresh)):
        assert torch.equal(a.scale, b.scale) and a.signed == b.signed, name
    x = images(seed=3)
    assert torch.equal(fresh.eval()(x), model(x))


def test_scales_stay_float32_when_the_model_is_cast():
    model = ok.quantize_model(small_cnn())
    model.train()(images())
    scales = {n: q.scale.clone() for n, q in ok.quantizers(model)}
    model.to(torch.bfloat16)
    for n, q in ok.quantizers(model):
        assert q.scale.dtype == torch.float32 and torch.equal(q.scale, scales[n]), n
    out = model.eval()(images().bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_torch_compile_of_a_quantized_model():
    torch._dynamo.reset()
    model = ok.quantize_model(small_cnn())
    model.train()(images())  # resolve signedness and scales eagerly
    model.eval()
    x = images(seed=4)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    # A dynamic training step under compile: the same output, gradients and scale updates.
    # (One layer: through several layers, inductor's re-associated float arithmetic may move
    # an activation across a rounding boundary, which changes later values by a whole step.)
    layer = ok.quantize_model(nn.Sequential(nn.Linear(16, 8)), first_last_bits=None,
                              act_signed=True)
    for _, qz in ok.quantizers(layer):
        qz.check_finite = False  # the finiteness check is a host sync (a graph break)
    eager, comp = copy.deepcopy(layer).train(), copy.deepcopy(layer).train()
    step = torch.compile(comp, fullgraph=True)
    for seed in range(3):  # cold start, then warm starts from the updated buffers
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.testing.assert_close(step(xc), eager(xe), rtol=1e-6, atol=1e-6)
        step(xc).sum().backward()
        eager(xe).sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-6, atol=1e-6)
        for (n, a), (_, b) in zip(ok.quantizers(eager), ok.quantizers(comp)):
            assert torch.equal(b.scale, a.scale), n
    torch.testing.assert_close(comp[0].weight.grad, eager[0].weight.grad, rtol=1e-6, atol=1e-6)
    auto = torch.compile(ok.QuantAct(4), fullgraph=True)
    with pytest.raises(Exception, match="needs one eager forward before torch.compile"):
        auto(torch.randn(8))


# ---------------------------------------------------------------------------------------------
# BatchNorm re-estimation


def test_reestimate_batchnorm_averages_batch_statistics_with_frozen_quantizers():
    model = ok.quantize_model(trained_bn(small_cnn()))
    model.train()(images(32))
    model.eval()
    bn = model[1]
    bn.momentum = 0.3
    batches = [images(16, seed) for seed in range(4)]
    frozen = {n: q.scale.clone() for n, q in ok.quantizers(model)}
    means, variances = [], []
    with torch.no_grad():
        for b in batches:
            h = model[0](b)  # BN input: conv of the quantized input with the quantized weight
            means.append(h.mean((0, 2, 3)))
            variances.append(h.var((0, 2, 3), unbiased=True))
    assert ok.reestimate_batchnorm(model, batches + [images(16, 99)], num_batches=4) == 2
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(bn.running_var, torch.stack(variances).mean(0), rtol=1e-5,
                               atol=1e-6)
    assert bn.momentum == 0.3 and not bn.training and not model.training
    for n, q in ok.quantizers(model):
        assert torch.equal(q.scale, frozen[n]), n
    with pytest.raises(ValueError, match="batches is empty"):
        ok.reestimate_batchnorm(model, [])


# ---------------------------------------------------------------------------------------------
# The demo script runs (its full run writes bench/results/cpu_qat_digits.md)


def test_qat_demo_quick_run():
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn's bundled digits")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "bench")}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "qat_digits.py"), "--quick"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| (d) OCTAV + MPH |" in out.stdout and "| (f) MSE-sweep PTQ |" in out.stdout


# ------------------------------------------------------- input importance (SPEC §2.1, §9)


def test_importance_is_an_ema_in_training_and_weights_the_weight_scale():
    torch.manual_seed(3)
    layer = ok.QuantLinear(12, 5, weight_importance="input", importance_momentum=0.25,
                           quantize_input=False).train()
    xs = [torch.randn(7, 3, 12) * torch.linspace(0.1, 4.0, 12) for _ in range(3)]
    h = None
    for x in xs:
        y = layer(x)
        batch = x.double().square().mean((0, 1))
        h = batch if h is None else 0.75 * h + 0.25 * batch
        # The weight's scale is weighted OCTAV with the importance kept after this batch.
        want = reference_scale(layer.weight.detach(), 4, dim=0,
                               importance=layer.input_importance)
        torch.testing.assert_close(layer.weight_quantizer.scale, want,
                                   rtol=SCALE_RTOL[torch.float32], atol=0.0)
        wq = ok.fake_quantize(layer.weight.detach(), layer.weight_quantizer.scale, 4, dim=0)
        torch.testing.assert_close(y, nn.functional.linear(x, wq, layer.bias))
    torch.testing.assert_close(layer.input_importance, h.float(), rtol=1e-5, atol=0.0)
    assert int(layer.importance_batches) == 3
    # Not a copy of the unweighted rule: the importance is far from uniform.
    assert not torch.equal(layer.weight_quantizer.scale,
                           ok.octav_scale(layer.weight.detach(), 4, dim=0))
    layer.eval()
    layer(xs[0])
    assert int(layer.importance_batches) == 3  # eval keeps it


def test_importance_is_the_mean_in_calibration_and_round_trips_state_dict():
    torch.manual_seed(4)
    model = ok.quantize_model(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)),
                              weight_importance="input", mode="static",
                              calibrator="octav:refine", first_last_bits=None)
    model[0].input_importance.fill_(7.0)  # as if trained: calibration replaces what it kept
    model[0].importance_batches.fill_(5)
    batches = [torch.randn(5, 8) * (i + 1) for i in range(3)]
    ok.calibrate_model(model, batches)
    want = torch.stack([b.square().mean(0) for b in batches]).mean(0)
    torch.testing.assert_close(model[0].input_importance, want, rtol=1e-5, atol=0.0)
    # Static weights: refined weighted OCTAV with the calibration's mean importance.
    w = model[0].weight.detach()
    with ok.use_backend("reference"):
        start = ok.octav_scale(w, 4, dim=0, importance=model[0].input_importance)
        refined = ok.refine_scale(w, start, 4, dim=0, importance=model[0].input_importance)
    torch.testing.assert_close(model[0].weight_quantizer.scale, refined, rtol=1e-5, atol=0.0)
    state = model.state_dict()
    assert {"0.input_importance", "0.importance_batches", "2.input_importance"} <= set(state)
    fresh = ok.quantize_model(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)),
                              weight_importance="input", mode="static",
                              calibrator="octav:refine", first_last_bits=None)
    fresh.load_state_dict(state)
    assert torch.equal(fresh[0].input_importance, model[0].input_importance)
    x = torch.randn(2, 8)
    assert torch.equal(fresh.eval()(x), model.eval()(x))
    converted = ok.convert_model(model)
    assert not any("importance" in k for k in converted.state_dict())
    assert torch.equal(converted(x), model(x))


def test_learned_scales_start_from_weighted_octav():
    torch.manual_seed(5)
    layer = ok.QuantLinear(16, 4, weight_importance="input", mode="learned",
                           quantize_input=False).train()
    x = torch.randn(9, 16) * torch.linspace(0.05, 3.0, 16)
    layer(x)
    want = reference_scale(layer.weight.detach(), 4, dim=0, importance=layer.input_importance)
    torch.testing.assert_close(layer.weight_quantizer.scale.detach(), want,
                               rtol=SCALE_RTOL[torch.float32], atol=0.0)


@pytest.mark.parametrize("groups,granularity", [(1, "channel"), (2, "channel"), (1, 9),
                                                (2, 9)])
def test_conv_importance_per_input_channel(groups, granularity):
    """A convolution's importance is per input channel, broadcast over the kernel positions
    (and, with groups, over the output channels of each group)."""
    torch.manual_seed(6)
    conv = ok.QuantConv2d(4, 6, 3, groups=groups, weight_importance="input",
                          weight_granularity=granularity, quantize_input=False).train()
    x = torch.randn(2, 4, 7, 7) * torch.tensor([0.1, 1.0, 2.0, 4.0]).view(1, 4, 1, 1)
    conv(x)
    h = x.square().mean((0, 2, 3))
    torch.testing.assert_close(conv.input_importance, h, rtol=1e-5, atol=0.0)
    w = conv.weight.detach()
    per_group = 4 // groups
    full = torch.stack([h[(o // (6 // groups)) * per_group:][:per_group] for o in range(6)])
    full = full.view(6, per_group, 1, 1).expand_as(w)
    view = (w.reshape(6, -1), full.reshape(6, -1)) if granularity == 9 else (w, full)
    gran = {"group_size": 9} if granularity == 9 else {"dim": 0}
    want = reference_scale(view[0], 4, importance=view[1].contiguous(), **gran)
    torch.testing.assert_close(conv.weight_quantizer.scale, want,
                               rtol=SCALE_RTOL[torch.float32], atol=0.0)


def test_importance_config_errors():
    with pytest.raises(ValueError, match="weight_importance must be one of"):
        ok.QuantConfig(weight_importance="output")
    with pytest.raises(ValueError, match="importance_momentum"):
        ok.QuantConfig(importance_momentum=0.0)
    layer = ok.QuantLinear(4, 2, weight_importance="input").train()
    with pytest.raises((ValueError, RuntimeError)):
        layer(torch.randn(3, 5))
    plain = ok.QuantLinear(4, 2)
    assert not hasattr(plain, "input_importance")
    assert plain.weight_importance() is None
