"""Learned scales (LSQ, Esser et al. 2020) on SPEC §1's grid: the scale's gradient against a hand
derivation, parity of every backend with the reference, the op's registration and compile, and
the QAT layer's learned mode (initialization, training, state_dict, oscillation tracking,
convert_model, bad values).

Tolerance of the scale's gradient: every backend forms the same float64 terms
``grad * (n - v)`` (``n - v`` exact in float32, the product exact in float64) and differs only
in the order of the float64 sum of N terms: within N * 2**-53 * sum|terms| (times the
coefficient), plus the final rounding to float32 (2**-24 relative). grad_x is the estimator's,
bit for bit (the fake_quantize_backward kernels' operations).
"""

import math

import numpy as np
import pytest
import torch
from conftest import (
    ALL_BACKENDS,
    BACKEND_DTYPES,
    GRANULARITIES,
    GRIDS,
    KERNEL_BACKENDS,
    MATRIX_SHAPE,
    assert_bitwise,
    make_data,
    reference_scale,
)
from torch import nn

import octav_kernels as ok
from octav_kernels import _args, reference, use_backend


def lsq_grads(name, x, scale, bits, grad_out, **kw):
    """(x.grad, scale.grad) of ``(fake_quantize_lsq(x, scale) * grad_out).sum()``, served by
    backend ``name``."""
    xl = x.detach().clone().requires_grad_()
    sl = scale.detach().clone().requires_grad_()
    with use_backend(name):
        y = ok.fake_quantize_lsq(xl, sl, bits, **kw)
        y.backward(grad_out)
    return xl.grad, sl.grad


def assert_scale_grad_close(got, expected, x, scale, bits, grad_out, **kw):
    """Within the order of a float64 sum (module docstring), group by group."""
    dim, group_size = kw.get("dim"), kw.get("group_size")
    g = ok._args.groups(x, dim, group_size)
    n = g.outer * g.inner
    # sum|terms| per group: |grad| * |n - v or n| <= |grad| * (|x| / step + 1)
    L = ok._args.levels(bits, kw.get("signed", True), kw.get("narrow", False))[0]
    step = reference.grid_step(scale, x, g.dim, g.group_size, L).double()
    bound_terms = grad_out.double().abs() * ((x.double().abs() / step).nan_to_num(0) + L)
    rows = _args.as_rows(bound_terms, g.dim, g.group_size).sum(1).reshape(scale.shape)
    coefficient = ok._args.lsq_coefficient(n, bits, kw.get("signed", True),
                                           kw.get("narrow", False), True)
    tol = n * 2.0**-53 * rows * coefficient + expected.double().abs() * 2.0**-23
    assert got.dtype == expected.dtype == torch.float32 and got.shape == expected.shape
    assert bool(((got.double() - expected.double()).abs() <= tol + 1e-45).all()), (got, expected)


