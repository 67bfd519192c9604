"""What the GPU code decides on the host, checked on any machine: the CUDA OCTAV solver's path
from a device's shared-memory budget (csrc/cuda/solver_path.h), the routing of GPUs the build
has no kernel image for (octav_kernels.backend), that every Triton launch runs on its tensor's
GPU, and the Triton multi-program pass of large groups (interpreted here), bit for bit the
one-program pass. The GPU runs of these paths are in test_cuda.py and the parity matrix."""

import ast
from pathlib import Path

import pytest
import torch
from conftest import assert_bitwise, assert_scale_close, make_data, reference_scale

import octav_kernels as ok
from octav_kernels import backend, use_backend

NEEDS_C = pytest.mark.skipif(not backend.available("cpu", torch.device("cpu")),
                             reason="octav_kernels._C not built")
NEEDS_TRITON = pytest.mark.skipif(not backend.available("triton", torch.device("cpu")),
                                  reason="triton not installed or TRITON_INTERPRET unset")

# cudaDeviceProp::sharedMemPerBlockOptin of three architectures, and the block-per-group
# kernel's static shared memory (32 Totals of 32 bytes: its reduction scratch).
OPTIN = {"sm_86": 101_376, "sm_80": 166_912, "sm_90": 232_448}
STATIC = 1024


@NEEDS_C
def test_smem_budget_is_the_opt_in_limit_less_static_memory():
    budget = backend.compiled().cuda_smem_budget
    assert budget(OPTIN["sm_86"], STATIC) == 100_352
    assert budget(OPTIN["sm_90"], STATIC) == 231_424
    assert budget(512, STATIC) == 0


