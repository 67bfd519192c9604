"""Oscillation tracking, freezing and dampening (octav_kernels.oscillation): bitwise parity of
every kernel backend with the reference over multi-step sequences, the reference against
sequences derived by hand, the frozen-gradient backward, the dampening loss, the schedules, the
module state and torch.compile."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    ALL_BACKENDS,
    BACKEND_DTYPES,
    GRANULARITIES,
    GRIDS,
    MATRIX_SHAPE,
    assert_bitwise,
    make_data,
    on_device,
    reference_scale,
)
from torch import nn

import octav_kernels as ok
from octav_kernels import reference, use_backend

ROOT = Path(__file__).resolve().parent.parent
# Largest bit width whose levels fit the int8 state, per grid.
TRACKED_BITS = {True: 8, False: 7}


def _dim(gran, x):
    dim = gran.get("dim")
    return None if dim is None else dim % x.dim()


def run_sequence(name, dtype, gran, grid, bits, steps=10):
    """``steps`` tracked steps on backend ``name``: weights that jitter around their start (so
    levels flip back and forth), a scale that drifts, freezing on from step 4, one NaN entry and
    (per group) an all-zero scale group; momentum 0.01, so ``1 - m`` is inexact in float32 and
    its rounding must agree. Returns the outputs and the final state."""
    signed, narrow = grid
    x = make_data(MATRIX_SHAPE, dtype, signed, seed=bits)
    scale = reference_scale(x, bits, signed=signed, narrow=narrow, **gran)
    if scale.dim() > 0:
        scale = scale.clone()
        scale.reshape(-1)[1] = 0.0
    state = ok.OscillationState.start(x, scale, bits, signed=signed, narrow=narrow, **gran)
    gen = torch.Generator().manual_seed(bits + 100)
    outputs = []
    with use_backend(name):
        for t in range(steps):
            noise = on_device(torch.randn(MATRIX_SHAPE, generator=gen) * 0.3 * (-1) ** t)
            w = (x.float() * (1 + noise)).to(dtype)
            w.reshape(-1)[7] = float("nan")
            s = scale * (1.0 + 0.02 * ((t % 3) - 1))
            outputs.append(ok.fake_quantize_tracked(
                w, s, bits, state, signed=signed, narrow=narrow, momentum=0.01,
                freeze_threshold=0.015 if t >= 4 else 0.0, **gran))
    return outputs, state


@pytest.mark.parametrize("bits_of", ["low", "high"])
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("name,dtype", BACKEND_DTYPES)
def test_tracked_parity(name, dtype, gran, grid, bits_of):
    """Outputs and all five state tensors equal the reference's bit for bit at every step (the
    kernels round the EMAs exactly as the reference: float32, no FMA)."""
    bits = 2 if bits_of == "low" else TRACKED_BITS[grid[0]]
    expected, expected_state = run_sequence("reference", dtype, gran, grid, bits)
    got, got_state = run_sequence(name, dtype, gran, grid, bits)
    for y, e in zip(got, expected):
        assert_bitwise(y, e)
    for g, e in zip(got_state.tensors(), expected_state.tensors()):
        assert_bitwise(g, e)
    if bits == 2:  # the sequence exercises what it should
        assert expected_state.frozen.any() and not expected_state.frozen.all()
        assert (expected_state.osc_freq > 0).any()


@pytest.mark.parametrize("grad", ["ste", "pwl", "mad"])
@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("name,dtype", BACKEND_DTYPES)
def test_frozen_backward_parity(name, dtype, gran, grad):
    x = make_data(MATRIX_SHAPE, dtype, seed=41)
    scale = reference_scale(x, 3, **gran) * 0.7
    g = make_data(MATRIX_SHAPE, dtype, seed=42, zeros=0.0)
    state = ok.OscillationState.start(x, scale, 3, **gran)
    state.frozen.copy_(make_data(MATRIX_SHAPE, seed=43) > 0.3)
    leaf = x.detach().clone().requires_grad_()
    with use_backend(name):
        ok.fake_quantize_tracked(leaf, scale, 3, state, grad=grad, update=False,
                                 **gran).backward(g)
    plain = reference.fake_quantize_backward(g, x, scale, True, _dim(gran, x),
                                             gran.get("group_size"), grad)
    expected = torch.where(state.frozen, torch.zeros((), dtype=x.dtype), plain)
    assert_bitwise(leaf.grad, expected)
    assert (leaf.grad[state.frozen] == 0).all()


# ----------------------------------------------------------------------------- by hand


def track(values, scale, state, **kw):
    """One tracked step of a 1-D weight per value list (3-bit signed: levels -4..3)."""
    x = on_device(torch.tensor(values, dtype=torch.float32))
    return ok.fake_quantize_tracked(x, on_device(torch.tensor(scale)), 3, state, **kw)


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_counts_direction_reversals(name):
    """3-bit signed with s = 4: step 1, so x = 0.2, 1.2, 0.2, 1.2, 2.2, 1.2 are levels
    0, 1, 0, 1, 2, 1: reversals at steps 2, 3 and 5. With momentum 1/2 (exact in binary):
    freq 0, 1/2, 3/4, 3/8, 11/16 and int_ema (from 0) 1/2, 1/4, 5/8, 21/16, 37/32."""
    x0 = on_device(torch.tensor([0.2]))
    state = ok.OscillationState.start(x0, on_device(torch.tensor(4.0)), 3)
    freqs, emas, dirs = [], [], []
    with use_backend(name):
        for v in (1.2, 0.2, 1.2, 2.2, 1.2):
            y = track([v], 4.0, state, momentum=0.5)
            assert float(y) == round(v)
            freqs.append(float(state.osc_freq))
            emas.append(float(state.int_ema))
            dirs.append(int(state.last_dir))
    assert freqs == [0.0, 0.5, 0.75, 0.375, 0.6875]
    assert emas == [0.5, 0.25, 0.625, 1.3125, 1.15625]
    assert dirs == [1, -1, 1, 1, -1]
    assert int(state.last_int) == 1 and not bool(state.frozen)


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_freezes_at_rounded_ema_and_stays(name):
    """The sequence above with threshold 0.7: step 3 (freq 3/4) freezes the weight at
    round(5/8) = 1; later steps leave the state alone, output level 1 on the current grid and
    pass no gradient."""
    state = ok.OscillationState.start(on_device(torch.tensor([0.2])),
                                      on_device(torch.tensor(4.0)), 3)
    with use_backend(name):
        for v in (1.2, 0.2):
            track([v], 4.0, state, momentum=0.5, freeze_threshold=0.7)
        assert not bool(state.frozen)
        assert float(track([1.2], 4.0, state, momentum=0.5, freeze_threshold=0.7)) == 1.0
        assert bool(state.frozen) and int(state.last_int) == 1
        before = [t.clone() for t in state.tensors()]
        w = on_device(torch.tensor([-3.7])).requires_grad_()
        y = ok.fake_quantize_tracked(w, on_device(torch.tensor(8.0)), 3, state, momentum=0.5,
                                     freeze_threshold=0.7)
        y.sum().backward()
    assert float(y) == 2.0  # level 1 at step 8 / 4
    assert float(w.grad) == 0.0
    for b, a in zip(before, state.tensors()):
        assert torch.equal(b, a)


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_scale_changes_compare_levels(name):
    """Levels are compared as they are: a scale that only shrinks moves levels one way (no
    oscillation); a scale that goes back and forth makes the levels reverse, which counts."""
    x = [0.9, -2.6, 1.4, 0.0]
    for scales, oscillates in (([4.0, 3.5, 3.0, 2.5, 2.0], False),
                               ([4.0, 3.0, 4.0, 3.0, 4.0], True)):
        state = ok.OscillationState.start(on_device(torch.tensor(x)),
                                          on_device(torch.tensor(scales[0])), 3)
        with use_backend(name):
            for s in scales[1:]:
                track(x, s, state, momentum=0.5)
        assert bool((state.osc_freq > 0).any()) == oscillates
        assert float(state.osc_freq[3]) == 0.0  # a zero stays at level 0


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_no_update_nan_and_zero_scale(name):
    state = ok.OscillationState.start(on_device(torch.tensor([0.2, 0.2])),
                                      on_device(torch.tensor(4.0)), 3)
    x = on_device(torch.tensor([1.2, 0.2]))
    before = [t.clone() for t in state.tensors()]
    with use_backend(name):
        ok.fake_quantize_tracked(x, on_device(torch.tensor(4.0)), 3, state, update=False)
        for b, a in zip(before, state.tensors()):
            assert torch.equal(b, a)  # update=False leaves the state alone
        y = track([float("nan"), 1.2], 4.0, state, momentum=0.5)
        assert math.isnan(float(y[0])) and float(y[1]) == 1.0
        assert int(state.last_int[0]) == 0 and float(state.int_ema[0]) == 0.0  # NaN: untouched
        assert int(state.last_int[1]) == 1
        y = track([2.0, -3.0], 0.0, state, momentum=0.5)  # all-zero group: level 0, q = 0
        assert torch.equal(y, on_device(torch.zeros(2)))
        assert int(state.last_dir[1]) == -1


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_subnormal_scale_is_a_zero_step(name):
    """A scale so small that s / L underflows to 0 quantizes like s == 0 (q = 0, level 0, never
    NaN), in fake_quantize and in the tracked op alike."""
    x = on_device(torch.tensor([0.0, 1e-45, -3.0, 2.0]))
    s = on_device(torch.tensor(1e-45))  # the smallest subnormal: s / 4 == 0
    state = ok.OscillationState.start(x, s, 3)
    with use_backend(name):
        y = ok.fake_quantize(x, s, 3)
        tracked = ok.fake_quantize_tracked(x, s, 3, state, momentum=0.5)
    assert torch.equal(y, torch.zeros_like(x)) and torch.equal(tracked, torch.zeros_like(x))
    assert torch.equal(state.last_int, torch.zeros_like(state.last_int))
    with use_backend(name):  # dampening: the range is [0, 0], so no error and no gradient
        err = torch.ops.octav.dampening_error(x, s, 3)
        grad = torch.ops.octav.dampening_backward(torch.ones_like(x), x, s, 3)
    assert torch.equal(err, torch.zeros_like(x)) and torch.equal(grad, torch.zeros_like(x))


def test_two_forwards_before_backward():
    """A weight used twice in one step (a shared layer): each backward masks with the frozen set
    its own forward left, and the second forward does not invalidate the first's."""
    w0 = make_data((4, 8), seed=48)
    s = reference_scale(w0, 2, dim=0)
    state = ok.OscillationState.start(w0, s, 2, dim=0)
    w = w0.clone().requires_grad_()
    first = ok.fake_quantize_tracked(w * 1.5, s, 2, state, dim=0, momentum=1.0)
    frozen_after_first = state.frozen.clone()
    second = ok.fake_quantize_tracked(w / 1.5, s, 2, state, dim=0, momentum=1.0,
                                      freeze_threshold=0.5)
    assert state.frozen.any() and not frozen_after_first.any()
    (first.sum() + second.sum()).backward()
    expected = (reference.fake_quantize_backward(torch.ones_like(w0), w0 * 1.5, s, True, 0, None,
                                                 "mad") * 1.5
                + torch.where(state.frozen, 0.0, reference.fake_quantize_backward(
                    torch.ones_like(w0), w0 / 1.5, s, True, 0, None, "mad")) / 1.5)
    torch.testing.assert_close(w.grad, expected)


