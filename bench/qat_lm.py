"""QAT of a byte-level transformer language model: PTQ and QAT methods side by side.

A GPT-style byte LM (vocab 256, 4 blocks, d=128, 4 heads, context 64; token and position
embeddings stay float) is trained from scratch in fp32 on a corpus present offline on every
machine: the top-level ``*.py`` sources of this Python's standard library, sorted by name, every
10th file held out for validation. Then, for each seed, from the same fp32 model, with the same
steps and data order, every Linear (the LM head included) is quantized by

- PTQ (static scales calibrated on 8 training batches): max, percentile 99.99, the 100-point
  MSE sweep, OCTAV, OCTAV + refine;
- QAT: max + STE; dynamic OCTAV + MPH; OCTAV + MAD; learned scales (LSQ) initialized by OCTAV
  and by max; learned scales (OCTAV init) with oscillation freezing and dampening; torchao's
  QATConfig (int8 per-token activations + intN weights; intN weight-only), when installed;

at weights of 4, 3 and 2 bits per channel and per group of 32 with 8-bit inputs (per tensor for
octav_kernels, per token for torchao), and one W4A4 row. Reported: validation bits per byte
(mean ± std over seeds), the share of the max-PTQ degradation that QAT recovers
``(bpb_PTQ-max - bpb) / (bpb_PTQ-max - bpb_fp32+)`` against the fp32 model trained for the same
extra steps as QAT (``fp32+``: QAT also trains the model further), ms per training step, and
whether the converted model (``convert_model``) gives the QAT model's bits per byte.

    python bench/qat_lm.py --out bench/results/cpu_qat_lm.md    # the committed table (~20 min
                                                               # on 2 cores)
    python bench/qat_lm.py --quick                             # seconds, for tests
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import torch
from bench_octav import emit, header
from torch import nn

import octav_kernels as ok

VOCAB = 256


def corpus() -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train bytes, validation bytes, files): the stdlib's top-level .py files, sorted; every
    10th file is validation."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train = [f.read_bytes() for i, f in enumerate(files) if i % 10 != 0]
    val = [f.read_bytes() for i, f in enumerate(files) if i % 10 == 0]

    def tensor(parts):
        return torch.frombuffer(bytearray(b"\0".join(parts)), dtype=torch.uint8).long()

    return tensor(train), tensor(val), len(files)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, -1).unbind(2)
        a = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                       v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


class ByteLM(nn.Module):
    def __init__(self, d: int = 128, layers: int = 4, heads: int = 4, context: int = 64):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(VOCAB, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, VOCAB)

    def forward(self, idx):
        x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.norm(self.blocks(x)))


def windows(data: torch.Tensor, count: int, context: int, seed: int) -> torch.Tensor:
    """``count`` random windows of context + 1 bytes (deterministic in seed)."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, len(data) - context - 1, (count,), generator=gen)
    return data[start[:, None] + torch.arange(context + 1)]


def loss_of(model, w):
    logits = model(w[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), w[:, 1:].reshape(-1))


def train(model, data, steps, batch, context, lr, seed, control=None) -> float:
    """AdamW with a cosine schedule over ``steps`` batches drawn from ``seed``; returns the mean
    ms per step after 3 warm-up steps."""
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    model.train()
    times = []
    all_windows = windows(data, steps * batch, context, seed)
    for step in range(steps):
        w = all_windows[step * batch:(step + 1) * batch]
        start = time.perf_counter()
        loss = loss_of(model, w)
        if control is not None:
            loss = loss + control.dampening_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if control is not None:
            control.step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.mean(times[3:] or times)


@torch.no_grad()
def bits_per_byte(model, val_windows) -> float:
    model.eval()
    losses = [float(loss_of(model, w)) for w in val_windows.split(64)]
    return statistics.mean(losses) / math.log(2)