@NEEDS_C
@pytest.mark.parametrize("case,sm_86,sm_90", [
    # octav_scale(torch.randn(30_000, device="cuda"), 4): 120 KB, over an sm_86 block's budget
    ((1, 30_000, 4), "whole-tensor", "block-per-group"),
    # a [64, 30000] weight per channel
    ((64, 30_000, 4), "block-per-group-global", "block-per-group"),
    # float16 groups of 55K-80K elements (50K, 100 KB, still fits sm_86's 98 KiB + 1 KiB)
    ((16, 50_000, 2), "block-per-group", "block-per-group"),
    ((16, 60_000, 2), "block-per-group-global", "block-per-group"),
    ((16, 80_000, 2), "block-per-group-global", "block-per-group"),
    ((1, 120_000, 2), "whole-tensor", "whole-tensor"),
    # short groups: a warp each, whatever the device
    ((4096, 1024, 4), "warp-per-group", "warp-per-group"),
    ((4096, 1025, 4), "block-per-group", "block-per-group"),
    # exactly the budget still fits a block
    ((3, 100_352 // 4, 4), "block-per-group", "block-per-group"),
    ((3, 100_352 // 4 + 1, 4), "block-per-group-global", "block-per-group"),
])
def test_solver_path_fits_the_device(case, sm_86, sm_90):
    """The path solve() and the fused op take, from the device's budget: the sizes that made
    the old fixed 160 KiB request fail on sm_86 / sm_89 GPUs."""
    lib = backend.compiled()
    for arch, expected in (("sm_86", sm_86), ("sm_90", sm_90)):
        assert lib.cuda_solver_path(*case, lib.cuda_smem_budget(OPTIN[arch], STATIC)) == expected


@pytest.mark.parametrize("capability, sass, ptx, expected", [
    ((8, 0), [80, 90], [90], "sass"),  # A100
    ((8, 6), [80, 90], [90], "sass"),  # A10 / RTX 30: sm_80 cubins run within major 8
    ((8, 9), [80, 90], [90], "sass"),  # L4 / L40S / RTX 40
    ((9, 0), [80, 90], [90], "sass"),  # H100 / H200
    ((10, 0), [80, 90], [90], "ptx"),  # B200: the compute_90 PTX, compiled by the driver
    ((12, 0), [80, 90], [90], "ptx"),  # RTX 50
    ((7, 5), [80, 90], [90], None),  # T4
    ((7, 0), [80, 90], [90], None),  # V100
    ((10, 0), [80, 90], [], None),  # no PTX built
    ((8, 0), [86], [], None),  # a cubin for a later minor does not run on an earlier one
    ((8, 6), [], [80], "ptx"),
])
def test_image_for_a_compute_capability(capability, sass, ptx, expected):
    """Which image of the build a GPU runs, from its compute capability alone (no CUDA
    context): issue 29's probe opened one on every visible GPU at CUDA initialization."""
    assert backend.image_for(capability, sass, ptx) == expected


def test_gpu_plan_and_route():
    """GPUs without a kernel image are routed to the fallback kernels, the others keep the
    C++ ones (decided once, at CUDA initialization)."""
    assert backend.gpu_plan(3, lambda i: i != 1) == {1}
    assert backend.gpu_plan(2, lambda i: True) == set()
    calls = []
    kernel = backend.route(lambda *a: calls.append("cpp") or "cpp",
                           lambda *a: calls.append("python") or "python", {-1})
    # CPU tensors report device -1: routed as an unsupported GPU would be
    assert kernel(torch.ones(2), 4, None) == "python"
    kernel = backend.route(lambda *a: "cpp", lambda *a: "python", {0})
    assert kernel(3, torch.ones(2)) == "cpp"


def test_forced_cuda_backend_refuses_gpus_without_an_image(monkeypatch):
    """use_backend("cuda") must not hand a GPU without a kernel image to Triton silently
    (issue 29): its kernels raise, naming the GPU and the architectures built. Here the
    registration runs on a CPU machine with one such GPU pretended, and the refusal is called
    directly (CPU tensors report device -1)."""
    refuse = backend.refusing_cuda({-1: "Tesla T4, sm_75"}, [80, 90], [90])
    with pytest.raises(RuntimeError, match=r"^octav backend 'cuda' cannot serve GPU -1 "
                       r"\(Tesla T4, sm_75\): this build has kernel images for sm_80, sm_90, "
                       r"compute_90 PTX; rebuild"):
        refuse(3, torch.ones(2))
    kernel = backend.route(lambda *a: "cpp", refuse, {0})
    assert kernel(torch.ones(2)) == "cpp"  # the other GPUs keep the C++ kernels

    class Built:
        cuda_sass, cuda_ptx = [80, 90], [90]

    monkeypatch.setattr(backend, "compiled", lambda: Built)
    monkeypatch.setattr(backend, "native", lambda device_type: "cuda")
    monkeypatch.setattr(backend, "_unsupported_gpus", {1: "Tesla T4, sm_75"})
    lib = backend._override("cuda")  # registers the refusing routes for the CUDA key
    try:  # what the CUDA key now runs (called with CPU tensors: no C++ kernels kept here)
        cuda = torch.library.get_kernel("octav::fake_quantize", "CUDA")
        keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
        with pytest.raises(RuntimeError, match="^octav backend 'cuda' cannot serve GPU -1 "
                                               r"\(unknown\): this build has kernel images "
                                               "for sm_80, sm_90, compute_90 PTX"):
            cuda.call_boxed(keys, torch.ones(3), torch.tensor(1.0), 4, True, None, None,
                            "mad", False)
    finally:
        backend._override("auto", lib)
    x = make_data((4, 8), seed=1)
    torch.testing.assert_close(ok.fake_quantize(x, torch.tensor(1.0), 4),
                               ok.reference.fake_quantize(x, torch.tensor(1.0), 4))


def test_triton_launches_on_the_tensors_gpu(monkeypatch):
    """launch() enters torch.cuda.device(x.device) for a CUDA tensor (a tensor on cuda:1 while
    cuda:0 is current), and every Triton launch of the package goes through it."""
    from octav_kernels.triton import _common

    entered = []

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: entered.append(("launch", grid, args))

    class OnGPU1:  # what launch() reads of a CUDA tensor
        is_cuda = True
        device = torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "device", Device)
    _common.launch(Kernel(), (4,), OnGPU1(), 7)
    assert entered == [torch.device("cuda", 1), ("launch", (4,), (7,))]
    entered.clear()
    _common.launch(Kernel(), (1,), torch.ones(1), 8)  # CPU (interpreter): no device switch
    assert entered == [("launch", (1,), (8,))]

    launches = []
    for path in Path(_common.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and path.name != "_common.py"):
                launches.append(f"{path.name}:{node.lineno}")
    assert launches == [], f"Triton launches outside _common.launch: {launches}"


@NEEDS_TRITON
@pytest.mark.parametrize("case", [
    pytest.param(((5_000,), {}), id="tensor"),
    pytest.param(((3, 2_500), {"dim": 0}), id="channels"),
    pytest.param(((2_600, 3), {"dim": 1}), id="strided"),
])
def test_triton_multi_program_pass_is_the_one_program_pass(monkeypatch, case):
    """Large groups spread each pass over one program per block; the block sums are added in
    the one-program pass's order (chunks of CHUNK_BLOCKS blocks, then the chunks; here 2 blocks
    a chunk and 2 chunks side by side in the finish, so several chunks, tiles and a short last
    chunk occur), so scales and sums are the same bits, for cold and warm starts and early
    stops, weighted or not."""
    from octav_kernels.triton import octav as triton_octav

    shape, gran = case
    x = make_data(shape, seed=11)
    h = torch.rand(shape, generator=torch.Generator().manual_seed(12)) ** 2
    scale = reference_scale(x, 4, **gran)
    monkeypatch.setattr(triton_octav, "CHUNK_BLOCKS", 2)
    monkeypatch.setattr(triton_octav, "_CHUNK_TILE", 2)
    runs = []
    for multi_min in (1 << 62, 2_048):  # the one-program path, then the multi-program one
        monkeypatch.setattr(triton_octav, "MULTI_MIN", multi_min)
        with use_backend("triton"):
            runs.append([ok.octav_scale(x, 4, **gran),
                         ok.octav_scale(x, 3, signed=False, **gran),
                         ok.octav_scale(x, 4, init=scale * 1.02, **gran),
                         ok.octav_scale(x, 4, max_iters=2, rtol=0.0, **gran),
                         ok.octav_scale(x, 4, max_iters=0, **gran),
                         ok.octav_scale(x, 4, init=scale, max_iters=0, **gran),
                         ok.octav_scale(x, 4, importance=h, **gran),
                         *ok.masked_sums(x, scale * 0.8, **gran),
                         *ok.masked_sums(x, scale * 0.8, importance=h, **gran)])
    for one, multi in zip(*runs):
        assert_bitwise(multi, one)
    assert_scale_close(runs[1][0], scale, torch.float32)
