"""fake_quantize on the CPU against PyTorch's own fake-quant, forward and forward+backward, on the
same data with the same grid.

    python bench/bench_fake_quant.py [--out bench/results/cpu_fake_quant.md]
    pytest bench/bench_fake_quant.py --benchmark-only

4-bit signed two's complement (levels -8..7, step = s / 8) is
``torch.fake_quantize_per_tensor_affine(x, s / 8, 0, -8, 7)`` (per channel:
``torch.fake_quantize_per_channel_affine`` with ``zero_point = 0``). PyTorch's backward is the
straight-through estimator restricted to the clipping range, i.e. our ``pwl``; ``mad`` is shown
too. Forward+backward: ``y = f(x); y.backward(g)`` with ``x.requires_grad``.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from bench_octav import ACTIVATION_SHAPE, emit, header, laplace, median_ms, student_t

import octav_kernels as ok

BITS = 4
CASES = [  # (label, tensor factory, dim)
    ("768x3072 per-tensor", lambda: laplace((768, 3072)), None),
    ("768x3072 per-channel", lambda: laplace((768, 3072)), 0),
    ("3072x768 per-channel", lambda: laplace((3072, 768)), 0),
    ("x".join(map(str, ACTIVATION_SHAPE)) + " per-tensor", lambda: student_t(ACTIVATION_SHAPE),
     None),
]
METHODS = ["octav_kernels pwl", "octav_kernels mad", "torch"]


def providers(x: torch.Tensor, dim: int | None) -> dict:
    scale = ok.octav_scale(x, BITS, dim=dim)
    half = 2 ** (BITS - 1)
    if dim is None:
        def torch_fq(t):
            return torch.fake_quantize_per_tensor_affine(t, scale.item() / half, 0, -half,
                                                         half - 1)
    else:
        step = (scale / half).contiguous()
        zero = torch.zeros(scale.shape, dtype=torch.int32)

        def torch_fq(t):
            return torch.fake_quantize_per_channel_affine(t, step, zero, dim, -half, half - 1)
    return {
        "octav_kernels pwl": lambda t: ok.fake_quantize(t, scale, BITS, dim=dim, grad="pwl"),
        "octav_kernels mad": lambda t: ok.fake_quantize(t, scale, BITS, dim=dim, grad="mad"),
        "torch": torch_fq,
    }


def forward_backward(fn, x, g):
    def run():
        leaf = x.detach().requires_grad_()
        fn(leaf).backward(g)
        return leaf.grad
    return run


def timed_table(title: str, cases, methods: list[str], runs, repeats: int,
                check=None) -> list[str]:
    """A markdown table of forward and forward+backward medians per case and method, with the
    ratios torch / ``methods[0]``. ``runs(x, g, dim)`` gives ``{method: (fwd, fwd_bwd)}``
    (zero-argument callables); ``check = (header, fn(x, dim) -> str)`` adds a column."""
    extra = f" {check[0]} |" if check else ""
    lines = [f"### {title} (median of {repeats} runs, ms)", "",
             "| tensor | " + " | ".join(f"{m} fwd" for m in methods) + " | "
             + " | ".join(f"{m} fwd+bwd" for m in methods)
             + f" | torch / ours fwd | torch / ours fwd+bwd ({methods[0].split()[-1]}) |{extra}",
             "|---|" + "---:|" * (2 * len(methods) + 2 + bool(check))]
    for label, make, dim in cases:
        x = make()
        fns = runs(x, torch.randn_like(x), dim)
        fwd = {m: median_ms(f, repeats) for m, (f, _) in fns.items()}
        both = {m: median_ms(f, repeats) for m, (_, f) in fns.items()}
        lines.append(f"| {label} | " + " | ".join(f"{fwd[m]:.2f}" for m in methods) + " | "
                     + " | ".join(f"{both[m]:.2f}" for m in methods) + " | "
                     f"{fwd['torch'] / fwd[methods[0]]:.2f}x | "
                     f"{both['torch'] / both[methods[0]]:.2f}x |"
                     + (f" {check[1](x, dim)} |" if check else ""))
    return lines


def runs(x, g, dim):
    return {m: (lambda f=f: f(x), forward_backward(f, x, g))
            for m, f in providers(x, dim).items()}


def table(repeats: int) -> list[str]:
    return timed_table(f"fake_quantize, {BITS}-bit signed, fp32", CASES, METHODS, runs,
                       repeats)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_fake_quantize_fwd_bwd_cpu(benchmark, case, method):
    label, make, dim = CASES[case]
    x = make()
    benchmark.group = label
    benchmark.pedantic(forward_backward(providers(x, dim)[method], x, torch.randn_like(x)),
                       rounds=10, warmup_rounds=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    emit(["# CPU benchmark: fake_quantize", ""] + header("python bench/bench_fake_quant.py")
         + table(args.repeats), args.out)


if __name__ == "__main__":
    main()
