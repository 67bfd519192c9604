"""From QAT to ONNX Runtime, end to end, on the digits CNN of bench/qat_digits.py.

The CNN (width 16) is trained in fp32, then quantized (4-bit weights per channel and inputs,
first and last layer at 8 bits, dynamic OCTAV + MPH) and fine-tuned with QAT; then
``convert_model`` (integer weights) and ``export_onnx``, twice: the default graph (ONNX
Runtime's integer kernels: ``ConvInteger``, ``MatMulIntegerToFloat``) and ``target="qdq"``.
Reported side by side: test accuracy of the QAT model, the converted model and both exported
graphs in ONNX Runtime (and whether they predict the same classes); size on disk and ONNX
Runtime CPU latency of both graphs against the fp32 model's ONNX export; the converted model's
state_dict against the fp32 one's.

    python bench/deploy_digits.py --out bench/results/cpu_deploy.md    # the committed table
    python bench/deploy_digits.py --quick                              # seconds, for tests
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
import warnings

import torch
from bench_octav import emit, header
from qat_digits import accuracy, digits, make_model, train

import octav_kernels as ok


def ort_session(model, optimized=None):
    """An ONNX Runtime CPU session of ``model`` (a path or the graph's bytes) with torch's
    thread count; ``optimized``: also save the graph ORT's optimizer made there."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3  # (the notice that the saved graph is CPU-specific)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def ort_predict(session, x: torch.Tensor) -> torch.Tensor:
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def ort_ms(session, x: torch.Tensor, repeats: int) -> float:
    """Median ms per call of the session on x (after a warm-up call)."""
    name = session.get_inputs()[0].name
    feed = {name: x.numpy()}
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def state_bytes(module) -> int:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.tell()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--quick", action="store_true", help="1 epoch each (the tests' run)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    train_data, test_data = digits()
    fp32_epochs, qat_epochs = (1, 1) if args.quick else (30, 15)
    model = make_model(16)
    train(model, train_data, fp32_epochs, 3e-3, args.seed)
    qat = ok.quantize_model(model, 4)
    train(qat, train_data, qat_epochs, 5e-4, args.seed)
    qat.eval()
    converted = ok.convert_model(qat)
    x_test, y_test = test_data
    with torch.no_grad():
        same_as_qat = torch.equal(converted(x_test), qat(x_test))

    exports = {"integer kernels": "ort", "QDQ": "qdq"}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: os.path.join(tmp, f"{target}.onnx") for name, target in exports.items()}
        for name, target in exports.items():
            ok.export_onnx(converted, x_test[:1], paths[name], target=target,
                           dynamic_axes={"input": {0: "batch"}}, input_names=["input"])
        paths["fp32"] = os.path.join(tmp, "fp32.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (x_test[:1],), paths["fp32"], dynamo=False,
                              opset_version=21, input_names=["input"],
                              dynamic_axes={"input": {0: "batch"}})
        sessions = {name: ort_session(path) for name, path in paths.items()}
        sizes = {name: os.path.getsize(path) for name, path in paths.items()}
        with torch.no_grad():
            logits = converted(x_test)
        results = {}
        for name in exports:
            ort_logits = ort_predict(sessions[name], x_test)
            results[name] = dict(
                accuracy=100.0 * float((ort_logits.argmax(1) == y_test).float().mean()),
                agree=float((ort_logits.argmax(1) == logits.argmax(1)).float().mean()),
                max_diff=float((ort_logits - logits).abs().max()))
        repeats = 5 if args.quick else 200
        latency = {(name, batch): ort_ms(s, x_test[:batch], repeats)
                   for name, s in sessions.items() for batch in (1, 256)}

    command = "python bench/deploy_digits.py" + (" --quick" if args.quick else "") + (
        f" --out {args.out}" if args.out else "")
    lines = header(command) + [
        "",
        f"### Digits CNN (width 16): fp32 {fp32_epochs} epochs, then QAT {qat_epochs} epochs "
        "(4-bit weights per channel and inputs, first/last layer 8-bit, OCTAV + MPH); "
        f"{len(y_test)} test images",
        "",
        "| model | test accuracy, % |",
        "|---|---:|",
        f"| fp32 (PyTorch) | {accuracy(model, test_data):.2f} |",
        f"| QAT, eval (PyTorch) | {accuracy(qat, test_data):.2f} |",
        f"| converted, integer weights (PyTorch) | {accuracy(converted, test_data):.2f} |",
        *[f"| exported, {name} (ONNX Runtime {_ort_version()}) | {r['accuracy']:.2f} |"
          for name, r in results.items()],
        "",
        f"Converted logits equal the QAT model's bit for bit: {same_as_qat}. ONNX Runtime's "
        "logits against the converted model's: " + "; ".join(
            f"{name}: max |difference| {r['max_diff']:.2e}, same class for "
            f"{100 * r['agree']:.2f}% of the test images" for name, r in results.items()) + ".",
        "",
        "| | fp32 | integer kernels | ratio | QDQ | ratio |",
        "|---|---:|---:|---:|---:|---:|",
        f"| state_dict bytes (torch.save; converted) | {state_bytes(model):,} | "
        f"{state_bytes(converted):,} | {state_bytes(converted) / state_bytes(model):.3f} | | |",
        f"| ONNX file bytes | {sizes['fp32']:,} | {sizes['integer kernels']:,} | "
        f"{sizes['integer kernels'] / sizes['fp32']:.3f} | {sizes['QDQ']:,} | "
        f"{sizes['QDQ'] / sizes['fp32']:.3f} |",
    ]
    for batch in (1, 256):
        fp32 = latency[("fp32", batch)]
        cells = " | ".join(f"{latency[(name, batch)]:.3f} | {latency[(name, batch)] / fp32:.2f}"
                           for name in exports)
        lines.append(f"| ONNX Runtime CPU latency, batch {batch} (ms, median of {repeats}) | "
                     f"{fp32:.3f} | {cells} |")
    emit(lines, args.out)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
