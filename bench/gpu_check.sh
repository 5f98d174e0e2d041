#!/usr/bin/env bash
# The GPU check, one device call of at most 8 minutes. On the GPU machine, from the repository root:
#
#   OUT=/some/empty/dir bash bench/gpu_check.sh            # name .whl in the device tool's carry for bitsandbytes
#   OUT=DIR bash bench/gpu_check.sh --dry-run              # the same stages on CPU: Triton's interpreter, toy sizes
#   GPU_SWEEP=crossover OUT=DIR bash bench/gpu_check.sh    # a measurement run: the forward crossover sweep alone
#   GPU_BENCH_TABLES=forward,layer,model OUT=DIR bash ...  # more tables in the bench stage (same budget)
#   OUT=DIR bash bench/gpu_check.sh --skip tests           # any options of lora_triton/bench/gpu_check.py
#
# Stages, budgets, outputs: lora_triton/bench/gpu_check.py (its docstring); its first stage installs the
# carried wheels (.whl/, bench/fetch_gpu_wheels.sh) into a private folder. This script only makes the
# import path: lora_triton from this checkout through a link in a private folder, so the repository
# root stays off sys.path and the top-level kernels/ folder is never seen as a Python package.
# PYTHON picks the interpreter (default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:?set OUT to the (empty) folder that receives the results}"
PYTHON="${PYTHON:-python3}"
args=(--repo "$ROOT" --out "$OUT" --python "$PYTHON")
case "${GPU_SWEEP:-}" in
  "") ;;
  crossover) args+=(--sweep crossover) ;;
  *) echo "GPU_SWEEP must be unset or 'crossover', got '${GPU_SWEEP}'" >&2; exit 2 ;;
esac
if [ -n "${GPU_BENCH_TABLES:-}" ]; then
  args+=(--tables "$GPU_BENCH_TABLES")
fi

SITE="$(mktemp -d)"
trap 'rm -rf "$SITE"' EXIT
ln -s "$ROOT/lora_triton" "$SITE/lora_triton"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
"$PYTHON" -m lora_triton.bench.gpu_check "${args[@]}" "$@"
