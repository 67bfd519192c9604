"""refine_scale (OCTAV polished against the empirical MSE, SPEC §8): parity of every kernel
backend with the reference search, the guarantees of the search on varied data (never worse than
its start or than max scaling; the deeper minimum of heavy-outlier data), and the API around it.

Tolerance: every backend computes the same per-element terms ``(q - x)**2`` (float32 quantizer,
float64 difference and square, no contraction), so candidate errors differ only by the order of
a float64 sum of n positive terms: relative error below n * 2**-53 (< 1e-11 for the n <= 1e5
elements of a test group; SSE_RTOL). The search then makes the same decisions and returns the
same float32 scale, unless two candidates' errors tie within that bound; the parity check
accepts a different scale only there (a different scale with a measurably different error
fails).
"""

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
    KERNEL_BACKENDS,
    MATRIX_SHAPE,
    assert_bitwise,
    make_data,
    on_device,
)

import octav_kernels as ok
from octav_kernels import drivers, reference, use_backend

SSE_RTOL = 1e-11
ROOT = Path(__file__).resolve().parent.parent


def sse(x, scale, bits, signed=True, narrow=False, **gran):
    """Reference squared error per group at ``scale`` (float64, the scale's shape)."""
    g = ok._args.groups(x, gran.get("dim"), gran.get("group_size"))
    err = reference.candidate_sse(x, scale.reshape(-1, 1), bits, signed, g.dim, g.group_size,
                                  narrow)
    return err.reshape(scale.shape)


def assert_same_search(got, expected, x, bits, signed=True, narrow=False, **gran):
    """Equal scales, or equal errors within SSE_RTOL where the scales differ (a tie)."""
    assert got.dtype == torch.float32 and got.shape == expected.shape
    differ = ~((got == expected) | (torch.isnan(got) & torch.isnan(expected)))
    if bool(differ.any()):
        e_got = sse(x, got, bits, signed, narrow, **gran)[differ]
        e_exp = sse(x, expected, bits, signed, narrow, **gran)[differ]
        torch.testing.assert_close(e_got, e_exp, rtol=SSE_RTOL, atol=0.0)


def reference_refined(x, bits, **kw):
    """(OCTAV scale, its refinement), both served by the reference backend."""
    with use_backend("reference"):
        scale = ok.octav_scale(x, bits, **kw)
        return scale, ok.refine_scale(x, scale, bits, **kw)


def gaussian_outliers(n, seed=0, fraction=0.005, size=30.0):
    """Gaussian data with a fraction of outliers ``size`` times larger (Appendix G's case)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    x = torch.where(torch.rand(n, generator=gen, dtype=torch.float64) < fraction, x * size, x)
    return on_device(x.float())


def laplace(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=gen, dtype=torch.float64).clamp_min(1e-300)
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    return on_device((sign * -torch.log(u)).float())


def sweep_sse(x, bits, points, signed=True):
    """Squared error at the scale of the library's ``points``-point sweep (one group)."""
    return sse(x, ok.mse_sweep_scale(x, bits, signed=signed, points=points), bits, signed)


# ----------------------------------------------------------------------------- parity matrix


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("name,dtype", BACKEND_DTYPES)
def test_refine_scale_parity(name, dtype, gran, grid, bits):
    signed, narrow = grid
    x = make_data(MATRIX_SHAPE, dtype, signed, seed=bits)
    scale, expected = reference_refined(x, bits, signed=signed, narrow=narrow, **gran)
    with use_backend(name):
        got = ok.refine_scale(x, scale, bits, signed=signed, narrow=narrow, **gran)
    assert_same_search(got, expected, x, bits, signed, narrow, **gran)


@pytest.mark.parametrize("case", [
    pytest.param(((40_000,), {}), id="tensor-40k"),  # > 2**14: the C++ chunked large-group path
    pytest.param(((6, 2_000), {"dim": 0}), id="rows-2000"),
    pytest.param(((300, 9), {"dim": 1}), id="strided-rows"),
    pytest.param(((4, 256), {"group_size": 64}), id="blocks-64"),
])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_refine_scale_parity_larger_groups(name, bits, case):
    shape, gran = case
    x = laplace(shape, seed=bits)
    scale, expected = reference_refined(x, bits, **gran)
    with use_backend(name):
        got = ok.refine_scale(x, scale, bits, **gran)
        assert_same_search(got, expected, x, bits, **gran)
        own = ok.refine_scale(x, ok.octav_scale(x, bits, **gran), bits, **gran)
        assert torch.equal(ok.octav_scale(x, bits, refine=True, **gran), own)


