"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for quantized models.

The order is: ``quantize_model``, set the learned scales (``calibrate_model`` or one training
forward; or load a checkpoint), ``shard_quantizers`` (where a mixed-precision policy is used),
then ``fully_shard`` on the blocks and the root. FSDP2 shards the Parameters (weights, learned
scales) along dim 0; buffers (dynamic and static scales, oscillation state, importance)
are replicated and computed identically on every rank from the unsharded weight, or over the
data-parallel group for activations (``process_group``).
"""

from __future__ import annotations

import torch
from torch import nn

from .quantizer import Quantizer


def shard_quantizers(model: nn.Module, **fully_shard_kwargs) -> nn.Module:
    """Wrap every quantizer of ``model`` that has Parameters (learned scales) in an FSDP2 unit
    of its own whose Parameters stay float32 (``MixedPrecisionPolicy(param_dtype=float32,
    reduce_dtype=float32, cast_forward_inputs=False)``), so that a mixed-precision policy
    given to the blocks sharded after it does not round the scales to bfloat16.
    ``fully_shard_kwargs`` (``mesh``, ``reshard_after_forward``, ...) go to each
    ``fully_shard`` call; ``mp_policy`` is this function's. Returns ``model``. Cost: one
    all-gather and one reduce-scatter of a scale per learned quantizer and step (a few bytes
    each, but one collective each).

    Call it after the learned scales are set (a learned scale set inside a sharded forward
    would be lost: ``Quantizer.set_scale`` raises) and before ``fully_shard`` on the blocks."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if "mp_policy" in fully_shard_kwargs:
        raise ValueError("shard_quantizers: mp_policy is set here (float32 scales); give it to "
                         "the fully_shard calls on the blocks instead")
    # (cast_forward_inputs=False: the quantizer's input keeps the block's dtype)
    float32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                   cast_forward_inputs=False)
    for m in model.modules():
        if isinstance(m, Quantizer) and any(True for _ in m.parameters(recurse=False)):
            if m.policy.learned and not m.initialized:
                raise ValueError(f"{m.name}: set the learned scale before sharding "
                                 "(calibrate_model, a training forward, or load_state_dict)")
            fully_shard(m, mp_policy=float32, **fully_shard_kwargs)
    return model


def save_checkpoint(model: nn.Module, checkpoint_id) -> None:
    """Save ``model`` (sharded by FSDP2 or not) with ``torch.distributed.checkpoint``: each
    rank writes its shards; every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    dcp.save(get_model_state_dict(model), checkpoint_id=checkpoint_id)


def load_checkpoint(model: nn.Module, checkpoint_id) -> None:
    """Load a ``save_checkpoint`` of any number of ranks into ``model`` (sharded by FSDP2 on
    this number of ranks, or not); every rank calls it. ``torch.distributed.checkpoint``
    loads into tensors of the saved shapes, and a quantizer's state takes its shape at its
    first forward (an empty scale, oscillation state or importance before): such entries are
    read into tensors of the saved shape and then loaded by ``load_state_dict`` as a
    checkpoint of today's format."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.tensor import DTensor

    state = get_model_state_dict(model)
    saved = FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    for key, value in state.items():
        meta = saved.get(key)
        size = getattr(meta, "size", None)
        if (isinstance(value, torch.Tensor) and not isinstance(value, DTensor)
                and size is not None and tuple(size) != tuple(value.shape)):
            state[key] = torch.empty(tuple(size), dtype=value.dtype, device=value.device)
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_model_state_dict(model, state)
