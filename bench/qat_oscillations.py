"""The QAT demo at 3 and 2 bits with the oscillation treatments of Nagel et al. (ICML 2022).

Same data, CNNs and fp32 starting points as ``bench/qat_digits.py`` (per-channel dynamic
OCTAV weights, MPH gradients, first and last layer at 8 bits); the weights of every quantized
layer are tracked (``OscillationControl``) and trained with:

  no treatment (tracking only) | dampening | freezing | dampening + freezing

plus the same training without tracking (its time per step is the baseline). Reported over
seeds: test accuracy (mean ± std) before and after BatchNorm re-estimation, the fraction of
oscillating weights (oscillation frequency EMA > 0.01) over training, the fraction frozen at the
end, and CPU time per training step.

    python bench/qat_oscillations.py --out bench/results/cpu_qat_oscillations.md
    python bench/qat_oscillations.py --quick             # seconds, for the tests
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from bench_octav import emit, header
from qat_digits import accuracy, batches, digits, make_model, mean_std, train
from torch import nn

import octav_kernels as ok

QAT = dict(calibrator="octav", grad="mph")
LR = 1e-3


# Defaults of --dampening (final lambda), --reduction and --freeze (threshold start, end).
DAMPENING, REDUCTION, FREEZE = 0.1, "sum", (0.04, 0.01)


def treatments(steps: int, dampening: float = DAMPENING, freeze=FREEZE) -> dict:
    """name -> OscillationControl arguments (None: no tracking). Freezing starts after the first
    third of training with a threshold annealed (cosine) from ``freeze[0]`` to ``freeze[1]``;
    dampening ramps lambda up (cosine) from 0 to ``dampening`` over training."""
    freeze = ok.Ramp(freeze[0], freeze[1], start_step=steps // 3, end_step=steps)
    dampen = ok.Ramp(0.0, dampening, end_step=steps)
    return {
        "no tracking": None,
        "no treatment (tracking only)": {},
        "dampening": dict(dampening=dampen),
        "freezing": dict(freeze=freeze),
        "dampening + freezing": dict(dampening=dampen, freeze=freeze),
    }


def train_tracked(model, data, epochs: int, seed: int, control_args: dict, reduction: str,
                  batch_size: int = 64):
    """Adam with a cosine learning rate, as qat_digits.train, plus the oscillation control:
    returns (ms per step, oscillating fraction at each epoch end, frozen fraction at the end,
    the control)."""
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    steps = epochs * len(batches(data, batch_size, None))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    control = ok.OscillationControl(model, reduction=reduction, **control_args)
    model.train()
    times, oscillating = [], []
    for epoch in range(epochs):
        for x, y in batches(data, batch_size, seed * 1000 + epoch):
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x), y) + control.dampening_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            control.step()
            times.append(time.perf_counter() - start)
        oscillating.append(_overall(control, control.oscillating_fraction()))
    frozen = _overall(control, control.frozen_fraction())
    return 1e3 * statistics.mean(times[5:] or times), oscillating, frozen


def _overall(control, fractions: dict[str, float]) -> float:
    """Element-weighted mean of per-quantizer fractions."""
    sizes = {q.name: q.osc_freq.numel() for q in control.quantizers}
    return sum(fractions[n] * sizes[n] for n in sizes) / max(1, sum(sizes.values()))


def run(width, seeds, bit_widths, args):
    fp32_epochs, qat_epochs = args.fp32_epochs, args.qat_epochs
    train_data, test_data = digits()
    steps = qat_epochs * len(batches(train_data, 64, None))
    results = {}  # (treatment, bits) -> list of dicts
    for seed in seeds:
        torch.manual_seed(seed)
        base = make_model(width)
        train(base, train_data, fp32_epochs, 3e-3, seed)
        calib = batches(train_data, 64, seed)
        for bits in bit_widths:
            for name, control_args in treatments(steps, args.dampening, args.freeze).items():
                torch.manual_seed(seed)
                model = ok.quantize_model(base, bits, **QAT)
                if control_args is None:
                    ms = train(model, train_data, qat_epochs, LR, seed)
                    osc, frozen = None, None
                else:
                    ms, osc, frozen = train_tracked(model, train_data, qat_epochs, seed,
                                                    control_args, args.reduction)
                acc = accuracy(model, test_data)
                ok.reestimate_batchnorm(model, calib, num_batches=args.bn_batches)
                results.setdefault((name, bits), []).append(
                    dict(acc=acc, acc_bn=accuracy(model, test_data), ms=ms, osc=osc,
                         frozen=frozen))
        print(f"width {width}, seed {seed} done", file=sys.stderr)
    return results


def _pct(values) -> str:
    return f"{100 * statistics.mean(values):.2f}"


def tables(width, results, bit_widths, seeds, args) -> list[str]:
    n, names = len(seeds), list(treatments(1))
    params = sum(p.numel() for p in make_model(width).parameters())
    lines = [f"## CNN of width {width} ({params:,} parameters), QAT {args.qat_epochs} epochs, "
             f"{n} seeds", "",
             "| treatment | bits | test acc. % | + BN re-est. % | oscillating % (1/3, 2/3, end "
             "of training) | frozen % at end | ms/step |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for bits in bit_widths:
        for name in names:
            rs = results[(name, bits)]
            if rs[0]["osc"] is None:
                osc = frozen = "—"
            else:
                epochs = len(rs[0]["osc"])
                marks = sorted({max(0, epochs // 3 - 1), max(0, 2 * epochs // 3 - 1), epochs - 1})
                osc = ", ".join(_pct([r["osc"][e] for r in rs]) for e in marks)
                frozen = _pct([r["frozen"] for r in rs])
            lines.append(f"| {name} | {bits} | {mean_std([r['acc'] for r in rs])} | "
                         f"{mean_std([r['acc_bn'] for r in rs])} | {osc} | {frozen} | "
                         f"{statistics.mean(r['ms'] for r in rs):.1f} |")
    return lines


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 4])
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 2])
    parser.add_argument("--fp32-epochs", type=int, default=30)
    parser.add_argument("--qat-epochs", type=int, default=15)
    parser.add_argument("--bn-batches", type=int, default=16)
    parser.add_argument("--dampening", type=float, default=DAMPENING, help="final lambda")
    parser.add_argument("--reduction", default=REDUCTION, choices=ok.oscillation.REDUCTIONS)
    parser.add_argument("--freeze", type=float, nargs=2, default=FREEZE,
                        help="freezing threshold at the start and at the end of its ramp")
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 2 bits, width 4, 1 epoch each: checks the script runs")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.bits, args.widths, args.fp32_epochs, args.qat_epochs = 1, [2], [4], 1, 3
    seeds = list(range(args.seeds))
    start = time.perf_counter()
    command = "python bench/qat_oscillations.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    lines = ["# QAT demo with oscillation treatments: scikit-learn digits, CPU", ""]
    lines += header(command.strip())
    lines += [f"Dampening: lambda cosine-ramped 0 -> {args.dampening} over training, reduction "
              f"'{args.reduction}'. Freezing: off for the first third, then a threshold "
              f"cosine-annealed {args.freeze[0]} -> {args.freeze[1]}. Momentum 0.01. Adam, lr "
              f"{LR} cosine; first/last layer 8 bits; per-channel dynamic OCTAV weights, MPH "
              "gradients. Oscillating: not frozen and frequency EMA > 0.01.", ""]
    for width in args.widths:
        results = run(width, seeds, args.bits, args)
        lines += tables(width, results, args.bits, seeds, args) + [""]
    lines += [f"Total wall time: {time.perf_counter() - start:.0f} s."]
    emit(lines, args.out)
    return lines


if __name__ == "__main__":
    main()
