"""octav_kernels: fused OCTAV optimal-clipping quantization for PyTorch QAT.

Ops (also as ``torch.ops.octav.*``): ``octav_scale``, ``masked_sums``, ``fake_quantize``,
``octav_fake_quantize``. Baselines for calibration: ``max_scale``, ``percentile_scale``,
``mse_sweep_scale``. Backend control: ``use_backend`` / ``OCTAV_BACKEND``.
"""

from .backend import use_backend
from .calibrate import max_scale, mse_sweep_scale, percentile_scale, quantization_mse
from .ops import fake_quantize, masked_sums, octav_fake_quantize, octav_scale

__all__ = [
    "fake_quantize",
    "masked_sums",
    "max_scale",
    "mse_sweep_scale",
    "octav_fake_quantize",
    "octav_scale",
    "percentile_scale",
    "quantization_mse",
    "use_backend",
]
__version__ = "0.1.0"
