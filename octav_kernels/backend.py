"""The one place that decides which kernels serve a call.

Backends (each a module with ``masked_sums``, ``octav_scale``, ``fake_quantize`` and
``fake_quantize_backward``, and optionally a fused ``octav_fake_quantize``, all with the
signatures of ``octav_kernels.reference``; without a fused one, ops.py composes the first two):

- ``cpu``: the C++ kernels of ``octav_kernels._C``; default for CPU tensors.
- ``cuda``: the hand-written CUDA kernels of ``octav_kernels._C`` (csrc/cuda/, compiled when the
  extension is built with a CUDA toolkit); default for CUDA tensors when built (measured faster
  than Triton: bench/results/gpu_bench.md).
- ``triton``: ``octav_kernels.triton``; default for CUDA tensors when the CUDA kernels are not
  built. Runs on CPU tensors only under ``TRITON_INTERPRET=1`` (set before triton is imported),
  which is how the tests check it.
- ``reference``: plain PyTorch (``octav_kernels.reference``); any device, and the fallback when
  neither kernel backend can serve a tensor.

Force one with ``OCTAV_BACKEND=reference|cpu|triton|cuda`` in the environment (read on every
call) or ``with octav_kernels.use_backend("triton"):``; ``auto`` (the default) picks as above.
A forced backend that cannot serve a tensor raises ``RuntimeError``; it never falls back silently.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import warnings
from types import ModuleType
from typing import Iterator

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")

_forced: str | None = None

try:
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


def requested() -> str:
    """The backend asked for: ``use_backend`` if active, else ``$OCTAV_BACKEND``, else auto."""
    name = _forced or os.environ.get("OCTAV_BACKEND", "auto") or "auto"
    if name not in BACKENDS:
        raise ValueError(f"OCTAV_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Serve every op inside the ``with`` block from backend ``name`` (see module docstring)."""
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


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


def select(device: torch.device) -> ModuleType:
    """The backend module that serves a call on ``device``."""
    name = requested()
    if name == "auto":
        if device.type == "cpu":
            name = "cpu" if _C is not None else "reference"
        elif device.type == "cuda" and cuda_kernels_built():
            name = "cuda"
        elif device.type == "cuda" and triton_available():
            name = "triton"
        else:
            name = "reference"
    elif not available(name, device):
        raise RuntimeError(
            f"octav backend {name!r} cannot serve {device.type} tensors here "
            "(cpu needs the compiled extension and CPU tensors; triton needs triton and CUDA "
            "tensors, or TRITON_INTERPRET=1 for CPU tensors; cuda needs CUDA tensors and an "
            "extension built with a CUDA toolkit)")
    return importlib.import_module(f"octav_kernels.{name}")
