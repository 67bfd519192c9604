"""Every bad input of SPEC §6 raises the named error, naming the argument, from the Python
wrappers and from torch.ops.octav alike."""

import pytest
import torch
from conftest import ALL_BACKENDS

import octav_kernels as ok
from octav_kernels import use_backend

X = torch.randn(4, 6)
S = torch.ones(4)  # a per-channel (dim=0) scale of X
S_T = torch.tensor(1.0)
ops = torch.ops.octav


def wrapper_calls(x=X, bits=4, **kw):
    """One call per public op, with the same (possibly bad) x / bits / granularity."""
    scale = kw.pop("scale", S if kw.get("dim") is not None else S_T)
    return [
        lambda: ok.octav_scale(x, bits, **kw),
        lambda: ok.masked_sums(x, scale, **{k: v for k, v in kw.items() if k != "narrow"}),
        lambda: ok.fake_quantize(x, scale, bits, **kw),
        lambda: ok.octav_fake_quantize(x, bits, **kw),
    ]


def op_calls(x=X, bits=4, dim=None, group_size=None, scale=None):
    scale = scale if scale is not None else (S if dim is not None else S_T)
    return [
        lambda: ops.octav_scale(x, bits, dim=dim, group_size=group_size),
        lambda: ops.masked_sums(x, scale, dim=dim, group_size=group_size),
        lambda: ops.fake_quantize(x, scale, bits, dim=dim, group_size=group_size),
        lambda: ops.octav_fake_quantize(x, bits, dim=dim, group_size=group_size),
        lambda: ops.fake_quantize_backward(x, x, scale, dim=dim, group_size=group_size),
    ]


# Each op checks its arguments in the kernel that serves it (C++ entry points, the Python
# kernels of the reference and Triton): the errors below hold on every backend.
BACKENDS = [b for b in ALL_BACKENDS if b.id in ("reference", "cpu", "triton")]


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    with use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool,
                                   torch.complex64])
def test_non_float_x_is_type_error(dtype, backend_name):
    x = torch.zeros(4, 6, dtype=dtype)
    for call in wrapper_calls(x) + op_calls(x):
        with pytest.raises(TypeError, match="x must be float32"):
            call()


def test_non_tensor_arguments_are_type_errors():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ok.octav_scale([1.0, 2.0], 4)
    with pytest.raises(TypeError, match="bits must be an int"):
        ok.octav_scale(X, 4.0)
    with pytest.raises(TypeError, match="bits must be an int"):
        ok.fake_quantize(X, S_T, True)
    with pytest.raises(TypeError, match="dim must be an int"):
        ok.octav_scale(X, 4, dim=0.0)
    with pytest.raises(TypeError, match="group_size must be an int"):
        ok.octav_scale(X, 4, group_size="2")
    with pytest.raises(TypeError, match="scale must be a torch.Tensor"):
        ok.fake_quantize(X, 1.0, 4)
    with pytest.raises(TypeError, match="init must be a torch.Tensor"):
        ok.octav_scale(X, 4, init=1.0)
    with pytest.raises(TypeError, match="signed must be a bool"):
        ok.octav_scale(X, 4, signed=1)
    with pytest.raises(TypeError, match="scale must be a floating tensor"):
        ok.fake_quantize(X, torch.tensor(1), 4)
    with pytest.raises(TypeError, match="max_iters must be an int"):
        ok.octav_scale(X, 4, max_iters=3.0)
    with pytest.raises(TypeError, match="rtol must be a float"):
        ok.octav_scale(X, 4, rtol="0.1")


@pytest.mark.parametrize("bits", [0, 1, 17, -4])
def test_bits_out_of_range(bits, backend_name):
    calls = wrapper_calls(bits=bits)
    calls = calls[:1] + calls[2:]  # masked_sums takes no bits
    for call in calls + [c for i, c in enumerate(op_calls(bits=bits)) if i in (0, 2, 3)]:
        with pytest.raises(ValueError, match="bits must be in 2..16"):
            call()


def test_bad_grad(backend_name):
    for call in (lambda: ok.fake_quantize(X, S_T, 4, grad="round"),
                 lambda: ok.octav_fake_quantize(X, 4, grad="STE"),
                 lambda: ops.fake_quantize(X, S_T, 4, grad="mph"),
                 lambda: ops.octav_fake_quantize(X, 4, grad=""),
                 lambda: ops.fake_quantize_backward(X, X, S_T, grad="x")):
        with pytest.raises(ValueError, match="grad must be one of"):
            call()