def test_inputs_not_modified():
    x = make_data((6, 10), seed=44)
    scale = reference_scale(x, 3, dim=0)
    state = ok.OscillationState.start(x, scale, 3, dim=0)
    copies = x.clone(), scale.clone()
    ok.fake_quantize_tracked(x, scale, 3, state, dim=0)
    assert torch.equal(x, copies[0]) and torch.equal(scale, copies[1])


def test_bad_arguments():
    x = make_data((4, 8), seed=45)
    s = reference_scale(x, 3)
    state = ok.OscillationState.start(x, s, 3)
    with pytest.raises(ValueError, match="int8"):
        ok.OscillationState.start(x, s, 9)
    with pytest.raises(ValueError, match="int8"):
        ok.fake_quantize_tracked(x.abs(), s, 8, state, signed=False)
    with pytest.raises(TypeError, match="state"):
        ok.fake_quantize_tracked(x, s, 3, state.tensors())
    with pytest.raises(ValueError, match="momentum"):
        ok.fake_quantize_tracked(x, s, 3, state, momentum=0.0)
    with pytest.raises(ValueError, match="freeze_threshold"):
        ok.fake_quantize_tracked(x, s, 3, state, freeze_threshold=float("nan"))
    bad = ok.OscillationState(*state.tensors())
    bad.osc_freq = state.osc_freq.double()
    with pytest.raises(TypeError, match="osc_freq"):
        ok.fake_quantize_tracked(x, s, 3, bad)
    bad = ok.OscillationState(*state.tensors())
    bad.last_int = state.last_int[:2]
    with pytest.raises(ValueError, match="last_int"):
        ok.fake_quantize_tracked(x, s, 3, bad)
    bad = ok.OscillationState(*state.tensors())
    bad.frozen = torch.zeros(8, 4, dtype=torch.bool).t()
    with pytest.raises(ValueError, match="contiguous"):
        ok.fake_quantize_tracked(x, s, 3, bad)
    with pytest.raises(ValueError, match="frozen"):
        torch.ops.octav.fake_quantize_backward(x, x, s, frozen=state.frozen[:1])
    bad = ok.OscillationState(*state.tensors())
    bad.last_dir = state.last_int  # the same memory twice
    with pytest.raises(ValueError, match="share memory"):
        ok.fake_quantize_tracked(x, s, 3, bad)


