"""Shared by the Triton kernel families: the launch helper, dtype checks, the bfloat16 store, the
element math (``grid_level``, ``quantize``, ``estimator_grad``) and the frozen-mask argument."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements per program of the elementwise kernels (fake_quant, lsq)


def launch(kernel, grid, device_tensor: torch.Tensor, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` on ``device_tensor``'s GPU. Triton launches on the current
    CUDA device (and its stream), which need not be the tensor's: a model-parallel layer on
    cuda:1, or ``.to("cuda:1")`` without ``torch.cuda.set_device``. Every launch of this package
    goes through here."""
    if device_tensor.is_cuda:
        with torch.cuda.device(device_tensor.device):
            kernel[grid](*args, **meta)
    else:  # CPU tensors under TRITON_INTERPRET=1
        kernel[grid](*args, **meta)


def check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the triton backend takes float32, float16 or bfloat16, got {x.dtype}")


def block_size(n: int, largest: int = 1024) -> int:
    """Elements per block: the next power of two of ``n``, between 16 and ``largest``."""
    return max(16, min(largest, triton.next_power_of_2(max(n, 1))))


def exact_bf16_store(dtype: torch.dtype) -> bool:
    """Whether kernels must round float32 -> bfloat16 themselves before storing: the Triton
    interpreter (3.9) truncates that conversion, where compiled Triton and PyTorch round to
    nearest even. Compiled kernels skip the extra integer ops."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def round_to_bf16(v):
    """float32 -> nearest-even bfloat16 value (kept in float32, so any later cast is exact)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))


# 1.5 * 2**23: (v + M) - M rounds a float32 |v| < 2**22 to the nearest integer, ties to even
# (libdevice.rint is not available in the interpreter).
_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def grid_level(x, step, lo, hi):
    """SPEC §1's integer level ``clamp(round(x / step), lo, hi)`` in float32; IEEE division
    (``div_rn``) so results match the CPU kernels bit for bit. NaN stays NaN."""
    v = tl.math.div_rn(x, step)
    # Clamp to one level beyond the grid first so the magic-number rounding is exact; the
    # comparisons leave NaN untouched.
    v = tl.where(v < lo - 1.0, lo - 1.0, tl.where(v > hi + 1.0, hi + 1.0, v))
    v = (v + _ROUND_MAGIC) - _ROUND_MAGIC
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def quantize(x, step, lo, hi):
    """SPEC §1 in float32: ``clamp(round(x / step), lo, hi) * step`` (``step = s / L``), 0 where
    step == 0 (s == 0, or a subnormal s whose s / L underflows)."""
    return tl.where(step == 0, 0.0, grid_level(x, step, lo, hi) * step)


@triton.jit
def estimator_grad(g, x, s, SIGNED: tl.constexpr, MODE: tl.constexpr):
    # SPEC §3's gradient of x for the incoming g: MODE 0 ste, 1 pwl, 2 mad (g * s / |x| outside)
    if MODE == 0:
        return g
    if SIGNED:
        a = tl.abs(x)
        inside = a <= s
        below = a < 0  # never
    else:
        a = x
        inside = (x >= 0) & (x <= s)
        below = x < 0
    if MODE == 1:
        return tl.where(inside, g, 0.0)
    ratio = tl.math.div_rn(s, tl.where(inside | below, 1.0, a))
    return tl.where(inside, g, tl.where(below, 0.0, g * ratio))


def frozen_arg(frozen, placeholder):
    """The optional frozen mask as the kernels read it (uint8); without one, ``placeholder``
    (the kernel's FROZEN=False branch never reads it)."""
    return placeholder if frozen is None else frozen.contiguous().view(torch.uint8)
