"""OCTAV fake quantization on the GPU, in GB/s: our kernels side by side with PyTorch's fake quant,
a naive PyTorch OCTAV loop (eager and torch.compile) and a plain copy, forward and backward.

    python bench/bench_gpu.py [--device cuda|cpu] [--quick] [--dtypes float32,bfloat16]
        [--backends triton,cuda] [--repeats 20] [--commit SHA]
        [--out bench/results/gpu_bench.md] [--plot bench/results/gpu_bandwidth.png]

Cases, 4-bit signed: per tensor on flat tensors of 64K, 256K, 1M, 4M, 16M, 64M and 256M
elements; per channel (dim=0) on 4096x4096, 11008x4096, 4096x11008 and a 256x256x3x3 conv
weight; float32 and bfloat16. The data (Gaussian with log-normal magnitudes: heavy tails, like
weights) is generated on the device. ``--quick`` runs 64K elements per tensor and 64x256 per
channel in one dtype with 3 repeats; ``--device cpu --quick`` checks the script in seconds on a
machine without a GPU, with the C++ kernels (backend ``cpu``).

Providers, all timed on the same tensor in one run; ``[b]`` is one row per backend ``b``
(default: those of ``triton`` and ``cuda`` that are available; ``cpu`` with ``--device cpu``):
- ``octav_fake_quantize[b]``: ``ok.octav_fake_quantize(x, 4, dim=dim)``, cold start;
- ``octav_fake_quantize warm[b]``: the same with ``init`` = the scale the previous call
  returned, as a QAT step does (the data does not change here, so this is the best case);
- ``fake_quantize fixed[b]``: ``ok.fake_quantize(x, s, 4, dim=dim)`` with a precomputed scale;
- ``MAD backward[b]``, ``PWL backward[b]``: ``torch.ops.octav.fake_quantize_backward`` (grad_x
  from a fixed grad and x);
- ``LSQ backward[b]``: ``torch.ops.octav.fake_quantize_lsq_backward`` (grad_x with MAD and the
  learned scale's gradient, reduced per group in the same pass);
- ``octav_fake_quantize fwd+bwd MAD[b]``: ``y, _ = ok.octav_fake_quantize(x, 4, dim=dim)`` and
  ``y.backward(g)`` through autograd;
- ``torch fake_quant``: ``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine`` with
  the same scale (step = s / 8, zero point 0, levels -8..7);
- ``naive torch OCTAV (10 it) + torch fq``: ``bench_octav.torch_naive_loop`` (from the mean |x|,
  here the mean of the nonzero |x| as the data has no zeros, 10 iterations of abs / compare / sum
  as tensor ops) and PyTorch's fake quant with the scale it finds;
- ``torch.compile(naive loop)``: the same function through ``torch.compile``, compiled once per
  case before timing (skipped with ``--quick`` on CPU, where compiling outlasts the whole run);
- ``copy (D2D)``: ``dst.copy_(x)``, the bandwidth ceiling.

Columns: ``time`` of one call, the median of ``--repeats`` timed runs after a warm-up (CUDA events;
a run of a call under 1 ms loops over several calls, back to back so that host launch overhead
counts as in eager use, and is divided by their number; a provider whose runs would take over 3 s in
all gets fewer, at least 3); ``GB/s``, the minimal traffic over that time: forward 2 x bytes(x)
(read x, write y), backward 3 x (read grad and x, write grad_x), forward + backward 5 x, copy 2 x
(read, write); ``% copy``, that bandwidth over the copy's at the same size and dtype in the same
run. Tensors smaller than the L2 cache (50 MB on an H100) stay in it between calls, so their GB/s
can exceed the HBM's.
"n/a (why)": PyTorch lacks the dtype, compiling failed, or the tensors do not fit.

The targets table judges the ratios of issue 9 per backend on the cases of at least 16M elements
(with ``--quick``: the largest case of each granularity) and shows the worst case. The LSQ table
(issue 29) times ``fake_quantize_lsq`` forward + backward against ``fake_quantize``'s on a
4096x4096 weight at g32, g128 and per channel, in the first dtype; the few-groups table times
``octav_scale`` of ``[4, 4M]`` per channel against per tensor on the same 16M elements.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import math
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from bench_octav import cpu_name, emit, median_ms, torch_naive_loop

import octav_kernels as ok
from octav_kernels import backend

BITS = 4
HALF = 2 ** (BITS - 1)  # signed 4-bit levels -8..7, step = s / 8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PER_TENSOR_SIZES = [2**k for k in range(16, 29, 2)]  # 64K .. 256M elements
PER_CHANNEL_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (256, 256, 3, 3)]
QUICK_SIZE, QUICK_SHAPE = 2**16, (64, 256)
BIG = 2**24  # the targets are judged on cases of at least 16M elements
MIN_RUN_MS = 1.0  # a timed CUDA run loops over calls until it lasts about this long
MAX_LOOP = 100
BUDGET_MS = 3000.0  # CUDA: fewer timed runs (at least MIN_RUNS) for calls slower than this
MIN_RUNS = 3

NAIVE = "naive torch OCTAV (10 it) + torch fq"
COMPILED = "torch.compile(naive loop)"
COPY = "copy (D2D)"


class Case(NamedTuple):
    gran: str  # "per-tensor" or "per-channel"
    shape: tuple[int, ...]
    dim: int | None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def label(self) -> str:
        if self.gran == "per-channel":
            return "x".join(map(str, self.shape))
        n = self.numel
        return f"{n >> 20}M" if n >= 2**20 else f"{n >> 10}K"


class Provider(NamedTuple):
    fn: Callable[[], object] | None  # None: skipped (torch.compile with --quick on CPU)
    traffic: int  # minimal bytes moved by one call, in units of bytes(x)
    backend: str | None  # the octav backend that serves it (ok.use_backend), None for torch


class Row(NamedTuple):
    case: Case
    dtype: str
    provider: str
    nbytes: int  # minimal traffic of one call
    ms: float | None  # None: not measured, see note
    note: str = ""

    @property
    def gbps(self) -> float | None:
        return None if self.ms is None else self.nbytes / self.ms / 1e6


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case("per-tensor", (QUICK_SIZE,), None), Case("per-channel", QUICK_SHAPE, 0)]
    return ([Case("per-tensor", (n,), None) for n in PER_TENSOR_SIZES]
            + [Case("per-channel", shape, 0) for shape in PER_CHANNEL_SHAPES])


def make_data(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, g): heavy-tailed data (Gaussian times log-normal) and a Gaussian incoming gradient."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=gen, device=device)
    x *= torch.randn(shape, generator=gen, device=device).mul_(0.5).exp_()
    return x.to(dtype), torch.randn(shape, generator=gen, device=device, dtype=dtype)


def torch_fake_quant(x: torch.Tensor, step: torch.Tensor, zero: torch.Tensor,
                     dim: int | None) -> torch.Tensor:
    """PyTorch's fake quant on our grid: levels -8..7 of ``step`` (shape [1] or [channels])."""
    if dim is None:
        return torch.fake_quantize_per_tensor_affine(x, step, zero, -HALF, HALF - 1)
    return torch.fake_quantize_per_channel_affine(x, step, zero, dim, -HALF, HALF - 1)


