"""End-to-end QAT demo on scikit-learn's bundled 8x8 digits (no download).

A small CNN (two widths: 16, and a narrow 4 where low bit widths hurt) is trained in fp32,
then quantized at 4, 3 and 2 bits (first and last layer at 8 bits, as in the paper) by:

  QAT from the fp32 weights, dynamic scales on every step:
    (a) max scaling + STE      (b) OCTAV + PWL      (c) OCTAV + MAD      (d) OCTAV + MPH
    (g) OCTAV + MPH with weight scales weighted by the inputs' E[x^2] (weight_importance)
    (h) learned scales (LSQ) started from OCTAV and from weighted OCTAV
  PTQ without training, static scales calibrated on training batches:
    (e) static OCTAV (mean of the per-batch scales), and refined
    (g) the same with weighted weight scales
    (f) max, percentile 99.9 / 99.99 / 99.999, and the 100-point MSE sweep

over several seeds, reporting test accuracy (mean ± std), accuracy after BatchNorm
re-estimation (``reestimate_batchnorm`` on 16 training batches), CPU time per training step,
and the mean number of OCTAV iterations per scale update with the warm start (the previous
step's scale) against a cold start.

    python bench/qat_digits.py --out bench/results/cpu_qat_digits.md     # the committed table
    python bench/qat_digits.py --quick                                    # seconds, for tests
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from bench_octav import emit, header
from torch import nn

import octav_kernels as ok
from octav_kernels import reference

QAT_METHODS = {  # name: quantize_model arguments
    "(a) max + STE": dict(calibrator="max", grad="ste"),
    "(b) OCTAV + PWL": dict(calibrator="octav", grad="pwl"),
    "(c) OCTAV + MAD": dict(calibrator="octav", grad="mad"),
    "(d) OCTAV + MPH": dict(calibrator="octav", grad="mph"),
    # weight scales weighted by the layer inputs' E[x^2] (SPEC §2.1), and learned scales
    "(g) weighted OCTAV + MPH": dict(calibrator="octav", grad="mph", weight_importance="input"),
    "(h) LSQ, OCTAV init": dict(calibrator="octav", mode="learned"),
    "(h) LSQ, weighted OCTAV init": dict(calibrator="octav", mode="learned",
                                         weight_importance="input"),
}
PTQ_METHODS = {  # name: quantize_model arguments of static calibration
    "(e) static OCTAV PTQ": dict(calibrator="octav"),
    "(e) static OCTAV + refine PTQ": dict(calibrator="octav:refine"),
    "(g) weighted OCTAV PTQ": dict(calibrator="octav", weight_importance="input"),
    "(g) weighted OCTAV + refine PTQ": dict(calibrator="octav:refine",
                                            weight_importance="input"),
    "(f) max PTQ": dict(calibrator="max"),
    "(f) percentile 99.9 PTQ": dict(calibrator="percentile:99.9"),
    "(f) percentile 99.99 PTQ": dict(calibrator="percentile:99.99"),
    "(f) percentile 99.999 PTQ": dict(calibrator="percentile:99.999"),
    "(f) MSE-sweep PTQ": dict(calibrator="mse"),
}


def digits(seed: int = 0, test_fraction: float = 0.3):
    """Standardized ``[N, 1, 8, 8]`` images and labels, one fixed train/test split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return (x[train], y[train]), (x[test], y[test])


def make_model(width: int = 16) -> nn.Sequential:
    w = width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * w, 4 * w), nn.ReLU(), nn.Linear(4 * w, 10))


def batches(data, batch_size: int, seed: int | None):
    x, y = data
    order = (torch.arange(len(y)) if seed is None
             else torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)))
    return [(x[idx], y[idx]) for idx in order.split(batch_size)]


