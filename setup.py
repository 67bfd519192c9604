"""Builds octav_kernels._C, the C++ CPU kernels, as a torch extension.

Install into an environment that already has torch (no build isolation: the extension must be
compiled against the torch it runs with):

    pip install --no-build-isolation -e .

OCTAV_SKIP_EXT=1 installs the pure-Python package only; every op then runs on the reference
implementation (octav_kernels warns once at import).

OCTAV_SANITIZE=address builds the C++ kernels with AddressSanitizer (``make asan`` runs the CPU
parity tests against such a build).

The CUDA kernels (csrc/cuda/) are compiled in when torch is a CUDA build and a CUDA toolkit is
found (CUDA_HOME, or nvcc on PATH); OCTAV_FORCE_CUDA=1 makes a missing toolkit an error instead of
a CPU-only build. Architectures: TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX"). A GPU is not needed
to build. The CUDA kernels are compiled without FMA contraction (--fmad=false), like the C++ ones
(-ffp-contract=off).
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
DEFAULT_ARCHS = "8.0;9.0+PTX"


def sources(folder: str, pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / folder).glob(pattern))


def with_cuda() -> bool:
    """Whether to compile the CUDA kernels (see the module docstring)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    forced = os.environ.get("OCTAV_FORCE_CUDA") == "1"
    if torch.version.cuda is not None and CUDA_HOME is not None:
        return True
    if forced:
        raise RuntimeError(
            "OCTAV_FORCE_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch {torch.__version__} is {'a CPU' if torch.version.cuda is None else 'a CUDA'} "
            f"build and CUDA_HOME is {CUDA_HOME!r} (set it to the folder above nvcc's bin/)")
    return False


def extensions():
    if os.environ.get("OCTAV_SKIP_EXT") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # No -ffast-math / --use_fast_math: the kernels rely on IEEE division, round-half-even and
    # NaN tests; no FMA contraction (-ffp-contract=off), so products and sums round one by one
    # as in the reference on any target.
    cxx = ["-O3", "-march=x86-64-v2", "-ffp-contract=off", "-fopenmp"]
    link = ["-fopenmp"]
    sanitizer = os.environ.get("OCTAV_SANITIZE")
    if sanitizer:
        cxx += [f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer", "-g"]
        link += [f"-fsanitize={sanitizer}"]
    if not with_cuda():
        ext = CppExtension("octav_kernels._C", sources(".", "*.cpp") + sources("cpu", "*.cpp"),
                           extra_compile_args=cxx, extra_link_args=link)
        return [ext], {"build_ext": BuildExtension.with_options(use_ninja=False)}

    # SASS for sm_80 (A100; runs on sm_86/sm_89: A10, L4, L40S, RTX 30/40) and sm_90 (H100/H200),
    # plus compute_90 PTX that the driver compiles for newer GPUs (B200, RTX 50). Older GPUs
    # (T4, V100) have no image: octav_kernels serves them from Triton, with a warning.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    include_dirs = []
    try:  # pip's CUDA torch ships the toolkit headers it was built with (cusparse.h, ...)
        import nvidia

        for root in map(Path, nvidia.__path__):
            include_dirs += [str(d) for d in sorted(root.glob("cu*/include")) if d.is_dir()]
    except ImportError:
        pass
    sass, ptx = cuda_images()
    ext = CUDAExtension(
        "octav_kernels._C",
        sources(".", "*.cpp") + sources("cpu", "*.cpp") + sources("cuda", "*.cu"),
        include_dirs=include_dirs,
        # (host compiler only: nvcc would split the comma-separated values)
        extra_compile_args={"cxx": cxx + ["-DOCTAV_WITH_CUDA", f"-DOCTAV_CUDA_SASS={sass}",
                                          f"-DOCTAV_CUDA_PTX={ptx}"],
                            "nvcc": ["-O3", "--fmad=false", "-DOCTAV_WITH_CUDA"]},
        extra_link_args=link,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def cuda_images() -> tuple[str, str]:
    """The architectures torch's build passes to nvcc (TORCH_CUDA_ARCH_LIST), as the two
    comma-separated lists of the SASS (``code=sm_XY``) and PTX (``code=compute_XY``) numbers
    XY; arch-specific targets (sm_90a, ...) are left out (they run on that architecture only)."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    sass, ptx = set(), set()
    for flag in _get_cuda_arch_flags():  # -gencode=arch=compute_90,code=[compute_90,sm_90]
        for code in flag.rpartition("code=")[2].strip("[]").split(","):
            kind, _, number = code.partition("_")
            if number.isdigit():
                (sass if kind == "sm" else ptx).add(int(number))
    return ",".join(map(str, sorted(sass))), ",".join(map(str, sorted(ptx)))


ext_modules, cmdclass = extensions()

setup(
    name="octav_kernels",
    version="0.1.0",
    description="Fused OCTAV optimal-clipping quantization kernels for PyTorch QAT",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["octav_kernels", "octav_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.9", "numpy"],  # octav_kernels/_torch_version.py
    extras_require={"triton": ["triton"], "onnx": ["onnx", "onnxruntime"],
                    "test": ["pytest", "pytest-benchmark", "hypothesis", "onnx", "onnxruntime"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
