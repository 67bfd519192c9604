# The README's commands. Each target sets up .venv on first use (torch CPU wheel, triton for the
# interpreted Triton backend, test tools, scikit-learn for the QAT demo's bundled dataset) and
# (re)builds the C++ extension when csrc/ changes.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

# The CUDA build check: compiles and links csrc/cuda/*.cu against a CUDA build of torch in its own
# venv (no GPU needed), without touching the CPU build of .venv, then checks the dispatcher
# registrations and the architectures in the binary (.ci/check_cuda_build.py).
CUDA_TORCH ?= torch==2.14.1
CUDA_VENV := .venv-cuda
CUDA_HOME ?= $(or $(wildcard /usr/local/cuda),$(patsubst %/bin/nvcc,%,$(shell command -v nvcc)))
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX

.PHONY: run test lint bench demo qat-lm cuda-build asan

run: $(VENV)/.built
	$(PY) -m octav_kernels

# CI runs exactly this (.ci/run). OCTAV_REQUIRE_BACKENDS turns a missing backend into a failure
# instead of skipped parity tests.
test: $(VENV)/.built
	OCTAV_REQUIRE_BACKENDS=cpu,triton $(PY) -m pytest tests -q

# Lint of the Python sources (ruff.toml); CI runs it before the tests.
lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .

bench: $(VENV)/.built
	$(PY) bench/bench_octav.py --out bench/results/cpu_octav.md
	$(PY) bench/bench_fake_quant.py --out bench/results/cpu_fake_quant.md
	$(PY) bench/bench_lsq.py --out bench/results/cpu_lsq.md
	$(PY) bench/bench_refine.py --out bench/results/cpu_refine.md
	$(PY) bench/bench_importance.py --out bench/results/cpu_importance.md
	$(PY) bench/bench_oscillation.py --out bench/results/cpu_oscillation.md
	$(PY) bench/bench_overhead.py --out bench/results/cpu_overhead.md
	$(PY) bench/bench_deploy.py --out bench/results/cpu_deploy_ort.md

# The end-to-end QAT demos (scikit-learn digits, ~5 + ~4 min on 2 cores) and the deployment
# path on the same CNN (convert, ONNX export, ONNX Runtime; ~1 min).
demo: $(VENV)/.built
	$(PY) bench/qat_digits.py --out bench/results/cpu_qat_digits.md
	$(PY) bench/qat_oscillations.py --out bench/results/cpu_qat_oscillations.md
	$(PY) bench/deploy_digits.py --out bench/results/cpu_deploy.md

# QAT of a byte-level transformer LM: PTQ, QAT, learned scales and torchao side by side
# (~20 min on 2 cores; torchao is a benchmark-only dependency, installed by .venv).
qat-lm: $(VENV)/.built
	$(PY) bench/qat_lm.py --out bench/results/cpu_qat_lm.md

cuda-build: $(CUDA_VENV)/.deps
	CUDA_HOME="$(CUDA_HOME)" TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" OCTAV_FORCE_CUDA=1 \
	  $(CUDA_VENV)/bin/python setup.py -q build_ext --build-temp build/cuda-tmp --build-lib build/cuda
	$(CUDA_VENV)/bin/python .ci/check_cuda_build.py

# The C++ kernels under AddressSanitizer: a copy of the tracked sources built with
# -fsanitize=address, then the CPU parity tests with libasan preloaded (~2 min; not in CI).
ASAN_TESTS ?= tests/test_octav.py tests/test_fake_quant.py tests/test_robustness.py \
  tests/test_oscillation.py
asan: $(VENV)/.deps
	rm -rf build/asan && mkdir -p build/asan
	git ls-files -z | xargs -0 cp --parents -t build/asan
	cd build/asan && OCTAV_SANITIZE=address $(abspath $(PY)) setup.py -q build_ext --inplace
	cd build/asan && LD_PRELOAD=$$(gcc -print-file-name=libasan.so) \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 OCTAV_REQUIRE_BACKENDS=cpu \
	  $(abspath $(PY)) -m pytest $(ASAN_TESTS) -q -p no:cacheprovider -k "cpu and not triton"

$(CUDA_VENV)/.deps:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CUDA_VENV)/bin/python -m pip install --quiet "$(CUDA_TORCH)" numpy ninja setuptools \
	  "nvidia-cuda-cuobjdump>=13,<14"
	touch $@

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" triton numpy pytest pytest-benchmark hypothesis \
	  scikit-learn ruff onnx onnxruntime onnx_ir torchao
	touch $@

# No build isolation: the extension must compile against the torch installed above.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation -e .
	touch $@
