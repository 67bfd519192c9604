"""Deployed models in ONNX Runtime: latency and file size of ``export_onnx``'s graphs against
the fp32 model's ONNX export, and what ORT's optimizer really runs.

Models (each side by side with its own fp32 export, in one run):

- (a) two residual MLP blocks, d=768 (768 -> 3072 -> 768, GELU), random weights, input
  ``[batch, 1, 768]``: weight-only W4 per channel, per group of 32 and of 128; W8A8; W4A8
  (inputs per tensor, calibrated on 8 random batches);
- (b) the byte LM of ``bench/qat_lm.py`` (seed 0's pretrained fp32 model, from its cache or
  pretrained here), every Linear quantized, windows of 64 bytes;
- (c) the digits CNN of ``bench/qat_digits.py``, fp32-trained a few epochs, W4A4 per channel
  with the first and last layer at 8 bits (``quantize_model``'s defaults).

Each quantized model is exported twice: ``target="ort"`` (the default: ONNX Runtime's integer
kernels) and ``target="qdq"`` (DequantizeLinear + float ops: what ``export_onnx`` wrote
before). For the MLP, ORT's own weight-only tool (``matmul_nbits_quantizer``: block 128,
``accuracy_level=4``, scales recomputed from the float weights) is a further baseline where its
``onnx_ir`` dependency is installed. Columns: file size, median latency of ``repeats`` runs at
batch 1 and 32 (default session options, ``intra_op_num_threads`` = torch's threads; a
model's exports take turns in blocks of runs), both as ratios to the fp32 export; the largest
|ORT output - converted PyTorch model output| relative to the largest |output|; the node types
of ORT's optimized graph (saved with ``SessionOptions.optimized_model_filepath``). For the
byte LM also ``to_torchao``: its outputs against the converted model's, and what rounding our
per-group scales to bfloat16 (torchao's packed CPU kernels' layout) changes.

    python bench/bench_deploy.py --out bench/results/cpu_deploy_ort.md
    python bench/bench_deploy.py --quick        # seconds, for tests (tiny models, no cache)
"""

from __future__ import annotations

import argparse
import collections
import io
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from bench_octav import emit, header
from deploy_digits import ort_predict, ort_session
from torch import nn

import octav_kernels as ok

ROUNDS = 10  # blocks of timed runs per export (latencies_ms)
TARGETS = dict(w4_batch1=0.3, w4_batch32=0.7, w8a8_batch32=0.8, w4_file=0.2, w8_file=0.3)
KERNELS = ("MatMulNBits", "MatMulIntegerToFloat", "ConvInteger", "QLinearConv", "QLinearMatMul",
           "MatMul", "Gemm", "FusedGemm", "Conv", "FusedConv", "FusedMatMul",
           "DequantizeLinear", "QuantizeLinear")


class MLPBlock(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(x)))


