"""QAT under FSDP2 on the CPU (gloo): a runnable example, and what each mode costs.

    python bench/fsdp_qat.py [--ranks 2] [--steps 8] [--out bench/results/cpu_fsdp_qat.md]

An MLP of ``--blocks`` blocks (Linear d -> 4d, GELU, Linear 4d -> d, d = ``--width``) is
quantized (``quantize_model``, 4-bit weights per channel and inputs per tensor), its learned
scales set (``calibrate_model``), sharded (``fully_shard`` per quantized layer and at the
root) and trained with SGD on ``--ranks`` processes, each with its share of every batch. The
same model is trained by one process on the whole batches. Per mode the table gives: the
largest difference of any weight or scale from the one-process run after ``--steps`` steps;
the bytes each rank keeps (Parameters' local shards and buffers, oscillation state apart);
the collectives per training step by kind (counted by wrapping ``torch.distributed``; FSDP2's
own all-gathers and reduce-scatters included); the median time per step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_octav import emit, header  # noqa: E402

import octav_kernels as ok  # noqa: E402

MODES = {  # name: (quantize_model keywords, oscillation tracking, bfloat16 Parameters)
    "dynamic OCTAV": (dict(mode="dynamic"), False, False),
    "static (calibrated)": (dict(mode="static"), False, False),
    "learned (LSQ)": (dict(mode="learned"), False, False),
    "learned, bf16 params": (dict(mode="learned"), False, True),
    "dynamic + tracking/freezing": (dict(mode="dynamic"), True, False),
}
COLLECTIVES = tuple(name for name in (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
    "reduce_scatter_tensor", "reduce_scatter_single", "broadcast") if hasattr(dist, name))


def payload(args, kwargs) -> int:
    """The bytes a collective moves for this rank: its largest tensor argument (a gathered
    output, a reduce-scatter's input, an all-reduced tensor; a list counts as its sum)."""
    sizes = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            sizes.append(a.nbytes)
        elif isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            sizes.append(sum(t.nbytes for t in a))
    return max(sizes, default=0)


def build(args, mode: str, process_group):
    torch.manual_seed(0)
    blocks = []
    for _ in range(args.blocks):
        blocks += [torch.nn.Linear(args.width, 4 * args.width), torch.nn.GELU(),
                   torch.nn.Linear(4 * args.width, args.width)]
    net = torch.nn.Sequential(*blocks)
    return ok.quantize_model(net, bits=4, first_last_bits=None, act_signed=True,
                             process_group=process_group, **MODES[mode][0])


def batches(args):
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(args.width, args.width, generator=gen) / args.width ** 0.5
    for _ in range(args.steps + 1):  # (the first one calibrates)
        x = torch.randn(args.batch, args.width, generator=gen)
        yield x, torch.tanh(x @ teacher)


def train(model, control, data, steps_timed: list | None = None):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in data:
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if control is not None:
            loss = loss + control.dampening_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if control is not None:
            control.step()
        if steps_timed is not None:
            steps_timed.append(time.perf_counter() - start)


def run_mode(args, mode: str, process_group, share):
    """Quantize, calibrate, (shard,) train: the trained model's full state dict and stats."""
    _, tracked, bf16 = MODES[mode]
    data = [(x[share], y[share]) for x, y in batches(args)]
    model = build(args, mode, process_group)
    ok.calibrate_model(model, [data[0][0]])  # static and learned scales (over all ranks)
    sharded = process_group is not None
    if sharded:
        if bf16:
            ok.shard_quantizers(model)  # learned scales stay float32
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if bf16 else MixedPrecisionPolicy())
        for m in model:
            if isinstance(m, ok.QuantLinear):
                fully_shard(m, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    control = (ok.OscillationControl(model, momentum=0.1, freeze=0.05, dampening=1e-4)
               if tracked else None)
    train(model, control, data[1:2])  # a warm-up step, not counted
    calls, moved = Counter(), Counter()
    timed: list[float] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name):
        def call(*a, **k):
            calls[name] += 1
            moved[name] += payload(a, k)
            return originals[name](*a, **k)
        return call

    for name in COLLECTIVES:
        setattr(dist, name, counting(name))
    try:
        train(model, control, data[2:], timed)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    if sharded:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                      cpu_offload=True))
    else:
        state = model.state_dict()
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    params = sum(local(p).nbytes for p in model.parameters())
    osc = sum(local(b).nbytes for n, b in model.named_buffers()
              if ".osc_" in n and not n.endswith("osc_threshold"))
    other = sum(local(b).nbytes for n, b in model.named_buffers() if ".osc_" not in n)
    steps = max(1, len(timed))
    frozen = sum(control.frozen_fraction().values()) if control is not None else 0.0
    return {"state": {k: v for k, v in state.items() if isinstance(v, torch.Tensor)},
            "params": params, "osc": osc, "buffers": other, "frozen": frozen,
            "calls": {k: (v / steps, moved[k] / steps) for k, v in calls.items()},
            "ms": 1e3 * sorted(timed)[len(timed) // 2] if timed else float("nan")}


def _worker(rank, args, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=args.ranks)
    torch.set_num_threads(1)
    per = args.batch // args.ranks
    share = slice(rank * per, (rank + 1) * per)
    results = {mode: run_mode(args, mode, "world", share) for mode in MODES}
    torch.save(results, os.path.join(out, f"{rank}.pt"))
    dist.barrier()
    os._exit(0)  # (torch 2.13's gloo teardown can abort; see tests/test_distributed.py)


def largest_difference(got: dict, want: dict) -> float:
    return max(float((got[k].float().reshape(want[k].shape) - want[k].float()).abs().max())
               for k in want if isinstance(want[k], torch.Tensor)
               and want[k].is_floating_point() and want[k].numel() > 0)


def kib(n: float) -> str:
    return f"{n / 1024:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    if args.batch % args.ranks:
        parser.error("--batch must divide evenly over --ranks (equal per-rank batches)")
    torch.set_num_threads(1)
    one = {mode: run_mode(args, mode, None, slice(None)) for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args, os.path.join(tmp, "store"), tmp), nprocs=args.ranks,
                 join=True)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=False)
                 for r in range(args.ranks)]
    weights = sum(v.numel() for k, v in one["dynamic OCTAV"]["state"].items()
                  if k.endswith(".weight"))
    lines = [f"### {args.blocks} MLP blocks, d={args.width} ({weights} weights), W4 per channel "
             f"/ A4 per tensor, batch {args.batch} over {args.ranks} ranks, {args.steps} SGD "
             "steps; 1 thread per process", "",
             "| mode | max abs diff from one process | frozen (FSDP / one process) | rank 0 "
             "KiB: params / buffers / oscillation state | one process KiB: same | collectives "
             "per step, rank 0: count (bytes) "
             "| ms per step (rank 0) | ms per step, one process |",
             "|---|---:|---:|---|---|---|---:|---:|"]
    for mode in MODES:
        r0, ref = ranks[0][mode], one[mode]
        diff = largest_difference(r0["state"], ref["state"])
        calls = ", ".join(f"{k} {n:.3g} ({kib(b)} KiB)"
                          for k, (n, b) in sorted(r0["calls"].items()))
        lines.append(f"| {mode} | {diff:.2e} | {r0['frozen']:.4f} / {ref['frozen']:.4f} | "
                     f"{kib(r0['params'])} / "
                     f"{kib(r0['buffers'])} / {kib(r0['osc'])} | {kib(ref['params'])} / "
                     f"{kib(ref['buffers'])} / {kib(ref['osc'])} | {calls} | {r0['ms']:.1f} "
                     f"| {ref['ms']:.1f} |")
    lines += ["", "Buffers: dynamic and static scales (replicated, a few bytes per channel); "
              "oscillation state: 11 bytes per weight of the rank's rows (sharded like the "
              "weight). `frozen`: the sum over layers of the frozen fraction, equal in both "
              "runs where the difference is 0 up to rounding. bf16 params: FSDP2's bfloat16 "
              "forward against the float32 one-process run, so its difference is bfloat16's."]
    emit(["# QAT under FSDP2 (CPU, gloo)", ""] + header(
        "python bench/fsdp_qat.py " + " ".join(sys.argv[1:])) + lines, args.out)


if __name__ == "__main__":
    main()
