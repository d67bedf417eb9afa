#!/usr/bin/env bash
# Everything gpu_check.sh needs from outside the GPU image, made here (a machine with internet, nvcc and
# no GPU) into the git-ignored third_party/, for the device tool's carry=["third_party"]:
#
#   bash bench/prepare_gpu_carry.sh
#
# 1. third_party/wheels/nvidia_cutlass-4.2.0.0-*.whl: the CUTLASS headers (the image has none);
# 2. third_party/csrc-prebuilt/<key>/: scattermoe._C compiled for the image's Python (3.12 unless
#    GPU_PYTHON names another interpreter), keyed by the csrc sources, that Python and the CUTLASS
#    version. gpu_check.sh's csrc step uses it when the key matches and compiles otherwise: the build
#    is minutes of the session's few minutes of device time, and it is the same nvcc 13.0 on both.
# 3. third_party/scattermoe: the original ScatterMoE, the benchmark's peer, cloned from
#    ORIGINAL_SCATTERMOE_GIT (default its GitHub repository; a machine that cannot reach GitHub names a local
#    copy, e.g. the session's `fetch github:shawntan/scattermoe` mirror).
#
# Needs: pip, nvcc, and an interpreter of the image's Python minor version (pyenv has 3.12 here).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PIN=nvidia-cutlass==4.2.0.0
# The image's Python minor version: python3.12 on PATH, else a pyenv 3.12 (whose shim may be inactive).
if [ -z "${GPU_PYTHON:-}" ]; then
    GPU_PYTHON=python3.12
    python3.12 -c "" 2>/dev/null \
        || GPU_PYTHON="$(ls -d "$(pyenv root 2>/dev/null || echo ~/.pyenv)"/versions/3.12*/bin/python 2>/dev/null | tail -n 1)"
fi
"$GPU_PYTHON" -c "import sys; assert sys.version_info[:2] == (3, 12), sys.version" \
    || { echo "prepare: no Python 3.12 (set GPU_PYTHON to one)" >&2; exit 1; }

mkdir -p third_party/wheels
if ! ls third_party/wheels/nvidia_cutlass-4.2.0.0-*.whl >/dev/null 2>&1; then
    python -m pip download "$PIN" --no-deps -d third_party/wheels
fi
wheel="$(ls third_party/wheels/nvidia_cutlass-4.2.0.0-*.whl | head -n 1)"

# A throwaway environment of the image's Python: pybind11 for the bindings, the wheel's headers.
venv=/tmp/scattermoe-prebuild-venv
if [ ! -x "$venv/bin/python" ]; then
    "$GPU_PYTHON" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q pybind11
"$venv/bin/python" -m pip install -q --no-deps --target /tmp/scattermoe-prebuild-cutlass "$wheel"
SCATTERMOE_CUTLASS_INCLUDE=/tmp/scattermoe-prebuild-cutlass/cutlass_library/source/include \
    "$venv/bin/python" csrc/build.py --prebuild third_party/csrc-prebuilt

if [ ! -d third_party/scattermoe ]; then
    original="${ORIGINAL_SCATTERMOE_GIT:-https://github.com/shawntan/scattermoe}"
    git clone -q --depth 1 "$original" third_party/scattermoe \
        || echo "prepare: WARNING: could not clone the original ScatterMoE from $original; its benchmark rows" \
                "(the 1.5x target) will read unavailable: set ORIGINAL_SCATTERMOE_GIT to a copy of it" >&2
fi
# The device's copy of the tree has no .git: the commit the result files name travels here (device_call.sh reads it).
{ git rev-parse HEAD; if [ -n "$(git status --porcelain --untracked-files=normal)" ]; then echo dirty; else echo clean; fi; } \
    > third_party/carried_commit
echo "prepare: result files will name commit $(head -n 1 third_party/carried_commit) ($(tail -n 1 third_party/carried_commit))"
du -sh third_party/* | sed 's/^/prepare: carry /'
