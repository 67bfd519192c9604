"""The ``torch.ops.octav`` custom ops (SPEC §5): schemas, input checks, fake kernels, autograd,
and the Python wrappers of the same names.

Each op's implementation validates its arguments (SPEC §6), returns early on empty input, and
hands the call to the backend that ``octav_kernels.backend.select`` picks. The ops are opaque to
``torch.compile`` (fake kernels give the output shapes), so they compile with
``fullgraph=True``.
"""

from __future__ import annotations

import torch

from . import _args, backend, reference
from ._args import Groups

# ---------------------------------------------------------------------------------------------
# Checks shared by the real and the fake kernels


def _check_common(x, bits, signed, dim, group_size, narrow=False) -> Groups:
    _args.check_x(x)
    if bits is not None:
        _args.check_bits(bits)
    _args.check_narrow(narrow, signed)
    return _args.groups(x, dim, group_size)


def _check_with_scale(x, scale, bits, signed, dim, group_size, narrow):
    g = _check_common(x, bits, signed, dim, group_size, narrow)
    return g, _args.check_scale(scale, x, g)


def _check_octav(x, bits, signed, dim, group_size, init, narrow):
    g = _check_common(x, bits, signed, dim, group_size, narrow)
    if init is not None:
        init = _args.check_scale(init, x, g, "init")
    return g, init


# ---------------------------------------------------------------------------------------------
# octav::octav_scale


@torch.library.custom_op(
    "octav::octav_scale", mutates_args=(),
    schema="(Tensor x, int bits, bool signed=True, int? dim=None, int? group_size=None, "
           "Tensor? init=None, int max_iters=32, float rtol=1e-6, bool narrow=False) -> Tensor")
def _octav_scale(x, bits, signed=True, dim=None, group_size=None, init=None, max_iters=32,
                 rtol=1e-6, narrow=False):
    g, init = _check_octav(x, bits, signed, dim, group_size, init, narrow)
    _args.check_iteration(max_iters, rtol)
    if x.numel() == 0:
        return torch.zeros(g.scale_shape, dtype=torch.float32, device=x.device)
    return backend.select(x.device).octav_scale(
        x, bits, signed, g.dim, g.group_size, init, max_iters, rtol, narrow)