# ----------------------------------------------------------------------------- dampening


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("name,dtype", BACKEND_DTYPES)
def test_dampening_parity(name, dtype, gran, grid):
    """The per-element dampening term and its gradient equal the reference bit for bit (float32
    operations, each rounded once), with clipped values, a NaN, frozen entries and (per group)
    a zero scale."""
    signed, narrow = grid
    w = make_data(MATRIX_SHAPE, dtype, signed, seed=49)
    scale = reference_scale(w, 3, signed=signed, narrow=narrow, **gran) * 0.7
    if scale.dim() > 0:
        scale.reshape(-1)[1] = 0.0
    w.reshape(-1)[5] = float("nan")
    frozen = make_data(MATRIX_SHAPE, seed=50) > 0.8
    g = make_data(MATRIX_SHAPE, seed=51, zeros=0.0)
    args = (3, signed, gran.get("dim"), gran.get("group_size"), narrow, frozen)
    results = []
    for backend_name in ("reference", name):
        with use_backend(backend_name):
            results.append((torch.ops.octav.dampening_error(w, scale, *args),
                            torch.ops.octav.dampening_backward(g, w, scale, *args)))
    for got, expected in zip(results[1], results[0]):
        assert_bitwise(got, expected)
    assert results[0][0].dtype == torch.float32 and results[0][1].dtype == dtype