def naive_octav_fq(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """The textbook way: 10 OCTAV iterations as tensor ops, then PyTorch's fake quant."""
    step = (torch_naive_loop(x, BITS, dim) / HALF).reshape(-1)
    return torch_fake_quant(x, step, torch.zeros_like(step, dtype=torch.int32), dim)


def backend_providers(name: str, x: torch.Tensor, g: torch.Tensor, scale: torch.Tensor,
                      dim: int | None) -> dict[str, Provider]:
    previous: list[torch.Tensor | None] = [None]

    def warm() -> None:
        previous[0] = ok.octav_fake_quantize(x, BITS, dim=dim, init=previous[0])[1]

    def forward_backward() -> None:
        leaf = x.detach().requires_grad_()
        ok.octav_fake_quantize(leaf, BITS, dim=dim)[0].backward(g)

    def backward(grad: str) -> Callable[[], torch.Tensor]:
        return lambda: torch.ops.octav.fake_quantize_backward(g, x, scale, True, dim, None, grad)

    return {
        f"octav_fake_quantize[{name}]":
            Provider(lambda: ok.octav_fake_quantize(x, BITS, dim=dim), 2, name),
        f"octav_fake_quantize warm[{name}]": Provider(warm, 2, name),
        f"fake_quantize fixed[{name}]":
            Provider(lambda: ok.fake_quantize(x, scale, BITS, dim=dim), 2, name),
        f"MAD backward[{name}]": Provider(backward("mad"), 3, name),
        f"PWL backward[{name}]": Provider(backward("pwl"), 3, name),
        f"LSQ backward[{name}]": Provider(
            lambda: torch.ops.octav.fake_quantize_lsq_backward(g, x, scale, BITS, True, dim),
            3, name),
        f"octav_fake_quantize fwd+bwd MAD[{name}]": Provider(forward_backward, 5, name),
    }


def providers(x: torch.Tensor, g: torch.Tensor, dim: int | None, backends: list[str],
              compiled: Callable | None) -> dict[str, Provider]:
    """Every provider of one case; ``compiled`` is the torch.compile'd naive loop, or None."""
    scale = ok.octav_scale(x, BITS, dim=dim)  # by the device's default backend
    step = (scale / HALF).reshape(-1)
    zero = torch.zeros_like(step, dtype=torch.int32)
    dst = torch.empty_like(x)
    out: dict[str, Provider] = {}
    for name in backends:
        out.update(backend_providers(name, x, g, scale, dim))
    out["torch fake_quant"] = Provider(lambda: torch_fake_quant(x, step, zero, dim), 2, None)
    out[NAIVE] = Provider(lambda: naive_octav_fq(x, dim), 2, None)
    out[COMPILED] = Provider(None if compiled is None else lambda: compiled(x, dim), 2, None)
    out[COPY] = Provider(lambda: dst.copy_(x), 2, None)
    return out


def cuda_median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of one call of ``fn`` by CUDA events, after a warm-up call."""
    fn()  # warm-up: compiles, autotunes, allocates
    before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    before.record()
    fn()
    after.record()
    after.synchronize()
    probe_ms = max(before.elapsed_time(after), 1e-3)
    # Calls too short to time alone run back to back; host launch overhead then counts, as in use.
    loop = max(1, min(MAX_LOOP, int(MIN_RUN_MS / probe_ms)))
    # Calls of seconds (a slow kernel on 256M elements) get fewer runs: the suite stays minutes.
    runs = min(repeats, max(MIN_RUNS, int(BUDGET_MS / (probe_ms * loop))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(runs)]
    for start, end in events:
        start.record()
        for _ in range(loop):
            fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) / loop


def measure(provider: Provider, device: torch.device, repeats: int) -> tuple[float | None, str]:
    """(ms, "") or (None, "n/a (why)"): a provider that fails or does not fit is reported."""
    if provider.fn is None:
        return None, "skipped (--quick)"
    serve = ok.use_backend(provider.backend) if provider.backend else contextlib.nullcontext()
    try:
        with serve:
            if device.type == "cuda":
                return cuda_median_ms(provider.fn, repeats), ""
            return median_ms(provider.fn, repeats), ""
    except torch.cuda.OutOfMemoryError:
        return None, "n/a (out of memory)"
    except Exception as err:  # unsupported dtype, compile failure: reported, never faked
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
        # The first line says what failed; a compiler's last line says why.
        why = lines[0][:100] + (f" … {lines[-1][:100]}" if len(lines) > 1 else "")
        return None, f"n/a ({type(err).__name__}: {why.replace('|', '/')})"


def measure_case(case: Case, dtype_name: str, device: torch.device, backends: list[str],
                 repeats: int, compile_naive: bool) -> list[Row]:
    nbytes = case.numel * DTYPES[dtype_name].itemsize
    compiled = None
    if compile_naive:
        torch._dynamo.reset()  # one static-shape compile per case, never the recompile limit
        compiled = torch.compile(naive_octav_fq, dynamic=False)
    try:
        x, g = make_data(case.shape, DTYPES[dtype_name], device)
        fns = providers(x, g, case.dim, backends, compiled)
    except torch.cuda.OutOfMemoryError:
        print(f"{case.label} {dtype_name}: out of memory", file=sys.stderr, flush=True)
        return [Row(case, dtype_name, "(all)", nbytes, None, "n/a (out of memory)")]
    rows = []
    for name, provider in fns.items():
        ms, note = measure(provider, device, repeats)
        rows.append(Row(case, dtype_name, name, provider.traffic * nbytes, ms, note))
        print(f"{case.label} {dtype_name} {name}: {format_time(rows[-1])}", file=sys.stderr,
              flush=True)
    return rows


def format_time(row: Row) -> str:
    if row.ms is None:
        return row.note
    return f"{row.ms * 1e3:.1f} µs" if row.ms < 1 else f"{row.ms:.2f} ms"


def format_gbps(row: Row) -> str:
    if row.gbps is None:
        return "—"
    return f"{row.gbps:.1f}" if row.gbps < 100 else f"{row.gbps:.0f}"


def by_case(rows: list[Row]) -> dict[tuple[Case, str], dict[str, Row]]:
    """The rows of each (case, dtype), by provider name."""
    out: dict[tuple[Case, str], dict[str, Row]] = {}
    for r in rows:
        out.setdefault((r.case, r.dtype), {})[r.provider] = r
    return out


def of_copy(by_name: dict[str, Row], name: str) -> float | None:
    """Bandwidth of provider ``name`` over the copy's on the same case (a fraction)."""
    row, copy = by_name.get(name), by_name.get(COPY)
    if row is None or copy is None or row.gbps is None or copy.gbps is None:
        return None
    return row.gbps / copy.gbps


def results_tables(rows: list[Row], repeats: int) -> list[str]:
    grouped = by_case(rows)
    lines = []
    for gran in ("per-tensor", "per-channel"):
        for dtype_name in dict.fromkeys(r.dtype for r in rows):
            mine = [r for r in rows if r.case.gran == gran and r.dtype == dtype_name]
            if not mine:
                continue
            lines += [f"### {gran}, {dtype_name}, {BITS}-bit signed (median of up to {repeats} "
                      "runs)",
                      "", "| tensor | provider | time | GB/s | % copy |",
                      "|---|---|---:|---:|---:|"]
            for r in mine:
                pct = of_copy(grouped[r.case, r.dtype], r.provider)
                lines.append(f"| {r.case.label} | {r.provider} | {format_time(r)} | "
                             f"{format_gbps(r)} | "
                             + ("—" if pct is None else f"{100 * pct:.0f}%") + " |")
            lines.append("")
    return lines


class Target(NamedTuple):
    gran: str | None  # None: both granularities
    what: str
    limit: float
    higher_is_better: bool
    percent: bool  # the value is a fraction shown as a percentage, else a ratio shown as "x"
    value: Callable[[dict[str, Row], str], float | None]  # (rows of one case by provider, backend)


def _ms(by_name: dict[str, Row], name: str) -> float | None:
    row = by_name.get(name)
    return None if row is None else row.ms


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


TARGETS = [
    Target("per-channel", "octav_fake_quantize / fake_quantize fixed", 1.3, False, False,
           lambda r, b: _ratio(_ms(r, f"octav_fake_quantize[{b}]"),
                               _ms(r, f"fake_quantize fixed[{b}]"))),
    Target("per-channel", "octav_fake_quantize, % of copy bandwidth", 0.80, True, True,
           lambda r, b: of_copy(r, f"octav_fake_quantize[{b}]")),
    Target("per-tensor", "octav_fake_quantize / fake_quantize fixed", 2.0, False, False,
           lambda r, b: _ratio(_ms(r, f"octav_fake_quantize[{b}]"),
                               _ms(r, f"fake_quantize fixed[{b}]"))),
    Target(None, "MAD backward, % of copy bandwidth", 0.85, True, True,
           lambda r, b: of_copy(r, f"MAD backward[{b}]")),
    Target(None, "octav_fake_quantize speedup over the naive loop", 10.0, True, False,
           lambda r, b: _ratio(_ms(r, NAIVE), _ms(r, f"octav_fake_quantize[{b}]"))),
    Target(None, "octav_fake_quantize speedup over torch.compile(naive loop)", 3.0, True, False,
           lambda r, b: _ratio(_ms(r, COMPILED), _ms(r, f"octav_fake_quantize[{b}]"))),
]


def judged(rows: list[Row]) -> list[Case]:
    """The cases the targets are judged on: >= 16M elements, else the largest per granularity."""
    out = []
    for gran in ("per-tensor", "per-channel"):
        mine = list(dict.fromkeys(r.case for r in rows if r.case.gran == gran))
        big = [c for c in mine if c.numel >= BIG]
        out += big or ([max(mine, key=lambda c: c.numel)] if mine else [])
    return out


def targets_table(rows: list[Row], backends: list[str]) -> list[str]:
    grouped = by_case(rows)
    cases_judged = judged(rows)
    lines = ["### Targets (issue 9)", "",
             "Judged on " + ", ".join(c.label for c in cases_judged)
             + " (every dtype); worst case shown.", "",
             "| backend | granularity | target | goal | worst | on | met? |",
             "|---|---|---|---:|---:|---|---|"]
    for name in backends:
        for t in TARGETS:
            show = (lambda v: f"{100 * v:.0f}%") if t.percent else (
                lambda v: f"{v:.0f}x" if v >= 100 else f"{v:.3g}x")
            values = [(v, f"{case.label} {dtype}")
                      for (case, dtype), by_name in grouped.items()
                      if case in cases_judged and t.gran in (None, case.gran)
                      and (v := t.value(by_name, name)) is not None]
            goal = (">= " if t.higher_is_better else "<= ") + show(t.limit)
            cells = ["n/a", "", ""]
            if values:
                v, where = (min if t.higher_is_better else max)(values)
                met = v >= t.limit if t.higher_is_better else v <= t.limit
                cells = [show(v), where, "met" if met else "**missed**"]
            lines.append(f"| {name} | {t.gran or 'both'} | {t.what} | {goal} | "
                         + " | ".join(cells) + " |")
    return lines


def plot(rows: list[Row], path: str) -> None:
    """GB/s against size of the per-tensor cases, one line per provider, one panel per dtype."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r.case.gran == "per-tensor" and r.gbps is not None]
    dtypes = list(dict.fromkeys(r.dtype for r in measured))
    if not dtypes:
        print(f"no per-tensor case was measured: no plot written to {path}", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(dtypes), figsize=(8 * len(dtypes), 6), squeeze=False)
    providers = list(dict.fromkeys(r.provider for r in measured))
    colors = plt.get_cmap("tab20").colors  # one colour per provider; style by backend
    for ax, dtype_name in zip(axes[0], dtypes):
        mine = [r for r in measured if r.dtype == dtype_name]
        for name in dict.fromkeys(r.provider for r in mine):
            points = [(r.case.numel, r.gbps) for r in mine if r.provider == name]
            style = "-" if "[cuda]" in name else "--" if "[triton]" in name else ":"
            ax.plot(*zip(*points), style, marker="o", label=name,
                    color=colors[providers.index(name) % len(colors)])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("elements (per tensor)")
        ax.set_ylabel("GB/s (minimal traffic)")
        ax.set_title(f"per-tensor, {dtype_name}, {BITS}-bit")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}", file=sys.stderr)


LSQ_GRANS = [("g32", {"group_size": 32}), ("g128", {"group_size": 128}),
             ("per channel", {"dim": 0})]
LSQ_TARGET = 1.3  # issue 29: LSQ forward + backward within 1.3x of fake_quantize's


def lsq_table(device: torch.device, backends: list[str], dtype_name: str, repeats: int,
              quick: bool) -> list[str]:
    """LSQ (``fake_quantize_lsq``: grad_x and the scale's gradient) against ``fake_quantize``
    with a fixed scale (grad_x only), forward + backward through autograd with MAD, on the
    4096x4096 weight (``--quick``: 64x256) at g32, g128 and per channel."""
    shape = QUICK_SHAPE if quick else (4096, 4096)
    x, g = make_data(shape, DTYPES[dtype_name], device)
    label = "x".join(map(str, shape))
    lines = [f"### LSQ forward + backward against fake_quantize's, {label} {dtype_name} "
             f"(median of up to {repeats} runs; target <= {LSQ_TARGET}x, issue 29)", "",
             "| granularity | backend | fake_quantize fwd+bwd | LSQ fwd+bwd | ratio | target |",
             "|---|---|---:|---:|---:|---|"]
    for gran_name, gran in LSQ_GRANS:
        scale = ok.max_scale(x, **gran) / 2

        def fixed(gran=gran, scale=scale) -> None:
            leaf = x.detach().requires_grad_()
            ok.fake_quantize(leaf, scale, BITS, **gran).backward(g)

        def learned(gran=gran, scale=scale) -> None:
            leaf = x.detach().requires_grad_()
            ok.fake_quantize_lsq(leaf, scale.detach().requires_grad_(), BITS, **gran).backward(g)

        for name in backends:
            a, note_a = measure(Provider(fixed, 5, name), device, repeats)
            b, note_b = measure(Provider(learned, 5, name), device, repeats)
            ratio = None if a is None or b is None else b / a
            verdict = "-" if ratio is None else ("met" if ratio <= LSQ_TARGET else "missed")
            lines.append(f"| {gran_name} | {name} | {note_a or f'{a:.3f} ms'} | "
                         f"{note_b or f'{b:.3f} ms'} | "
                         f"{'-' if ratio is None else f'{ratio:.2f}x'} | {verdict} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines + [""]


def few_groups_table(device: torch.device, backends: list[str], repeats: int,
                     quick: bool) -> list[str]:
    """``octav_scale`` of a few huge groups (``[4, n]``, ``dim=0``: the CUDA few-groups split,
    issue 29) against the per-tensor scale of the same ``4 n`` elements, float32, cold start."""
    n = 2**16 if quick else 2**22
    x, _ = make_data((4, n), torch.float32, device)
    lines = [f"### Few large groups: octav_scale of [4, {n}] per channel against per tensor "
             f"(median of up to {repeats} runs)", "",
             "| backend | [4, n], dim=0 | per tensor | ratio |", "|---|---:|---:|---:|"]
    for name in backends:
        a, note_a = measure(Provider(lambda: ok.octav_scale(x, BITS, dim=0), 1, name), device,
                            repeats)
        b, note_b = measure(Provider(lambda: ok.octav_scale(x, BITS), 1, name), device, repeats)
        ratio = "-" if a is None or b is None else f"{a / b:.2f}x"
        lines.append(f"| {name} | {note_a or f'{a:.3f} ms'} | {note_b or f'{b:.3f} ms'} | "
                     f"{ratio} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines + [""]


def header(device: torch.device, commit: str | None, command: str) -> list[str]:
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
        except OSError:  # no git
            commit = ""
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "not installed"
    if device.type == "cuda":
        machine = f"GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        machine = f"CPU: {cpu_name()}, {torch.get_num_threads()} threads"
    return [f"{machine}; torch {torch.__version__}, triton {triton_version}; commit "
            f"{commit or 'unknown'}; command: `{command}`.", ""]


def parse_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in allowed:
            raise argparse.ArgumentTypeError(f"unknown {what} {n!r}; choose from {allowed}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true",
                        help="one small case per granularity, one dtype, 3 repeats (smoke test)")
    parser.add_argument("--dtypes", type=lambda s: parse_list(s, tuple(DTYPES), "dtype"),
                        help="comma-separated (default float32,bfloat16; --quick: float32)")
    parser.add_argument("--backends",
                        type=lambda s: parse_list(s, backend.BACKENDS[1:], "backend"),
                        help="comma-separated (default: the available ones of triton,cuda; "
                             "cpu with --device cpu)")
    parser.add_argument("--repeats", type=int, help="timed runs per provider (default 20; "
                                                   "--quick: 3)")
    parser.add_argument("--commit", help="commit to record (default: git rev-parse HEAD)")
    parser.add_argument("--out", help="also write the tables to this markdown file")
    parser.add_argument("--plot", help="write a PNG of GB/s against size (per tensor) here")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --device cpu")
    backends = args.backends or ([n for n in ("triton", "cuda") if backend.available(n, device)]
                                 if device.type == "cuda" else ["cpu"])
    missing = [n for n in backends if not backend.available(n, device)]
    if missing or not backends:
        parser.error(f"backend(s) {missing or ['triton', 'cuda']} cannot serve {device.type} "
                     "tensors here")
    dtypes = args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"])
    repeats = args.repeats or (3 if args.quick else 20)
    compile_naive = not (args.quick and device.type == "cpu")

    rows = []
    for case in cases(args.quick):
        for dtype_name in dtypes:
            rows += measure_case(case, dtype_name, device, backends, repeats, compile_naive)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    command = shlex.join(["python"] + sys.argv)
    extra = (lsq_table(device, backends, dtypes[0], repeats, args.quick)
             + few_groups_table(device, backends, repeats, args.quick))
    emit([f"# GPU benchmark: OCTAV fake quantization ({device.type})", ""]
         + header(device, args.commit, command) + results_tables(rows, repeats)
         + targets_table(rows, backends) + [""] + extra, args.out)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
