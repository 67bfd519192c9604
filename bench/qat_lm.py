"""QAT of a byte-level transformer language model: PTQ and QAT methods side by side.

A GPT-style byte LM (vocab 256, 4 blocks, d=128, 4 heads, context 64; token and position
embeddings stay float) is trained from scratch in fp32 on a corpus present offline on every
machine: the top-level ``*.py`` sources of this Python's standard library, sorted by name, every
10th file held out for validation. Each seed pretrains its own fp32 model until the validation
bits per byte plateau (rounds of ``--round-steps`` at a constant learning rate, stopped when a
round gains less than ``--plateau`` bpb or at ``--max-pretrain-steps``, then a linear cooldown;
see ``pretrain``), cached under ``--cache-dir`` so that reruns skip it. Then, for each seed,
from that seed's fp32 model, with the same steps and data order, every Linear (the LM head
included) is quantized by

- PTQ (static scales calibrated on 8 training batches): max, percentile 99.99, the 100-point
  MSE sweep, OCTAV, OCTAV + refine, and the last three with weight scales weighted by the
  inputs' ``E[x^2]`` (``weight_importance="input"``, SPEC §2.1);
- QAT: max + STE; dynamic OCTAV + MPH, also weighted; OCTAV + MAD; learned scales (LSQ)
  initialized by OCTAV, by weighted OCTAV and by max; learned scales (OCTAV init) with
  oscillation freezing and dampening; torchao's QATConfig (int8 per-token activations + intN
  weights; intN weight-only), when installed;

at weights of 4, 3 and 2 bits per channel and per group of 32 with 8-bit inputs (per tensor for
octav_kernels, per token for torchao), and one W4A4 row. Reported: validation bits per byte
(mean ± std over seeds), the share of the max-PTQ degradation that QAT recovers
``(bpb_PTQ-max - bpb) / (bpb_PTQ-max - bpb_fp32+)`` against the fp32 model trained for the same
extra steps as QAT (``fp32+``: QAT also trains the model further), ms per training step, and
whether the converted model (``convert_model``) gives the QAT model's bits per byte.

    python bench/qat_lm.py --out bench/results/cpu_qat_lm.md    # the committed table (~20 min
                                                               # on 2 cores, plus pretraining
                                                               # when not cached)
    python bench/qat_lm.py --pretrain-only                     # pretrain (or load) and print
                                                               # the curves (~4-6 min per 10k
                                                               # steps per seed on 2 cores)
    python bench/qat_lm.py --quick                             # seconds, for tests (no cache)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import statistics
import sys
import sysconfig
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_octav import emit, header
from torch import nn

import octav_kernels as ok

VOCAB = 256
MODEL = dict(d=128, layers=4, heads=4)  # ByteLM's dimensions (the context is main's)
PRETRAIN_LR = 3e-3
# Bump when the pretraining code changes what it produces: old cache entries stop matching.
PRETRAIN_VERSION = 1
ROOT = Path(__file__).resolve().parent.parent


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


def windows(data: torch.Tensor, count: int, context: int,
            seed: int | torch.Generator) -> torch.Tensor:
    """``count`` random windows of context + 1 bytes (deterministic in seed, or drawn from the
    generator ``seed``)."""
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
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


def pretrain(model, data, val_windows, batch, context, lr, seed, round_steps, plateau,
             max_steps, cooldown_steps, label="") -> dict:
    """Pretrain ``model`` until the validation bits per byte plateau; returns the record
    {curve, stop, ms_per_step, seconds} (curve: [{steps, bpb, seconds, phase}], from step 0).

    The schedule is warmup-free "warmup-stable-decay": AdamW at the constant ``lr`` in rounds of
    ``round_steps``, the validation bpb after each; the constant phase stops after the first
    round that gains less than ``plateau`` bpb (or when another round and the cooldown would pass
    ``max_steps``), then ``cooldown_steps`` decay the rate linearly to ~0 and a last evaluation
    closes the curve. A constant rate makes "gained less than ``plateau`` in a round" a statement
    about the model, not about the schedule (a cosine over the cap would shrink the rate, and so
    the gains, whatever the model; stopping one halfway would leave a model neither annealed
    nor at its plateau), and the cooldown then settles the plateaued weights in the minimum the
    constant rate was bouncing around, as an annealed schedule of that length would (Hägele et
    al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations").
    The batches come from one generator seeded by ``seed``, round after round."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    started, times, steps = time.perf_counter(), [], 0
    curve = [dict(steps=0, bpb=bits_per_byte(model, val_windows), seconds=0.0, phase="init")]

    def run(n, rate, phase):
        nonlocal steps
        model.train()
        all_windows = windows(data, n * batch, context, gen)
        for i in range(n):
            for group in opt.param_groups:
                group["lr"] = rate(i)
            start = time.perf_counter()
            loss = loss_of(model, all_windows[i * batch:(i + 1) * batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
        steps += n
        curve.append(dict(steps=steps, bpb=bits_per_byte(model, val_windows),
                          seconds=time.perf_counter() - started, phase=phase))
        print(f"{label}pretraining: {steps} steps ({phase}), validation bpb "
              f"{curve[-1]['bpb']:.4f} ({curve[-1]['seconds'] / 60:.1f} min)", file=sys.stderr,
              flush=True)

    stop = "cap"
    while steps + round_steps + cooldown_steps <= max_steps:
        run(round_steps, lambda i: lr, "constant")
        if curve[-2]["bpb"] - curve[-1]["bpb"] < plateau:
            stop = "plateau"
            break
    if cooldown_steps > 0:
        run(cooldown_steps, lambda i: lr * (1 - i / cooldown_steps), "cooldown")
    return dict(curve=curve, stop=stop, ms_per_step=1e3 * statistics.mean(times[3:] or times),
                seconds=time.perf_counter() - started)


def pretrain_fixed(model, data, val_windows, batch, context, lr, seed, steps) -> dict:
    """``--pretrain-steps``: exactly ``steps`` steps, cosine schedule (no plateau rule); the
    record of ``pretrain``."""
    started = time.perf_counter()
    curve = [dict(steps=0, bpb=bits_per_byte(model, val_windows), seconds=0.0, phase="init")]
    ms = train(model, data, steps, batch, context, lr, seed)
    curve.append(dict(steps=steps, bpb=bits_per_byte(model, val_windows),
                      seconds=time.perf_counter() - started, phase="cosine"))
    return dict(curve=curve, stop="fixed", ms_per_step=ms, seconds=curve[-1]["seconds"])


def default_cache_dir() -> Path:
    """``$OCTAV_CACHE/qat_lm``, else ``$XDG_CACHE_HOME/octav_kernels/qat_lm``, else
    ``~/.cache/octav_kernels/qat_lm``."""
    if os.environ.get("OCTAV_CACHE"):
        return Path(os.environ["OCTAV_CACHE"]).expanduser() / "qat_lm"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "octav_kernels" / "qat_lm"


def cache_path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"seed{key['seed']}-{digest}.pt"


def cache_load(path: Path, key: dict, model) -> dict | None:
    """The record cached at ``path`` for ``key``, its weights loaded into model; None if absent,
    unreadable or for another key."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        if saved["key"] != key:
            raise ValueError("the cached configuration differs")
        model.load_state_dict(saved["state_dict"])
    except Exception as e:  # a stale or broken entry: pretrain again, overwrite it
        print(f"ignoring the cache entry {path}: {e}", file=sys.stderr)
        return None
    return saved["record"]


def cache_save(path: Path, key: dict, model, record: dict) -> None:
    """Write atomically (a temporary file in the same directory, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(dict(key=key, state_dict=model.state_dict(), record=record), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def corpus_fingerprint(train_data, val_data, n_files) -> dict:
    digest = hashlib.sha256()
    for part in (train_data, val_data):
        digest.update(part.to(torch.uint8).numpy().tobytes())
    return dict(files=n_files, train_bytes=len(train_data), val_bytes=len(val_data),
                sha256=digest.hexdigest()[:16])


def curve_text(record, batch, context, train_bytes) -> str:
    """"0 -> 8.05, 1000 -> 2.71, ..., 7000 -> 1.90 (cooldown)" and the epochs it saw."""
    points = ", ".join(f"{p['steps']} → {p['bpb']:.3f}" + (" (cooldown)" if p["phase"] ==
                                                            "cooldown" else "")
                       for p in record["curve"])
    steps = record["curve"][-1]["steps"]
    return f"{points}; {steps * batch * context / train_bytes:.2f} epochs"


CONFIGS = [  # (label, weight bits, weight granularity, activation bits)
    ("W4 per channel", 4, "channel", 8), ("W4 g32", 4, 32, 8),
    ("W3 per channel", 3, "channel", 8), ("W3 g32", 3, 32, 8),
    ("W2 per channel", 2, "channel", 8), ("W2 g32", 2, 32, 8),
    ("W4A4 per channel", 4, "channel", 4),
]
PTQ = {  # name: quantize_model keywords of static calibration
    "max": dict(calibrator="max"), "percentile 99.99": dict(calibrator="percentile:99.99"),
    "MSE sweep": dict(calibrator="mse"), "OCTAV": dict(calibrator="octav"),
    "OCTAV + refine": dict(calibrator="octav:refine"),
    # weight scales weighted by the layer inputs' E[x^2] (SPEC §2.1)
    "weighted OCTAV": dict(calibrator="octav", weight_importance="input"),
    "weighted OCTAV + refine": dict(calibrator="octav:refine", weight_importance="input"),
    "weighted MSE sweep": dict(calibrator="mse", weight_importance="input"),
}
QAT = {  # name: (quantize_model keywords, oscillation treatments)
    "max + STE": (dict(calibrator="max", grad="ste"), False),
    "OCTAV + MPH (dynamic)": (dict(grad="mph"), False),
    "OCTAV + MAD (dynamic)": (dict(grad="mad"), False),
    "LSQ, OCTAV init": (dict(mode="learned"), False),
    "LSQ, max init": (dict(mode="learned", calibrator="max"), False),
    "LSQ, OCTAV init + freezing/dampening": (dict(mode="learned"), True),
    "weighted OCTAV + MPH (dynamic)": (dict(grad="mph", weight_importance="input"), False),
    "LSQ, weighted OCTAV init": (dict(mode="learned", weight_importance="input"), False),
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


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (also what ``bench/bench_deploy.py`` passes to get the same models)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--seeds", type=int, default=3,
                        help="seeds; each pretrains (or loads) its own fp32 model")
    parser.add_argument("--round-steps", type=int, default=1000,
                        help="pretraining steps between two validation evaluations (default "
                        "1000)")
    parser.add_argument("--plateau", type=float, default=0.01,
                        help="stop the constant-rate pretraining after the first round that "
                        "lowers the validation bits per byte by less than this (default 0.01)")
    parser.add_argument("--max-pretrain-steps", type=int, default=20000,
                        help="cap on the pretraining steps, cooldown included (default 20000)")
    parser.add_argument("--cooldown-steps", type=int, default=1000,
                        help="steps of linear learning-rate decay after the plateau (default "
                        "1000)")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="instead of the plateau rule: exactly this many pretraining "
                        "steps, cosine schedule (the script's former fixed-length run)")
    parser.add_argument("--qat-steps", type=int, default=70)
    parser.add_argument("--batch", type=int, default=8, help="windows of 64 bytes per step")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="pretrained checkpoints (weights + curve), keyed by the "
                        "configuration; default $OCTAV_CACHE/qat_lm, else "
                        "$XDG_CACHE_HOME/octav_kernels/qat_lm, else "
                        "~/.cache/octav_kernels/qat_lm (never inside the repository)")
    parser.add_argument("--no-cache", action="store_true",
                        help="neither read nor write the pretraining cache")
    parser.add_argument("--pretrain-only", action="store_true",
                        help="pretrain (or load) the fp32 models, print their curves, exit")
    parser.add_argument("--quick", action="store_true",
                        help="tiny runs (the tests' run); no cache unless --cache-dir is given")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.qat_steps = 1, 3
        args.round_steps, args.cooldown_steps, args.max_pretrain_steps = 2, 2, 6
        if args.pretrain_steps is not None:
            args.pretrain_steps = min(args.pretrain_steps, 4)
    args.use_cache = not args.no_cache and not (args.quick and args.cache_dir is None)
    args.cache_dir = (args.cache_dir or default_cache_dir()).expanduser().resolve()
    if args.use_cache and args.cache_dir.is_relative_to(ROOT):
        parser.error(f"--cache-dir {args.cache_dir} is inside the repository {ROOT}")
    return args


@dataclass
class Pretrained:
    """The fp32 models of a run (one per seed), their data and how they were made."""

    bases: list
    records: list
    sources: list
    rule_text: str
    train_data: torch.Tensor
    val_data: torch.Tensor
    n_files: int
    val_windows: torch.Tensor


def pretrained(args) -> Pretrained:
    """One fp32 ByteLM per seed, pretrained by ``args``' rule or loaded from the cache."""
    batch, context = args.batch, 64
    train_data, val_data, n_files = corpus()
    val_windows = windows(val_data, 64 if args.quick else 256, context, seed=12345)
    if args.pretrain_steps is not None:
        rule = dict(schedule="cosine", steps=args.pretrain_steps)
        rule_text = f"exactly {args.pretrain_steps} steps, cosine schedule (--pretrain-steps)"
    else:
        rule = dict(schedule="constant rounds + linear cooldown", round_steps=args.round_steps,
                    plateau=args.plateau, max_steps=args.max_pretrain_steps,
                    cooldown_steps=args.cooldown_steps)
        rule_text = (f"constant rate in rounds of {args.round_steps} steps until a round gains "
                     f"< {args.plateau} bpb (cap {args.max_pretrain_steps} steps), then "
                     f"{args.cooldown_steps} steps of linear decay")
    key_base = dict(version=PRETRAIN_VERSION, model=dict(MODEL, vocab=VOCAB, context=context),
                    batch=batch, lr=PRETRAIN_LR, optimizer="AdamW, weight decay 0", rule=rule,
                    val_windows=[len(val_windows), 12345], torch=str(torch.__version__),
                    corpus=corpus_fingerprint(train_data, val_data, n_files))

    bases, records, sources = [], [], []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        base = ByteLM(**MODEL, context=context)
        key = dict(key_base, seed=seed)
        path = cache_path(args.cache_dir, key) if args.use_cache else None
        record = cache_load(path, key, base) if args.use_cache else None
        shown = str(path).replace(str(Path.home()), "~", 1) if path else None
        if record is not None:
            sources.append(f"seed {seed}: loaded from the cache ({shown}; pretraining had "
                           f"taken {record['seconds'] / 60:.1f} min)")
        else:
            if args.pretrain_steps is not None:
                record = pretrain_fixed(base, train_data, val_windows, batch, context,
                                        PRETRAIN_LR, seed, args.pretrain_steps)
            else:
                record = pretrain(base, train_data, val_windows, batch, context, PRETRAIN_LR,
                                  seed, args.round_steps, args.plateau, args.max_pretrain_steps,
                                  args.cooldown_steps, label=f"seed {seed}: ")
            if args.use_cache:
                cache_save(path, key, base, record)
            sources.append(f"seed {seed}: pretrained in this run, {record['seconds'] / 60:.1f} "
                           f"min" + (f" (saved to the cache: {shown})" if args.use_cache else
                                     " (cache off)"))
        print(sources[-1], file=sys.stderr, flush=True)
        bases.append(base)
        records.append(record)
    return Pretrained(bases, records, sources, rule_text, train_data, val_data, n_files,
                      val_windows)


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    run = pretrained(args)
    bases, records, sources, rule_text = run.bases, run.records, run.sources, run.rule_text
    train_data, val_data, n_files, val_windows = (run.train_data, run.val_data, run.n_files,
                                                  run.val_windows)
    configs = CONFIGS[:1] + CONFIGS[-1:] if args.quick else CONFIGS
    batch, context = args.batch, 64
    calib = [windows(train_data, batch, context, 777 + k)[:, :-1] for k in range(8)]
    curves = [f"seed {seed}: " + curve_text(r, batch, context, len(train_data))
              + ("" if r["stop"] != "cap" else " (stopped at the cap, not at a plateau)")
              for seed, r in enumerate(records)]
    if args.pretrain_only:
        print(f"fp32 pretraining ({rule_text}; {batch}x{context} bytes per step, AdamW "
              f"{PRETRAIN_LR}; {len(train_data):,} training bytes), steps → validation bits "
              "per byte:")
        for seed, (line, source) in enumerate(zip(curves, sources)):
            print(f"  {line}\n    {records[seed]['ms_per_step']:.1f} ms/step; {source}\n"
                  "    | steps | phase | validation bpb | min |")
            for p in records[seed]["curve"]:
                print(f"    | {p['steps']} | {p['phase']} | {p['bpb']:.4f} | "
                      f"{p['seconds'] / 60:.1f} |")
        return

    fp32, tuned, results, step_ms, converted_ok = [], [], {}, {}, {}
    for seed, base in enumerate(bases):
        step_ms.setdefault("fp32", []).append(records[seed]["ms_per_step"])
        fp32.append(bits_per_byte(base, val_windows))
        control_run = copy.deepcopy(base)  # fp32+: the QAT runs' extra steps, in fp32
        train(control_run, train_data, args.qat_steps, batch, context, 3e-4, 1000 + seed)
        tuned.append(bits_per_byte(control_run, val_windows))
        for label, bits, gran, act_bits in configs:
            print(f"seed {seed}: {label} ({(time.perf_counter() - started) / 60:.1f} min)",
                  file=sys.stderr, flush=True)
            cell = results.setdefault(label, {})
            for name, kw in PTQ.items():
                m = quantized(base, bits, gran, act_bits, mode="static", **kw)
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
    command = " ".join(["python bench/qat_lm.py", *(sys.argv[1:] if argv is None else argv)])
    lines = header(command) + [
        "",
        f"Byte-level LM (vocab 256, {MODEL['layers']} blocks, d={MODEL['d']}, context "
        f"{context}), {n_files} stdlib files (every 10th for validation: {len(val_data):,} "
        f"bytes, {len(val_windows)} windows; training: {len(train_data):,} bytes); fp32 "
        f"pretraining, one model per seed: {rule_text}, {batch}x{context} bytes per step "
        f"(AdamW {PRETRAIN_LR}); QAT {args.qat_steps} steps (AdamW 3e-4), {args.seeds} seed(s); "
        f"every Linear quantized (first_last_bits=None), embeddings float. {minutes:.1f} min "
        "in all (pretraining included where it ran in this run).",
        "",
        "fp32 pretraining curves (steps → validation bits per byte; epochs: bytes seen / "
        "training bytes):",
        "",
        *[f"- {line}" for line in curves],
        "",
        "Pretrained checkpoints:",
        "",
        *[f"- {source}" for source in sources],
        "",
        f"fp32 validation bits per byte: {stat(fp32)} after pretraining, {stat(tuned)} after "
        f"the QAT runs' {args.qat_steps} extra steps in fp32 (fp32+); ms per fp32 step: "
        f"{statistics.mean(step_ms['fp32']):.1f} (measured while pretraining).",
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
