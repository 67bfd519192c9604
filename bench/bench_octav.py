"""octav_scale on the CPU, side by side with the paper's NumPy loop, a naive PyTorch loop, the
100-point MSE sweep and one plain read of the data, plus a whole BERT-Base-like workload.

    python bench/bench_octav.py [--out bench/results/cpu_octav.md]   # markdown tables
    pytest bench/bench_octav.py --benchmark-only                      # under pytest-benchmark

Methods, all on the same tensors in one run:
- ``octav``: ``octav_kernels.octav_scale`` (C++ kernels), cold start, to convergence;
- ``warm``: the same with ``init`` 3% off the answer (a QAT step warm-started from the last);
- ``numpy-paper``: the paper's recursion as NumPy array code, 10 iterations of abs/compare/sum;
- ``torch-naive``: the same 10 iterations as PyTorch tensor ops;
- ``sweep-100``: ``octav_kernels.mse_sweep_scale``, 100 candidates k/100 * max|x| (PyTorch);
- ``sum`` and ``absmax``: ``x.sum()`` and ``x.abs().amax()``, one plain read (the lower bound;
  ``absmax`` also writes a temporary, as a naive max calibration does).
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

WEIGHT_SHAPES = [(768, 768), (768, 3072), (3072, 768)]
ACTIVATION_SHAPE = (64, 3136, 80)  # a conv activation of ~16M elements (N, H*W, C)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = ["octav", "warm", "numpy-paper", "torch-naive", "sweep-100", "sum", "absmax"]


def laplace(shape, scale=0.03, seed=0) -> torch.Tensor:
    """BERT-like weights: Laplace-distributed (heavier tails than Gaussian)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=gen, dtype=torch.float64).clamp_min(1e-12)
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    return (scale * sign * -torch.log(u)).float()


def student_t(shape, seed=0) -> torch.Tensor:
    """Heavy-tailed activations: Student-t with 4 degrees of freedom."""
    gen = torch.Generator().manual_seed(seed)
    chi2 = sum(torch.randn(shape, generator=gen) ** 2 for _ in range(4))
    return torch.randn(shape, generator=gen) / torch.sqrt(chi2 / 4)


def numpy_paper_loop(x: np.ndarray, bits: int, dim: int | None, iters: int = 10) -> np.ndarray:
    """The paper's Algorithm 1 in NumPy: s <- E[|x| 1{|x|>s}] / (4**-B/3 P(0<|x|<=s) + P(|x|>s))."""
    axis = None if dim is None else tuple(i for i in range(x.ndim) if i != dim)
    s = np.abs(x).mean(axis=axis, keepdims=True)
    for _ in range(iters):
        a = np.abs(x)
        out = a > s
        inside = (a > 0) & ~out
        s = (a * out).sum(axis=axis, keepdims=True) / (
            4.0**-bits / 3 * inside.sum(axis=axis, keepdims=True)
            + out.sum(axis=axis, keepdims=True))
    return s


def torch_naive_loop(x: torch.Tensor, bits: int, dim: int | None,
                     iters: int = 10) -> torch.Tensor:
    """The same 10 iterations written with PyTorch tensor ops."""
    axis = None if dim is None else [i for i in range(x.dim()) if i != dim]
    a = x.float().abs()
    s = a.mean(dim=axis, keepdim=True)
    for _ in range(iters):
        out = a > s
        inside = (a > 0) & ~out
        s = (a * out).sum(dim=axis, keepdim=True) / (
            4.0**-bits / 3 * inside.sum(dim=axis, keepdim=True) + out.sum(dim=axis, keepdim=True))
    return s


def methods(x: torch.Tensor, bits: int, dim: int | None) -> dict:
    answer = ok.octav_scale(x, bits, dim=dim)
    x_np = x.float().numpy()
    return {
        "octav": lambda: ok.octav_scale(x, bits, dim=dim),
        "warm": lambda: ok.octav_scale(x, bits, dim=dim, init=answer * 1.03),
        "numpy-paper": lambda: numpy_paper_loop(x_np, bits, dim),
        "torch-naive": lambda: torch_naive_loop(x, bits, dim),
        "sweep-100": lambda: ok.mse_sweep_scale(x, bits, dim=dim),
        "sum": lambda: x.sum(),
        "absmax": lambda: x.abs().amax(),
    }


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(command: str) -> list[str]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    return [f"Machine: {cpu_name()}, {torch.get_num_threads()} threads; torch "
            f"{torch.__version__}, numpy {np.__version__}; commit {commit}; command: "
            f"`{command}`.", ""]


def emit(lines: list[str], out: str | None) -> None:
    """Print the markdown and, with ``out``, also write it there."""
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def tensor_cases():
    """(label, tensor, granularity label, dim) of the per-tensor table."""
    for dtype_name, dtype in DTYPES.items():
        for shape in WEIGHT_SHAPES:
            x = laplace(shape).to(dtype)
            for gran, dim in (("per-tensor", None), ("per-channel", 0)):
                yield f"{shape[0]}x{shape[1]} {dtype_name}", x, gran, dim
        x = student_t(ACTIVATION_SHAPE).to(dtype)
        yield "x".join(map(str, ACTIVATION_SHAPE)) + f" {dtype_name}", x, "per-tensor", None


