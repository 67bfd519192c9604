# The README's commands. Each target sets up .venv on first use (torch CPU wheel, triton for the
# interpreted Triton backend, test tools, scikit-learn for the QAT demo's bundled dataset) and
# (re)builds the C++ extension when csrc/ changes.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h)

.PHONY: run test bench demo

run: $(VENV)/.built
	$(PY) -m octav_kernels

# CI runs exactly this (.ci/run). OCTAV_REQUIRE_BACKENDS turns a missing backend into a failure
# instead of skipped parity tests.
test: $(VENV)/.built
	OCTAV_REQUIRE_BACKENDS=cpu,triton $(PY) -m pytest tests -q

bench: $(VENV)/.built
	$(PY) bench/bench_octav.py --out bench/results/cpu_octav.md
	$(PY) bench/bench_fake_quant.py --out bench/results/cpu_fake_quant.md

# The end-to-end QAT demo (scikit-learn digits, ~5 min on 2 cores).
demo: $(VENV)/.built
	$(PY) bench/qat_digits.py --out bench/results/cpu_qat_digits.md

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" triton numpy pytest pytest-benchmark scikit-learn
	touch $@

# No build isolation: the extension must compile against the torch installed above.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation -e .
	touch $@
