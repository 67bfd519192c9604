"""octav_kernels: fused OCTAV optimal-clipping quantization for PyTorch QAT.

Ops (also as ``torch.ops.octav.*``): ``octav_scale``, ``masked_sums``, ``fake_quantize``,
``octav_fake_quantize``, ``refine_scale`` (OCTAV polished against the empirical MSE; also
``refine=True`` on ``octav_scale`` / ``octav_fake_quantize``). Baselines for calibration:
``max_scale``, ``percentile_scale``, ``mse_sweep_scale``, and the ``Calibrator`` classes over
all of them. QAT: the modules in ``octav_kernels.nn`` (``Quantizer``, ``QuantAct``,
``QuantLinear``, ``QuantConv1d``, ``QuantConv2d``) and the model helpers ``quantize_model``,
``dequantize_model``, ``calibrate_model``, ``reestimate_batchnorm``. Weight oscillations
(``octav_kernels.oscillation``): ``OscillationControl``, ``Ramp``, ``fake_quantize_tracked``,
``OscillationState``, ``dampening_loss``. Data split across ranks:
``octav_kernels.distributed``. Backend control: ``use_backend`` / ``OCTAV_BACKEND``.
"""

from . import distributed
from .backend import use_backend
from .calibrate import (
    Calibrator,
    MaxCalibrator,
    MSESweepCalibrator,
    OctavCalibrator,
    PercentileCalibrator,
    make_calibrator,
    max_scale,
    mse_sweep_scale,
    percentile_scale,
    quantization_mse,
)
from .nn import QuantAct, QuantConv1d, QuantConv2d, Quantizer, QuantLinear
from .ops import fake_quantize, masked_sums, octav_fake_quantize, octav_scale, refine_scale
from .oscillation import (
    OscillationControl,
    OscillationState,
    Ramp,
    dampening_loss,
    fake_quantize_tracked,
)
from .qat import (
    calibrate_model,
    calibration,
    dequantize_model,
    quantize_model,
    quantizers,
    reestimate_batchnorm,
)

__all__ = [
    "Calibrator",
    "MSESweepCalibrator",
    "MaxCalibrator",
    "OscillationControl",
    "OscillationState",
    "OctavCalibrator",
    "PercentileCalibrator",
    "QuantAct",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "Quantizer",
    "Ramp",
    "calibrate_model",
    "calibration",
    "dampening_loss",
    "dequantize_model",
    "distributed",
    "fake_quantize",
    "fake_quantize_tracked",
    "make_calibrator",
    "masked_sums",
    "max_scale",
    "mse_sweep_scale",
    "octav_fake_quantize",
    "octav_scale",
    "percentile_scale",
    "quantization_mse",
    "quantize_model",
    "quantizers",
    "reestimate_batchnorm",
    "refine_scale",
    "use_backend",
]
__version__ = "0.1.0"
