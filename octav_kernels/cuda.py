"""CUDA backend: the hand-written kernels of ``octav_kernels._C`` (csrc/cuda/), same signatures
as ``octav_kernels.reference``, plus a fused ``octav_fake_quantize`` (scale and quantized tensor
in one launch: one read and one write of a tensor whose groups fit on-chip)."""

from __future__ import annotations

import torch

from . import reference
from ._args import (
    GRADS,
    flat_mask,
    groups,
    kernel_layout,
    levels,
    octav_constant,
    transposed_for_kernels,
)
from ._args import flat_scale as _flat
from .backend import compiled


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the cuda backend takes float32, float16 or bfloat16, got {x.dtype}")


def _grouped(x, dim, group_size):
    """``(x, outer, n_groups, inner, groups)`` with x in the kernels' layout."""
    _check_dtype(x)
    g = groups(x, dim, group_size)
    return (*kernel_layout(x, g), g)


def masked_sums(x, scale, signed=True, dim=None, group_size=None):
    x, outer, n_groups, inner, g = _grouped(x, dim, group_size)
    s_out, n_in, n_out = compiled().masked_sums_cuda(x, _flat(scale), outer, n_groups, inner,
                                                     signed)
    return s_out.reshape(g.scale_shape), n_in.reshape(g.scale_shape), n_out.reshape(g.scale_shape)


def octav_scale(x, bits, signed=True, dim=None, group_size=None, init=None, max_iters=32,
                rtol=1e-6, narrow=False):
    x, outer, n_groups, inner, g = _grouped(x, dim, group_size)
    scale = compiled().octav_scale_cuda(x, _flat(init), outer, n_groups, inner,
                                        signed, octav_constant(bits, signed, narrow), max_iters,
                                        rtol)
    return scale.reshape(g.scale_shape)


def octav_fake_quantize_packed(x, bits, signed=True, dim=None, group_size=None, init=None,
                               narrow=False, with_mask=True):
    """``(y, scale, mask)``: scale and quantized tensor in one launch, plus the packed PWL mask
    (``reference.pwl_mask``'s layout; empty unless ``with_mask``)."""
    if transposed_for_kernels(groups(x, dim, group_size)):
        # The solver reads a transposed copy: quantize the original layout with its scale.
        scale = octav_scale(x, bits, signed, dim, group_size, init, narrow=narrow)
        y, mask = _fake_quantize(x, scale, bits, signed, dim, group_size, narrow, with_mask)
        return y, scale, mask
    x, outer, n_groups, inner, g = _grouped(x, dim, group_size)
    y, scale, mask = compiled().octav_fake_quantize_cuda(
        x, _flat(init), outer, n_groups, inner, signed,
        octav_constant(bits, signed, narrow), *levels(bits, signed, narrow), with_mask)
    return y, scale.reshape(g.scale_shape), mask


def octav_fake_quantize(x, bits, signed=True, dim=None, group_size=None, grad="mad", init=None,
                        narrow=False):
    y, scale, _ = octav_fake_quantize_packed(x, bits, signed, dim, group_size, init, narrow,
                                             with_mask=False)
    return y, scale


def _fake_quantize(x, scale, bits, signed, dim, group_size, narrow, with_mask):
    _check_dtype(x)
    g = groups(x, dim, group_size)
    return compiled().fake_quantize_cuda(x.contiguous(), _flat(scale), g.outer, g.n_groups,
                                         g.inner, *levels(bits, signed, narrow), signed,
                                         with_mask)


def fake_quantize(x, scale, bits, signed=True, dim=None, group_size=None, grad="mad",
                  narrow=False):
    return _fake_quantize(x, scale, bits, signed, dim, group_size, narrow, False)[0]


def fake_quantize_packed(x, scale, bits, signed=True, dim=None, group_size=None, narrow=False):
    """``(y, mask)``: fake_quantize plus the packed PWL mask, from the same read of x."""
    return _fake_quantize(x, scale, bits, signed, dim, group_size, narrow, True)


def pwl_backward_packed(grad_out, mask):
    return compiled().masked_backward_cuda(grad_out, mask)


def fake_quantize_backward(grad_out, x, scale, signed=True, dim=None, group_size=None,
                           grad="mad", frozen=None):
    _check_dtype(x)
    g = groups(x, dim, group_size)
    return compiled().fake_quantize_backward_cuda(
        grad_out.to(x.dtype).contiguous(), x.contiguous(), _flat(scale), g.outer, g.n_groups,
        g.inner, signed, GRADS.index(grad), flat_mask(frozen))


def fake_quantize_tracked(x, scale, bits, signed, dim, group_size, narrow, last_int, last_dir,
                          frozen, osc_freq, int_ema, momentum, freeze_threshold, update):
    _check_dtype(x)
    g = groups(x, dim, group_size)
    return compiled().fake_quantize_tracked_cuda(
        x.contiguous(), _flat(scale), g.outer, g.n_groups, g.inner, *levels(bits, signed, narrow),
        last_int, last_dir, frozen, osc_freq, int_ema, momentum, freeze_threshold, update)


def candidate_sse(x, cand, bits, signed=True, dim=None, group_size=None, narrow=False):
    x, outer, n_groups, inner, g = _grouped(x, dim, group_size)
    return compiled().candidate_sse_cuda(x, cand.float().contiguous(), outer, n_groups, inner,
                                         *levels(bits, signed, narrow))


def refine_scale(x, scale, bits, signed=True, dim=None, group_size=None, narrow=False):
    return reference.refine_with(candidate_sse, x, scale, bits, signed, dim, group_size, narrow)


def dampening_error(w, scale, bits, signed=True, dim=None, group_size=None, narrow=False,
                    frozen=None):
    g = groups(w, dim, group_size)
    return compiled().dampening_error_cuda(w.contiguous(), _flat(scale), g.outer, g.n_groups,
                                            g.inner, *levels(bits, signed, narrow),
                                            flat_mask(frozen))


def dampening_backward(grad, w, scale, bits, signed=True, dim=None, group_size=None,
                       narrow=False, frozen=None):
    g = groups(w, dim, group_size)
    return compiled().dampening_backward_cuda(
        grad.float().contiguous(), w.contiguous(), _flat(scale), g.outer, g.n_groups, g.inner,
        *levels(bits, signed, narrow), flat_mask(frozen))
