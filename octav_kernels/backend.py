"""Which kernels serve the ``octav`` ops: registered once with PyTorch's dispatcher, which then
picks the kernel of each call by its tensors' device (no Python on that path).

- ``cpu``: the C++ kernels of ``octav_kernels._C`` (csrc/cpu/), registered for the CPU key by the
  extension itself, with the autograd of the differentiable ops (csrc/autograd.cpp).
- ``cuda``: the hand-written CUDA kernels of ``octav_kernels._C`` (csrc/cuda/, compiled when the
  extension is built with a CUDA toolkit), registered for the CUDA key; measured faster than
  Triton (bench/results/gpu_bench.md). A GPU the build has no kernel image for is served by
  Triton, with one warning, decided once when torch initializes CUDA from each GPU's compute
  capability and the architectures built (``image_for``, ``gpu_plan``, ``route``; no CUDA
  context is created for it).
- ``triton``: ``octav_kernels.triton``, registered here for the CUDA key when the CUDA kernels
  are not built. Runs on CPU tensors only under ``TRITON_INTERPRET=1`` (set before triton is
  imported), which is how the tests check it.
- ``reference``: plain PyTorch (``octav_kernels.reference``), registered as every op's default
  kernel: it serves any device without kernels of its own, and everything when ``_C`` is
  missing (one warning at import), with the autograd formulas of ``octav_kernels.ops``.

For tests and debugging, ``with octav_kernels.use_backend("triton"):`` (or ``OCTAV_BACKEND=...``
in the environment, read once at import) serves every op from one backend: its kernels are
registered over the default ones for the block and removed after it. A forced backend that
cannot serve a device raises ``RuntimeError`` there; it never falls back silently. ``auto`` (the
default) is the registration above.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

from . import drivers, reference
from .ops import OPS
from .ops.refine import _refine_kernel

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
_DEVICE_KEYS = (("cpu", "CPU"), ("cuda", "CUDA"))

try:  # registers the C++ kernels with the dispatcher
    from . import _C  # type: ignore[attr-defined]
except ImportError as _err:  # built without a compiler, or OCTAV_SKIP_EXT=1
    _C = None
    warnings.warn(
        f"octav_kernels: the compiled extension octav_kernels._C is not available ({_err}); "
        "every op on CPU tensors runs on the pure-PyTorch reference implementation (correct but "
        "slow). Rebuild with `pip install --no-build-isolation -e .` to get the C++ kernels.",
        RuntimeWarning,
        stacklevel=2,
    )


def compiled() -> ModuleType:
    """The compiled extension; ``RuntimeError`` if it was not built."""
    if _C is None:
        raise RuntimeError("octav_kernels._C is not built; the 'cpu' backend is unavailable")
    return _C


def cuda_kernels_built() -> bool:
    """Whether ``octav_kernels._C`` holds the CUDA kernels."""
    return _C is not None and bool(getattr(_C, "with_cuda", False))


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` can serve tensors on ``device``."""
    if name == "reference":
        return True
    if name == "cpu":
        return _C is not None and device.type == "cpu"
    if name == "triton":
        return triton_available() and (device.type == "cuda" or
                                       (device.type == "cpu" and _interpreting()))
    return cuda_kernels_built() and device.type == "cuda"


def native(device_type: str) -> str:
    """The backend the default registration serves ``device_type`` tensors from."""
    if device_type == "cpu":
        return "cpu" if _C is not None else "reference"
    if device_type == "cuda":
        if cuda_kernels_built():
            return "cuda"
        return "triton" if triton_available() else "reference"
    return "reference"


# ---------------------------------------------------------------------------------------------
# Python kernels: each op's checks around a backend module's function of the same name (without
# the leading underscore of internal ops), with the reference's signature.


def _module(name: str) -> ModuleType:
    if name == "reference":
        return reference
    if name == "triton":
        return importlib.import_module("octav_kernels.triton")
    raise ValueError(name)


def _lazy(backend: str, fn: str) -> Callable:
    """``backend``'s function ``fn``, imported at its first call (Triton's import is slow)."""
    def call(*args):
        return getattr(_module(backend), fn)(*args)
    return call


def _cuda_refine(x, scale, bits, signed, dim, group_size, narrow, importance):
    """refine_scale on the CUDA kernels: the shared search over their ``_candidate_sse``."""
    return drivers.refine_scale(torch.ops.octav._candidate_sse.default, x, scale, bits, signed,
                                dim, group_size, narrow, importance)


def _register_python(lib: torch.library.Library, backend: str, key: str) -> None:
    for op in OPS.values():
        lib.impl(op.name, op.kernel(_lazy(backend, op.name.lstrip("_"))), key)