# ----------------------------------------------------------------------- by hand


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_scale_gradient_by_hand(name):
    """3-bit signed (L = 4, levels -4..3), s = 2 (step 0.5): x = 0.3 (v = 0.6, n = 1: inside,
    n - v), -1.1 (v = -2.2, n = -2), 2.0 (v = 4 > 3: above, hi), -3.0 (v = -6 < -4: below, lo),
    0 (inside, 0)."""
    x = torch.tensor([0.3, -1.1, 2.0, -3.0, 0.0])
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    f32 = np.float32
    v = [f32(f32(0.3) / f32(0.5)), f32(f32(-1.1) / f32(0.5))]
    d = [f32(f32(1) - v[0]), f32(f32(-2) - v[1]), 3.0, -4.0, 0.0]
    total = sum(float(gi) * float(di) for gi, di in zip(g.tolist(), d))
    for grad_scale, factor in ((True, 1 / math.sqrt(5 * 3)), (False, 1.0)):
        gx, gs = lsq_grads(name, x, torch.tensor(2.0), 3, g, grad="ste", grad_scale=grad_scale)
        assert float(gs) == pytest.approx(total * factor / 4, rel=1e-6)
        assert torch.equal(gx, g)  # STE passes the gradient to x


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_unsigned_narrow_and_groups_by_hand(name):
    """Unsigned 2 bits (L = 4, levels 0..3), s = 1: x < 0 is below (lo = 0: no gradient);
    narrow 3 bits (L = 3, levels -3..3); per channel and per block each group has its own sum
    and its own N in 1 / sqrt(N hi)."""
    x = torch.tensor([[-0.5, 0.1, 0.9, 2.0], [0.4, 0.26, -3.0, 0.0]])
    g = torch.ones(2, 4)
    f32 = np.float32

    def d(xv, step, lo, hi):
        v = f32(f32(xv) / f32(step))
        n = min(max(float(np.round(v)), lo), hi)
        return float(f32(f32(n) - v)) if lo <= v <= hi else n

    # unsigned, per tensor: step = 1/4
    expected = sum(d(v, 0.25, 0, 3) for v in x.reshape(-1).tolist()) / 4 / math.sqrt(8 * 3)
    _, gs = lsq_grads(name, x, torch.tensor(1.0), 2, g, signed=False, grad="pwl")
    assert float(gs) == pytest.approx(expected, rel=1e-6)
    # narrow signed, per channel: steps 1/3 and 0.5/3, N = 4, hi = 3
    scale = torch.tensor([1.0, 0.5])
    _, gs = lsq_grads(name, x, scale, 3, g, dim=0, narrow=True)
    for row, s, got in zip(x.tolist(), scale.tolist(), gs.tolist()):
        step = float(f32(f32(s) / f32(3)))
        want = sum(d(v, step, -3, 3) for v in row) / 3 / math.sqrt(4 * 3)
        assert got == pytest.approx(want, rel=1e-6)
    # per block of 2: 4 groups of N = 2
    scale = torch.tensor([[1.0, 2.0], [1.0, 0.5]])
    _, gs = lsq_grads(name, x, scale, 3, g, group_size=2)
    for k, got in enumerate(gs.reshape(-1).tolist()):
        step = float(f32(f32(scale.reshape(-1)[k]) / f32(4)))
        block = x.reshape(-1, 2)[k].tolist()
        want = sum(d(v, step, -4, 3) for v in block) / 4 / math.sqrt(2 * 3)
        assert got == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------- parity matrix


@pytest.mark.parametrize("bits,grad", [(2, "mad"), (3, "mad"), (8, "mad"), (4, "pwl"),
                                       (4, "ste")])
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("name,dtype", BACKEND_DTYPES)
def test_lsq_backward_parity(name, dtype, gran, grid, bits, grad):
    signed, narrow = grid
    x = make_data(MATRIX_SHAPE, dtype, signed, seed=bits + 7)
    scale = reference_scale(x, bits, signed=signed, narrow=narrow, **gran) * 0.8
    g = make_data(MATRIX_SHAPE, dtype, seed=9, zeros=0.0)
    kw = dict(signed=signed, narrow=narrow, grad=grad, **gran)
    gx, gs = lsq_grads(name, x, scale, bits, g, **kw)
    dim = gran.get("dim")
    dim = None if dim is None else dim % x.dim()
    ex, es = reference.fake_quantize_lsq_backward(g, x, scale, bits, signed, dim,
                                                  gran.get("group_size"), grad, narrow)
    assert_bitwise(gx, ex)
    assert_scale_grad_close(gs, es, x, scale, bits, g, **kw)
    with use_backend(name):  # the forward is fake_quantize's, bit for bit
        y = ok.fake_quantize_lsq(x, scale, bits, **kw)
    assert_bitwise(y, reference.fake_quantize(x, scale, bits, signed, dim,
                                              gran.get("group_size"), grad, narrow))


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
@pytest.mark.parametrize("gran", [{"group_size": 4}, {"group_size": 32}, {"dim": 1}, {"dim": 0}],
                         ids=["g4", "g32", "strided", "rows"])
