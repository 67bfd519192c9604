"""The ``octav`` operator library: each op's schema is defined once, in its family's module
(``octav.py``, ``fake_quant.py``, ``lsq.py``, ``refine.py``, ``oscillation.py``), with its fake
kernel (for ``torch.compile``) and the factory of its Python kernel (argument checks, empty
input, then a backend function with ``octav_kernels.reference``'s signature).

Which kernel serves a call is PyTorch's dispatcher's decision: ``octav_kernels.backend``
registers the C++ kernels (``octav_kernels._C``: CPU and CUDA keys, and the autograd of the
differentiable ops), Triton for CUDA tensors where the CUDA kernels are not built, and the
reference as the default kernel of every op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

lib = torch.library.Library("octav", "DEF")


@dataclass(frozen=True)
class Op:
    """One op of the library: its name, the factory of its Python kernel (``kernel(impl)``:
    checks, empty input, then ``impl``, a backend function with the reference's signature), and
    for a differentiable op the autograd formula used where the C++ one is not built."""

    name: str
    kernel: Callable[[Callable], Callable]
    backward: Callable | None = None
    setup_context: Callable | None = None


OPS: dict[str, Op] = {}


def define(schema: str, kernel: Callable[[Callable], Callable], fake: Callable, *,
           backward: Callable | None = None, setup_context: Callable | None = None) -> None:
    """Defines ``octav::<schema>`` with its fake kernel. An op without ``backward`` is not
    differentiable: autograd falls through to its kernel (outputs never require grad)."""
    name = schema.split("(", 1)[0]
    lib.define(schema)
    torch.library.register_fake(f"octav::{name}", fake, lib=lib)
    if backward is None:
        lib.impl(name, torch.library.fallthrough_kernel, "Autograd")
    OPS[name] = Op(name, kernel, backward, setup_context)
