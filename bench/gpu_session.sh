#!/usr/bin/env bash
# What a GPU session should run, in two device calls of < 10 min each on an H100 (the build is
# kept between calls while the machine stays warm):
#   checks: build the CUDA kernels, the GPU parity suite (compiled Triton + CUDA against the
#           reference; test_cuda.py: every solver path at this GPU's shared-memory budget, a second
#           GPU when there is one, the Triton multi-program pass), the >2^31-element test,
#           compute-sanitizer memcheck and racecheck (~5 min);
#   bench:  the GPU benchmark -> gpu_bench.md + gpu_bandwidth.png, and the oscillation-tracking
#           benchmark -> gpu_oscillation.md, for bench/results/ (~6 min).
# Logs and tables go to $OUT (default gpu-out). From the repository root on the GPU machine:
#
#     bash bench/gpu_session.sh checks
#     bash bench/gpu_session.sh bench <commit>
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TRITON_INTERPRET=0 PYTHONPATH=$PWD
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
what=${1:?usage: gpu_session.sh checks|bench [commit]}
commit=${2:-unknown}

step() { echo "== $1"; }
step "build"
ls octav_kernels/_C*.so > /dev/null 2>&1 || python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; exit 1; }
python3 -c "import octav_kernels as ok; assert ok.backend.cuda_kernels_built(), 'no CUDA kernels'" \
  || exit 1

if [ "$what" = checks ]; then
step "GPU parity suite"
OCTAV_REQUIRE_BACKENDS=triton-cuda,cuda-cuda timeout 300 python3 -m pytest tests -q -k cuda -n 8 \
  -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log"

step "more than 2^31 elements"
OCTAV_LARGE_TESTS=1 timeout 120 python3 -m pytest tests/test_robustness.py -q -k "2_31 and cuda" \
  -p no:cacheprovider 2>&1 | tail -2

step "compute-sanitizer memcheck / racecheck"
# Each selection must run tests (pytest exits 5 when it selects none: the racecheck of an
# earlier session selected none).
memcheck="float32 or not solver"
racecheck="solver_paths and float32 and not unsigned"
lsq="lsq and float32"  # the LSQ backward (issue 29)
# test_lsq.py's CUDA cases: every LSQ kernel shape (warp, strided, block), frozen elements
lsq_file="cuda-cuda and (many_short or by_hand or frozen)"
for fk in "tests/test_cuda.py:$memcheck" "tests/test_cuda.py:$racecheck" \
          "tests/test_cuda.py:$lsq" "tests/test_lsq.py:$lsq_file"; do
  n=$(python3 -m pytest "${fk%%:*}" -q --co -p no:cacheprovider -k "${fk#*:}" | grep -c "::")
  echo "selection '$fk': $n tests"
  [ "$n" -gt 0 ] || exit 1
done
sanitize() {  # tool, selection, log name, time limit[, test file]
  timeout "$4" compute-sanitizer --tool "$1" python3 -m pytest "${5:-tests/test_cuda.py}" -q \
    -p no:cacheprovider -k "$2" > "$OUT/$3" 2>&1
  tail -3 "$OUT/$3"
}
sanitize memcheck "$memcheck" memcheck.log 150
sanitize racecheck "$racecheck" racecheck.log 240
sanitize memcheck "$lsq" memcheck_lsq.log 150
sanitize racecheck "$lsq" racecheck_lsq.log 150
sanitize memcheck "$lsq_file" memcheck_test_lsq.log 120 tests/test_lsq.py
sanitize racecheck "$lsq_file" racecheck_test_lsq.log 120 tests/test_lsq.py

fi

if [ "$what" = bench ]; then
step "benchmark"
timeout 330 python3 bench/bench_gpu.py --repeats 10 --commit "$commit" --out "$OUT/gpu_bench.md" \
  --plot "$OUT/gpu_bandwidth.png" > "$OUT/bench_stdout.log" 2> "$OUT/bench_stderr.log"
tail -12 "$OUT/gpu_bench.md"
timeout 120 python3 bench/bench_oscillation.py --device cuda --commit "$commit" \
  --out "$OUT/gpu_oscillation.md" > /dev/null 2> "$OUT/oscillation_stderr.log"
tail -6 "$OUT/gpu_oscillation.md"
fi