def test_dampening_loss_values_and_gradient():
    """3-bit signed, s = 4 (step 1, range [-4, 3]): w = 0.3 -> q 0, clip 0.3, error 0.09;
    -1.6 -> q -2, error 0.16; 5.0 -> q 3, clip 3, error 0; 2.5 -> q 2 (half to even), error
    0.25. Gradient 2 (clip(w) - q) inside the range, 0 outside."""
    w = torch.tensor([[0.3, -1.6], [5.0, 2.5]], requires_grad=True)
    s = torch.tensor(4.0)
    errors = torch.tensor([[0.3**2, 0.4**2], [0.0, 0.5**2]])
    for reduction, expected in (("sum", errors.sum()), ("mean", errors.mean()),
                                ("kernel_mean", errors.sum(1).mean())):
        loss = ok.dampening_loss(w, s, 3, reduction=reduction)
        torch.testing.assert_close(loss, expected)
    w.grad = None
    ok.dampening_loss(w, s, 3).backward()
    torch.testing.assert_close(w.grad, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    frozen = torch.tensor([[True, False], [False, False]])
    torch.testing.assert_close(ok.dampening_loss(w, s, 3, frozen=frozen), errors.sum() - 0.09)
    with pytest.raises(ValueError, match="reduction"):
        ok.dampening_loss(w, s, 3, reduction="max")
    empty = torch.zeros(0, 4)
    assert float(ok.dampening_loss(empty, torch.zeros(0), 3, dim=0,
                                   reduction="kernel_mean")) == 0.0


def test_dampening_per_channel_uses_each_scale():
    w = make_data((4, 16), seed=46)
    s = reference_scale(w, 3, dim=0)
    step = (s / 4).unsqueeze(1)
    q = torch.clamp(torch.round(w / step), -4, 3) * step
    clip = torch.maximum(torch.minimum(w, 3 * step), -4 * step)
    torch.testing.assert_close(ok.dampening_loss(w, s, 3, dim=0), (q - clip).square().sum())


# ----------------------------------------------------------------------------- schedules


def test_ramp():
    cosine = ok.Ramp(0.04, 0.01, start_step=10, end_step=30)
    assert cosine(0) == 0.0 and cosine(9) == 0.0  # off before the start
    assert cosine(10) == pytest.approx(0.04) and cosine(20) == pytest.approx(0.025)
    assert cosine(30) == pytest.approx(0.01) and cosine(1000) == pytest.approx(0.01)
    assert cosine(15) == pytest.approx(0.01 + 0.03 * (1 + math.cos(math.pi / 4)) / 2)
    linear = ok.Ramp(0.0, 1.0, end_step=4, kind="linear")
    assert [linear(t) for t in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert ok.Ramp(0.5, kind="constant", start_step=2)(1) == 0.0
    with pytest.raises(ValueError, match="end_step"):
        ok.Ramp(0.1, 0.2)
    with pytest.raises(ValueError, match="kind"):
        ok.Ramp(0.1, 0.2, end_step=3, kind="step")
    with pytest.raises(ValueError, match="after"):
        ok.Ramp(0.1, 0.2, start_step=5, end_step=5)
    with pytest.raises(TypeError, match="start_step"):
        ok.Ramp(0.1, 0.2, start_step=1.5, end_step=5)
    with pytest.raises(TypeError, match="start"):
        ok.Ramp(None, kind="constant")


# ----------------------------------------------------------------------------- modules


def small_model(bits=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    return ok.quantize_model(model, bits=bits, first_last_bits=None)


def train_steps(model, control, steps, lr=0.5):
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        x = torch.randn(8, 2, 6, 6, generator=gen)
        target = torch.randint(0, 5, (8,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), target) + control.dampening_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        control.step()


def test_control_tracks_freezes_and_dampens():
    model = small_model()
    control = ok.OscillationControl(model, momentum=0.1, freeze=ok.Ramp(0.05, kind="constant",
                                                                        start_step=5),
                                    dampening=1e-3)
    linear = model[3]
    assert linear.weight_quantizer.freeze_threshold == 0.0  # before start_step
    train_steps(model, control, 30)
    assert control.steps == 30
    assert linear.weight_quantizer.freeze_threshold == pytest.approx(0.05)  # float32
    fractions = control.frozen_fraction()
    assert set(fractions) == {"0.weight_quantizer", "3.weight_quantizer"}
    assert 0.0 < fractions["3.weight_quantizer"] < 1.0
    q = linear.weight_quantizer
    assert bool((q.osc_freq > 0.01).any())
    expected = ((q.osc_freq > 0.01) & ~q.osc_frozen).float().mean()  # frozen ones not counted
    assert control.oscillating_fraction()["3.weight_quantizer"] == float(expected)
    assert float(control.dampening_loss()) > 0.0
    # Frozen weights: fixed level, no gradient, and eval applies them without updating.
    frozen, level = q.osc_frozen.clone(), q.osc_last_int.clone()
    state = [t.clone() for t in (q.osc_last_int, q.osc_freq, q.osc_int_ema)]
    model.eval()
    wq = linear.quantized_weight().detach()
    step = (q.scale / 4).unsqueeze(1).expand_as(wq)
    assert torch.equal(wq[frozen], (level.float() * step)[frozen])
    for before, after in zip(state, (q.osc_last_int, q.osc_freq, q.osc_int_ema)):
        assert torch.equal(before, after)
    model.train()
    linear.weight.grad = None
    model(torch.randn(2, 2, 6, 6)).sum().backward()
    assert (linear.weight.grad[frozen] == 0).all()
    assert torch.equal(q.osc_frozen[frozen], frozen[frozen])  # frozen stays frozen


def test_untracked_checkpoint_and_channels_last():
    """A checkpoint saved before tracking loads strictly into a tracked model (the state
    restarts at the next forward); channels_last keeps the state contiguous."""
    saved = small_model().state_dict()
    model = small_model()
    control = ok.OscillationControl(model, freeze=0.05)
    train_steps(model, control, 3)
    model.load_state_dict(saved)
    q = model[0].weight_quantizer
    assert q.osc_last_int.numel() == 0
    model.to(memory_format=torch.channels_last)
    train_steps(model, control, 3)
    assert q.osc_last_int.shape == model[0].weight.shape and q.osc_last_int.is_contiguous()
    model.to(memory_format=torch.channels_last)
    assert all(getattr(q, n).is_contiguous() for n in ("osc_last_int", "osc_frozen", "osc_freq"))
    train_steps(model, control, 1)


def test_dampening_then_another_forward_before_backward():
    """The loss keeps copies of the scale and frozen set it used: a forward after it (which
    updates both in place) does not break its backward."""
    model = small_model()
    control = ok.OscillationControl(model, freeze=0.05, dampening=0.1)
    train_steps(model, control, 2)
    x = torch.randn(4, 2, 6, 6)
    loss = model(x).sum() + control.dampening_loss()
    loss = loss + model(x * 2).sum()
    loss.backward()
    assert model[3].weight.grad is not None


def test_write_frozen_weights():
    model = small_model()
    control = ok.OscillationControl(model, momentum=0.1, freeze=0.05)
    train_steps(model, control, 20)
    q, w = model[3].weight_quantizer, model[3].weight
    n = control.write_frozen_weights()
    assert n == sum(int(x.weight_quantizer.osc_frozen.sum()) for x in control.layers) and n > 0
    step = (q.scale / 4).unsqueeze(1).expand_as(w)
    assert torch.equal(w.detach()[q.osc_frozen], (q.osc_last_int.float() * step)[q.osc_frozen])
    # Quantizing the written weights again gives the frozen levels without any mask.
    levels = reference.integer_levels(w.detach(), q.scale, 3, dim=0)
    assert torch.equal(levels[q.osc_frozen], q.osc_last_int[q.osc_frozen])


def test_state_dict_round_trip_and_casts():
    model = small_model()
    control = ok.OscillationControl(model, momentum=0.2, freeze=0.05)
    train_steps(model, control, 12)
    saved = model.state_dict()
    assert saved["3.weight_quantizer.osc_last_int"].dtype == torch.int8
    fresh = small_model()  # no tracking yet: loading turns it on with the saved momentum
    fresh.load_state_dict(saved)
    q = fresh[3].weight_quantizer
    assert q.tracking and q.momentum == 0.2
    for key, value in saved.items():
        if "osc_" in key:
            assert torch.equal(fresh.state_dict()[key], value), key
    fresh.half()
    assert q.osc_freq.dtype == torch.float32 and q.osc_int_ema.dtype == torch.float32
    assert q.osc_last_int.dtype == torch.int8 and q.scale.dtype == torch.float32
    assert q.osc_threshold.dtype == torch.float32
    wq = fresh[3].quantized_weight()  # a tracked training step on the half weight
    assert wq.dtype == torch.float16 and q.osc_freq.dtype == torch.float32
    control.load_state_dict(control.state_dict())
    assert control.steps == 12


def test_control_errors_and_wide_layers():
    with pytest.raises(ValueError, match="quantized layers"):
        ok.OscillationControl(nn.Sequential(nn.Linear(2, 2)))
    with pytest.warns(UserWarning, match="not tracked"), pytest.raises(ValueError, match="8-bit"):
        ok.OscillationControl(small_model(bits=16))
    torch.manual_seed(0)  # 8-bit first and last layers around a 16-bit one: that one is skipped
    model = ok.quantize_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)),
                              bits=16, first_last_bits=8)
    with pytest.warns(UserWarning, match="1.weight_quantizer"):
        control = ok.OscillationControl(model)
    assert [q.name for q in control.quantizers] == ["0.weight_quantizer", "2.weight_quantizer"]
    with pytest.raises(TypeError, match="freeze"):
        ok.OscillationControl(small_model(), freeze="high")
    q = ok.Quantizer(3, signed=None)
    with pytest.raises(ValueError, match="signed"):
        q.track_oscillations()


