"""CPU backend: the C++ kernels of ``octav_kernels._C`` (csrc/cpu/), same signatures as
``octav_kernels.reference``."""

from __future__ import annotations

from ._args import GRADS, flat_mask, groups, kernel_layout, levels, octav_constant
from ._args import flat_scale as _flat
from .backend import compiled
from .reference import REFINE_ROUNDS, REFINE_SPREAD


def masked_sums(x, scale, signed=True, dim=None, group_size=None):
    g = groups(x, dim, group_size)
    x, outer, n_groups, inner = kernel_layout(x, g)
    s_out, n_in, n_out = compiled().masked_sums_cpu(x, _flat(scale), outer, n_groups, inner,
                                                    signed)
    return s_out.reshape(g.scale_shape), n_in.reshape(g.scale_shape), n_out.reshape(g.scale_shape)


def octav_scale(x, bits, signed=True, dim=None, group_size=None, init=None, max_iters=32,
                rtol=1e-6, narrow=False):
    g = groups(x, dim, group_size)
    x, outer, n_groups, inner = kernel_layout(x, g)
    scale = compiled().octav_scale_cpu(x, _flat(init), outer, n_groups, inner, signed,
                                       octav_constant(bits, signed, narrow), max_iters, rtol)
    return scale.reshape(g.scale_shape)


def fake_quantize(x, scale, bits, signed=True, dim=None, group_size=None, grad="mad",
                  narrow=False):
    g = groups(x, dim, group_size)
    return compiled().fake_quantize_cpu(
        x.contiguous(), _flat(scale), g.outer, g.n_groups, g.inner, *levels(bits, signed, narrow))


def fake_quantize_backward(grad_out, x, scale, signed=True, dim=None, group_size=None,
                           grad="mad", frozen=None):
    g = groups(x, dim, group_size)
    return compiled().fake_quantize_backward_cpu(
        grad_out.to(x.dtype).contiguous(), x.contiguous(), _flat(scale), g.outer, g.n_groups,
        g.inner, signed, GRADS.index(grad), flat_mask(frozen))


def fake_quantize_tracked(x, scale, bits, signed, dim, group_size, narrow, last_int, last_dir,
                          frozen, osc_freq, int_ema, momentum, freeze_threshold, update):
    g = groups(x, dim, group_size)
    return compiled().fake_quantize_tracked_cpu(
        x.contiguous(), _flat(scale), g.outer, g.n_groups, g.inner, *levels(bits, signed, narrow),
        last_int, last_dir, frozen, osc_freq, int_ema, momentum, freeze_threshold, update)


def candidate_sse(x, cand, bits, signed=True, dim=None, group_size=None, narrow=False):
    """One pass of the C++ refinement search (its ``refine_scale`` runs them internally)."""
    x, outer, n_groups, inner = kernel_layout(x, groups(x, dim, group_size))
    return compiled().candidate_sse_cpu(x, cand.float().contiguous(), outer, n_groups, inner,
                                        *levels(bits, signed, narrow))


def refine_scale(x, scale, bits, signed=True, dim=None, group_size=None, narrow=False):
    g = groups(x, dim, group_size)
    x, outer, n_groups, inner = kernel_layout(x, g)
    refined = compiled().refine_scale_cpu(
        x, _flat(scale), outer, n_groups, inner, *levels(bits, signed, narrow), signed,
        list(REFINE_ROUNDS), REFINE_SPREAD)
    return refined.reshape(g.scale_shape)


def dampening_error(w, scale, bits, signed=True, dim=None, group_size=None, narrow=False,
                    frozen=None):
    g = groups(w, dim, group_size)
    return compiled().dampening_error_cpu(w.contiguous(), _flat(scale), g.outer, g.n_groups,
                                            g.inner, *levels(bits, signed, narrow),
                                            flat_mask(frozen))


def dampening_backward(grad, w, scale, bits, signed=True, dim=None, group_size=None,
                       narrow=False, frozen=None):
    g = groups(w, dim, group_size)
    return compiled().dampening_backward_cpu(
        grad.float().contiguous(), w.contiguous(), _flat(scale), g.outer, g.n_groups, g.inner,
        *levels(bits, signed, narrow), flat_mask(frozen))
