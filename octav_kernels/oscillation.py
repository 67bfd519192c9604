"""Weight oscillations (Nagel et al., ICML 2022) under their first import path
(``octav_kernels.oscillation``): the ops are in ``octav_kernels.ops.oscillation``, the schedules
and ``OscillationControl`` in ``octav_kernels.qat.oscillation``."""

from .ops.oscillation import REDUCTIONS, OscillationState, dampening_loss, fake_quantize_tracked
from .qat.oscillation import OscillationControl, Ramp

__all__ = ["REDUCTIONS", "OscillationControl", "OscillationState", "Ramp", "dampening_loss",
           "fake_quantize_tracked"]
