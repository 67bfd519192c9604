"""Per-weight oscillation tracking and freezing of a ``Quantizer`` (Nagel et al., ICML 2022):
the state buffers and what reads or writes them. ``Quantizer`` inherits it;
``octav_kernels.qat.oscillation.OscillationControl`` turns it on and drives its schedules."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Shard

from .. import _args
from ..ops.oscillation import OscillationState, dampening_loss, fake_quantize_tracked

# Oscillation tracking state (OscillationState), buffer name: dtype.
OSC_BUFFERS = {"osc_last_int": torch.int8, "osc_last_dir": torch.int8, "osc_frozen": torch.bool,
               "osc_freq": torch.float32, "osc_int_ema": torch.float32}


class OscillationTracking:
    """Oscillation tracking for a quantizer (a ``torch.nn.Module`` with ``bits``, ``signed``,
    ``dim``, ``group_size``, ``narrow``, ``grad``, ``name``, ``grid``, ``policy`` and a
    ``scale``). Off until
    ``track_oscillations()``; the state lives in the buffers ``osc_last_int``, ``osc_last_dir``,
    ``osc_frozen``, ``osc_freq`` and ``osc_int_ema`` (saved in ``state_dict``)."""

    momentum: float | None = None  # None: tracking off

    @property
    def tracking(self) -> bool:
        """Whether oscillation tracking is on (``track_oscillations``)."""
        return self.momentum is not None

    def track_oscillations(self, momentum: float = 0.01) -> None:
        """Track this quantizer's oscillations from its next training forward (momentum of the
        frequency and level EMAs); ``freeze_threshold`` > 0 freezes weights above it. The
        state starts at the first forward, from that input's levels."""
        if self.signed is None:
            raise ValueError(f"{self.name}: oscillation tracking needs a fixed grid type "
                             "(signed=True or False), got signed=None")
        _args.check_tracked_bits(self.bits, self.signed)
        self.momentum = _args.check_momentum(momentum)
        if "osc_last_int" not in self._buffers:
            device = self.scale.device
            for name, dtype in OSC_BUFFERS.items():
                self.register_buffer(name, torch.empty(0, dtype=dtype, device=device))
            # Set by the schedule every step (OscillationControl); not part of the state.
            self.register_buffer("osc_threshold", torch.zeros((), device=device),
                                 persistent=False)

    @property
    def freeze_threshold(self) -> float:
        """The oscillation frequency above which a weight freezes (0: freezing off); stored
        as a tensor, so a schedule that changes it does not recompile a compiled model."""
        return float(self.osc_threshold) if self.tracking else 0.0

    @freeze_threshold.setter
    def freeze_threshold(self, value: float) -> None:
        if not self.tracking:
            raise RuntimeError(f"{self.name}: call track_oscillations() before setting "
                               "freeze_threshold")
        with torch.no_grad():
            self.osc_threshold.fill_(_args.check_threshold(value, "freeze_threshold"))

    def _oscillation_state(self, x, scale) -> OscillationState:
        if self.osc_last_int.shape != x.shape:
            if self.osc_last_int.numel() > 0:
                raise ValueError(f"{self.name}: oscillation state of shape "
                                 f"{list(self.osc_last_int.shape)} does not match the input "
                                 f"{list(x.shape)}")
            start = OscillationState.start(x, scale, self.bits, signed=self.signed, dim=self.dim,
                                           group_size=self.group_size, narrow=self.narrow)
            for name, tensor in zip(OSC_BUFFERS, start.tensors()):
                setattr(self, name, tensor)
        return OscillationState(*(getattr(self, name) for name in OSC_BUFFERS))

    def _fake_quantize_tracked(self, x, scale):
        learned = self.policy.learned and self.training
        return fake_quantize_tracked(
            x, scale, self.bits, self._oscillation_state(x, scale), signed=self.signed,
            dim=self.dim, group_size=self.group_size, grad=self.grad, narrow=self.narrow,
            momentum=self.momentum, freeze_threshold=self.osc_threshold, update=self.training,
            learned=learned, grad_scale=self.grad_scale)

    def frozen_fraction(self) -> float:
        """Fraction of the tracked elements that are frozen (0 before tracking starts)."""
        if not self.tracking or self.osc_frozen.numel() == 0:
            return 0.0
        return float(self.osc_frozen.float().mean())

    def oscillating_fraction(self, threshold: float = 0.01) -> float:
        """Fraction of the tracked elements that are not frozen and whose oscillation frequency
        EMA exceeds ``threshold`` (a frozen element keeps the frequency it froze at)."""
        if not self.tracking or self.osc_freq.numel() == 0:
            return 0.0
        return float(((self.osc_freq > threshold) & ~self.osc_frozen).float().mean())

    def local_part(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, slice]:
        """``(w's elements this rank holds, their scale, their rows)``: ``w`` itself, the
        kept scale and all rows; or for FSDP2's shard of ``w`` (a ``DTensor`` sharded on dim 0,
        outside the sharded forward) its local rows (``to_local``, differentiable) and the
        scale of those rows (per channel along dim 0 and per block: rows of the scale)."""
        scale = self.kept_scale()
        if not isinstance(w, DTensor):
            return w, scale, slice(None)
        if tuple(w.placements) != (Shard(0),):
            raise ValueError(f"{self.name}: a DTensor weight must be sharded along dim 0 on a "
                             f"1-D mesh (FSDP2), got placements {w.placements}")
        local = w.to_local()
        per = -(-w.shape[0] // w.device_mesh.size())  # torch.chunk's rows per rank
        lo = min(w.device_mesh.get_local_rank() * per, w.shape[0])
        rows = slice(lo, lo + local.shape[0])
        if self.dim == 0 or self.group_size is not None:
            shape = _args.groups(local, self.dim, self.group_size).scale_shape
            scale = scale.reshape(w.shape[0], -1)[rows].reshape(shape)
        return local, scale, rows

    def write_frozen(self, w: torch.Tensor) -> int:
        """Set the frozen elements of ``w`` (this quantizer's input, e.g. the layer's weight
        viewed as it quantizes it; under FSDP2 the rows of this rank's shard) to their kept
        level on the current grid, in place; returns how many were set (all ranks')."""
        if not self.tracking or self.osc_frozen.shape != w.shape:
            return 0
        grid = self.grid
        with torch.no_grad():
            local, scale, rows = self.local_part(w)
            frozen = self.osc_frozen[rows]
            kept = grid.dequantize(self.osc_last_int[rows], grid.step(scale)).to(local.dtype)
            local.copy_(torch.where(frozen, kept, local))
        return int(self.osc_frozen.sum())

    def dampening_loss(self, w: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """``dampening_loss`` of ``w`` (this quantizer's input, e.g. the layer's weight) at the
        kept scale, frozen elements left out."""
        if not self.initialized:
            raise RuntimeError(f"{self.name}: no scale yet; the dampening loss needs one "
                               "(run a training forward first)")
        # Copies: the next training forward updates the scale and the frozen set in place, and
        # this loss's backward must still see the ones it was computed with. Under FSDP2 the
        # loss is that of this rank's rows (the ranks' losses sum to the whole weight's), and
        # its gradient goes to the shard directly, not through FSDP's averaging.
        tracked = self.tracking and self.osc_frozen.shape == w.shape
        numel = w.numel()
        w, scale, rows = self.local_part(w)
        frozen = self.osc_frozen[rows].clone() if tracked else None
        loss = dampening_loss(w, scale.clone(), self.bits, signed=bool(self.signed),
                              dim=self.dim, group_size=self.group_size, narrow=self.narrow,
                              reduction=reduction, frozen=frozen)
        if reduction == "mean" and w.numel() != numel:  # this shard's part of the mean
            loss = loss * (w.numel() / numel)
        return loss
