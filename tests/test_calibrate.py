"""Calibrators (SPEC §7 baselines and OCTAV behind one interface) against computations written
out independently here: a sort for the percentile, a per-row max, a plain loop over the 100
sweep points with the reference quantizer."""

import math

import pytest
import torch
from conftest import GPU, SCALE_RTOL, make_data, reference_scale

import octav_kernels as ok
from octav_kernels import reference

GRANULARITIES = [pytest.param({}, id="tensor"), pytest.param({"dim": 0}, id="dim0"),
                 pytest.param({"dim": 1}, id="dim1"), pytest.param({"group_size": 8}, id="g8")]
SHAPE = (6, 5, 16)


def rows_of(x, dim=None, group_size=None):
    """Groups as a list of 1-D float64 tensors, by explicit indexing."""
    if dim is not None:
        return [x.select(dim, i).reshape(-1).double() for i in range(x.shape[dim])]
    if group_size is not None:
        flat = x.reshape(-1).double()
        return [flat[i:i + group_size] for i in range(0, flat.numel(), group_size)]
    return [x.reshape(-1).double()]


def magnitudes(row, signed):
    return row.abs() if signed else row.clamp_min(0)


@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_max_calibrator(gran, signed):
    x = make_data(SHAPE, signed=signed, seed=1)
    expected = [magnitudes(r, signed).max().item() for r in rows_of(x, **gran)]
    got = ok.MaxCalibrator()(x, 4, signed=signed, **gran)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.reshape(-1).double(),
                               torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=0)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_max_scale_reaches_every_nonfinite_entry(value, signed):
    """SPEC §6: a NaN/inf entry makes its group's scale non-finite, -inf on an unsigned grid
    included (it counts as +inf, as OCTAV's magnitudes do), so a quantizer checking the scale
    sees it; the other groups keep their max."""
    x = make_data(SHAPE, signed=signed, seed=2)
    x[1, 2, 3] = value
    got = ok.max_scale(x, signed=signed, dim=0)
    assert not math.isfinite(got[1].item())
    others = torch.cat([got[:1], got[2:]])
    expected = [magnitudes(r, signed).max().item() for i, r in enumerate(rows_of(x, dim=0))
                if i != 1]
    assert others.tolist() == expected


@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("percentile", [50.0, 99.9, 99.99, 100.0])
def test_percentile_calibrator_is_nearest_rank(gran, percentile):
    x = make_data(SHAPE, seed=2)
    expected = []
    for r in rows_of(x, **gran):
        ordered = sorted(magnitudes(r, True).tolist())
        rank = max(1, math.ceil(percentile / 100 * len(ordered)))  # nearest-rank definition
        expected.append(ordered[rank - 1])
    got = ok.make_calibrator(f"percentile:{percentile}")(x, 4, **gran)
    torch.testing.assert_close(got.reshape(-1).double(),
                               torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=0)


@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("grid", [(True, False), (False, False), (True, True)],
                         ids=["signed", "unsigned", "narrow"])
def test_mse_sweep_calibrator_matches_a_plain_loop(gran, bits, grid):
    signed, narrow = grid
    x = make_data(SHAPE, signed=signed, seed=3)
    got = ok.MSESweepCalibrator(points=100)(x, bits, signed=signed, narrow=narrow, **gran)
    for row, s in zip(rows_of(x.float(), **gran), got.reshape(-1)):
        s_max = magnitudes(row, signed).max().float()

        def mse(scale):
            q = reference.fake_quantize(row.float(), scale.reshape(()), bits, signed,
                                        narrow=narrow)
            return (q.double() - row).square().mean().item()

        best = min(mse(k / 100 * s_max) for k in range(1, 101))
        # The swept scale is one of the 100 points and attains the lowest MSE among them
        # (compared by MSE, not index: exact ties may pick either point).
        k = round(s.item() / s_max.item() * 100)
        assert 1 <= k <= 100 and s.item() == pytest.approx(k / 100 * s_max.item(), rel=1e-6)
        assert mse(s) == pytest.approx(best, rel=1e-12, abs=0)


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.device("cpu")),
    pytest.param("cuda", marks=[pytest.mark.device("cuda"), pytest.mark.skipif(
        not GPU, reason="needs a CUDA GPU (none here)")]),
])
@pytest.mark.parametrize("bits,narrow", [(5, True), (3, True), (4, False)])
def test_mse_sweep_is_the_reference_argmin_on_every_device(device, bits, narrow):
    """The sweep's candidates k/points * max and steps s / L are quotients by tensors, so they
    are the correctly rounded values on every device (CUDA divides by a Python number as a
    product with its reciprocal: off in the last bit for points = 100 or L = 2**(B-1) - 1);
    the chosen scale is the first lowest-error candidate of the reference's squared errors."""
    x = make_data((7, 300), seed=9)
    s_max = x.abs().amax(1)
    fractions = torch.arange(1, 101, dtype=torch.float32) / torch.tensor(100.0)
    cand = fractions[None, :] * s_max[:, None]  # [groups, 100]
    err = torch.cat([reference.candidate_sse(x, cand[:, k:k + 10], bits, True, 0, None, narrow)
                     for k in range(0, 100, 10)], 1)
    expected = cand.gather(1, err.argmin(1, keepdim=True)).squeeze(1)  # first of exact ties
    got = ok.mse_sweep_scale(x, bits, dim=0, narrow=narrow)
    differ = got != expected
    if bool(differ.any()):  # only where two candidates' errors tie to the last bits
        got_err = reference.candidate_sse(x, got[:, None], bits, True, 0, None, narrow)[:, 0]
        torch.testing.assert_close(got_err[differ], err.min(1).values[differ], rtol=1e-12,
                                   atol=0.0)