@_octav_scale.register_fake
def _(x, bits, signed=True, dim=None, group_size=None, init=None, max_iters=32, rtol=1e-6,
      narrow=False):
    g, _ = _check_octav(x, bits, signed, dim, group_size, init, narrow)
    return x.new_empty(g.scale_shape, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# octav::masked_sums


@torch.library.custom_op(
    "octav::masked_sums", mutates_args=(),
    schema="(Tensor x, Tensor scale, bool signed=True, int? dim=None, int? group_size=None) "
           "-> (Tensor, Tensor, Tensor)")
def _masked_sums(x, scale, signed=True, dim=None, group_size=None):
    g = _check_common(x, None, signed, dim, group_size)
    scale = _args.check_scale(scale, x, g)
    if x.numel() == 0:
        zeros = torch.zeros(g.scale_shape, dtype=torch.int64, device=x.device)
        return zeros.float(), zeros, zeros.clone()
    return backend.select(x.device).masked_sums(x, scale, signed, g.dim, g.group_size)


@_masked_sums.register_fake
def _(x, scale, signed=True, dim=None, group_size=None):
    g = _check_common(x, None, signed, dim, group_size)
    _args.check_scale(scale, x, g)
    return (x.new_empty(g.scale_shape, dtype=torch.float32),
            x.new_empty(g.scale_shape, dtype=torch.int64),
            x.new_empty(g.scale_shape, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# octav::refine_scale (SPEC §8: OCTAV polished against the empirical MSE)


@torch.library.custom_op(
    "octav::refine_scale", mutates_args=(),
    schema="(Tensor x, Tensor scale, int bits, bool signed=True, int? dim=None, "
           "int? group_size=None, bool narrow=False) -> Tensor")
def _refine_scale(x, scale, bits, signed=True, dim=None, group_size=None, narrow=False):
    g, scale = _check_with_scale(x, scale, bits, signed, dim, group_size, narrow)
    if x.numel() == 0:
        return torch.zeros(g.scale_shape, dtype=torch.float32, device=x.device)
    return backend.select(x.device).refine_scale(x, scale, bits, signed, g.dim, g.group_size,
                                                 narrow)


@_refine_scale.register_fake
def _(x, scale, bits, signed=True, dim=None, group_size=None, narrow=False):
    g, _ = _check_with_scale(x, scale, bits, signed, dim, group_size, narrow)
    return x.new_empty(g.scale_shape, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# octav::fake_quantize and its backward


@torch.library.custom_op(
    "octav::fake_quantize", mutates_args=(),
    schema="(Tensor x, Tensor scale, int bits, bool signed=True, int? dim=None, "
           "int? group_size=None, str grad=\"mad\", bool narrow=False) -> Tensor")
def _fake_quantize(x, scale, bits, signed=True, dim=None, group_size=None, grad="mad",
                   narrow=False):
    g = _check_common(x, bits, signed, dim, group_size, narrow)
    _args.check_grad(grad)
    scale = _args.check_scale(scale, x, g)
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return backend.select(x.device).fake_quantize(
        x, scale, bits, signed, g.dim, g.group_size, grad, narrow)


@_fake_quantize.register_fake
def _(x, scale, bits, signed=True, dim=None, group_size=None, grad="mad", narrow=False):
    g = _check_common(x, bits, signed, dim, group_size, narrow)
    _args.check_grad(grad)
    _args.check_scale(scale, x, g)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _check_backward(grad_out, x, scale, signed, dim, group_size, grad, frozen=None):
    g = _check_common(x, None, signed, dim, group_size)
    _args.check_grad(grad)
    scale = _args.check_scale(scale, x, g)
    _args.check_x(grad_out, "grad_out")
    if grad_out.shape != x.shape or grad_out.device != x.device:
        raise ValueError(f"grad_out ({list(grad_out.shape)} on {grad_out.device}) must match x "
                         f"({list(x.shape)} on {x.device})")
    if frozen is not None:
        _args.check_state(frozen, x, torch.bool, "frozen")
    return g, scale


@torch.library.custom_op(
    "octav::fake_quantize_backward", mutates_args=(),
    schema="(Tensor grad_out, Tensor x, Tensor scale, bool signed=True, int? dim=None, "
           "int? group_size=None, str grad=\"mad\", Tensor? frozen=None) -> Tensor")
def _fake_quantize_backward(grad_out, x, scale, signed=True, dim=None, group_size=None,
                            grad="mad", frozen=None):
    g, scale = _check_backward(grad_out, x, scale, signed, dim, group_size, grad, frozen)
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return backend.select(x.device).fake_quantize_backward(
        grad_out.to(x.dtype), x, scale, signed, g.dim, g.group_size, grad, frozen)


@_fake_quantize_backward.register_fake
def _(grad_out, x, scale, signed=True, dim=None, group_size=None, grad="mad", frozen=None):
    _check_backward(grad_out, x, scale, signed, dim, group_size, grad, frozen)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _grad_x(ctx, grad_out):
    """d(loss)/dx of the clip-quantize op by the estimator chosen in the forward (SPEC §3)."""
    if ctx.grad == "ste":
        return grad_out
    x, scale = ctx.saved_tensors
    return torch.ops.octav.fake_quantize_backward(
        grad_out, x, scale, ctx.signed, ctx.dim, ctx.group_size, ctx.grad)


def _save_for_grad(ctx, x, scale, signed, dim, group_size, grad):
    """Saves what the estimator needs: nothing for STE, x and the scale for PWL and MAD (the
    PWL path of the public wrappers saves a bit-packed mask instead where the backend has one:
    see _fake_quantize_packed)."""
    ctx.signed, ctx.dim, ctx.group_size, ctx.grad = signed, dim, group_size, grad
    if grad != "ste":
        ctx.save_for_backward(x, scale)


def _fake_quantize_setup(ctx, inputs, output):
    x, scale, _bits, signed, dim, group_size, grad, _narrow = inputs
    _save_for_grad(ctx, x, scale, signed, dim, group_size, grad)


def _fake_quantize_grad(ctx, grad_out):
    return _grad_x(ctx, grad_out), None, None, None, None, None, None, None


_fake_quantize.register_autograd(_fake_quantize_grad, setup_context=_fake_quantize_setup)


# ---------------------------------------------------------------------------------------------
# octav::fake_quantize_tracked: the weight fake-quant that also tracks oscillations and freezes
# weights (reference.fake_quantize_tracked), in one pass that updates the state in place. The
# threshold is a 0-dim float32 tensor on x's device, so a schedule that changes it every step
# does not recompile a torch.compile'd model. Its
# autograd (the backward with the frozen mask) is octav_kernels.oscillation's, since torch.library
# registers autograd only for ops that mutate nothing.

_TRACKED_STATE = (("last_int", torch.int8), ("last_dir", torch.int8), ("frozen", torch.bool),
                  ("osc_freq", torch.float32), ("int_ema", torch.float32))


def _check_tracked(x, scale, bits, signed, dim, group_size, narrow, state, momentum,
                   freeze_threshold):
    g, scale = _check_with_scale(x, scale, bits, signed, dim, group_size, narrow)
    _args.check_tracked_bits(bits, signed)
    for (name, dtype), tensor in zip(_TRACKED_STATE, state):
        _args.check_state(tensor, x, dtype, name, contiguous=True)
    _args.check_momentum(momentum)
    _args.check_scalar_tensor(freeze_threshold, x, "freeze_threshold")
    return g, scale


@torch.library.custom_op(
    "octav::fake_quantize_tracked",
    mutates_args=("last_int", "last_dir", "frozen", "osc_freq", "int_ema"),
    schema="(Tensor x, Tensor scale, int bits, bool signed, int? dim, int? group_size, "
           "bool narrow, Tensor(a!) last_int, Tensor(b!) last_dir, Tensor(c!) frozen, "
           "Tensor(d!) osc_freq, Tensor(e!) int_ema, float momentum, Tensor freeze_threshold, "
           "bool update) -> Tensor")
def _fake_quantize_tracked(x, scale, bits, signed, dim, group_size, narrow, last_int, last_dir,
                           frozen, osc_freq, int_ema, momentum, freeze_threshold, update):
    state = (last_int, last_dir, frozen, osc_freq, int_ema)
    g, scale = _check_tracked(x, scale, bits, signed, dim, group_size, narrow, state, momentum,
                              freeze_threshold)
    _args.check_disjoint(dict(zip(("last_int", "last_dir", "frozen", "osc_freq", "int_ema"),
                                  state)))
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return backend.select(x.device).fake_quantize_tracked(
        x, scale, bits, signed, g.dim, g.group_size, narrow, *state, momentum,
        freeze_threshold, update)


@_fake_quantize_tracked.register_fake
def _(x, scale, bits, signed, dim, group_size, narrow, last_int, last_dir, frozen, osc_freq,
      int_ema, momentum, freeze_threshold, update):
    _check_tracked(x, scale, bits, signed, dim, group_size, narrow,
                   (last_int, last_dir, frozen, osc_freq, int_ema), momentum, freeze_threshold)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# ---------------------------------------------------------------------------------------------
# octav::dampening_error and its backward: the per-element oscillation-dampening term
# (reference.dampening_error), differentiable in w with q held constant.


def _check_dampening(w, scale, bits, signed, dim, group_size, narrow, frozen, grad=None):
    g, scale = _check_with_scale(w, scale, bits, signed, dim, group_size, narrow)
    if frozen is not None:
        _args.check_state(frozen, w, torch.bool, "frozen")
    if grad is not None and (grad.shape != w.shape or grad.device != w.device):
        raise ValueError(f"grad ({list(grad.shape)} on {grad.device}) must match w "
                         f"({list(w.shape)} on {w.device})")
    return g, scale


@torch.library.custom_op(
    "octav::dampening_error", mutates_args=(),
    schema="(Tensor w, Tensor scale, int bits, bool signed=True, int? dim=None, "
           "int? group_size=None, bool narrow=False, Tensor? frozen=None) -> Tensor")
def _dampening_error(w, scale, bits, signed=True, dim=None, group_size=None, narrow=False,
                     frozen=None):
    g, scale = _check_dampening(w, scale, bits, signed, dim, group_size, narrow, frozen)
    if w.numel() == 0:
        return torch.empty(w.shape, dtype=torch.float32, device=w.device)
    return backend.select(w.device).dampening_error(w, scale, bits, signed, g.dim, g.group_size,
                                                    narrow, frozen)


@_dampening_error.register_fake
def _(w, scale, bits, signed=True, dim=None, group_size=None, narrow=False, frozen=None):
    _check_dampening(w, scale, bits, signed, dim, group_size, narrow, frozen)
    return torch.empty(w.shape, dtype=torch.float32, device=w.device)


@torch.library.custom_op(
    "octav::dampening_backward", mutates_args=(),
    schema="(Tensor grad, Tensor w, Tensor scale, int bits, bool signed=True, int? dim=None, "
           "int? group_size=None, bool narrow=False, Tensor? frozen=None) -> Tensor")
def _dampening_backward(grad, w, scale, bits, signed=True, dim=None, group_size=None,
                        narrow=False, frozen=None):
    g, scale = _check_dampening(w, scale, bits, signed, dim, group_size, narrow, frozen, grad)
    if w.numel() == 0:
        return torch.empty(w.shape, dtype=w.dtype, device=w.device)
    return backend.select(w.device).dampening_backward(grad.float(), w, scale, bits, signed,
                                                       g.dim, g.group_size, narrow, frozen)


@_dampening_backward.register_fake
def _(grad, w, scale, bits, signed=True, dim=None, group_size=None, narrow=False, frozen=None):
    _check_dampening(w, scale, bits, signed, dim, group_size, narrow, frozen, grad)
    return torch.empty(w.shape, dtype=w.dtype, device=w.device)


def _dampening_setup(ctx, inputs, output):
    w, scale, bits, signed, dim, group_size, narrow, frozen = inputs
    ctx.args = (bits, signed, dim, group_size, narrow)
    ctx.save_for_backward(w, scale, frozen)


def _dampening_grad(ctx, grad):
    w, scale, frozen = ctx.saved_tensors
    grad_w = torch.ops.octav.dampening_backward(grad, w, scale, *ctx.args, frozen)
    return (grad_w,) + (None,) * 7


_dampening_error.register_autograd(_dampening_grad, setup_context=_dampening_setup)


# ---------------------------------------------------------------------------------------------
# octav::octav_fake_quantize


@torch.library.custom_op(
    "octav::octav_fake_quantize", mutates_args=(),
    schema="(Tensor x, int bits, bool signed=True, int? dim=None, int? group_size=None, "
           "str grad=\"mad\", Tensor? init=None, bool narrow=False) -> (Tensor, Tensor)")
def _octav_fake_quantize(x, bits, signed=True, dim=None, group_size=None, grad="mad", init=None,
                         narrow=False):
    g, init = _check_octav(x, bits, signed, dim, group_size, init, narrow)
    _args.check_grad(grad)
    if x.numel() == 0:
        return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
                torch.zeros(g.scale_shape, dtype=torch.float32, device=x.device))
    kernels = backend.select(x.device)
    fused = getattr(kernels, "octav_fake_quantize", None)
    if fused is not None:
        return fused(x, bits, signed, g.dim, g.group_size, grad, init, narrow)
    scale = kernels.octav_scale(x, bits, signed, g.dim, g.group_size, init, narrow=narrow)
    return kernels.fake_quantize(x, scale, bits, signed, g.dim, g.group_size, grad, narrow), scale


@_octav_fake_quantize.register_fake
def _(x, bits, signed=True, dim=None, group_size=None, grad="mad", init=None, narrow=False):
    g, _ = _check_octav(x, bits, signed, dim, group_size, init, narrow)
    _args.check_grad(grad)
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            x.new_empty(g.scale_shape, dtype=torch.float32))


def _octav_fake_quantize_setup(ctx, inputs, output):
    x, _bits, signed, dim, group_size, grad, _init, _narrow = inputs
    ctx.mark_non_differentiable(output[1])
    _save_for_grad(ctx, x, output[1], signed, dim, group_size, grad)


def _octav_fake_quantize_grad(ctx, grad_y, grad_scale):
    return _grad_x(ctx, grad_y), None, None, None, None, None, None, None


_octav_fake_quantize.register_autograd(_octav_fake_quantize_grad,
                                       setup_context=_octav_fake_quantize_setup)


# ---------------------------------------------------------------------------------------------
# PWL with a bit-packed mask: the forward also returns the PWL pass-through set, 1 bit per
# element (reference.pwl_mask's layout), and the backward reads only that and the incoming
# gradient. The public wrappers take this path for grad="pwl" in training when the serving
# backend computes the mask inside its forward kernel (has ``fake_quantize_packed``); an
# activation then keeps numel / 8 bytes for its backward instead of itself.


def _takes_packed_path(x: torch.Tensor, grad: str) -> bool:
    """Whether this call should take the packed-mask PWL path. Under torch.compile the backend
    module is not looked up (dynamo does not trace imports): CUDA tensors with the CUDA kernels
    built take it (a forced other backend then composes the mask, still correctly)."""
    if grad != "pwl" or not (x.requires_grad and torch.is_grad_enabled()):
        return False
    if torch.compiler.is_compiling():
        return x.device.type == "cuda" and backend.cuda_kernels_built()
    return hasattr(backend.select(x.device), "fake_quantize_packed")


def _empty_mask(x):
    return torch.empty(((x.numel() + 31) // 32,), dtype=torch.int32, device=x.device)


@torch.library.custom_op(
    "octav::_fake_quantize_packed", mutates_args=(),
    schema="(Tensor x, Tensor scale, int bits, bool signed=True, int? dim=None, "
           "int? group_size=None, bool narrow=False) -> (Tensor, Tensor)")
def _fake_quantize_packed(x, scale, bits, signed=True, dim=None, group_size=None, narrow=False):
    g, scale = _check_with_scale(x, scale, bits, signed, dim, group_size, narrow)
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device), _empty_mask(x)
    kernels = backend.select(x.device)
    if hasattr(kernels, "fake_quantize_packed"):
        return kernels.fake_quantize_packed(x, scale, bits, signed, g.dim, g.group_size, narrow)
    y = kernels.fake_quantize(x, scale, bits, signed, g.dim, g.group_size, "pwl", narrow)
    return y, reference.pwl_mask(x, scale, signed, g.dim, g.group_size)


@_fake_quantize_packed.register_fake
def _(x, scale, bits, signed=True, dim=None, group_size=None, narrow=False):
    _check_with_scale(x, scale, bits, signed, dim, group_size, narrow)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), _empty_mask(x)


@torch.library.custom_op(
    "octav::_octav_fake_quantize_packed", mutates_args=(),
    schema="(Tensor x, int bits, bool signed=True, int? dim=None, int? group_size=None, "
           "Tensor? init=None, bool narrow=False) -> (Tensor, Tensor, Tensor)")
def _octav_fake_quantize_packed(x, bits, signed=True, dim=None, group_size=None, init=None,
                                narrow=False):
    g, init = _check_octav(x, bits, signed, dim, group_size, init, narrow)
    if x.numel() == 0:
        return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
                torch.zeros(g.scale_shape, dtype=torch.float32, device=x.device), _empty_mask(x))
    kernels = backend.select(x.device)
    if hasattr(kernels, "octav_fake_quantize_packed"):
        return kernels.octav_fake_quantize_packed(x, bits, signed, g.dim, g.group_size, init,
                                                  narrow)
    scale = kernels.octav_scale(x, bits, signed, g.dim, g.group_size, init, narrow=narrow)
    y, mask = _fake_quantize_packed(x, scale, bits, signed, g.dim, g.group_size, narrow)
    return y, scale, mask


@_octav_fake_quantize_packed.register_fake
def _(x, bits, signed=True, dim=None, group_size=None, init=None, narrow=False):
    g, _ = _check_octav(x, bits, signed, dim, group_size, init, narrow)
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            x.new_empty(g.scale_shape, dtype=torch.float32), _empty_mask(x))


