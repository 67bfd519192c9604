"""Builds octav_kernels._C, the C++ CPU kernels, as a torch extension.

Install into an environment that already has torch (no build isolation: the extension must be
compiled against the torch it runs with):

    pip install --no-build-isolation -e .

OCTAV_SKIP_EXT=1 installs the pure-Python package only; every op then runs on the reference
implementation (octav_kernels warns once at import).
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def extensions():
    if os.environ.get("OCTAV_SKIP_EXT") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    cpu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cpu").glob("*.cpp"))
    sources = ["csrc/ops.cpp"] + cpu_sources
    ext = CppExtension(
        "octav_kernels._C",
        sources,
        # No -ffast-math: the kernels rely on IEEE division, round-half-even and NaN tests.
        extra_compile_args=["-O3", "-march=x86-64-v2", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = extensions()

setup(
    name="octav_kernels",
    version="0.1.0",
    description="Fused OCTAV optimal-clipping quantization kernels for PyTorch QAT",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["octav_kernels", "octav_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"triton": ["triton"], "test": ["pytest", "pytest-benchmark"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
