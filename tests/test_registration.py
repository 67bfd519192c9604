"""The torch.library side: opcheck on every op, torch.compile(fullgraph=True) against eager,
backend selection and the fallback when the compiled extension is missing."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import GPU, KERNEL_BACKENDS, assert_bitwise, make_data

import octav_kernels as ok
from octav_kernels import backend, use_backend

OPCHECK_BACKENDS = ["reference"] + KERNEL_BACKENDS


def sample_inputs():
    """(op, args, kwargs) covering every op and granularity once."""
    x = make_data((6, 10), seed=31).requires_grad_()
    xu = make_data((4, 3, 8), seed=32, signed=False).requires_grad_()
    s_c = make_data((6, 10), seed=31).abs().amax(1) * 0.6
    s_g = xu.detach().abs().reshape(4, 3, 2, 4).amax(-1) * 0.6
    g = make_data((6, 10), seed=33)
    g_u = make_data((4, 3, 8), seed=37)
    o = torch.ops.octav
    frozen = torch.rand((6, 10), generator=torch.Generator().manual_seed(38)) < 0.3
    state = ok.OscillationState.start(x, s_c, 3, dim=0)
    state.frozen.copy_(frozen.to(state.frozen.device))
    h_feature = torch.linspace(0.0, 2.0, 10)
    h_u = torch.rand((4, 3, 8), generator=torch.Generator().manual_seed(39))
    return [
        (o.octav_scale.default, (x.detach(), 4), {}),
        (o.octav_scale.default, (x.detach(), 3), {"dim": 0, "init": s_c, "rtol": 0.0}),
        (o.octav_scale.default, (xu.detach(), 8), {"signed": False, "group_size": 4}),
        (o.masked_sums.default, (x.detach(), s_c), {"dim": 0}),
        (o.masked_sums.default, (xu.detach(), s_g), {"signed": False, "group_size": 4}),
        (o.fake_quantize.default, (x, s_c, 4), {"dim": 0, "grad": "mad"}),
        (o.fake_quantize.default, (x, s_c.amax(), 2), {"grad": "pwl", "narrow": True}),
        (o.fake_quantize.default, (xu, s_g, 4), {"signed": False, "group_size": 4,
                                                 "grad": "ste"}),
        (o.fake_quantize_backward.default, (g, x.detach(), s_c), {"dim": 0, "grad": "mad"}),
        (o.fake_quantize_backward.default, (g, x.detach(), s_c.amax()), {"grad": "ste"}),
        (o.fake_quantize_backward.default, (g_u, xu.detach().half(), s_g),
         {"signed": False, "group_size": 4, "grad": "pwl"}),
        (o.fake_quantize_backward.default, (g, x.detach(), s_c),
         {"dim": 0, "grad": "mad", "frozen": state.frozen}),
        (o.fake_quantize_tracked.default, (x.detach(), s_c * 0.9, 3, True, 0, None, False,
                                           *state.tensors(), 0.25, torch.tensor(0.2), True), {}),
        (o.dampening_error.default, (x, s_c, 3), {"dim": 0, "frozen": state.frozen}),
        (o.dampening_error.default, (xu, s_g, 4), {"signed": False, "group_size": 4}),
        (o.fake_quantize_lsq.default, (x, s_c.clone().requires_grad_(), 4),
         {"dim": 0, "grad": "mad"}),
        (o.fake_quantize_lsq.default, (xu, s_g.clone().requires_grad_(), 3),
         {"signed": False, "group_size": 4, "grad": "pwl", "grad_scale": False}),
        (o.fake_quantize_lsq_backward.default, (g, x.detach(), s_c, 4),
         {"dim": 0, "grad": "mad", "frozen": state.frozen}),
        (o.octav_fake_quantize.default, (x, 4), {"dim": 0, "grad": "mad"}),
        (o.octav_fake_quantize.default, (xu, 3), {"signed": False, "grad": "pwl"}),
        (o.refine_scale.default, (x.detach(), s_c, 3), {"dim": 0}),
        (o.refine_scale.default, (xu.detach(), s_g, 4), {"signed": False, "group_size": 4}),
        (o.refine_scale.default, (x.detach(), s_c.amax(), 4), {"narrow": True}),
        # importance (SPEC §2.1): per feature, per element, per block position
        (o.octav_scale.default, (x.detach(), 4), {"dim": 0, "importance": h_feature}),
        (o.octav_scale.default, (xu.detach(), 3), {"signed": False, "group_size": 4,
                                                   "importance": h_u}),
        (o.masked_sums.default, (x.detach(), s_c), {"dim": 0, "importance": h_feature}),
        (o.octav_fake_quantize.default, (x, 4), {"dim": 0, "grad": "mad",
                                                 "importance": h_feature}),
        (o.octav_fake_quantize.default, (xu, 3), {"signed": False, "grad": "pwl",
                                                  "importance": h_u}),
        (o.refine_scale.default, (x.detach(), s_c, 3), {"dim": 0, "importance": h_feature}),
    ]


@pytest.mark.parametrize("name", OPCHECK_BACKENDS)
@pytest.mark.parametrize("case", range(len(sample_inputs())))
def test_opcheck(name, case):
    op, args, kwargs = sample_inputs()[case]
    with use_backend(name):
        torch.library.opcheck(op, args, kwargs)


NO_GPU = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (none here)")


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.device("cpu")),
    pytest.param("cuda", marks=[pytest.mark.device("cuda"), NO_GPU]),
])
def test_torch_compile_fullgraph_matches_eager(device):
    """Eager and compiled agree bit for bit, with the backend that serves the device by
    default (C++ on CPU; CUDA kernels, else Triton, on a GPU)."""
    def qat_step(w, a, scale_a):
        wq, sw = ok.octav_fake_quantize(w, 4, dim=0, grad="mad")
        aq = ok.fake_quantize(a, scale_a, 8, signed=False, grad="pwl")
        sums = ok.masked_sums(a, scale_a, signed=False)
        refined = ok.octav_scale(a, 3, signed=False, refine=True)
        h = a.square().mean(0)  # importance of w's input features
        wq_h, sw_h = ok.octav_fake_quantize(w, 4, dim=0, grad="mad", importance=h)
        return (wq + wq_h, sw, aq) + sums + (refined, sw_h)

    w = make_data((16, 32), seed=34)
    a = make_data((8, 32), seed=35, signed=False)
    grad_w = make_data((16, 32), seed=36)
    scale_a = ok.octav_scale(a, 8, signed=False)
    compiled = torch.compile(qat_step, fullgraph=True)
    results = []
    for fn in (qat_step, compiled):
        wl = w.clone().requires_grad_()
        outputs = fn(wl, a, scale_a)
        outputs[0].backward(grad_w)
        results.append([t.detach() for t in outputs] + [wl.grad])
    for eager, comp in zip(*results):
        assert_bitwise(comp, eager)


def test_dispatcher_picks_the_kernels():
    """Each op has its kernels registered with the dispatcher (no Python backend choice per
    call): the C++ CPU kernels where built, the reference as every op's default kernel, and the
    C++ autograd of the differentiable ops where built (fallthrough for the others)."""
    cpu = torch.device("cpu")
    built = backend.available("cpu", cpu)
    differentiable = {"fake_quantize", "octav_fake_quantize", "dampening_error",
                      "fake_quantize_lsq"}
    for name in ok.ops.OPS:
        table = {line.split(":")[0]: line for line in
                 torch._C._dispatch_dump(f"octav::{name}").splitlines()}
        assert "backend.py" in table["CompositeExplicitAutograd[alias]"], name
        assert ("csrc/ops.cpp" in table.get("CPU", "")) == built, name
        autograd = table["Autograd[alias]"]
        if name in differentiable:
            assert ("csrc/autograd.cpp" in autograd) == built, name
        else:
            assert "fallthrough" in autograd, name
    assert backend.serving(cpu) == ("cpu" if backend.available("cpu", cpu) else "reference")


def test_use_backend_registers_and_restores(monkeypatch):
    """use_backend registers a backend's kernels over the default ones for its block (nested
    blocks too) and restores them after; a backend that cannot serve a device raises there."""
    cpu = torch.device("cpu")
    x = make_data((5, 9), seed=30)
    default = ok.octav_scale(x, 3, dim=0)
    calls = []
    monkeypatch.setattr(ok.reference, "octav_scale",
                        lambda *args: calls.append(args) or torch.full((5,), 7.0))
    with use_backend("reference"):
        assert backend.serving(cpu) == "reference"
        assert torch.equal(ok.octav_scale(x, 3, dim=0), torch.full((5,), 7.0))
        with use_backend("auto"):
            assert torch.equal(ok.octav_scale(x, 3, dim=0), default)
        assert torch.equal(ok.octav_scale(x, 3, dim=0), torch.full((5,), 7.0))
    assert len(calls) == 2
    assert torch.equal(ok.octav_scale(x, 3, dim=0), default)
    assert backend.serving(cpu) == backend.native("cpu")
    with use_backend("cuda"), pytest.raises(RuntimeError, match="cannot serve cpu tensors"):
        ok.octav_scale(x, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("fastest"):
            pass


@pytest.mark.parametrize("value,expected", [("reference", "reference"), ("auto", None),
                                            ("nonsense", "OCTAV_BACKEND must be one of")])
def test_octav_backend_environment(value, expected):
    """OCTAV_BACKEND is read once, at import."""
    script = ("import torch, octav_kernels as ok\n"
              "print(ok.backend.serving(torch.device('cpu')))\n")
    env = dict(os.environ, OCTAV_BACKEND=value)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    if expected is not None and expected.startswith("OCTAV_BACKEND"):
        assert done.returncode != 0 and expected in done.stderr
        return
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == (expected or backend.native("cpu"))


@pytest.mark.skipif(backend._C is None, reason="the C++ autograd needs octav_kernels._C")
@pytest.mark.parametrize("grad, expected", [
    ("ste", []), ("pwl", [(torch.int32, (2,))]),
    ("mad", [(torch.float32, (5, 7)), (torch.float32, (5,))])])
def test_cpp_autograd_keeps_what_the_estimator_needs(grad, expected):
    """The C++ autograd keeps nothing for STE, the 1-bit PWL mask (35 elements: 2 int32 words),
    x and the scale for MAD; the Python fallback keeps the same (the test below)."""
    x = torch.randn(5, 7, requires_grad=True)
    for op in (lambda: ok.fake_quantize(x, torch.ones(5), 4, dim=0, grad=grad),
               lambda: ok.octav_fake_quantize(x, 4, dim=0, grad=grad)[0]):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
            op()
        assert saved == expected


def test_falls_back_to_reference_without_extension():
    """With octav_kernels._C unimportable the package still imports, warns once, and every op
    is served by the reference."""
    script = """