@torch.library.custom_op("octav::_pwl_backward_packed", mutates_args=(),
                         schema="(Tensor grad_out, Tensor mask) -> Tensor")
def _pwl_backward_packed(grad_out, mask):
    kernels = backend.select(grad_out.device)
    if grad_out.numel() > 0 and hasattr(kernels, "pwl_backward_packed"):
        return kernels.pwl_backward_packed(grad_out.contiguous(), mask)
    return reference.pwl_backward_from_mask(grad_out, mask)


@_pwl_backward_packed.register_fake
def _(grad_out, mask):
    return torch.empty(grad_out.shape, dtype=grad_out.dtype, device=grad_out.device)


def _packed_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(output[-1])


def _packed_grad(ctx, grad_y, *_):
    (mask,) = ctx.saved_tensors
    return (torch.ops.octav._pwl_backward_packed(grad_y, mask),) + (None,) * 6


_fake_quantize_packed.register_autograd(_packed_grad, setup_context=_packed_setup)
_octav_fake_quantize_packed.register_autograd(_packed_grad, setup_context=_packed_setup)


# ---------------------------------------------------------------------------------------------
# Public wrappers


def _check_types(x, bits=None, dim=None, group_size=None, flags=(), tensors=()) -> None:
    """Python-type checks the dispatcher would otherwise report as a bare RuntimeError."""
    _args.check_x(x)
    if bits is not None:
        _args.check_int(bits, "bits")
    for name, value in (("dim", dim), ("group_size", group_size)):
        if value is not None:
            _args.check_int(value, name)
    for name, value in flags:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    for name, value in tensors:
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def octav_scale(x: torch.Tensor, bits: int, *, signed: bool = True, dim: int | None = None,
                group_size: int | None = None, init: torch.Tensor | None = None,
                max_iters: int = 32, rtol: float = 1e-6, narrow: bool = False,
                refine: bool = False) -> torch.Tensor:
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
    """
    _check_types(x, bits, dim, group_size, (("signed", signed), ("narrow", narrow),
                                            ("refine", refine)), (("init", init),))
    _args.check_iteration(max_iters, rtol)
    scale = torch.ops.octav.octav_scale(x, bits, signed, dim, group_size, init, max_iters,
                                        float(rtol), narrow)
    if refine:
        scale = torch.ops.octav.refine_scale(x, scale, bits, signed, dim, group_size, narrow)
    return scale


def refine_scale(x: torch.Tensor, scale: torch.Tensor, bits: int, *, signed: bool = True,
                 dim: int | None = None, group_size: int | None = None,
                 narrow: bool = False) -> torch.Tensor:
    """``scale`` (e.g. the OCTAV fixed point) polished against the empirical MSE
    ``sum((fake_quantize(x, s) - x)**2)`` of the real quantizer (SPEC §1, §8), per group, float32.

    OCTAV minimizes a model of the error (uniform noise, symmetric grid); the two's-complement
    grid, short rows and low bit widths make the real optimum differ. The search
    (``octav_kernels.reference.refine_search``) evaluates 16 candidate scales in 4 passes over
    the data: a coarse pass of 6 from ``scale / 1.25`` up to ``max|x|`` (it includes ``scale``
    and ``max|x|``, and spans both minima of heavy-outlier data: outliers clipped, or
    represented with the small values rounded to zero), then passes of 4, 4 and 2 that narrow
    the bracket around the best. It returns the lowest-error candidate seen, so never a higher
    error than ``scale`` or than max scaling. NaN/inf in a group give a NaN/inf scale; an
    all-zero group gives 0.
    """
    _check_types(x, bits, dim, group_size, (("signed", signed), ("narrow", narrow)),
                 (("scale", scale),))
    return torch.ops.octav.refine_scale(x, scale, bits, signed, dim, group_size, narrow)


def masked_sums(x: torch.Tensor, scale: torch.Tensor, *, signed: bool = True,
                dim: int | None = None, group_size: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One OCTAV pass per group: ``(S_out float32, n_in int64, n_out int64)`` at ``scale``.

    ``S_out = sum(a * 1{a > s})``, ``n_in = #{0 < a <= s}``, ``n_out = #{a > s}`` with
    ``a = |x|`` (``x`` if unsigned; NaN entries count as out). Data-parallel training can
    all-reduce the three and iterate on the global statistics.
    """
    _check_types(x, None, dim, group_size, (("signed", signed),), (("scale", scale),))
    return torch.ops.octav.masked_sums(x, scale, signed, dim, group_size)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, bits: int, *, signed: bool = True,
                  dim: int | None = None, group_size: int | None = None, grad: str = "mad",
                  narrow: bool = False) -> torch.Tensor:
    """Clip-quantize ``x`` on the ``bits``-bit grid of ``scale`` (SPEC §1), differentiable in x::

        step = s * 2**(1-B);  q = clamp(round(x / step), -2**(B-1), 2**(B-1)-1) * step

    (unsigned: ``step = s * 2**-B``, levels ``0..2**B-1``; ``narrow``: ``step = s/(2**(B-1)-1)``,
    levels ``±(2**(B-1)-1)``). Rounds half to even in float32; q = 0 where s == 0. The backward
    is ``grad`` in {"ste", "pwl", "mad"} (SPEC §3); the scale gets no gradient.
    """
    _check_types(x, bits, dim, group_size, (("signed", signed), ("narrow", narrow)),
                 (("scale", scale),))
    _args.check_grad(grad)
    if _takes_packed_path(x, grad):
        return torch.ops.octav._fake_quantize_packed(x, scale, bits, signed, dim, group_size,
                                                     narrow)[0]
    return torch.ops.octav.fake_quantize(x, scale, bits, signed, dim, group_size, grad, narrow)