@pytest.mark.parametrize("kw,match", [
    ({"dim": 2}, "dim=2 is out of range"),
    ({"dim": -3}, "dim=-3 is out of range"),
    ({"group_size": 4}, "group_size=4 must divide the last dim"),
    ({"group_size": 0}, "group_size must be positive"),
    ({"group_size": -2}, "group_size must be positive"),
    ({"dim": 0, "group_size": 2}, "at most one of dim"),
])
def test_bad_granularity(kw, match, backend_name):
    scale = torch.ones(4) if "dim" in kw else S_T
    for call in wrapper_calls(scale=scale, **kw) + op_calls(scale=scale, **kw):
        with pytest.raises(ValueError, match=match):
            call()


def test_granularity_of_a_scalar():
    x = torch.tensor(1.5)
    with pytest.raises(ValueError, match="out of range"):
        ok.octav_scale(x, 4, dim=0)
    with pytest.raises(ValueError, match="must divide the last dim"):
        ok.octav_scale(x, 4, group_size=1)


@pytest.mark.parametrize("scale,kw,match", [
    (torch.ones(5), {"dim": 0}, r"scale must have shape \[4\]"),
    (torch.ones(4), {}, r"scale must have shape \[\]"),
    (torch.ones(4, 3), {"group_size": 3}, r"scale must have shape \[4, 2\]"),
    (torch.ones(4, device="meta"), {"dim": 0}, "scale is on meta but x is on cpu"),
])
def test_bad_scale(scale, kw, match, backend_name):
    for call in (lambda: ok.fake_quantize(X, scale, 4, **kw),
                 lambda: ok.masked_sums(X, scale, **kw),
                 lambda: ops.fake_quantize(X, scale, 4, **kw),
                 lambda: ops.masked_sums(X, scale, **kw),
                 lambda: ops.fake_quantize_backward(X, X, scale, **kw)):
        with pytest.raises(ValueError, match=match):
            call()


def test_bad_init_and_iteration_controls(backend_name):
    with pytest.raises(ValueError, match=r"init must have shape \[4\]"):
        ok.octav_scale(X, 4, dim=0, init=torch.ones(6))
    with pytest.raises(ValueError, match="init is on meta"):
        ok.octav_fake_quantize(X, 4, dim=0, init=torch.ones(4, device="meta"))
    with pytest.raises(ValueError, match="max_iters must be >= 0"):
        ok.octav_scale(X, 4, max_iters=-1)
    with pytest.raises(ValueError, match="rtol must be finite and >= 0"):
        ok.octav_scale(X, 4, rtol=-1e-3)
    with pytest.raises(ValueError, match="rtol must be finite and >= 0"):
        ops.octav_scale(X, 4, rtol=float("inf"))
    with pytest.raises(ValueError, match="narrow=True applies to signed grids only"):
        ok.octav_fake_quantize(X, 4, signed=False, narrow=True)
    # max_iters is bounded (the kernels count iterations in 32 bits)
    for max_iters in (2**16 + 1, 2**31, 2**40):
        with pytest.raises(ValueError, match="max_iters must be <= 65536"):
            ok.octav_scale(X, 4, max_iters=max_iters)
        with pytest.raises(ValueError, match="max_iters must be <= 65536"):
            ops.octav_scale(X, 4, max_iters=max_iters)


def test_grad_out_shape(backend_name):
    with pytest.raises(ValueError, match=r"grad_out \(\[3\] on cpu\) must match x"):
        ops.fake_quantize_backward(torch.ones(3), X, S_T)


def test_inputs_never_modified(backend_name):
    x = torch.randn(4, 6)
    scale, init = torch.ones(4), torch.full((4,), 2.0)
    copies = (x.clone(), scale.clone(), init.clone())
    ok.octav_scale(x, 4, dim=0, init=init)
    ok.masked_sums(x, scale, dim=0)
    ok.fake_quantize(x, scale, 4, dim=0)
    ok.octav_fake_quantize(x, 4, dim=0, init=init)
    for before, after in zip(copies, (x, scale, init)):
        assert torch.equal(before, after)