def train(model, data, epochs: int, lr: float, seed: int, batch_size: int = 64,
          counter=None) -> float:
    """Adam with a cosine learning rate; returns the mean time per step (ms), excluding the
    first 5 steps (warm-up) and the steps ``counter`` samples (its counting is not ours)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * len(batches(data, batch_size, None))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    times = []
    for epoch in range(epochs):
        for x, y in batches(data, batch_size, seed * 1000 + epoch):
            sampled = counter is not None and counter.tick()
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if not sampled:
                times.append(time.perf_counter() - start)
    return 1e3 * statistics.mean(times[5:] or times)


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    x, y = data
    return 100.0 * (model(x).argmax(1) == y).float().mean().item()


class IterationCounter:
    """Counts, on every ``period``-th step, the OCTAV iterations each quantizer's scale update
    takes warm-started from its previous scale and from a cold start (the reference
    iteration, which the kernels follow step for step on groups this small)."""

    def __init__(self, model, period: int = 10):
        self.period, self.step = period, 0
        self.counts = {"weights": {"warm": [], "cold": []},
                       "activations": {"warm": [], "cold": []}}
        self.handles = [q.register_forward_pre_hook(self.hook(name))
                        for name, q in ok.quantizers(model)]

    def tick(self) -> bool:
        """Advance to the next training step; True if it is sampled."""
        self.step += 1
        return self.step % self.period == 0

    def hook(self, name):
        role = "weights" if name.endswith("weight_quantizer") else "activations"

        def count(q, inputs):
            if self.step % self.period or not q.initialized or q.signed is None:
                return
            x = inputs[0].detach()
            args = (x, q.bits, q.signed, q.dim, q.group_size)
            for start, init in (("warm", q.scale), ("cold", None)):
                _, iters = reference.octav_scale(*args, init=init, narrow=q.narrow,
                                                 return_iterations=True)
                self.counts[role][start].extend(iters.reshape(-1).tolist())
        return count

    def means(self):
        return {role: {k: statistics.mean(v) if v else float("nan") for k, v in c.items()}
                for role, c in self.counts.items()}

    def remove(self):
        for h in self.handles:
            h.remove()


def run(width, seeds, bit_widths, fp32_epochs, qat_epochs, calib_batches, bn_batches):
    train_data, test_data = digits()
    results = {}   # (method, bits) -> list of (acc, acc after BN re-est or None, ms/step)
    fp32 = []
    iterations = {}
    for seed in seeds:
        torch.manual_seed(seed)
        base = make_model(width)
        ms = train(base, train_data, fp32_epochs, 3e-3, seed)
        fp32.append((accuracy(base, test_data), ms))
        calib = batches(train_data, 64, seed)
        for bits in bit_widths:
            for method, cfg in QAT_METHODS.items():
                torch.manual_seed(seed)
                model = ok.quantize_model(base, bits, **cfg)
                counter = IterationCounter(model) if method.startswith("(d)") else None
                ms = train(model, train_data, qat_epochs, 1e-3, seed, counter=counter)
                acc = accuracy(model, test_data)
                if counter:
                    counter.remove()
                    iterations.setdefault(bits, []).append(counter.means())
                ok.reestimate_batchnorm(model, calib, num_batches=bn_batches)
                acc_bn = accuracy(model, test_data)
                results.setdefault((method, bits), []).append((acc, acc_bn, ms))
            for method, cfg in PTQ_METHODS.items():
                model = ok.quantize_model(base, bits, mode="static", **cfg)
                ok.calibrate_model(model, calib, num_batches=calib_batches)
                acc = accuracy(model, test_data)
                ok.reestimate_batchnorm(model, calib, num_batches=bn_batches)
                results.setdefault((method, bits), []).append(
                    (acc, accuracy(model, test_data), None))
        print(f"width {width}, seed {seed} done", file=sys.stderr)
    return fp32, results, iterations


def mean_std(values) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def tables(width, fp32, results, iterations, bit_widths, seeds, args) -> list[str]:
    n = len(seeds)
    params = sum(p.numel() for p in make_model(width).parameters())
    lines = [f"## CNN of width {width} (channels {width}-{2 * width}-{4 * width}, "
             f"{params:,} parameters)", "",
             f"fp32 baseline: test accuracy {mean_std([a for a, _ in fp32])} %, "
             f"{statistics.mean(ms for _, ms in fp32):.2f} ms per training step "
             f"({args.fp32_epochs} epochs).", ""]
    lines += [f"### Test accuracy, % (mean ± std over {n} seeds; QAT {args.qat_epochs} epochs "
              f"from the fp32 weights; PTQ calibrated on {args.calib_batches} batches of 64)", ""]
    lines += ["| method | " + " | ".join(f"{b}-bit" for b in bit_widths)
              + " | " + " | ".join(f"{b}-bit + BN re-est." for b in bit_widths)
              + " | ms/step (" + ", ".join(f"{b}b" for b in bit_widths) + ") |",
              "|---|" + "---:|" * (2 * len(bit_widths) + 1)]
    for method in list(QAT_METHODS) + list(PTQ_METHODS):
        rows = [results[(method, b)] for b in bit_widths]
        acc = [mean_std([r[0] for r in rs]) for rs in rows]
        bn = [mean_std([r[1] for r in rs]) for rs in rows]
        ms = (", ".join(f"{statistics.mean(r[2] for r in rs):.1f}" for rs in rows)
              if rows[0][0][2] is not None else "—")
        lines.append(f"| {method} | " + " | ".join(acc) + " | " + " | ".join(bn)
                     + f" | {ms} |")
    lines += ["", "### OCTAV iterations per scale update during QAT (method d; mean over "
              "groups, sampled every 10th step)", "",
              "| bits | weights, warm start | weights, cold start | activations, warm start "
              "| activations, cold start |", "|---:|---:|---:|---:|---:|"]
    for bits in bit_widths:
        per_seed = iterations[bits]
        cell = {(role, start): statistics.mean(m[role][start] for m in per_seed)
                for role in ("weights", "activations") for start in ("warm", "cold")}
        lines.append(f"| {bits} | {cell['weights', 'warm']:.2f} | {cell['weights', 'cold']:.2f}"
                     f" | {cell['activations', 'warm']:.2f} | "
                     f"{cell['activations', 'cold']:.2f} |")
    return lines


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 4],
                        help="CNN widths; the narrow one is where low bit widths hurt")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--fp32-epochs", type=int, default=30)
    parser.add_argument("--qat-epochs", type=int, default=15)
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--bn-batches", type=int, default=16)
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 4 and 2 bits, 1 epoch each: checks the script runs")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.bits, args.fp32_epochs, args.qat_epochs = 1, [4, 2], 1, 1
        args.widths = [4]
    seeds = list(range(args.seeds))
    start = time.perf_counter()
    command = "python bench/qat_digits.py " + " ".join(argv if argv is not None
                                                        else sys.argv[1:])
    lines = ["# QAT demo: scikit-learn digits, small CNN, CPU", ""] + header(command.strip())
    for width in args.widths:
        fp32, results, iterations = run(width, seeds, args.bits, args.fp32_epochs,
                                        args.qat_epochs, args.calib_batches, args.bn_batches)
        lines += tables(width, fp32, results, iterations, args.bits, seeds, args) + [""]
    lines += ["", f"Total wall time: {time.perf_counter() - start:.0f} s."]
    emit(lines, args.out)
    return lines


if __name__ == "__main__":
    main()
