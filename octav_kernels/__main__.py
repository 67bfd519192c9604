"""``python -m octav_kernels``: calibrate a built-in set of tensors with OCTAV, refined OCTAV
(``refine=True``) and the baselines (max, percentile, 100-point MSE sweep) and print, per
tensor and bit width, each method's empirical quantization MSE relative to the best sweep point
and the time it took."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from . import calibrate, ops
from .backend import serving, use_backend


def builtin_tensors(numel: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic test data: Gaussian, Laplace, and Student-t(3) with 0.01% outliers of
    magnitude 10..50 (random sign)."""
    gen = torch.Generator().manual_seed(seed)
    gauss = torch.randn(numel, generator=gen)
    uniform = torch.rand(numel, generator=gen, dtype=torch.float64).clamp_min(1e-12)
    laplace = (torch.sign(torch.rand(numel, generator=gen) - 0.5) * -torch.log(uniform)).float()
    chi2 = sum(torch.randn(numel, generator=gen) ** 2 for _ in range(3))
    student = torch.randn(numel, generator=gen) / torch.sqrt(chi2 / 3)
    outlier = torch.rand(numel, generator=gen) < 1e-4
    magnitude = 10 + 40 * torch.rand(numel, generator=gen)
    heavy = torch.where(outlier, torch.sign(student) * magnitude, student)
    return {"gaussian": gauss, "laplace": laplace, "student-t3+outliers": heavy}


def methods(bits: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    return {
        "octav": lambda x: ops.octav_scale(x, bits),
        "octav+refine": lambda x: ops.octav_scale(x, bits, refine=True),
        "max": lambda x: calibrate.max_scale(x),
        "p99.9": lambda x: calibrate.percentile_scale(x, 99.9),
        "p99.99": lambda x: calibrate.percentile_scale(x, 99.99),
        "p99.999": lambda x: calibrate.percentile_scale(x, 99.999),
        "mse-sweep-100": lambda x: calibrate.mse_sweep_scale(x, bits),
    }


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[torch.Tensor, float]:
    """Result and the best wall time in ms of ``repeats`` calls (after one warm-up call)."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return result, best * 1e3


def run(numel: int, bits_list: list[int], repeats: int) -> list[str]:
    backend_name = serving(torch.device("cpu"))
    lines = [
        f"OCTAV calibration on built-in tensors of {numel:,} elements, per tensor, signed "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads, octav backend "
        f"{backend_name}).",
        "rel. MSE = empirical MSE of the fake-quantized tensor / MSE at the best point of the "
        "100-point sweep (below 1: better than the sweep). Time: best of "
        f"{repeats} calls.",
        "",
        "| data | bits | method | scale | rel. MSE | time (ms) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, x in builtin_tensors(numel).items():
        for bits in bits_list:
            rows = []
            for method, fn in methods(bits).items():
                scale, ms = timed(lambda fn=fn, x=x: fn(x), repeats)
                mse = calibrate.quantization_mse(x, scale, bits).item()
                rows.append((method, scale.item(), mse, ms))
            best = next(mse for method, _, mse, _ in rows if method == "mse-sweep-100")
            for method, scale, mse, ms in rows:
                lines.append(f"| {name} | {bits} | {method} | {scale:.4f} | {mse / best:.4f} "
                             f"| {ms:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m octav_kernels", description=__doc__)
    parser.add_argument("--numel", type=int, default=1 << 20, help="elements per tensor")
    parser.add_argument("--bits", type=int, nargs="+", default=list(range(2, 9)))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method")
    parser.add_argument("--backend", default="auto",
                        help="reference | cpu | triton | auto (default)")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    with use_backend(args.backend):
        lines = run(args.numel, args.bits, args.repeats)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
