"""The oscillation ops (Nagel et al., "Overcoming Oscillations in Quantization-Aware Training",
ICML 2022): ``octav::fake_quantize_tracked``, the weight fake-quant that also tracks each weight's
oscillations and freezes the worst, in one pass that updates the state in place; and
``octav::dampening_error`` (with its backward), the per-element dampening term. The QAT-level
schedules and the model-wide control are in ``octav_kernels.qat.oscillation``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _args, reference
from ._library import define

# ---------------------------------------------------------------------------------------------
# octav::fake_quantize_tracked. The threshold is a 0-dim float32 tensor on x's device, so a
# schedule that changes it every step does not recompile a torch.compile'd model. Its autograd
# (the backward with the frozen mask) is _TrackedFakeQuantize below: the op mutates its state.

_TRACKED_STATE = (("last_int", torch.int8), ("last_dir", torch.int8), ("frozen", torch.bool),
                  ("osc_freq", torch.float32), ("int_ema", torch.float32))


def _check_tracked(x, scale, bits, signed, dim, group_size, narrow, state, momentum,
                   freeze_threshold):
    g, scale = _args.check_with_scale(x, scale, bits, signed, dim, group_size, narrow)
    _args.check_tracked_bits(bits, signed)
    for (name, dtype), tensor in zip(_TRACKED_STATE, state):
        _args.check_state(tensor, x, dtype, name, contiguous=True)
    _args.check_momentum(momentum)
    _args.check_scalar_tensor(freeze_threshold, x, "freeze_threshold")
    return g, scale


def _tracked_kernel(impl):
    def kernel(x, scale, bits, signed, dim, group_size, narrow, last_int, last_dir, frozen,
               osc_freq, int_ema, momentum, freeze_threshold, update):
        state = (last_int, last_dir, frozen, osc_freq, int_ema)
        g, scale = _check_tracked(x, scale, bits, signed, dim, group_size, narrow, state,
                                  momentum, freeze_threshold)
        _args.check_disjoint(dict(zip((name for name, _ in _TRACKED_STATE), state)))
        if x.numel() == 0:
            return torch.empty(x.shape, dtype=x.dtype, device=x.device)
        return impl(x, scale, bits, signed, g.dim, g.group_size, narrow, *state, momentum,
                    freeze_threshold, update)
    return kernel


def _tracked_fake(x, scale, bits, signed, dim, group_size, narrow, last_int, last_dir, frozen,
                  osc_freq, int_ema, momentum, freeze_threshold, update):
    _check_tracked(x, scale, bits, signed, dim, group_size, narrow,
                   (last_int, last_dir, frozen, osc_freq, int_ema), momentum, freeze_threshold)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


define("fake_quantize_tracked(Tensor x, Tensor scale, int bits, bool signed, int? dim, "
       "int? group_size, bool narrow, Tensor(a!) last_int, Tensor(b!) last_dir, "
       "Tensor(c!) frozen, Tensor(d!) osc_freq, Tensor(e!) int_ema, float momentum, "
       "Tensor freeze_threshold, bool update) -> Tensor", _tracked_kernel, _tracked_fake)


@dataclass
class OscillationState:
    """Per-element oscillation state of one weight (all of the weight's shape and device).

    ``last_int`` int8: the integer level at the last tracked step (the frozen level once
    frozen); ``last_dir`` int8: -1/0/+1, the direction of the last change; ``frozen`` bool;
    ``osc_freq`` float32: EMA of "the direction reversed"; ``int_ema`` float32: EMA of the level.
    """

    last_int: torch.Tensor
    last_dir: torch.Tensor
    frozen: torch.Tensor
    osc_freq: torch.Tensor
    int_ema: torch.Tensor

    @classmethod
    def start(cls, x: torch.Tensor, scale: torch.Tensor, bits: int, *, signed: bool = True,
              dim: int | None = None, group_size: int | None = None,
              narrow: bool = False) -> OscillationState:
        """The state before the first tracked step: ``x``'s levels on ``scale``'s grid, no
        direction, frequency 0, nothing frozen."""
        _args.check_types(x, bits, dim, group_size, (("signed", signed), ("narrow", narrow)),
                          (("scale", scale),))
        _args.check_tracked_bits(_args.check_bits(bits), signed)
        g, scale = _args.check_with_scale(x, scale, bits, signed, dim, group_size, narrow)
        level = reference.integer_levels(x.detach(), scale, bits, signed, g.dim, g.group_size,
                                         narrow).contiguous()
        return cls(level, torch.zeros_like(level), torch.zeros_like(level, dtype=torch.bool),
                   torch.zeros_like(level, dtype=torch.float32), level.float())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.last_int, self.last_dir, self.frozen, self.osc_freq, self.int_ema)


class _TrackedFakeQuantize(torch.autograd.Function):
    """fake_quantize_tracked with the clip-quantize gradient of ``grad`` masked by ``frozen``
    (both in the kernels). The state is updated by the forward; the backward reads a copy of the
    frozen mask as this forward left it (1 byte per weight), so a second forward through the
    same weight before the backward (a shared layer) does not invalidate it."""

    @staticmethod
    def forward(ctx, x, scale, bits, signed, dim, group_size, grad, narrow, last_int, last_dir,
                frozen, osc_freq, int_ema, momentum, freeze_threshold, update, learned,
                grad_scale):
        y = torch.ops.octav.fake_quantize_tracked.default(
            x, scale, bits, signed, dim, group_size, narrow, last_int, last_dir, frozen,
            osc_freq, int_ema, momentum, freeze_threshold, update)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:  # (eval: nothing copied)
            ctx.save_for_backward(x, scale, frozen.clone())
        ctx.args = (bits, signed, dim, group_size, grad, narrow, learned, grad_scale)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, scale, frozen = ctx.saved_tensors
        bits, signed, dim, group_size, grad, narrow, learned, grad_scale = ctx.args
        grad_s = None
        if learned:  # LSQ: frozen weights are constants of training, for the scale too
            grad_x, grad_s = torch.ops.octav.fake_quantize_lsq_backward.default(
                grad_y, x, scale, bits, signed, dim, group_size, grad, narrow, grad_scale,
                frozen)
            grad_s = grad_s.to(scale.dtype)
        else:
            grad_x = torch.ops.octav.fake_quantize_backward.default(
                grad_y, x, scale, signed, dim, group_size, grad, frozen)
        return (grad_x, grad_s) + (None,) * 16  # state, threshold and flags get no gradient


def fake_quantize_tracked(x: torch.Tensor, scale: torch.Tensor, bits: int,
                          state: OscillationState, *, signed: bool = True,
                          dim: int | None = None, group_size: int | None = None,
                          grad: str = "mad", narrow: bool = False, momentum: float = 0.01,
                          freeze_threshold: float | torch.Tensor = 0.0,
                          update: bool = True, learned: bool = False,
                          grad_scale: bool = True) -> torch.Tensor:
    """``fake_quantize`` of a weight that also tracks its oscillations (and freezes weights),
    in one pass; updates ``state`` in place (``update=False``: only applies the frozen levels,
    as in eval). Per element, with ``n`` its level this step and ``m = momentum``::

        d = sign(n - last_int);  oscillated = d != 0 and last_dir != 0 and d != last_dir
        osc_freq = (1 - m) osc_freq + m oscillated;  int_ema = (1 - m) int_ema + m n
        freeze where freeze_threshold > 0 and osc_freq > freeze_threshold, at
        clamp(round(int_ema)); a frozen weight outputs its kept level and gets no gradient.

    Levels are int8: signed bits <= 8, unsigned <= 7. ``freeze_threshold`` is a number or a
    0-dim float32 tensor on x's device (compared in float32; a tensor that a schedule updates
    in place does not recompile a compiled model). ``reference.fake_quantize_tracked`` is the
    definition. ``learned=True``: the scale is learned (LSQ, ``fake_quantize_lsq``) and gets its
    gradient too (frozen weights do not contribute to it).
    """
    _args.check_types(x, bits, dim, group_size, (("signed", signed), ("narrow", narrow),
                                                 ("update", update), ("learned", learned),
                                                 ("grad_scale", grad_scale)),
                      (("scale", scale),))
    _args.check_grad(grad)
    if not isinstance(state, OscillationState):
        raise TypeError(f"state must be an OscillationState, got {type(state).__name__}")
    if not isinstance(freeze_threshold, torch.Tensor):  # (torch.full: no host-to-device copy)
        freeze_threshold = torch.full((), _args.check_threshold(freeze_threshold,
                                                                "freeze_threshold"),
                                      dtype=torch.float32, device=x.device)
    return _TrackedFakeQuantize.apply(x, scale, bits, signed, dim, group_size, grad, narrow,
                                      *state.tensors(), _args.check_momentum(momentum),
                                      freeze_threshold, update, learned, grad_scale)


# ---------------------------------------------------------------------------------------------
# octav::dampening_error and its backward: the per-element oscillation-dampening term
# (reference.dampening_error), differentiable in w with q held constant.


def _check_dampening(w, scale, bits, signed, dim, group_size, narrow, frozen, grad=None):
    g, scale = _args.check_with_scale(w, scale, bits, signed, dim, group_size, narrow)
    if frozen is not None:
        _args.check_state(frozen, w, torch.bool, "frozen")
    if grad is not None and (grad.shape != w.shape or grad.device != w.device):
        raise ValueError(f"grad ({list(grad.shape)} on {grad.device}) must match w "
                         f"({list(w.shape)} on {w.device})")
    return g, scale


def _dampening_kernel(impl):
    def kernel(w, scale, bits, signed=True, dim=None, group_size=None, narrow=False,
               frozen=None):
        g, scale = _check_dampening(w, scale, bits, signed, dim, group_size, narrow, frozen)
        if w.numel() == 0:
            return torch.empty(w.shape, dtype=torch.float32, device=w.device)
        return impl(w, scale, bits, signed, g.dim, g.group_size, narrow, frozen)
    return kernel


def _dampening_fake(w, scale, bits, signed=True, dim=None, group_size=None, narrow=False,
                    frozen=None):
    _check_dampening(w, scale, bits, signed, dim, group_size, narrow, frozen)
    return torch.empty(w.shape, dtype=torch.float32, device=w.device)


def _dampening_setup(ctx, inputs, output):
    w, scale, bits, signed, dim, group_size, narrow, frozen = inputs
    ctx.args = (bits, signed, dim, group_size, narrow)
    ctx.save_for_backward(w, scale, frozen)


def _dampening_grad(ctx, grad):
    w, scale, frozen = ctx.saved_tensors
    grad_w = torch.ops.octav.dampening_backward.default(grad, w, scale, *ctx.args, frozen)
    return (grad_w,) + (None,) * 7


define("dampening_error(Tensor w, Tensor scale, int bits, bool signed=True, int? dim=None, "
       "int? group_size=None, bool narrow=False, Tensor? frozen=None) -> Tensor",
       _dampening_kernel, _dampening_fake, backward=_dampening_grad,
       setup_context=_dampening_setup)


def _dampening_backward_kernel(impl):
    def kernel(grad, w, scale, bits, signed=True, dim=None, group_size=None, narrow=False,
               frozen=None):
        g, scale = _check_dampening(w, scale, bits, signed, dim, group_size, narrow, frozen,
                                    grad)
        if w.numel() == 0:
            return torch.empty(w.shape, dtype=w.dtype, device=w.device)
        return impl(grad.float(), w, scale, bits, signed, g.dim, g.group_size, narrow, frozen)
    return kernel


def _dampening_backward_fake(grad, w, scale, bits, signed=True, dim=None, group_size=None,
                             narrow=False, frozen=None):
    _check_dampening(w, scale, bits, signed, dim, group_size, narrow, frozen, grad)
    return torch.empty(w.shape, dtype=w.dtype, device=w.device)


define("dampening_backward(Tensor grad, Tensor w, Tensor scale, int bits, bool signed=True, "
       "int? dim=None, int? group_size=None, bool narrow=False, Tensor? frozen=None) -> Tensor",
       _dampening_backward_kernel, _dampening_backward_fake)


REDUCTIONS = ("sum", "mean", "kernel_mean")


def dampening_loss(w: torch.Tensor, scale: torch.Tensor, bits: int, *, signed: bool = True,
                   dim: int | None = None, group_size: int | None = None,
                   narrow: bool = False, reduction: str = "sum",
                   frozen: torch.Tensor | None = None) -> torch.Tensor:
    """Oscillation dampening (Nagel et al., eq. 6): ``(q(w).detach() - clip(w))**2`` with
    ``q`` the fake-quantizer of ``scale`` and ``clip(w)`` w clamped to the grid's range
    ``[lo * step, hi * step]``, reduced by ``reduction``: ``"sum"``, ``"mean"`` or
    ``"kernel_mean"`` (summed over each output channel, dim 0, then averaged over channels).
    Its gradient, ``2 (clip(w) - q(w))`` inside the range, pulls each weight to the centre of
    its bin. Frozen weights (``frozen``) are left out. float32 scalar, differentiable in ``w``.
    The per-element term and its gradient are one kernel each (op ``octav::dampening_error``);
    the reduction is a torch sum. No double backward (like the other ops' gradients).
    """
    _args.check_types(w, bits, dim, group_size, (("signed", signed), ("narrow", narrow)),
                      (("scale", scale), ("frozen", frozen)))
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "kernel_mean" and w.dim() == 0:
        raise ValueError("reduction='kernel_mean' needs a weight with an output-channel dim")
    error = torch.ops.octav.dampening_error.default(w, scale.detach(), bits, signed, dim,
                                                    group_size, narrow, frozen)
    if reduction == "sum" or error.numel() == 0:  # (an empty weight: 0)
        return error.sum()
    if reduction == "mean":
        return error.mean()
    return error.flatten(1).sum(1).mean() if error.dim() > 1 else error.mean()
