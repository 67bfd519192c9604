"""Quantization-aware training on top of the ops, one concern per module (imports go one way,
down this list):

- ``tracking``: per-weight oscillation tracking and freezing of a quantizer;
- ``quantizer``: ``Quantizer`` (keeps a clipping scale and fake-quantizes with it) and
  ``QuantAct``;
- ``config``: ``QuantConfig``, the knobs of a quantized layer and their defaults, which builds
  its quantizers;
- ``layers``: ``QuantLinear``, ``QuantConv1d``, ``QuantConv2d``;
- ``model``: ``quantize_model``, ``dequantize_model``, ``calibrate_model`` / ``calibration``,
  ``reestimate_batchnorm``, ``check_finite``;
- ``oscillation``: ``Ramp`` schedules and ``OscillationControl``.

The two-line QAT change to a training script::

    model = octav_kernels.quantize_model(model, bits=4)   # after loading the float weights
    ...                                                    # train as usual
"""

from .config import QuantConfig, estimators
from .layers import QUANTIZED, QuantConv1d, QuantConv2d, QuantLinear
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
from .quantizer import QuantAct, Quantizer

__all__ = ["FLOAT_BY_DESIGN", "QUANTIZED", "OscillationControl", "QuantAct", "QuantConfig",
           "QuantConv1d", "QuantConv2d", "QuantLinear", "Quantizer", "Ramp", "calibrate_model",
           "calibration", "check_finite", "dequantize_model", "estimators", "name_quantizers",
           "quantize_model", "quantizers", "reestimate_batchnorm"]
