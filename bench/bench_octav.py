"""octav_scale on the CPU against the paper's NumPy loop and the 100-point MSE sweep, on
BERT-Base-sized weight tensors (768x768, 768x3072, 3072x768), per tensor and per channel.

    python bench/bench_octav.py [--out bench/results/cpu_octav.md]   # markdown table + ratios
    pytest bench/bench_octav.py --benchmark-only                      # under pytest-benchmark

Methods, all on the same tensors in one run:
- ``octav``: ``octav_kernels.octav_scale`` (default backend: the C++ kernels), to convergence;
- ``numpy-paper``: the paper's recursion as NumPy array code, 10 iterations of abs/compare/sum;
- ``sweep-100``: ``octav_kernels.mse_sweep_scale``, 100 candidates k/100 * max|x| (PyTorch);
- ``one-read``: ``x.abs().amax()``, one plain read of the data (the lower bound).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import numpy as np
import pytest
import torch

import octav_kernels as ok

BITS = 4
SHAPES = [(768, 768), (768, 3072), (3072, 768)]
GRANULARITIES = {"per-tensor": None, "per-channel": 0}


def weights(shape, seed=0) -> torch.Tensor:
    """BERT-like weights: Laplace-distributed (heavier tails than Gaussian), std ~0.04."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=gen, dtype=torch.float64).clamp_min(1e-12)
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    return (0.03 * sign * -torch.log(u)).float()


def numpy_paper_loop(x: np.ndarray, bits: int, dim: int | None, iters: int = 10) -> np.ndarray:
    """The paper's Algorithm 1 in NumPy: s <- E[|x| 1{|x|>s}] / (4**-B/3 P(|x|<=s) + P(|x|>s))."""
    axis = None if dim is None else 1 - dim
    s = np.abs(x).mean(axis=axis, keepdims=True)
    for _ in range(iters):
        a = np.abs(x)
        out = a > s
        inside = (a > 0) & ~out
        s = (a * out).sum(axis=axis, keepdims=True) / (
            4.0**-bits / 3 * inside.sum(axis=axis, keepdims=True) + out.sum(axis=axis,
                                                                              keepdims=True))
    return s


def methods(x: torch.Tensor, dim: int | None) -> dict:
    x_np = x.numpy()
    return {
        "octav": lambda: ok.octav_scale(x, BITS, dim=dim),
        "numpy-paper": lambda: numpy_paper_loop(x_np, BITS, dim),
        "sweep-100": lambda: ok.mse_sweep_scale(x, BITS, dim=dim),
        "one-read": lambda: x.abs().amax() if dim is None else x.abs().amax(1),
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def table(repeats: int) -> list[str]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    lines = [
        f"octav_scale CPU benchmark, {BITS}-bit signed, fp32 (median of {repeats} runs; sweep: "
        f"{max(1, repeats // 3)}).",
        f"Machine: {cpu_name()}, {torch.get_num_threads()} "
        f"threads; torch {torch.__version__}, numpy {np.__version__}; commit {commit}; "
        "command: `python bench/bench_octav.py`.",
        "",
        "| shape | granularity | octav (ms) | numpy-paper x10 (ms) | sweep-100 (ms) | "
        "one read (ms) | numpy / octav | sweep / octav | octav / one read |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for shape in SHAPES:
        x = weights(shape)
        for gran, dim in GRANULARITIES.items():
            ms = {name: median_ms(fn, max(1, repeats // 3) if name == "sweep-100" else repeats)
                  for name, fn in methods(x, dim).items()}
            lines.append(
                f"| {shape[0]}x{shape[1]} | {gran} | {ms['octav']:.2f} | "
                f"{ms['numpy-paper']:.2f} | {ms['sweep-100']:.1f} | {ms['one-read']:.3f} | "
                f"{ms['numpy-paper'] / ms['octav']:.1f}x | {ms['sweep-100'] / ms['octav']:.0f}x | "
                f"{ms['octav'] / ms['one-read']:.1f}x |")
    return lines


@pytest.mark.parametrize("method", ["octav", "numpy-paper", "sweep-100", "one-read"])
@pytest.mark.parametrize("gran", list(GRANULARITIES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_octav_scale_cpu(benchmark, shape, gran, method):
    fn = methods(weights(shape), GRANULARITIES[gran])[method]
    benchmark.group = f"{shape[0]}x{shape[1]} {gran}"
    benchmark.pedantic(fn, rounds=3 if method == "sweep-100" else 10, warmup_rounds=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    text = "\n".join(table(args.repeats))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