@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_candidate_sse_parity(name, gran):
    """One pass of the search (the C++ backend runs its passes inside its own search)."""
    x = make_data(MATRIX_SHAPE, torch.bfloat16, seed=5)
    g = ok._args.groups(x, gran.get("dim"), gran.get("group_size"))
    gen = torch.Generator().manual_seed(1)
    cand = on_device(torch.rand(g.n_groups, 6, generator=gen) * 3)  # the coarse pass's K
    expected = reference.candidate_sse(x, cand, 3, True, g.dim, g.group_size)
    with use_backend(name):
        got = torch.ops.octav._candidate_sse(x, cand, 3, True, g.dim, g.group_size)
    torch.testing.assert_close(got, expected, rtol=SSE_RTOL, atol=0.0)


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_candidate_sse_terms_are_exact(name):
    """Rows whose elements all lie within twice the lowest candidate's clip level (the C++ pass
    takes their differences q - x in float, exact there) and rows with outliers far beyond it
    (where a float difference would round by ~1e-8 of the sum): the sums match the reference to
    the order of a float64 sum either way, unweighted and weighted (importance with zeros and a
    10^4 spread, so a wrong term would show)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5000, generator=gen) * 0.5
    x[1::2, ::700] *= 4000.0  # odd rows: outliers ~2000, clip levels 2-3.5
    cand = 2.0 + 1.5 * torch.rand(6, 4, generator=gen)  # fine low bits: q - x would round
    h = torch.rand(5000, generator=gen) ** 4 * 1e4
    h[::3] = 0.0
    x, cand, h = on_device(x), on_device(cand), on_device(h)
    for signed in (True, False):
        for importance in (None, h):
            expected = reference.candidate_sse(x, cand, 4, signed, dim=0, importance=importance)
            with use_backend(name):
                got = torch.ops.octav._candidate_sse(x, cand, 4, signed, 0, None, False,
                                                     importance)
            torch.testing.assert_close(got, expected, rtol=SSE_RTOL, atol=0.0)


@pytest.mark.skipif(not ok.backend.available("cpu", torch.device("cpu")),
                    reason="octav_kernels._C not built")
@pytest.mark.parametrize("cpu_pass", ["avx2", "portable"])
def test_other_cpu_passes(cpu_pass):
    """The C++ search's passes for CPUs without AVX-512 (AVX2 + FMA intrinsics) and without AVX2
    (portable loops), which this file's tests run only on such CPUs: its C++ tests again, in a
    child process with OCTAV_CPU_PASS set (avx2 runs the portable pass on a CPU without it)."""
    env = dict(os.environ, OCTAV_CPU_PASS=cpu_pass)
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:xdist",
                           "-p", "no:cacheprovider", "-k", "cpu and not other_cpu_passes"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


# ------------------------------------------------------------- what the search guarantees


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("data", ["laplace", "outliers", "heavy"])
def test_never_worse_than_start_or_max(data, signed, bits):
    """Per group, the refined error is at most that of the OCTAV scale and of max scaling
    (both are coarse candidates), and the refined scale stays within the coarse range."""
    if data == "laplace":
        x = laplace((64, 96), seed=bits)
    elif data == "outliers":
        x = gaussian_outliers(64 * 96, seed=bits, fraction=0.02).reshape(64, 96)
    else:
        x = make_data((64, 96), signed=signed, seed=bits)
    if not signed:
        x = x.abs()
    scale, refined = reference_refined(x, bits, signed=signed, dim=0)
    m = ok.max_scale(x, signed=signed, dim=0)
    e = sse(x, refined, bits, signed, dim=0)
    assert bool((e <= sse(x, scale, bits, signed, dim=0)).all())
    assert bool((e <= sse(x, m, bits, signed, dim=0)).all())
    assert bool((refined >= scale / 1.25 / 1.25 ** 2).all())  # the bracket below the lowest


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_outliers_second_minimum(name):
    """Appendix G's non-convex case: with 0.5% outliers 30x the bulk at 2 bits, the OCTAV fixed
    point clips the outliers, while the empirical MSE is lowest in the other basin (a large scale
    that represents them and rounds the bulk to zero). The refinement returns that deeper minimum,
    as good as a 2000-point sweep within 0.2%."""
    x = gaussian_outliers(20_000, seed=1)
    with use_backend(name):
        scale = ok.octav_scale(x, 2)
        refined = ok.octav_scale(x, 2, refine=True)
    best = sweep_sse(x, 2, 2000)
    assert float(sse(x, scale, 2)) > 1.5 * float(best)  # OCTAV is in the shallow basin
    assert float(refined) > 5 * float(scale)  # the refinement moved to the other one
    assert float(sse(x, refined, 2)) <= 1.002 * float(best)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_single_minimum_data_matches_fine_sweep(signed, bits):
    """On unimodal data the refinement stays near the OCTAV point and reaches the 2000-point
    sweep's error within 0.2% and the 100-point sweep's at three decimals (the issue's
    targets)."""
    x = laplace((30_000,), seed=bits)
    if not signed:
        x = x.abs()
    scale, refined = reference_refined(x, bits, signed=signed)
    assert 0.8 <= float(refined / scale) <= 1.5
    e = float(sse(x, refined, bits, signed))
    assert e <= 1.002 * float(sweep_sse(x, bits, 2000, signed))
    assert round(e / float(sweep_sse(x, bits, 100, signed)), 3) <= 1.0


def test_search_passes(monkeypatch):
    """The passes the search makes over the group: 6 coarse candidates, then 4, 4 and 2, in the
    reference and in the backends' shared driver (octav_kernels.drivers), which decide alike."""
    x = laplace((5_000,), seed=3)
    scale = ok.octav_scale(x, 4)
    passes = {"reference": [], "driver": []}
    sse = reference.candidate_sse

    def counting(who):
        def fn(x, cand, *args):
            passes[who].append((x.numel(), cand.shape[1]))
            return sse(x, cand, *args)
        return fn

    monkeypatch.setattr(reference, "candidate_sse", counting("reference"))
    expected = reference.refine_scale(x, scale, 4)
    got = drivers.refine_scale(counting("driver"), x, scale, 4)
    assert passes["reference"] == passes["driver"] == [(5_000, 6), (5_000, 4), (5_000, 4),
                                                       (5_000, 2)]
    assert torch.equal(got, expected)