def latencies_ms(sessions: dict, x: torch.Tensor, repeats: int, rounds: int = ROUNDS) -> dict:
    """Median ms per call of each session on x. The sessions take turns in ``rounds`` blocks
    of ``repeats / rounds`` timed calls (after 2 untimed ones, so that a block runs with its
    weights in cache, as a deployed model does), so that a change in the machine's load
    hits them alike."""
    feeds = {name: {s.get_inputs()[0].name: x.numpy()} for name, s in sessions.items()}
    times = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            for call in range(2 + max(1, repeats // rounds)):
                start = time.perf_counter()
                s.run(None, feeds[name])
                if call >= 2:
                    times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}  # by session key


def optimized_kernels(model_bytes: bytes, x: torch.Tensor) -> str:
    """The compute and Q/DQ node types of the graph ORT's optimizer made, with counts."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ort_predict(ort_session(model_bytes, path), x)
        counts = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    return ", ".join(f"{op} {counts[op]}" for op in KERNELS if counts[op]) or "-"


def fp32_onnx(model: nn.Module, x: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), buffer, dynamo=False, opset_version=21,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return buffer.getvalue()


def quantized_onnx(converted: nn.Module, x: torch.Tensor, target: str) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ok.OrtFallbackWarning)  # the table shows the kernels
        ok.export_onnx(converted, x, buffer, target=target, input_names=["x"],
                       dynamic_axes={"x": {0: "batch"}})
    return buffer.getvalue()


def ort_matmul_nbits_tool(fp32: bytes) -> bytes | None:
    """ORT's weight-only quantizer on the fp32 graph (block 128, symmetric, accuracy_level 4),
    or None where it cannot run here (it needs the onnx_ir package)."""
    try:
        import onnx
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    except ImportError:
        return None
    config = mnq.DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, bits=4,
                                              accuracy_level=4)
    try:
        tool = mnq.MatMulNBitsQuantizer(onnx.load_from_string(fp32), algo_config=config)
        tool.process()
    except ImportError:
        return None
    buffer = io.BytesIO()
    onnx.save(tool.model.model, buffer)
    return buffer.getvalue()


def measure(model: str, fp32: bytes, variants: dict, inputs: dict[int, torch.Tensor],
            repeats: int) -> list[dict]:
    """One row per export of ``variants`` (config label -> (converted model or None,
    {export name: bytes})): size, latency at each batch, error against the converted model (at
    the largest batch), kernels. Every export of the model and its fp32 export are timed in one
    ``latencies_ms`` call, so the model has one fp32 time per batch."""
    graphs = {("fp32", ""): fp32} | {(label, name): data for label, (_, exports) in
                                     variants.items() for name, data in exports.items()}
    sessions = {key: ort_session(data) for key, data in graphs.items()}
    times = {batch: latencies_ms(sessions, x, repeats) for batch, x in inputs.items()}
    x = inputs[max(inputs)]
    rows = []
    for label, (converted, exports) in variants.items():
        if converted is not None:
            with torch.no_grad():
                expected = converted(x)
        for name, data in exports.items():
            error = None
            if converted is not None:
                error = float((ort_predict(sessions[(label, name)], x) - expected).abs().max()
                              / expected.abs().max())
            rows.append(dict(
                model=f"{model} {label}", export=name, bytes=len(data),
                ratio_bytes=len(data) / len(fp32),
                ms={b: times[b][(label, name)] for b in inputs},
                ratio_ms={b: times[b][(label, name)] / times[b][("fp32", "")] for b in inputs},
                error=error, kernels=optimized_kernels(data, x)))
    return rows


def both_targets(converted: nn.Module, x: torch.Tensor) -> dict[str, bytes]:
    return {target: quantized_onnx(converted, x, target) for target in ("ort", "qdq")}


def calibrated(model: nn.Module, batches: list[torch.Tensor], **config) -> nn.Module:
    """``quantize_model`` with static scales, calibrated on ``batches``, converted."""
    q = ok.quantize_model(model, mode="static", **config)
    ok.calibrate_model(q, batches)
    return ok.convert_model(q.eval())


def mlp_rows(quick: bool, repeats: int) -> list[dict]:
    d, hidden = (128, 256) if quick else (768, 3072)
    torch.manual_seed(0)
    model = nn.Sequential(MLPBlock(d, hidden), MLPBlock(d, hidden)).eval()
    inputs = {b: torch.randn(b, 1, d) for b in (1, 32)}
    calib = [torch.randn(32, 1, d) for _ in range(8)]
    fp32 = fp32_onnx(model, inputs[1])
    configs = {
        "W4 per channel, weight-only": dict(bits=4, quantize_input=False),
        "W4 g32, weight-only": dict(bits=4, quantize_input=False, weight_granularity=32),
        "W4 g128, weight-only": dict(bits=4, quantize_input=False, weight_granularity=128),
        "W8A8": dict(bits=8),
        "W4A8": dict(bits=4, act_bits=8),
    }
    variants = {}
    tool = ort_matmul_nbits_tool(fp32)
    if tool is not None:
        variants["W4 g128 weight-only, ORT's matmul_nbits_quantizer (its own scales)"] = (
            None, {"ORT's tool": tool})
    for label, config in configs.items():
        converted = calibrated(model, calib, first_last_bits=None, **config)
        variants[label] = (converted, both_targets(converted, inputs[1]))
    return measure("MLP (a)", fp32, variants, inputs, repeats)


def lm_rows(quick: bool, repeats: int) -> tuple[list[dict], list[str]]:
    """Rows of the byte LM, and the lines about to_torchao and bfloat16 scales."""
    import qat_lm

    args = qat_lm.parse_args(["--seeds", "1"] + (["--quick"] if quick else []))
    run_ = qat_lm.pretrained(args)
    model = run_.bases[0].eval()
    windows = run_.val_windows[:, :-1]
    calib = [qat_lm.windows(run_.train_data, 8, 64, 777 + k)[:, :-1] for k in range(8)]
    inputs = {1: windows[:1], 32: windows[:32]}
    fp32 = fp32_onnx(model, inputs[1])
    configs = {
        "W4 g32, weight-only": dict(bits=4, quantize_input=False, weight_granularity=32),
        "W4 per channel, weight-only": dict(bits=4, quantize_input=False),
        "W8A8": dict(bits=8),
        "W4A8": dict(bits=4, act_bits=8),
    }
    variants, notes = {}, [f"Byte LM: {run_.sources[0]}; fp32 validation bits per byte "
                           f"{qat_lm.bits_per_byte(model, run_.val_windows):.4f}."]
    for label, config in configs.items():
        converted = calibrated(model, calib, first_last_bits=None, **config)
        variants[label] = (converted, both_targets(converted, inputs[1]))
        if label.startswith("W4 g32"):
            notes += torchao_notes(converted, run_.val_windows)
    return measure("byte LM (b)", fp32, variants, inputs, repeats), notes


def torchao_notes(converted: nn.Module, val_windows: torch.Tensor) -> list[str]:
    """to_torchao against the converted model; bfloat16-rounded scales' effect."""
    import copy

    import qat_lm

    x = val_windows[:, :-1]
    ao = ok.to_torchao(converted)
    with torch.no_grad():
        same = torch.equal(ao(x), converted(x))
        exported = torch.equal(torch.export.export(ao, (x[:4],)).module()(x[:4]),
                               converted(x[:4]))
    rounded = copy.deepcopy(converted)
    for m in rounded.modules():
        if isinstance(m, ok.QuantizedLinear):
            m.weight_step.copy_(m.weight_step.bfloat16().float())
    steps = torch.cat([m.weight_step.reshape(-1) for m in converted.modules()
                       if isinstance(m, ok.QuantizedLinear)])
    moved = float(((steps.bfloat16().float() - steps) / steps).abs().max())
    with torch.no_grad():
        out, out_bf16 = converted(x), rounded(x)
    bpb, bpb_bf16 = (qat_lm.bits_per_byte(m, val_windows) for m in (converted, rounded))
    return [
        f"to_torchao (W4 g32 weight-only byte LM, IntxUnpackedToInt8Tensor weights with our "
        f"levels and steps): outputs equal to the converted model's bit for bit: {same}; "
        f"through torch.export: {exported}.",
        f"Scales rounded to bfloat16 (the layout of torchao's packed KleidiAI kernels for "
        f"per-group scales) move a step by up to {100 * moved:.2f}% and the logits by up to "
        f"{float((out_bf16 - out).abs().max()):.2e} (largest |logit| "
        f"{float(out.abs().max()):.1f}); validation bits per byte {bpb:.4f} -> {bpb_bf16:.4f}.",
    ]


def digits_rows(quick: bool, repeats: int) -> list[dict]:
    from qat_digits import digits, make_model, train

    train_data, test_data = digits()
    model = make_model(16)
    train(model, train_data, 1 if quick else 5, 3e-3, 0)
    model.eval()
    x_test = test_data[0]
    inputs = {1: x_test[:1], 32: x_test[:32]}
    calib = [x for x, _ in zip(train_data[0].split(64), range(8))]
    converted = calibrated(model, calib, bits=4)
    variants = {"W4A4, first/last W8A8": (converted, both_targets(converted, inputs[1]))}
    return measure("digits CNN (c)", fp32_onnx(model, inputs[1]), variants, inputs, repeats)


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | export | file bytes | file / fp32 | batch 1 ms | batch 1 / fp32 | "
             "batch 32 ms | batch 32 / fp32 | max abs error / max abs output | "
             "ORT's optimized graph |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        error = "" if r["error"] is None else f"{r['error']:.1e}"
        lines.append(f"| {r['model']} | {r['export']} | {r['bytes']:,} | "
                     f"{r['ratio_bytes']:.3f} | {r['ms'][1]:.3f} | {r['ratio_ms'][1]:.2f} | "
                     f"{r['ms'][32]:.3f} | {r['ratio_ms'][32]:.2f} | {error} | "
                     f"{r['kernels']} |")
    return lines


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets against the MLP rows of the default export."""
    ort_rows = {r["model"]: r for r in rows if r["export"] == "ort" and "MLP" in r["model"]}
    lines = ["| target | measured | met |", "|---|---|---|"]

    def check(what, values, limit):
        worst = max(values)
        lines.append(f"| {what} <= {limit}x | {', '.join(f'{v:.2f}' for v in values)} | "
                     f"{'yes' if worst <= limit else 'NO'} |")

    w4 = [r for m, r in ort_rows.items() if "weight-only" in m]
    w8 = [r for m, r in ort_rows.items() if "W8A8" in m]
    check("MLP W4 weight-only, batch 1 latency", [r["ratio_ms"][1] for r in w4],
          TARGETS["w4_batch1"])
    check("MLP W4 weight-only, batch 32 latency", [r["ratio_ms"][32] for r in w4],
          TARGETS["w4_batch32"])
    check("MLP W8A8, batch 32 latency", [r["ratio_ms"][32] for r in w8], TARGETS["w8a8_batch32"])
    check("MLP W4 file", [r["ratio_bytes"] for r in w4], TARGETS["w4_file"])
    check("MLP W8 file", [r["ratio_bytes"] for r in w8], TARGETS["w8_file"])
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--repeats", type=int, default=100, help="timed runs per cell")
    parser.add_argument("--quick", action="store_true", help="tiny models (the tests' run)")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    import onnxruntime

    started = time.perf_counter()
    rows = mlp_rows(args.quick, repeats)
    lm, notes = lm_rows(args.quick, repeats)
    rows += lm + digits_rows(args.quick, repeats)
    command = " ".join(["python bench/bench_deploy.py", *(sys.argv[1:] if argv is None
                                                          else argv)])
    lines = header(command) + [
        f"ONNX Runtime {onnxruntime.__version__}, CPU execution provider, default session "
        f"options, {torch.get_num_threads()} intra-op threads; median of {repeats} runs per "
        f"cell, in {ROUNDS} blocks of consecutive runs (after 2 untimed ones) taken in turn by "
        f"all of one model's exports, fp32 included; "
        f"{(time.perf_counter() - started) / 60:.1f} min in all. "
        "Ratios are to the same model's fp32 ONNX export, measured in the same run. `ort`: "
        "`export_onnx`'s default (ONNX Runtime's integer kernels); `qdq`: `target=\"qdq\"` "
        "(DequantizeLinear + float ops). Error: against the converted PyTorch model, batch 32 "
        "(MatMulNBits runs at accuracy_level 4: its input quantized to int8 per block inside "
        "the kernel).", "", *table(rows), "", "Targets (issue 27), default export:", "",
        *targets(rows), "", *[f"- {note}" for note in notes]]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
