"""octav_kernels: fused OCTAV optimal-clipping quantization for PyTorch QAT.

Layers (imports go one way, down): ``ops`` (the ``torch.ops.octav`` ops: schemas, checks,
autograd, wrappers) -> ``backend`` (which kernels serve them: C++ / CUDA in
``octav_kernels._C``, ``octav_kernels.triton``, ``octav_kernels.reference``) ; ``calibrate``
(baseline scales), ``distributed``; ``qat`` (quantizers, layers, model conversion, oscillation
control) on top; ``deploy`` (integer weights, ONNX export) on top of that.

Ops (also as ``torch.ops.octav.*``): ``octav_scale``, ``masked_sums``, ``fake_quantize``,
``octav_fake_quantize``, ``refine_scale`` (OCTAV polished against the empirical MSE; also
``refine=True`` on ``octav_scale`` / ``octav_fake_quantize``), ``fake_quantize_lsq`` (a learned
scale: LSQ), and for weight oscillations
``fake_quantize_tracked``, ``OscillationState``, ``dampening_loss``. Baselines for calibration:
``max_scale``, ``percentile_scale``, ``mse_sweep_scale``, and the ``Calibrator`` classes over
all of them. QAT (``octav_kernels.qat``): ``Quantizer``, ``QuantAct``, ``QuantLinear``,
``QuantConv1d``, ``QuantConv2d``, ``QuantConfig``, the model helpers ``quantize_model``,
``dequantize_model``, ``calibrate_model``, ``reestimate_batchnorm``, ``check_finite``, and
``OscillationControl`` / ``Ramp``; the scale policies ``octav_kernels.qat.DynamicScale``,
``StaticScale``, ``LearnedScale``, and ``Grid`` / ``Quantizer.export`` (what deploy reads).
Deployment (``octav_kernels.deploy``): ``convert_model`` (integer weights: ``QuantizedLinear``,
``QuantizedConv1d``, ``QuantizedConv2d``, ``QuantizedAct``), ``export_onnx`` (ONNX for ONNX
Runtime's integer kernels, or QDQ) and ``to_torchao`` (torchao weight tensors).
Data split across ranks:
``octav_kernels.distributed``.
Backend control (tests, debugging): ``use_backend`` / ``OCTAV_BACKEND``.
"""

from . import _torch_version, distributed, nn, oscillation  # noqa: F401 (torch checked first)
from .backend import use_backend  # registers the kernels with the dispatcher
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
from .deploy import (
    OrtFallbackWarning,
    QuantizedAct,
    QuantizedConv1d,
    QuantizedConv2d,
    QuantizedLinear,
    convert_model,
    export_onnx,
    to_torchao,
)
from .ops import (
    OscillationState,
    dampening_loss,
    fake_quantize,
    fake_quantize_lsq,
    fake_quantize_tracked,
    masked_sums,
    octav_fake_quantize,
    octav_scale,
    refine_scale,
)
from .qat import (
    OscillationControl,
    QuantAct,
    QuantConfig,
    QuantConv1d,
    QuantConv2d,
    Quantizer,
    QuantLinear,
    Ramp,
    calibrate_model,
    calibration,
    check_finite,
    dequantize_model,
    load_checkpoint,
    quantize_model,
    quantizers,
    reestimate_batchnorm,
    save_checkpoint,
    shard_quantizers,
)

__all__ = [
    "Calibrator",
    "MSESweepCalibrator",
    "MaxCalibrator",
    "OscillationControl",
    "OrtFallbackWarning",
    "OscillationState",
    "OctavCalibrator",
    "PercentileCalibrator",
    "QuantAct",
    "QuantConfig",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "Quantizer",
    "QuantizedAct",
    "QuantizedConv1d",
    "QuantizedConv2d",
    "QuantizedLinear",
    "Ramp",
    "calibrate_model",
    "calibration",
    "check_finite",
    "convert_model",
    "dampening_loss",
    "dequantize_model",
    "distributed",
    "export_onnx",
    "fake_quantize",
    "fake_quantize_lsq",
    "fake_quantize_tracked",
    "load_checkpoint",
    "make_calibrator",
    "masked_sums",
    "max_scale",
    "mse_sweep_scale",
    "nn",
    "octav_fake_quantize",
    "octav_scale",
    "oscillation",
    "percentile_scale",
    "quantization_mse",
    "quantize_model",
    "quantizers",
    "reestimate_batchnorm",
    "refine_scale",
    "save_checkpoint",
    "shard_quantizers",
    "to_torchao",
    "use_backend",
]
__version__ = "0.1.0"