def tensor_table(bits: int, repeats: int) -> list[str]:
    lines = [
        f"### octav_scale, {bits}-bit signed (median of {repeats} runs; sweep: 1 run)", "",
        "| tensor | granularity | octav | warm | numpy-paper x10 | torch-naive x10 | sweep-100 "
        "| sum | abs().amax() | octav / sum | octav / absmax | warm / sum | numpy / octav "
        "| torch / octav | sweep / octav |",
        "|---|---|" + "---:|" * 13,
    ]
    for label, x, gran, dim in tensor_cases():
        ms = {name: median_ms(fn, 1 if name == "sweep-100" else repeats)
              for name, fn in methods(x, bits, dim).items()}
        lines.append(
            f"| {label} | {gran} | " + " | ".join(f"{ms[m]:.2f}" for m in METHODS) + " | "
            f"{ms['octav'] / ms['sum']:.1f}x | {ms['octav'] / ms['absmax']:.2f}x | "
            f"{ms['warm'] / ms['sum']:.1f}x | {ms['numpy-paper'] / ms['octav']:.1f}x | "
            f"{ms['torch-naive'] / ms['octav']:.1f}x | {ms['sweep-100'] / ms['octav']:.0f}x |")
    lines.append("")
    lines.append("Times in ms. bf16: the NumPy loop runs on a float32 copy made beforehand.")
    return lines


def bert_workload(batch: int = 2, seq: int = 128):
    """BERT-Base-like tensors: the 74 weights (12 layers x Q, K, V, O 768x768, FFN 3072x768 and
    768x3072; pooler 768x768; a 2x768 classifier), quantized per output channel, and 84
    activations of one batch (per layer: 4 inputs of 768 features, the 3072-wide FFN input,
    attention scores and probabilities), quantized per tensor."""
    weights, activations = [], []
    tokens = batch * seq
    for layer in range(12):
        for i, shape in enumerate([(768, 768)] * 4 + [(3072, 768), (768, 3072)]):
            weights.append(laplace(shape, seed=100 * layer + i))
        for i, shape in enumerate([(tokens, 768)] * 4 + [(tokens, 3072)]
                                  + [(batch, 12, seq, seq)] * 2):
            activations.append(student_t(shape, seed=100 * layer + 50 + i))
    weights += [laplace((768, 768), seed=9000), laplace((2, 768), seed=9001)]
    return [(w, 0) for w in weights] + [(a, None) for a in activations]


def workload_table(repeats: int) -> list[str]:
    tensors = bert_workload()
    n_elem = sum(t.numel() for t, _ in tensors)
    lines = [
        f"### BERT-Base-like workload: {sum(d == 0 for _, d in tensors)} weights per channel + "
        f"{sum(d is None for _, d in tensors)} activations per tensor, {n_elem / 1e6:.1f}M "
        f"elements; total seconds for all tensors (median of {repeats} runs; sweep: 1 run)", "",
        "| bits | " + " | ".join(METHODS) + " | octav / sum | numpy / octav | torch / octav "
        "| sweep / octav |",
        "|---:|" + "---:|" * (len(METHODS) + 4),
    ]
    for bits in (4, 8):
        per_tensor = [methods(t, bits, dim) for t, dim in tensors]
        secs = {}
        for name in METHODS:
            calls = [fns[name] for fns in per_tensor]
            secs[name] = median_ms(lambda: [f() for f in calls],
                                   1 if name == "sweep-100" else repeats) / 1e3
        lines.append(
            f"| {bits} | " + " | ".join(f"{secs[m]:.3f}" for m in METHODS) + " | "
            f"{secs['octav'] / secs['sum']:.1f}x | {secs['numpy-paper'] / secs['octav']:.1f}x | "
            f"{secs['torch-naive'] / secs['octav']:.1f}x | "
            f"{secs['sweep-100'] / secs['octav']:.0f}x |")
    return lines


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("gran", ["per-tensor", "per-channel"])
@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_octav_scale_cpu(benchmark, shape, gran, method):
    fn = methods(laplace(shape), 4, None if gran == "per-tensor" else 0)[method]
    benchmark.group = f"{shape[0]}x{shape[1]} {gran}"
    benchmark.pedantic(fn, rounds=1 if method == "sweep-100" else 10, warmup_rounds=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--no-workload", action="store_true", help="skip the BERT workload")
    parser.add_argument("--out", help="also write the tables to this markdown file")
    args = parser.parse_args()
    lines = ["# CPU benchmark: octav_scale", ""] + header("python bench/bench_octav.py")
    lines += tensor_table(args.bits, args.repeats)
    if not args.no_workload:
        lines += [""] + workload_table(max(1, args.repeats // 3))
    emit(lines, args.out)


if __name__ == "__main__":
    main()