def test_cube_root_is_exact_to_rounding():
    """The coarse grid's ratio: reference.cube_root (square roots and Newton steps, the same
    operations on every backend) is within an ulp of the cube root: t**3 is within 3 ulps of y,
    plus the rounding of the two products (2 half-ulps), 4 * 2**-52 in all, over the range of
    max / (start / 1.25) the search meets (1.5625 and up)."""
    y = torch.logspace(0.19, 40, 500, dtype=torch.float64)
    t = reference.cube_root(y)
    torch.testing.assert_close(t * t * t, y, rtol=4 * 2**-52, atol=0.0)


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_special_groups(name):
    """NaN and inf propagate (SPEC §6), nothing positive gives 0, and a start that is not a
    positive finite number starts from max|x|; inputs are not modified."""
    x = on_device(torch.tensor([[0.5, -1.0, 2.0, 0.25],
                                [0.0, 0.0, 0.0, 0.0],
                                [1.0, float("nan"), 2.0, 3.0],
                                [1.0, float("inf"), 2.0, 3.0],
                                [-1.0, -2.0, -3.0, -0.5],
                                [0.3, -0.7, 1.1, 0.9]]))
    start = on_device(torch.tensor([1.0, 0.0, 2.0, 2.0, 1.0, float("nan")]))
    x0, start0 = x.clone(), start.clone()
    with use_backend(name):
        signed = ok.refine_scale(x, start, 3, dim=0)
        unsigned = ok.refine_scale(x, start, 3, signed=False, dim=0)
        empty = ok.refine_scale(x[:, :0], start, 3, dim=0)
    assert_bitwise(x, x0)
    assert_bitwise(start, start0)
    assert signed[1] == 0 and torch.isnan(signed[2]) and signed[3] == math.inf
    assert unsigned[4] == 0  # no positive entry
    assert bool((signed[[0, 5]] > 0).all()) and torch.isfinite(signed[[0, 5]]).all()
    with use_backend("reference"):
        from_max = ok.refine_scale(x[5:], ok.max_scale(x[5:], dim=0), 3, dim=0)
    assert signed[5] == from_max[0]
    assert torch.equal(empty, torch.zeros_like(start))


