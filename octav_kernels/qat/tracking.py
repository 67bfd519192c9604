"""Per-weight oscillation tracking and freezing of a ``Quantizer`` (Nagel et al., ICML 2022):
the state buffers and what reads or writes them. ``Quantizer`` inherits it;
``octav_kernels.qat.oscillation.OscillationControl`` turns it on and drives its schedules."""

from __future__ import annotations

import torch
import torch.distributed as dist
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
    ``osc_frozen``, ``osc_freq`` and ``osc_int_ema`` (saved in ``state_dict``).

    Under FSDP2 (``shard_tracking``, which ``OscillationControl`` calls for a sharded weight)
    the buffers are ``DTensor`` shards of the weight's rows: each rank keeps and updates the
    state of its own rows, and a training forward all-gathers only the frozen mask and levels
    (2 bytes per weight, and only once some weight is frozen anywhere: one all-reduce of a
    flag per step before)."""

    momentum: float | None = None  # None: tracking off
    _shard: tuple | None = None  # (mesh, rows of this rank): the state keeps only those rows

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

    def shard_tracking(self, w: DTensor) -> None:
        """Keep the oscillation state of this rank's rows only: ``w`` is this quantizer's input
        as FSDP2 holds it (a ``DTensor`` sharded along dim 0, e.g. the layer's weight outside
        its forward). A state already started on the whole weight keeps its local rows."""
        _, rows = self._local_rows(w)
        self._shard = (w.device_mesh, rows)
        if self.osc_last_int.numel() > 0 and not isinstance(self.osc_last_int, DTensor):
            for name in OSC_BUFFERS:
                setattr(self, name, self._as_shard(getattr(self, name)[rows].contiguous(),
                                                   tuple(w.shape)))

    def _as_shard(self, local: torch.Tensor, shape: tuple[int, ...]) -> DTensor:
        """``local`` (this rank's rows) as the shard of a state of global ``shape``."""
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self._shard[0], [Shard(0)], run_check=False,
                                  shape=torch.Size(shape), stride=stride)

    def _local_state(self, name: str, rows: slice) -> torch.Tensor:
        """The state buffer ``name`` for ``rows`` (the local shard when sharded)."""
        t = getattr(self, name)
        return t.to_local() if isinstance(t, DTensor) else t[rows]

    def _full_state(self, name: str) -> torch.Tensor:
        """The state buffer ``name`` for the whole weight (gathered when sharded)."""
        t = getattr(self, name)
        return t.full_tensor() if isinstance(t, DTensor) else t

    def _rows_scale(self, scale: torch.Tensor, x: torch.Tensor, rows: slice,
                    local: torch.Tensor) -> torch.Tensor:
        """The part of ``scale`` (of ``x``) that quantizes ``x[rows]`` (``local``): rows of a
        per-channel (dim 0) or per-block scale, else all of it."""
        if self.dim == 0 or self.group_size is not None:
            shape = _args.groups(local, self.dim, self.group_size).scale_shape
            return scale.reshape(x.shape[0], -1)[rows].reshape(shape)
        return scale

    def _oscillation_state(self, x, scale) -> OscillationState:
        if self._shard is not None:
            return self._sharded_state(x, scale)
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

    def _sharded_state(self, x, scale) -> OscillationState:
        """The state of this rank's rows of ``x`` (started from them at the first forward)."""
        rows = self._shard[1]
        if self.osc_last_int.shape != x.shape:
            if self.osc_last_int.numel() > 0:
                raise ValueError(f"{self.name}: oscillation state of shape "
                                 f"{list(self.osc_last_int.shape)} does not match the input "
                                 f"{list(x.shape)}")
            local = x[rows]
            start = OscillationState.start(local, self._rows_scale(scale, x, rows, local),
                                           self.bits, signed=self.signed, dim=self.dim,
                                           group_size=self.group_size, narrow=self.narrow)
            for name, tensor in zip(OSC_BUFFERS, start.tensors()):
                setattr(self, name, self._as_shard(tensor, tuple(x.shape)))
        return OscillationState(*(self._local_state(name, rows) for name in OSC_BUFFERS))

    def _sharded_fake_quantize_tracked(self, x, scale, learned):
        """The tracked op on a weight whose state is sharded: this rank updates its rows'
        state (the op, its output unused); the frozen mask and levels of all rows are
        gathered; the op without update on the whole weight then gives the output and the
        gradients. The same arithmetic as one tracked op on the whole weight (elementwise;
        the output reads the state after the update)."""
        mesh, rows = self._shard
        state = self._sharded_state(x, scale)
        common = dict(signed=self.signed, dim=self.dim, group_size=self.group_size,
                      grad=self.grad, narrow=self.narrow, momentum=self.momentum,
                      freeze_threshold=self.osc_threshold)
        if self.training:
            local = x[rows].detach()
            with torch.no_grad():
                fake_quantize_tracked(local, self._rows_scale(scale, x, rows, local).detach(),
                                      self.bits, state, update=True, **common)
        group = mesh.get_group()
        anywhere = state.frozen.any().to(torch.int32).reshape(1)
        dist.all_reduce(anywhere, op=dist.ReduceOp.MAX, group=group)
        if bool(anywhere):
            per = -(-x.shape[0] // mesh.size())
            mine = torch.zeros((2, per, *x.shape[1:]), dtype=torch.int8, device=x.device)
            n = state.frozen.shape[0]
            mine[0, :n] = state.frozen.to(torch.int8)
            mine[1, :n] = state.last_int
            parts = [torch.empty_like(mine) for _ in range(mesh.size())]
            dist.all_gather(parts, mine, group=group)
            gathered = torch.cat(parts, dim=1)[:, :x.shape[0]]
            frozen, levels = gathered[0].bool().contiguous(), gathered[1].contiguous()
        else:
            frozen = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
            levels = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        # (last_dir, osc_freq, int_ema: not read without update)
        unused = OscillationState(levels, torch.empty_like(levels), frozen,
                                  torch.empty(x.shape, device=x.device),
                                  torch.empty(x.shape, device=x.device))
        return fake_quantize_tracked(x, scale, self.bits, unused, update=False, learned=learned,
                                     grad_scale=self.grad_scale, **common)

    def _fake_quantize_tracked(self, x, scale):
        learned = self.policy.learned and self.training
        if self._shard is not None:
            return self._sharded_fake_quantize_tracked(x, scale, learned)
        return fake_quantize_tracked(
            x, scale, self.bits, self._oscillation_state(x, scale), signed=self.signed,
            dim=self.dim, group_size=self.group_size, grad=self.grad, narrow=self.narrow,
            momentum=self.momentum, freeze_threshold=self.osc_threshold, update=self.training,
            learned=learned, grad_scale=self.grad_scale)

    def frozen_fraction(self) -> float:
        """Fraction of the tracked elements that are frozen (0 before tracking starts)."""
        if not self.tracking or self.osc_frozen.numel() == 0:
            return 0.0
        return float(self._full_state("osc_frozen").float().mean())

    def oscillating_fraction(self, threshold: float = 0.01) -> float:
        """Fraction of the tracked elements that are not frozen and whose oscillation frequency
        EMA exceeds ``threshold`` (a frozen element keeps the frequency it froze at)."""
        if not self.tracking or self.osc_freq.numel() == 0:
            return 0.0
        freq, frozen = self._full_state("osc_freq"), self._full_state("osc_frozen")
        return float(((freq > threshold) & ~frozen).float().mean())

    def local_part(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, slice]:
        """``(w's elements this rank holds, their scale, their rows)``: ``w`` itself, the
        kept scale and all rows; or for FSDP2's shard of ``w`` (a ``DTensor`` sharded on dim 0,
        outside the sharded forward) its local rows (``to_local``, differentiable) and the
        scale of those rows (per channel along dim 0 and per block: rows of the scale)."""
        scale = self.kept_scale()
        if not isinstance(w, DTensor):
            return w, scale, slice(None)
        local, rows = self._local_rows(w)
        return local, self._rows_scale(scale, w, rows, local), rows

    def _local_rows(self, w: DTensor) -> tuple[torch.Tensor, slice]:
        """This rank's rows of FSDP2's shard ``w`` and where they are in the whole."""
        if tuple(w.placements) != (Shard(0),):
            raise ValueError(f"{self.name}: a DTensor weight must be sharded along dim 0 on a "
                             f"1-D mesh (FSDP2), got placements {w.placements}")
        local = w.to_local()
        per = -(-w.shape[0] // w.device_mesh.size())  # torch.chunk's rows per rank
        lo = min(w.device_mesh.get_local_rank() * per, w.shape[0])
        return local, slice(lo, lo + local.shape[0])

    def write_frozen(self, w: torch.Tensor) -> int:
        """Set the frozen elements of ``w`` (this quantizer's input, e.g. the layer's weight
        viewed as it quantizes it; under FSDP2 the rows of this rank's shard) to their kept
        level on the current grid, in place; returns how many were set (all ranks')."""
        if not self.tracking or self.osc_frozen.shape != w.shape:
            return 0
        grid = self.grid
        with torch.no_grad():
            local, scale, rows = self.local_part(w)
            frozen = self._local_state("osc_frozen", rows)
            kept = grid.dequantize(self._local_state("osc_last_int", rows),
                                   grid.step(scale)).to(local.dtype)
            local.copy_(torch.where(frozen, kept, local))
        return int(self._full_state("osc_frozen").sum())

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
        frozen = self._local_state("osc_frozen", rows).clone() if tracked else None
        loss = dampening_loss(w, scale.clone(), self.bits, signed=bool(self.signed),
                              dim=self.dim, group_size=self.group_size, narrow=self.narrow,
                              reduction=reduction, frozen=frozen)
        if reduction == "mean" and w.numel() != numel:  # this shard's part of the mean
            loss = loss * (w.numel() / numel)
        return loss
