"""Triton backend: kernels for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``)."""

from .fake_quant import (
    dampening_backward,
    dampening_error,
    fake_quantize,
    fake_quantize_backward,
    fake_quantize_tracked,
)
from .octav import masked_sums, octav_scale
from .refine import candidate_sse, refine_scale

__all__ = ["candidate_sse", "dampening_backward", "dampening_error", "fake_quantize",
           "fake_quantize_backward", "fake_quantize_tracked", "masked_sums", "octav_scale",
           "refine_scale"]
