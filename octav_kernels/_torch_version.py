"""The oldest torch this package runs on, checked once, before anything else is imported:
``torch.library.get_kernel`` (the per-GPU routing of ``octav_kernels.backend``) arrived in 2.9.
Tested on 2.13 (CPU) and 2.14 (CUDA); setup.py requires the same floor."""

import torch

MIN_TORCH = "2.9"

if torch.torch_version.TorchVersion(torch.__version__) < MIN_TORCH:
    raise ImportError(f"octav_kernels needs torch >= {MIN_TORCH}, found {torch.__version__}")
