#!/usr/bin/env bash
# Download the wheels the GPU machine's image lacks into .whl/ (git-ignored), for the device
# tool's `carry`; bench/gpu_check.sh installs them there into a private folder (its `wheels` stage).
# That machine runs CPython 3.12 on x86-64 and has no package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "bitsandbytes==0.50.2"
ls -la .whl