import sys, warnings
sys.modules["octav_kernels._C"] = None  # makes `from . import _C` raise ImportError
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, octav_kernels as ok
    from octav_kernels import backend, reference
    x = torch.randn(5, 7)
    y, s = ok.octav_fake_quantize(x, 4, dim=0)
    assert backend.serving(x.device) == "reference"
    assert torch.equal(s, reference.octav_scale(x, 4, dim=0))
    assert torch.equal(y, reference.fake_quantize(x, s, 4, dim=0))
    xl = x.clone().requires_grad_()  # the autograd formulas of octav_kernels.ops
    for grad in ("ste", "pwl", "mad"):
        ok.fake_quantize(xl, s, 4, dim=0, grad=grad).backward(torch.ones_like(x))
        expected = reference.fake_quantize_backward(torch.ones_like(x), x, s, True, 0, None, grad)
        assert torch.equal(xl.grad, expected), grad
        xl.grad = None
        for op in (lambda: ok.fake_quantize(xl, s, 4, dim=0, grad=grad),
                   lambda: ok.octav_fake_quantize(xl, 4, dim=0, grad=grad)[0]):
            saved = []  # what the backward keeps: the same as the C++ autograd
            with torch.autograd.graph.saved_tensors_hooks(
                    lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
                op()
            assert saved == {"ste": [], "pwl": [(torch.int32, (2,))],
                             "mad": [(x.dtype, (5, 7)), (torch.float32, (5,))]}[grad], saved
messages = [str(w.message) for w in caught if "octav_kernels._C" in str(w.message)]
assert len(messages) == 1, messages
print("fallback ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "OCTAV_BACKEND"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "fallback ok" in done.stdout


def test_torch_older_than_the_floor_is_refused_at_import():
    """The torch floor is checked once, first, with a message naming both versions (issue 29:
    torch.library.get_kernel arrived in 2.9)."""
    script = ("import torch\n"
              "torch.__version__ = '2.8.1+cu128'\n"
              "import octav_kernels\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert "ImportError: octav_kernels needs torch >= 2.9, found 2.8.1+cu128" in done.stderr
