"""The learned-scale (LSQ, Esser et al. 2020) clip-quantize op: ``octav::fake_quantize_lsq``
(fake_quantize's values, differentiable in x by the estimator and in the scale) and
``octav::fake_quantize_lsq_backward``, whose kernels reduce the scale's gradient per group in
their one pass (``reference.fake_quantize_lsq_backward``).

Autograd (C++, csrc/autograd.cpp; the formula below where it is not built): keeps x and the
scale.
"""

from __future__ import annotations

import torch

from .. import _args
from ._library import define
from .fake_quant import _check_fake_quantize, _check_grad_out, _empty_like

# ---------------------------------------------------------------------------------------------
# octav::fake_quantize_lsq and its backward


def _check_lsq(x, scale, bits, signed, dim, group_size, grad, narrow, grad_scale):
    g, scale = _check_fake_quantize(x, scale, bits, signed, dim, group_size, grad, narrow)
    _args.check_bool(grad_scale, "grad_scale")
    return g, scale


def _lsq_kernel(impl):
    def kernel(x, scale, bits, signed=True, dim=None, group_size=None, grad="mad",
               narrow=False, grad_scale=True):
        g, scale = _check_lsq(x, scale, bits, signed, dim, group_size, grad, narrow, grad_scale)
        if x.numel() == 0:
            return _empty_like(x)
        return impl(x, scale, bits, signed, g.dim, g.group_size, grad, narrow, grad_scale)
    return kernel


def _lsq_fake(x, scale, bits, signed=True, dim=None, group_size=None, grad="mad", narrow=False,
              grad_scale=True):
    _check_lsq(x, scale, bits, signed, dim, group_size, grad, narrow, grad_scale)
    return _empty_like(x)


def _lsq_setup(ctx, inputs, output):
    x, scale, bits, signed, dim, group_size, grad, narrow, grad_scale = inputs
    ctx.args = (bits, signed, dim, group_size, grad, narrow, grad_scale)
    ctx.save_for_backward(x, scale)


def _lsq_grad(ctx, grad_out):
    x, scale = ctx.saved_tensors
    grad_x, grad_s = torch.ops.octav.fake_quantize_lsq_backward.default(grad_out, x, scale,
                                                                        *ctx.args)
    return (grad_x, grad_s.to(scale.dtype)) + (None,) * 7


define("fake_quantize_lsq(Tensor x, Tensor scale, int bits, bool signed=True, int? dim=None, "
       "int? group_size=None, str grad=\"mad\", bool narrow=False, bool grad_scale=True) "
       "-> Tensor", _lsq_kernel, _lsq_fake, backward=_lsq_grad, setup_context=_lsq_setup)


def _check_lsq_backward(grad_out, x, scale, bits, signed, dim, group_size, grad, narrow,
                        grad_scale, frozen):
    g, scale = _check_lsq(x, scale, bits, signed, dim, group_size, grad, narrow, grad_scale)
    _check_grad_out(grad_out, x, frozen)
    return g, scale


def _lsq_backward_kernel(impl):
    def kernel(grad_out, x, scale, bits, signed=True, dim=None, group_size=None, grad="mad",
               narrow=False, grad_scale=True, frozen=None):
        g, scale = _check_lsq_backward(grad_out, x, scale, bits, signed, dim, group_size, grad,
                                       narrow, grad_scale, frozen)
        if x.numel() == 0:
            return _empty_like(x), torch.zeros(g.scale_shape, dtype=torch.float32,
                                               device=x.device)
        return impl(grad_out.to(x.dtype), x, scale, bits, signed, g.dim, g.group_size, grad,
                    narrow, grad_scale, frozen)
    return kernel


def _lsq_backward_fake(grad_out, x, scale, bits, signed=True, dim=None, group_size=None,
                       grad="mad", narrow=False, grad_scale=True, frozen=None):
    g, _ = _check_lsq_backward(grad_out, x, scale, bits, signed, dim, group_size, grad, narrow,
                               grad_scale, frozen)
    return _empty_like(x), x.new_empty(g.scale_shape, dtype=torch.float32)


define("fake_quantize_lsq_backward(Tensor grad_out, Tensor x, Tensor scale, int bits, "
       "bool signed=True, int? dim=None, int? group_size=None, str grad=\"mad\", "
       "bool narrow=False, bool grad_scale=True, Tensor? frozen=None) -> (Tensor, Tensor)",
       _lsq_backward_kernel, _lsq_backward_fake)


# ---------------------------------------------------------------------------------------------
# The public wrapper


def fake_quantize_lsq(x: torch.Tensor, scale: torch.Tensor, bits: int, *, signed: bool = True,
                      dim: int | None = None, group_size: int | None = None, grad: str = "mad",
                      narrow: bool = False, grad_scale: bool = True) -> torch.Tensor:
    """``fake_quantize`` with a learned scale (LSQ, Esser et al. 2020): the same values,
    differentiable in ``x`` (by ``grad``) and in ``scale``, whose gradient is, per group,
    with ``step = c s`` (``c = 1 / L``), ``v = x / step`` and round treated as identity::

        dq/ds = c (round(v) - v)  for lo <= v <= hi;   c lo below;   c hi above

    summed over the group's elements (times the incoming gradient) and multiplied by LSQ's
    gradient scale ``1 / sqrt(N hi)`` (N = elements per group; ``grad_scale=False`` drops it).
    The backward kernels reduce it per group in their one pass over the tensor.
    """
    _args.check_types(x, bits, dim, group_size, (("signed", signed), ("narrow", narrow),
                                                 ("grad_scale", grad_scale)),
                      (("scale", scale),))
    return torch.ops.octav.fake_quantize_lsq.default(x, scale, bits, signed, dim, group_size,
                                                     grad, narrow, grad_scale)
