"""The ``torch.ops.octav`` ops (SPEC §5), one module per op family, and their Python wrappers
(keyword arguments, docstrings, Python-type checks).

Each op's schema, fake kernel (so ops compile with ``torch.compile(fullgraph=True)``) and
autograd fallback are defined in its family's module; ``octav_kernels.backend`` registers the
kernels that serve it. The ops check their arguments themselves (SPEC §6: ``TypeError`` /
``ValueError`` naming the argument), whichever kernel serves them.
"""

from ._library import OPS, lib
from .fake_quant import fake_quantize
from .lsq import fake_quantize_lsq
from .octav import masked_sums, octav_fake_quantize, octav_scale
from .oscillation import OscillationState, dampening_loss, fake_quantize_tracked
from .refine import refine_scale

__all__ = ["OPS", "OscillationState", "dampening_loss", "fake_quantize", "fake_quantize_lsq",
           "fake_quantize_tracked",
           "lib", "masked_sums", "octav_fake_quantize", "octav_scale", "refine_scale"]