def test_many_short_groups_and_strided_groups(name, gran):
    """The kernels' shapes for small and strided groups (issue 29): thousands of groups of 4 and
    32 (Triton: 256 and 128 groups to a program, a partial last one; CUDA: a warp per group),
    per channel along dim 1 of [300, 64] (inner 1: CUDA's thread-per-group kernel) and 300
    rows of 64: grad_x bit for bit, grad_scale within float64-sum rounding."""
    x = make_data((300, 64), seed=21)
    g = make_data((300, 64), seed=22)
    frozen = torch.zeros(300, 64, dtype=torch.bool)
    scale = ok.max_scale(x, **gran) / 2
    want_x, want_s = reference.fake_quantize_lsq_backward(g, x, scale, 3, True, gran.get("dim"),
                                                          gran.get("group_size"))
    got_x, got_s = lsq_grads(name, x, scale, 3, g, **gran)
    assert_bitwise(got_x, want_x)
    assert_scale_grad_close(got_s, want_s, x, scale, 3, g, **gran)
    frozen[::7, ::3] = True  # and with frozen elements
    with use_backend(name):
        got_x, got_s = torch.ops.octav.fake_quantize_lsq_backward(
            g, x, scale, 3, True, gran.get("dim"), gran.get("group_size"), "mad", False, True,
            frozen)
    want_x, want_s = reference.fake_quantize_lsq_backward(g, x, scale, 3, True, gran.get("dim"),
                                                          gran.get("group_size"), frozen=frozen)
    assert_bitwise(got_x, want_x)
    assert_scale_grad_close(got_s, want_s, x, scale, 3, g, **gran)


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_frozen_elements_and_special_groups(name):
    """Frozen elements get no gradient and do not steer the scale; a group with scale 0 gets
    0; NaN in a group makes its scale gradient NaN."""
    x = make_data((4, 64), seed=3)
    x[2, 5] = float("nan")
    scale = x.nan_to_num(0).abs().amax(1) * 0.7
    scale[1] = 0.0
    g = make_data((4, 64), seed=4, zeros=0.0)
    frozen = torch.rand(4, 64, generator=torch.Generator().manual_seed(5)) < 0.3
    frozen = frozen.to(x.device)
    with use_backend(name):
        gx, gs = torch.ops.octav.fake_quantize_lsq_backward(g, x, scale, 4, True, 0, None,
                                                            "mad", False, True, frozen)
    ex, es = reference.fake_quantize_lsq_backward(g, x, scale, 4, True, 0, None, "mad", False,
                                                  True, frozen)
    assert_bitwise(gx, ex)
    assert bool((gx[frozen] == 0).all())
    assert float(gs[1]) == 0.0 and math.isnan(float(gs[2]))
    keep = torch.tensor([0, 3], device=x.device)
    assert_scale_grad_close(gs[keep], es[keep], x[keep], scale[keep], 4, g[keep], dim=0)


def test_errors():
    x = torch.randn(4, 6)
    with pytest.raises(TypeError, match="grad_scale must be a bool"):
        ok.fake_quantize_lsq(x, torch.tensor(1.0), 4, grad_scale=1)
    with pytest.raises(ValueError, match="grad must be one of"):
        ok.fake_quantize_lsq(x, torch.tensor(1.0), 4, grad="mph")
    with pytest.raises(ValueError, match=r"scale must have shape \[4\]"):
        ok.fake_quantize_lsq(x, torch.ones(6), 4, dim=0)
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.octav.fake_quantize_lsq_backward(torch.ones(3), x, torch.tensor(1.0), 4)