# ----------------------------------------------------------------------------- the API


def test_flags_compose():
    x = make_data((8, 200), seed=11).requires_grad_()
    scale = ok.octav_scale(x.detach(), 3, dim=0)
    refined = ok.refine_scale(x.detach(), scale, 3, dim=0)
    assert torch.equal(ok.octav_scale(x.detach(), 3, dim=0, refine=True), refined)
    for grad in ("mad", "pwl", "ste"):
        y, s = ok.octav_fake_quantize(x, 3, dim=0, grad=grad, refine=True, init=scale)
        assert torch.equal(s, refined) and not s.requires_grad
        assert torch.equal(y, ok.fake_quantize(x.detach(), refined, 3, dim=0))
        y.sum().backward()
        expected = reference.fake_quantize_backward(torch.ones_like(y), x.detach(), refined,
                                                    dim=0, grad=grad)
        assert torch.equal(x.grad, expected)
        x.grad = None


def test_calibrator_and_module():
    cal = ok.make_calibrator("octav:refine")
    assert isinstance(cal, ok.OctavCalibrator) and cal.refine and not cal.is_default
    x = make_data((16, 64), seed=12)
    assert torch.equal(cal(x, 4, dim=0), ok.octav_scale(x, 4, dim=0, refine=True))
    q = ok.Quantizer(4, dim=0, calibrator="octav:refine")
    q.train()
    y = q(x)
    assert torch.equal(q.scale, ok.octav_scale(x, 4, dim=0, refine=True))
    assert torch.equal(y, ok.fake_quantize(x, q.scale, 4, dim=0))
    with pytest.raises(ValueError, match="octav:refine"):
        ok.make_calibrator("octav:fast")
    with pytest.raises(TypeError, match="refine"):
        ok.OctavCalibrator(refine=1)
    with pytest.raises(ValueError, match="refined OCTAV scale is not computed across ranks"):
        ok.Quantizer(4, calibrator="octav:refine", process_group="world")


def test_bad_arguments():
    x = torch.randn(4, 6)
    s = torch.ones(4)
    with pytest.raises(ValueError, match="scale must have shape"):
        ok.refine_scale(x, torch.ones(6), 4, dim=0)
    with pytest.raises(ValueError, match="bits"):
        ok.refine_scale(x, s, 1, dim=0)
    with pytest.raises(TypeError, match="scale must be a torch.Tensor"):
        ok.refine_scale(x, 1.0, 4)
    with pytest.raises(TypeError, match="refine must be a bool"):
        ok.octav_scale(x, 4, refine="yes")
    with pytest.raises(TypeError, match="refine must be a bool"):
        ok.octav_fake_quantize(x, 4, refine=None)
    with pytest.raises(TypeError, match="x must be float32"):
        ok.refine_scale(x.int(), s, 4, dim=0)
    with pytest.raises(ValueError, match="narrow=True applies to signed grids only"):
        ok.refine_scale(x, s, 4, dim=0, signed=False, narrow=True)


def test_bench_refine_quick(tmp_path):
    """bench/bench_refine.py runs end to end (its --quick sizes) and reports every cell."""
    out = tmp_path / "refine.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "bench/bench_refine.py", "--quick", "--repeats", "1",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    cells = [r for r in rows if r.split("|")[1].strip() in ("gaussian", "laplace", "student-t5",
                                                            "outliers")]
    assert len(cells) == 4 * 2 * 2 * 2  # data x granularities x bits x sign (quick)
    assert sum(r.startswith("| tensor 16K |") or r.startswith("| rows 64 (64x64) |")
               for r in rows) == 2
    assert len([r for r in rows if r.endswith("| yes |") or r.endswith("| no |")]) == 5


