"""Refined OCTAV (``octav_scale(..., refine=True)``) against plain OCTAV, max scaling and the
100- and 2000-point MSE sweeps: quantization MSE on synthetic data, and time, in one run.

    python bench/bench_refine.py [--out bench/results/cpu_refine.md]
    python bench/bench_refine.py --quick          # small sizes (what the tests run)

MSE table: for every data / granularity / bit width / sign cell, the geometric mean over the
cell's groups of MSE(method) / MSE(baseline), the MSE being the empirical squared error of the
real quantizer (SPEC §1; ``octav_kernels.reference.candidate_sse``). Baselines: ``sweep-100``
(s = k/100 max|x|, the best of 100, SPEC §7), ``sweep-2000`` (k/2000, the fine sweep) and
``max`` (s = max|x|). Data: Gaussian, Laplace, Student-t(5) and Gaussian with 0.5% outliers
30x larger (Appendix G's non-convex case); unsigned cells use |x|. Granularities: one tensor
(several tensors, one group each) and per channel on rows of 64, 384, 4096 and 16384 elements.

Time table: plain ``octav_scale``, ``octav_scale(refine=True)`` and ``mse_sweep_scale`` (the
library's batched PyTorch 100-point sweep) on the serving backend (C++ on CPU tensors).
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_octav import emit, header, median_ms

import octav_kernels as ok
from octav_kernels import reference

DATA = ["gaussian", "laplace", "student-t5", "outliers"]
BITS = [2, 3, 4, 6, 8]
QUICK_BITS = [2, 4]
# (label, tensors, rows, row length): per tensor = `tensors` tensors of one group each.
GRANULARITIES = [("tensor 64K", 4, 1, 65536), ("rows 64", 1, 1024, 64),
                 ("rows 384", 1, 256, 384), ("rows 4096", 1, 32, 4096),
                 ("rows 16384", 1, 8, 16384)]
QUICK_GRANULARITIES = [("tensor 4K", 1, 1, 4096), ("rows 64", 1, 16, 64)]
# Time table cases: (label, shape, dim).
TIMING = [("tensor 1M", (1 << 20,), None), ("tensor 16M", (1 << 24,), None),
          ("rows 64 (4096x64)", (4096, 64), 0), ("rows 384 (768x384)", (768, 384), 0),
          ("rows 4096 (768x4096)", (768, 4096), 0), ("rows 16384 (64x16384)", (64, 16384), 0)]
QUICK_TIMING = [("tensor 16K", (1 << 14,), None), ("rows 64 (64x64)", (64, 64), 0)]


def synthetic(kind: str, shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    kw = {"generator": gen, "dtype": torch.float64}
    if kind == "gaussian":
        x = torch.randn(shape, **kw)
    elif kind == "laplace":
        sign = torch.where(torch.rand(shape, **kw) < 0.5, -1.0, 1.0)
        x = sign * -torch.log(torch.rand(shape, **kw).clamp_min(1e-300))
    elif kind == "student-t5":
        chi2 = sum(torch.randn(shape, **kw) ** 2 for _ in range(5))
        x = torch.randn(shape, **kw) / torch.sqrt(chi2 / 5)
    else:
        x = torch.randn(shape, **kw)
        x = torch.where(torch.rand(shape, **kw) < 0.005, 30 * x, x)
    return x.float()


def sweep_sse(rows: torch.Tensor, bits: int, signed: bool, points: int) -> torch.Tensor:
    """Squared error per row at the scale of ``mse_sweep_scale`` (k/points * max, the best of
    k = 1..points), float64."""
    return row_sse(rows, ok.mse_sweep_scale(rows, bits, signed=signed, dim=0, points=points),
                   bits, signed)


def row_sse(rows, scale, bits, signed):
    return reference.candidate_sse(rows, scale.reshape(-1, 1), bits, signed, dim=0)[:, 0]


def geomean(ratio: torch.Tensor) -> float:
    return float(ratio.log().mean().exp())


def mse_cell(kind, gran, bits, signed, seed):
    """Geomean MSE ratios of one cell: refined vs sweep-100 / sweep-2000 / max, OCTAV vs sweep-100
    and max vs sweep-100."""
    _, tensors, n_rows, length = gran
    rows, octav, refined = [], [], []
    for t in range(tensors):
        x = synthetic(kind, (n_rows, length), seed + t)
        if not signed:
            x = x.abs()
        dim = 0 if n_rows > 1 else None
        flat = x if dim == 0 else x.reshape(-1)
        rows.append(x)
        octav.append(ok.octav_scale(flat, bits, signed=signed, dim=dim).reshape(-1))
        refined.append(ok.octav_scale(flat, bits, signed=signed, dim=dim, refine=True).reshape(-1))
    rows, octav, refined = torch.cat(rows), torch.cat(octav), torch.cat(refined)
    e_ref = row_sse(rows, refined, bits, signed)
    e_oct = row_sse(rows, octav, bits, signed)
    e_max = row_sse(rows, (rows.abs() if signed else rows).amax(1), bits, signed)
    e100 = sweep_sse(rows, bits, signed, 100)
    e2000 = sweep_sse(rows, bits, signed, 2000)
    return {"vs100": geomean(e_ref / e100), "vs2000": geomean(e_ref / e2000),
            "vsmax": geomean(e_ref / e_max), "octav100": geomean(e_oct / e100),
            "max100": geomean(e_max / e100)}


def mse_table(grans, bit_widths) -> tuple[list[str], list[dict]]:
    lines = ["### Quantization MSE, geometric mean over groups (lower is better)", "",
             "| data | granularity | bits | sign | refined / sweep-100 | refined / sweep-2000 | "
             "refined / max | OCTAV / sweep-100 | max / sweep-100 |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    cells = []
    for kind in DATA:
        for gran in grans:
            for bits in bit_widths:
                for signed in (True, False):
                    r = mse_cell(kind, gran, bits, signed, seed=bits)
                    r.update(kind=kind, gran=gran[0], bits=bits, signed=signed)
                    cells.append(r)
                    lines.append(
                        f"| {kind} | {gran[0]} | {bits} | {'signed' if signed else 'unsigned'} | "
                        f"{r['vs100']:.4f} | {r['vs2000']:.4f} | {r['vsmax']:.4f} | "
                        f"{r['octav100']:.4f} | {r['max100']:.4f} |")
                    print(lines[-1], file=sys.stderr, flush=True)
    return lines, cells


def timing_table(cases, repeats: int) -> tuple[list[str], list[dict]]:
    lines = ["### Time (float32, 4 bits, signed Gaussian; median of repeats)", "",
             "| case | OCTAV ms | OCTAV+refine ms | sweep-100 ms | refine / OCTAV | "
             "sweep-100 / refine |", "|---|---:|---:|---:|---:|---:|"]
    rows = []
    for label, shape, dim in cases:
        x = synthetic("gaussian", shape, 0)
        t_oct = median_ms(lambda: ok.octav_scale(x, 4, dim=dim), repeats)
        t_ref = median_ms(lambda: ok.octav_scale(x, 4, dim=dim, refine=True), repeats)
        t_sweep = median_ms(lambda: ok.mse_sweep_scale(x, 4, dim=dim), max(1, repeats // 3))
        rows.append({"case": label, "ratio": t_ref / t_oct, "speedup": t_sweep / t_ref})
        lines.append(f"| {label} | {t_oct:.3f} | {t_ref:.3f} | {t_sweep:.1f} | "
                     f"{t_ref / t_oct:.2f}x | {t_sweep / t_ref:.0f}x |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines, rows


def targets(cells, times) -> list[str]:
    worst = max(cells, key=lambda c: c["vs100"])
    worst2k = max(cells, key=lambda c: c["vs2000"])
    worst_max = max(cells, key=lambda c: c["vsmax"])
    miss100 = sum(c["vs100"] > 1.0 for c in cells)
    miss100_3 = sum(round(c["vs100"], 3) > 1.0 for c in cells)  # the target's 3 decimals
    miss2k = sum(c["vs2000"] > 1.002 for c in cells)
    slow = max(times, key=lambda t: t["ratio"])
    least = min(times, key=lambda t: t["speedup"])

    def where(c):
        return f"{c['kind']} {c['gran']} {c['bits']}-bit {'signed' if c['signed'] else 'unsigned'}"

    return ["### Targets (issue 6)", "",
            "| target | result | met |", "|---|---|---|",
            f"| MSE <= 1.000x sweep-100 in every cell | worst {worst['vs100']:.5f} "
            f"({where(worst)}); {miss100} of {len(cells)} cells above 1, {miss100_3} above "
            f"1.000 at 3 decimals | {'yes' if miss100_3 == 0 else 'no'} |",
            f"| never worse than max scaling | worst refined / max {worst_max['vsmax']:.4f} | "
            f"{'yes' if worst_max['vsmax'] <= 1.0 else 'no'} |",
            f"| within 0.2% of sweep-2000 | worst {worst2k['vs2000']:.4f} ({where(worst2k)}); "
            f"{miss2k} cells above 1.002 | {'yes' if miss2k == 0 else 'no'} |",
            f"| <= 3x plain OCTAV time | worst {slow['ratio']:.2f}x ({slow['case']}) | "
            f"{'yes' if slow['ratio'] <= 3 else 'no'} |",
            f"| >= 50x faster than sweep-100 | least {least['speedup']:.0f}x ({least['case']}) | "
            f"{'yes' if least['speedup'] >= 50 else 'no'} |", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small sizes (for the tests)")
    parser.add_argument("--out", help="also write the tables to this markdown file")
    args = parser.parse_args()
    command = "python bench/bench_refine.py" + (" --quick" if args.quick else "")
    lines = ["## Refined OCTAV: empirical MSE and time (CPU)", ""] + header(command)
    mse_lines, cells = mse_table(QUICK_GRANULARITIES if args.quick else GRANULARITIES,
                                 QUICK_BITS if args.quick else BITS)
    time_lines, times = timing_table(QUICK_TIMING if args.quick else TIMING, args.repeats)
    lines += targets(cells, times) + mse_lines + [""] + time_lines
    emit(lines, args.out)


if __name__ == "__main__":
    main()