def _register_unavailable(lib: torch.library.Library, backend: str, device_type: str,
                          key: str) -> None:
    def refuse(*args, **kwargs):
        raise RuntimeError(
            f"octav backend {backend!r} cannot serve {device_type} tensors here (cpu needs the "
            "compiled extension and CPU tensors; triton needs triton and CUDA tensors, or "
            "TRITON_INTERPRET=1 for CPU tensors; cuda needs CUDA tensors and an extension built "
            "with a CUDA toolkit)")
    for op in OPS.values():
        lib.impl(op.name, refuse, key)


# The default registration, for the life of the process.
_default = torch.library.Library("octav", "IMPL")
_register_python(_default, "reference", "CompositeExplicitAutograd")
if _C is None:
    for _op in OPS.values():
        if _op.backward is not None:
            torch.library.register_autograd(f"octav::{_op.name}", _op.backward,
                                            setup_context=_op.setup_context, lib=_default)
if cuda_kernels_built():
    _default.impl("refine_scale", _refine_kernel(_cuda_refine), "CUDA")
elif triton_available():
    _register_python(_default, "triton", "CUDA")


# ---------------------------------------------------------------------------------------------
# GPUs without a kernel image in this build (e.g. T4 / V100 for the default "8.0;9.0+PTX"):
# decided once, when torch initializes CUDA, from the compute capabilities (no CUDA context:
# a probe kernel would open one on every visible GPU, several GiB under torchrun, and fail on
# GPUs in EXCLUSIVE_PROCESS mode).

_gpu_fallback = torch.library.Library("octav", "IMPL")
# Set by _serve_unsupported_gpus: the GPUs without an image (index -> name and capability), and
# the C++ CUDA kernels (for a forced "cuda" backend, which must refuse those GPUs).
_unsupported_gpus: dict[int, str] = {}
_cpp_cuda_kernels: dict[str, Callable] = {}


def image_for(capability: tuple[int, int], sass, ptx) -> str | None:
    """The image of this build that a GPU of compute capability ``(major, minor)`` runs:
    ``"sass"`` (a cubin for ``major.m`` with ``m <= minor``: binary compatible within a major),
    ``"ptx"`` (PTX for an architecture at most its own, compiled by the driver at load; the
    driver must support the PTX version nvcc wrote), or None. ``sass`` / ``ptx``: the built
    architecture numbers (80 for sm_80)."""
    major, minor = capability
    if any(a // 10 == major and a % 10 <= minor for a in sass):
        return "sass"
    if any(a <= 10 * major + minor for a in ptx):
        return "ptx"
    return None


def gpu_plan(count: int, runs_on: Callable[[int], bool]) -> set[int]:
    """The GPUs (indices 0..count-1) the CUDA kernels cannot run on."""
    return {i for i in range(count) if not runs_on(i)}


def route(cpp: Callable, python: Callable, unsupported: set[int]) -> Callable:
    """A kernel that hands calls on the ``unsupported`` GPUs (by ``Tensor.get_device()`` of the
    first tensor argument) to ``python`` and the others to ``cpp``."""
    def kernel(*args):
        return python(*args) if _gpu_of(args) in unsupported else cpp(*args)
    return kernel


def _gpu_of(args) -> int:
    """The device index of an op call: ``Tensor.get_device()`` of its first tensor argument."""
    return next(a.get_device() for a in args if isinstance(a, torch.Tensor))


def _serve_unsupported_gpus() -> None:
    lib = compiled()
    unsupported = gpu_plan(torch.cuda.device_count(), lambda i: image_for(
        torch.cuda.get_device_capability(i), lib.cuda_sass, lib.cuda_ptx) is not None)
    if not unsupported:
        return
    fallback = "triton" if triton_available() else "reference"
    _unsupported_gpus.update({i: f"{torch.cuda.get_device_name(i)}, sm_"
                                 f"{''.join(map(str, torch.cuda.get_device_capability(i)))}"
                              for i in unsupported})
    names = ", ".join(f"{i} ({_unsupported_gpus[i]})" for i in sorted(unsupported))
    warnings.warn(f"octav_kernels: the CUDA kernels of this build have no kernel image for GPU "
                  f"{names}; its tensors are served by the {fallback} kernels instead (slower). "
                  "Rebuild with TORCH_CUDA_ARCH_LIST including its architecture to use them.",
                  RuntimeWarning, stacklevel=2)
    everywhere = len(unsupported) == torch.cuda.device_count()
    for op in OPS.values():
        python = op.kernel(_lazy(fallback, op.name.lstrip("_")))
        if op.name == "refine_scale":  # the driver, over _candidate_sse (routed itself)
            continue
        if everywhere:
            _gpu_fallback.impl(op.name, python, "CUDA")
            continue
        _cpp_cuda_kernels[op.name] = _boxed_cuda(torch.library.get_kernel(f"octav::{op.name}",
                                                                          "CUDA"))
        _gpu_fallback.impl(op.name, route(_cpp_cuda_kernels[op.name], python, unsupported),
                           "CUDA")
    if _forced:  # a forced backend stays on top
        _forced[-1] = (_forced[-1][0], _override(_forced[-1][0], _forced[-1][1]))


def _boxed_cuda(kernel) -> Callable:
    """A kernel handle of ``torch.library.get_kernel`` as a plain function of the op's args."""
    return functools.partial(kernel.call_boxed,
                             torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA))


