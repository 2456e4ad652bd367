#!/usr/bin/env bash
# tests/stop_run.sh NAME DIR STEPS [double] -- TRAIN COMMAND...
#
# A training run stopped by a signal loses nothing (common/training.h, run_catch_stop_signals):
#   1. straight: TRAIN -x STEPS -o DIR/straight, the run to compare with;
#   2. stopped: the same into DIR/stopped, sent SIGTERM once its main.log has step 2: it must
#      finish the step under way, write that step's checkpoint, say where it stopped and how to go
#      on, and exit with status 143 (128 + SIGTERM); the same command with -y 1 then continues to
#      STEPS, and its model, optimizer state, main.log and moe.log must equal the straight run's,
#      byte for byte (no step lost or logged twice; with --stats-every STEPS, the one routing
#      report spans the stop, and the resume state must have carried its sums across);
#   3. with "double": a run given two signals at once, once its main.log has step 1: it is
#      paused (SIGSTOP), sent SIGINT and SIGTERM, and continued (SIGCONT), so that the two reach
#      it together, however slow the machine: the first asks for a stop, the second must end the
#      run at once (killed by that signal, no checkpoint, the request said once at most: with
#      several threads, the two handlers may run at once, and the second may end the process
#      before the first has written). Which is first is the kernel's choice, so either status
#      passes: 130 or 143.
# TRAIN's steps must take long enough for the signal to arrive before the run ends (a tenth of
# a second or more). Prints one PASS or FAIL line per part, named NAME.stop_*.
set -u
name=$1 dir=$2 steps=$3
shift 3
double=0
if [ "${1:-}" = double ]; then double=1; shift; fi
[ "${1:-}" = -- ] && shift
rm -rf "$dir"
mkdir -p "$dir"

# wait_for PATTERN FILE PID: until FILE has a line matching PATTERN, or PID has ended (10 min at
# most), looking every 10 ms: the second signal must land well within the step under way
wait_for() {
    local i
    for ((i = 0; i < 60000; i++)); do
        grep -q -E "$1" "$2" 2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || return 1
        sleep 0.01
    done
    return 1
}
last_lines() { tail -n 2 "$1" | tr '\n' ' ' | cut -c1-300; }
listing() { (cd "$1" && echo *); }
step_file() { printf '%s/%s_%08d%s' "$1" "$2" "$3" "$4"; }

"$@" -x "$steps" -o "$dir/straight" > "$dir/straight.out" 2>&1
rc=$?
if [ "$rc" -ne 0 ] || [ ! -f "$(step_file "$dir/straight" model "$steps" .bin)" ]; then
    echo "FAIL $name.stop_and_resume: the straight run failed (exit status $rc): $(last_lines "$dir/straight.out")"
else
    "$@" -x "$steps" -o "$dir/stopped" > "$dir/stopped.out" 2>&1 &
    pid=$!
    wait_for '^s:2 trl' "$dir/stopped/main.log" "$pid" && kill -TERM "$pid"
    wait "$pid"
    rc=$?
    stopped_at=$(grep -m 1 -o -E "^stopped by SIGTERM at step [0-9]+ of $steps" "$dir/stopped.out" | grep -o -E 'step [0-9]+' | grep -o -E '[0-9]+')
    markers=("$dir/stopped"/DONE_*)
    if [ "$rc" -ne 143 ] || [ -z "$stopped_at" ]; then
        echo "FAIL $name.stop_and_resume: SIGTERM after step 2: exit status $rc (expected 143), ${stopped_at:+stopped at step $stopped_at}${stopped_at:-no line that says where it stopped}: $(last_lines "$dir/stopped.out")"
    elif [ ! -f "$(step_file "$dir/stopped" DONE "$stopped_at" "")" ] || [ "${#markers[@]}" -ne 1 ] || ls "$dir/stopped"/*.tmp > /dev/null 2>&1; then
        echo "FAIL $name.stop_and_resume: stopped at step $stopped_at, expected that step's complete checkpoint and nothing else: $(listing "$dir/stopped")"
    else
        "$@" -x "$steps" -o "$dir/stopped" -y 1 > "$dir/resumed.out" 2>&1
        rc=$?
        differ=""
        for file in "$(basename "$(step_file . model "$steps" .bin)")" "$(basename "$(step_file . state "$steps" .bin)")" main.log moe.log; do
            cmp -s "$dir/straight/$file" "$dir/stopped/$file" || differ="$differ $file"
        done
        if [ "$rc" -eq 0 ] && [ -z "$differ" ]; then
            echo "PASS $name.stop_and_resume: SIGTERM during step $((stopped_at)) of $steps: that step finished, its checkpoint written, exit status 143; -y 1 went on to step $steps: model, optimizer state, main.log and moe.log ($(grep -c ' layer:' "$dir/straight/moe.log") routing lines) byte-identical to the run never stopped"
        else
            echo "FAIL $name.stop_and_resume: resumed at step $stopped_at: exit status $rc, different from the straight run:${differ:- nothing}: $(last_lines "$dir/resumed.out")"
        fi
    fi
fi

if [ "$double" = 1 ]; then
    "$@" -x "$steps" -o "$dir/double" > "$dir/double.out" 2>&1 &
    pid=$!
    paused=0
    if wait_for '^s:1 trl' "$dir/double/main.log" "$pid" && kill -STOP "$pid"; then
        # until the process is stopped (state T in /proc/PID/stat), so both signals wait for it
        for ((i = 0; i < 1000; i++)); do
            [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = T ] && { paused=1; break; }
            sleep 0.01
        done
        kill -INT "$pid"
        kill -TERM "$pid"
        kill -CONT "$pid"
    fi
    wait "$pid"
    rc=$?
    requests=$(grep -c '^stop requested' "$dir/double.out")
    if [ "$paused" = 1 ] && { [ "$rc" -eq 130 ] || [ "$rc" -eq 143 ]; } && [ "$requests" -le 1 ] && ! grep -q '^stopped by' "$dir/double.out" &&
        ! ls "$dir/double"/DONE_* > /dev/null 2>&1; then
        echo "PASS $name.stop_twice: a second signal while the step under way finishes stops the run at once: $requests stop requested, then killed (exit status $rc), no checkpoint"
    else
        echo "FAIL $name.stop_twice: paused $paused, exit status $rc (expected 130 or 143, killed by the second signal), $requests stop requests (expected 1, or 0 when the two ran on two threads at once), with $(listing "$dir/double"): $(last_lines "$dir/double.out")"
    fi
fi
