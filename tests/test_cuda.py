"""The CUDA kernels (csrc/cuda/) on a GPU: every solver path of octav.cu against the reference,
the fused octav_fake_quantize, the bit-packed PWL mask, unaligned inputs, determinism, and a
second GPU. All skip without a GPU and a CUDA build of the extension; the parity matrix of
test_octav.py / test_fake_quant.py runs the same backend as ``cuda-cuda``, and
test_robustness.py holds the tensor of more than 2**31 elements (OCTAV_LARGE_TESTS=1).
What runs without a GPU (the solver's path decision, the routing of GPUs without a kernel
image) is tested in test_gpu_logic.py."""

import pytest
import torch
from conftest import GPU, assert_bitwise, assert_scale_close, make_data, reference_scale
from test_lsq import assert_scale_grad_close

import octav_kernels as ok
from octav_kernels import backend, reference, use_backend

pytestmark = [
    pytest.mark.skipif(not (GPU and backend.cuda_kernels_built()),
                       reason="needs a CUDA GPU and octav_kernels._C built with CUDA kernels"),
    pytest.mark.device("cuda"),
]

# One case per path of csrc/cuda/octav.cu; the sizes at the block-per-group thresholds come from
# this GPU's shared-memory budget (csrc/cuda/solver_path.h).
SOLVER_PATHS = ["warp-per-group", "block-per-group", "block-per-group-global", "strided-groups",
                "blocks", "tensor-warp", "tensor-block", "tensor-cooperative", "few-groups",
                "few-groups-strided"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def path_case(path, dtype):
    """(shape, granularity, the solver path it takes) for one case of SOLVER_PATHS."""
    budget = backend.compiled().cuda_octav_smem_budget(torch.cuda.current_device())
    on_chip = budget // (torch.finfo(dtype).bits // 8)  # the most elements a block holds
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    shape, kw = {
        "warp-per-group": ((37, 1000), {"dim": 0}),
        "block-per-group": ((5, 3000), {"dim": 0}),
        # Global-memory groups: a block each from as many groups as SMs, else split across
        # blocks (the few-groups cooperative kernel, decided at the call from the SM count).
        "block-per-group-global": ((sms + 1, on_chip + 5000), {"dim": 0}),
        "few-groups": ((2, on_chip + 5000), {"dim": 0}),
        "few-groups-strided": ((8, 3, on_chip // 8 + 700), {"dim": 1}),
        "strided-groups": ((4, 7, 300), {"dim": 1}),
        "blocks": ((64, 96), {"group_size": 32}),
        "tensor-warp": ((700,), {}),
        "tensor-block": ((min(20_000, on_chip),), {}),
        "tensor-cooperative": ((on_chip + 50_003,), {}),
    }[path]
    g = ok._args.groups(torch.empty(shape, device="meta"), kw.get("dim"), kw.get("group_size"))
    taken = backend.compiled().cuda_solver_path(g.n_groups, g.outer * g.inner,
                                                torch.finfo(dtype).bits // 8, budget)
    return shape, kw, taken


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("path", SOLVER_PATHS)
def test_solver_paths(path, signed, dtype):
    shape, kw, taken = path_case(path, dtype)
    assert taken == {"strided-groups": "block-per-group", "blocks": "warp-per-group",
                     "tensor-warp": "warp-per-group", "tensor-block": "block-per-group",
                     "tensor-cooperative": "whole-tensor",
                     "few-groups": "block-per-group-global",
                     "few-groups-strided": "block-per-group-global"}.get(path, path)
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


def test_few_groups_split_weighted_warm_and_early_stops():
    """The few-groups cooperative kernel (issue 29) with importance, warm starts, early stops
    and max_iters=0, against the reference; the same bits over repeated calls."""
    budget = backend.compiled().cuda_octav_smem_budget(torch.cuda.current_device())
    x = make_data((3, budget // 4 + 7000), seed=31)
    h = torch.rand(x.shape[1], generator=torch.Generator().manual_seed(32)).to(x.device)
    expected = reference_scale(x, 4, dim=0)
    cases = [dict(importance=h), dict(init=expected * 1.05), dict(max_iters=2, rtol=0.0),
             dict(max_iters=0), dict(init=expected, max_iters=0), dict(signed=False)]
    for kw in cases:
        data = x if kw.get("signed", True) else x.abs()
        want = reference_scale(data, 4, dim=0, **kw)
        with use_backend("cuda"):
            runs = [ok.octav_scale(data, 4, dim=0, **kw) for _ in range(3)]
        assert_scale_close(runs[0], want, torch.float32)
        assert all(torch.equal(r, runs[0]) for r in runs), kw


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("numel", [1, 31, 4096, 10_007])
def test_packed_pwl_mask(numel, signed, dtype):
    """The forward's bit-packed mask is SPEC §3's PWL pass-through set, and the mask-only
    backward equals the PWL backward from x."""
    x = make_data((numel,), dtype, signed, seed=numel)
    x[0] = float("nan")
    scale = reference_scale(x[1:], 3, signed=signed) if numel > 1 else torch.tensor(1.0)
    y, mask = torch.ops.octav._fake_quantize_packed(x, scale, 4, signed)
    assert torch.equal(mask, reference.pwl_mask(x, scale, signed))
    assert_bitwise(y, reference.fake_quantize(x, scale, 4, signed))
    g = make_data((numel,), dtype, seed=numel + 1)
    assert_bitwise(torch.ops.octav._pwl_backward_packed(g, mask),
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
    torch.testing.assert_close(torch.ops.octav._candidate_sse(x, cand, 4, True, None, 4),
                               reference.candidate_sse(x, cand, 4, group_size=4),
                               rtol=1e-11, atol=0.0)


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")


_CONTEXTS = r"""
import os, sys, torch, pynvml
import octav_kernels as ok
x = torch.randn(4096, 64, device="cuda:0")
for name in ("cuda", "triton"):
    with ok.use_backend(name):
        ok.octav_fake_quantize(x, 4, dim=0)
torch.cuda.synchronize()
pynvml.nvmlInit()
mine = os.getpid()
seen = []
for i in range(pynvml.nvmlDeviceGetCount()):
    handle = pynvml.nvmlDeviceGetHandleByIndex(i)
    if any(p.pid == mine for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)):
        seen.append(i)
print(seen)
"""


@TWO_GPUS
def test_a_process_opens_a_context_only_on_the_gpus_it_uses():
    """Issue 29: importing the package and running ops on cuda:0 opens no CUDA context on the
    other GPUs (the kernel-image decision reads compute capabilities, no probe per device).
    Counted with pynvml in a fresh process; skips without pynvml."""
    import subprocess
    import sys

    pytest.importorskip("pynvml")
    proc = subprocess.run([sys.executable, "-c", _CONTEXTS], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = proc.stdout.strip().splitlines()[-1]
    if not seen.startswith("[0"):  # NVML lists host PIDs: a PID namespace hides ours
        pytest.skip(f"pynvml does not list this process on cuda:0 ({seen})")
    assert seen == "[0]", proc.stdout


@TWO_GPUS
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_tensors_on_a_second_gpu(name):
    """Tensors on cuda:1 while cuda:0 is current (model parallelism): every kernel launches on
    the tensor's GPU (CUDA: device guards; Triton: torch.cuda.device around each launch)."""
    torch.cuda.set_device(0)
    x = make_data((64, 300), seed=8).to("cuda:1")
    g = make_data((64, 300), seed=9).to("cuda:1")
    with use_backend("reference"):
        s_ref = ok.octav_scale(x, 4, dim=0)
        y_ref = ok.fake_quantize(x, s_ref, 4, dim=0)
    leaf = x.clone().requires_grad_()
    with use_backend(name):
        s = ok.octav_scale(x, 4, dim=0)
        y, s2 = ok.octav_fake_quantize(leaf, 4, dim=0, grad="mad")
        y.backward(g)
        refined = ok.refine_scale(x, s, 4, dim=0)
    assert s.device == y.device == refined.device == torch.device("cuda:1")
    assert_scale_close(s, s_ref, torch.float32)
    assert_bitwise(ok.fake_quantize(x, s_ref, 4, dim=0), y_ref)
    assert_bitwise(leaf.grad, reference.fake_quantize_backward(g, x, s2, True, 0, None, "mad"))


def test_triton_multi_program_pass_on_the_gpu(monkeypatch):
    """Compiled Triton: the multi-program pass of large groups gives the one-program pass's
    bits (its block sums are added in the same order), cold, warm and for masked_sums."""
    from octav_kernels.triton import octav as triton_octav

    x = make_data((3, 70_000), seed=12)
    scale = reference_scale(x, 4, dim=0)
    runs = []
    for multi_min in (1 << 62, 4_096):
        monkeypatch.setattr(triton_octav, "MULTI_MIN", multi_min)
        with use_backend("triton"):
            runs.append([ok.octav_scale(x, 4, dim=0), ok.octav_scale(x.reshape(-1), 3),
                         ok.octav_scale(x, 4, dim=0, init=scale * 1.02),
                         *ok.masked_sums(x, scale, dim=0)])
    for one, multi in zip(*runs):
        assert_bitwise(multi, one)
    assert_scale_close(runs[0][0], scale, torch.float32)


def test_nonfinite_scale_is_reported_without_a_sync_per_step():
    """On a GPU the quantizer records NaN/inf on the device and raises at its next check point
    (here: the first forward in eval), naming the module."""
    qz = ok.QuantAct(4).train()
    qz.name = "act"
    clean = make_data((4096,), seed=13)
    bad = clean.clone()
    bad[5] = float("nan")
    qz(clean)
    qz(bad)  # no host sync, no raise yet
    assert qz._unchecked == 2
    qz.eval()
    with pytest.raises(ValueError, match="^act: the input of one of the last 2 scale updates"):
        qz(clean)


def test_smem_budget_is_the_devices_opt_in_limit_less_static_memory():
    """The OCTAV kernel's shared-memory budget on this GPU is its opt-in per-block limit less
    the kernel's 1 KiB of static memory (issue 29; the host rule is in test_gpu_logic.py)."""
    lib = backend.compiled()
    device = torch.cuda.current_device()
    optin = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    assert lib.cuda_octav_smem_budget(device) == lib.cuda_smem_budget(optin, 1024)


def test_nonfinite_check_sees_compiled_steps_on_the_gpu():
    """Steps under torch.compile record NaN/inf on the device uncounted; check_finite(model)
    reads the flag anyway (issue 29; test_qat.py holds it with the deferred path forced on the
    CPU)."""
    bad = make_data((4096,), seed=14)
    bad[7] = float("nan")
    qz = ok.QuantAct(4, signed=True).train()
    qz.name = "act"
    compiled = torch.compile(qz)
    compiled(bad)
    compiled(bad)
    with pytest.raises(ValueError, match="^act: the input of a recent scale update"):
        ok.check_finite(torch.nn.Sequential(qz))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gran", [{"group_size": 32}, {"group_size": 128}, {"dim": 0}, {},
                                  {"dim": 1}],
                         ids=["g32", "g128", "channel", "tensor", "strided"])
def test_lsq_backward_matches_the_reference_and_repeats(gran, dtype):
    """The LSQ backward at the granularities of issue 29 (g32, g128 and rows of 512: a warp per
    group; per tensor: blocks over slices; dim 1: a thread per group and slice): grad_x bit for
    bit against the reference, grad_scale within float64-sum rounding of it and identical over
    3 runs."""
    x = make_data((256, 512), seed=15).to(dtype)
    g = make_data((256, 512), seed=16).to(dtype)
    scale = ok.max_scale(x, **gran) / 2
    dim, group_size = gran.get("dim"), gran.get("group_size")
    runs = [torch.ops.octav.fake_quantize_lsq_backward(g, x, scale, 4, True, dim, group_size,
                                                        "mad", False, True, None)
            for _ in range(3)]
    expected_x, expected_s = reference.fake_quantize_lsq_backward(g.cpu(), x.cpu(), scale.cpu(),
                                                                 4, True, dim, group_size)
    for grad_x, grad_s in runs:
        assert_bitwise(grad_x.cpu(), expected_x)
        assert_bitwise(grad_s, runs[0][1])
    assert_scale_grad_close(runs[0][1].cpu(), expected_s, x.cpu(), scale.cpu(), 4, g.cpu(),
                            **gran)
