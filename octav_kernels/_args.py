"""Argument checks and the group layout shared by every op and backend (SPEC §4, §6)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GRADS = ("ste", "pwl", "mad")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class Groups:
    """How a tensor splits into OCTAV groups.

    With ``x`` contiguous and viewed as ``[outer, n_groups, inner]``, group ``c`` is
    ``x[:, c, :]``: per tensor is ``(1, 1, numel)``, per channel ``dim=d`` is
    ``(prod(shape[:d]), shape[d], prod(shape[d+1:]))``, per block of ``G`` along the last dim
    is ``(1, numel // G, G)``. ``scale_shape`` is the shape of the scale tensor (SPEC §4).
    """

    outer: int
    n_groups: int
    inner: int
    scale_shape: tuple[int, ...]
    dim: int | None
    group_size: int | None


def check_x(x: object, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16 (float64 on CPU), got {x.dtype}"
        )
    if x.dtype == torch.float64 and x.device.type != "cpu":
        raise TypeError(f"{name}: float64 is supported on CPU only, got {x.device}")
    return x


def check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_bits(bits: object) -> int:
    check_int(bits, "bits")
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in 2..16, got {bits}")
    return bits


def check_grad(grad: object) -> str:
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
    return grad


def check_narrow(narrow: bool, signed: bool) -> None:
    if narrow and not signed:
        raise ValueError("narrow=True applies to signed grids only; got signed=False")


# The largest max_iters any backend accepts (the recursion converges in tens of steps).
MAX_ITERS = 1 << 16
# The OCTAV iteration's defaults (SPEC §2), written once for every schema, calibrator and
# wrapper; csrc/args.h holds the C++ side's (kDefaultMaxIters, kDefaultRtol).
DEFAULT_MAX_ITERS = 32
DEFAULT_RTOL = 1e-6


def check_iteration_types(max_iters: object, rtol: object) -> None:
    check_int(max_iters, "max_iters")
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)):
        raise TypeError(f"rtol must be a float, got {type(rtol).__name__}")


def check_iteration(max_iters: object, rtol: object) -> None:
    check_iteration_types(max_iters, rtol)
    if max_iters < 0:
        raise ValueError(f"max_iters must be >= 0, got {max_iters}")
    if max_iters > MAX_ITERS:
        raise ValueError(f"max_iters must be <= {MAX_ITERS}, got {max_iters}")
    if not 0.0 <= rtol < float("inf"):
        raise ValueError(f"rtol must be finite and >= 0, got {rtol}")


def check_types(x, bits=None, dim=None, group_size=None, flags=(), tensors=()) -> None:
    """Python-type checks of a public wrapper's arguments, which the dispatcher would otherwise
    report as a bare RuntimeError."""
    check_x(x)
    if bits is not None:
        check_int(bits, "bits")
    for name, value in (("dim", dim), ("group_size", group_size)):
        if value is not None:
            check_int(value, name)
    for name, value in flags:
        check_bool(value, name)
    for name, value in tensors:
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_common(x, bits, signed, dim, group_size, narrow=False) -> Groups:
    """x, bits (None: the op takes none), the grid and the granularity: the checks every op
    starts with; returns the group layout."""
    check_x(x)
    if bits is not None:
        check_bits(bits)
    check_narrow(narrow, signed)
    return groups(x, dim, group_size)


def check_with_scale(x, scale, bits, signed, dim, group_size, narrow):
    g = check_common(x, bits, signed, dim, group_size, narrow)
    return g, check_scale(scale, x, g)


def check_octav(x, bits, signed, dim, group_size, init, narrow):
    g = check_common(x, bits, signed, dim, group_size, narrow)
    if init is not None:
        init = check_scale(init, x, g, "init")
    return g, init


def groups(x: torch.Tensor, dim: int | None, group_size: int | None) -> Groups:
    """Validate ``dim`` / ``group_size`` against ``x`` and return the group layout."""
    shape = tuple(x.shape)
    numel = x.numel()
    if dim is not None and group_size is not None:
        raise ValueError("give at most one of dim (per channel) and group_size (per block)")
    if dim is not None:
        check_int(dim, "dim")
        if x.dim() == 0 or not -x.dim() <= dim < x.dim():
            raise ValueError(f"dim={dim} is out of range for a tensor of shape {list(shape)}")
        d = dim % x.dim()
        inner = 1
        for size in shape[d + 1 :]:
            inner *= size
        outer = 1
        for size in shape[:d]:
            outer *= size
        return Groups(outer, shape[d], inner, (shape[d],), d, None)
    if group_size is not None:
        check_int(group_size, "group_size")
        if group_size <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        if x.dim() == 0 or shape[-1] % group_size != 0:
            raise ValueError(
                f"group_size={group_size} must divide the last dim of a tensor of shape "
                f"{list(shape)}"
            )
        n_groups = numel // group_size
        return Groups(1, n_groups, group_size, shape[:-1] + (shape[-1] // group_size,), None,
                      group_size)
    return Groups(1, 1, numel, (), None, None)


# The compiled kernels reduce a group along its contiguous runs; runs shorter than this (per
# channel along a trailing dim has runs of 1) make them crawl, so such tensors are reduced from
# one transposed copy whose rows are the groups.
_MIN_RUN = 16


def transposed_for_kernels(g: Groups) -> bool:
    """Whether ``kernel_layout`` hands the kernels a transposed copy."""
    return g.dim is not None and g.inner < _MIN_RUN and g.n_groups > 1


def kernel_layout(x: torch.Tensor, g: Groups) -> tuple[torch.Tensor, int, int, int]:
    """``(x, outer, n_groups, inner)``: ``x`` contiguous in the compiled kernels'
    ``[outer, n_groups, inner]`` layout, for the reductions (masked sums, OCTAV)."""
    if transposed_for_kernels(g):
        return x.movedim(g.dim, 0).contiguous(), 1, g.n_groups, g.outer * g.inner
    return x.contiguous(), g.outer, g.n_groups, g.inner


def kernel_importance(importance: torch.Tensor | None, x: torch.Tensor, g: Groups,
                      fallback: bool = True) -> torch.Tensor | None:
    """The importance as the kernels read it (SPEC §2.1; csrc/args.h ``importance_layout``): a
    contiguous float32 ``[P, len]`` table, group c weighted by row ``c % P``, each row in the
    order of ``as_rows``. P = 1 when every group has the same weights (a ``[in]`` importance of
    a ``[out, in]`` weight per channel), ``in / G`` for blocks of G along a broadcast last dim,
    else n_groups. With ``fallback``, a group whose importance sums to 0 is weighted 1
    everywhere. None stays None (no importance)."""
    if importance is None:
        return None
    full = importance.expand(x.shape)
    lead = x.dim() - importance.dim()

    def broadcast_along(d):
        return d < lead or importance.shape[d - lead] == 1

    length = x.numel() // g.n_groups if g.n_groups else 0
    if g.dim is not None:
        rows = (full.select(g.dim, 0).reshape(1, length) if broadcast_along(g.dim)
                else full.movedim(g.dim, 0).reshape(g.n_groups, length))
    elif g.group_size is not None:
        if all(broadcast_along(d) for d in range(x.dim() - 1)):
            rows = full.reshape(-1, x.shape[-1])[0].reshape(-1, g.group_size)
        else:
            rows = full.reshape(g.n_groups, g.group_size)
    else:
        rows = full.reshape(1, x.numel())
    rows = rows.contiguous()
    if not fallback:
        return rows
    uninformed = rows.sum(1) == 0  # no cancellation: h >= 0
    if not bool(uninformed.any()):
        return rows
    return torch.where(uninformed.unsqueeze(1), torch.ones((), device=rows.device), rows)


def flat_scale(scale: torch.Tensor | None) -> torch.Tensor:
    """A scale (or init) as the kernels take it: contiguous float32 ``[n_groups]``; no init
    (None) is an empty tensor."""
    if scale is None:
        return torch.empty(0)
    return scale.reshape(-1).float().contiguous()


def flat_mask(mask: torch.Tensor | None) -> torch.Tensor:
    """An optional bool mask as the kernels take it: contiguous; None is an empty tensor."""
    if mask is None:
        return torch.empty(0, dtype=torch.bool)
    return mask.contiguous()


def check_scale(scale: object, x: torch.Tensor, g: Groups, name: str = "scale") -> torch.Tensor:
    """``scale`` must be a floating tensor of ``g.scale_shape`` on ``x``'s device; returns it as
    a contiguous float32 tensor (a copy only where needed)."""
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scale).__name__}")
    if not scale.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {scale.dtype}")
    if tuple(scale.shape) != g.scale_shape:
        raise ValueError(
            f"{name} must have shape {list(g.scale_shape)} for this granularity, "
            f"got {list(scale.shape)}"
        )
    if scale.device != x.device:
        raise ValueError(f"{name} is on {scale.device} but x is on {x.device}")
    return scale.to(torch.float32).contiguous()


def check_importance(importance: object, x: torch.Tensor, values: bool = True
                     ) -> torch.Tensor | None:
    """The optional importance ``h`` of the weighted ops (SPEC §2.1): a float32 tensor on x's
    device that broadcasts to x's shape, finite and >= 0. Returned as given (not expanded).
    Checking its ``values`` synchronizes with the device once (fake kernels skip it)."""
    if importance is None:
        return None
    if not isinstance(importance, torch.Tensor):
        raise TypeError(f"importance must be a torch.Tensor, got {type(importance).__name__}")
    if importance.dtype != torch.float32:
        raise TypeError(f"importance must be torch.float32, got {importance.dtype}")
    if importance.device != x.device:
        raise ValueError(f"importance is on {importance.device} but x is on {x.device}")
    try:
        shape = torch.broadcast_shapes(importance.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(f"importance of shape {list(importance.shape)} does not broadcast to "
                         f"x's shape {list(x.shape)}")
    if values and importance.numel() > 0 and not bool(
            (torch.isfinite(importance) & (importance >= 0)).all()):
        raise ValueError("importance must be finite and >= 0 (it weights each element's "
                         "squared error); it has a negative, NaN or inf entry")
    return importance


def levels(bits: int, signed: bool, narrow: bool) -> tuple[int, int, int]:
    """``(L, lo, hi)``: the grid is ``step * [lo..hi]`` with ``step = s / L`` (SPEC §1).

    signed: L = 2**(B-1), levels -2**(B-1)..2**(B-1)-1; narrow: L = 2**(B-1)-1, levels -L..L;
    unsigned: L = 2**B, levels 0..2**B-1. The OCTAV constant is ``1 / (12 * L**2)``.
    """
    if not signed:
        return 2**bits, 0, 2**bits - 1
    half = 2 ** (bits - 1)
    if narrow:
        return half - 1, -(half - 1), half - 1
    return half, -half, half - 1


def octav_constant(bits: int, signed: bool, narrow: bool) -> float:
    """``step**2 / (12 * s**2)``: 4**-B/3 signed, 4**-B/12 unsigned,
    1/(12 (2**(B-1)-1)**2) narrow."""
    L = levels(bits, signed, narrow)[0]
    return 1.0 / (12.0 * L * L)


def as_rows(x: torch.Tensor, dim: int | None, group_size: int | None) -> torch.Tensor:
    """``x`` as a ``[n_groups, group_len]`` matrix, one group per row (a view where it can)."""
    if dim is not None:
        return x.movedim(dim, 0).reshape(x.shape[dim], -1)
    if group_size is not None:
        return x.reshape(-1, group_size)
    return x.reshape(1, -1)


def positive_max(rows: torch.Tensor, signed: bool) -> torch.Tensor:
    """The largest positive magnitude of each row, float32 ``[n_rows]``: |x| signed, x unsigned
    with -inf counting as +inf (so every non-finite entry reaches the result, SPEC §6); 0 where
    no entry is positive or the row is empty; NaN propagates."""
    a = rows.float()
    a = a.abs() if signed else torch.where(torch.isinf(a), torch.inf, a)
    if a.shape[1] == 0:
        return torch.zeros(a.shape[0], dtype=torch.float32, device=a.device)
    return a.clamp_min(0).amax(1)  # clamp_min and amax propagate NaN


# The refinement search (SPEC §8): exact formulas every backend shares, like ``levels``.
REFINE_COARSE = 6  # candidates of the coarse pass
REFINE_ROUNDS = (4, 4, 2)  # candidates of each narrowing pass
REFINE_SPREAD = 1.25  # the coarse grid reaches at least this factor below and above the start


def cube_root(y):
    """``y ** (1/3)`` for float64 ``y >= 1`` (a Python float or a tensor) from square roots,
    products and quotients only, so every backend forms it bit for bit (``pow`` differs between
    implementations in the last bit): the start ``y ** (21/64)`` from repeated square roots,
    then 6 Newton steps. Within an ulp of the cube root for y up to ~1e40; beyond (a start far
    below max|x|) an approximation, still the same on every backend. (csrc/cpu/refine.cpp and
    csrc/cuda/refine.cu write the same steps in C++.)"""
    sqrt = torch.sqrt if isinstance(y, torch.Tensor) else math.sqrt
    r4 = sqrt(sqrt(y))
    r16 = sqrt(sqrt(r4))
    t = r4 * r16 * sqrt(sqrt(r16))
    for _ in range(6):
        t = (t + t + y / (t * t)) * (1.0 / 3.0)
    return t


def lsq_coefficient(group_len: int, bits: int, signed: bool, narrow: bool,
                    grad_scale: bool) -> float:
    """The factor of a learned scale's summed gradient: ``c = 1 / L`` (``step = c s``) times
    LSQ's gradient scale ``1 / sqrt(N hi)`` (N = elements per group) when ``grad_scale``."""
    L, _, hi = levels(bits, signed, narrow)
    factor = 1.0 / math.sqrt(group_len * hi) if grad_scale else 1.0
    return factor / L


def check_state(tensor: object, x: torch.Tensor, dtype: torch.dtype, name: str,
                contiguous: bool = False) -> torch.Tensor:
    """A per-element state tensor (oscillation tracking): x's shape and device, ``dtype``, and
    contiguous where a kernel updates it in place."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {tensor.dtype}")
    if tensor.shape != x.shape or tensor.device != x.device:
        raise ValueError(f"{name} ({list(tensor.shape)} on {tensor.device}) must have x's shape "
                         f"and device ({list(x.shape)} on {x.device})")
    if contiguous and not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is updated in place)")
    return tensor


def check_disjoint(tensors: dict[str, torch.Tensor]) -> None:
    """Contiguous tensors a kernel updates in place must not share memory (the kernels assume
    they do not alias)."""
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), name)
             for name, t in tensors.items() if t.numel() > 0]
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{a} and {b} share memory; each state tensor needs its own")


def tracked_bits_fit(bits: int, signed: bool) -> bool:
    """Whether the grid's integer levels fit the int8 state of oscillation tracking: signed
    bits <= 8, unsigned <= 7."""
    return bits <= (8 if signed else 7)


def check_tracked_bits(bits: int, signed: bool) -> None:
    if not tracked_bits_fit(bits, signed):
        raise ValueError(f"oscillation tracking keeps integer levels in int8: bits must be <= "
                         f"{8 if signed else 7} for a {'signed' if signed else 'unsigned'} grid, "
                         f"got {bits}")


def check_momentum(momentum: object) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float, got {type(momentum).__name__}")
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"momentum must be in (0, 1], got {momentum}")
    return float(momentum)


def check_scalar_tensor(value: object, x: torch.Tensor, name: str) -> torch.Tensor:
    """A 0-dim float32 tensor on x's device (a per-step setting read by a kernel)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != torch.float32 or value.dim() != 0 or value.device != x.device:
        raise ValueError(f"{name} must be a 0-dim float32 tensor on {x.device}, got "
                         f"{value.dtype} of shape {list(value.shape)} on {value.device}")
    return value


def check_threshold(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    return float(value)
