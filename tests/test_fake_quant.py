"""fake_quantize (forward and STE / PWL / MAD backward) and octav_fake_quantize: bitwise parity of
every kernel backend with the reference, and the reference against values derived by hand."""

import pytest
import torch
from conftest import (
    ALL_BACKENDS,
    BACKEND_DTYPES,
    BITS,
    GRANULARITIES,
    GRIDS,
    MATRIX_SHAPE,
    assert_bitwise,
    assert_scale_close,
    make_data,
    reference_scale,
)

import octav_kernels as ok
from octav_kernels import reference, use_backend

GRADS = ["ste", "pwl", "mad"]


def grad_through(name, fn, x, grad_out):
    """x.grad of ``(fn(x) * grad_out).sum()`` with backend ``name`` serving forward and backward."""
    leaf = x.detach().clone().requires_grad_()
    with use_backend(name):
        out = fn(leaf)
        y = out[0] if isinstance(out, tuple) else out
        y.backward(grad_out)
    return leaf.grad


# ----------------------------------------------------------------------------- parity matrix


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("name,dtype", BACKEND_DTYPES)
def test_fake_quantize_parity(name, dtype, gran, grid, bits):
    signed, narrow = grid
    x = make_data(MATRIX_SHAPE, dtype, signed, seed=bits)
    # 0.7 x the OCTAV scale: plenty of clipped values as well as values on the grid.
    scale = reference_scale(x, bits, signed=signed, narrow=narrow, **gran) * 0.7
    kw = dict(signed=signed, narrow=narrow, **gran)
    with use_backend("reference"):
        expected = ok.fake_quantize(x, scale, bits, **kw)
    with use_backend(name):
        got = ok.fake_quantize(x, scale, bits, **kw)
    assert_bitwise(got, expected)


@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("name,dtype", BACKEND_DTYPES)
def test_fake_quantize_backward_parity(name, dtype, gran, signed, grad):
    x = make_data(MATRIX_SHAPE, dtype, signed, seed=21)
    scale = reference_scale(x, 4, signed=signed, **gran) * 0.7
    g = make_data(MATRIX_SHAPE, dtype, seed=22, zeros=0.0)
    got = grad_through(name, lambda t: ok.fake_quantize(t, scale, 4, signed=signed, grad=grad,
                                                        **gran), x, g)
    dim = gran.get("dim")
    expected = reference.fake_quantize_backward(
        g, x, scale, signed, None if dim is None else dim % x.dim(), gran.get("group_size"), grad)
    assert_bitwise(got, expected)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("name,dtype", BACKEND_DTYPES)
def test_octav_fake_quantize_parity(name, dtype, gran, grid, bits):
    signed, narrow = grid
    x = make_data(MATRIX_SHAPE, dtype, signed, seed=bits + 1)
    kw = dict(signed=signed, narrow=narrow, **gran)
    with use_backend(name):
        y, scale = ok.octav_fake_quantize(x, bits, **kw)
    assert_scale_close(scale, reference_scale(x, bits, **kw), dtype)
    assert not scale.requires_grad
    # y is the reference quantizer at the backend's own scale, bit for bit.
    with use_backend("reference"):
        assert_bitwise(y, ok.fake_quantize(x, scale, bits, **kw))


@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("name,dtype", BACKEND_DTYPES)
def test_octav_fake_quantize_backward_parity(name, dtype, grad):
    x = make_data((9, 31), dtype, seed=23)
    g = make_data((9, 31), dtype, seed=24, zeros=0.0)
    got = grad_through(name, lambda t: ok.octav_fake_quantize(t, 3, dim=0, grad=grad), x, g)
    with use_backend(name):
        scale = ok.octav_scale(x, 3, dim=0)
    assert_bitwise(got, reference.fake_quantize_backward(g, x, scale, True, 0, None, grad))


# ------------------------------------------------------------------ the reference, by hand


