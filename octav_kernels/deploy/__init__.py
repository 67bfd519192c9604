"""From a QAT (or calibrated) model to a deployable one, on top of ``octav_kernels.qat``:

- ``quantized``: ``convert_model`` and the converted layers (``QuantizedLinear``,
  ``QuantizedConv1d``, ``QuantizedConv2d``, ``QuantizedAct``), which hold integer weights;
- ``onnx``: ``export_onnx``, a QDQ ONNX graph of a converted model (checked by
  ``onnx.checker``; ONNX Runtime runs it).

QAT -> ``convert_model`` -> ``export_onnx`` (or ``torch.export.export`` of the converted model).
"""

from .onnx import export_onnx
from .quantized import (
    QuantizedAct,
    QuantizedConv1d,
    QuantizedConv2d,
    QuantizedLinear,
    convert_model,
)

__all__ = ["QuantizedAct", "QuantizedConv1d", "QuantizedConv2d", "QuantizedLinear",
           "convert_model", "export_onnx"]
