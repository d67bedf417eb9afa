#!/usr/bin/env bash
# CI helper for the csrc extension (issue 3): install its build tools, then build scattermoe._C once
# into build/csrc-cache/ (keyed by a hash of csrc/ and the toolchain), which tests/test_cutlass_build.py
# reuses. Measured on the 2-core CI-like machine: ~165 s wall (13 sources), ~3.6 GB peak per compiler process
# (2 in parallel). Needs nvcc (CUDA >= 12.3); no GPU. Run from .ci/run before pytest, with
# SCATTERMOE_REQUIRE_CSRC_BUILD=1 exported so the build tests fail instead of skipping.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python -m pip install pybind11
# Headers only: --no-deps keeps the wheel's CUTLASS Python DSL requirements out.
python -m pip install --no-deps nvidia-cutlass==4.2.0.0

python csrc/build.py --check
start=$SECONDS
python csrc/build.py --cache build/csrc-cache
echo "ci: csrc build step took $((SECONDS - start)) s"