def refusing_cuda(unsupported: dict[int, str], sass, ptx) -> Callable:
    """The kernel a forced ``cuda`` backend runs on the GPUs this build has no image for: a
    ``RuntimeError`` naming the GPU and the architectures built (never a silent fallback)."""
    built = ", ".join([f"sm_{a}" for a in sass] + [f"compute_{a} PTX" for a in ptx]) or "none"

    def refuse(*args):
        device = _gpu_of(args)
        raise RuntimeError(f"octav backend 'cuda' cannot serve GPU {device} "
                           f"({unsupported.get(device, 'unknown')}): this build has kernel "
                           f"images for {built}; rebuild with TORCH_CUDA_ARCH_LIST including "
                           "its architecture, or use the 'triton' backend")
    return refuse


def _register_cuda_refusal(lib: torch.library.Library) -> None:
    """Forced ``cuda`` with GPUs the build has no image for: the C++ kernels on the others, the
    refusal on those (instead of the default routing to Triton)."""
    refuse = refusing_cuda(_unsupported_gpus, compiled().cuda_sass, compiled().cuda_ptx)
    for op in OPS.values():
        if op.name == "refine_scale":  # the driver, over _candidate_sse (refused itself)
            continue
        cpp = _cpp_cuda_kernels.get(op.name, refuse)
        lib.impl(op.name, route(cpp, refuse, set(_unsupported_gpus)), "CUDA")


# ---------------------------------------------------------------------------------------------
# Forcing a backend (tests, debugging)

_forced: list[tuple[str, torch.library.Library | None]] = []


def _override(name: str, replaces: torch.library.Library | None = None
              ) -> torch.library.Library | None:
    """Registers ``name``'s kernels over the default ones on every device key where it is not
    already what serves that device (or kernels that refuse, where it cannot serve it), after
    removing ``replaces`` (the previous override)."""
    if replaces is not None:
        replaces._destroy()
    if name == "auto":
        return None
    lib = torch.library.Library("octav", "IMPL")
    with warnings.catch_warnings():  # the dispatcher warns that kernels are overridden
        warnings.simplefilter("ignore")
        for device_type, key in _DEVICE_KEYS:
            if native(device_type) == name:
                if name == "cuda" and device_type == "cuda" and _unsupported_gpus:
                    _register_cuda_refusal(lib)
                continue
            if available(name, torch.device(device_type)) and name in ("reference", "triton"):
                _register_python(lib, name, key)
            else:
                _register_unavailable(lib, name, device_type, key)
    return lib


def requested() -> str:
    """The backend forced now (``use_backend`` or ``$OCTAV_BACKEND`` at import), else auto."""
    return _forced[-1][0] if _forced else "auto"


def serving(device: torch.device) -> str:
    """The backend that serves ``device``'s tensors now."""
    name = requested()
    return native(device.type) if name == "auto" else name


def _push(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if _forced:
        _forced[-1] = (_forced[-1][0], _override("auto", _forced[-1][1]))
    _forced.append((name, _override(name)))


def _pop() -> None:
    _, lib = _forced.pop()
    _override("auto", lib)
    if _forced:
        _forced[-1] = (_forced[-1][0], _override(_forced[-1][0]))


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Serve every op inside the ``with`` block from backend ``name`` (see module docstring)."""
    _push(name)
    try:
        yield
    finally:
        _pop()


if os.environ.get("OCTAV_BACKEND", "auto") not in ("", "auto"):
    if os.environ["OCTAV_BACKEND"] not in BACKENDS:
        raise ValueError(f"OCTAV_BACKEND must be one of {BACKENDS}, got "
                         f"{os.environ['OCTAV_BACKEND']!r}")
    _push(os.environ["OCTAV_BACKEND"])

if cuda_kernels_built():
    torch.cuda._lazy_call(_serve_unsupported_gpus)
