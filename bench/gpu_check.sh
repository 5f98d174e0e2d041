#!/usr/bin/env bash
# Run on the GPU machine from the repository root:  OUT=/some/dir bash bench/gpu_check.sh
#
# 1. the tests that run kernels on the GPU (the same tests CI runs through the interpreter), one
#    fixed kernel config (LORA_TRITON_AUTOTUNE=0) so it compiles each kernel variant once;
# 2. the forward, layer and adapters (mixed-adapter batches, issue 16) benchmark tables
#    (autotuned), one shared time budget; the forward table
#    has every candidate (skinny included, M = 1, 2, 4, 8, 16 ...), the dequant kernel alone per
#    code-table variant, and the skinny kernel over a CUDA graph of many layers (> the 60 MB L2);
#    with GPU_WRITE_DISPATCH=1 (default) it rewrites lora_triton/ops/dispatch_table.json from the
#    fastest candidates (copied to "$OUT/dispatch_table.json": commit it with the CSVs).
# Everything lands in "$OUT": pytest.log, bench/{forward,layer,adapters}.{csv,png}, bench.log, summary.txt.
# Budget by default: at most 150 s of tests + 300 s of benchmark (240 s of points, then it stops
# starting new ones), about 7.5 minutes in the worst case. The GPU image has pytest-xdist and
# pytest-timeout.
# bitsandbytes is optional: without it the tables leave out its baselines.
#
# GPU_SWEEP=crossover (issue 14, item 4): a measurement run instead - no tests, no native build;
# the forward table alone (LORA_TRITON_FORWARD_SWEEP=crossover): M = 16, 32, 64, 128, 256, 512,
# 1024, 2048 on the three Llama-7B shapes at r = 16 and 64, forward and dx rows, and the dispatch
# table rewritten for both operations. One budget as well: GPU_BENCH_BUDGET_S defaults to 450 s
# there (at most 8.5 minutes with the 60 s grace); points past it are skipped and named in
# bench.log (r = 16 runs first).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:?set OUT to the folder that receives the results}"
mkdir -p "$OUT"
cd "$ROOT"
# Wheels the GPU image lacks (bitsandbytes) travel in .whl/ (bench/fetch_gpu_wheels.sh makes it;
# name .whl in the device tool's carry). Installed into a private target, never the image.
SITE="$(mktemp -d)"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
fi
# Import lora_triton from this checkout without installing it, through a link in a private
# folder: the repository root itself stays off sys.path, so the top-level kernels/ folder is
# never seen as a Python package (shared/DESIGN.md).
ln -s "$ROOT/lora_triton" "$SITE/lora_triton"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

sweep="${GPU_SWEEP:-}"
case "$sweep" in
  "") ;;
  crossover) export LORA_TRITON_FORWARD_SWEEP=crossover ;;
  *) echo "GPU_SWEEP must be unset or 'crossover', got '$sweep'" >&2; exit 2 ;;
esac

