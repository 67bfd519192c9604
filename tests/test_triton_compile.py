"""Compiled Triton without a GPU: every kernel the Triton backend launches for a sample of op
calls is compiled to PTX and SASS for sm_80 and sm_90 (``triton.compile`` with a ``GPUTarget``;
Triton ships ptxas). The interpreter runs the kernels' logic in the parity tests; only the
compiler checks the rest (types of loop-carried values, constexpr use, ops the interpreter
accepts and codegen does not), so a kernel change that would fail on every GPU fails here.

The launches are recorded under the interpreter (argument types, constexprs, options), then
compiled in a child process without ``TRITON_INTERPRET`` (where ``@triton.jit`` gives compilable
functions)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_data

import octav_kernels as ok
from octav_kernels import use_backend

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
           torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32", torch.int8: "i8",
           torch.uint8: "u8", torch.bool: "i1"}

_COMPILE = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

failures = []
for case in json.loads(sys.stdin.read()):
    fn = getattr(importlib.import_module(case["module"]), case["kernel"])
    for arch in (80, 90):
        try:
            src = ASTSource(fn=fn, signature=case["signature"], constexprs=case["constexprs"])
            triton.compile(src, target=GPUTarget("cuda", arch, 32), options=case["options"])
        except Exception as e:  # reported with the case, all at once
            failures.append(f"{case['kernel']} sm_{arch} {case['constexprs']}: "
                            f"{type(e).__name__}: {str(e)[-600:]}")
print(json.dumps(failures))
"""


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


def _record(monkeypatch) -> list[dict]:
    """Patches every Triton module's ``launch`` to note (kernel, signature, constexprs, options)
    of each launch before running it."""
    import octav_kernels.triton as package

    cases = {}

    def recording(original):
        def launch(kernel, grid, device_tensor, *args, **meta):
            fn = kernel.fn
            names = list(inspect.signature(fn).parameters)
            signature = {n: _arg_type(a) for n, a in zip(names, args)}
            constexprs = {n: v for n, v in meta.items() if n in names}
            signature.update({n: "constexpr" for n in constexprs})
            options = {k: v for k, v in meta.items() if k not in names}
            case = {"module": fn.__module__, "kernel": fn.__name__, "signature": signature,
                    "constexprs": constexprs, "options": options}
            cases.setdefault(json.dumps(case, sort_keys=True), case)
            original(kernel, grid, device_tensor, *args, **meta)
        return launch

    for name in ("octav", "fake_quant", "lsq", "refine"):
        module = getattr(package, name)
        monkeypatch.setattr(module, "launch", recording(module.launch))
    return cases


def _exercise(monkeypatch) -> None:
    """A sample of op calls that reaches every kernel (and the variants of the multi-program
    OCTAV path, with a small MULTI_MIN), on tiny tensors."""
    from octav_kernels.triton import octav as triton_octav

    x = make_data((4, 64), seed=1)
    h = torch.rand(64, generator=torch.Generator().manual_seed(2))
    with use_backend("triton"):
        for importance in (None, h):
            s = ok.octav_scale(x, 4, dim=0, importance=importance)
            ok.masked_sums(x, s, dim=0, importance=importance)
            ok.refine_scale(x, s, 4, dim=0, importance=importance)
        monkeypatch.setattr(triton_octav, "MULTI_MIN", 64)
        for importance in (None, h.expand(4, 64)):
            s = ok.octav_scale(x, 4, importance=importance)
            ok.masked_sums(x, s, importance=importance)
        monkeypatch.setattr(triton_octav, "MULTI_MIN", 1 << 20)
        s = ok.octav_scale(x, 4, dim=0)
        for grad in ("ste", "pwl", "mad"):
            leaf = x.clone().requires_grad_()
            ok.fake_quantize(leaf, s, 4, dim=0, grad=grad).sum().backward()
            leaf = x.clone().requires_grad_()
            ok.octav_fake_quantize(leaf, 4, dim=0, grad=grad)[0].sum().backward()
        learned = s.clone().requires_grad_()
        leaf = x.clone().requires_grad_()
        ok.fake_quantize_lsq(leaf, learned, 4, dim=0).sum().backward()
        leaf = x.clone().requires_grad_()
        state = ok.OscillationState.start(x, s, 3, dim=0)
        ok.fake_quantize_tracked(leaf, s, 3, state, dim=0).sum().backward()
        ok.dampening_loss(leaf, s, 3, dim=0).backward()


def test_every_launched_kernel_compiles_for_sm80_and_sm90(monkeypatch):
    cases = _record(monkeypatch)
    _exercise(monkeypatch)
    kernels = {c["kernel"] for c in cases.values()}
    assert len(kernels) >= 10, sorted(kernels)  # every family was reached
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(list(cases.values())),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert failures == [], "\n".join(failures)
