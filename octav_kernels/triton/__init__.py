"""Triton backend: kernels for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``), one
module per op family, each function with ``octav_kernels.reference``'s signature."""

from .fake_quant import (
    dampening_backward,
    dampening_error,
    fake_quantize,
    fake_quantize_backward,
    fake_quantize_packed,
    fake_quantize_tracked,
    pwl_backward_packed,
)
from .lsq import fake_quantize_lsq, fake_quantize_lsq_backward
from .octav import masked_sums, octav_fake_quantize, octav_fake_quantize_packed, octav_scale
from .refine import candidate_sse, refine_scale

__all__ = ["candidate_sse", "dampening_backward", "dampening_error", "fake_quantize",
           "fake_quantize_backward", "fake_quantize_lsq", "fake_quantize_lsq_backward",
           "fake_quantize_packed", "fake_quantize_tracked",
           "masked_sums", "octav_fake_quantize", "octav_fake_quantize_packed", "octav_scale",
           "pwl_backward_packed", "refine_scale"]
