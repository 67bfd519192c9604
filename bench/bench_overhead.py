"""Per-call cost of the QAT ops and modules on small tensors, where the host path (argument
checks, dispatch, autograd), not the kernels, sets what a trainer pays; and a whole QAT training
step of a small transformer. Side by side in one run, against PyTorch's own fake-quant (and, if
installed, torchao's QAT), min over interleaved rounds of the mean time per call.

    python bench/bench_overhead.py --out bench/results/cpu_overhead.md   # (make bench)
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_octav import emit, header
from qat_lm import Block
from torch import nn

import octav_kernels as ok

BITS = 4


def interleaved(calls: dict, rounds: int, per_round: int,
                sync=lambda: None) -> dict[str, float]:
    """Microseconds per call of each of ``calls``: the min over ``rounds`` rounds (each call
    timed for ``per_round`` repetitions per round, the calls interleaved; ``sync`` waits for
    the device before and after each timing)."""
    for fn in calls.values():  # warm-up (and the first forward of the quantizers)
        for _ in range(3):
            fn()
    best = {name: float("inf") for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            sync()
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            sync()
            best[name] = min(best[name], (time.perf_counter() - start) / per_round * 1e6)
    return best


def op_calls(n: int, device: str = "cpu") -> tuple[dict, dict]:
    """(forward calls, forward+backward calls) on an n x n fp32 weight, per channel."""
    torch.manual_seed(0)
    w = torch.randn(n, n, device=device)
    leaf = w.clone().requires_grad_()
    g = torch.randn(n, n, device=device)
    s = ok.octav_scale(w, BITS, dim=0)
    learned = s.clone().requires_grad_()
    lo, hi = -(2 ** (BITS - 1)), 2 ** (BITS - 1) - 1
    step = s / 2 ** (BITS - 1)  # torch's fake-quant on the same grid
    zero = torch.zeros(n, dtype=torch.int32, device=device)
    quantizer = ok.Quantizer(BITS, dim=0).train()
    quantizer(w)  # its first scale
    lsq_quantizer = ok.Quantizer(BITS, dim=0, mode="learned").train()
    lsq_quantizer(w)
    state = ok.OscillationState.start(w, s, BITS, dim=0)

    def torch_fq(x):
        return torch.fake_quantize_per_channel_affine(x, step, zero, 0, lo, hi)

    def lsq(x):
        return ok.fake_quantize_lsq(x, learned, BITS, dim=0)

    def tracked(x):
        return ok.fake_quantize_tracked(x, s, BITS, state, dim=0)

    def backward(fn, *leaves):
        def call():
            for t in (leaf, *leaves):
                t.grad = None
            fn(leaf).backward(g)
        return call

    forward = {
        "torch.fake_quantize_per_channel_affine": lambda: torch_fq(w),
        "fake_quantize": lambda: ok.fake_quantize(w, s, BITS, dim=0),
        "fake_quantize_lsq": lambda: lsq(w),
        "fake_quantize_tracked": lambda: tracked(w),
        "octav_scale (warm)": lambda: ok.octav_scale(w, BITS, dim=0, init=s),
        "masked_sums": lambda: ok.masked_sums(w, s, dim=0),
        "octav_fake_quantize (warm)": lambda: ok.octav_fake_quantize(w, BITS, dim=0, init=s),
        "Quantizer (eval)": lambda: quantizer.eval()(w),
    }
    both = {
        "torch.fake_quantize_per_channel_affine": backward(torch_fq),
        "fake_quantize (MAD)": backward(lambda x: ok.fake_quantize(x, s, BITS, dim=0)),
        "fake_quantize (PWL)": backward(lambda x: ok.fake_quantize(x, s, BITS, dim=0,
                                                                   grad="pwl")),
        "fake_quantize_lsq (MAD, scale gradient)": backward(lsq, learned),
        "fake_quantize_tracked (MAD)": backward(tracked),
        "octav_fake_quantize (warm, MAD)": backward(
            lambda x: ok.octav_fake_quantize(x, BITS, dim=0, init=s)[0]),
        "Quantizer (training, dynamic OCTAV)": backward(lambda x: quantizer.train()(x)),
        "Quantizer (training, learned scale)": backward(lambda x: lsq_quantizer.train()(x),
                                                        lsq_quantizer.scale),
    }
    return forward, both


def transformer(d: int, layers: int = 4) -> nn.Module:
    """Pre-norm transformer blocks (bench/qat_lm.py's) and a final Linear."""
    torch.manual_seed(0)
    return nn.Sequential(*[Block(d, heads=4) for _ in range(layers)], nn.Linear(d, d))


class TorchFakeQuantLinear(nn.Module):
    """The baseline QAT Linear with PyTorch's own fake-quant and max scales: weights per output
    channel, inputs per tensor, both on the signed BITS-bit grid, STE gradients."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        lo, hi = -(2 ** (BITS - 1)), 2 ** (BITS - 1) - 1
        w = self.linear.weight
        w_step = (w.detach().abs().amax(1) / hi).clamp_min(1e-12)
        wq = torch.fake_quantize_per_channel_affine(
            w, w_step, torch.zeros(w.shape[0], dtype=torch.int32, device=w.device), 0, lo, hi)
        # Tensor qparams: no host sync for the max (the overload PyTorch's FakeQuantize uses).
        x_step = (x.detach().abs().amax() / hi).clamp_min(1e-12).reshape(1)
        xq = torch.fake_quantize_per_tensor_affine(
            x, x_step, torch.zeros(1, dtype=torch.int32, device=x.device), lo, hi)
        return nn.functional.linear(xq, wq, self.linear.bias)


def torch_qat(model: nn.Module) -> nn.Module:
    for m in list(model.modules()):
        for child_name, child in list(m.named_children()):
            if type(child) is nn.Linear:
                setattr(m, child_name, TorchFakeQuantLinear(child))
    return model


def step_calls(d: int, tokens: tuple[int, int]) -> dict:
    """A training step (forward, MSE loss, backward, SGD step) of each model variant."""
    x = torch.randn(*tokens, d, generator=torch.Generator().manual_seed(1))
    target = torch.randn(*tokens, d, generator=torch.Generator().manual_seed(2))
    models = {
        "fp32": transformer(d),
        "torch fake-quant, max scales": torch_qat(transformer(d)),
        "octav_kernels, dynamic OCTAV": ok.quantize_model(transformer(d), BITS,
                                                          first_last_bits=None),
        "octav_kernels, dynamic OCTAV + refine": ok.quantize_model(
            transformer(d), BITS, first_last_bits=None, calibrator="octav:refine"),
        "octav_kernels, static scales": ok.quantize_model(transformer(d), BITS,
                                                          first_last_bits=None, mode="static"),
    }
    ok.calibrate_model(models["octav_kernels, static scales"], [x])
    try:  # torchao's QAT recipe (int8 per-token activations, int4 weights per group of 32)
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

        torchao_model = transformer(d)
        quantize_(torchao_model, QATConfig(
            activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token",
                                                     is_symmetric=False),
            weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32), step="prepare"))
        models["torchao QAT (int8 per-token act., int4 g32 weights)"] = torchao_model
    except ImportError:
        pass

    def step(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

        def call():
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), target).backward()
            optimizer.step()
        return call

    return {name: step(model.train()) for name, model in models.items()}


def table(title: str, times: dict[str, float], baseline: str, unit: str = "µs") -> list[str]:
    lines = [f"#### {title}", "", f"| call | {unit} | / {baseline} |", "|---|---:|---:|"]
    base = times[baseline]
    for name, t in times.items():
        value = f"{t / 1e3:.2f}" if unit == "ms" else f"{t:.1f}"
        lines.append(f"| {name} | {value} | {t / base:.2f} |")
    return lines + [""]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--device", default="cpu",
                        help="cpu (a 64x64 weight and the transformer step) or cuda (a "
                             "256x256 weight, 64K elements)")
    parser.add_argument("--quick", action="store_true", help="a few rounds (the tests' run)")
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else args.rounds
    per_round = 20 if args.quick else 200
    command = "python bench/bench_overhead.py" + (
        f" --device {args.device}" if args.device != "cpu" else "") + (
        f" --out {args.out}" if args.out else "")
    lines = header(command) + [""]
    n = 64 if args.device == "cpu" else 256
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    lines += [f"### Per call, {BITS}-bit per-channel fake-quant of a {n}x{n} fp32 weight on "
              f"{args.device} (min over {rounds} interleaved rounds of {per_round} calls)", ""]
    forward, both = op_calls(n, args.device)
    lines += table("forward", interleaved(forward, rounds, per_round, sync),
                   "torch.fake_quantize_per_channel_affine")
    lines += table("forward + backward", interleaved(both, rounds, per_round, sync),
                   "torch.fake_quantize_per_channel_affine")
    if args.device == "cpu":
        for d in ((128,) if args.quick else (128, 384)):
            steps = step_calls(d, (4, 64))
            times = interleaved(steps, max(2, rounds // 3), max(2, per_round // 40))
            lines += [f"### A QAT training step of a 4-block transformer, d={d}, 4x64 tokens "
                      f"(every Linear quantized at {BITS} bits: weights per channel, inputs "
                      "per tensor; SGD step included)", ""]
            lines += table(f"d={d}", times, "fp32", unit="ms")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
