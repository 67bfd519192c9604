"""The clip-quantize ops (SPEC §1, §3): ``octav::fake_quantize`` and its backward, and the PWL
path that keeps a bit-packed mask (1 bit per element) for the backward instead of x.

Autograd (C++, csrc/autograd.cpp; the formulas below where it is not built, which save the same
tensors): STE keeps nothing, MAD keeps x and the scale, PWL keeps the mask of
``_fake_quantize_packed`` (1 bit per element).
"""

from __future__ import annotations

import torch

from .. import _args
from ._library import define


def _empty_like(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _empty_mask(x):
    return torch.empty(((x.numel() + 31) // 32,), dtype=torch.int32, device=x.device)


# ---------------------------------------------------------------------------------------------
# octav::fake_quantize


def _check_fake_quantize(x, scale, bits, signed, dim, group_size, grad, narrow):
    g = _args.check_common(x, bits, signed, dim, group_size, narrow)
    _args.check_grad(grad)
    return g, _args.check_scale(scale, x, g)


def _fake_quantize_kernel(impl):
    def kernel(x, scale, bits, signed=True, dim=None, group_size=None, grad="mad",
               narrow=False):
        g, scale = _check_fake_quantize(x, scale, bits, signed, dim, group_size, grad, narrow)
        if x.numel() == 0:
            return _empty_like(x)
        return impl(x, scale, bits, signed, g.dim, g.group_size, grad, narrow)
    return kernel


def _fake_quantize_fake(x, scale, bits, signed=True, dim=None, group_size=None, grad="mad",
                        narrow=False):
    _check_fake_quantize(x, scale, bits, signed, dim, group_size, grad, narrow)
    return _empty_like(x)


def save_for_grad(ctx, x, scale, bits, signed, dim, group_size, grad, narrow):
    """What the estimator needs, as the C++ autograd keeps it: nothing for STE, the bit-packed
    PWL mask for PWL, x and the scale for MAD. (Here, without the extension, the mask costs one
    more elementwise pass over x: ``setup_context`` cannot change the op's forward, as the C++
    autograd does by running ``_fake_quantize_packed`` in its place.)"""
    ctx.signed, ctx.dim, ctx.group_size, ctx.grad = signed, dim, group_size, grad
    if grad == "pwl":
        _, mask = torch.ops.octav._fake_quantize_packed.default(x, scale, bits, signed, dim,
                                                                group_size, narrow)
        ctx.save_for_backward(mask)
    elif grad == "mad":
        ctx.save_for_backward(x, scale)


def grad_x(ctx, grad_out):
    """d(loss)/dx by the estimator chosen in the forward (SPEC §3)."""
    if ctx.grad == "ste":
        return grad_out
    if ctx.grad == "pwl":
        return torch.ops.octav._pwl_backward_packed.default(grad_out, *ctx.saved_tensors)
    x, scale = ctx.saved_tensors
    return torch.ops.octav.fake_quantize_backward.default(
        grad_out, x, scale, ctx.signed, ctx.dim, ctx.group_size, ctx.grad)


def _fake_quantize_setup(ctx, inputs, output):
    x, scale, bits, signed, dim, group_size, grad, narrow = inputs
    save_for_grad(ctx, x, scale, bits, signed, dim, group_size, grad, narrow)


def _fake_quantize_grad(ctx, grad_out):
    return (grad_x(ctx, grad_out),) + (None,) * 7


define("fake_quantize(Tensor x, Tensor scale, int bits, bool signed=True, int? dim=None, "
       "int? group_size=None, str grad=\"mad\", bool narrow=False) -> Tensor",
       _fake_quantize_kernel, _fake_quantize_fake, backward=_fake_quantize_grad,
       setup_context=_fake_quantize_setup)


# ---------------------------------------------------------------------------------------------
# octav::fake_quantize_backward: grad_x of the estimator, 0 where ``frozen`` (frozen weights)


def _check_grad_out(grad_out, x, frozen):
    """The incoming gradient (a floating tensor of x's shape and device) and the optional bool
    frozen mask of a backward op."""
    _args.check_x(grad_out, "grad_out")
    if grad_out.shape != x.shape or grad_out.device != x.device:
        raise ValueError(f"grad_out ({list(grad_out.shape)} on {grad_out.device}) must match x "
                         f"({list(x.shape)} on {x.device})")
    if frozen is not None:
        _args.check_state(frozen, x, torch.bool, "frozen")


def _check_backward(grad_out, x, scale, signed, dim, group_size, grad, frozen):
    g = _args.check_common(x, None, signed, dim, group_size)
    _args.check_grad(grad)
    scale = _args.check_scale(scale, x, g)
    _check_grad_out(grad_out, x, frozen)
    return g, scale


def _backward_kernel(impl):
    def kernel(grad_out, x, scale, signed=True, dim=None, group_size=None, grad="mad",
               frozen=None):
        g, scale = _check_backward(grad_out, x, scale, signed, dim, group_size, grad, frozen)
        if x.numel() == 0:
            return _empty_like(x)
        return impl(grad_out.to(x.dtype), x, scale, signed, g.dim, g.group_size, grad, frozen)
    return kernel


def _backward_fake(grad_out, x, scale, signed=True, dim=None, group_size=None, grad="mad",
                   frozen=None):
    _check_backward(grad_out, x, scale, signed, dim, group_size, grad, frozen)
    return _empty_like(x)


define("fake_quantize_backward(Tensor grad_out, Tensor x, Tensor scale, bool signed=True, "
       "int? dim=None, int? group_size=None, str grad=\"mad\", Tensor? frozen=None) -> Tensor",
       _backward_kernel, _backward_fake)


# ---------------------------------------------------------------------------------------------
# octav::_fake_quantize_packed: (y, mask), the PWL pass-through set bit-packed in x's flat
# contiguous order (reference.pwl_mask), and octav::_pwl_backward_packed from it


def _packed_kernel(impl):
    def kernel(x, scale, bits, signed=True, dim=None, group_size=None, narrow=False):
        g, scale = _args.check_with_scale(x, scale, bits, signed, dim, group_size, narrow)
        if x.numel() == 0:
            return _empty_like(x), _empty_mask(x)
        return impl(x, scale, bits, signed, g.dim, g.group_size, narrow)
    return kernel


def _packed_fake(x, scale, bits, signed=True, dim=None, group_size=None, narrow=False):
    _args.check_with_scale(x, scale, bits, signed, dim, group_size, narrow)
    return _empty_like(x), _empty_mask(x)


define("_fake_quantize_packed(Tensor x, Tensor scale, int bits, bool signed=True, "
       "int? dim=None, int? group_size=None, bool narrow=False) -> (Tensor, Tensor)",
       _packed_kernel, _packed_fake)


def _check_mask(grad_out, mask):
    _args.check_x(grad_out, "grad_out")
    if (not isinstance(mask, torch.Tensor) or mask.dtype != torch.int32 or mask.dim() != 1
            or mask.numel() != (grad_out.numel() + 31) // 32
            or mask.device != grad_out.device):
        raise ValueError("mask must be the int32 [(numel + 31) / 32] PWL mask of grad_out's "
                         "tensor")


def _pwl_backward_kernel(impl):
    def kernel(grad_out, mask):
        _check_mask(grad_out, mask)
        if grad_out.numel() == 0:
            return _empty_like(grad_out)
        return impl(grad_out, mask)
    return kernel


def _pwl_backward_fake(grad_out, mask):
    _check_mask(grad_out, mask)
    return _empty_like(grad_out)


define("_pwl_backward_packed(Tensor grad_out, Tensor mask) -> Tensor", _pwl_backward_kernel,
       _pwl_backward_fake)


# ---------------------------------------------------------------------------------------------
# The public wrapper


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, bits: int, *, signed: bool = True,
                  dim: int | None = None, group_size: int | None = None, grad: str = "mad",
                  narrow: bool = False) -> torch.Tensor:
    """Clip-quantize ``x`` on the ``bits``-bit grid of ``scale`` (SPEC §1), differentiable in x::

        step = s * 2**(1-B);  q = clamp(round(x / step), -2**(B-1), 2**(B-1)-1) * step

    (unsigned: ``step = s * 2**-B``, levels ``0..2**B-1``; ``narrow``: ``step = s/(2**(B-1)-1)``,
    levels ``±(2**(B-1)-1)``). Rounds half to even in float32; q = 0 where s == 0. The backward
    is ``grad`` in {"ste", "pwl", "mad"} (SPEC §3); the scale gets no gradient.
    """
    _args.check_types(x, bits, dim, group_size, (("signed", signed), ("narrow", narrow)),
                      (("scale", scale),))
    return torch.ops.octav.fake_quantize.default(x, scale, bits, signed, dim, group_size, grad,
                                                 narrow)
