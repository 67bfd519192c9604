"""The backend / dtype matrix of the parity suite, test data, and the tolerance table.

Triton runs on CPU tensors through its interpreter: TRITON_INTERPRET must be set before triton
is first imported, hence at the very top of this file.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from octav_kernels import backend, ops  # noqa: E402

GPU = torch.cuda.is_available()


def _backend_param(name: str, device: str, reason: str):
    """A backend on a device, as a test parameter: the value is the backend name, the id says
    where it runs ("triton" = interpreted on CPU tensors, "triton-cuda" = compiled on a GPU),
    and the ``device`` mark makes the ``_test_device`` fixture create the test's tensors there."""
    tag = name if device == "cpu" else f"{name}-{device}"
    if device == "cuda" and not GPU:
        ok, reason = False, "needs a CUDA GPU (none here)"
    else:
        ok = backend.available(name, torch.device(device))
    if not ok and tag in os.environ.get("OCTAV_REQUIRE_BACKENDS", "").split(","):
        pytest.exit(f"OCTAV_REQUIRE_BACKENDS lists {tag!r}, which is unavailable: {reason}",
                    returncode=3)
    return pytest.param(name, id=tag,
                        marks=[pytest.mark.skipif(not ok, reason=reason),
                               pytest.mark.device(device)])


# Backends checked against octav_kernels.reference (the oracle, never "checked" against itself).
# CI sets OCTAV_REQUIRE_BACKENDS=cpu,triton so that a missing backend fails instead of skipping;
# on a GPU machine, OCTAV_REQUIRE_BACKENDS=triton-cuda,cuda-cuda and TRITON_INTERPRET=0 run the
# same matrix on CUDA tensors with compiled Triton and the CUDA kernels.
KERNEL_BACKENDS = [
    _backend_param("cpu", "cpu", "octav_kernels._C not built"),
    _backend_param("triton", "cpu", "triton not installed or TRITON_INTERPRET unset"),
    _backend_param("triton", "cuda", "triton not installed"),
    _backend_param("cuda", "cuda", "octav_kernels._C built without CUDA kernels"),
]

# Every backend, for tests whose expected values are derived by hand.
ALL_BACKENDS = [pytest.param("reference", id="reference"),
                _backend_param("reference", "cuda", "")] + KERNEL_BACKENDS


@pytest.fixture(autouse=True)
def _test_device(request):
    """Tensors (and modules) a test creates land on its backend's device."""
    mark = request.node.get_closest_marker("device")
    if mark is None or mark.args[0] == "cpu":
        yield
        return
    with torch.device(mark.args[0]):
        yield


def pytest_configure(config):
    config.addinivalue_line("markers", "device(name): the device a backend parameter runs on")


def on_device(t: torch.Tensor) -> torch.Tensor:
    """``t`` moved to the device the running test creates tensors on."""
    return t.to(torch.get_default_device())


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
BITS = [2, 3, 4, 8, 16]
# (signed, narrow)
GRIDS = [pytest.param((True, False), id="signed"), pytest.param((False, False), id="unsigned"),
         pytest.param((True, True), id="narrow")]
# Granularities on the matrix shape (6, 5, 12): per tensor; per channel along a leading, a middle
# (strided groups) and the last dim (inner = 1); blocks of 4 along the last dim.
MATRIX_SHAPE = (6, 5, 12)
GRANULARITIES = [
    pytest.param({}, id="tensor"),
    pytest.param({"dim": 0}, id="dim0"),
    pytest.param({"dim": 1}, id="dim1"),
    pytest.param({"dim": -1}, id="dim-1"),
    pytest.param({"group_size": 4}, id="group4"),
]

# Relative tolerance of a returned scale against the reference, per input dtype. Every input
# dtype converts exactly to float32 (and float64 stays float64), so backends differ only in how
# S_out is accumulated: float64 in the reference; float32 over 256-element blocks then float64
# in the C++ kernels (relative error below ~64 * 2**-24 = 4e-6 in the worst case, ~1e-7
# typically); float32 per block in Triton (below ~log2(n) * 2**-24 for the n <= 50000 elements
# of a test group); plus the final float32 rounding of s (2**-24). 1e-5 bounds these; it is far
# below what a wrong count would cause (one element moving across s changes s by ~1/n_out).
SCALE_RTOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5,
              torch.float64: 1e-5}
# fake_quantize and its backward are elementwise IEEE float32 (float64 for float64 gradients)
# with the same operation order on every backend: results must match bit for bit.


# (backend, dtype) pairs of the matrix; float64 is CPU-only (SPEC §6), so only for cpu.
BACKEND_DTYPES = [
    pytest.param(b.values[0], dtype, marks=b.marks, id=f"{b.id}-{str(dtype)[6:]}")
    for b in KERNEL_BACKENDS for dtype in DTYPES
    if b.values[0] == "cpu" or dtype != torch.float64
]


def make_data(shape, dtype=torch.float32, signed=True, seed=0, zeros=0.1):
    """Heavy-tailed test data (Gaussian with log-normal magnitudes) with a fraction of exact
    zeros; unsigned data keeps some negative entries, which OCTAV must ignore."""
    gen = torch.Generator().manual_seed(seed)
    kw = {"generator": gen, "dtype": torch.float64, "device": "cpu"}
    x = torch.randn(shape, **kw)
    x = x * torch.exp(0.5 * torch.randn(shape, **kw))
    x = torch.where(torch.rand(shape, **kw) < zeros, 0.0, x)
    if not signed:
        x = torch.where(torch.rand(shape, **kw) < 0.8, x.abs(), x)
    return on_device(x.to(dtype))


def assert_scale_close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, rtol=SCALE_RTOL[dtype], atol=0.0,
                               equal_nan=True)


def assert_bitwise(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=0.0, equal_nan=True)


def reference_scale(x, bits, **kw):
    """octav_scale served by the reference backend (through the op, so arguments are checked
    and normalized exactly as for the kernels)."""
    with backend.use_backend("reference"):
        return ops.octav_scale(x, bits, **kw)
