"""fake_quantize_lsq (a learned scale, LSQ) on the CPU against PyTorch's learnable fake-quant,
forward + backward to both x and the scale, on the same data with the same grid.

    python bench/bench_lsq.py [--out bench/results/cpu_lsq.md]
    pytest bench/bench_lsq.py --benchmark-only

4-bit signed (levels -8..7): ours holds the clipping scale s (step = s / 8); PyTorch's
``torch._fake_quantize_learnable_per_tensor_affine`` / ``..._per_channel_affine`` hold the step
itself (zero point 0), with LSQ's gradient scale ``grad_factor = 1 / sqrt(N * 7)`` (ours:
``grad_scale=True``, the same factor). PyTorch's estimator for x is the straight-through one
inside the range: our ``pwl``; ``mad`` is shown too. Forward + backward:
``y = f(x, s); y.backward(g)`` with x and s requiring grad. The table's last column is the
largest difference of the outputs (0: the same values) as a check that both compute one grid.
"""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from bench_fake_quant import BITS, CASES, METHODS, timed_table
from bench_octav import emit, header

import octav_kernels as ok

HALF = 2 ** (BITS - 1)


def providers(x: torch.Tensor, dim: int | None) -> dict:
    """method -> (f(x, scale), its scale argument): the same grid for every method."""
    scale = ok.octav_scale(x, BITS, dim=dim)
    per_group = x.numel() // scale.numel()
    factor = 1.0 / math.sqrt(per_group * (HALF - 1))
    if dim is None:
        def torch_fq(t, step):
            return torch._fake_quantize_learnable_per_tensor_affine(
                t, step, torch.zeros(1), -HALF, HALF - 1, factor)
        step = (scale / HALF).reshape(1)
    else:
        zero = torch.zeros(scale.shape, dtype=torch.float32)

        def torch_fq(t, step):
            return torch._fake_quantize_learnable_per_channel_affine(
                t, step, zero, dim, -HALF, HALF - 1, factor)
        step = (scale / HALF).contiguous()
    return {
        "octav_kernels pwl": (lambda t, s: ok.fake_quantize_lsq(t, s, BITS, dim=dim,
                                                                 grad="pwl"), scale),
        "octav_kernels mad": (lambda t, s: ok.fake_quantize_lsq(t, s, BITS, dim=dim,
                                                                 grad="mad"), scale),
        "torch": (torch_fq, step),
    }


def forward_backward(fn, x, scale, g):
    def run():
        leaf = x.detach().requires_grad_()
        s = scale.detach().requires_grad_()
        fn(leaf, s).backward(g)
        return leaf.grad, s.grad
    return run


def runs(x, g, dim):
    return {m: (lambda f=f, s=s: f(x, s), forward_backward(f, x, s, g))
            for m, (f, s) in providers(x, dim).items()}


def output_difference(x, dim) -> str:
    """The largest difference of the outputs of ours (pwl) and PyTorch's (0: one grid)."""
    fns = providers(x, dim)
    ours, theirs = (f(x, s) for f, s in (fns["octav_kernels pwl"], fns["torch"]))
    return f"{float((ours - theirs).abs().max()):.1e}"


def table(repeats: int) -> list[str]:
    return timed_table(f"fake_quantize_lsq, {BITS}-bit signed, fp32", CASES, METHODS, runs,
                       repeats, ("max abs diff of y", output_difference))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_fake_quantize_lsq_fwd_bwd_cpu(benchmark, case, method):
    label, make, dim = CASES[case]
    x = make()
    fn, scale = providers(x, dim)[method]
    benchmark.group = label
    benchmark.pedantic(forward_backward(fn, x, scale, torch.randn_like(x)), rounds=10,
                       warmup_rounds=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    emit(["# CPU benchmark: fake_quantize_lsq", ""] + header("python bench/bench_lsq.py")
         + table(args.repeats), args.out)


if __name__ == "__main__":
    main()
