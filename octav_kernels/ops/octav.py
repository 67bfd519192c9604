"""The OCTAV ops (SPEC §2): ``octav::octav_scale``, ``octav::masked_sums`` (one pass of the
statistics) and ``octav::octav_fake_quantize`` (the scale and the fake-quantized tensor in one
op; its PWL training path ``_octav_fake_quantize_packed`` also returns the packed mask)."""

from __future__ import annotations

import torch

from .. import _args
from .._args import DEFAULT_MAX_ITERS, DEFAULT_RTOL
from ._library import define
from .fake_quant import _empty_like, _empty_mask, fake_quantize, grad_x, save_for_grad


def _zero_scale(x, g):
    return torch.zeros(g.scale_shape, dtype=torch.float32, device=x.device)


def _new_scale(x, g):
    return x.new_empty(g.scale_shape, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# octav::octav_scale


def _check_scale_op(x, bits, signed, dim, group_size, init, max_iters, rtol, narrow):
    g, init = _args.check_octav(x, bits, signed, dim, group_size, init, narrow)
    _args.check_iteration(max_iters, rtol)
    return g, init


def _octav_scale_kernel(impl):
    def kernel(x, bits, signed=True, dim=None, group_size=None, init=None,
               max_iters=DEFAULT_MAX_ITERS, rtol=DEFAULT_RTOL, narrow=False, importance=None):
        g, init = _check_scale_op(x, bits, signed, dim, group_size, init, max_iters, rtol,
                                  narrow)
        importance = _args.check_importance(importance, x)
        if x.numel() == 0:
            return _zero_scale(x, g)
        return impl(x, bits, signed, g.dim, g.group_size, init, max_iters, rtol, narrow,
                    importance)
    return kernel


def _octav_scale_fake(x, bits, signed=True, dim=None, group_size=None, init=None,
                      max_iters=DEFAULT_MAX_ITERS, rtol=DEFAULT_RTOL, narrow=False,
                      importance=None):
    g, _ = _check_scale_op(x, bits, signed, dim, group_size, init, max_iters, rtol, narrow)
    _args.check_importance(importance, x, values=False)
    return _new_scale(x, g)


define("octav_scale(Tensor x, int bits, bool signed=True, int? dim=None, int? group_size=None, "
       f"Tensor? init=None, int max_iters={DEFAULT_MAX_ITERS}, float rtol={DEFAULT_RTOL}, "
       "bool narrow=False, Tensor? importance=None) -> Tensor",
       _octav_scale_kernel, _octav_scale_fake)


# ---------------------------------------------------------------------------------------------
# octav::masked_sums


def _masked_sums_kernel(impl):
    def kernel(x, scale, signed=True, dim=None, group_size=None, importance=None):
        g, scale = _args.check_with_scale(x, scale, None, signed, dim, group_size, False)
        importance = _args.check_importance(importance, x)
        if x.numel() == 0:
            count = torch.int64 if importance is None else torch.float32
            zeros = torch.zeros(g.scale_shape, dtype=count, device=x.device)
            return zeros.float(), zeros, zeros.clone()
        return impl(x, scale, signed, g.dim, g.group_size, importance)
    return kernel


def _masked_sums_fake(x, scale, signed=True, dim=None, group_size=None, importance=None):
    g, _ = _args.check_with_scale(x, scale, None, signed, dim, group_size, False)
    count = torch.int64 if _args.check_importance(importance, x, False) is None else torch.float32
    return (_new_scale(x, g), x.new_empty(g.scale_shape, dtype=count),
            x.new_empty(g.scale_shape, dtype=count))


define("masked_sums(Tensor x, Tensor scale, bool signed=True, int? dim=None, "
       "int? group_size=None, Tensor? importance=None) -> (Tensor, Tensor, Tensor)",
       _masked_sums_kernel, _masked_sums_fake)


# ---------------------------------------------------------------------------------------------
# octav::octav_fake_quantize and its packed-mask PWL path


def _check_fused(x, bits, signed, dim, group_size, grad, init, narrow):
    g, init = _args.check_octav(x, bits, signed, dim, group_size, init, narrow)
    _args.check_grad(grad)
    return g, init


def _fused_kernel(impl):
    def kernel(x, bits, signed=True, dim=None, group_size=None, grad="mad", init=None,
               narrow=False, importance=None):
        g, init = _check_fused(x, bits, signed, dim, group_size, grad, init, narrow)
        importance = _args.check_importance(importance, x)
        if x.numel() == 0:
            return _empty_like(x), _zero_scale(x, g)
        return impl(x, bits, signed, g.dim, g.group_size, grad, init, narrow, importance)
    return kernel


def _fused_fake(x, bits, signed=True, dim=None, group_size=None, grad="mad", init=None,
                narrow=False, importance=None):
    g, _ = _check_fused(x, bits, signed, dim, group_size, grad, init, narrow)
    _args.check_importance(importance, x, values=False)
    return _empty_like(x), _new_scale(x, g)


def _fused_setup(ctx, inputs, output):
    x, bits, signed, dim, group_size, grad, _init, narrow, _importance = inputs
    ctx.mark_non_differentiable(output[1])
    save_for_grad(ctx, x, output[1], bits, signed, dim, group_size, grad, narrow)


def _fused_grad(ctx, grad_y, grad_scale):
    return (grad_x(ctx, grad_y),) + (None,) * 8


define("octav_fake_quantize(Tensor x, int bits, bool signed=True, int? dim=None, "
       "int? group_size=None, str grad=\"mad\", Tensor? init=None, bool narrow=False, "
       "Tensor? importance=None) -> (Tensor, Tensor)", _fused_kernel, _fused_fake,
       backward=_fused_grad, setup_context=_fused_setup)


def _fused_packed_kernel(impl):
    def kernel(x, bits, signed=True, dim=None, group_size=None, init=None, narrow=False,
               importance=None):
        g, init = _args.check_octav(x, bits, signed, dim, group_size, init, narrow)
        importance = _args.check_importance(importance, x)
        if x.numel() == 0:
            return _empty_like(x), _zero_scale(x, g), _empty_mask(x)
        return impl(x, bits, signed, g.dim, g.group_size, init, narrow, importance)
    return kernel


def _fused_packed_fake(x, bits, signed=True, dim=None, group_size=None, init=None,
                       narrow=False, importance=None):
    g, _ = _args.check_octav(x, bits, signed, dim, group_size, init, narrow)
    _args.check_importance(importance, x, values=False)
    return _empty_like(x), _new_scale(x, g), _empty_mask(x)


define("_octav_fake_quantize_packed(Tensor x, int bits, bool signed=True, int? dim=None, "
       "int? group_size=None, Tensor? init=None, bool narrow=False, Tensor? importance=None) "
       "-> (Tensor, Tensor, Tensor)", _fused_packed_kernel, _fused_packed_fake)


# ---------------------------------------------------------------------------------------------
# Public wrappers


def octav_scale(x: torch.Tensor, bits: int, *, signed: bool = True, dim: int | None = None,
                group_size: int | None = None, init: torch.Tensor | None = None,
                max_iters: int = DEFAULT_MAX_ITERS, rtol: float = DEFAULT_RTOL,
                narrow: bool = False, refine: bool = False,
                importance: torch.Tensor | None = None) -> torch.Tensor:
    """MSE-optimal clipping scale of ``x`` by the OCTAV fixed point (SPEC §2), float32.

    Per group (whole tensor; ``dim=d``: one per index along d; ``group_size=G``: blocks of G
    along the last dim), with ``a = |x|`` (``x`` if unsigned) and zeros excluded::

        s <- S_out / (4**-B / 3 * n_in + n_out)     S_out = sum(a * 1{a > s})
                                                     n_in = #{0 < a <= s}, n_out = #{a > s}

    (``/12`` unsigned; ``1 / (12 (2**(B-1)-1)**2)`` with ``narrow``), starting at ``init`` where
    it is > 0, else at the mean of the nonzero ``a``, until ``|s_next - s| <= rtol * s``, a
    2-cycle (the smaller scale is returned) or ``max_iters`` steps. NaN in a group gives a NaN
    scale; inf gives inf; an all-zero (or empty) group gives 0.

    ``refine=True`` polishes that fixed point against the empirical MSE of the real quantizer
    (``refine_scale``): a few more passes, a lower quantization error.

    ``importance`` (float32, >= 0, broadcastable to x, e.g. ``E[inp**2]`` of shape ``[in]``
    for a ``[out, in]`` weight) weights each element's squared error (SPEC §2.1): the scale
    then minimizes ``sum h (q - x)**2``, the layer's expected output error when ``h`` is the
    mean square of its inputs. Every sum above is weighted by ``h``; a group whose importance
    sums to 0 is solved without it.
    """
    _args.check_types(x, bits, dim, group_size, (("signed", signed), ("narrow", narrow),
                                                 ("refine", refine)),
                      (("init", init), ("importance", importance)))
    _args.check_iteration_types(max_iters, rtol)
    scale = torch.ops.octav.octav_scale.default(x, bits, signed, dim, group_size, init,
                                                max_iters, float(rtol), narrow, importance)
    if refine:
        scale = torch.ops.octav.refine_scale.default(x, scale, bits, signed, dim, group_size,
                                                     narrow, importance)
    return scale


def masked_sums(x: torch.Tensor, scale: torch.Tensor, *, signed: bool = True,
                dim: int | None = None, group_size: int | None = None,
                importance: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One OCTAV pass per group: ``(S_out float32, n_in int64, n_out int64)`` at ``scale``.

    ``S_out = sum(a * 1{a > s})``, ``n_in = #{0 < a <= s}``, ``n_out = #{a > s}`` with
    ``a = |x|`` (``x`` if unsigned; NaN entries count as out). Data-parallel training can
    all-reduce the three and iterate on the global statistics. With ``importance`` h the
    three are weighted sums, all float32: ``sum h a 1{a > s}``, ``sum h 1{0 < a <= s}``,
    ``sum h 1{a > s}`` (as they are: no fallback for groups without importance).
    """
    _args.check_types(x, None, dim, group_size, (("signed", signed),),
                      (("scale", scale), ("importance", importance)))
    return torch.ops.octav.masked_sums.default(x, scale, signed, dim, group_size, importance)


def octav_fake_quantize(x: torch.Tensor, bits: int, *, signed: bool = True,
                        dim: int | None = None, group_size: int | None = None,
                        grad: str = "mad", init: torch.Tensor | None = None,
                        narrow: bool = False, refine: bool = False,
                        importance: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fake_quantize(x, s, bits, ...), s)`` with ``s = octav_scale(x, bits, ...)``.

    The usual QAT call: one op finds the OCTAV scale (warm-started from ``init``, e.g. the last
    step's scale) and fake-quantizes with it; gradients flow to x by ``grad``. ``refine=True``
    uses ``octav_scale(..., refine=True)`` (the scale polished against the empirical MSE).
    ``importance`` weights the scale's error as in ``octav_scale``.
    """
    _args.check_types(x, bits, dim, group_size, (("signed", signed), ("narrow", narrow),
                                                 ("refine", refine)),
                      (("init", init), ("importance", importance)))
    if refine:
        scale = octav_scale(x.detach(), bits, signed=signed, dim=dim, group_size=group_size,
                            init=init, narrow=narrow, refine=True, importance=importance)
        return fake_quantize(x, scale, bits, signed=signed, dim=dim, group_size=group_size,
                             grad=grad, narrow=narrow), scale
    return torch.ops.octav.octav_fake_quantize.default(x, bits, signed, dim, group_size, grad,
                                                       init, narrow, importance)