CONFIGS = [  # (label, weight bits, weight granularity, activation bits)
    ("W4 per channel", 4, "channel", 8), ("W4 g32", 4, 32, 8),
    ("W3 per channel", 3, "channel", 8), ("W3 g32", 3, 32, 8),
    ("W2 per channel", 2, "channel", 8), ("W2 g32", 2, 32, 8),
    ("W4A4 per channel", 4, "channel", 4),
]
PTQ = {"max": "max", "percentile 99.99": "percentile:99.99", "MSE sweep": "mse",
       "OCTAV": "octav", "OCTAV + refine": "octav:refine"}
QAT = {  # name: (quantize_model keywords, oscillation treatments)
    "max + STE": (dict(calibrator="max", grad="ste"), False),
    "OCTAV + MPH (dynamic)": (dict(grad="mph"), False),
    "OCTAV + MAD (dynamic)": (dict(grad="mad"), False),
    "LSQ, OCTAV init": (dict(mode="learned"), False),
    "LSQ, max init": (dict(mode="learned", calibrator="max"), False),
    "LSQ, OCTAV init + freezing/dampening": (dict(mode="learned"), True),
}


def quantized(model, bits, gran, act_bits, **kw):
    with warnings.catch_warnings():  # the embeddings stay float, by design here
        warnings.simplefilter("ignore")
        return ok.quantize_model(model, bits, act_bits=act_bits, weight_granularity=gran,
                                 first_last_bits=None, **kw)


