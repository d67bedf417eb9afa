#!/usr/bin/env bash
# One call of the device tool running the GPU protocol (gpu_check.sh), shaped to the tool's limits:
#
#   run(command="bash bench/device_call.sh 'csrc tests profile bench' 540", carry=["third_party"], timeout_s=600)
#
# gpu_check.sh writes a dozen files (logs, JUnit XML, result .json/.md/.png); the tool returns at most
# 8 from $OUT. So everything goes to a scratch folder, then into $OUT/gpu_check.tgz, with the summary
# (each step's exit status) beside it. Unpack here into a folder and copy the results to bench/results/.
#
# The tool returns only what is in $OUT when the command ends, and kills it at its timeout_s: a run that
# overruns its budget would bring nothing back. So a snapshot of the scratch folder goes to $OUT at
# budget + 30 s (DEVICE_CALL_SNAPSHOT_S), gpu_check.sh is stopped at budget + 45 s (DEVICE_CALL_KILL_S), and
# the archive is written after it ends either way.
#
# Arguments: the steps (GPU_CHECK_STEPS) and the budget in seconds (GPU_CHECK_BUDGET_S). Exit status:
# gpu_check.sh's (124 when stopped), or 65 when what bench/prepare_gpu_carry.sh makes was not carried
# (DEVICE_CALL_WITHOUT_CARRY=1 runs anyway: no csrc module, no original ScatterMoE, commit unknown).
set -u
STEPS="${1:-csrc tests profile bench e2e hf}"
BUDGET="${2:-540}"
DEST="${OUT:?device_call.sh runs on the device machine, where OUT names the folder that comes back}"
here="$(dirname "${BASH_SOURCE[0]}")"
carried="$here/../third_party/carried_commit"
if [ ! -f "$carried" ] && [ "${DEVICE_CALL_WITHOUT_CARRY:-0}" != 1 ]; then
    # Minutes of device time would go to a run without the csrc module and with no commit named: stop now.
    echo "device_call: third_party/ was not carried (run bash bench/prepare_gpu_carry.sh in this checkout, then" \
         "call with carry=[\"third_party\"]; DEVICE_CALL_WITHOUT_CARRY=1 runs without it)" | tee "$DEST/gpu_check_summary.txt" >&2
    exit 65
fi
scratch="$(mktemp -d /tmp/gpu_check.XXXXXX)"
# The copy has no .git: take the commit prepare_gpu_carry.sh recorded (re-run it after committing).
if [ -z "${BENCH_COMMIT:-}" ] && [ -f "$carried" ]; then
    export BENCH_COMMIT="$(head -n 1 "$carried")" BENCH_DIRTY="$(tail -n 1 "$carried")"
fi
pack() {  # the scratch folder into $DEST/$1, written aside and renamed, so a reader never sees half of it
    tar czf "$DEST/.$1.tmp" -C "$scratch" . 2>/dev/null
    # 1 is GNU tar's "a file changed as we read it" (the log, still being written): the archive is whole.
    [ "$?" -le 1 ] && mv -f "$DEST/.$1.tmp" "$DEST/$1"
    cp "$scratch/gpu_check_summary.txt" "$DEST/" 2>/dev/null
}
# (What is under $OUT comes back even when the tool kills the command at its timeout.)
(
    trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    sleep "${DEVICE_CALL_SNAPSHOT_S:-$(( BUDGET + 30 ))}" &
    nap=$!
    wait "$nap" && pack gpu_check.partial.tgz
) &
snapshot=$!
kill_s="${DEVICE_CALL_KILL_S:-$(( BUDGET + 45 ))}"
# gpu_check.sh in a session of its own, stopped by session: its steps run under timeouts of their own, each in
# a process group of its own, which a signal to gpu_check.sh's group (what `timeout` sends) would miss. The session
# leader writes its id (its pid) to a file for the watchdog (where setsid must fork, it is not setsid's pid).
sid_file="$scratch/.session_id"
stopped="$scratch/.stopped_by_device_call"
# signal_session SIGNAL: every process of gpu_check.sh's session (pkill -s, without procps), its leader last: the
# leader's end ends the call below, which stops the watchdog, perhaps before the others were signalled.
signal_session() {
    local sig="$1" sid stat p session
    sid="$(cat "$sid_file" 2>/dev/null)" || return 0
    for p in /proc/[0-9]*; do
        stat="$(cat "$p/stat" 2>/dev/null)" || continue
        stat="${stat##*) }"  # after "pid (comm) ": state ppid pgrp session ...
        read -r _ _ _ session _ <<< "$stat"
        [ "$session" = "$sid" ] && [ "${p#/proc/}" != "$sid" ] && kill -"$sig" "${p#/proc/}" 2>/dev/null
    done
    kill -"$sig" "$sid" 2>/dev/null
    return 0
}
(
    trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    sleep "$kill_s" &
    nap=$!
    wait "$nap" || exit 0
    touch "$stopped"
    signal_session INT  # python writes its files on SIGINT; tee -i keeps logging
    sleep 5 &
    nap=$!
    wait "$nap" || exit 0
    signal_session KILL
) &
watchdog=$!
# In the foreground: a background job of a shell without job control starts with SIGINT ignored, which its
# processes inherit (python would not see the stop's SIGINT, nor write its files).
GPU_CHECK_STEPS="$STEPS" GPU_CHECK_BUDGET_S="$BUDGET" PYTHONUNBUFFERED=1 \
    setsid --wait bash -c 'echo "$$" > "$0"; exec bash "$1" "$2"' "$sid_file" "$here/gpu_check.sh" "$scratch"
rc=$?
kill "$snapshot" "$watchdog" 2>/dev/null
wait "$snapshot" "$watchdog" 2>/dev/null
if [ -e "$stopped" ]; then
    signal_session KILL  # what outlived gpu_check.sh's end after the SIGINT (the watchdog stops with it)
    rc=124
    rm -f "$stopped"
    echo "device_call: gpu_check.sh stopped after $kill_s s" >&2
fi
rm -f "$sid_file"
pack gpu_check.tgz
if [ -s "$DEST/gpu_check.tgz" ]; then  # packed: the snapshot and the scratch copy are not needed
    rm -f "$DEST/gpu_check.partial.tgz" "$DEST/.gpu_check.partial.tgz.tmp"
    rm -rf "$scratch"
fi
exit "$rc"
