"""Model-level QAT helpers: convert a model's layers to quantized ones and back, calibrate
static scales (PTQ), re-estimate BatchNorm statistics after QAT, and check its quantizers for
NaN/inf scales."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from .config import QuantConfig
from .layers import QUANTIZED, QuantLayer
from .quantizer import Quantizer

# Layers kept in float by design (their parameters are not matmul operands): not "unsupported".
FLOAT_BY_DESIGN = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                   nn.modules.instancenorm._InstanceNorm)


def quantize_model(model: nn.Module, bits: int | None = None, *,
                   config: QuantConfig | None = None, first_last_bits: int | None = 8,
                   skip: Iterable[str | type] = (), inplace: bool = False, strict: bool = False,
                   **fields) -> nn.Module:
    """Replace every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` of ``model`` by its quantized
    version (``QuantLinear`` / ``QuantConv1d`` / ``QuantConv2d``), keeping its Parameters
    (shared, so an existing optimizer keeps working), device and dtype.

    Args:
        bits: weight and activation bits of every converted layer (``QuantConfig.bits``, 4 by
            default).
        config: a ``QuantConfig`` for every layer; its fields may also be given as keywords
            (``act_bits``, ``grad``, ``weight_granularity``, ``act_signed``, ``mode``,
            ``weight_mode``, ``calibrator``, ``weight_calibrator``, ``act_calibrator``,
            ``every``, ``narrow``, ``quantize_input``, ``process_group``, ``grad_scale``),
            which replace the config's. ``process_group``, for
            data-parallel (DDP) training, is the group (or ``"world"``) over which the
            activation scales are computed, so every rank quantizes with the same scale from
            the whole global batch (weights, replicated by DDP, need no collective).
        first_last_bits: bits of the first and the last convertible layer in registration
            order (the paper keeps them at 8), for both weights and activations; ``None`` uses
            the config's everywhere.
        skip: module names (a name also skips everything under it) or module types to leave
            in float.
        inplace: convert ``model`` itself instead of a deep copy.
        strict: raise ``ValueError`` instead of warning when a module with parameters has no
            quantized version (e.g. ``nn.Embedding``, ``nn.LSTM``, ``nn.MultiheadAttention``,
            ``nn.Conv3d``, subclasses of the supported layers). Normalization layers stay in
            float by design and are not reported.

    Returns the converted model. Each quantizer's ``name`` is its path in the model, and the
    errors it raises use it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    sharded = [name or "model" for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    if sharded:  # (fully_shard changed their classes: no layer would be recognized)
        raise ValueError(f"quantize_model: {', '.join(sharded[:3])} already sharded by FSDP2 "
                         "(fully_shard); quantize the model first, then shard it")
    skip = tuple(skip)
    for item in skip:
        if not isinstance(item, (str, type)):
            raise TypeError(f"skip entries must be module names or types, got {item!r}")
    if not inplace:
        model = copy.deepcopy(model)
    if type(model) in QUANTIZED:
        raise ValueError("model is itself a single layer; wrap it in a container "
                         "(e.g. nn.Sequential) to convert it")
    if bits is not None:
        fields["bits"] = bits
    config = QuantConfig.of(config, **fields)
    end_config = (config if first_last_bits is None  # (checked before anything is converted)
                  else QuantConfig.of(config, bits=first_last_bits, act_bits=None))

    convertible, unsupported = [], []
    skipped_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in skipped_prefixes):
            continue
        if _skipped(name, module, skip):
            skipped_prefixes.append(name)
            continue
        if type(module) in QUANTIZED:
            convertible.append(name)
        elif isinstance(module, QuantLayer):
            raise ValueError(f"model is already quantized ({name or 'model'} is "
                             f"{type(module).__name__}); call dequantize_model first")
        elif isinstance(module, Quantizer):  # a standalone quantizer (QuantAct) stays as it is
            skipped_prefixes.append(name)
        elif (not isinstance(module, FLOAT_BY_DESIGN)
              and any(True for _ in module.parameters(recurse=False))):
            unsupported.append(f"{name} ({type(module).__name__})")
            skipped_prefixes.append(name)  # its children are driven by it, not by forward()
    if unsupported:
        message = ("quantize_model: no quantized version, left in float: "
                   + ", ".join(unsupported))
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)

    ends = {convertible[0], convertible[-1]} if convertible and first_last_bits else set()
    for name in convertible:
        parent, attr = parent_of(model, name)
        float_layer = getattr(parent, attr)
        layer_config = end_config if name in ends else config
        try:
            quant = QUANTIZED[type(float_layer)].from_float(float_layer, layer_config)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        setattr(parent, attr, quant)
    name_quantizers(model)
    return model


def dequantize_model(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every quantized layer by the plain float layer and drop standalone quantizers
    (replaced by ``nn.Identity``): each module with a ``to_float()`` method (the QAT layers,
    which keep their Parameters; the converted layers of ``convert_model``, whose weight
    becomes the dequantized one) is replaced by what it returns."""
    if not inplace:
        model = copy.deepcopy(model)
    return replace_modules(model, lambda _, module: module.to_float() if callable(
        getattr(module, "to_float", None)) else None)


def quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    """``(path, quantizer)`` for every ``Quantizer`` in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Quantizer)]


def name_quantizers(model: nn.Module) -> None:
    """Set each quantizer's ``name`` (used in its error messages) to its path in ``model``."""
    for name, q in quantizers(model):
        q.name = name or q.name


@contextmanager
def calibration(model: nn.Module):
    """Inside: the model runs in eval mode and every quantizer observes its input (passing it
    through unquantized). On exit: each quantizer's scale is set from what it saw (mean of
    the per-batch scales by default) and the model's train/eval flags are restored."""
    name_quantizers(model)
    found = quantizers(model)
    if not found:
        raise ValueError("model has no Quantizer modules; call quantize_model first")
    flags = {m: m.training for m in model.modules()}
    model.eval()
    for _, q in found:
        q.start_calibration()
    try:
        yield model
    except BaseException:
        for _, q in found:
            q.stop_calibration()
        raise
    else:
        unseen = [name for name, q in found if not q.finish_calibration()]
        if unseen:
            raise RuntimeError("calibration: these quantizers saw no data (are they on the "
                               "model's forward path?): " + ", ".join(unseen))
    finally:
        for m, flag in flags.items():
            m.training = flag


def calibrate_model(model: nn.Module, batches: Iterable, *, num_batches: int | None = None,
                    forward: Callable[[nn.Module, object], object] | None = None) -> nn.Module:
    """Static calibration (PTQ, or the start of static-scale QAT): run ``num_batches`` of
    ``batches`` (all by default) through the model without gradients and set every
    quantizer's scale from them (``Quantizer.reduce``: the mean of the per-batch scales, the
    paper's static OCTAV). A batch that is a tuple or list feeds its first element to
    ``model``; pass ``forward(model, batch)`` for anything else. Returns ``model``."""
    run = forward or _default_forward
    with calibration(model), torch.no_grad():
        if _run_batches(model, batches, num_batches, run) == 0:
            raise ValueError("batches is empty")
    return model


def reestimate_batchnorm(model: nn.Module, batches: Iterable, *, num_batches: int | None = None,
                         forward: Callable[[nn.Module, object], object] | None = None) -> int:
    """Recompute every BatchNorm's running mean/variance with the model as it is now (quantized
    weights, frozen scales): the model runs in eval mode except its BatchNorm layers, which
    reset their statistics and average them over ``num_batches`` of ``batches`` (cumulative
    average, ``momentum=None``). Restores modes and momenta; returns the number of BatchNorm
    layers updated."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    flags = {m: m.training for m in model.modules()}
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        with torch.no_grad():
            if _run_batches(model, batches, num_batches, forward or _default_forward) == 0:
                raise ValueError("batches is empty")
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        for m, flag in flags.items():
            m.training = flag
    return len(bns)


def check_finite(model: nn.Module) -> None:
    """Raise now, naming the quantizer, if a scale computed on a GPU since the last check was
    NaN or inf (``Quantizer.check_nonfinite``; one host sync per quantizer). Quantizers check
    by themselves every ``Quantizer.check_every`` scale updates and in eval; call this where a
    training loop syncs anyway (logging, checkpointing) to hear of it sooner."""
    for _, q in quantizers(model):
        q.check_nonfinite()


def _run_batches(model, batches, num_batches, forward) -> int:
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    seen = 0
    for batch in batches:
        if num_batches is not None and seen >= num_batches:
            break
        forward(model, batch)
        seen += 1
    return seen


def _default_forward(model, batch):
    return model(batch[0] if isinstance(batch, (tuple, list)) else batch)


def _skipped(name: str, module: nn.Module, skip) -> bool:
    return any((isinstance(item, str) and item == name)
               or (isinstance(item, type) and isinstance(module, item)) for item in skip)


def replace_modules(model: nn.Module,
                    replacement: Callable[[str, nn.Module], nn.Module | None],
                    what: str = "replace_modules") -> nn.Module:
    """Replace, outermost first, each submodule of ``model`` (not the model itself) for which
    ``replacement(path, module)`` returns a module; the submodules of a replaced module are not
    visited. The ``ValueError`` messages that ``replacement`` raises are collected (that
    module's submodules are skipped too) and raised together after the walk as
    ``ValueError("<what>: cannot convert <message>; <message>")``. Returns ``model``."""
    problems, replaced = [], []
    for name, module in list(model.named_modules()):
        if not name or any(name.startswith(p + ".") for p in replaced):
            continue
        try:
            new = replacement(name, module)
        except ValueError as err:
            problems.append(str(err))
            replaced.append(name)
            continue
        if new is not None:
            parent, attr = parent_of(model, name)
            setattr(parent, attr, new)
            replaced.append(name)
    if problems:
        raise ValueError(f"{what}: cannot convert " + "; ".join(problems))
    return model


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(parent module, attribute name)`` of the submodule ``name`` of ``model``."""
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr
