#!/usr/bin/env bash
# One call of the device tool running the GPU protocol (gpu_check.sh), shaped to the tool's limits:
#
#   run(command="bash bench/device_call.sh 'csrc tests bench' 540", carry=["third_party"], timeout_s=600)
#
# gpu_check.sh writes a dozen files (logs, JUnit XML, result .json/.md/.png); the tool returns at most
# 8 from $OUT. So everything goes to a scratch folder, then into $OUT/gpu_check.tgz, with the summary
# (each step's exit status) beside it. Unpack here into a folder and copy the results to bench/results/.
#
# Arguments: the steps (GPU_CHECK_STEPS) and the budget in seconds (GPU_CHECK_BUDGET_S). Exit status:
# gpu_check.sh's.
set -u
STEPS="${1:-csrc tests bench e2e hf}"
BUDGET="${2:-540}"
DEST="${OUT:?device_call.sh runs on the device machine, where OUT names the folder that comes back}"
scratch="$(mktemp -d /tmp/gpu_check.XXXXXX)"
# The copy has no .git: take the commit prepare_gpu_carry.sh recorded (re-run it after committing).
carried="$(dirname "${BASH_SOURCE[0]}")/../third_party/carried_commit"
if [ -z "${BENCH_COMMIT:-}" ] && [ -f "$carried" ]; then
    export BENCH_COMMIT="$(head -n 1 "$carried")" BENCH_DIRTY="$(tail -n 1 "$carried")"
fi
GPU_CHECK_STEPS="$STEPS" GPU_CHECK_BUDGET_S="$BUDGET" PYTHONUNBUFFERED=1 \
    bash "$(dirname "${BASH_SOURCE[0]}")/gpu_check.sh" "$scratch"
rc=$?
tar czf "$DEST/gpu_check.tgz" -C "$scratch" .
cp "$scratch/gpu_check_summary.txt" "$DEST/" 2>/dev/null
exit "$rc"