@pytest.mark.parametrize("name", ALL_BACKENDS)
@pytest.mark.parametrize("bits", BITS)
def test_level_clamp_off_by_one(name, bits):
    """Signed two's complement: the top level is s - step, the bottom -s; unsigned: 0 and
    s - step; narrow: -s and s. A clamp one level off in either direction fails here."""
    s = 3.0
    near = s - s / 2 ** (bits + 2)  # a quarter of the finest step below s: rounds up to s
    x = torch.tensor([s, -s, 2 * s, -2 * s, near, -near])
    half = 2 ** (bits - 1)
    step = s / half
    with use_backend(name):
        signed = ok.fake_quantize(x, torch.tensor(s), bits)
        unsigned = ok.fake_quantize(x, torch.tensor(s), bits, signed=False)
        narrow = ok.fake_quantize(x, torch.tensor(s), bits, narrow=True)
    top, bottom = (half - 1) * step, -half * step
    assert signed.tolist() == [top, bottom, top, bottom, top, bottom]
    u_top = (2**bits - 1) * (s / 2**bits)
    assert unsigned.tolist() == [u_top, 0.0, u_top, 0.0, u_top, 0.0]
    assert narrow.tolist() == [s, -s, s, -s, s, -s]


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_round_half_to_even(name):
    step = 0.125  # s = 1 at 4 bits
    levels = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, 6.5])
    with use_backend(name):
        q = ok.fake_quantize(levels * step, torch.tensor(1.0), 4)
    assert (q / step).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 3.0, 6.0]


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_zero_scale_and_nan(name):
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, float("nan"), -2.0]])
    with use_backend(name):
        q = ok.fake_quantize(x, torch.tensor([0.0, 4.0]), 4, dim=0)
        q_zero = ok.fake_quantize(x[1:], torch.tensor([0.0]), 4, dim=0)
    assert q[0].tolist() == [0.0, 0.0, 0.0]
    assert q[1, 0] == 1.0 and torch.isnan(q[1, 1]) and q[1, 2] == -2.0
    assert torch.equal(q_zero, torch.zeros_like(q_zero))  # s == 0: q == 0, never NaN


@pytest.mark.parametrize("name", ALL_BACKENDS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_gradient_estimators_by_hand(name, signed):
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0, 4.0])
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    s = torch.tensor(2.0)
    if signed:  # inside |x| <= 2: entries 1..4; outside -3 and 4 (MAD: g * 2/3, g * 2/4)
        expected = {"ste": g.tolist(), "pwl": [0.0, 2, 3, 4, 5, 0],
                    "mad": [2 / 3, 2, 3, 4, 5, 3.0]}
    else:  # inside 0 <= x <= 2: entries 2..4; x < 0 gets 0 (pwl, mad), g (ste); 4 above
        expected = {"ste": g.tolist(), "pwl": [0.0, 0, 3, 4, 5, 0],
                    "mad": [0.0, 0, 3, 4, 5, 3.0]}
    for grad, want in expected.items():
        got = grad_through(name, lambda t: ok.fake_quantize(t, s, 4, signed=signed, grad=grad),
                           x, g)
        torch.testing.assert_close(got, torch.tensor(want), rtol=1e-7, atol=0)


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_scale_gets_no_gradient(name):
    x = make_data((4, 8), seed=25)
    scale = reference_scale(x, 4, dim=0).requires_grad_()
    xl = x.clone().requires_grad_()
    with use_backend(name):
        ok.fake_quantize(xl, scale, 4, dim=0).sum().backward()
        y, s = ok.octav_fake_quantize(xl, 4, dim=0)
    assert scale.grad is None and not s.requires_grad and y.requires_grad


# ----------------------------------------------------------------------------- edge shapes


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_empty_and_one_element(name):
    with use_backend(name):
        empty = ok.fake_quantize(torch.empty(0, 3), torch.ones(3), 4, dim=1)
        y, s = ok.octav_fake_quantize(torch.empty(2, 0), 4, dim=0)
        one, s1 = ok.octav_fake_quantize(torch.tensor([-0.7]), 4)
    assert empty.shape == (0, 3) and y.shape == (2, 0) and torch.equal(s, torch.zeros(2))
    # s = |x| = 0.7: -0.7 is the bottom level -s.
    assert s1.item() == pytest.approx(0.7) and one.item() == pytest.approx(-0.7)


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_non_contiguous_channels_last_and_odd_sizes(name):
    base = make_data((3, 6, 5, 7), seed=26)
    cases = [
        (base.to(memory_format=torch.channels_last), {"dim": 1}),
        (base.transpose(1, 3), {"dim": 0}),
        (base[:, 1::2], {"group_size": 7}),
        (make_data((1, 1031), seed=27), {}),
        (make_data((2, 20000), seed=28), {"dim": 0}),
    ]
    for view, kw in cases:
        before = view.clone()
        g = torch.ones_like(view)
        with use_backend(name):
            y, s = ok.octav_fake_quantize(view, 4, **kw)
        with use_backend("reference"):
            expected = ok.fake_quantize(view.contiguous(), s, 4, **kw)
        assert_bitwise(y, expected)
        grad = grad_through(name, lambda t: ok.fake_quantize(t, s, 4, **kw), view, g)
        grad_ref = grad_through("reference", lambda t: ok.fake_quantize(t, s, 4, **kw),
                                view.contiguous(), g)
        assert_bitwise(grad, grad_ref)
        assert_bitwise(view, before)  # never modified in place


