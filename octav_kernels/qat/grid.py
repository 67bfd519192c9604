"""A quantizer's grid (SPEC §1), frozen: its bit width, type and granularity, and the integer
levels and the dequantization on it. The one definition shared by the QAT quantizer (frozen
weights, ``Quantizer.export``) and the converted modules of ``octav_kernels.deploy``, so that
"converted equals QAT" rests on the same arithmetic as the fake-quant kernels::

    step = s / L (float32);   level = clamp(round_half_even(x / step), lo, hi), 0 where s == 0;
    dequantized = level * step (float32)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _args, reference


def granularity(dim: int | None, group_size: int | None) -> str:
    """``per tensor``, ``dim=d`` or ``group_size=G`` (for the modules' ``extra_repr``)."""
    if dim is not None:
        return f"dim={dim}"
    return "per tensor" if group_size is None else f"group_size={group_size}"


@dataclass(frozen=True)
class Grid:
    """``bits``-bit levels ``lo..hi`` (signed, unsigned or narrow, ``_args.levels``), scaled by
    one step per group of the granularity (per tensor; per channel along ``dim``; or blocks of
    ``group_size`` along the last dimension)."""

    bits: int
    signed: bool
    narrow: bool = False
    dim: int | None = None
    group_size: int | None = None

    @property
    def levels(self) -> tuple[int, int, int]:
        """``(L, lo, hi)``: the grid is ``step * [lo..hi]`` with ``step = s / L``."""
        return _args.levels(self.bits, self.signed, self.narrow)

    def step(self, scale: torch.Tensor) -> torch.Tensor:
        """``s / L`` in float32, of the scale's shape, correctly rounded on every device (a
        tensor divisor: CUDA divides by a Python number as a product with its reciprocal)."""
        return scale.float() / torch.full((), self.levels[0], dtype=torch.float32,
                                          device=scale.device)

    def integer_levels(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The levels of ``x`` (float32, x's shape; integers in ``lo..hi``, 0 where s == 0), as
        the fake-quant kernels compute them."""
        L, lo, hi = self.levels
        step = reference.grid_step(scale, x, self.dim, self.group_size, L)
        return reference.grid_levels(x.float(), step, lo, hi)

    def dequantize(self, levels: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """``level * step`` in float32, levels' shape (``step`` of the granularity's shape)."""
        return levels.float() * reference.broadcast(step, levels, self.dim, self.group_size)

    def describe(self) -> str:
        """``bits=4, signed=True, per tensor`` (for the modules' ``extra_repr``)."""
        return (f"bits={self.bits}, signed={self.signed}, "
                f"{granularity(self.dim, self.group_size)}"
                + (", narrow=True" if self.narrow else ""))
