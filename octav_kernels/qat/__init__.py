"""Quantization-aware training on top of the ops, one concern per module (imports go one way,
down this list):

- ``grid``: ``Grid``, a quantizer's grid and the integer levels on it (shared with deploy);
- ``scale``: the scale policies ``DynamicScale``, ``StaticScale``, ``LearnedScale``;
- ``tracking``: per-weight oscillation tracking and freezing of a quantizer;
- ``quantizer``: ``Quantizer`` (fake-quantizes on its grid with the scale its policy keeps),
  ``QuantAct`` and ``QuantizerExport`` (what deploy reads of a quantizer);
- ``config``: ``QuantConfig``, the knobs of a quantized layer and their defaults, which builds
  its quantizers;
- ``layers``: ``QuantLayer``, the base of ``QuantLinear``, ``QuantConv1d``, ``QuantConv2d``;
- ``model``: ``quantize_model``, ``dequantize_model``, ``calibrate_model`` / ``calibration``,
  ``reestimate_batchnorm``, ``check_finite``;
- ``oscillation``: ``Ramp`` schedules and ``OscillationControl``;
- ``fsdp``: ``shard_quantizers`` (FSDP2 units that keep learned scales float32),
  ``save_checkpoint`` / ``load_checkpoint`` (``torch.distributed.checkpoint``, N to M ranks).

The two-line QAT change to a training script::

    model = octav_kernels.quantize_model(model, bits=4)   # after loading the float weights
    ...                                                    # train as usual
"""

from .config import QuantConfig, estimators
from .fsdp import load_checkpoint, save_checkpoint, shard_quantizers
from .grid import Grid
from .layers import QUANTIZED, QuantConv1d, QuantConv2d, QuantLayer, QuantLinear
from .model import (
    FLOAT_BY_DESIGN,
    calibrate_model,
    calibration,
    check_finite,
    dequantize_model,
    name_quantizers,
    quantize_model,
    quantizers,
    reestimate_batchnorm,
)
from .oscillation import OscillationControl, Ramp
from .quantizer import QuantAct, Quantizer, QuantizerExport
from .scale import DynamicScale, LearnedScale, ScalePolicy, StaticScale, make_policy

__all__ = ["FLOAT_BY_DESIGN", "QUANTIZED", "DynamicScale", "Grid", "LearnedScale",
           "OscillationControl", "QuantAct", "QuantConfig", "QuantConv1d", "QuantConv2d",
           "QuantLayer", "QuantLinear", "Quantizer", "QuantizerExport", "Ramp", "ScalePolicy",
           "StaticScale", "calibrate_model", "calibration", "check_finite", "dequantize_model",
           "estimators", "make_policy", "name_quantizers", "quantize_model", "quantizers",
           "load_checkpoint", "reestimate_batchnorm", "save_checkpoint", "shard_quantizers"]
