#!/usr/bin/env bash
# CI helper for the csrc extension (issue 3): install its build tools, then build scattermoe._C once
# into build/csrc-cache/ (keyed by a hash of csrc/ and the toolchain), which tests/test_cutlass_build.py
# reuses. Measured on the 2-core CI-like machine: ~150-220 s wall with 2 compiler processes, ~3.6 GB peak
# each (13 sources). Needs nvcc (CUDA >= 12.3); no GPU.
#
# Usage: bash .ci/build_csrc.sh [--tools-only | --build-only]. .ci/run installs the tools first, then builds
# in the background (MAX_JOBS=1) while the tests run: the tests that need the module run last and, through
# the cache's lock, wait for this build instead of starting their own.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
step="${1:-all}"

if [ "$step" != "--build-only" ]; then
    python -m pip install pybind11
    # Headers only: --no-deps keeps the wheel's CUTLASS Python DSL requirements out.
    python -m pip install --no-deps nvidia-cutlass==4.2.0.0
    python csrc/build.py --check
fi
if [ "$step" != "--tools-only" ]; then
    start=$SECONDS
    python csrc/build.py --cache build/csrc-cache
    echo "ci: csrc build step took $((SECONDS - start)) s"
fi
