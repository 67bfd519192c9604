"""Per-step cost of oscillation tracking and freezing: the fused tracked weight fake-quant
against the fixed-scale fake-quant it replaces, and against the same tracking written as torch
ops (the reference backend: what a Python-hook implementation costs), side by side in one run.

    python bench/bench_oscillation.py --out bench/results/cpu_oscillation.md
    python bench/bench_oscillation.py --device cuda --out gpu-out/gpu_oscillation.md
    python bench/bench_oscillation.py --quick            # seconds, for the tests

Weights per output channel (dim 0), 3-bit signed, MAD backward, fp32 and bf16. "fwd+bwd" is
``y = f(w); y.backward(g)``. The tracked op reads the weight and 11 bytes of state per element
and writes y and the state (``last_int``, ``last_dir`` int8, ``frozen`` bool, two float32
EMAs); its backward reads one more byte (the frozen mask).
"""

from __future__ import annotations

import argparse

import torch
from bench_gpu import cuda_median_ms, header
from bench_octav import emit, median_ms

import octav_kernels as ok

BITS = 3
SHAPES = [(256, 256, 3, 3), (4096, 4096)]
QUICK_SHAPES = [(16, 8, 3, 3)]


def providers(w: torch.Tensor, backends: list[str]) -> dict[str, tuple[str, callable]]:
    """name -> (backend, fn(leaf) -> y) for the fixed-scale and tracked fake-quants."""
    scale = ok.octav_scale(w, BITS, dim=0)
    state = ok.OscillationState.start(w, scale, BITS, dim=0)

    def fixed(t):
        return ok.fake_quantize(t, scale, BITS, dim=0, grad="mad")

    def tracked(t):
        return ok.fake_quantize_tracked(t, scale, BITS, state, dim=0, grad="mad",
                                        freeze_threshold=0.02)

    out = {}
    for name in backends:
        out[f"fixed-scale ({name})"] = (name, fixed)
        out[f"tracked ({name})"] = (name, tracked)
    out["tracked (torch ops)"] = ("reference", tracked)
    return out


def timed(fn, device: torch.device, repeats: int) -> float:
    return cuda_median_ms(fn, repeats) if device.type == "cuda" else median_ms(fn, repeats)


def table(device: torch.device, backends: list[str], shapes, repeats: int) -> list[str]:
    names = list(providers(torch.zeros(1, 1, device=device), backends))
    lines = [f"### Tracked vs fixed-scale weight fake-quant, {BITS}-bit per channel, MAD "
             f"(median ms of {repeats} runs)", "",
             "| weight | dtype | " + " | ".join(f"{n} fwd" for n in names) + " | "
             + " | ".join(f"{n} fwd+bwd" for n in names) + " | "
             + " | ".join(f"tracked / fixed fwd+bwd ({b})" for b in backends)
             + " | torch ops / tracked fwd+bwd |",
             "|---|---|" + "---:|" * (2 * len(names) + len(backends) + 1)]
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(0)
            w = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
            g = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
            fwd, both = {}, {}
            for name, (backend, fn) in providers(w, backends).items():
                with ok.use_backend(backend):
                    fwd[name] = timed(lambda fn=fn: fn(w), device, repeats)

                    def step(fn=fn):
                        leaf = w.detach().requires_grad_()
                        fn(leaf).backward(g)
                    both[name] = timed(step, device, repeats)
            ratios = [both[f"tracked ({b})"] / both[f"fixed-scale ({b})"] for b in backends]
            best = min(both[f"tracked ({b})"] for b in backends)
            lines.append(f"| {'x'.join(map(str, shape))} | {str(dtype)[6:]} | "
                         + " | ".join(f"{fwd[n]:.3f}" for n in names) + " | "
                         + " | ".join(f"{both[n]:.3f}" for n in names) + " | "
                         + " | ".join(f"{r:.2f}x" for r in ratios)
                         + f" | {both['tracked (torch ops)'] / best:.1f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="tiny weights, 2 repeats")
    parser.add_argument("--commit", help="commit for the header (default: git HEAD)")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    device = torch.device(args.device)
    backends = ["cpu"] if device.type == "cpu" else ["cuda", "triton"]
    command = "python bench/bench_oscillation.py" + (
        f" --device {args.device}" if args.device != "cpu" else "")
    emit([f"# {device.type.upper()} benchmark: oscillation tracking", ""]
         + header(device, args.commit, command)
         + table(device, backends, QUICK_SHAPES if args.quick else SHAPES,
                 2 if args.quick else args.repeats), args.out)


if __name__ == "__main__":
    main()
