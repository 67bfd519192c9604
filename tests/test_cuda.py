"""The CUDA kernels (csrc/cuda/) on a GPU: every solver path of octav.cu against the reference,
the fused octav_fake_quantize, the bit-packed PWL mask, unaligned inputs and determinism. All
skip without a GPU and a CUDA build of the extension; the parity matrix of test_octav.py /
test_fake_quant.py runs the same backend as ``cuda-cuda``, and test_robustness.py holds the
tensor of more than 2**31 elements (OCTAV_LARGE_TESTS=1)."""

import pytest
import torch
from conftest import GPU, assert_bitwise, assert_scale_close, make_data, reference_scale

import octav_kernels as ok
from octav_kernels import backend, reference, use_backend
from octav_kernels import cuda as cuda_backend
from octav_kernels._args import levels

pytestmark = [
    pytest.mark.skipif(not (GPU and backend.cuda_kernels_built()),
                       reason="needs a CUDA GPU and octav_kernels._C built with CUDA kernels"),
    pytest.mark.device("cuda"),
]

# One case per path of csrc/cuda/octav.cu (thresholds: 1024 elements for a warp per group,
# 160 KiB of shared memory for a block per group, i.e. 40960 float32 / 81920 16-bit elements).
SOLVER_PATHS = [
    pytest.param((37, 1000), {"dim": 0}, id="warp-per-group"),
    pytest.param((5, 3000), {"dim": 0}, id="block-per-group"),
    pytest.param((3, 45000), {"dim": 0}, id="block-per-group-global-fp32"),
    pytest.param((2, 90000), {"dim": 0}, id="block-per-group-global"),
    pytest.param((4, 7, 300), {"dim": 1}, id="strided-groups"),
    pytest.param((64, 96), {"group_size": 32}, id="blocks"),
    pytest.param((700,), {}, id="tensor-warp"),
    pytest.param((20_000,), {}, id="tensor-block"),
    pytest.param((200_003,), {}, id="tensor-cooperative"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("shape,kw", SOLVER_PATHS)
def test_solver_paths(shape, kw, signed, dtype):
    x = make_data(shape, dtype, signed, seed=len(shape) + shape[-1])
    expected = reference_scale(x, 4, signed=signed, **kw)
    warm_init = expected * 1.03
    with use_backend("cuda"):
        scale = ok.octav_scale(x, 4, signed=signed, **kw)
        y, fused_scale = ok.octav_fake_quantize(x, 4, signed=signed, **kw)
        warm = ok.octav_scale(x, 4, signed=signed, init=warm_init, **kw)
        sums = ok.masked_sums(x, expected, signed=signed, **kw)
    assert_scale_close(scale, expected, dtype)
    assert torch.equal(fused_scale, scale)
    assert_bitwise(y, reference.fake_quantize(x, scale, 4, signed, **kw))
    assert_scale_close(warm, reference_scale(x, 4, signed=signed, init=warm_init, **kw), dtype)
    with use_backend("reference"):
        ref_sums = ok.masked_sums(x, expected, signed=signed, **kw)
    assert torch.equal(sums[1], ref_sums[1]) and torch.equal(sums[2], ref_sums[2])
    assert_scale_close(sums[0], ref_sums[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("numel", [1, 31, 4096, 10_007])
def test_packed_pwl_mask(numel, signed, dtype):
    """The forward's bit-packed mask is SPEC §3's PWL pass-through set, and the mask-only
    backward equals the PWL backward from x."""
    x = make_data((numel,), dtype, signed, seed=numel)
    x[0] = float("nan")
    scale = reference_scale(x[1:], 3, signed=signed) if numel > 1 else torch.tensor(1.0)
    y, mask = backend.compiled().fake_quantize_cuda(x, scale.reshape(1), 1, 1, numel,
                                                    *levels(4, signed, False), signed, True)
    assert torch.equal(mask, reference.pwl_mask(x, scale, signed))
    assert_bitwise(y, reference.fake_quantize(x, scale, 4, signed))
    g = make_data((numel,), dtype, seed=numel + 1)
    assert_bitwise(backend.compiled().masked_backward_cuda(g, mask),
                   reference.fake_quantize_backward(g, x, scale, signed, grad="pwl"))


@pytest.mark.parametrize("grad", ["ste", "pwl", "mad"])
def test_unaligned_inputs_take_the_scalar_path(grad):
    """A view starting one element into its storage is contiguous but not 16-byte aligned."""
    base = make_data((4100,), seed=3)
    x = base[1:]
    g = make_data((4102,), seed=4)[3:]
    with use_backend("cuda"):
        s = ok.octav_scale(x, 4)
        y = ok.fake_quantize(x, s, 4)
        gx = torch.ops.octav.fake_quantize_backward(g, x, s, grad=grad)
    assert_scale_close(s, reference_scale(x, 4), torch.float32)
    assert_bitwise(y, reference.fake_quantize(x, s, 4))
    assert_bitwise(gx, reference.fake_quantize_backward(g, x, s, grad=grad))


def test_deterministic():
    """No floating-point atomics: the same input gives the same bits, run after run."""
    x = make_data((1 << 20,), seed=5)
    w = make_data((256, 4096), seed=6)
    with use_backend("cuda"):
        runs = [(ok.octav_scale(x, 4), ok.octav_scale(w, 4, dim=0),
                 ok.masked_sums(x, torch.tensor(1.0))[0]) for _ in range(3)]
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)


def test_more_groups_than_a_grid_dimension_holds():
    """More than 65535 groups (per-block scales of a large weight): masked_sums and the
    refinement's candidate_sse index groups on the 1-D grid, not on gridDim.y."""
    x = make_data((70_000, 8), torch.bfloat16, seed=41)
    scale = reference_scale(x, 4, group_size=4)
    with use_backend("reference"):
        expected = ok.masked_sums(x, scale, group_size=4)
    got = ok.masked_sums(x, scale, group_size=4)
    assert torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[2])
    assert_scale_close(got[0], expected[0], torch.bfloat16)
    cand = torch.rand(scale.numel(), 6, device="cuda") + 0.1  # the coarse pass's K
    torch.testing.assert_close(cuda_backend.candidate_sse(x, cand, 4, group_size=4),
                               reference.candidate_sse(x, cand, 4, group_size=4),
                               rtol=1e-11, atol=0.0)