# ------------------------------------------------------------ what the backward keeps alive


def test_pwl_mask_layout_by_hand():
    """Bit k % 32 of word k // 32 is element k of SPEC §3's PWL pass-through set."""
    x = torch.zeros(40)
    x[[0, 3, 31, 33]] = torch.tensor([5.0, -2.5, 2.0, float("nan")])  # out, out, in, out
    mask = reference.pwl_mask(x, torch.tensor(2.0))
    expected = [~((1 << 0) | (1 << 3)) & 0xFFFFFFFF, 0xFF & ~(1 << 1)]
    assert [w & 0xFFFFFFFF for w in mask.tolist()] == expected
    g = torch.arange(40.0) + 1
    torch.testing.assert_close(reference.pwl_backward_from_mask(g, mask),
                               reference.fake_quantize_backward(g, x, torch.tensor(2.0),
                                                                grad="pwl"), rtol=0, atol=0)


def saved_by_backward(name, fn, x):
    """The tensors autograd keeps for the backward of ``fn(x)`` (x a leaf that needs grad)."""
    saved = []
    leaf = x.detach().clone().requires_grad_()
    with use_backend(name), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        fn(leaf)
    return saved


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_pwl_and_ste_keep_little_for_the_backward(name):
    """STE keeps nothing; PWL keeps the bit-packed mask its forward kernel computes (1 bit per
    element), on every backend (the C++ autograd; without the compiled extension, the Python
    formulas keep x and the scale: test_registration); MAD keeps x and the scale."""
    x = make_data((33, 70), seed=40)
    scale = reference_scale(x, 4, dim=0)
    for fn in (lambda t: ok.fake_quantize(t, scale, 4, dim=0, grad="pwl"),
               lambda t: ok.octav_fake_quantize(t, 4, grad="pwl")):
        saved = saved_by_backward(name, fn, x)
        assert [(t.dtype, t.numel()) for t in saved] == [(torch.int32, (33 * 70 + 31) // 32)]
    for fn in (lambda t: ok.fake_quantize(t, scale, 4, dim=0, grad="mad"),
               lambda t: ok.octav_fake_quantize(t, 4, dim=0, grad="mad")):
        saved = saved_by_backward(name, fn, x)
        assert [t.shape for t in saved] == [x.shape, scale.shape]
    assert saved_by_backward(name, lambda t: ok.fake_quantize(t, scale, 4, dim=0, grad="ste"),
                             x) == []


@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_packed_pwl_ops(name, gran):
    """The packed-mask ops give fake_quantize's output, reference.pwl_mask's mask and the PWL
    gradient, on every backend (natively where it has the kernels, else composed)."""
    x = make_data(MATRIX_SHAPE, seed=41)
    x.view(-1)[7] = float("nan")
    scale = reference_scale(x, 3, **gran)
    g = make_data(MATRIX_SHAPE, seed=42, zeros=0.0)
    dim, group_size = gran.get("dim"), gran.get("group_size")
    with use_backend(name):
        y, mask = torch.ops.octav._fake_quantize_packed(x, scale, 3, True, dim, group_size)
        y2, s2, mask2 = torch.ops.octav._octav_fake_quantize_packed(x, 3, True, dim, group_size)
        gx = torch.ops.octav._pwl_backward_packed(g, mask)
    assert_bitwise(y, reference.fake_quantize(x, scale, 3, True, dim, group_size))
    assert torch.equal(mask, reference.pwl_mask(x, scale, True, dim, group_size))
    assert torch.equal(mask2, reference.pwl_mask(x, s2, True, dim, group_size))
    assert_bitwise(y2, reference.fake_quantize(x, s2, 3, True, dim, group_size))
    assert_bitwise(gx, reference.fake_quantize_backward(g, x, scale, True, dim, group_size,
                                                        grad="pwl"))