def octav_fake_quantize(x: torch.Tensor, bits: int, *, signed: bool = True,
                        dim: int | None = None, group_size: int | None = None,
                        grad: str = "mad", init: torch.Tensor | None = None,
                        narrow: bool = False, refine: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fake_quantize(x, s, bits, ...), s)`` with ``s = octav_scale(x, bits, ...)``.

    The usual QAT call: one op finds the OCTAV scale (warm-started from ``init``, e.g. the last
    step's scale) and fake-quantizes with it; gradients flow to x by ``grad``. ``refine=True``
    uses ``octav_scale(..., refine=True)`` (the scale polished against the empirical MSE).
    """
    _check_types(x, bits, dim, group_size, (("signed", signed), ("narrow", narrow),
                                            ("refine", refine)), (("init", init),))
    _args.check_grad(grad)
    if refine:
        scale = octav_scale(x.detach(), bits, signed=signed, dim=dim, group_size=group_size,
                            init=init, narrow=narrow, refine=True)
        return fake_quantize(x, scale, bits, signed=signed, dim=dim, group_size=group_size,
                             grad=grad, narrow=narrow), scale
    if _takes_packed_path(x, grad):
        y, scale, _ = torch.ops.octav._octav_fake_quantize_packed(x, bits, signed, dim,
                                                                  group_size, init, narrow)
        return y, scale
    return torch.ops.octav.octav_fake_quantize(x, bits, signed, dim, group_size, grad, init,
                                               narrow)
