"""The benchmark scripts run end to end in their --quick modes: bench/bench_gpu.py on the CPU
(C++ kernels), bench/bench_overhead.py, bench/qat_lm.py's cache, bench/fsdp_qat.py,
bench/bench_deploy.py."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROVIDERS = ["octav_fake_quantize[cpu]", "octav_fake_quantize warm[cpu]",
             "fake_quantize fixed[cpu]", "MAD backward[cpu]", "PWL backward[cpu]",
             "LSQ backward[cpu]",
             "octav_fake_quantize fwd+bwd MAD[cpu]", "torch fake_quant",
             "naive torch OCTAV (10 it) + torch fq", "copy (D2D)"]


def test_bench_gpu_quick_on_cpu(tmp_path):
    out = tmp_path / "t.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "bench/bench_gpu.py", "--device", "cpu", "--quick",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for name in PROVIDERS:  # measured in both cases: a time, never "n/a"
        mine = [row for row in rows if f"| {name} |" in row]
        assert len(mine) == 2 and not any("n/a" in row for row in mine), (name, mine)
    assert "| torch.compile(naive loop) | skipped (--quick) |" in text
    assert "### Targets (issue 9)" in text
    assert sum(row.startswith("| cpu |") for row in rows) == 7  # 6 targets, 1 few-groups row
    assert "### LSQ forward + backward" in text and "### Few large groups" in text
    lsq = [row for row in rows if row.startswith(("| g32 | cpu", "| g128 | cpu",
                                                  "| per channel | cpu"))]
    assert len(lsq) == 3 and not any("n/a" in row for row in lsq), lsq


def test_bench_overhead_quick(tmp_path):
    out = tmp_path / "t.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "bench/bench_overhead.py", "--quick", "--out",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("|") for line in out.read_text().splitlines() if line.startswith("| ")]
    times = {}
    for row in rows:
        if row[1].strip() != "call":
            times.setdefault(row[1].strip(), []).append(float(row[2]))
    for name in ("fake_quantize_lsq (MAD, scale gradient)", "Quantizer (training, learned scale)",
                 "masked_sums", "octav_kernels, dynamic OCTAV + refine", "fp32"):
        assert name in times, name
    assert all(t > 0 for ts in times.values() for t in ts)


def test_qat_lm_pretrain_cache_quick(tmp_path):
    """bench/qat_lm.py --quick --pretrain-only: no cache unless --cache-dir is given (nothing
    written under HOME); with it, the second run loads the first run's checkpoint and curve."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "OCTAV_CACHE", "XDG_CACHE_HOME")}
    env["HOME"] = str(home)

    def run(*extra):
        proc = subprocess.run([sys.executable, "bench/qat_lm.py", "--quick", "--pretrain-only",
                               *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    out = run()
    assert "seed 0: 0 → " in out and "(cache off)" in out
    assert not home.exists()
    cache = tmp_path / "cache"
    first, second = run("--cache-dir", str(cache)), run("--cache-dir", str(cache))
    assert "pretrained in this run" in first and "loaded from the cache" in second
    curve = [line for line in first.splitlines() if line.strip().startswith("seed 0: 0 → ")]
    assert curve and curve[0] in second.splitlines()
    assert len(list(cache.glob("seed0-*.pt"))) == 1
    bad = subprocess.run([sys.executable, "bench/qat_lm.py", "--quick", "--pretrain-only",
                          "--cache-dir", str(ROOT / "bench")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "inside the repository" in bad.stderr


def test_fsdp_example_matches_one_process(tmp_path):
    """bench/fsdp_qat.py, small: every float32 mode ends within 1e-5 of one process."""
    out = tmp_path / "t.md"
    proc = subprocess.run([sys.executable, "bench/fsdp_qat.py", "--width", "16", "--steps", "3",
                           "--batch", "8", "--blocks", "1", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(" | ") for line in out.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| mode")]
    assert len(rows) == 5
    for row in rows:
        if "bf16" not in row[0]:
            assert float(row[1]) < 1e-5, row


def test_bench_deploy_quick(tmp_path):
    """bench/bench_deploy.py --quick (tiny models): every model has a row per export, and the
    default export's rows show the integer kernels in ORT's optimized graph."""
    out = tmp_path / "t.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "bench/bench_deploy.py", "--quick", "--out",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|")[-2].strip()
            for line in text.splitlines() if line.startswith("| ") and "/ fp32" not in line}
    kernels = {"MLP (a) W4 g32, weight-only": "MatMulNBits 4",
               "MLP (a) W8A8": "MatMulIntegerToFloat 4",
               "byte LM (b) W4 per channel, weight-only": "MatMulNBits",
               "byte LM (b) W4A8": "MatMulIntegerToFloat",
               "digits CNN (c) W4A4, first/last W8A8": "ConvInteger 3"}
    for model, kernel in kernels.items():
        assert kernel in rows[(model, "ort")], (model, rows[(model, "ort")])
        assert "DequantizeLinear" in rows[(model, "qdq")]
    assert "outputs equal to the converted model's bit for bit: True; through torch.export: " \
           "True" in text