def torchao_recipes(model, bits, gran, act_bits):
    """torchao's QATConfig on a copy of model: {name: prepared model} (empty without torchao)."""
    try:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    except ImportError:
        return {}
    dtype = getattr(torch, f"int{bits}")
    granularity = dict(group_size=gran) if isinstance(gran, int) else dict(
        granularity="per_channel")
    weight = IntxFakeQuantizeConfig(dtype, **granularity)
    act = IntxFakeQuantizeConfig(getattr(torch, f"int{act_bits}"), "per_token",
                                 is_symmetric=False)
    out = {}
    for name, act_config in ((f"torchao int{act_bits} per-token act. + int{bits} weights",
                              act), (f"torchao int{bits} weight-only", None)):
        if act_config is None and act_bits != 8:
            continue  # the W4A4 row is about activations
        m = copy.deepcopy(model)
        quantize_(m, QATConfig(activation_config=act_config, weight_config=weight,
                               step="prepare"))
        out[name] = m
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--qat-steps", type=int, default=70)
    parser.add_argument("--batch", type=int, default=8, help="windows of 64 bytes per step")
    parser.add_argument("--quick", action="store_true", help="tiny runs (the tests' run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.pretrain_steps, args.qat_steps = 1, 4, 3
    configs = CONFIGS[:1] + CONFIGS[-1:] if args.quick else CONFIGS
    batch, context = args.batch, 64
    train_data, val_data, n_files = corpus()
    val_windows = windows(val_data, 64 if args.quick else 256, context, seed=12345)
    calib = [windows(train_data, batch, context, 777 + k)[:, :-1] for k in range(8)]
    started = time.perf_counter()

    fp32, tuned, results, step_ms, converted_ok = [], [], {}, {}, {}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        base = ByteLM(context=context)
        step_ms.setdefault("fp32", []).append(
            train(base, train_data, args.pretrain_steps, batch, context, 3e-3, seed))
        fp32.append(bits_per_byte(base, val_windows))
        control_run = copy.deepcopy(base)  # fp32+: the QAT runs' extra steps, in fp32
        train(control_run, train_data, args.qat_steps, batch, context, 3e-4, 1000 + seed)
        tuned.append(bits_per_byte(control_run, val_windows))
        for label, bits, gran, act_bits in configs:
            print(f"seed {seed}: {label} ({(time.perf_counter() - started) / 60:.1f} min)",
                  file=sys.stderr, flush=True)
            cell = results.setdefault(label, {})
            for name, calibrator in PTQ.items():
                m = quantized(base, bits, gran, act_bits, mode="static", calibrator=calibrator)
                ok.calibrate_model(m, calib)
                cell.setdefault(f"PTQ {name}", []).append(bits_per_byte(m, val_windows))
            for name, (kw, oscillations) in QAT.items():
                torch.manual_seed(seed)
                m = quantized(base, bits, gran, act_bits, **kw)
                control = None
                if oscillations:
                    steps = args.qat_steps
                    control = ok.OscillationControl(
                        m, freeze=ok.Ramp(0.04, 0.01, start_step=steps // 4, end_step=steps),
                        dampening=ok.Ramp(0.0, 1e-4, end_step=steps))
                ms = train(m, train_data, args.qat_steps, batch, context, 3e-4, 1000 + seed,
                           control)
                step_ms.setdefault(name, []).append(ms)
                value = bits_per_byte(m, val_windows)
                cell.setdefault(name, []).append(value)
                if seed == 0:  # the deployed model (one seed: the check is the same each time)
                    deployed = ok.convert_model(m)
                    converted_ok.setdefault(name, []).append(
                        bits_per_byte(deployed, val_windows) == value)
            for name, m in torchao_recipes(base, bits, gran, act_bits).items():
                ms = train(m, train_data, args.qat_steps, batch, context, 3e-4, 1000 + seed)
                step_ms.setdefault(name, []).append(ms)
                cell.setdefault(name, []).append(bits_per_byte(m, val_windows))
    minutes = (time.perf_counter() - started) / 60

    def stat(values):
        if len(values) == 1:
            return f"{values[0]:.4f}"
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

    tuned_mean = statistics.mean(tuned)
    command = "python bench/qat_lm.py" + (" --quick" if args.quick else "") + (
        f" --out {args.out}" if args.out else "")
    lines = header(command) + [
        "",
        f"Byte-level LM (vocab 256, 4 blocks, d=128, context 64), {n_files} stdlib files "
        f"(every 10th for validation: {len(val_data):,} bytes, {len(val_windows)} windows); "
        f"fp32 {args.pretrain_steps} steps of {batch}x{context} bytes (AdamW 3e-3), QAT "
        f"{args.qat_steps} steps (AdamW 3e-4), {args.seeds} seed(s); every Linear quantized "
        f"(first_last_bits=None), embeddings float. {minutes:.1f} min in all.",
        "",
        f"fp32 validation bits per byte: {stat(fp32)} after pretraining, {stat(tuned)} after "
        f"the QAT runs' {args.qat_steps} extra steps in fp32 (fp32+); ms per fp32 step: "
        f"{statistics.mean(step_ms['fp32']):.1f}.",
        "",
        "recovered = (bpb of PTQ max - bpb) / (bpb of PTQ max - bpb of fp32+): the share of the "
        "PTQ degradation a method recovers against fp32 trained as long (negative: worse than "
        "max PTQ; above 100%: better than fp32+).",
    ]
    for label, cell in results.items():
        ptq_max = statistics.mean(cell["PTQ max"])
        lines += ["", f"### {label} (inputs {'8' if 'A4' not in label else '4'}-bit)", "",
                  "| method | bits per byte | recovered | ms / step |", "|---|---:|---:|---:|"]
        for name, values in sorted(cell.items(), key=lambda kv: statistics.mean(kv[1])):
            gap = ptq_max - tuned_mean
            recovered = (ptq_max - statistics.mean(values)) / gap if gap > 0 else float("nan")
            ms = step_ms.get(name)
            lines.append(f"| {name} | {stat(values)} | {100 * recovered:.0f}% | "
                         f"{statistics.mean(ms):.1f} |" if ms else
                         f"| {name} | {stat(values)} | {100 * recovered:.0f}% | |")
    same = {name: all(v) for name, v in converted_ok.items()}
    lines += ["", "convert_model (seed 0) gives the QAT model's bits per byte exactly: "
              + ", ".join(f"{name}: {'yes' if v else 'NO'}" for name, v in same.items()) + "."]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
