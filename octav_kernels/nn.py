"""The QAT modules under their first import path (``octav_kernels.nn``); they live in
``octav_kernels.qat`` (``quantizer``, ``layers``)."""

from .qat.config import estimators
from .qat.layers import QUANTIZED, QuantConv1d, QuantConv2d, QuantLinear
from .qat.quantizer import QuantAct, Quantizer
from .qat.scale import MODES

__all__ = ["MODES", "QUANTIZED", "QuantAct", "QuantConv1d", "QuantConv2d", "QuantLinear",
           "Quantizer", "estimators"]
