"""CI's check of the CUDA build on a machine without a GPU (``make cuda-build`` runs it with the
CUDA torch of .venv-cuda): the extension built in build/cuda loads with the package, registers a
CUDA kernel for every octav op (C++ for all but refine_scale, whose CUDA kernel is the shared
search over the C++ passes) and the C++ autograd of the differentiable ops, and carries SASS for
sm_80 and sm_90 plus compute_90 PTX (TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX")."""

import glob
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cuobjdump() -> str:
    """The cuobjdump of PyPI's nvidia-cuda-cuobjdump (or one on PATH)."""
    import nvidia

    for root in map(Path, nvidia.__path__):
        for found in sorted(root.glob("cu*/bin/cuobjdump")):
            return str(found)
    found = shutil.which("cuobjdump")
    if found is None:
        sys.exit("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    return found


def main() -> None:
    so = glob.glob(str(ROOT / "build/cuda/octav_kernels/_C*.so"))
    if not so:
        sys.exit("no build/cuda/octav_kernels/_C*.so: run make cuda-build")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT / "octav_kernels", Path(tmp) / "octav_kernels",
                        ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
        shutil.copy(so[0], Path(tmp) / "octav_kernels")
        sys.path.insert(0, tmp)
        import torch

        import octav_kernels as ok

        assert ok.backend.cuda_kernels_built(), "the extension has no CUDA kernels"
        problems = []
        for name, op in ok.ops.OPS.items():
            table = {line.split(":")[0]: line for line in
                     torch._C._dispatch_dump(f"octav::{name}").splitlines()}
            source = "backend.py" if name == "refine_scale" else "csrc/ops.cpp"
            if source not in table.get("CUDA", ""):
                problems.append(f"{name}: CUDA kernel {table.get('CUDA')!r}, expected {source}")
            if op.backward is not None and "csrc/autograd.cpp" not in table["Autograd[alias]"]:
                problems.append(f"{name}: autograd {table['Autograd[alias]']!r}")
        if problems:
            sys.exit("dispatcher registrations:\n  " + "\n  ".join(problems))
        print(f"every op ({len(ok.ops.OPS)}) has a CUDA kernel and its autograd")
        lib = ok.backend.compiled()
        images = (list(lib.cuda_sass), list(lib.cuda_ptx))  # what backend.image_for reads

    if images != ([80, 90], [90]):
        sys.exit(f"the extension reports SASS {images[0]} and PTX {images[1]}, expected "
                 "[80, 90] and [90] (setup.py cuda_images)")

    tool = cuobjdump()
    elf = subprocess.run([tool, "--list-elf", so[0]], capture_output=True, text=True,
                         check=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", so[0]], capture_output=True, text=True,
                         check=True).stdout
    missing = [f"SASS {arch}" for arch in ("sm_80", "sm_90") if arch not in elf]
    missing += [] if "sm_90" in ptx else ["compute_90 PTX"]
    if missing:
        sys.exit(f"the CUDA build lacks {', '.join(missing)}:\n{elf}\n{ptx}")
    print("SASS for sm_80 and sm_90, PTX for compute_90, as the extension reports "
          "(cuda_sass, cuda_ptx)")


if __name__ == "__main__":
    main()