def test_threshold_schedule_does_not_recompile():
    """The threshold is a tensor a schedule updates in place: one compiled graph serves every
    step of a compiled model, whatever the threshold."""
    from torch._dynamo.testing import CompileCounter

    model = small_model()
    for _, q in ok.quantizers(model):
        q.check_finite = False
    control = ok.OscillationControl(model, freeze=ok.Ramp(0.05, 0.01, end_step=10))
    x = torch.randn(4, 2, 6, 6)
    model(x)  # eager first step: the input grids (signed=None) and the state start
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    thresholds = []
    for _ in range(4):
        compiled(x).sum().backward()
        control.step()
        thresholds.append(model[3].weight_quantizer.freeze_threshold)
    assert len(set(thresholds)) == 4 and counter.frame_count == 1


def test_torch_compile_fullgraph_matches_eager():
    """Compiled (the state update functionalized and written back) and eager agree bit for bit:
    outputs, gradients and the state after 3 steps."""
    def step(w, scale, state):
        y = ok.fake_quantize_tracked(w, scale, 2, state, dim=0, momentum=0.25,
                                     freeze_threshold=0.3)
        return y * 2.0

    w0 = make_data((8, 16), seed=47)
    scale = reference_scale(w0, 2, dim=0)
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        state = ok.OscillationState.start(w0, scale, 2, dim=0)
        outs = []
        for t in range(3):
            w = (w0 * (1 + 0.3 * (-1) ** t)).requires_grad_()
            y = fn(w, scale, state)
            y.sum().backward()
            outs += [y.detach(), w.grad]
        results.append(outs + list(state.tensors()))
    for eager, comp in zip(*results):
        assert_bitwise(comp, eager)


# ----------------------------------------------------------------------------- bench scripts


def _bench(script, *args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "bench")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if line.startswith("| ")]


def test_bench_oscillation_quick():
    rows = _bench("bench_oscillation.py", "--quick")
    data = [r for r in rows if r.startswith("| 16x8x3x3 |")]
    assert len(data) == 2  # fp32, bf16
    for row in data:
        assert row.rstrip().endswith("x |") and "n/a" not in row


def test_qat_oscillation_demo_quick():
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn's bundled digits")
    rows = _bench("qat_oscillations.py", "--quick")
    names = [r.split("|")[1].strip() for r in rows[1:]]  # rows[0]: the header
    assert names == ["no tracking", "no treatment (tracking only)", "dampening", "freezing",
                     "dampening + freezing"]
    # Tracking alone changes nothing the model computes: the same accuracy as no tracking.
    assert rows[1].split("|")[3:5] == rows[2].split("|")[3:5]