def test_main_job_reports_refined_octav(capsys):
    """`python -m octav_kernels` (the README's main command) at a small size: refined OCTAV is
    in its table, never above plain OCTAV's MSE."""
    from octav_kernels.__main__ import main

    main(["--numel", "4096", "--bits", "2", "4", "--repeats", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    by = {(r[0].strip(), r[1].strip(), r[2].strip()): float(r[4]) for r in rows}
    keys = {(d, b) for d, b, _ in by}
    assert len(keys) == 3 * 2  # built-in tensors x bit widths
    for d, b in keys:
        assert by[(d, b, "octav+refine")] <= by[(d, b, "octav")]


# ------------------------------------------------------------ importance (SPEC §2.1)
#
# Weighted terms h * (q - x)**2 are float64 products of the same exact squares with float32 h,
# rounded once (the C++ AVX passes fuse that product into the sum, unrounded): SSE_RTOL still
# bounds the difference of the sums.

def weighted_sse(x, scale, bits, h, **gran):
    g = ok._args.groups(x, gran.get("dim"), gran.get("group_size"))
    return reference.candidate_sse(x, scale.reshape(-1, 1), bits, True, g.dim, g.group_size,
                                   False, h).reshape(scale.shape)


def feature_importance(shape, seed=60):
    gen = torch.Generator().manual_seed(seed)
    h = torch.rand(shape[-1], generator=gen) ** 2
    return on_device(torch.where(h < 0.05, 0.0, h))


@pytest.mark.parametrize("gran", [pytest.param({"dim": 0}, id="dim0"),
                                  pytest.param({"dim": 1}, id="dim1"),
                                  pytest.param({"group_size": 4}, id="group4"),
                                  pytest.param({}, id="tensor")])
@pytest.mark.parametrize("name,dtype", [p for p in BACKEND_DTYPES
                                        if p.values[1] in (torch.float32, torch.bfloat16)])
def test_refine_scale_importance_parity(name, dtype, gran):
    x = make_data(MATRIX_SHAPE, dtype, seed=61)
    h = feature_importance(MATRIX_SHAPE)
    with use_backend("reference"):
        scale = ok.octav_scale(x, 3, importance=h, **gran)
        expected = ok.refine_scale(x, scale, 3, importance=h, **gran)
    with use_backend(name):
        got = ok.refine_scale(x, scale, 3, importance=h, **gran)
        g = ok._args.groups(x, gran.get("dim"), gran.get("group_size"))
        cand = torch.stack([scale.reshape(-1) * f for f in (0.5, 0.8, 1.0, 1.3)], 1)
        sse_got = torch.ops.octav._candidate_sse(x, cand, 3, True, g.dim, g.group_size,
                                                 False, h)
    torch.testing.assert_close(sse_got, reference.candidate_sse(x, cand, 3, True, g.dim,
                                                                g.group_size, False, h),
                               rtol=SSE_RTOL, atol=0.0)
    differ = got != expected
    if bool(differ.any()):  # only a tie within SSE_RTOL may differ
        torch.testing.assert_close(weighted_sse(x, got, 3, h, **gran)[differ],
                                   weighted_sse(x, expected, 3, h, **gran)[differ],
                                   rtol=SSE_RTOL, atol=0.0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_weighted_refine_never_worse_than_its_start_or_max(bits):
    """In the weighted error it minimizes: never above the weighted OCTAV start or max
    scaling, and below the unweighted refinement's scale on data whose importance sits on the
    large entries."""
    x = laplace((16, 512), seed=bits)
    h = (torch.arange(512) % 7 == 0).float() * 4.0 + 0.1  # a few important input features
    start = ok.octav_scale(x, bits, dim=0, importance=h)
    refined = ok.refine_scale(x, start, bits, dim=0, importance=h)
    err = weighted_sse(x, refined, bits, h, dim=0)
    assert bool((err <= weighted_sse(x, start, bits, h, dim=0)).all())
    assert bool((err <= weighted_sse(x, ok.max_scale(x, dim=0), bits, h, dim=0)).all())
    plain = ok.octav_scale(x, bits, dim=0, refine=True)
    assert float(err.sum()) < float(weighted_sse(x, plain, bits, h, dim=0).sum())


def test_weighted_mse_sweep_is_the_weighted_argmin():
    """mse_sweep_scale with importance: the candidate k/points * max|x| of least weighted
    error, checked by a loop over the candidates."""
    x = laplace((4, 64), seed=3)
    h = feature_importance((4, 64))
    got = ok.mse_sweep_scale(x, 3, dim=0, points=40, importance=h)
    top = ok.max_scale(x, dim=0)
    errs = torch.stack([weighted_sse(x, top * (k / 40), 3, h, dim=0) for k in range(1, 41)])
    want = top * ((errs.argmin(0) + 1).float() / 40)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)
    assert not torch.equal(got, ok.mse_sweep_scale(x, 3, dim=0, points=40))