def test_torch_compile_matches_eager():
    w = make_data((16, 32), seed=6)
    g = make_data((16, 32), seed=7)
    s0 = reference_scale(w, 4, dim=0)

    def step(w, s):
        return ok.fake_quantize_lsq(w, s, 4, dim=0, grad="mad")

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        wl, sl = w.clone().requires_grad_(), s0.clone().requires_grad_()
        y = fn(wl, sl)
        y.backward(g)
        results.append((y.detach(), wl.grad, sl.grad))
    for eager, comp in zip(*results):
        assert_bitwise(comp, eager)


# ----------------------------------------------------------------------- the QAT layer


def toy_problem(seed=0):
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(256, 16)
    return teacher, x, teacher(x).detach()


def test_learned_scales_train_and_reduce_the_loss():
    """3-bit learned scales (OCTAV init) fine-tuned with the weights: the loss goes down, and
    the scales move (they get gradients)."""
    teacher, x, y = toy_problem()
    model = ok.quantize_model(teacher, 3, first_last_bits=None, mode="learned")
    scales = [p for n, p in model.named_parameters() if n.endswith("scale")]
    assert len(scales) == 4  # two weights (per channel), two inputs (per tensor): before training
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses, start = [], None
    for _ in range(60):
        loss = nn.functional.mse_loss(model(x), y)
        if start is None:  # the calibrator's scales, set by the first forward
            start = [p.detach().clone() for p in scales]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]
    assert all(s.grad is not None and bool(s.grad.abs().sum() > 0) for s in scales)
    assert all(not torch.equal(a, p.detach()) for a, p in zip(start, scales))


def test_learned_mode_initializes_by_the_calibrator_and_round_trips():
    teacher, x, _ = toy_problem(1)
    model = ok.quantize_model(teacher, 4, first_last_bits=None, mode="learned")
    wq = model[0].weight_quantizer
    assert isinstance(wq.scale, nn.Parameter) and not wq.initialized
    model(x)  # the first training forward: OCTAV scales
    torch.testing.assert_close(wq.scale.detach(), reference_scale(model[0].weight.detach(), 4,
                                                                  dim=0), rtol=1e-5, atol=0)
    state = model.state_dict()
    other = ok.quantize_model(toy_problem(2)[0], 4, first_last_bits=None, mode="learned")
    other.load_state_dict(state)
    assert other[0].weight_quantizer.initialized
    model.eval()
    other.eval()
    with torch.no_grad():
        assert_bitwise(other(x), model(x))
        converted = ok.convert_model(model)
        assert_bitwise(converted(x), model(x))
    param = wq.scale
    model.half().float()
    assert wq.scale is param and wq.scale.dtype == torch.float32  # the optimizer's Parameter


def test_learned_scales_with_oscillation_tracking_and_bad_values():
    teacher, x, y = toy_problem(3)
    model = ok.quantize_model(teacher, 3, first_last_bits=None, mode="learned")
    control = ok.OscillationControl(model, freeze=0.02, dampening=1e-3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(5):
        loss = nn.functional.mse_loss(model(x), y) + control.dampening_loss()
        optimizer.zero_grad()
        loss.backward()
        assert model[0].weight_quantizer.scale.grad is not None  # LSQ through the tracked op
        optimizer.step()
        control.step()
    with torch.no_grad():
        model[2].input_quantizer.scale.fill_(-1.0)
    model[2].input_quantizer.name = "act"
    with pytest.raises(ValueError, match="^act: the learned scale is not positive and finite"):
        model(x)


def test_qat_lm_benchmark_quick():
    """bench/qat_lm.py --quick: the LM benchmark end to end (its full run writes
    bench/results/cpu_qat_lm.md)."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench"
    done = subprocess.run([sys.executable, str(bench / "qat_lm.py"), "--quick"],
                          capture_output=True, text=True, timeout=900, cwd=bench.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("| PTQ OCTAV + refine |", "| LSQ, OCTAV init |", "| max + STE |"):
        assert row in done.stdout
    assert "gives the QAT model's bits per byte exactly" in done.stdout
    assert "NO" not in done.stdout.split("exactly:")[-1]
