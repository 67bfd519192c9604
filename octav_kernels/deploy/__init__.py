"""From a QAT (or calibrated) model to a deployable one, on top of ``octav_kernels.qat``:

- ``quantized``: ``convert_model`` and the converted layers (``QuantizedLinear``,
  ``QuantizedConv1d``, ``QuantizedConv2d``, ``QuantizedAct``), which hold integer weights;
- ``onnx``: ``export_onnx``, an ONNX graph of a converted model (checked by ``onnx.checker``)
  that ONNX Runtime runs with integer kernels (``ort``: which layer gets which kernel, and the
  kernels' nodes), or a plain QDQ graph (``target="qdq"``);
- ``torchao``: ``to_torchao``, the converted weights as torchao ``IntxUnpackedToInt8Tensor``.

QAT -> ``convert_model`` -> ``export_onnx`` / ``to_torchao`` (or ``torch.export.export`` of the
converted model).
"""

from .onnx import OrtFallbackWarning, export_onnx
from .quantized import (
    QuantizedAct,
    QuantizedConv1d,
    QuantizedConv2d,
    QuantizedLinear,
    convert_model,
)
from .torchao import to_torchao

__all__ = ["OrtFallbackWarning", "QuantizedAct", "QuantizedConv1d", "QuantizedConv2d",
           "QuantizedLinear", "convert_model", "export_onnx", "to_torchao"]