@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_octav_calibrator_is_octav_scale(gran, signed):
    x = make_data(SHAPE, signed=signed, seed=4)
    expected = reference_scale(x, 3, signed=signed, **gran)
    got = ok.OctavCalibrator()(x, 3, signed=signed, **gran)
    torch.testing.assert_close(got, expected, rtol=SCALE_RTOL[torch.float32], atol=0)
    # The warm start is passed through (on groups this small the fixed point it reaches may
    # differ from the cold one: the recursion has several on discrete data).
    init = expected * 1.05
    warm = ok.OctavCalibrator()(x, 3, signed=signed, init=init, **gran)
    torch.testing.assert_close(warm, reference_scale(x, 3, signed=signed, init=init, **gran),
                               rtol=SCALE_RTOL[torch.float32], atol=0)
    paper = ok.OctavCalibrator(max_iters=10, rtol=0.0)(x, 3, signed=signed, **gran)
    torch.testing.assert_close(
        paper, reference_scale(x, 3, signed=signed, max_iters=10, rtol=0.0, **gran),
        rtol=SCALE_RTOL[torch.float32], atol=0)


def test_octav_never_worse_than_max_in_model_mse_on_gaussian():
    """SPEC §1 model MSE at the OCTAV scale <= at max|x| (OCTAV minimizes it)."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(5))
    a = x.double().abs()

    def model_mse(s, bits=4):
        s = s.double()
        return (s**2 * 4.0**-bits / 3 * ((a > 0) & (a <= s)).double().mean()
                + ((a - s).square() * (a > s)).mean()).item()

    assert model_mse(ok.OctavCalibrator()(x, 4)) < model_mse(ok.MaxCalibrator()(x, 4))


def test_make_calibrator():
    assert isinstance(ok.make_calibrator("octav"), ok.OctavCalibrator)
    assert ok.make_calibrator("percentile").percentile == 99.99
    assert ok.make_calibrator("percentile:99.9").percentile == 99.9
    assert ok.make_calibrator("mse").points == 100
    assert ok.make_calibrator("mse:200").points == 200
    c = ok.MaxCalibrator()
    assert ok.make_calibrator(c) is c


@pytest.mark.parametrize("spec, exc, match", [
    ("minmax", ValueError, "calibrator must be one of"),
    ("max:3", ValueError, "takes no argument"),
    ("percentile:abc", ValueError, "percentile:abc"),
    ("percentile:0", ValueError, "percentile must be in"),
    ("mse:0", ValueError, "points must be >= 1"),
    (3, TypeError, "calibrator must be a str"),
])
def test_make_calibrator_errors(spec, exc, match):
    with pytest.raises(exc, match=match):
        ok.make_calibrator(spec)


def test_calibrator_argument_errors():
    x = torch.randn(8)
    with pytest.raises(ValueError, match="bits"):
        ok.MaxCalibrator()(x, 1)
    with pytest.raises(ValueError, match="bits"):
        ok.PercentileCalibrator()(x, 17)
    with pytest.raises(TypeError, match="x must be"):
        ok.MaxCalibrator()(torch.arange(4), 4)
    with pytest.raises(ValueError, match="max_iters"):
        ok.OctavCalibrator(max_iters=-1)