{
  date -u +"start %Y-%m-%dT%H:%M:%SZ"
  [ -n "$sweep" ] && echo "sweep: $sweep (no tests, forward table with dx rows)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee "$OUT/summary.txt"

# Which tests and how long: GPU_TESTS (default: the files whose tests take the `device` fixture
# or need CUDA - the rest run on the CPU whatever --device says, as in CI), GPU_TEST_TIMEOUT_S
# (150), GPU_BENCH_BUDGET_S (240; the bench process is stopped 60 s after it), all optional.
# On an H200 (2026-11-29) those files ran 545 of 580 tests in 100 s with 14 workers.
# 14 xdist workers: the run is bound by Triton compiles (one per kernel variant), which use one
# CPU core each; no -x, so one failure does not hide the rest; each test at most 120 s; -v so
# a run stopped by its timeout still names every test that failed before the stop.
# PYTHONSAFEPATH (not -P) so the workers, too, keep the repository root off sys.path.
DEVICE_TESTS="tests/test_forward_kernel.py tests/test_skinny_kernel.py tests/test_nf4_decode.py tests/test_dx_kernel.py
  tests/test_ops.py tests/test_module.py tests/test_memory.py tests/test_format_container.py tests/test_bench_quick.py
  tests/test_mixed_batch.py"
tests_rc=0
native_rc=0
if [ -z "$sweep" ]; then
LORA_TRITON_AUTOTUNE=0 PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 timeout -k 5 "${GPU_TEST_TIMEOUT_S:-150}" \
  python3 -m pytest -p no:cacheprovider --import-mode=importlib ${GPU_TESTS:-$DEVICE_TESTS} --device cuda -v -n 14 \
  --timeout 120 -rfE --durations=15 > "$OUT/pytest.log" 2>&1
tests_rc=$?
pkill -9 -f "pytest" 2>/dev/null || true  # xdist workers of a timed-out run must not share the GPU with the timings
grep -E "(FAILED|ERROR) " "$OUT/pytest.log" | sort | uniq | head -60
tail -n 25 "$OUT/pytest.log"
echo "pytest exit code: $tests_rc" | tee -a "$OUT/summary.txt"

# ==== native CUDA kernels (top-level kernels/, issue 20) ==========================================
# Builds the library here for sm_90 (the GPU image has nvcc and CMake; a fresh build folder, so a
# build carried from another machine never gets in the way), runs tests/test_native.py on the GPU
# (failing, not skipping, when the library is missing) and leaves LORA_TRITON_NATIVE_LIB set, so
# the forward benchmark below times the native rows beside the Triton skinny kernel. Logs:
# native_build.log (ptxas resource usage per kernel), native_pytest.log.
NATIVE_BUILD="$ROOT/build/native-gpu"
{ cmake -S "$ROOT" -B "$NATIVE_BUILD" -DCMAKE_BUILD_TYPE=Release -DLORA_TRITON_CUDA_ARCHS=90 \
    -DLORA_TRITON_PTXAS_VERBOSE=ON && cmake --build "$NATIVE_BUILD" -j 16; } > "$OUT/native_build.log" 2>&1
echo "native build exit code: $?" | tee -a "$OUT/summary.txt"
export LORA_TRITON_NATIVE_LIB="$NATIVE_BUILD/liblora_triton_native.so"
LORA_TRITON_REQUIRE_NATIVE=1 PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 timeout -k 5 "${GPU_NATIVE_TEST_TIMEOUT_S:-120}" \
  python3 -m pytest -p no:cacheprovider --import-mode=importlib tests/test_native.py --device cuda -q -rfE \
  --durations=5 > "$OUT/native_pytest.log" 2>&1
native_rc=$?
tail -n 20 "$OUT/native_pytest.log"
echo "native tests exit code: $native_rc" | tee -a "$OUT/summary.txt"
# ==== end of the native section ===================================================================
fi

if [ -n "$sweep" ]; then
  budget="${GPU_BENCH_BUDGET_S:-450}"
  tables="${GPU_BENCH_TABLES:-forward}"
else
  budget="${GPU_BENCH_BUDGET_S:-240}"
  tables="${GPU_BENCH_TABLES:-forward,layer,adapters}"
fi
dispatch_flag=""
[ "${GPU_WRITE_DISPATCH:-1}" = "1" ] && dispatch_flag="--write-dispatch"
PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 timeout -k 5 $((budget + 60)) python3 -m lora_triton.bench --what "$tables" \
  --out "$OUT/bench" --budget-s "$budget" $dispatch_flag > "$OUT/bench.log" 2>&1
bench_rc=$?
cp lora_triton/ops/dispatch_table.json "$OUT/dispatch_table.json" 2>/dev/null || true
cat "$OUT/bench.log"
echo "bench exit code: $bench_rc" | tee -a "$OUT/summary.txt"
date -u +"end %Y-%m-%dT%H:%M:%SZ" | tee -a "$OUT/summary.txt"

[ "$tests_rc" -eq 0 ] && [ "$native_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
